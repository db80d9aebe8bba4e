//! Horizontal fusion: N models of one shape trained as one, their parameters
//! stacked along a new leading dimension, so each layer is one batched matmul
//! instead of N small ones. Members keep their own learning rates, optimizer
//! hyperparameters and state, and can be written out and read back one by one
//! under the names a single model uses, so a member's checkpoint is a single
//! run's checkpoint.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::nn::kinds::OptimizerName;
use crate::nn::model::{Mlp, Param};

/// N MLPs (plain or residual) of one shape, stacked: every parameter is
/// `[members, ...]` and keeps its single model's name, role and multiplier.
pub struct FusedMlp {
    pub params: Vec<Param>,
    pub members: i64,
    residual: bool,
    output_mult: f64,
    branch_mult: f64,
}

impl FusedMlp {
    /// Stacks `models`, which must agree in shape and multipliers (the caller's fusion key says they do).
    pub fn stack(models: &[Mlp]) -> FusedMlp {
        let first = &models[0];
        let params = first
            .params
            .iter()
            .enumerate()
            .map(|(j, p)| Param {
                name: p.name.clone(),
                tensor: tch::no_grad(|| {
                    Tensor::stack(
                        &models.iter().map(|m| m.params[j].tensor.detach()).collect::<Vec<_>>(),
                        0,
                    )
                })
                .set_requires_grad(true),
                role: p.role,
                lr_mult: p.lr_mult,
            })
            .collect();
        let (residual, output_mult, branch_mult) = first.multipliers();
        FusedMlp {
            params,
            members: models.len() as i64,
            residual,
            output_mult,
            branch_mult,
        }
    }

    /// Logits `[members, batch, classes]` of inputs `[members, batch, features]`:
    /// each member's forward pass, as its single model computes it.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let layers = self.params.len() / 2;
        // h @ w^T + b for every member at once.
        let linear = |h: &Tensor, layer: usize| {
            let w = &self.params[2 * layer].tensor;
            let b = &self.params[2 * layer + 1].tensor;
            b.unsqueeze(1).baddbmm(h, &w.transpose(1, 2), 1, 1)
        };
        let mut h = xs.shallow_clone();
        for layer in 0..layers {
            if layer + 1 == layers {
                let input = if self.residual { h.relu() } else { h };
                return linear(&input, layer) * self.output_mult;
            }
            if self.residual && layer > 0 {
                h = linear(&h.relu(), layer) * self.branch_mult + h;
            } else {
                let z = linear(&h, layer);
                h = if self.residual { z } else { z.relu() };
            }
        }
        unreachable!("the readout layer returns")
    }

    /// Member `i`'s parameters under its single model's names (copies, detached).
    pub fn member(&self, i: i64) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.get(i).detach().copy()))
            .collect()
    }

    /// Puts a single model's tensors (as a checkpoint names them) into member `i`'s slice.
    pub fn load_member(&mut self, i: i64, tensors: &HashMap<String, Tensor>) -> Result<(), String> {
        tch::no_grad(|| {
            for p in &self.params {
                let saved = tensors
                    .get(&p.name)
                    .ok_or_else(|| format!("checkpoint lacks `{}`", p.name))?;
                let mut slot = p.tensor.get(i);
                if saved.size() != slot.size() {
                    return Err(format!(
                        "`{}` has shape {:?} in the checkpoint but {:?} in the model",
                        p.name,
                        saved.size(),
                        slot.size()
                    ));
                }
                slot.copy_(saved);
            }
            Ok(())
        })
    }
}

/// One member's optimizer settings: what may differ between fused members.
#[derive(Debug, Clone, Copy)]
pub struct MemberHyper {
    /// The peak learning rate (the schedule's factor multiplies it).
    pub lr: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
}

/// SGD, Adam or AdamW over stacked parameters with per-member settings and
/// update counts: each member's update is the one [`crate::nn::optim::Optimizer`]
/// makes for its single model, in the same operations.
pub struct FusedOptimizer {
    pub kind: OptimizerName,
    pub eps: f64,
    pub members: Vec<MemberHyper>,
    /// Updates applied to each member so far (Adam's bias correction uses them).
    pub updates: Vec<u64>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
}

impl FusedOptimizer {
    pub fn new(kind: OptimizerName, eps: f64, members: Vec<MemberHyper>, params: &[Param]) -> FusedOptimizer {
        let zeros = || params.iter().map(|p| p.tensor.zeros_like()).collect::<Vec<_>>();
        let second = match kind {
            OptimizerName::Sgd => Vec::new(),
            OptimizerName::Adam | OptimizerName::Adamw => zeros(),
        };
        FusedOptimizer {
            kind,
            eps,
            updates: vec![0; members.len()],
            members,
            first: zeros(),
            second,
        }
    }

    /// One value per member, shaped to broadcast over a stacked parameter of `dims` dimensions.
    fn per_member(values: impl Iterator<Item = f64>, dims: usize, like: &Tensor) -> Tensor {
        let values: Vec<f32> = values.map(|v| v as f32).collect();
        let mut shape = vec![values.len() as i64];
        shape.extend(std::iter::repeat_n(1, dims - 1));
        Tensor::from_slice(&values)
            .view(shape.as_slice())
            .to_device(like.device())
    }

    /// Applies one update to the members marked `active`, from the gradients in `params`,
    /// with the schedule's learning-rate `factor`; the others' weights and state stay as they are.
    pub fn step(&mut self, params: &[Param], factor: f64, active: &[bool]) {
        for (i, updates) in self.updates.iter_mut().enumerate() {
            if active[i] {
                *updates += 1;
            }
        }
        let all = active.iter().all(|&a| a);
        let kind = self.kind;
        let members = self.members.clone();
        let updates = self.updates.clone();
        let eps = self.eps;
        tch::no_grad(|| {
            for (j, p) in params.iter().enumerate() {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let w = p.tensor.shallow_clone();
                let dims = w.dim();
                let each = |f: &dyn Fn(&MemberHyper, u64) -> f64| {
                    Self::per_member(members.iter().zip(&updates).map(|(m, &t)| f(m, t)), dims, &w)
                };
                // The learning rate as the single optimizer computes it: (peak x factor) x multiplier.
                let lr = |m: &MemberHyper| m.lr * factor * p.lr_mult;
                let any_decay = members.iter().any(|m| m.weight_decay > 0.0);
                let (new_w, new_first, new_second) = match kind {
                    OptimizerName::Sgd => {
                        let g = if any_decay {
                            &grad + &w * each(&|m, _| m.weight_decay)
                        } else {
                            grad
                        };
                        let (update, first) = if members.iter().any(|m| m.momentum > 0.0) {
                            let buf = &self.first[j] * each(&|m, _| m.momentum) + &g;
                            (buf.shallow_clone(), Some(buf))
                        } else {
                            (g, None)
                        };
                        (&w - update * each(&|m, _| lr(m)), first, None)
                    }
                    OptimizerName::Adam | OptimizerName::Adamw => {
                        let g = if kind == OptimizerName::Adam && any_decay {
                            &grad + &w * each(&|m, _| m.weight_decay)
                        } else {
                            grad
                        };
                        let decayed = if kind == OptimizerName::Adamw && any_decay {
                            &w * each(&|m, _| 1.0 - lr(m) * m.weight_decay)
                        } else {
                            w.shallow_clone()
                        };
                        let m = &self.first[j] * each(&|m, _| m.beta1) + &g * each(&|m, _| 1.0 - m.beta1);
                        let v = &self.second[j] * each(&|m, _| m.beta2) + (&g * &g) * each(&|m, _| 1.0 - m.beta2);
                        let bc1 = |m: &MemberHyper, t: u64| 1.0 - m.beta1.powi(t.max(1) as i32);
                        let bc2 = |m: &MemberHyper, t: u64| 1.0 - m.beta2.powi(t.max(1) as i32);
                        let denom = (&v / each(&|m, t| bc2(m, t))).sqrt() + eps;
                        let update = &m / denom * each(&|m, t| lr(m) / bc1(m, t));
                        (decayed - update, Some(m), Some(v))
                    }
                };
                let mask = (!all).then(|| Self::per_member(active.iter().map(|&a| f64::from(a)), dims, &w).gt(0.5));
                let keep = |new: Tensor, old: &Tensor| match &mask {
                    Some(mask) => new.where_self(mask, old),
                    None => new,
                };
                let mut target = p.tensor.shallow_clone();
                target.copy_(&keep(new_w, &w));
                if let Some(first) = new_first {
                    let kept = keep(first, &self.first[j]);
                    self.first[j] = kept;
                }
                if let Some(second) = new_second {
                    let kept = keep(second, &self.second[j]);
                    self.second[j] = kept;
                }
            }
        });
    }

    /// Member `i`'s optimizer state under the names a single run's checkpoint gives it.
    pub fn member_state(&self, i: i64, params: &[Param]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (j, p) in params.iter().enumerate() {
            out.push((format!("optim.{}.first", p.name), self.first[j].get(i).copy()));
            if let Some(v) = self.second.get(j) {
                out.push((format!("optim.{}.second", p.name), v.get(i).copy()));
            }
        }
        out
    }

    /// Restores member `i`'s state from a single run's (or a member's) checkpoint.
    pub fn load_member(
        &mut self,
        i: i64,
        params: &[Param],
        tensors: &HashMap<String, Tensor>,
        updates: u64,
    ) -> Result<(), String> {
        let fetch = |key: String| tensors.get(&key).ok_or_else(|| format!("checkpoint lacks `{key}`"));
        tch::no_grad(|| {
            for (j, p) in params.iter().enumerate() {
                self.first[j].get(i).copy_(fetch(format!("optim.{}.first", p.name))?);
                if let Some(v) = self.second.get(j) {
                    v.get(i).copy_(fetch(format!("optim.{}.second", p.name))?);
                }
            }
            Ok::<(), String>(())
        })?;
        self.updates[i as usize] = updates;
        Ok(())
    }
}

/// Per-member mean cross-entropy of logits `[members, batch, classes]` against labels `[members, batch]`.
pub fn member_losses(logits: &Tensor, labels: &Tensor) -> Tensor {
    let size = logits.size();
    let (n, b, c) = (size[0], size[1], size[2]);
    logits
        .reshape([n * b, c])
        .cross_entropy_loss(
            &labels.reshape([n * b]),
            None::<Tensor>,
            tch::Reduction::None,
            -100,
            0.0,
        )
        .view([n, b])
        .mean_dim(1, false, Kind::Float)
}

/// Per-member accuracy of logits `[members, batch, classes]` against labels `[members, batch]`.
pub fn member_accuracy(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits
        .argmax(-1, false)
        .eq_tensor(labels)
        .to_kind(Kind::Float)
        .mean_dim(1, false, Kind::Float)
}
