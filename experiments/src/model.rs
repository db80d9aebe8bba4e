//! Models written on plain tensors, so every parameter has a stable name, a
//! role and a learning-rate multiplier set by the parametrization.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

pub use crate::parametrization::Role;
use crate::parametrization::Scaling;

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
