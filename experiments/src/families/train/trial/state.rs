//! Checkpoint state: what a training trial's checkpoint holds, writing it, and resuming from it.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Value};
use tch::Tensor;

use super::averaging::WeightAverage;
use super::tasks::Task;
use super::trainable;
use crate::families::train::TrainParams;
use crate::nn::model::Param;
use crate::nn::optim::Optimizer;
use crate::nn::subspace::Subspace;
use crate::trial::{Snapshot, TrialContext, TrialError};

/// Where the loop stands, beyond the tensors: the updates done, the recent
/// losses (for `train_loss_tail`) and the running gradient-noise sums.
pub(super) struct Progress {
    pub(super) step: u64,
    pub(super) loss_tail: VecDeque<f64>,
    pub(super) noise_average: [f64; 3],
    /// Every evaluation of a stop rule's metric so far, (step, value).
    pub(super) history: Vec<(u64, f64)>,
}

/// Writes a checkpoint: the trained tensors, the optimizer's state, the
/// averaged weights, and a sidecar with the step, the data cursor and `progress`.
pub(super) fn save(
    ctx: &mut TrialContext<'_>,
    p: &TrainParams,
    task: &dyn Task,
    subspace: &Option<Subspace>,
    optimizer: &Optimizer,
    average: Option<&WeightAverage>,
    progress: &Progress,
) -> Result<(), TrialError> {
    let done = progress.step;
    let mut tensors: Vec<(String, Tensor)> = trainable(task, subspace)
        .iter()
        .map(|p| (p.name.clone(), p.tensor.detach()))
        .collect();
    tensors.extend(optimizer.state_tensors(trainable(task, subspace)));
    if let Some(average) = average {
        tensors.extend(average.state(task.params()));
    }
    ctx.checkpoints
        .save(done, &tensors, &sidecar(p, optimizer.updates, progress))
}

/// A checkpoint's sidecar: the step, the optimizer's update count, the data cursor and `progress`.
pub(super) fn sidecar(p: &TrainParams, optimizer_updates: u64, progress: &Progress) -> Value {
    json!({
        "step": progress.step,
        "optimizer_updates": optimizer_updates,
        "data_cursor": progress.step * p.batch_size as u64,
        "seed": p.seed,
        "loss_tail": progress.loss_tail,
        "noise_average": progress.noise_average,
        "history": progress.history,
    })
}

/// Puts the newest checkpoint back into the model (or the subspace), the
/// optimizer and the averaged weights; `None` when there is none.
pub(super) fn resume(
    ctx: &mut TrialContext<'_>,
    task: &mut dyn Task,
    subspace: Option<&mut Subspace>,
    optimizer: &mut Optimizer,
    average: Option<&mut WeightAverage>,
) -> Result<Option<Progress>, TrialError> {
    let Some(snapshot) = ctx.checkpoints.latest()? else {
        return Ok(None);
    };
    match subspace {
        Some(s) => restore(&mut s.z, optimizer, &snapshot.tensors, &snapshot.sidecar)?,
        None => restore(task.params_mut(), optimizer, &snapshot.tensors, &snapshot.sidecar)?,
    }
    if let Some(average) = average {
        average.load(task.params(), &snapshot.tensors)?;
    }
    Ok(Some(progress(&snapshot)))
}

/// The progress a checkpoint's sidecar holds (what it lacks starts empty).
pub(super) fn progress(snapshot: &Snapshot) -> Progress {
    let sidecar = &snapshot.sidecar;
    let mut noise_average = [0.0f64; 3];
    if let Some(saved) = sidecar["noise_average"].as_array() {
        for (slot, v) in noise_average.iter_mut().zip(saved) {
            *slot = v.as_f64().unwrap_or(0.0);
        }
    }
    let loss_tail = sidecar["loss_tail"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let history = sidecar["history"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p.get(0)?.as_u64()?, p.get(1)?.as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    Progress {
        step: snapshot.step,
        loss_tail,
        noise_average,
        history,
    }
}

fn restore(
    params: &mut [Param],
    optimizer: &mut Optimizer,
    tensors: &HashMap<String, Tensor>,
    sidecar: &Value,
) -> Result<(), TrialError> {
    tch::no_grad(|| {
        for param in params.iter_mut() {
            let saved = tensors
                .get(&param.name)
                .ok_or_else(|| TrialError::Checkpoint(format!("checkpoint lacks `{}`", param.name)))?;
            if saved.size() != param.tensor.size() {
                return Err(TrialError::Checkpoint(format!(
                    "`{}` has shape {:?} in the checkpoint but {:?} in the model",
                    param.name,
                    saved.size(),
                    param.tensor.size()
                )));
            }
            param.tensor.copy_(saved);
        }
        Ok(())
    })?;
    let updates = sidecar["optimizer_updates"]
        .as_u64()
        .ok_or_else(|| TrialError::Checkpoint("sidecar lacks optimizer_updates".into()))?;
    optimizer
        .load_state(params, tensors, updates)
        .map_err(TrialError::Checkpoint)
}
