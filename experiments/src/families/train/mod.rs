//! The `train` family: an MLP trained with SGD, Adam or AdamW on a built-in
//! data set, with a seeded data order and resumable checkpoints.

use ablate_schema::Goal;
use serde_json::Value;

use crate::error::ParamError;
use crate::families::definition::{Definition, TrialPlan};
pub use crate::nn::{OptimizerName, ProjectionKind};
use crate::report::{Report, ReportError, Table, TrialOutcome, Verdict};
#[cfg(feature = "torch")]
use crate::trial::{TrialContext, TrialError};

mod params;
#[cfg(feature = "torch")]
mod trial;

pub use params::{DatasetName, Divergence, ModelKind, NoiseScale, ReadoutInit, Schedule, TrainParams};
#[cfg(feature = "torch")]
pub use trial::{run, run_fused, run_fused_until, run_until, StopRule};

/// Plain supervised training: one model, one optimizer, one data set.
pub struct Train;

impl Definition for Train {
    fn name(&self) -> &'static str {
        "train"
    }
    fn check_params(&self, params: &Value) -> Result<TrialPlan, ParamError> {
        check(params)
    }

    fn pauses_at_rungs(&self) -> bool {
        true // its trials are train trials
    }

    fn metrics(&self) -> &'static [&'static str] {
        METRICS
    }
    fn default_objective(&self) -> (&'static str, Goal) {
        ("eval_loss", Goal::Minimize)
    }
    fn report(&self, outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
        report(outcomes)
    }
    #[cfg(feature = "torch")]
    fn run(&self, params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
        run(params, ctx)
    }
    fn fuse_key(&self, params: &Value) -> Result<Fusable, String> {
        fuse_key(params)
    }
    #[cfg(feature = "torch")]
    fn run_fused(&self, params: &[Value], ctxs: &mut [TrialContext<'_>]) -> Vec<Result<(), TrialError>> {
        run_fused(params, ctxs)
    }
}

/// Checks a training trial's parameters: the check of every family whose trials are `train` trials.
pub fn check(params: &Value) -> Result<TrialPlan, ParamError> {
    let p: TrainParams = ParamError::deserialize(params)?;
    p.check()?;
    Ok(TrialPlan {
        total_steps: p.total_steps(),
    })
}

/// The key under which a training trial fuses with others (trials of one
/// experiment with equal keys may train as one stacked model), or why it
/// can't. Members may differ in what [`MEMBER_FIELDS`] lists; everything else
/// (model, width, depth, batch size, steps, schedule, data, parametrization)
/// must agree. MLP and residual-MLP classifiers fuse; others do not yet.
pub fn fuse_key(params: &Value) -> Result<Fusable, String> {
    let mut p: TrainParams = ParamError::deserialize(params).map_err(|e| e.to_string())?;
    if !matches!(p.model, ModelKind::Mlp | ModelKind::Resmlp) {
        return Err(format!(
            "{} trials do not fuse yet: fusion covers model = \"mlp\" and \"resmlp\"",
            serde_json::to_value(p.model).unwrap_or_default()
        ));
    }
    let unsupported = [("subspace_dim", p.subspace_dim > 0), ("coord_check", p.coord_check)];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(format!("trials with {field} do not fuse yet; drop it or drop fuse"));
    }
    // What members may differ in, set to one value so the key ignores it.
    p.seed = 0;
    p.lr = Some(1.0);
    p.log2_lr = None;
    p.weight_decay = 0.0;
    p.momentum = 0.0;
    p.beta1 = 0.0;
    p.beta2 = 0.0;
    p.divergence = Divergence::Fail;
    Ok(Fusable {
        key: serde_json::to_string(&p).map_err(|e| e.to_string())?,
        member_bytes: member_bytes(&p),
    })
}

/// What a fused group of MLP trials needs per member, roughly: weights,
/// gradients, two optimizer buffers and temporaries; a step's activations
/// forward and back; and one layer's outputs over the whole training set (the
/// final train loss), all float32.
fn member_bytes(p: &TrainParams) -> u64 {
    let (features, examples): (u64, u64) = match p.dataset {
        DatasetName::Digits => (64, 1797),
        DatasetName::Mnist => (784, 10_000),
        _ => (784, 70_000),
    };
    let (w, d, b) = (u64::from(p.width), u64::from(p.depth), u64::from(p.batch_size));
    let hidden = if p.model == ModelKind::Resmlp {
        d
    } else {
        d.saturating_sub(1)
    };
    let weights = features * w + hidden * w * w + w * 10 + (hidden + 2) * w;
    4 * (6 * weights + 4 * b * w * (d + 2) + 2 * examples * w)
}

pub use crate::families::definition::Fusable;

/// The parameters fused members may differ in: each member's own seed (its
/// init and data order), learning rate and optimizer settings, and what it
/// does when it diverges.
pub const MEMBER_FIELDS: &[&str] = &[
    "seed",
    "lr",
    "log2_lr",
    "weight_decay",
    "momentum",
    "beta1",
    "beta2",
    "divergence",
];

/// The metrics a `train` trial logs.
pub const METRICS: &[&str] = &[
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "train_loss_tail",
    "train_loss_final",
    "diverged",
    "eval_loss_ema",
    "b_simple",
    "grad_noise_trace",
    "grad_sq_norm",
    "num_params",
    "train_flops",
];

/// The `train` report: every trial ranked by its final eval loss; no criteria to judge.
pub fn report(outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
    if outcomes.is_empty() {
        return Err(ReportError("the experiment has no trials to report on".into()));
    }
    let mut ranked: Vec<&TrialOutcome> = outcomes.iter().collect();
    // Succeeded trials first (an infeasible one, which missed a constraint, after them).
    ranked.sort_by(|a, b| {
        let key = |t: &TrialOutcome| t.metric("eval_loss").unwrap_or(f64::INFINITY);
        (a.state == "infeasible")
            .cmp(&(b.state == "infeasible"))
            .then(key(a).total_cmp(&key(b)))
    });
    let cell = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    Ok(Report {
        family: "train".into(),
        title: "training runs".into(),
        summary: format!("{} trials; the train family has no pass criteria", outcomes.len()),
        tables: vec![Table {
            title: "trials by final eval_loss".into(),
            columns: [
                "trial",
                "state",
                "eval_loss",
                "eval_accuracy",
                "train_loss_tail",
                "params",
            ]
            .map(String::from)
            .to_vec(),
            rows: ranked
                .iter()
                .map(|t| {
                    vec![
                        t.ordinal.to_string(),
                        t.state.clone(),
                        cell(t.metric("eval_loss")),
                        cell(t.metric("eval_accuracy")),
                        cell(t.metric("train_loss_tail")),
                        t.params.to_string(),
                    ]
                })
                .collect(),
        }],
        verdict: Verdict::new(Vec::new()),
        figures: Vec::new(),
        importance: Vec::new(),
        pareto: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// The `train` family's check, through the registry.
    fn check(params: &serde_json::Value) -> Result<crate::families::TrialPlan, crate::ParamError> {
        crate::Family::parse("train").unwrap().check_params(params)
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let base = json!({"optimizer": "adam", "log2_lr": -6, "steps": 10});
        assert!(check(&base).is_ok());
        let mut unknown = base.clone();
        unknown["stepz"] = json!(3);
        let err = check(&unknown).unwrap_err();
        assert!(err.message.contains("stepz"), "{err}");
        let mut wrong = base.clone();
        wrong["steps"] = json!("many");
        let err = check(&wrong).unwrap_err();
        assert_eq!(err.path, "steps", "{err}");
        let mut both = base;
        both["lr"] = json!(0.1);
        assert_eq!(check(&both).unwrap_err().path, "lr");
    }
}
