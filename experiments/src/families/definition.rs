//! What a family tells the platform, and what the platform needs to know of a
//! trial before it runs: the interface every family implements, apart from
//! the registry that lists them (so families and registry import no cycle).

use ablate_schema::Goal;
use serde_json::{Map, Value};

use crate::error::ParamError;
use crate::report::{Report, ReportError, TrialOutcome};
#[cfg(feature = "torch")]
use crate::trial::{TrialContext, TrialError};

/// What a family tells the platform: how to check, expand, run and report its trials.
pub trait Definition: Sync {
    /// The name a spec's `family` gives.
    fn name(&self) -> &'static str;

    /// Checks one trial's full parameter set (base merged with the swept values).
    fn check_params(&self, params: &Value) -> Result<TrialPlan, ParamError>;

    /// The metrics every trial of the family logs; an objective must be one of them.
    fn metrics(&self) -> &'static [&'static str];

    /// The metrics whose whole curves the report reads (the rest it reads as last values).
    fn series_metrics(&self) -> &'static [&'static str] {
        &[]
    }

    /// The objective when a spec names none: a metric and whether to minimize or maximize it.
    fn default_objective(&self) -> (&'static str, Goal);

    /// Turns the sweep's points (base merged with swept values) into the trials to run;
    /// most families run one trial per point.
    fn expand(&self, points: Vec<Map<String, Value>>) -> Result<Vec<Map<String, Value>>, ParamError> {
        Ok(points)
    }

    /// For each of the trials `expand` made, the positions (among them) of the trials it
    /// waits for: it is leased only once they succeeded, and fails when one fails for good.
    /// Each must come before it. Most families' trials wait for none.
    fn dependencies(&self, trials: &[Map<String, Value>]) -> Vec<Vec<usize>> {
        vec![Vec::new(); trials.len()]
    }

    /// Whether its trials stop at a rung when the host asks (`TrialContext::pause_at`): a
    /// checkpoint at that step, then the trial ends paused. ASHA and Hyperband need it.
    fn pauses_at_rungs(&self) -> bool {
        false
    }

    /// The key under which a trial fuses with others of its experiment (`fuse` in a
    /// spec): trials with equal keys may train as one stacked model in one process.
    /// `Err` says why this trial can't.
    fn fuse_key(&self, _params: &Value) -> Result<Fusable, String> {
        Err(format!("{} trials do not fuse", self.name()))
    }

    /// The family's report over its finished trials.
    fn report(&self, outcomes: &[TrialOutcome]) -> Result<Report, ReportError>;

    /// Runs one trial to its end.
    #[cfg(feature = "torch")]
    fn run(&self, params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError>;

    /// Runs a group of trials with equal fusion keys, `params[i]` with `ctxs[i]`;
    /// each member's result. Families that fuse train them as one model; the
    /// others run them one after another.
    #[cfg(feature = "torch")]
    fn run_fused(&self, params: &[Value], ctxs: &mut [TrialContext<'_>]) -> Vec<Result<(), TrialError>> {
        params
            .iter()
            .zip(ctxs.iter_mut())
            .map(|(p, ctx)| self.run(p, ctx))
            .collect()
    }
}

/// A trial that can fuse: its key (trials with equal keys train as one stacked
/// model) and roughly how many bytes of device memory each member needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fusable {
    pub key: String,
    pub member_bytes: u64,
}

/// What the platform needs to know of a trial before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrialPlan {
    pub total_steps: u64,
}
