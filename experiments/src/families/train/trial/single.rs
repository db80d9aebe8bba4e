//! One trial's model as the loop's one member: any task (classifier, language model,
//! power-law regression), trained whole or in a random subspace, with its optimizer,
//! weight average and gradient-noise measurement.

use super::averaging::WeightAverage;
use super::drive::Engine;
use super::noise::{measure_noise, smooth};
use super::state::{self, Progress};
use super::tasks::Task;
use super::trainable;
use crate::families::train::TrainParams;
use crate::nn::optim::Optimizer;
use crate::nn::subspace::Subspace;
use crate::trial::{TrialContext, TrialError};

pub(super) struct Single {
    pub(super) p: TrainParams,
    pub(super) task: Box<dyn Task>,
    pub(super) subspace: Option<Subspace>,
    pub(super) optimizer: Optimizer,
    pub(super) average: Option<WeightAverage>,
    /// The learning rate the schedule scales.
    pub(super) peak_lr: f64,
    pub(super) num_params: i64,
}

impl Engine for Single {
    fn num_params(&self) -> i64 {
        self.num_params
    }

    fn step(&mut self, step: u64, _active: &[bool], record: Option<&mut Vec<f64>>) -> Result<Vec<f64>, TrialError> {
        self.optimizer.config.lr = self.peak_lr * self.p.lr_factor(step);
        match self.subspace.as_mut() {
            Some(s) => {
                self.optimizer.zero_grad(&mut s.z);
                s.materialize(self.task.params_mut());
            }
            None => self.optimizer.zero_grad(self.task.params_mut()),
        }
        let loss = self.task.batch_loss(step, record);
        loss.backward();
        self.optimizer.step(trainable(self.task.as_ref(), &self.subspace));
        if let Some(average) = self.average.as_mut() {
            average.update(self.task.params());
        }
        Ok(vec![loss.double_value(&[])])
    }

    /// The task's held-out metrics, the averaged weights' eval loss (`eval_loss_ema`), and
    /// the gradient-noise measurement.
    fn evaluate(
        &mut self,
        done: u64,
        _due: &[bool],
        noise_sums: &mut [[f64; 3]],
    ) -> Result<Vec<Vec<(&'static str, f64)>>, TrialError> {
        let task = self.task.as_mut();
        if let Some(s) = &self.subspace {
            tch::no_grad(|| s.materialize(task.params_mut()));
        }
        let mut logged = task.evaluate();
        if let Some(average) = &self.average {
            for (name, value) in average.evaluate(task, done) {
                if name == "eval_loss" {
                    logged.push(("eval_loss_ema", value));
                }
            }
        }
        if let Some(noise) = self.p.noise_scale {
            let draws = u64::from(noise.repeats) * u64::from(noise.big / noise.small);
            let estimate = measure_noise(task, noise, done * draws);
            logged.extend(smooth(noise, &mut noise_sums[0], estimate));
        }
        Ok(vec![logged])
    }

    fn final_losses(&mut self, _members: &[usize]) -> Result<Vec<f64>, TrialError> {
        if let Some(s) = &self.subspace {
            tch::no_grad(|| s.materialize(self.task.params_mut()));
        }
        Ok(vec![self.task.train_loss()])
    }

    fn save(&self, _i: usize, ctx: &mut TrialContext<'_>, progress: &Progress) -> Result<(), TrialError> {
        state::save(
            ctx,
            &self.p,
            self.task.as_ref(),
            &self.subspace,
            &self.optimizer,
            self.average.as_ref(),
            progress,
        )
    }

    fn resume(&mut self, _i: usize, ctx: &mut TrialContext<'_>) -> Result<Option<Progress>, TrialError> {
        state::resume(
            ctx,
            self.task.as_mut(),
            self.subspace.as_mut(),
            &mut self.optimizer,
            self.average.as_mut(),
        )
    }
}
