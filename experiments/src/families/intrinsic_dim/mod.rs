//! The `intrinsic_dim` family (CRITERIA.md section 3): accuracy against the
//! dimension d of a random training subspace, and d_int90, the smallest d whose
//! mean eval accuracy reaches 90% of full training's in the same sweep.
//!
//! Trials are `train` trials; `subspace_dim` = 0 is full training (the
//! baseline), any other value trains theta0 + P z with `projection` dense,
//! sparse or fastfood. Each trial logs `num_params` (D).

use ablate_schema::Goal;
use serde_json::{Map, Value};

use crate::error::ParamError;
use crate::families::definition::{Definition, TrialPlan};
use crate::families::train;
use crate::report::{Report, ReportError, TrialOutcome};
#[cfg(feature = "torch")]
use crate::trial::{TrialContext, TrialError};

mod report;

pub use report::analyze;

/// Intrinsic dimension (CRITERIA.md section 3): `train` trials in random subspaces of growing
/// dimension (`subspace_dim`, `projection`) beside full training (`subspace_dim` = 0).
pub struct IntrinsicDim;

impl Definition for IntrinsicDim {
    fn name(&self) -> &'static str {
        "intrinsic_dim"
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
        (ACCURACY, Goal::Maximize)
    }
    fn expand(&self, points: Vec<Map<String, Value>>) -> Result<Vec<Map<String, Value>>, ParamError> {
        Ok(expand(points))
    }
    fn report(&self, outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
        analyze(outcomes)
    }
    #[cfg(feature = "torch")]
    fn run(&self, params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
        train::run(params, ctx)
    }
}

/// The metric the report reads.
pub const ACCURACY: &str = "eval_accuracy";
/// The fraction of full training's accuracy that defines d_int90.
pub const FRACTION: f64 = 0.9;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ModelKey {
    kind: String,
    depth: u64,
    width: u64,
}

impl ModelKey {
    fn of(t: &TrialOutcome) -> ModelKey {
        let kind = t.param_str("model").unwrap_or("mlp").to_string();
        let sized = kind == "mlp" || kind == "resmlp";
        ModelKey {
            depth: if sized {
                t.param_f64("depth").unwrap_or(2.0) as u64
            } else {
                0
            },
            width: if sized {
                t.param_f64("width").unwrap_or(64.0) as u64
            } else {
                0
            },
            kind,
        }
    }

    fn label(&self) -> String {
        if self.width == 0 {
            self.kind.clone()
        } else {
            format!("{} width {} depth {}", self.kind, self.width, self.depth)
        }
    }
}

/// Drops the full-training points that differ only in `projection` (which full training
/// ignores), so a grid over projections runs each baseline once.
pub fn expand(
    points: Vec<serde_json::Map<String, serde_json::Value>>,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut seen = std::collections::HashSet::new();
    points
        .into_iter()
        .filter(|p| {
            if p.get("subspace_dim").and_then(serde_json::Value::as_u64).unwrap_or(0) != 0 {
                return true;
            }
            let mut key = p.clone();
            key.remove("projection");
            seen.insert(serde_json::Value::Object(key).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn trial(width: u32, projection: &str, dim: u64, seed: u64, accuracy: f64) -> TrialOutcome {
        TrialOutcome {
            ordinal: 0,
            state: "succeeded".into(),
            params: json!({"model": "mlp", "width": width, "depth": 2, "subspace_dim": dim,
                "projection": projection, "seed": seed, "dataset": "digits"}),
            metrics: [
                (ACCURACY.to_string(), json!(accuracy)),
                ("num_params".to_string(), json!(8970.0)),
            ]
            .into_iter()
            .collect(),
            series: Default::default(),
            outputs: Default::default(),
        }
    }

    #[test]
    fn d_int90_is_the_first_d_whose_mean_reaches_ninety_percent_of_full_training() {
        let mut outcomes = Vec::new();
        for width in [64, 128] {
            for seed in 0..2 {
                outcomes.push(trial(width, "dense", 0, seed, 0.96 + 0.01 * seed as f64));
                // Threshold 0.9 * 0.965 = 0.8685: d = 80 averages 0.86 (below), d = 160 averages 0.88.
                for (dim, acc) in [(10, 0.3), (40, 0.7), (80, 0.86), (160, 0.88), (320, 0.95)] {
                    let wobble = if seed == 0 { -0.01 } else { 0.01 };
                    outcomes.push(trial(width, "dense", dim, seed, acc + wobble));
                    outcomes.push(trial(width, "fastfood", dim, seed, acc + wobble));
                }
            }
        }
        let report = analyze(&outcomes).unwrap();
        let table = &report.tables[1];
        assert_eq!(table.rows.len(), 4);
        for row in &table.rows {
            assert_eq!(row[5], "160", "{row:?}");
            assert_eq!(row[6], "80 (0.8600)", "{row:?}");
            assert_eq!(row[7], "160 (0.8800)", "{row:?}");
        }
        assert!(report.verdict.holds, "{}", report.to_text());
        // A model that never gets there: the criteria say so rather than guess.
        outcomes
            .retain(|t| !(t.param_f64("subspace_dim") == Some(320.0) || t.param_f64("subspace_dim") == Some(160.0)));
        let report = analyze(&outcomes).unwrap();
        assert!(report.tables[1].rows.iter().all(|r| r[5] == "not reached"));
        assert!(!report.verdict.holds);
    }

    #[test]
    fn full_training_runs_once_whatever_the_projection() {
        let point = |dim: u64, projection: &str, seed: u64| {
            json!({"subspace_dim": dim, "projection": projection, "seed": seed})
                .as_object()
                .unwrap()
                .clone()
        };
        let mut points = Vec::new();
        for projection in ["dense", "sparse", "fastfood"] {
            for seed in 0..2 {
                points.push(point(0, projection, seed));
                points.push(point(10, projection, seed));
            }
        }
        let kept = expand(points);
        assert_eq!(kept.len(), 2 + 6, "one baseline per seed, every subspace trial");
    }

    #[test]
    fn a_sweep_without_subspace_trials_is_refused_with_what_to_add() {
        let err = analyze(&[trial(64, "dense", 0, 0, 0.9)]).unwrap_err();
        assert!(err.0.contains("subspace_dim"), "{err}");
    }
}
