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
    /// A command trial's program failed, or broke the protocol.
    #[error("{0}")]
    Program(String),
    /// A command trial's program was killed by a signal: a crash, retried from its checkpoint.
    #[error("{0}")]
    Killed(String),
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
    /// Records a named result beyond metrics (such as the manifest of a selected data set);
    /// the platform keeps it with the trial, queryable as `ablate.outputs`.
    fn output(&mut self, name: &str, value: Value);
    /// Hands on what was logged so far now, not with the next point (a program that
    /// logs rarely, then runs long).
    fn flush(&mut self) {}
}

/// What [`DataStore::read_location`] found: how many files matched, and those picked.
pub struct Listing {
    pub total: usize,
    pub files: Vec<LocatedFile>,
}

/// One file of a location: its position among the matching files (in name order), its name, its bytes.
pub struct LocatedFile {
    pub index: usize,
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Every file: the `pick` of a location read whole.
pub fn every_file(_: usize) -> bool {
    true
}

/// Object storage as a trial sees it: data sets to read, and a prefix of the experiment's own.
pub trait DataStore {
    /// The files of a location whose names end with `suffix`, in name order; only those whose
    /// position `pick` accepts are read. A location is `s3://bucket/prefix`, `file:///dir`, an
    /// absolute path, or a path under `$ABLATE_DATA` (`~/.cache/ablate/data`); it may name a
    /// single file.
    fn read_location(
        &mut self,
        location: &str,
        suffix: &str,
        pick: &dyn Fn(usize) -> bool,
    ) -> Result<Listing, TrialError>;
    /// Makes `bytes` durable at `name` under the experiment's prefix; returns the object's key.
    fn put(&mut self, name: &str, bytes: Vec<u8>) -> Result<String, TrialError>;
    /// An object under the experiment's prefix, `None` when there is none (yet).
    fn get(&mut self, name: &str) -> Result<Option<Vec<u8>>, TrialError>;
}

/// Reads a location on this host's file system (see [`DataStore::read_location`]).
pub fn read_local_location(location: &str, suffix: &str, pick: &dyn Fn(usize) -> bool) -> Result<Listing, TrialError> {
    let path = std::path::PathBuf::from(crate::nn::locations::local_path(location));
    let data_err = |e: std::io::Error| TrialError::Data(format!("{}: {e}", path.display()));
    let mut found: Vec<std::path::PathBuf> = if path.is_file() {
        vec![path.clone()]
    } else {
        std::fs::read_dir(&path)
            .map_err(data_err)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
            .collect()
    };
    found.sort();
    let files = found
        .iter()
        .enumerate()
        .filter(|(i, _)| pick(*i))
        .map(|(index, f)| {
            Ok(LocatedFile {
                index,
                name: f.display().to_string(),
                bytes: std::fs::read(f).map_err(data_err)?,
            })
        })
        .collect::<Result<_, TrialError>>()?;
    Ok(Listing {
        total: found.len(),
        files,
    })
}

/// A data store on a local directory: locations on this host's file system, the
/// experiment's own objects under `<root>/experiments/<experiment>/`.
pub struct DirData {
    pub root: std::path::PathBuf,
    pub experiment: String,
}

impl DirData {
    fn own(&self, name: &str) -> std::path::PathBuf {
        self.root.join("experiments").join(&self.experiment).join(name)
    }
}

impl DataStore for DirData {
    fn read_location(
        &mut self,
        location: &str,
        suffix: &str,
        pick: &dyn Fn(usize) -> bool,
    ) -> Result<Listing, TrialError> {
        read_local_location(location, suffix, pick)
    }

    fn put(&mut self, name: &str, bytes: Vec<u8>) -> Result<String, TrialError> {
        let path = self.own(name);
        let err = |e: std::io::Error| TrialError::Data(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        // Written aside and renamed, so a reader never sees half an object.
        let part = path.with_extension("part");
        std::fs::write(&part, bytes).map_err(err)?;
        std::fs::rename(&part, &path).map_err(err)?;
        Ok(format!("experiments/{}/{name}", self.experiment))
    }

    fn get(&mut self, name: &str) -> Result<Option<Vec<u8>>, TrialError> {
        let path = self.own(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TrialError::Data(format!("{}: {e}", path.display()))),
        }
    }
}

/// Everything a trial gets from its host.
pub struct TrialContext<'a> {
    pub device: Device,
    pub checkpoints: &'a mut dyn CheckpointStore,
    pub metrics: &'a mut dyn MetricSink,
    pub data: &'a mut dyn DataStore,
    /// A rung (ASHA, Hyperband): stop after this step with a checkpoint at it, and set `paused`.
    pub pause_at: Option<u64>,
    /// Set by a trial that stopped at `pause_at`: the step it stopped at.
    pub paused: Option<u64>,
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

/// Collects metrics and outputs in memory.
#[derive(Default)]
pub struct MemoryMetrics {
    pub points: Vec<(String, u64, f64)>,
    pub outputs: serde_json::Map<String, Value>,
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
    fn output(&mut self, name: &str, value: Value) {
        self.outputs.insert(name.to_string(), value);
    }
}
