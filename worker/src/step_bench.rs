//! `ablate-worker bench-step`: steps/s of one training step (forward, backward,
//! Adam) of the quickstart MLP or a small character GPT, built from the
//! substrate our trials train with. `cargo xtask bench` runs it beside the same
//! step in PyTorch from Python (xtask/scripts/peers.py), on the same libtorch
//! and threads.

use std::time::Instant;

use ablate_experiments::nn::kinds::OptimizerName;
use ablate_experiments::nn::model::{Mlp, Param};
use ablate_experiments::nn::optim::{Optimizer, OptimizerConfig};
use ablate_experiments::nn::parametrization::{Parametrization, Scaling};
use ablate_experiments::nn::transformer::{Gpt, GptShape};
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// mlp (64 -> width x 2 -> 10) or gpt (2 layers, width 128, 4 heads, context 64, batch 32).
    #[arg(long)]
    pub model: String,
    /// The MLP's width.
    #[arg(long, default_value_t = 256)]
    pub width: i64,
    /// The MLP's batch.
    #[arg(long, default_value_t = 128)]
    pub batch: i64,
    #[arg(long, default_value_t = 1)]
    pub threads: i32,
    #[arg(long, default_value_t = 500)]
    pub steps: u32,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    tch::set_num_threads(o.threads);
    let device = Device::Cpu;
    let scaling = Scaling {
        parametrization: Parametrization::Sp,
        optimizer: OptimizerName::Adam,
        width_mult: 1.0,
        depth_mult: 1.0,
        zero_readout: false,
    };
    let (params, loss): (&[Param], Box<dyn Fn() -> Tensor>) = match o.model.as_str() {
        "mlp" => {
            let model = Box::leak(Box::new(Mlp::new(64, o.width, 2, 10, false, scaling, 0, device)));
            let x = Tensor::rand([o.batch, 64], (Kind::Float, device));
            let y = Tensor::randint(10, [o.batch], (Kind::Int64, device));
            let m: &Mlp = model;
            (&m.params, Box::new(move || m.forward(&x).cross_entropy_for_logits(&y)))
        }
        "gpt" => {
            let shape = GptShape {
                vocab: 256,
                context: 64,
                d_model: 128,
                layers: 2,
                heads: 4,
                base_head_dim: 32,
            };
            let m: &Gpt = Box::leak(Box::new(Gpt::new(shape, scaling, 0, device)));
            let x = Tensor::randint(256, [32, 64], (Kind::Int64, device));
            let y = Tensor::randint(256, [32, 64], (Kind::Int64, device));
            (
                &m.params,
                Box::new(move || m.forward(&x).view([-1, 256]).cross_entropy_for_logits(&y.view([-1]))),
            )
        }
        other => anyhow::bail!("--model {other}: expected mlp or gpt"),
    };
    let config = OptimizerConfig {
        kind: OptimizerName::Adam,
        lr: 1e-3,
        momentum: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut optimizer = Optimizer::new(config, params);
    let mut step = || {
        for p in params {
            let mut grad = p.tensor.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
        let l = loss();
        l.backward();
        optimizer.step(params);
        l
    };
    for _ in 0..(o.steps / 10).max(5) {
        let _ = step();
    }
    let start = Instant::now();
    let mut last = Tensor::zeros([1], (Kind::Float, device));
    for _ in 0..o.steps {
        last = step();
    }
    let _ = last.double_value(&[]);
    let wall = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"tool": "ablate", "steps": o.steps, "wall": wall, "rate": o.steps as f64 / wall})
    );
    Ok(())
}
