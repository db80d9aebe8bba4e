//! Models written on plain tensors, so every parameter has a stable name, a
//! role and a learning-rate multiplier set by the parametrization.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

pub use crate::nn::parametrization::Role;
use crate::nn::parametrization::Scaling;

/// One trainable tensor with what optimizers need to know about it.
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub role: Role,
    /// Multiplies the optimizer's learning rate for this tensor.
    pub lr_mult: f64,
}

/// A trainable tensor uniform in +-`bound`, drawn from `rng` (so the same on every device).
pub fn uniform(rng: &mut ChaCha8Rng, shape: &[i64], bound: f64, device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| ((rng.gen::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Tensor::from_slice(&values)
        .view(shape)
        .to_device(device)
        .set_requires_grad(true)
}

/// A ReLU MLP, plain (`features -> width x depth -> classes`) or residual
/// (an input layer, `depth` blocks `h + b * W relu(h)`, a readout).
pub struct Mlp {
    pub params: Vec<Param>,
    residual: bool,
    output_mult: f64,
    branch_mult: f64,
}

impl Mlp {
    /// PyTorch's default init (uniform in +-1/sqrt(fan_in)), drawn from a generator of
    /// our own seeded by `seed`: the same on every device and safe with trials on several threads.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        features: i64,
        width: i64,
        depth: u32,
        classes: i64,
        residual: bool,
        scaling: Scaling,
        seed: u64,
        device: Device,
    ) -> Mlp {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1a17_0f5e_ed00_0001);
        let linears = if residual {
            depth as usize + 2
        } else {
            depth as usize + 1
        };
        let mut params = Vec::new();
        for layer in 0..linears {
            let last = layer + 1 == linears;
            let fan_in = if layer == 0 { features } else { width };
            let fan_out = if last { classes } else { width };
            let widen = if last { scaling.output_init_mult() } else { 1.0 };
            let bound = widen / (fan_in as f64).sqrt();
            let mut init = |shape: &[i64]| uniform(&mut rng, shape, bound, device);
            let role = match (layer, last) {
                (0, _) => Role::InputWeight,
                (_, true) => Role::OutputWeight,
                _ => Role::HiddenWeight,
            };
            let in_block = role == Role::HiddenWeight && residual;
            params.push(Param {
                name: format!("layers.{layer}.weight"),
                tensor: init(&[fan_out, fan_in]),
                role,
                lr_mult: scaling.lr_mult(role, in_block),
            });
            params.push(Param {
                name: format!("layers.{layer}.bias"),
                tensor: init(&[fan_out]),
                role: Role::Bias,
                lr_mult: scaling.lr_mult(Role::Bias, in_block),
            });
        }
        Mlp {
            params,
            residual,
            output_mult: scaling.output_mult(),
            branch_mult: scaling.branch_mult(),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.forward_recording(xs, None)
    }

    /// Whether it is residual, and its logit and branch multipliers: what a fused stack of it keeps.
    pub fn multipliers(&self) -> (bool, f64, f64) {
        (self.residual, self.output_mult, self.branch_mult)
    }

    /// The forward pass; with `record`, appends the mean |output| of every layer (logits last).
    pub fn forward_recording(&self, xs: &Tensor, mut record: Option<&mut Vec<f64>>) -> Tensor {
        let layers = self.params.len() / 2;
        let mut note = |z: &Tensor| {
            if let Some(r) = record.as_deref_mut() {
                r.push(tch::no_grad(|| z.abs().mean(Kind::Float).double_value(&[])));
            }
        };
        let mut h = xs.shallow_clone();
        for layer in 0..layers {
            let w = &self.params[2 * layer].tensor;
            let b = &self.params[2 * layer + 1].tensor;
            let first = layer == 0;
            let last = layer + 1 == layers;
            if last {
                let input = if self.residual { h.relu() } else { h };
                let logits = input.linear(w, Some(b)) * self.output_mult;
                note(&logits);
                return logits;
            }
            if self.residual && !first {
                let branch = h.relu().linear(w, Some(b));
                note(&branch);
                h = branch * self.branch_mult + h;
            } else {
                let z = h.linear(w, Some(b));
                note(&z);
                h = if self.residual { z } else { z.relu() };
            }
        }
        unreachable!("the readout layer returns")
    }
}

/// A classifier over flat feature vectors: what the classification task trains.
pub trait Network {
    fn params(&self) -> &[Param];
    fn params_mut(&mut self) -> &mut [Param];
    /// The logits; with `record`, appends each layer's mean |output|.
    fn forward_recording(&self, xs: &Tensor, record: Option<&mut Vec<f64>>) -> Tensor;
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.forward_recording(xs, None)
    }
}

impl Network for Mlp {
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }
    fn forward_recording(&self, xs: &Tensor, record: Option<&mut Vec<f64>>) -> Tensor {
        Mlp::forward_recording(self, xs, record)
    }
}

/// LeNet-5 on square single-channel images of `side` 28: conv 6@5x5 (padding 2), max-pool 2,
/// conv 16@5x5, max-pool 2, then 400 -> 120 -> 84 -> classes, ReLU throughout. PyTorch's
/// default init from the trial's own generator; standard parametrization only.
pub struct Lenet {
    pub params: Vec<Param>,
    side: i64,
}

impl Lenet {
    /// The image side LeNet-5 is laid out for.
    pub const SIDE: i64 = 28;

    pub fn new(classes: i64, seed: u64, device: Device) -> Lenet {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1e7e_75ee_d000_0001);
        let layers: [(&str, Vec<i64>, i64, Role); 5] = [
            ("conv1", vec![6, 1, 5, 5], 25, Role::InputWeight),
            ("conv2", vec![16, 6, 5, 5], 150, Role::HiddenWeight),
            ("fc1", vec![120, 400], 400, Role::HiddenWeight),
            ("fc2", vec![84, 120], 120, Role::HiddenWeight),
            ("fc3", vec![classes, 84], 84, Role::OutputWeight),
        ];
        let mut params = Vec::new();
        for (name, shape, fan_in, role) in layers {
            let bound = 1.0 / (fan_in as f64).sqrt();
            params.push(Param {
                name: format!("{name}.weight"),
                tensor: uniform(&mut rng, &shape, bound, device),
                role,
                lr_mult: 1.0,
            });
            params.push(Param {
                name: format!("{name}.bias"),
                tensor: uniform(&mut rng, &shape[..1], bound, device),
                role: Role::Bias,
                lr_mult: 1.0,
            });
        }
        Lenet {
            params,
            side: Self::SIDE,
        }
    }
}

impl Network for Lenet {
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }
    fn forward_recording(&self, xs: &Tensor, mut record: Option<&mut Vec<f64>>) -> Tensor {
        let p = |i: usize| &self.params[i].tensor;
        let mut note = |z: &Tensor| {
            if let Some(r) = record.as_deref_mut() {
                r.push(tch::no_grad(|| z.abs().mean(Kind::Float).double_value(&[])));
            }
        };
        let pool = |z: Tensor| z.relu().max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        let c1 = xs
            .view([-1, 1, self.side, self.side])
            .conv2d(p(0), Some(p(1)), [1, 1], [2, 2], [1, 1], 1);
        note(&c1);
        let c2 = pool(c1).conv2d(p(2), Some(p(3)), [1, 1], [0, 0], [1, 1], 1);
        note(&c2);
        let f1 = pool(c2).flatten(1, -1).linear(p(4), Some(p(5)));
        note(&f1);
        let f2 = f1.relu().linear(p(6), Some(p(7)));
        note(&f2);
        let logits = f2.relu().linear(p(8), Some(p(9)));
        note(&logits);
        logits
    }
}
