//! Weight averaging: an exponential moving average of the weights, evaluated beside them.

use std::collections::HashMap;

use tch::Tensor;

use super::tasks::Task;
use crate::nn::fused::{member_slice, per_member};
use crate::nn::model::Param;
use crate::trial::TrialError;

/// An exponential moving average of the weights, debiased as Adam's moments are:
/// after t updates it is a weighted mean of the t iterates.
pub(super) struct WeightAverage {
    decay: f64,
    sums: Vec<Tensor>,
}

impl WeightAverage {
    pub(super) fn new(decay: f64, params: &[Param]) -> WeightAverage {
        WeightAverage {
            decay,
            sums: params.iter().map(|p| p.tensor.detach().zeros_like()).collect(),
        }
    }

    pub(super) fn update(&mut self, params: &[Param]) {
        tch::no_grad(|| {
            for (sum, p) in self.sums.iter_mut().zip(params) {
                let _ = sum.g_mul_scalar_(self.decay);
                let _ = sum.g_add_(&(p.tensor.detach() * (1.0 - self.decay)));
            }
        });
    }

    /// [`Self::update`] for stacked members (a fused group's): members not `active` keep their average.
    pub(super) fn update_members(&mut self, params: &[Param], active: &[bool]) {
        if active.iter().all(|&a| a) {
            return self.update(params);
        }
        tch::no_grad(|| {
            for (sum, p) in self.sums.iter_mut().zip(params) {
                let keep = per_member(active.iter().map(|&a| if a { self.decay } else { 1.0 }), sum);
                let take = per_member(active.iter().map(|&a| if a { 1.0 - self.decay } else { 0.0 }), sum);
                let _ = sum.g_mul_(&keep);
                let _ = sum.g_add_(&(p.tensor.detach() * take));
            }
        });
    }

    /// Evaluates `task` with the averaged weights after `updates` updates, then puts its own back.
    pub(super) fn evaluate(&self, task: &mut dyn Task, updates: u64) -> Vec<(&'static str, f64)> {
        let saved = self.swap_in(task.params_mut(), updates);
        let metrics = task.evaluate();
        swap_back(task.params_mut(), &saved);
        metrics
    }

    /// Puts the averaged weights after `updates` updates into `params`; returns their own,
    /// for [`swap_back`].
    pub(super) fn swap_in(&self, params: &mut [Param], updates: u64) -> Vec<Tensor> {
        let debias = 1.0 - self.decay.powf(updates as f64);
        let saved: Vec<Tensor> = params.iter().map(|p| p.tensor.detach().copy()).collect();
        tch::no_grad(|| {
            for (p, sum) in params.iter_mut().zip(&self.sums) {
                p.tensor.copy_(&(sum / debias));
            }
        });
        saved
    }

    /// The name a parameter's average has in a checkpoint.
    fn key(param: &Param) -> String {
        format!("ema.{}", param.name)
    }

    pub(super) fn state(&self, params: &[Param]) -> Vec<(String, Tensor)> {
        self.state_of(params, Tensor::detach)
    }

    /// Member `i`'s averages in a fused group, under a single run's checkpoint names.
    pub(super) fn member_state(&self, i: i64, params: &[Param]) -> Vec<(String, Tensor)> {
        self.state_of(params, |sum| member_slice(sum, i).contiguous())
    }

    fn state_of(&self, params: &[Param], view: impl Fn(&Tensor) -> Tensor) -> Vec<(String, Tensor)> {
        params
            .iter()
            .zip(&self.sums)
            .map(|(p, s)| (Self::key(p), view(s)))
            .collect()
    }

    pub(super) fn load(&mut self, params: &[Param], tensors: &HashMap<String, Tensor>) -> Result<(), TrialError> {
        self.load_into(params, tensors, Tensor::shallow_clone)
    }

    /// Puts member `i`'s averages into a fused group's from a single run's (or a
    /// member's) checkpoint.
    pub(super) fn load_member(
        &mut self,
        i: i64,
        params: &[Param],
        tensors: &HashMap<String, Tensor>,
    ) -> Result<(), TrialError> {
        self.load_into(params, tensors, |sum| member_slice(sum, i))
    }

    /// Copies each saved average into `view` of its running sum (the whole of it, or a slice).
    fn load_into(
        &mut self,
        params: &[Param],
        tensors: &HashMap<String, Tensor>,
        view: impl Fn(&Tensor) -> Tensor,
    ) -> Result<(), TrialError> {
        tch::no_grad(|| {
            for (p, sum) in params.iter().zip(&self.sums) {
                let key = Self::key(p);
                let saved = tensors
                    .get(&key)
                    .ok_or_else(|| TrialError::Checkpoint(format!("checkpoint lacks `{key}`")))?;
                view(sum).copy_(saved);
            }
            Ok(())
        })
    }
}

/// Puts back the weights [`WeightAverage::swap_in`] returned.
pub(super) fn swap_back(params: &mut [Param], saved: &[Tensor]) {
    tch::no_grad(|| {
        for (p, s) in params.iter_mut().zip(saved) {
            p.tensor.copy_(s);
        }
    });
}
