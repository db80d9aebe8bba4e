//! The `mup_transfer` family: muP width and depth transfer. Its trials are
//! `train` trials across widths, depths, learning rates and parametrizations;
//! what it adds is the transfer report.

use ablate_schema::Goal;
use serde_json::Value;

use crate::error::ParamError;
use crate::families::definition::{Definition, TrialPlan};
use crate::families::train;
use crate::report::{Report, ReportError, TrialOutcome};
#[cfg(feature = "torch")]
use crate::trial::{TrialContext, TrialError};

pub mod report;

pub use report::{analyze, OBJECTIVE};

/// muP width and depth transfer (CRITERIA.md section 1).
pub struct MupTransfer;

impl Definition for MupTransfer {
    fn name(&self) -> &'static str {
        "mup_transfer"
    }
    fn check_params(&self, params: &Value) -> Result<TrialPlan, ParamError> {
        train::check(params)
    }

    fn pauses_at_rungs(&self) -> bool {
        true // its trials are train trials
    }

    fn metrics(&self) -> &'static [&'static str] {
        train::METRICS
    }
    fn default_objective(&self) -> (&'static str, Goal) {
        (OBJECTIVE, Goal::Minimize)
    }
    fn report(&self, outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
        analyze(outcomes)
    }
    #[cfg(feature = "torch")]
    fn run(&self, params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
        train::run(params, ctx)
    }
    fn fuse_key(&self, params: &Value) -> Result<train::Fusable, String> {
        train::fuse_key(params)
    }
    #[cfg(feature = "torch")]
    fn run_fused(&self, params: &[Value], ctxs: &mut [TrialContext<'_>]) -> Vec<Result<(), TrialError>> {
        train::run_fused(params, ctxs)
    }
}
