//! The `dsir` family (CRITERIA.md section 4): data selection by importance
//! resampling, spread over workers. A spec expands into
//!
//! 1. `features` trials, one per pool shard: each featurizes its JSONL files and
//!    stores the documents' buckets and the shard's bucket counts in the
//!    experiment's object-storage prefix;
//! 2. one `select` trial: it waits for every shard, fits the raw model from the
//!    shards' counts and the target model from the target text, weighs every
//!    document, keeps the weights, resamples k (Gumbel top-k, or deterministic
//!    top-k) and k at random, and writes both selections as JSONL shards with a
//!    manifest; their keys are the trial's outputs (`ablate.outputs` in SQL);
//! 3. `train` trials (when the spec has a `train` table): the same small
//!    language model trained on the DSIR selection and on the random one, for
//!    each `train_seed`, evaluated on the target text.
//!
//! Later stages wait for earlier ones through the queue's dependencies
//! ([`dependencies`]): the coordinator leases the select trial only once every
//! features trial succeeded, the train trials once the select did, and fails
//! them when what they wait for fails for good. `ablate-worker sweep`, which
//! has no queue, runs stages on several threads: there a later stage polls
//! object storage for the earlier one's objects.

pub mod method;
#[cfg(feature = "torch")]
mod trial;

use ablate_schema::Goal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::ParamError;
use crate::families::definition::{Definition, TrialPlan};
use crate::families::train::TrainParams;
use crate::report::{Report, ReportError, TrialOutcome};
#[cfg(feature = "torch")]
use crate::trial::{TrialContext, TrialError};

mod report;

pub use report::analyze;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Features,
    Select,
    Train,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    Dsir,
    Random,
}

impl Selection {
    pub fn name(self) -> &'static str {
        match self {
            Selection::Dsir => "dsir",
            Selection::Random => "random",
        }
    }
}

fn default_text_field() -> String {
    "text".into()
}
fn default_buckets() -> u32 {
    crate::families::dsir::method::BUCKETS
}
fn default_min_words() -> usize {
    crate::families::dsir::method::MIN_WORDS
}
fn default_wait_s() -> u64 {
    3600
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DsirParams {
    /// Set by the expansion, not by a spec.
    #[serde(default)]
    pub stage: Option<Stage>,
    /// The raw pool: JSONL files (`s3://bucket/prefix`, a directory, or one under `$ABLATE_DATA`).
    pub pool: String,
    /// The target text: JSONL, the same kinds of location.
    pub target: String,
    /// How many `features` trials share the pool's files (file i goes to trial i mod shards).
    pub shards: u32,
    /// Set by the expansion: this `features` trial's share of the pool.
    #[serde(default)]
    pub shard: u32,
    /// Documents to select.
    pub k: u64,
    /// Seeds the Gumbel noise and the random baseline.
    #[serde(default)]
    pub seed: u64,
    /// Deterministic top-k instead of sampling.
    #[serde(default)]
    pub top_k: bool,
    #[serde(default = "default_text_field")]
    pub text_field: String,
    #[serde(default = "default_buckets")]
    pub buckets: u32,
    /// Documents of fewer words are never selected.
    #[serde(default = "default_min_words")]
    pub min_words: usize,
    /// Pool documents whose `genre` field is this count as on-target in the report.
    #[serde(default)]
    pub target_genre: Option<String>,
    /// How long a later stage waits for an earlier one.
    #[serde(default = "default_wait_s")]
    pub wait_s: u64,
    /// The language model of the downstream check: `train` parameters without
    /// dataset, data_dir, eval_dir and seed (the text comes from the selections).
    #[serde(default)]
    pub train: Option<Map<String, Value>>,
    /// The downstream model's seed (sweep it for several).
    #[serde(default)]
    pub train_seed: u64,
    /// Set by the expansion: which selection a `train` trial trains on.
    #[serde(default)]
    pub selection: Option<Selection>,
}

/// Data selection with importance resampling (CRITERIA.md section 4): features per pool shard, one
/// selection, and a downstream language model on the DSIR and a random selection.
pub struct Dsir;

impl Definition for Dsir {
    fn name(&self) -> &'static str {
        "dsir"
    }
    fn check_params(&self, params: &Value) -> Result<TrialPlan, ParamError> {
        Ok(TrialPlan {
            total_steps: DsirParams::parse(params)?.total_steps(),
        })
    }
    fn metrics(&self) -> &'static [&'static str] {
        METRICS
    }
    fn default_objective(&self) -> (&'static str, Goal) {
        ("eval_loss", Goal::Minimize)
    }
    fn expand(&self, points: Vec<Map<String, Value>>) -> Result<Vec<Map<String, Value>>, ParamError> {
        expand(points)
    }
    fn dependencies(&self, trials: &[Map<String, Value>]) -> Vec<Vec<usize>> {
        dependencies(trials)
    }
    fn report(&self, outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
        analyze(outcomes)
    }
    #[cfg(feature = "torch")]
    fn run(&self, params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
        trial::run(params, ctx)
    }
}

/// The metrics of the family's trials.
pub const METRICS: &[&str] = &[
    "documents",
    "docs_per_s",
    "kl_raw",
    "kl_dsir",
    "kl_random",
    "kl_reduction_dsir",
    "kl_reduction_random",
    "target_share_dsir",
    "target_share_random",
    "target_base_rate",
    "selected",
    "pool_documents",
    "train_loss",
    "eval_loss",
    "train_loss_tail",
    "train_loss_final",
    "diverged",
    "num_params",
];

/// Where the stages leave their work, under the experiment's prefix.
pub fn features_key(shard: u32) -> String {
    format!("dsir/features/shard-{shard}.bin")
}
pub fn counts_key(shard: u32) -> String {
    format!("dsir/features/shard-{shard}.json")
}
pub fn weights_key(shard: u32) -> String {
    format!("dsir/weights/shard-{shard}.bin")
}
pub fn manifest_key(selection: Selection) -> String {
    format!("dsir/selection/{}/manifest.json", selection.name())
}
pub fn part_key(selection: Selection, shard: u32) -> String {
    format!("dsir/selection/{}/part-{shard}.jsonl", selection.name())
}

impl DsirParams {
    pub fn parse(params: &Value) -> Result<DsirParams, ParamError> {
        let p: DsirParams = ParamError::deserialize(params)?;
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<(), ParamError> {
        if self.shards == 0 {
            return Err(ParamError::new("shards", "expected at least 1 shard"));
        }
        if self.shard >= self.shards {
            return Err(ParamError::new("shard", "expected a shard below `shards`"));
        }
        if self.k == 0 {
            return Err(ParamError::new("k", "expected at least 1 document to select"));
        }
        if self.buckets == 0 || self.buckets > u32::from(u16::MAX) + 1 {
            return Err(ParamError::new("buckets", "expected 1..=65536 buckets"));
        }
        for (field, value) in [("pool", &self.pool), ("target", &self.target)] {
            if value.trim().is_empty() {
                return Err(ParamError::new(
                    field,
                    "expected a location: s3://bucket/prefix or a directory",
                ));
            }
        }
        if let Some(train) = &self.train {
            self.lm_params(train, "/data/train", "/data/eval")
                .map_err(|e| ParamError::new(format!("train.{}", e.path).trim_end_matches('.'), e.message))?;
        }
        if self.stage == Some(Stage::Train) && (self.train.is_none() || self.selection.is_none()) {
            return Err(ParamError::new(
                "train",
                "a train stage needs the `train` table and a selection",
            ));
        }
        Ok(())
    }

    /// The downstream model's `train` parameters, reading text from the given directories.
    pub fn lm_params(&self, train: &Map<String, Value>, data_dir: &str, eval_dir: &str) -> Result<Value, ParamError> {
        for owned in ["dataset", "data_dir", "eval_dir", "seed"] {
            if train.contains_key(owned) {
                return Err(ParamError::new(
                    owned,
                    "set by the dsir family (the selected text and the target); leave it out",
                ));
            }
        }
        let mut params = train.clone();
        params.insert("dataset".into(), json!("text"));
        params.insert("data_dir".into(), json!(data_dir));
        params.insert("eval_dir".into(), json!(eval_dir));
        params.insert("seed".into(), json!(self.train_seed));
        let value = Value::Object(params);
        let p: TrainParams = ParamError::deserialize(&value)?;
        p.check()?;
        Ok(value)
    }

    pub fn total_steps(&self) -> u64 {
        match (self.stage, &self.train) {
            (Some(Stage::Train), Some(train)) => self
                .lm_params(train, "/d", "/e")
                .ok()
                .and_then(|v| serde_json::from_value::<TrainParams>(v).ok())
                .map_or(1, |p| p.total_steps()),
            _ => 1,
        }
    }
}

/// Turns the sweep's points into the stages: `shards` features trials and one select
/// trial (from the first point), then a DSIR and a random train trial per point.
pub fn expand(points: Vec<Map<String, Value>>) -> Result<Vec<Map<String, Value>>, ParamError> {
    let Some(first) = points.first() else {
        return Ok(points);
    };
    let shards = first.get("shards").and_then(Value::as_u64).unwrap_or(0);
    let with = |p: &Map<String, Value>, extra: Value| {
        let mut p = p.clone();
        if let Value::Object(extra) = extra {
            p.extend(extra);
        }
        p
    };
    let mut out: Vec<Map<String, Value>> = (0..shards)
        .map(|shard| with(first, json!({"stage": "features", "shard": shard})))
        .collect();
    out.push(with(first, json!({"stage": "select"})));
    for p in &points {
        if p.contains_key("train") {
            for selection in ["dsir", "random"] {
                out.push(with(p, json!({"stage": "train", "selection": selection})));
            }
        }
    }
    Ok(out)
}

/// The stages' order: the select trial waits for every features trial, each train trial for
/// the select trial.
pub fn dependencies(trials: &[Map<String, Value>]) -> Vec<Vec<usize>> {
    let stage = |t: &Map<String, Value>| t.get("stage").and_then(Value::as_str).map(String::from);
    let positions = |name: &str| -> Vec<usize> {
        (0..trials.len())
            .filter(|&i| stage(&trials[i]).as_deref() == Some(name))
            .collect()
    };
    let (features, select) = (positions("features"), positions("select"));
    trials
        .iter()
        .map(|t| match stage(t).as_deref() {
            Some("select") => features.clone(),
            Some("train") => select.clone(),
            _ => Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Map<String, Value> {
        json!({"pool": "dsir/pool", "target": "dsir/target/news.jsonl", "shards": 3, "k": 10,
            "train": {"model": "gpt", "optimizer": "adamw", "lr": 0.001, "steps": 10, "width": 32, "heads": 2,
                "depth": 1, "context": 16}})
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn a_sweep_expands_into_features_select_and_paired_train_trials() {
        let mut seeds = Vec::new();
        for s in 0..2 {
            let mut p = base();
            p.insert("train_seed".into(), json!(s));
            seeds.push(p);
        }
        let trials = expand(seeds).unwrap();
        let stages: Vec<(String, Option<u64>, Option<String>)> = trials
            .iter()
            .map(|t| {
                (
                    t["stage"].as_str().unwrap().to_string(),
                    t.get("shard").and_then(Value::as_u64),
                    t.get("selection").and_then(|s| s.as_str()).map(String::from),
                )
            })
            .collect();
        assert_eq!(stages.len(), 3 + 1 + 4);
        assert_eq!(stages[0], ("features".into(), Some(0), None));
        assert_eq!(stages[3], ("select".into(), None, None));
        assert_eq!(stages[4].2.as_deref(), Some("dsir"));
        assert_eq!(stages[5].2.as_deref(), Some("random"));
        for t in &trials {
            DsirParams::parse(&Value::Object(t.clone())).unwrap();
        }
        let deps = dependencies(&trials);
        assert_eq!(deps[0], Vec::<usize>::new());
        assert_eq!(deps[3], vec![0, 1, 2]);
        assert!(deps[4..].iter().all(|d| d == &vec![3]), "{deps:?}");
    }

    #[test]
    fn bad_parameters_name_their_field() {
        let mut p = base();
        p.insert("k".into(), json!(0));
        assert_eq!(DsirParams::parse(&Value::Object(p)).unwrap_err().path, "k");
        let mut p = base();
        p["train"]["dataset"] = json!("digits");
        let err = DsirParams::parse(&Value::Object(p)).unwrap_err();
        assert_eq!(err.path, "train.dataset", "{err}");
        let mut p = base();
        p["train"]["stepz"] = json!(3);
        let err = DsirParams::parse(&Value::Object(p)).unwrap_err();
        assert!(err.path.starts_with("train") && err.message.contains("stepz"), "{err}");
    }
}
