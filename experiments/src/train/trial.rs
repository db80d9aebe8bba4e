//! The `train` trial loop.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Value};
use tch::{Kind, Tensor};

use super::{DatasetName, Divergence, ModelKind, TrainParams};
use crate::data::{self, DataOrder};
use crate::family::ParamError;
use crate::model::Mlp;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::trial::{TrialContext, TrialError};

/// Trains the MLP for `steps` updates, resuming from the newest checkpoint.
///
/// Metrics: `train_loss` at every update (step = updates done), `eval_loss` and
/// `eval_accuracy` every `eval_every` updates and at the end, and
/// `train_loss_tail` (mean train loss over the last 10% of updates) at the end.
pub fn run(params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
    let p: TrainParams = ParamError::deserialize(params)?;
    p.check()?;
    let device = ctx.device;
    let data = match p.dataset {
        DatasetName::Digits => data::digits(device),
        DatasetName::FashionMnist => data::idx_images(
            p.data_dir.as_deref().unwrap_or(super::FASHION_MNIST_DIR),
            device,
            "install them with `apt-get install dataset-fashion-mnist`, or set data_dir to a directory holding them",
        )
        .map_err(TrialError::Data)?,
    };
    let residual = p.model == ModelKind::Resmlp;
    let mut model = Mlp::new(
        data.features,
        p.width as i64,
        p.depth,
        data.classes,
        residual,
        p.scaling(),
        p.seed,
        device,
    );
    let config = OptimizerConfig {
        kind: p.optimizer,
        lr: p.learning_rate()?,
        momentum: p.momentum,
        beta1: p.beta1,
        beta2: p.beta2,
        eps: 1e-8,
        weight_decay: p.weight_decay,
    };
    let mut optimizer = Optimizer::new(config, &model.params);
    let tail_len = (p.steps / 10).max(1) as usize;
    let mut tail: VecDeque<f64> = VecDeque::with_capacity(tail_len);
    let mut start = 0u64;

    if let Some(snapshot) = ctx.checkpoints.latest()? {
        restore(&mut model, &mut optimizer, &snapshot.tensors, &snapshot.sidecar)?;
        tail = snapshot.sidecar["loss_tail"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        start = snapshot.step;
    }

    let mut order = DataOrder::new(p.seed, data.train_len(), p.batch_size as usize);
    let peak_lr = optimizer.config.lr;
    for step in start..p.steps {
        optimizer.config.lr = peak_lr * p.lr_factor(step);
        let idx = Tensor::from_slice(&order.batch_indices(step)).to_device(device);
        let xs = data.train_x.index_select(0, &idx);
        let ys = data.train_y.index_select(0, &idx);
        optimizer.zero_grad(&mut model.params);
        let mut activations = Vec::new();
        let logits = model.forward_recording(&xs, p.coord_check.then_some(&mut activations));
        let loss = logits.cross_entropy_for_logits(&ys);
        loss.backward();
        optimizer.step(&model.params);
        let done = step + 1;
        let loss_value = loss.double_value(&[]);
        for (layer, value) in activations.iter().enumerate() {
            ctx.metrics.log(&format!("act.{layer}"), done, *value);
        }
        if !loss_value.is_finite() {
            if p.divergence == Divergence::Record {
                ctx.metrics.log("diverged", done, 1.0);
                return Ok(());
            }
            return Err(TrialError::Diverged {
                step: done,
                metric: "train_loss",
                value: loss_value,
            });
        }
        ctx.metrics.log("train_loss", done, loss_value);
        if tail.len() == tail_len {
            tail.pop_front();
        }
        tail.push_back(loss_value);
        if done % p.eval_every == 0 || done == p.steps {
            let (eval_loss, accuracy) = evaluate(&model, &data.eval_x, &data.eval_y);
            ctx.metrics.log("eval_loss", done, eval_loss);
            ctx.metrics.log("eval_accuracy", done, accuracy);
        }
        if done % p.checkpoint_every == 0 && done < p.steps {
            let mut tensors: Vec<(String, Tensor)> = model
                .params
                .iter()
                .map(|p| (p.name.clone(), p.tensor.detach()))
                .collect();
            tensors.extend(optimizer.state_tensors(&model.params));
            let sidecar = json!({
                "step": done,
                "optimizer_updates": optimizer.updates,
                "data_cursor": done * p.batch_size as u64,
                "seed": p.seed,
                "loss_tail": tail,
            });
            ctx.checkpoints.save(done, &tensors, &sidecar)?;
        }
        if p.step_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(p.step_delay_ms));
        }
    }
    let tail_mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    ctx.metrics.log("train_loss_tail", p.steps, tail_mean);
    let (train_loss_final, _) = evaluate(&model, &data.train_x, &data.train_y);
    ctx.metrics.log("train_loss_final", p.steps, train_loss_final);
    Ok(())
}

fn evaluate(model: &Mlp, xs: &Tensor, ys: &Tensor) -> (f64, f64) {
    tch::no_grad(|| {
        let logits = model.forward(xs);
        let loss = logits.cross_entropy_for_logits(ys).double_value(&[]);
        let accuracy = logits
            .argmax(-1, false)
            .eq_tensor(ys)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        (loss, accuracy)
    })
}

fn restore(
    model: &mut Mlp,
    optimizer: &mut Optimizer,
    tensors: &HashMap<String, Tensor>,
    sidecar: &Value,
) -> Result<(), TrialError> {
    tch::no_grad(|| {
        for param in &mut model.params {
            let saved = tensors
                .get(&param.name)
                .ok_or_else(|| TrialError::Checkpoint(format!("checkpoint lacks `{}`", param.name)))?;
            if saved.size() != param.tensor.size() {
                return Err(TrialError::Checkpoint(format!(
                    "`{}` has shape {:?} in the checkpoint but {:?} in the model",
                    param.name,
                    saved.size(),
                    param.tensor.size()
                )));
            }
            param.tensor.copy_(saved);
        }
        Ok(())
    })?;
    let updates = sidecar["optimizer_updates"]
        .as_u64()
        .ok_or_else(|| TrialError::Checkpoint("sidecar lacks optimizer_updates".into()))?;
    optimizer
        .load_state(&model.params, tensors, updates)
        .map_err(TrialError::Checkpoint)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::trial::{MemoryCheckpoints, MemoryMetrics, TrialContext};

    fn train(params: &serde_json::Value, store: &mut MemoryCheckpoints) -> MemoryMetrics {
        tch::set_num_threads(1);
        let mut metrics = MemoryMetrics::default();
        let mut ctx = TrialContext {
            device: tch::Device::Cpu,
            checkpoints: store,
            metrics: &mut metrics,
        };
        super::run(params, &mut ctx).unwrap();
        metrics
    }

    #[test]
    fn adam_learns_digits_and_resume_reproduces_the_curve() {
        for optimizer in ["adam", "adamw", "sgd"] {
            let params = json!({"optimizer": optimizer, "lr": if optimizer == "sgd" { 0.1 } else { 0.003 },
                "momentum": if optimizer == "sgd" { 0.9 } else { 0.0 }, "weight_decay": 0.01,
                "steps": 120, "width": 32, "checkpoint_every": 40, "eval_every": 40, "seed": 7});
            let mut store = MemoryCheckpoints::default();
            let full = train(&params, &mut store);
            let accuracy = full.last("eval_accuracy").unwrap();
            assert!(accuracy > 0.8, "{optimizer}: eval accuracy {accuracy} after 120 steps");
            assert_eq!(store.saved.iter().map(|s| s.step).collect::<Vec<_>>(), vec![40, 80]);
            // Resume from step 80: the rest of the curve must match the unbroken run.
            store.resume_at = Some(80);
            let resumed = train(&params, &mut store);
            assert_eq!(
                resumed.points.first().unwrap().1,
                81,
                "{optimizer}: resumed run restarted at step 0"
            );
            for name in ["eval_loss", "train_loss_tail", "train_loss"] {
                let (a, b) = (full.last(name).unwrap(), resumed.last(name).unwrap());
                assert!((a - b).abs() <= 1e-6, "{optimizer} {name}: {a} unbroken vs {b} resumed");
            }
        }
    }
}
