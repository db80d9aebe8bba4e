//! The `train` trial loop, shared by every model: a task gives the loss of a
//! step's batch and its evaluations; the loop owns the optimizer, the
//! schedule, metrics and divergence handling. Beside it: the tasks
//! (`tasks`), evaluation (`eval`), weight averaging (`averaging`), the
//! gradient-noise measurement (`noise`) and checkpoint state (`state`).

mod averaging;
mod eval;
mod fused;
mod noise;
mod state;
mod tasks;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use serde_json::Value;
use tch::Device;

use super::{Divergence, TrainParams};
use crate::error::ParamError;
use crate::nn::model::Param;
use crate::nn::optim::{Optimizer, OptimizerConfig};
use crate::nn::subspace::{self, Projection, Subspace};
use crate::nn::ProjectionKind;
use crate::trial::{TrialContext, TrialError};
use averaging::WeightAverage;
pub use fused::run_fused;
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
    mut rule: Option<StopRule<'_>>,
) -> Result<Vec<(u64, f64)>, TrialError> {
    let p: TrainParams = ParamError::deserialize(params)?;
    p.check()?;
    let mut task = task(&p, ctx.device)?;
    let full: i64 = task.params().iter().map(|p| p.tensor.numel() as i64).sum();
    let mut subspace = match p.subspace_dim {
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
    let mut optimizer = Optimizer::new(config, trainable(task.as_ref(), &subspace));
    let steps = p.total_steps();
    let mut average = p.ema_decay.map(|decay| WeightAverage::new(decay, task.params()));
    // Running sums of the |G|^2 and tr(Sigma) estimates and of their weights.
    let mut noise_average = [0.0f64; 3];
    let tail_len = (steps / 10).max(1) as usize;
    let mut tail: VecDeque<f64> = VecDeque::with_capacity(tail_len);
    let mut start = 0u64;
    let mut history: Vec<(u64, f64)> = Vec::new();

    if let Some(resumed) = state::resume(ctx, task.as_mut(), subspace.as_mut(), &mut optimizer, average.as_mut())? {
        (start, tail, noise_average, history) =
            (resumed.step, resumed.loss_tail, resumed.noise_average, resumed.history);
    }
    // The step the rule stopped the run at, and why.
    let mut stopped: Option<(u64, String)> = None;

    if start == 0 {
        ctx.metrics.log("num_params", 0, full as f64);
    }
    // A rung inside the run (ASHA, Hyperband): evaluate and checkpoint there, then stop.
    let pause_at = ctx.pause_at.filter(|&at| at > start && at < steps);
    let peak_lr = optimizer.config.lr;
    let mut next_eval = p.next_eval(0);
    while next_eval <= start {
        next_eval = p.next_eval(next_eval);
    }
    for step in start..steps {
        optimizer.config.lr = peak_lr * p.lr_factor(step);
        match subspace.as_mut() {
            Some(s) => {
                optimizer.zero_grad(&mut s.z);
                s.materialize(task.params_mut());
            }
            None => optimizer.zero_grad(task.params_mut()),
        }
        let mut activations = Vec::new();
        let loss = task.batch_loss(step, p.coord_check.then_some(&mut activations));
        loss.backward();
        optimizer.step(trainable(task.as_ref(), &subspace));
        if let Some(average) = average.as_mut() {
            average.update(task.params());
        }
        let done = step + 1;
        let loss_value = loss.double_value(&[]);
        for (layer, value) in activations.iter().enumerate() {
            ctx.metrics.log(&format!("act.{layer}"), done, *value);
        }
        if !loss_value.is_finite() {
            if p.divergence == Divergence::Record {
                ctx.metrics.log("diverged", done, 1.0);
                return Ok(history);
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
        let pausing = pause_at == Some(done);
        if done == next_eval || done == steps || pausing {
            if done == next_eval {
                next_eval = p.next_eval(done);
            }
            let logged = eval::evaluate(
                ctx,
                &p,
                task.as_mut(),
                &subspace,
                average.as_ref(),
                &mut noise_average,
                done,
            );
            if let Some(rule) = rule.as_mut() {
                if let Some(&(_, value)) = logged.iter().find(|(name, _)| *name == rule.metric) {
                    history.push((done, value));
                    if done < steps {
                        stopped = (rule.stop)(&history).map(|why| (done, why));
                    }
                }
            }
        }
        if stopped.is_some() {
            break;
        }
        if (done % p.checkpoint_every == 0 && done < steps) || pausing {
            let progress = state::Progress {
                step: done,
                loss_tail: tail.clone(),
                noise_average,
                history: history.clone(),
            };
            // A checkpoint that can't be written (the store stayed away through every
            // retry) costs only the progress it would have saved: training goes on,
            // and the next checkpoint tries again.
            let saved = state::save(
                ctx,
                &p,
                task.as_ref(),
                &subspace,
                &optimizer,
                average.as_ref(),
                &progress,
            );
            match saved {
                // The trial resumes from this checkpoint when it is promoted.
                Err(error) if pausing => return Err(error),
                Err(error) => eprintln!("checkpoint at step {done} not written ({error}); training goes on"),
                Ok(()) if pausing => {
                    ctx.paused = Some(done);
                    return Ok(history);
                }
                Ok(()) => {}
            }
        }
        if p.step_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(p.step_delay_ms));
        }
    }
    if let Some(s) = &subspace {
        tch::no_grad(|| s.materialize(task.params_mut()));
    }
    let end = match &stopped {
        Some((step, why)) => {
            ctx.metrics
                .output("stopped_early", serde_json::json!({"step": step, "why": why}));
            *step
        }
        None => steps,
    };
    let tail_mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    ctx.metrics.log("train_loss_tail", end, tail_mean);
    ctx.metrics.log("train_loss_final", end, task.train_loss());
    Ok(history)
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
