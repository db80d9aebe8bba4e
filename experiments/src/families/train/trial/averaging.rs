//! Weight averaging: an exponential moving average of the weights, evaluated beside them.

use std::collections::HashMap;

use tch::Tensor;

use super::tasks::Task;
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

    /// Evaluates `task` with the averaged weights after `updates` updates, then puts its own back.
    pub(super) fn evaluate(&self, task: &mut dyn Task, updates: u64) -> Vec<(&'static str, f64)> {
        let debias = 1.0 - self.decay.powf(updates as f64);
        let saved: Vec<Tensor> = task.params().iter().map(|p| p.tensor.detach().copy()).collect();
        tch::no_grad(|| {
            for (p, sum) in task.params_mut().iter_mut().zip(&self.sums) {
                p.tensor.copy_(&(sum / debias));
            }
        });
        let metrics = task.evaluate();
        tch::no_grad(|| {
            for (p, s) in task.params_mut().iter_mut().zip(&saved) {
                p.tensor.copy_(s);
            }
        });
        metrics
    }

    pub(super) fn state(&self, params: &[Param]) -> Vec<(String, Tensor)> {
        params
            .iter()
            .zip(&self.sums)
            .map(|(p, s)| (format!("ema.{}", p.name), s.detach()))
            .collect()
    }

    pub(super) fn load(&mut self, params: &[Param], tensors: &HashMap<String, Tensor>) -> Result<(), TrialError> {
        tch::no_grad(|| {
            for (p, sum) in params.iter().zip(self.sums.iter_mut()) {
                let saved = tensors
                    .get(&format!("ema.{}", p.name))
                    .ok_or_else(|| TrialError::Checkpoint(format!("checkpoint lacks `ema.{}`", p.name)))?;
                sum.copy_(saved);
            }
            Ok(())
        })
    }
}
