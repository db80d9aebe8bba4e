//! Online gradient-noise measurement (B_simple) and the trial's own noise stream.

use tch::{Kind, Tensor};

use super::tasks::Task;
use crate::families::train::NoiseScale;
use crate::nn::model::Param;

/// One measurement of the gradient noise: the unbiased estimates of |G|^2 and
/// tr(Sigma) averaged over `repeats` draws (numerators and denominators apart).
#[derive(Debug, Clone, Copy)]
pub(super) struct NoiseEstimate {
    pub(super) grad_sq: f64,
    pub(super) trace: f64,
}

#[cfg(test)]
impl NoiseEstimate {
    pub(super) fn b_simple(&self) -> f64 {
        self.trace / self.grad_sq
    }
}

/// Measures the gradient noise at the current weights (McCandlish et al. 2018, appendix A):
/// each draw takes `big / small` independent batches of `small`; their gradients give
/// |G_small|^2 (averaged) and, through their mean, |G_big|^2. `first_draw` names the draws so
/// a measurement is reproducible. Leaves the parameters' gradients zeroed.
pub(super) fn measure_noise(task: &mut dyn Task, noise: NoiseScale, first_draw: u64) -> NoiseEstimate {
    let chunks = u64::from(noise.big / noise.small);
    let (mut grad_sq, mut trace) = (0.0, 0.0);
    for repeat in 0..u64::from(noise.repeats) {
        let mut sum: Option<Tensor> = None;
        let mut small_sq = 0.0;
        for chunk in 0..chunks {
            zero_grads(task.params_mut());
            let loss = task.sample_loss(first_draw + repeat * chunks + chunk, noise.small as usize);
            loss.backward();
            let g = tch::no_grad(|| {
                Tensor::cat(
                    &task
                        .params()
                        .iter()
                        .map(|p| p.tensor.grad().to_kind(Kind::Double).view([-1]))
                        .collect::<Vec<_>>(),
                    0,
                )
            });
            small_sq += g.square().sum(Kind::Double).double_value(&[]);
            sum = Some(match sum {
                Some(s) => s + g,
                None => g,
            });
        }
        small_sq /= chunks as f64;
        let big_sq = (sum.expect("at least one chunk") / chunks as f64)
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
        let (g, t) = draw_estimates(noise, small_sq, big_sq);
        grad_sq += g;
        trace += t;
    }
    zero_grads(task.params_mut());
    let repeats = f64::from(noise.repeats);
    NoiseEstimate {
        grad_sq: grad_sq / repeats,
        trace: trace / repeats,
    }
}

/// One draw's unbiased estimates of |G|^2 and tr(Sigma) from |G_small|^2 (the mean over
/// the draw's small batches) and |G_big|^2 (of their mean gradient).
pub(super) fn draw_estimates(noise: NoiseScale, small_sq: f64, big_sq: f64) -> (f64, f64) {
    let (small, big) = (f64::from(noise.small), f64::from(noise.big));
    (
        (big * big_sq - small * small_sq) / (big - small),
        (small_sq - big_sq) / (1.0 / small - 1.0 / big),
    )
}

/// Folds a measurement into a trial's running sums (|G|^2, tr(Sigma), weight), decayed by
/// `noise.smoothing`; returns the metrics to log: grad_sq_norm, grad_noise_trace, b_simple.
pub(super) fn smooth(noise: NoiseScale, sums: &mut [f64; 3], estimate: NoiseEstimate) -> [(&'static str, f64); 3] {
    for (slot, v) in sums.iter_mut().zip([estimate.grad_sq, estimate.trace, 1.0]) {
        *slot = noise.smoothing * *slot + v;
    }
    let [grad_sq, trace, weight] = *sums;
    [
        ("grad_sq_norm", grad_sq / weight),
        ("grad_noise_trace", trace / weight),
        ("b_simple", trace / grad_sq),
    ]
}

pub(super) fn zero_grads(params: &mut [Param]) {
    for p in params {
        let mut grad = p.tensor.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
}
