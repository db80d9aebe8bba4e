//! The `critical_batch` family (CRITERIA.md section 2): how many steps a batch
//! size needs to reach a target loss, the fit S(B) = a + b/B, the critical
//! batch size CBS = 1.2 B0 + 0.2 b/a, and the gradient noise scale B_simple.
//!
//! Trials are `train` trials with `ema_decay` (evaluations of the averaged
//! weights) and usually `noise_scale`, under warmup then a constant learning
//! rate, so the loss a run reaches after D examples does not depend on how
//! long it goes on: one run per (model, batch size, lr, seed) serves every data
//! budget. Each trial also carries the sweep's `cbs` table: the reference batch
//! B0 and the budgets in examples (D, 4D, 16D). The target of budget D is the
//! EMA eval loss the reference batch reaches after D examples at its best lr.

use ablate_schema::Goal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ParamError;
use crate::families::definition::{Definition, TrialPlan};
use crate::families::train::{self, TrainParams};
use crate::report::{Report, ReportError, TrialOutcome};
#[cfg(feature = "torch")]
use crate::trial::{TrialContext, TrialError};

mod report;
mod stop_rule;

pub use report::{analyze, loss_at, steps_to};

/// Critical batch size (CRITERIA.md section 2): `train` trials across batch sizes, learning rates and
/// model sizes, each with a `cbs` table (reference batch, data budgets).
pub struct CriticalBatch;

impl Definition for CriticalBatch {
    fn name(&self) -> &'static str {
        "critical_batch"
    }
    fn check_params(&self, params: &Value) -> Result<TrialPlan, ParamError> {
        let (p, _) = split(params)?;
        Ok(TrialPlan {
            total_steps: p.total_steps(),
        })
    }

    fn pauses_at_rungs(&self) -> bool {
        true // its trials are train trials
    }

    fn metrics(&self) -> &'static [&'static str] {
        train::METRICS
    }
    fn series_metrics(&self) -> &'static [&'static str] {
        SERIES
    }
    fn default_objective(&self) -> (&'static str, Goal) {
        (LOSS, Goal::Minimize)
    }
    fn expand(&self, mut points: Vec<Map<String, Value>>) -> Result<Vec<Map<String, Value>>, ParamError> {
        for p in &mut points {
            noise_where_read(p)?;
        }
        stop_rule::expand(points)
    }
    fn dependencies(&self, trials: &[Map<String, Value>]) -> Vec<Vec<usize>> {
        stop_rule::dependencies(trials)
    }
    fn report(&self, outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
        analyze(outcomes)
    }
    #[cfg(feature = "torch")]
    fn run(&self, params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
        let (p, settings) = split(params)?;
        if settings.stop_at_targets {
            return stop_rule::run(&p, &settings, &train_params(params), ctx);
        }
        train::run(&train_params(params), ctx)
    }
    fn fuse_key(&self, params: &Value) -> Result<train::Fusable, String> {
        split(params).map_err(|e| e.to_string())?;
        train::fuse_key(&train_params(params))
    }
    /// Members under the stop rule each end by their own rule, and the reference runs
    /// among them publish their curves, as they do alone.
    #[cfg(feature = "torch")]
    fn run_fused(&self, params: &[Value], ctxs: &mut [TrialContext<'_>]) -> Vec<Result<(), TrialError>> {
        let mut results: Vec<Option<Result<(), TrialError>>> = params.iter().map(|_| None).collect();
        // Each member's parameters and, under the stop rule, its test (read once, here).
        let mut split_params = Vec::with_capacity(params.len());
        let mut stops: Vec<Option<stop_rule::Stop>> = Vec::with_capacity(params.len());
        for (i, value) in params.iter().enumerate() {
            let mut stop = None;
            match split(value) {
                Ok((p, settings)) => {
                    if settings.stop_at_targets {
                        match stop_rule::stop_for(&settings, &mut ctxs[i]) {
                            Ok(test) => stop = Some(test),
                            Err(e) => results[i] = Some(Err(e)),
                        }
                    }
                    split_params.push(Some((p, settings)));
                }
                Err(e) => {
                    results[i] = Some(Err(e.into()));
                    split_params.push(None);
                }
            }
            stops.push(stop);
        }
        // The members that can start; the others failed above.
        let runs: Vec<usize> = (0..params.len()).filter(|&i| results[i].is_none()).collect();
        let train: Vec<Value> = runs.iter().map(|&i| train_params(&params[i])).collect();
        let rules: Vec<Option<train::StopRule<'_>>> = stops
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| runs.contains(i))
            .map(|(_, stop)| {
                stop.as_mut().map(|stop| train::StopRule {
                    metric: LOSS,
                    stop: stop.as_mut(),
                })
            })
            .collect();
        let outcomes = {
            let mut picked: Vec<&mut TrialContext<'_>> = ctxs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| runs.contains(i))
                .map(|(_, c)| c)
                .collect();
            train::run_fused_until(&train, &mut picked, rules)
        };
        for (&i, outcome) in runs.iter().zip(outcomes) {
            results[i] = Some(outcome.and_then(|curve| match &split_params[i] {
                Some((p, settings)) if settings.stop_at_targets => {
                    stop_rule::publish(p, settings, &curve, &mut ctxs[i])
                }
                _ => Ok(()),
            }));
        }
        results
            .into_iter()
            .map(|r| r.expect("every member has a result"))
            .collect()
    }
}

/// The curve the steps-to-target are read from.
pub const LOSS: &str = "eval_loss_ema";
/// The gradient noise scale, logged with every evaluation.
pub const NOISE: &str = "b_simple";
/// The metrics the report reads as whole curves.
pub const SERIES: &[&str] = &[LOSS, NOISE];

/// The `cbs` table every trial of the family carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CbsSettings {
    /// B0: the batch size whose runs set the targets and the linear-scaling line.
    pub reference_batch: u32,
    /// Data budgets in examples, smallest first (D, 4D, 16D).
    pub budgets: Vec<u64>,
    /// The stop rule: a run ends once its curve has reached the target of every budget
    /// (the reference runs once their curve covers the largest budget), not at its last
    /// step. The other runs then wait in the queue for the reference runs of their model.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop_at_targets: bool,
    /// Which runs measure the gradient noise scale (`noise_scale`): every run, or only the
    /// reference batch's, the only runs the report reads B_simple from.
    #[serde(default, skip_serializing_if = "NoiseRuns::is_all")]
    pub noise_runs: NoiseRuns,
    /// Set by the expansion: where a reference run leaves its curve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<String>,
    /// Set by the expansion: a reference run stops at its first evaluation at or past this step
    /// (only when it is its learning rate's one seed, so no mean over seeds is cut short).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cover_steps: Option<u64>,
    /// Set by the expansion: the curves of the reference runs of this run's model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
}

/// Which runs of the sweep measure the gradient noise scale (`cbs.noise_runs`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NoiseRuns {
    /// Every run that sets `noise_scale` measures it (its curve is in the run's metrics).
    #[default]
    All,
    /// Only the runs at the reference batch: the measurement can cost more than the training
    /// of a large batch, and the report reads B_simple along the reference runs alone.
    Reference,
}

impl NoiseRuns {
    fn is_all(&self) -> bool {
        *self == NoiseRuns::All
    }
}

/// Under `cbs.noise_runs = "reference"`, a run at another batch size drops `noise_scale`,
/// so its parameters say what it measures; a reference run must have it.
fn noise_where_read(p: &mut Map<String, Value>) -> Result<(), ParamError> {
    let Some(cbs) = p.get("cbs") else {
        return Ok(()); // split names what is missing
    };
    let settings: CbsSettings =
        ParamError::deserialize(cbs).map_err(|e| ParamError::new(nested(&e.path), e.message))?;
    if settings.noise_runs == NoiseRuns::All {
        return Ok(());
    }
    let reference = p.get("batch_size").and_then(Value::as_u64) == Some(u64::from(settings.reference_batch));
    if !reference {
        p.remove("noise_scale");
    } else if p.get("noise_scale").is_none_or(Value::is_null) {
        return Err(ParamError::new(
            "cbs.noise_runs",
            "names the runs that measure noise_scale, which is not set; set noise_scale or drop noise_runs",
        ));
    }
    Ok(())
}

/// Splits a trial's parameters into its `train` parameters and the `cbs` table, checking both.
pub fn split(params: &Value) -> Result<(TrainParams, CbsSettings), ParamError> {
    let mut train = params.clone();
    let cbs = train.as_object_mut().and_then(|m| m.remove("cbs")).ok_or_else(|| {
        ParamError::new(
            "cbs",
            "missing: a critical_batch trial needs a `cbs` table with reference_batch and budgets \
             (in examples, smallest first, such as [D, 4D, 16D])",
        )
    })?;
    let settings: CbsSettings =
        ParamError::deserialize(&cbs).map_err(|e| ParamError::new(nested(&e.path), e.message))?;
    let p: TrainParams = ParamError::deserialize(&train)?;
    p.check()?;
    if p.ema_decay.is_none() {
        return Err(ParamError::new(
            "ema_decay",
            "missing: critical_batch reads steps-to-target from the averaged weights; set ema_decay (0.99 in the protocol)",
        ));
    }
    if settings.reference_batch == 0 {
        return Err(ParamError::new(
            "cbs.reference_batch",
            "expected a batch size of at least 1",
        ));
    }
    if settings.budgets.is_empty() || settings.budgets[0] == 0 || settings.budgets.windows(2).any(|w| w[1] <= w[0]) {
        return Err(ParamError::new(
            "cbs.budgets",
            "expected positive example counts in increasing order, such as [2048, 8192, 32768]",
        ));
    }
    let largest = *settings.budgets.last().expect("budgets are not empty");
    if p.batch_size == settings.reference_batch && p.total_steps() * u64::from(p.batch_size) < largest {
        return Err(ParamError::new(
            "examples",
            format!(
                "the reference batch sets the target of every budget, so its runs must see at least {largest} \
                 examples; they see {}",
                p.total_steps() * u64::from(p.batch_size)
            ),
        ));
    }
    Ok((p, settings))
}

fn nested(path: &str) -> String {
    if path.is_empty() {
        "cbs".into()
    } else {
        format!("cbs.{path}")
    }
}

/// The parameters a trial trains with: everything but the `cbs` table.
pub fn train_params(params: &Value) -> Value {
    let mut train = params.clone();
    if let Some(m) = train.as_object_mut() {
        m.remove("cbs");
    }
    train
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn outcome(width: u32, batch: u32, curve: Vec<(u64, f64)>) -> TrialOutcome {
        let noise: Vec<(u64, f64)> = curve.iter().map(|&(s, l)| (s, 1.0 / l)).collect();
        TrialOutcome {
            ordinal: 0,
            state: "succeeded".into(),
            params: json!({"width": width, "depth": 2, "model": "mlp", "batch_size": batch, "lr": 0.01,
                "cbs": {"reference_batch": 8, "budgets": [100, 1600]}}),
            metrics: Default::default(),
            series: [(LOSS.to_string(), curve), (NOISE.to_string(), noise)]
                .into_iter()
                .collect(),
            outputs: Default::default(),
        }
    }

    #[test]
    fn interpolation_reads_steps_and_losses_off_a_curve() {
        let curve = [(0, 4.0), (10, 2.0), (20, 1.0)];
        assert_eq!(steps_to(&curve, 3.0), Some(5.0));
        assert_eq!(steps_to(&curve, 1.0), Some(20.0));
        assert_eq!(steps_to(&curve, 0.5), None);
        assert_eq!(loss_at(&curve, 15.0), Some(1.5));
        assert_eq!(loss_at(&curve, 21.0), None);
    }

    #[test]
    fn the_fit_recovers_a_and_b_and_the_cbs_formula() {
        // Piecewise-linear curves through (0, 10), (s1(B), 1), (s2(B), 0.5) and on, with s1 = 20 + 800/B and
        // s2 = 40 + 12800/B: any target's crossing is then an affine mix of s1 and s2, so S(B) = a + b/B exactly.
        let mut outcomes = Vec::new();
        for width in [32, 128] {
            for batch in [8u32, 16, 32, 64, 128] {
                let s1 = (20.0 + 800.0 / batch as f64).round() as u64;
                let s2 = (40.0 + 12800.0 / batch as f64).round() as u64;
                let curve = vec![(0, 10.0), (s1, 1.0), (s2, 0.5), (2 * s2, 0.25), (4 * s2, 0.125)];
                outcomes.push(outcome(width, batch, curve));
            }
        }
        let report = analyze(&outcomes).unwrap();
        let fit = &report.tables[1];
        assert_eq!(fit.rows.len(), 4, "{fit:?}");
        for row in &fit.rows {
            let r2: f64 = row[5].parse().unwrap();
            assert!(r2 > 0.999, "S(B) = a + b/B up to rounding, so R^2 is 1: {row:?}");
        }
        let ratio = report.verdict.criteria[2].measured.unwrap();
        assert!((ratio - 1.0).abs() < 1e-9, "the same curves at both widths: {ratio}");
        let rho = report.verdict.criteria[3].measured.unwrap();
        assert!(rho < -0.9, "B_simple = 1/loss rises as loss falls: {rho}");
    }

    #[test]
    fn cbs_is_where_steps_exceed_linear_scaling_by_a_fifth() {
        // S(B) = a + b/B with a = 10, b = 1000, B0 = 8: CBS = 1.2*8 + 0.2*100 = 29.6,
        // and there S(CBS) = 1.2 * S(B0) * B0 / CBS.
        let (a, b, b0) = (10.0, 1000.0, 8.0);
        let cbs: f64 = 1.2 * b0 + 0.2 * b / a;
        let s = |x: f64| a + b / x;
        assert!((s(cbs) - 1.2 * s(b0) * b0 / cbs).abs() < 1e-9);
        let points: Vec<(f64, f64)> = [8.0, 16.0, 32.0, 64.0].iter().map(|&x| (1.0 / x, s(x))).collect();
        let fit = crate::report::fit_line(&points).unwrap();
        assert!((1.2 * b0 + 0.2 * fit.slope / fit.intercept - 29.6).abs() < 1e-9);
    }

    #[test]
    fn a_trial_needs_its_cbs_table_and_ema() {
        let base = json!({"optimizer": "adamw", "lr": 0.001, "steps": 100, "batch_size": 8, "ema_decay": 0.99,
            "cbs": {"reference_batch": 8, "budgets": [400, 800]}});
        assert!(split(&base).is_ok());
        let mut no_table = base.clone();
        no_table.as_object_mut().unwrap().remove("cbs");
        assert_eq!(split(&no_table).unwrap_err().path, "cbs");
        let mut no_ema = base.clone();
        no_ema.as_object_mut().unwrap().remove("ema_decay");
        assert_eq!(split(&no_ema).unwrap_err().path, "ema_decay");
        let mut short = base.clone();
        short["cbs"]["budgets"] = json!([400, 1600]);
        assert_eq!(
            split(&short).unwrap_err().path,
            "examples",
            "100 steps of 8 see 800 < 1600 examples"
        );
        let mut unordered = base.clone();
        unordered["cbs"]["budgets"] = json!([800, 400]);
        assert_eq!(split(&unordered).unwrap_err().path, "cbs.budgets");
        let mut typo = base;
        typo["cbs"]["refrence_batch"] = json!(8);
        let err = split(&typo).unwrap_err();
        assert!(err.path.starts_with("cbs"), "{err}");
    }

    #[test]
    fn noise_runs_reference_measures_noise_only_where_the_report_reads_it() {
        let point = |batch: u32, noise_runs: &str| {
            json!({"optimizer": "adamw", "lr": 0.001, "steps": 100, "batch_size": batch, "ema_decay": 0.99,
                "noise_scale": {"small": 4, "big": 16},
                "cbs": {"reference_batch": 4, "budgets": [400], "noise_runs": noise_runs}})
            .as_object()
            .unwrap()
            .clone()
        };
        let points = vec![point(4, "reference"), point(8, "reference"), point(8, "all")];
        let expanded = CriticalBatch.expand(points).unwrap();
        assert!(expanded[0].contains_key("noise_scale"), "the reference run measures");
        assert!(!expanded[1].contains_key("noise_scale"), "another batch size does not");
        assert!(expanded[2].contains_key("noise_scale"), "every run measures by default");
        for p in &expanded {
            split(&Value::Object(p.clone())).unwrap();
        }
        let mut bare = point(4, "reference");
        bare.remove("noise_scale");
        assert_eq!(CriticalBatch.expand(vec![bare]).unwrap_err().path, "cbs.noise_runs");
        let wrong = point(4, "some");
        assert_eq!(CriticalBatch.expand(vec![wrong]).unwrap_err().path, "cbs.noise_runs");
    }
}
