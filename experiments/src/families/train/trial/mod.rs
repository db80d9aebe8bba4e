//! The `train` trial: one loop (`drive`) for a single trial and a fused group alike,
//! over an engine that owns the model: `single` (any task: a classifier, a language
//! model, the power-law regression, whole or in a random subspace) or `fused` (a group
//! of MLPs stacked into one). Beside them: the tasks (`tasks`), weight averaging
//! (`averaging`), the gradient-noise measurement (`noise`) and checkpoint state
//! (`state`).

mod averaging;
mod drive;
mod fused;
mod noise;
mod single;
mod state;
mod tasks;
#[cfg(test)]
mod tests;

use serde_json::Value;
use tch::Device;

use super::TrainParams;
use crate::error::ParamError;
use crate::nn::model::Param;
use crate::nn::optim::{Optimizer, OptimizerConfig};
use crate::nn::subspace::{self, Projection, Subspace};
use crate::nn::ProjectionKind;
use crate::trial::{TrialContext, TrialError};
use averaging::WeightAverage;
pub use fused::{run_fused, run_fused_until};
use single::Single;
use tasks::{task, Task};

/// Trains for `steps` updates, resuming from the newest checkpoint.
///
/// Metrics: `train_loss` at every update (step = updates done); the task's
/// eval metrics every `eval_every` updates and at the end; at the end
/// `train_loss_tail` (mean train loss over the last 10% of updates) and
/// `train_loss_final` (loss over the training set, or a fixed sample of it).
/// Given a rung (`ctx.pause_at`), it evaluates and checkpoints at that step and
/// stops there, setting `ctx.paused`.
pub fn run(params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
    run_until(params, ctx, None).map(|_| ())
}

/// When a run may end before its last step: after each evaluation it is shown every
/// evaluation of `metric` so far (kept in checkpoints, so a resumed run sees them all)
/// and stops the run when it gives a reason.
pub struct StopRule<'a> {
    pub metric: &'static str,
    pub stop: &'a mut StopFn<'a>,
}

/// A stop rule's test: every evaluation so far, (step, value), to the reason to stop, if any.
pub type StopFn<'a> = dyn FnMut(&[(u64, f64)]) -> Option<String> + 'a;

/// [`run`] under a stop rule; returns the evaluations of its metric. A run it stopped
/// logs its tail and final losses at that step and the output `stopped_early`
/// (`{"step": ..., "why": ...}`).
pub fn run_until(
    params: &Value,
    ctx: &mut TrialContext<'_>,
    rule: Option<StopRule<'_>>,
) -> Result<Vec<(u64, f64)>, TrialError> {
    let p: TrainParams = ParamError::deserialize(params)?;
    p.check()?;
    let task = task(&p, ctx.device)?;
    let full: i64 = task.params().iter().map(|p| p.tensor.numel() as i64).sum();
    let subspace = match p.subspace_dim {
        0 => None,
        dim => Some(subspace_for(&p, task.params(), full, dim as i64, ctx.device)?),
    };
    let config = OptimizerConfig {
        kind: p.optimizer,
        lr: p.learning_rate()?,
        momentum: p.momentum,
        beta1: p.beta1,
        beta2: p.beta2,
        eps: 1e-8,
        weight_decay: p.weight_decay,
    };
    let optimizer = Optimizer::new(config, trainable(task.as_ref(), &subspace));
    let average = p.ema_decay.map(|decay| WeightAverage::new(decay, task.params()));
    let mut engine = Single {
        peak_lr: config.lr,
        p: p.clone(),
        task,
        subspace,
        optimizer,
        average,
        num_params: full,
    };
    let mut outcome = drive::drive(&mut engine, std::slice::from_ref(&p), &mut [ctx], vec![rule]);
    let (result, history) = outcome.pop().expect("one member");
    result.map(|()| history)
}

/// What the optimizer trains: the subspace coordinates, or every parameter.
fn trainable<'a>(task: &'a dyn Task, subspace: &'a Option<Subspace>) -> &'a [Param] {
    match subspace {
        Some(s) => &s.z,
        None => task.params(),
    }
}

/// Draws the trial's projection after checking that it fits the device.
fn subspace_for(
    p: &TrainParams,
    params: &[Param],
    full: i64,
    dim: i64,
    device: Device,
) -> Result<Subspace, TrialError> {
    let needs = Projection::bytes(p.projection, full, dim);
    if let Some(free) = subspace::free_memory(device) {
        if needs as f64 > 0.8 * free as f64 {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let hint = if p.projection == ProjectionKind::Fastfood {
                "lower subspace_dim".to_string()
            } else {
                format!(
                    "use projection = \"fastfood\", which needs {:.3} GiB",
                    gib(Projection::bytes(ProjectionKind::Fastfood, full, dim))
                )
            };
            return Err(TrialError::Params(ParamError::new(
                "subspace_dim",
                format!(
                    "a {:?} projection of {full} parameters onto {dim} dimensions needs {:.2} GiB, more than the \
                     {:.2} GiB free on {device:?}; {hint}",
                    p.projection,
                    gib(needs),
                    gib(free)
                ),
            )));
        }
    }
    Ok(Subspace::new(params, p.projection, dim, p.seed, device))
}
