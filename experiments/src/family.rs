//! The registry of experiment families and what each accepts.

use serde_json::Value;

use crate::report::{Report, ReportError, TrialOutcome};
use crate::train::TrainParams;

/// A trial's parameters that its family can't accept.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ParamError {
    /// Dotted path inside the trial's parameters, such as `model.depth`; empty for the whole set.
    pub path: String,
    pub message: String,
}

impl ParamError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ParamError {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Reads `params` into `T`, naming the path of an unknown field or a wrong type.
    pub fn deserialize<T: serde::de::DeserializeOwned>(params: &Value) -> Result<T, ParamError> {
        serde_path_to_error::deserialize(params).map_err(|e| {
            let path = e.path().to_string();
            ParamError::new(
                if path == "." { String::new() } else { path },
                e.into_inner().to_string(),
            )
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Plain supervised training: one model, one optimizer, one data set.
    Train,
    /// muP width and depth transfer: `train` trials across widths, depths,
    /// learning rates and parametrizations, with the transfer report.
    MupTransfer,
    /// Critical batch size: `train` trials across batch sizes, learning rates and
    /// model sizes, each with a `cbs` table (reference batch, data budgets).
    CriticalBatch,
    /// Intrinsic dimension: `train` trials in random subspaces of growing
    /// dimension (`subspace_dim`, `projection`) beside full training (`subspace_dim` = 0).
    IntrinsicDim,
    /// Data selection with importance resampling: features per pool shard, one
    /// selection, and a downstream language model on the DSIR and a random selection.
    Dsir,
}

impl Family {
    pub const ALL: &'static [Family] = &[
        Family::Train,
        Family::MupTransfer,
        Family::CriticalBatch,
        Family::IntrinsicDim,
        Family::Dsir,
    ];

    pub fn parse(name: &str) -> Result<Family, String> {
        Family::ALL.iter().copied().find(|f| f.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
            format!("unknown family `{name}`, expected one of: {}", known.join(", "))
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Train => "train",
            Family::MupTransfer => "mup_transfer",
            Family::CriticalBatch => "critical_batch",
            Family::IntrinsicDim => "intrinsic_dim",
            Family::Dsir => "dsir",
        }
    }

    /// Checks one trial's full parameter set (base merged with the swept values).
    pub fn check_params(self, params: &Value) -> Result<TrialPlan, ParamError> {
        match self {
            Family::Train | Family::MupTransfer | Family::IntrinsicDim => {
                let p: TrainParams = ParamError::deserialize(params)?;
                p.check()?;
                Ok(TrialPlan {
                    total_steps: p.total_steps(),
                })
            }
            Family::Dsir => Ok(TrialPlan {
                total_steps: crate::dsir_family::DsirParams::parse(params)?.total_steps(),
            }),
            Family::CriticalBatch => {
                let (p, _) = crate::cbs::split(params)?;
                Ok(TrialPlan {
                    total_steps: p.total_steps(),
                })
            }
        }
    }

    /// The metrics every trial of the family logs; an objective must be one of them.
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            Family::Train | Family::MupTransfer | Family::CriticalBatch | Family::IntrinsicDim => crate::train::METRICS,
            Family::Dsir => crate::dsir_family::METRICS,
        }
    }

    /// The metrics whose whole curves the report reads (the rest it reads as last values).
    pub fn series_metrics(self) -> &'static [&'static str] {
        match self {
            Family::Train | Family::MupTransfer | Family::IntrinsicDim | Family::Dsir => &[],
            Family::CriticalBatch => crate::cbs::SERIES,
        }
    }

    /// The objective when a spec names none: a metric and whether to minimize or maximize it.
    pub fn default_objective(self) -> (&'static str, ablate_schema::Goal) {
        use ablate_schema::Goal::{Maximize, Minimize};
        match self {
            Family::Train => ("eval_loss", Minimize),
            Family::MupTransfer => (crate::mup::OBJECTIVE, Minimize),
            Family::CriticalBatch => (crate::cbs::LOSS, Minimize),
            Family::IntrinsicDim => (crate::intrinsic::ACCURACY, Maximize),
            Family::Dsir => ("eval_loss", Minimize),
        }
    }

    /// Turns the sweep's points (base merged with swept values) into the trials to run;
    /// most families run one trial per point.
    pub fn expand(
        self,
        points: Vec<serde_json::Map<String, Value>>,
    ) -> Result<Vec<serde_json::Map<String, Value>>, ParamError> {
        match self {
            Family::Dsir => crate::dsir_family::expand(points),
            Family::IntrinsicDim => Ok(crate::intrinsic::expand(points)),
            _ => Ok(points),
        }
    }

    /// The family's report over its finished trials.
    pub fn report(self, outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
        match self {
            Family::Train => crate::train::report(outcomes),
            Family::MupTransfer => crate::mup::analyze(outcomes),
            Family::CriticalBatch => crate::cbs::analyze(outcomes),
            Family::IntrinsicDim => crate::intrinsic::analyze(outcomes),
            Family::Dsir => crate::dsir_family::analyze(outcomes),
        }
    }
}

/// What the platform needs to know of a trial before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrialPlan {
    pub total_steps: u64,
}
