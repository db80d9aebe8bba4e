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
use crate::nn::optim::{update, OptimizerConfig};

/// N MLPs (plain or residual) of one shape, stacked: every parameter is
/// `[members, ...]` and keeps its single model's name, role and multiplier. A
/// weight is stored transposed (`[members, in, out]`), so each layer is a
/// batched matmul of contiguous operands; [`member_slice`] is a member's tensor
/// in its single model's layout.
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
                    let stored = |t: &Tensor| {
                        if t.dim() == 2 {
                            t.detach().transpose(0, 1)
                        } else {
                            t.detach()
                        }
                    };
                    Tensor::stack(
                        &models.iter().map(|m| stored(&m.params[j].tensor)).collect::<Vec<_>>(),
                        0,
                    )
                    .contiguous()
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
        // h @ w^T + b for every member at once (w is stored transposed).
        let linear = |h: &Tensor, layer: usize| {
            let w = &self.params[2 * layer].tensor;
            let b = &self.params[2 * layer + 1].tensor;
            b.unsqueeze(1).baddbmm(h, w, 1, 1)
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
            .map(|p| (p.name.clone(), member_slice(&p.tensor.detach(), i).contiguous()))
            .collect()
    }

    /// Puts a single model's tensors (as a checkpoint names them) into member `i`'s slice.
    pub fn load_member(&mut self, i: i64, tensors: &HashMap<String, Tensor>) -> Result<(), String> {
        tch::no_grad(|| {
            for p in &self.params {
                let saved = tensors
                    .get(&p.name)
                    .ok_or_else(|| format!("checkpoint lacks `{}`", p.name))?;
                let mut slot = member_slice(&p.tensor, i);
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

/// The elements of a member's slice above which the CPU updates slice by slice (256 KiB of float32).
const CPU_SLICE_ABOVE: i64 = 1 << 16;

/// SGD, Adam or AdamW over stacked parameters with per-member settings and
/// update counts: each member's update is the one [`crate::nn::optim::Optimizer`]
/// makes for its single model. A large parameter on the CPU is updated one member's
/// slice at a time with the single optimizer's own code (a slice stays in cache);
/// the rest as a whole stack, the same operations with one value per member.
pub struct FusedOptimizer {
    pub kind: OptimizerName,
    pub eps: f64,
    pub members: Vec<MemberHyper>,
    /// Updates applied to each member so far (Adam's bias correction uses them).
    pub updates: Vec<u64>,
    /// Parameters whose member slices hold more elements than this are updated a
    /// slice at a time; the rest as a whole stack. On the CPU a large slice's passes stay
    /// in cache where the stack's would not, and a small stack is cheaper in one pass
    /// than in a pass per member; on a GPU the whole stack always goes at once.
    pub slice_above: i64,
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
            slice_above: match params.first().map(|p| p.tensor.device()) {
                Some(tch::Device::Cpu) => CPU_SLICE_ABOVE,
                _ => i64::MAX,
            },
            updates: vec![0; members.len()],
            members,
            first: zeros(),
            second,
        }
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
        let any_decay = members.iter().any(|m| m.weight_decay > 0.0);
        let any_momentum = members.iter().any(|m| m.momentum > 0.0);
        tch::no_grad(|| {
            for (j, p) in params.iter().enumerate() {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                if p.tensor.numel() as i64 / members.len() as i64 > self.slice_above {
                    // A member's slice at a time, as its single run updates it.
                    for (i, m) in members.iter().enumerate().filter(|&(i, _)| active[i]) {
                        let c = OptimizerConfig {
                            kind,
                            lr: m.lr * factor,
                            momentum: m.momentum,
                            beta1: m.beta1,
                            beta2: m.beta2,
                            eps,
                            weight_decay: m.weight_decay,
                        };
                        let (mut w, mut first) = (p.tensor.get(i as i64), self.first[j].get(i as i64));
                        let mut second = self.second.get(j).map(|v| v.get(i as i64));
                        let (lr, t, g) = (c.lr * p.lr_mult, updates[i], grad.get(i as i64));
                        update(&c, lr, t, &mut w, g, &mut first, second.as_mut());
                    }
                    continue;
                }
                // The whole stack at once, each setting one number per member.
                let mut w = p.tensor.shallow_clone();
                let each = |f: &dyn Fn(&MemberHyper, u64) -> f64| {
                    Hyper::of(members.iter().zip(&updates).map(|(m, &t)| f(m, t)).collect(), &p.tensor)
                };
                // The learning rate as the single optimizer computes it: (peak x factor) x multiplier.
                let lr = |m: &MemberHyper| m.lr * factor * p.lr_mult;
                // Members sitting this step out get their weights and state back afterwards.
                let saved = (!all).then(|| {
                    let state = |v: &Vec<Tensor>| v.get(j).map(Tensor::copy);
                    (w.copy(), state(&self.first), state(&self.second))
                });
                // In place where the arithmetic allows, in the single optimizer's order of operations.
                match kind {
                    OptimizerName::Sgd => {
                        let g = if any_decay {
                            &grad + each(&|m, _| m.weight_decay).mul(&w)
                        } else {
                            grad
                        };
                        let update = if any_momentum {
                            let buf = &mut self.first[j];
                            each(&|m, _| m.momentum).mul_(buf);
                            let _ = buf.g_add_(&g);
                            buf.shallow_clone()
                        } else {
                            g
                        };
                        let _ = w.g_sub_(&each(&|m, _| lr(m)).mul(&update));
                    }
                    OptimizerName::Adam | OptimizerName::Adamw => {
                        let g = if kind == OptimizerName::Adam && any_decay {
                            &grad + each(&|m, _| m.weight_decay).mul(&w)
                        } else {
                            grad
                        };
                        if kind == OptimizerName::Adamw && any_decay {
                            each(&|m, _| 1.0 - lr(m) * m.weight_decay).mul_(&mut w);
                        }
                        let scaled = each(&|m, _| 1.0 - m.beta1).mul(&g);
                        each(&|m, _| m.beta1).mul_(&mut self.first[j]);
                        let _ = self.first[j].g_add_(&scaled);
                        let mut square = &g * &g;
                        each(&|m, _| 1.0 - m.beta2).mul_(&mut square);
                        each(&|m, _| m.beta2).mul_(&mut self.second[j]);
                        let _ = self.second[j].g_add_(&square);
                        let bc1 = |m: &MemberHyper, t: u64| 1.0 - m.beta1.powi(t.max(1) as i32);
                        let bc2 = |m: &MemberHyper, t: u64| 1.0 - m.beta2.powi(t.max(1) as i32);
                        let mut denom = each(&|m, t| bc2(m, t)).divide(&self.second[j]);
                        let _ = denom.sqrt_();
                        let _ = denom.g_add_scalar_(eps);
                        let mut update = &self.first[j] / &denom;
                        each(&|m, t| lr(m) / bc1(m, t)).mul_(&mut update);
                        let _ = w.g_sub_(&update);
                    }
                }
                if let Some((old_w, old_first, old_second)) = saved {
                    let mask = per_member(active.iter().map(|&a| f64::from(a)), &p.tensor).gt(0.5);
                    let restore = |now: &mut Tensor, old: &Tensor| {
                        let kept = now.where_self(&mask, old);
                        now.copy_(&kept);
                    };
                    restore(&mut w, &old_w);
                    if let Some(old) = old_first {
                        restore(&mut self.first[j], &old);
                    }
                    if let Some(old) = old_second {
                        restore(&mut self.second[j], &old);
                    }
                }
            }
        });
    }

    /// Member `i`'s optimizer state under the names a single run's checkpoint gives it.
    pub fn member_state(&self, i: i64, params: &[Param]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (j, p) in params.iter().enumerate() {
            out.push((
                format!("optim.{}.first", p.name),
                member_slice(&self.first[j], i).contiguous(),
            ));
            if let Some(v) = self.second.get(j) {
                out.push((format!("optim.{}.second", p.name), member_slice(v, i).contiguous()));
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
                member_slice(&self.first[j], i).copy_(fetch(format!("optim.{}.first", p.name))?);
                if let Some(v) = self.second.get(j) {
                    member_slice(v, i).copy_(fetch(format!("optim.{}.second", p.name))?);
                }
            }
            Ok::<(), String>(())
        })?;
        self.updates[i as usize] = updates;
        Ok(())
    }
}

/// A setting of every member's for one stacked tensor: one number when all members
/// share it (a scalar operation, as a single run's), else one per member broadcast
/// over the member's slice.
enum Hyper {
    Same(f64),
    Each(Tensor),
}

impl Hyper {
    fn of(values: Vec<f64>, like: &Tensor) -> Hyper {
        match values.first() {
            Some(&v) if values.iter().all(|x| x.to_bits() == v.to_bits()) => Hyper::Same(v),
            _ => Hyper::Each(per_member(values.into_iter(), like)),
        }
    }

    /// `t` times the setting.
    fn mul(&self, t: &Tensor) -> Tensor {
        match self {
            Hyper::Same(v) => t * *v,
            Hyper::Each(e) => t * e,
        }
    }

    /// `t` times the setting, in place.
    fn mul_(&self, t: &mut Tensor) {
        let _ = match self {
            Hyper::Same(v) => t.g_mul_scalar_(*v),
            Hyper::Each(e) => t.g_mul_(e),
        };
    }

    /// `t` over the setting.
    fn divide(&self, t: &Tensor) -> Tensor {
        match self {
            Hyper::Same(v) => t / *v,
            Hyper::Each(e) => t / e,
        }
    }
}

/// One value per member, shaped to broadcast over the stacked tensor `like`.
pub fn per_member(values: impl Iterator<Item = f64>, like: &Tensor) -> Tensor {
    let values: Vec<f32> = values.map(|v| v as f32).collect();
    let mut shape = vec![values.len() as i64];
    shape.extend(std::iter::repeat_n(1, like.dim() - 1));
    Tensor::from_slice(&values)
        .view(shape.as_slice())
        .to_device(like.device())
}

/// Member `i`'s part of a stacked tensor (a parameter, or state shaped like one) in its
/// single model's layout: a view, so copying into it writes the stack.
pub fn member_slice(stacked: &Tensor, i: i64) -> Tensor {
    let slice = stacked.get(i);
    if slice.dim() == 2 {
        slice.transpose(0, 1)
    } else {
        slice
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::model::Role;

    /// The stacked update (a GPU's) and the slice-by-slice one (the CPU's) agree, for
    /// members with their own settings, one of them sitting the step out.
    #[test]
    fn the_stacked_update_equals_the_slice_by_slice_one() {
        for kind in [OptimizerName::Sgd, OptimizerName::Adam, OptimizerName::Adamw] {
            let members: Vec<MemberHyper> = (0..4)
                .map(|i| MemberHyper {
                    lr: 0.01 * (i + 1) as f64,
                    momentum: if i % 2 == 0 { 0.0 } else { 0.9 },
                    beta1: 0.9 - 0.05 * i as f64,
                    beta2: 0.999,
                    weight_decay: 0.01 * i as f64,
                })
                .collect();
            let param = |seed: i64| {
                tch::manual_seed(seed);
                vec![Param {
                    name: "w".into(),
                    tensor: Tensor::randn([4, 6, 5], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
                    role: Role::HiddenWeight,
                    lr_mult: 0.5,
                }]
            };
            let (mut a, mut b) = (param(1), param(1));
            let mut by_slice = FusedOptimizer::new(kind, 1e-8, members.clone(), &a);
            by_slice.slice_above = 0;
            let mut stacked = FusedOptimizer::new(kind, 1e-8, members.clone(), &b);
            stacked.slice_above = i64::MAX;
            for step in 0..5 {
                let active = [true, step != 2, true, true];
                for (params, optimizer) in [(&mut a, &mut by_slice), (&mut b, &mut stacked)] {
                    params[0].tensor.zero_grad();
                    (&params[0].tensor * &params[0].tensor).sum(Kind::Float).backward();
                    optimizer.step(params, 0.7, &active);
                }
            }
            let gap = (&a[0].tensor - &b[0].tensor).abs().max().double_value(&[]);
            assert!(gap <= 1e-6, "{kind:?}: the two updates are {gap} apart");
            assert_eq!(by_slice.updates, vec![5, 4, 5, 5]);
        }
    }
}
