//! SGD, Adam and AdamW written on tensors, so their state can be checkpointed
//! and restored exactly, with a learning-rate multiplier per parameter.

use std::collections::HashMap;

use tch::Tensor;

use crate::nn::kinds::OptimizerName;
use crate::nn::model::Param;

#[derive(Debug, Clone, Copy)]
pub struct OptimizerConfig {
    pub kind: OptimizerName,
    pub lr: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One update of `w` (in place) from `grad` at learning rate `lr` (the multiplier
/// applied), update `t` (1 for the first), with its buffers (`second` for Adam and
/// AdamW). Call it without a graph (`tch::no_grad`).
pub fn update(
    c: &OptimizerConfig,
    lr: f64,
    t: u64,
    w: &mut Tensor,
    grad: Tensor,
    first: &mut Tensor,
    second: Option<&mut Tensor>,
) {
    match c.kind {
        OptimizerName::Sgd => {
            let g = if c.weight_decay > 0.0 {
                &grad + &*w * c.weight_decay
            } else {
                grad
            };
            let step = if c.momentum > 0.0 {
                let _ = first.g_mul_scalar_(c.momentum).g_add_(&g);
                first.shallow_clone()
            } else {
                g
            };
            let _ = w.g_sub_(&(step * lr));
        }
        OptimizerName::Adam | OptimizerName::Adamw => {
            let second = second.expect("Adam keeps a second moment");
            let g = if c.kind == OptimizerName::Adam && c.weight_decay > 0.0 {
                &grad + &*w * c.weight_decay
            } else {
                grad
            };
            if c.kind == OptimizerName::Adamw && c.weight_decay > 0.0 {
                let _ = w.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            // In place on the temporaries where the arithmetic allows: the same
            // operations in the same order (so the same bits), fewer allocations.
            let scaled = &g * (1.0 - c.beta1);
            let _ = first.g_mul_scalar_(c.beta1).g_add_(&scaled);
            let mut square = &g * &g;
            let _ = square.g_mul_scalar_(1.0 - c.beta2);
            let _ = second.g_mul_scalar_(c.beta2).g_add_(&square);
            let bc1 = 1.0 - c.beta1.powi(t as i32);
            let bc2 = 1.0 - c.beta2.powi(t as i32);
            let mut denom = &*second / bc2;
            let _ = denom.sqrt_();
            let _ = denom.g_add_scalar_(c.eps);
            let mut step = &*first / &denom;
            let _ = step.g_mul_scalar_(lr / bc1);
            let _ = w.g_sub_(&step);
        }
    }
}

/// Optimizer state: one or two buffers per parameter and the update count.
pub struct Optimizer {
    pub config: OptimizerConfig,
    /// Updates applied so far (Adam's bias correction uses it).
    pub updates: u64,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig, params: &[Param]) -> Optimizer {
        let zeros = || params.iter().map(|p| p.tensor.zeros_like()).collect::<Vec<_>>();
        let second = match config.kind {
            OptimizerName::Sgd => Vec::new(),
            OptimizerName::Adam | OptimizerName::Adamw => zeros(),
        };
        Optimizer {
            config,
            updates: 0,
            first: zeros(),
            second,
        }
    }

    pub fn zero_grad(&self, params: &mut [Param]) {
        for p in params {
            p.tensor.zero_grad();
        }
    }

    /// Applies one update from the gradients in `params`.
    pub fn step(&mut self, params: &[Param]) {
        self.updates += 1;
        let c = self.config;
        let t = self.updates;
        tch::no_grad(|| {
            for (i, p) in params.iter().enumerate() {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let mut w = p.tensor.shallow_clone();
                update(
                    &c,
                    c.lr * p.lr_mult,
                    t,
                    &mut w,
                    grad,
                    &mut self.first[i],
                    self.second.get_mut(i),
                );
            }
        });
    }

    /// The state as named tensors, for a checkpoint.
    pub fn state_tensors(&self, params: &[Param]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, p) in params.iter().enumerate() {
            out.push((format!("optim.{}.first", p.name), self.first[i].shallow_clone()));
            if let Some(v) = self.second.get(i) {
                out.push((format!("optim.{}.second", p.name), v.shallow_clone()));
            }
        }
        out
    }

    /// Restores the state written by [`Optimizer::state_tensors`].
    pub fn load_state(
        &mut self,
        params: &[Param],
        tensors: &HashMap<String, Tensor>,
        updates: u64,
    ) -> Result<(), String> {
        let fetch = |key: String| tensors.get(&key).map(|t| t.shallow_clone()).ok_or(key);
        for (i, p) in params.iter().enumerate() {
            self.first[i] = fetch(format!("optim.{}.first", p.name))
                .map_err(|k| format!("checkpoint lacks `{k}`"))?
                .to_device(p.tensor.device());
            if !self.second.is_empty() {
                self.second[i] = fetch(format!("optim.{}.second", p.name))
                    .map_err(|k| format!("checkpoint lacks `{k}`"))?
                    .to_device(p.tensor.device());
            }
        }
        self.updates = updates;
        Ok(())
    }
}
