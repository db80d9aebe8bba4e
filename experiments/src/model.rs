//! Models written on plain tensors, so every parameter has a stable name, a
//! role and a learning-rate multiplier (parametrizations such as muP set them).

use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    InputWeight,
    HiddenWeight,
    OutputWeight,
    Bias,
}

/// One trainable tensor with what optimizers need to know about it.
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub role: Role,
    /// Multiplies the optimizer's learning rate for this tensor.
    pub lr_mult: f64,
}

/// A ReLU MLP: `features -> width (x depth) -> classes`.
pub struct Mlp {
    pub params: Vec<Param>,
}

impl Mlp {
    /// PyTorch's default init (uniform in +-1/sqrt(fan_in)), drawn from libtorch's seeded generator.
    pub fn new(features: i64, width: i64, depth: u32, classes: i64, device: Device) -> Mlp {
        let mut params = Vec::new();
        let mut fan_in = features;
        for layer in 0..=depth as usize {
            let last = layer == depth as usize;
            let fan_out = if last { classes } else { width };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let init = |shape: &[i64]| {
                (Tensor::rand(shape, (Kind::Float, device)) * (2.0 * bound) - bound).set_requires_grad(true)
            };
            let role = match (layer, last) {
                (0, _) => Role::InputWeight,
                (_, true) => Role::OutputWeight,
                _ => Role::HiddenWeight,
            };
            params.push(Param {
                name: format!("layers.{layer}.weight"),
                tensor: init(&[fan_out, fan_in]),
                role,
                lr_mult: 1.0,
            });
            params.push(Param {
                name: format!("layers.{layer}.bias"),
                tensor: init(&[fan_out]),
                role: Role::Bias,
                lr_mult: 1.0,
            });
            fan_in = fan_out;
        }
        Mlp { params }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let layers = self.params.len() / 2;
        let mut h = xs.shallow_clone();
        for layer in 0..layers {
            let w = &self.params[2 * layer].tensor;
            let b = &self.params[2 * layer + 1].tensor;
            h = h.linear(w, Some(b));
            if layer + 1 < layers {
                h = h.relu();
            }
        }
        h
    }
}
