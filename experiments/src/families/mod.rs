//! The registry of experiment families: the only place that lists them.
//!
//! A family is a folder here with a unit type implementing [`Definition`]
//! (its parameters and checks, its expansion, its report and, behind the
//! `torch` feature, its trial), plus one line in [`REGISTRY`].
//!
//! Families build on the substrate ([`crate::nn`]) and on the `train` family's
//! training trial; the substrate never imports a family.

use ablate_schema::Goal;
use serde_json::{Map, Value};

use crate::error::ParamError;
use crate::report::{Report, ReportError, TrialOutcome};
#[cfg(feature = "torch")]
use crate::trial::{TrialContext, TrialError};

pub mod critical_batch;
pub mod definition;
pub mod dsir;
pub mod intrinsic_dim;
pub mod mup_transfer;
pub mod train;

pub use definition::{Definition, Fusable, TrialPlan};

/// Every family, in the order `ablate` lists them.
const REGISTRY: &[&dyn Definition] = &[
    &train::Train,
    &mup_transfer::MupTransfer,
    &critical_batch::CriticalBatch,
    &intrinsic_dim::IntrinsicDim,
    &dsir::Dsir,
];

/// A registered family: a handle on its [`Definition`].
#[derive(Clone, Copy)]
pub struct Family(&'static dyn Definition);

impl Family {
    /// Every registered family.
    pub fn all() -> impl Iterator<Item = Family> {
        REGISTRY.iter().map(|d| Family(*d))
    }

    pub fn parse(name: &str) -> Result<Family, String> {
        Family::all().find(|f| f.name() == name).ok_or_else(|| {
            let known: Vec<&str> = Family::all().map(|f| f.name()).collect();
            format!("unknown family `{name}`, expected one of: {}", known.join(", "))
        })
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// See [`Definition::check_params`].
    pub fn check_params(self, params: &Value) -> Result<TrialPlan, ParamError> {
        self.0.check_params(params)
    }

    /// See [`Definition::metrics`].
    pub fn metrics(self) -> &'static [&'static str] {
        self.0.metrics()
    }

    /// See [`Definition::series_metrics`].
    pub fn series_metrics(self) -> &'static [&'static str] {
        self.0.series_metrics()
    }

    /// See [`Definition::default_objective`].
    pub fn default_objective(self) -> (&'static str, Goal) {
        self.0.default_objective()
    }

    /// See [`Definition::expand`].
    pub fn expand(self, points: Vec<Map<String, Value>>) -> Result<Vec<Map<String, Value>>, ParamError> {
        self.0.expand(points)
    }

    /// See [`Definition::dependencies`].
    pub fn dependencies(self, trials: &[Map<String, Value>]) -> Vec<Vec<usize>> {
        self.0.dependencies(trials)
    }

    /// See [`Definition::pauses_at_rungs`].
    pub fn pauses_at_rungs(self) -> bool {
        self.0.pauses_at_rungs()
    }

    /// See [`Definition::fuse_key`].
    pub fn fuse_key(self, params: &Value) -> Result<Fusable, String> {
        self.0.fuse_key(params)
    }

    /// See [`Definition::report`].
    /// A report needs results: when every trial failed or was cancelled it says so
    /// instead of reporting on nothing.
    pub fn report(self, outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
        if !outcomes.is_empty()
            && outcomes
                .iter()
                .all(|t| matches!(t.state.as_str(), "failed" | "cancelled"))
        {
            return Err(ReportError(format!(
                "every one of its {} trials failed or was cancelled: nothing to report on (their errors say why)",
                outcomes.len()
            )));
        }
        self.0.report(outcomes)
    }

    /// See [`Definition::run`].
    #[cfg(feature = "torch")]
    pub fn run(self, params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
        self.0.run(params, ctx)
    }

    /// See [`Definition::run_fused`].
    #[cfg(feature = "torch")]
    pub fn run_fused(self, params: &[Value], ctxs: &mut [TrialContext<'_>]) -> Vec<Result<(), TrialError>> {
        self.0.run_fused(params, ctxs)
    }
}

impl PartialEq for Family {
    fn eq(&self, other: &Family) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Family {}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Family({})", self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_found_by_its_own_name_and_names_are_unique() {
        let names: Vec<&str> = Family::all().map(Family::name).collect();
        for name in &names {
            assert_eq!(Family::parse(name).unwrap().name(), *name);
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        let err = Family::parse("nope").unwrap_err();
        assert!(err.contains("train, mup_transfer"), "{err}");
    }
}
