//! Evaluation at the loop's evaluation steps: the task's held-out metrics,
//! the averaged weights' eval loss, and the gradient-noise measurement.

use super::averaging::WeightAverage;
use super::noise::{measure_noise, smooth};
use super::tasks::Task;
use crate::families::train::TrainParams;
use crate::nn::subspace::Subspace;
use crate::trial::TrialContext;

/// Logs every evaluation of update `done` and returns them; `noise_average` carries the running noise sums.
pub(super) fn evaluate(
    ctx: &mut TrialContext<'_>,
    p: &TrainParams,
    task: &mut dyn Task,
    subspace: &Option<Subspace>,
    average: Option<&WeightAverage>,
    noise_average: &mut [f64; 3],
    done: u64,
) -> Vec<(&'static str, f64)> {
    let mut logged = Vec::new();
    let mut log = |ctx: &mut TrialContext<'_>, name: &'static str, value: f64| {
        ctx.metrics.log(name, done, value);
        logged.push((name, value));
    };
    if let Some(s) = subspace {
        tch::no_grad(|| s.materialize(task.params_mut()));
    }
    for (name, value) in task.evaluate() {
        log(ctx, name, value);
    }
    if let Some(average) = average {
        for (name, value) in average.evaluate(task, done) {
            if name == "eval_loss" {
                log(ctx, "eval_loss_ema", value);
            }
        }
    }
    if let Some(noise) = p.noise_scale {
        let draws = u64::from(noise.repeats) * u64::from(noise.big / noise.small);
        let estimate = measure_noise(task, noise, done * draws);
        for (name, value) in smooth(noise, noise_average, estimate) {
            log(ctx, name, value);
        }
    }
    logged
}
