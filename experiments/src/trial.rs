//! What a trial needs from its host: somewhere to keep checkpoints and
//! somewhere to send metrics. The worker provides both; tests can too.

use std::collections::HashMap;

use serde_json::Value;
use tch::{Device, Tensor};

/// Why a trial stopped without finishing.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("bad parameters: {0}")]
    Params(#[from] crate::ParamError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("data: {0}")]
    Data(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("training diverged at step {step}: {metric} is {value}")]
    Diverged {
        step: u64,
        metric: &'static str,
        value: f64,
    },
}

/// A saved trial state: named tensors plus a JSON sidecar (step, data cursor, ...).
pub struct Snapshot {
    pub step: u64,
    pub tensors: HashMap<String, Tensor>,
    pub sidecar: Value,
}

pub trait CheckpointStore {
    /// Makes the state durable; returns only once it is.
    fn save(&mut self, step: u64, tensors: &[(String, Tensor)], sidecar: &Value) -> Result<(), TrialError>;
    /// The newest checkpoint this trial should resume from, if any.
    fn latest(&mut self) -> Result<Option<Snapshot>, TrialError>;
}

pub trait MetricSink {
    fn log(&mut self, name: &str, step: u64, value: f64);
}

/// Everything a trial gets from its host.
pub struct TrialContext<'a> {
    pub device: Device,
    pub checkpoints: &'a mut dyn CheckpointStore,
    pub metrics: &'a mut dyn MetricSink,
}

/// Runs one trial of `family` to its end.
pub fn run(family: crate::Family, params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
    match family {
        crate::Family::Train | crate::Family::MupTransfer | crate::Family::IntrinsicDim => {
            crate::train::run(params, ctx)
        }
        crate::Family::CriticalBatch => {
            crate::cbs::split(params)?;
            crate::train::run(&crate::cbs::train_params(params), ctx)
        }
    }
}

/// Keeps checkpoints in memory; for tests and in-process runs.
#[derive(Default)]
pub struct MemoryCheckpoints {
    pub saved: Vec<Snapshot>,
    /// Resume from the newest saved checkpoint at or below this step, if set.
    pub resume_at: Option<u64>,
}

impl CheckpointStore for MemoryCheckpoints {
    fn save(&mut self, step: u64, tensors: &[(String, Tensor)], sidecar: &Value) -> Result<(), TrialError> {
        self.saved.push(Snapshot {
            step,
            tensors: tensors.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect(),
            sidecar: sidecar.clone(),
        });
        Ok(())
    }

    fn latest(&mut self) -> Result<Option<Snapshot>, TrialError> {
        let Some(limit) = self.resume_at else {
            return Ok(None);
        };
        Ok(self.saved.iter().rev().find(|s| s.step <= limit).map(|s| Snapshot {
            step: s.step,
            tensors: s.tensors.iter().map(|(n, t)| (n.clone(), t.copy())).collect(),
            sidecar: s.sidecar.clone(),
        }))
    }
}

/// Collects metrics in memory.
#[derive(Default)]
pub struct MemoryMetrics {
    pub points: Vec<(String, u64, f64)>,
}

impl MemoryMetrics {
    pub fn last(&self, name: &str) -> Option<f64> {
        self.points.iter().rev().find(|(n, _, _)| n == name).map(|p| p.2)
    }
}

impl MetricSink for MemoryMetrics {
    fn log(&mut self, name: &str, step: u64, value: f64) {
        self.points.push((name.to_string(), step, value));
    }
}
