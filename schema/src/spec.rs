//! Sweep specs: the TOML or YAML file a researcher submits.
//!
//! Parsing refuses unknown fields and wrong types with the path of the bad
//! field. Family-specific checks of the trial parameters live with the family
//! (in `ablate-experiments`); expansion into trials lives with the searchers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::limits::Limits;

/// A spec that can't be accepted, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    /// Dotted path of the bad field, such as `sweep.params.width[2]`; `.` for the whole spec.
    pub path: String,
    /// What was wrong and what was expected.
    pub message: String,
}

impl SpecError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        let path = path.into();
        SpecError {
            path: if path.is_empty() { ".".to_string() } else { path },
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    Toml,
    Yaml,
}

impl SpecFormat {
    /// Picks the format from a file name: `.yaml`/`.yml` are YAML, anything else TOML.
    pub fn from_path(path: &str) -> SpecFormat {
        if path.ends_with(".yaml") || path.ends_with(".yml") {
            SpecFormat::Yaml
        } else {
            SpecFormat::Toml
        }
    }

    pub fn parse(text: &str) -> Option<SpecFormat> {
        match text {
            "toml" | "" => Some(SpecFormat::Toml),
            "yaml" | "yml" => Some(SpecFormat::Yaml),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SpecFormat::Toml => "toml",
            SpecFormat::Yaml => "yaml",
        }
    }
}

/// Applies `path=value` overrides (`base.steps=4`, `sweep.params.width=[64, 128]`,
/// `base.train.steps=10`) to a spec's text; returns the result as YAML. A value
/// is read as TOML (a number, a boolean, a quoted string, an array, an inline
/// table) and otherwise taken as a bare string. Missing tables on the path are
/// made; the result is checked like any spec when it is parsed.
pub fn apply_overrides(text: &str, format: SpecFormat, sets: &[String]) -> Result<String, SpecError> {
    let mut spec: serde_json::Value = match format {
        SpecFormat::Toml => toml::from_str(text).map_err(|e| SpecError::new("", toml_message(&e)))?,
        SpecFormat::Yaml => serde_norway::from_str(text).map_err(|e| SpecError::new("", e.to_string()))?,
    };
    for set in sets {
        let (path, raw) = set.split_once('=').ok_or_else(|| {
            SpecError::new(
                "",
                format!("override `{set}`: expected PATH=VALUE, such as base.steps=4"),
            )
        })?;
        let path = path.trim();
        let value: serde_json::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut table) => serde_json::to_value(table.remove("v")).unwrap_or_default(),
            Err(_) => serde_json::Value::String(raw.trim().to_string()),
        };
        let keys: Vec<&str> = path.split('.').collect();
        if path.is_empty() || keys.iter().any(|k| k.is_empty()) {
            return Err(SpecError::new(
                path,
                format!("override `{set}`: the path must be dotted names"),
            ));
        }
        let mut node = &mut spec;
        for (i, key) in keys.iter().enumerate() {
            let table = node
                .as_object_mut()
                .ok_or_else(|| SpecError::new(keys[..i].join("."), format!("override `{set}`: not a table")))?;
            if i + 1 == keys.len() {
                table.insert(key.to_string(), value.clone());
                break;
            }
            node = table
                .entry(key.to_string())
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
        }
    }
    serde_norway::to_string(&spec).map_err(|e| SpecError::new("", e.to_string()))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub name: String,
    pub family: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Parameters shared by every trial.
    #[serde(default)]
    pub base: BTreeMap<String, Value>,
    pub sweep: Sweep,
    #[serde(default)]
    pub objective: Option<Objective>,
    /// How many times a trial may be leased before it is failed for good.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// What the trials need of a worker.
    #[serde(default, skip_serializing_if = "Resources::is_default")]
    pub resources: Resources,
    /// The experiment's weight in the fair share of slots (default 1): with
    /// priority 2 it gets twice the slots of a priority-1 experiment of the same user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<f64>,
    /// Trains this many trials whose shapes agree as one stacked model in one
    /// process (`fuse = 8`), or as many as fit the device (`fuse = "auto"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse: Option<Fuse>,
}

/// How many trials a fused group holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FuseText", into = "FuseText")]
pub enum Fuse {
    Members(u32),
    /// As many as fit the device's memory (at most [`MAX_FUSE`]).
    Auto,
}

/// The most trials one fused group may hold.
pub const MAX_FUSE: u32 = 64;

/// A group's size as a spec writes it: a number or "auto".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum FuseText {
    Members(i64),
    Word(String),
}

impl TryFrom<FuseText> for Fuse {
    type Error = String;
    fn try_from(text: FuseText) -> Result<Fuse, String> {
        match text {
            FuseText::Members(n) if (1..=i64::from(MAX_FUSE)).contains(&n) => Ok(Fuse::Members(n as u32)),
            FuseText::Members(n) => Err(format!(
                "{n} trials per group; expected 1 to {MAX_FUSE}, or \"auto\" (as many as fit the device)"
            )),
            FuseText::Word(w) if w == "auto" => Ok(Fuse::Auto),
            FuseText::Word(w) => Err(format!(
                "`{w}`: expected a number of trials per group (such as 8) or \"auto\""
            )),
        }
    }
}

impl From<Fuse> for FuseText {
    fn from(fuse: Fuse) -> FuseText {
        match fuse {
            Fuse::Members(n) => FuseText::Members(i64::from(n)),
            Fuse::Auto => FuseText::Word("auto".into()),
        }
    }
}

/// What a spec's trials need of the worker that runs them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Runs each trial in a fresh process instead of the slot's warm one (for
    /// trials that change process-wide state).
    #[serde(default)]
    pub fresh_process: bool,
    /// At most this many of the experiment's trials run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Only workers of this pool (`ablate-worker daemon --pool`) lease its trials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Only workers with all these labels (`--label key=value`) lease its trials.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// GPUs each trial gets together, in one process (`CUDA_VISIBLE_DEVICES`
    /// set to them); only a worker with that many free GPUs leases it. 1 when
    /// left out; CPU workers lease only trials that ask for at most 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_trial: Option<u32>,
}

impl Resources {
    fn is_default(&self) -> bool {
        *self == Resources::default()
    }
}

/// The most GPUs one trial may ask for: all of one large host's.
pub const MAX_GPUS_PER_TRIAL: u32 = 16;

fn default_max_attempts() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Searcher {
    Grid,
    Random,
    /// Asynchronous successive halving: every configuration trains to the
    /// first rung, the best `1/reduction_factor` of each rung go on to the next.
    Asha,
    /// Brackets of ASHA, each starting at a larger first rung.
    Hyperband,
    /// The tree-structured Parzen estimator: `n_startup` random trials, then each new
    /// trial proposed from the finished ones as they finish.
    Tpe,
    /// Population-based training: every `interval` steps the worst members copy a better
    /// one's checkpoint and perturb its hyperparameters.
    Pbt,
}

impl Searcher {
    pub fn as_str(self) -> &'static str {
        match self {
            Searcher::Grid => "grid",
            Searcher::Random => "random",
            Searcher::Asha => "asha",
            Searcher::Hyperband => "hyperband",
            Searcher::Tpe => "tpe",
            Searcher::Pbt => "pbt",
        }
    }
}

/// `[sweep.asha]` and `[sweep.hyperband]`: the rungs, in training steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rungs {
    /// The first rung: every configuration trains this many steps.
    pub min_steps: u64,
    /// The whole run; the trials' `steps` is set to it.
    pub max_steps: u64,
    /// Each rung is this many times the one below, and keeps the best 1 in this many (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduction_factor: Option<u64>,
    /// Hyperband only: how many brackets (default: one per rung, the last training every
    /// configuration fully).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brackets: Option<u32>,
}

/// `[sweep.tpe]`: how many trials in all, how many random ones first, and the seed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tpe {
    /// Trials in all: the random start, then one proposed as each trial finishes.
    pub trials: u32,
    /// Random trials before the estimator proposes any (default 10); also how many run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_startup: Option<u32>,
    /// The same seed gives the same trials on one worker slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Tpe {
    pub fn n_startup(&self) -> u32 {
        self.n_startup.unwrap_or(10).min(self.trials)
    }

    /// The proposals owed now to a sweep that holds `total` trials, `finished` of them
    /// ended: it holds `n_startup` plus one per ended trial, up to `trials`.
    pub fn owed(&self, finished: u64, total: u64) -> u64 {
        u64::from(self.trials)
            .min(u64::from(self.n_startup()) + finished)
            .saturating_sub(total)
    }
}

/// `[sweep.pbt]`: the population and how it evolves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pbt {
    /// Members, drawn at random from the swept domains.
    pub population: u32,
    /// Steps between generations: each member stops there (checkpointed) until all have.
    pub interval: u64,
    /// The bottom fraction that copies a member of the top fraction (default 0.25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantile: Option<f64>,
    /// A copied member's numeric hyperparameters are multiplied by one of these (default [0.8, 1.2]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factors: Option<Vec<f64>>,
    /// Seeds the population and every perturbation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Pbt {
    pub fn quantile(&self) -> f64 {
        self.quantile.unwrap_or(0.25)
    }

    pub fn factors(&self) -> Vec<f64> {
        self.factors.clone().unwrap_or_else(|| vec![0.8, 1.2])
    }
}

/// The rung ladder of an ASHA or Hyperband sweep. Bracket `b`'s rungs are
/// `min_steps * rf^(b + k)` below `max_steps`; configuration `i` is in bracket
/// `i % brackets`. A trial pauses at each rung of its bracket (checkpointed);
/// it goes on when it is among the best `1/rf` of the trials that reached that
/// rung so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ladder {
    pub min_steps: u64,
    pub max_steps: u64,
    pub reduction_factor: u64,
    pub brackets: u32,
}

impl Ladder {
    /// The rung after `step` in `bracket`, or `None` when the next stop is the end of the run.
    pub fn rung_after(&self, bracket: u32, step: u64) -> Option<u64> {
        let mut rung = self.min_steps;
        for _ in 0..bracket {
            rung = rung.saturating_mul(self.reduction_factor);
        }
        while rung <= step {
            rung = rung.saturating_mul(self.reduction_factor);
        }
        (rung < self.max_steps).then_some(rung)
    }

    /// Every rung of `bracket`, lowest first.
    pub fn rungs(&self, bracket: u32) -> Vec<u64> {
        std::iter::successors(self.rung_after(bracket, 0), |&r| self.rung_after(bracket, r)).collect()
    }

    /// The bracket of the configuration at `ordinal`.
    pub fn bracket_of(&self, ordinal: usize) -> u32 {
        (ordinal % self.brackets.max(1) as usize) as u32
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    pub searcher: Searcher,
    /// Parameter name to its domain; see [`ParamDomain`].
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
    /// Number of trials the random searcher draws.
    #[serde(default)]
    pub samples: Option<u32>,
    /// Seed of the random searcher; the same seed gives the same trials.
    #[serde(default)]
    pub seed: Option<u64>,
    /// The rungs of `searcher = "asha"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asha: Option<Rungs>,
    /// The rungs of `searcher = "hyperband"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyperband: Option<Rungs>,
    /// The budget of `searcher = "tpe"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpe: Option<Tpe>,
    /// The population of `searcher = "pbt"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pbt: Option<Pbt>,
}

impl Sweep {
    /// Whether the configurations are drawn at random (`samples` of them) rather than
    /// the grid: `random`, and `asha` or `hyperband` given `samples`.
    pub fn draws(&self) -> bool {
        match self.searcher {
            Searcher::Grid => false,
            Searcher::Random => true,
            Searcher::Asha | Searcher::Hyperband => self.samples.is_some(),
            Searcher::Tpe | Searcher::Pbt => true,
        }
    }

    /// Whether trials stop at steps the coordinator sets (ASHA and Hyperband rungs, PBT generations).
    pub fn pauses(&self) -> bool {
        self.ladder().is_some() || self.pbt.is_some()
    }

    /// The rung ladder of an ASHA or Hyperband sweep (checked at parse time).
    pub fn ladder(&self) -> Option<Ladder> {
        let (rungs, hyperband) = match self.searcher {
            Searcher::Asha => (self.asha.as_ref()?, false),
            Searcher::Hyperband => (self.hyperband.as_ref()?, true),
            _ => return None,
        };
        let rf = rungs.reduction_factor.unwrap_or(3);
        let brackets = if hyperband {
            rungs.brackets.unwrap_or_else(|| {
                // One bracket per rung of the first, plus the one that trains fully.
                let mut n = 1;
                let mut r = rungs.min_steps;
                while r < rungs.max_steps {
                    n += 1;
                    r = r.saturating_mul(rf);
                }
                n.max(1)
            })
        } else {
            1
        };
        Some(Ladder {
            min_steps: rungs.min_steps,
            max_steps: rungs.max_steps,
            reduction_factor: rf,
            brackets,
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    Minimize,
    Maximize,
}

impl Goal {
    pub fn as_str(self) -> &'static str {
        match self {
            Goal::Minimize => "minimize",
            Goal::Maximize => "maximize",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    pub metric: String,
    pub goal: Goal,
}

/// The values a swept parameter takes.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamDomain {
    /// `[a, b, c]`: exactly these values.
    List(Vec<Value>),
    /// `{ range = [lo, hi], step = s }`: lo, lo+s, ... up to hi inclusive.
    Range { lo: f64, hi: f64, step: f64 },
    /// `{ uniform = [lo, hi] }`: random searcher only.
    Uniform { lo: f64, hi: f64 },
    /// `{ log_uniform = [lo, hi] }`: random searcher only, lo > 0.
    LogUniform { lo: f64, hi: f64 },
}

impl ParamDomain {
    /// Reads one entry of `sweep.params`, naming `path` in any error.
    pub fn from_value(path: &str, value: &Value) -> Result<ParamDomain, SpecError> {
        const EXPECTED: &str = "expected a list of values, { range = [lo, hi], step = s }, { uniform = [lo, hi] } or { log_uniform = [lo, hi] }";
        match value {
            Value::Array(items) if items.is_empty() => Err(SpecError::new(
                path,
                "empty list: give at least one value to sweep over",
            )),
            Value::Array(items) => Ok(ParamDomain::List(items.clone())),
            Value::Object(map) => {
                let pair = |key: &str| -> Result<(f64, f64), SpecError> {
                    let field = format!("{path}.{key}");
                    let v = map.get(key).ok_or_else(|| SpecError::new(path, EXPECTED))?;
                    match v.as_array().map(|a| a.as_slice()) {
                        Some([lo, hi]) => match (lo.as_f64(), hi.as_f64()) {
                            (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
                            (Some(_), Some(_)) => Err(SpecError::new(field, "lower bound is above the upper bound")),
                            _ => Err(SpecError::new(field, "expected two numbers [lo, hi]")),
                        },
                        _ => Err(SpecError::new(field, "expected two numbers [lo, hi]")),
                    }
                };
                let allowed: &[&str] = if map.contains_key("range") {
                    &["range", "step"]
                } else if map.contains_key("uniform") {
                    &["uniform"]
                } else if map.contains_key("log_uniform") {
                    &["log_uniform"]
                } else {
                    return Err(SpecError::new(path, EXPECTED));
                };
                if let Some(extra) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
                    return Err(SpecError::new(
                        format!("{path}.{extra}"),
                        format!("unknown field, expected one of: {}", allowed.join(", ")),
                    ));
                }
                if map.contains_key("range") {
                    let (lo, hi) = pair("range")?;
                    let step = match map.get("step") {
                        None => 1.0,
                        Some(v) => v
                            .as_f64()
                            .ok_or_else(|| SpecError::new(format!("{path}.step"), "expected a number"))?,
                    };
                    if step <= 0.0 || !step.is_finite() {
                        return Err(SpecError::new(format!("{path}.step"), "expected a positive step"));
                    }
                    Ok(ParamDomain::Range { lo, hi, step })
                } else if map.contains_key("uniform") {
                    let (lo, hi) = pair("uniform")?;
                    Ok(ParamDomain::Uniform { lo, hi })
                } else {
                    let (lo, hi) = pair("log_uniform")?;
                    if lo <= 0.0 {
                        return Err(SpecError::new(
                            format!("{path}.log_uniform"),
                            "bounds of a log-uniform domain must be positive",
                        ));
                    }
                    Ok(ParamDomain::LogUniform { lo, hi })
                }
            }
            _ => Err(SpecError::new(path, EXPECTED)),
        }
    }

    /// How many values a grid domain holds, without listing them; `None` for a continuous one.
    pub fn grid_len(&self) -> Option<u64> {
        match self {
            ParamDomain::List(items) => Some(items.len() as u64),
            // Saturates for absurd ranges, which the trial limit then refuses.
            ParamDomain::Range { lo, hi, step } => {
                Some((((hi - lo) / step + 1e-9).floor().max(0.0) as u64).saturating_add(1))
            }
            ParamDomain::Uniform { .. } | ParamDomain::LogUniform { .. } => None,
        }
    }

    /// Value `i` of a grid domain (`i < grid_len`), or `None` for a continuous one.
    pub fn grid_value(&self, i: u64) -> Option<Value> {
        match self {
            ParamDomain::List(items) => items.get(i as usize).cloned(),
            ParamDomain::Range { lo, step, .. } => {
                let x = lo + step * i as f64;
                Some(if lo.fract() == 0.0 && step.fract() == 0.0 {
                    Value::from(x as i64)
                } else {
                    Value::from(x)
                })
            }
            ParamDomain::Uniform { .. } | ParamDomain::LogUniform { .. } => None,
        }
    }

    /// The finite values of a grid domain, or `None` for a continuous one.
    /// Call it only on a domain whose [`ParamDomain::grid_len`] was checked.
    pub fn grid_values(&self) -> Option<Vec<Value>> {
        let len = self.grid_len()?;
        (0..len).map(|i| self.grid_value(i)).collect()
    }
}

impl SweepSpec {
    /// Parses a spec within the default [`Limits`].
    pub fn parse(text: &str, format: SpecFormat) -> Result<SweepSpec, SpecError> {
        SweepSpec::parse_within(text, format, &Limits::default())
    }

    /// Parses a spec, refusing unknown fields and wrong types with the field's path,
    /// and anything over `limits` (checked before any trial is listed).
    pub fn parse_within(text: &str, format: SpecFormat, limits: &Limits) -> Result<SweepSpec, SpecError> {
        if text.len() > limits.max_spec_bytes {
            return Err(SpecError::new(
                "",
                format!(
                    "the spec is {} bytes, over the limit of {}; sweep fewer values or split it",
                    text.len(),
                    limits.max_spec_bytes
                ),
            ));
        }
        let spec: SweepSpec = match format {
            SpecFormat::Toml => {
                let de =
                    toml::Deserializer::parse(text).map_err(|e| SpecError::new(String::new(), toml_message(&e)))?;
                serde_path_to_error::deserialize(de).map_err(|e| {
                    let path = e.path().to_string();
                    let inner = e.into_inner();
                    SpecError::new(path, toml_message(&inner))
                })?
            }
            SpecFormat::Yaml => {
                let de = serde_norway::Deserializer::from_str(text);
                serde_path_to_error::deserialize(de).map_err(|e| {
                    let path = e.path().to_string();
                    SpecError::new(path, e.into_inner().to_string())
                })?
            }
        };
        spec.check_shape(limits)?;
        Ok(spec)
    }

    /// Checks that do not depend on the family: names, the sweep's domains.
    fn check_shape(&self, limits: &Limits) -> Result<(), SpecError> {
        if self.name.trim().is_empty() {
            return Err(SpecError::new("name", "empty name: give the sweep a name"));
        }
        limits.check_name("name", &self.name, limits.max_name_chars)?;
        limits.check_name("family", &self.family, limits.max_name_chars)?;
        if let Some(description) = &self.description {
            limits.check_string("description", description, limits.max_string_chars)?;
        }
        if let Some(objective) = &self.objective {
            limits.check_name("objective.metric", &objective.metric, limits.max_string_chars)?;
        }
        let params = self.base.len() + self.sweep.params.len();
        if params > limits.max_params {
            return Err(SpecError::new(
                "sweep.params",
                format!(
                    "{params} parameters in [base] and [sweep.params], over the limit of {}",
                    limits.max_params
                ),
            ));
        }
        for (name, value) in &self.base {
            let path = format!("base.{name}");
            limits.check_name(&path, name, limits.max_string_chars)?;
            limits.check_value(&path, value)?;
        }
        if self.max_attempts == 0 {
            return Err(SpecError::new("max_attempts", "expected at least 1"));
        }
        if let Some(p) = self.priority {
            if !(p.is_finite() && p > 0.0 && p <= 1000.0) {
                return Err(SpecError::new(
                    "priority",
                    format!("{p}: expected a weight above 0 and at most 1000, such as 2"),
                ));
            }
        }
        if let Some(pool) = &self.resources.pool {
            if pool.trim().is_empty() {
                return Err(SpecError::new(
                    "resources.pool",
                    "empty; name a pool, such as \"a100\", or leave it out",
                ));
            }
            limits.check_name("resources.pool", pool, limits.max_string_chars)?;
        }
        for (key, value) in &self.resources.labels {
            let path = format!("resources.labels.{key}");
            limits.check_name(&path, key, limits.max_string_chars)?;
            limits.check_name(&path, value, limits.max_string_chars)?;
        }
        if self.resources.max_concurrent == Some(0) {
            return Err(SpecError::new(
                "resources.max_concurrent",
                "expected at least 1 (or leave it out: no cap)",
            ));
        }
        if let Some(gpus) = self.resources.gpus_per_trial {
            if !(1..=MAX_GPUS_PER_TRIAL).contains(&gpus) {
                return Err(SpecError::new(
                    "resources.gpus_per_trial",
                    format!("{gpus} GPUs per trial; expected 1 to {MAX_GPUS_PER_TRIAL} (one host's GPUs)"),
                ));
            }
        }
        if self.fuse.is_some() && self.sweep.pauses() {
            return Err(SpecError::new(
                "fuse",
                format!(
                    "trials of the {} searcher pause at rungs, and paused trials do not fuse yet; \
                     drop fuse, or search with grid, random or tpe",
                    self.sweep.searcher.as_str()
                ),
            ));
        }
        if self.fuse.is_some() && self.resources.gpus_per_trial.is_some_and(|g| g > 1) {
            return Err(SpecError::new(
                "fuse",
                "fused trials share one device; drop fuse or resources.gpus_per_trial",
            ));
        }
        if self.sweep.params.is_empty() {
            return Err(SpecError::new(
                "sweep.params",
                "empty sweep: add at least one swept parameter, e.g. params.seed = [0]",
            ));
        }
        let mut trials: u64 = 1;
        for (name, value) in &self.sweep.params {
            let path = format!("sweep.params.{name}");
            limits.check_name(&path, name, limits.max_string_chars)?;
            limits.check_value(&path, value)?;
            let domain = ParamDomain::from_value(&path, value)?;
            if let Some(len) = domain.grid_len() {
                if !self.sweep.draws() {
                    trials = trials.saturating_mul(len);
                    if trials > limits.max_trials {
                        return Err(SpecError::new(
                            path,
                            format!(
                                "the grid reaches {} trials here ({len} values of `{name}`), over the limit of {} \
                                 trials per experiment; sweep fewer values or split the sweep",
                                if trials == u64::MAX {
                                    "more than 10^19".to_string()
                                } else {
                                    trials.to_string()
                                },
                                limits.max_trials
                            ),
                        ));
                    }
                }
            }
            if !self.sweep.draws() && domain.grid_len().is_none() {
                let message = if self.sweep.searcher == Searcher::Grid {
                    "a continuous domain needs searcher = \"random\"; the grid searcher takes lists and ranges"
                        .to_string()
                } else {
                    format!(
                        "a continuous domain needs samples = N in [sweep] (the {} searcher then draws N configurations); \
                         without it, it runs the grid of lists and ranges",
                        self.sweep.searcher.as_str()
                    )
                };
                return Err(SpecError::new(path, message));
            }
            if self.base.contains_key(name) {
                return Err(SpecError::new(
                    path,
                    format!("`{name}` is set in [base] too; keep it in one place"),
                ));
            }
        }
        self.check_rungs()?;
        self.check_tpe(limits)?;
        self.check_pbt(limits)?;
        if self.sweep.draws() && u64::from(self.sweep.samples.unwrap_or(0)) > limits.max_trials {
            return Err(SpecError::new(
                "sweep.samples",
                format!(
                    "{} samples, over the limit of {} trials per experiment; split the sweep",
                    self.sweep.samples.unwrap_or(0),
                    limits.max_trials
                ),
            ));
        }
        match (self.sweep.searcher, self.sweep.samples) {
            (Searcher::Random, None) | (_, Some(0)) => Err(SpecError::new(
                "sweep.samples",
                format!(
                    "the {} searcher needs samples = N with N >= 1",
                    self.sweep.searcher.as_str()
                ),
            )),
            (Searcher::Grid, Some(_)) => Err(SpecError::new(
                "sweep.samples",
                "samples applies to searcher = \"random\", \"asha\" or \"hyperband\"; the grid runs every combination",
            )),
            _ => Ok(()),
        }
    }

    /// The `[sweep.asha]` / `[sweep.hyperband]` table: given exactly for its searcher, rungs that make sense,
    /// and `steps` left to it.
    fn check_rungs(&self) -> Result<(), SpecError> {
        let sweep = &self.sweep;
        for (name, table, searcher) in [
            ("asha", &sweep.asha, Searcher::Asha),
            ("hyperband", &sweep.hyperband, Searcher::Hyperband),
        ] {
            match (table, sweep.searcher == searcher) {
                (Some(_), false) => {
                    return Err(SpecError::new(
                        format!("sweep.{name}"),
                        format!(
                            "[sweep.{name}] applies to searcher = \"{name}\" only; this sweep's searcher is \"{}\"",
                            sweep.searcher.as_str()
                        ),
                    ))
                }
                (None, true) => {
                    return Err(SpecError::new(
                        format!("sweep.{name}"),
                        format!(
                            "searcher = \"{name}\" needs a [sweep.{name}] table: min_steps = N (the first rung), \
                             max_steps = M (the whole run), and optionally reduction_factor = 3"
                        ),
                    ))
                }
                (Some(rungs), true) => {
                    let path = |field: &str| format!("sweep.{name}.{field}");
                    if rungs.min_steps == 0 {
                        return Err(SpecError::new(path("min_steps"), "expected at least 1 step"));
                    }
                    if rungs.max_steps <= rungs.min_steps {
                        return Err(SpecError::new(
                            path("max_steps"),
                            format!(
                                "{} is not above min_steps ({}): the first rung must come before the end of the run",
                                rungs.max_steps, rungs.min_steps
                            ),
                        ));
                    }
                    if rungs.max_steps > 1 << 40 {
                        return Err(SpecError::new(path("max_steps"), "expected at most 2^40 steps"));
                    }
                    if let Some(rf) = rungs.reduction_factor {
                        if !(2..=100).contains(&rf) {
                            return Err(SpecError::new(
                                path("reduction_factor"),
                                format!("{rf}: expected 2 to 100 (3 or 4 are usual)"),
                            ));
                        }
                    }
                    match (rungs.brackets, searcher) {
                        (Some(_), Searcher::Asha) => {
                            return Err(SpecError::new(
                                path("brackets"),
                                "brackets applies to searcher = \"hyperband\"; ASHA is one bracket",
                            ))
                        }
                        (Some(b), _) if !(1..=32).contains(&b) => {
                            return Err(SpecError::new(path("brackets"), format!("{b}: expected 1 to 32")))
                        }
                        _ => {}
                    }
                    let steps = self.base.get("steps").or_else(|| self.sweep.params.get("steps"));
                    if let Some(steps) = steps {
                        if steps.as_u64() != Some(rungs.max_steps) {
                            return Err(SpecError::new(
                                self.param_path("steps"),
                                format!(
                                    "the {name} searcher sets every trial's steps to sweep.{name}.max_steps ({}); \
                                     leave steps out",
                                    rungs.max_steps
                                ),
                            ));
                        }
                    }
                }
                (None, false) => {}
            }
        }
        Ok(())
    }

    /// The `[sweep.tpe]` table: given exactly for its searcher, a budget within the limits.
    fn check_tpe(&self, limits: &Limits) -> Result<(), SpecError> {
        let sweep = &self.sweep;
        match (&sweep.tpe, sweep.searcher == Searcher::Tpe) {
            (Some(_), false) => Err(SpecError::new(
                "sweep.tpe",
                format!(
                    "[sweep.tpe] applies to searcher = \"tpe\" only; this sweep's searcher is \"{}\"",
                    sweep.searcher.as_str()
                ),
            )),
            (None, true) => Err(SpecError::new(
                "sweep.tpe",
                "searcher = \"tpe\" needs a [sweep.tpe] table: trials = N (in all), and optionally \
                 n_startup = 10 (random ones first) and seed = 0",
            )),
            (Some(tpe), true) => {
                if sweep.samples.is_some() || sweep.seed.is_some() {
                    return Err(SpecError::new(
                        if sweep.samples.is_some() {
                            "sweep.samples"
                        } else {
                            "sweep.seed"
                        },
                        "the tpe searcher takes its budget and seed from [sweep.tpe] (trials, seed)",
                    ));
                }
                if tpe.trials == 0 || u64::from(tpe.trials) > limits.max_trials {
                    return Err(SpecError::new(
                        "sweep.tpe.trials",
                        format!("{}: expected 1 to {} trials", tpe.trials, limits.max_trials),
                    ));
                }
                if tpe.n_startup == Some(0) {
                    return Err(SpecError::new(
                        "sweep.tpe.n_startup",
                        "expected at least 1 random trial to start from",
                    ));
                }
                Ok(())
            }
            (None, false) => Ok(()),
        }
    }

    /// The `[sweep.pbt]` table: given exactly for its searcher, a population that can evolve.
    fn check_pbt(&self, limits: &Limits) -> Result<(), SpecError> {
        let sweep = &self.sweep;
        let pbt = match (&sweep.pbt, sweep.searcher == Searcher::Pbt) {
            (Some(_), false) => {
                return Err(SpecError::new(
                    "sweep.pbt",
                    format!(
                        "[sweep.pbt] applies to searcher = \"pbt\" only; this sweep's searcher is \"{}\"",
                        sweep.searcher.as_str()
                    ),
                ))
            }
            (None, true) => {
                return Err(SpecError::new(
                    "sweep.pbt",
                    "searcher = \"pbt\" needs a [sweep.pbt] table: population = N, interval = STEPS, and \
                     optionally quantile = 0.25, factors = [0.8, 1.2], seed = 0",
                ))
            }
            (Some(pbt), true) => pbt,
            (None, false) => return Ok(()),
        };
        if sweep.samples.is_some() || sweep.seed.is_some() {
            return Err(SpecError::new(
                if sweep.samples.is_some() {
                    "sweep.samples"
                } else {
                    "sweep.seed"
                },
                "the pbt searcher takes its population and seed from [sweep.pbt] (population, seed)",
            ));
        }
        if pbt.population < 2 || u64::from(pbt.population) > limits.max_trials {
            return Err(SpecError::new(
                "sweep.pbt.population",
                format!("{}: expected 2 to {} members", pbt.population, limits.max_trials),
            ));
        }
        if pbt.interval == 0 {
            return Err(SpecError::new("sweep.pbt.interval", "expected at least 1 step"));
        }
        let q = pbt.quantile();
        if !(q > 0.0 && q <= 0.5) {
            return Err(SpecError::new(
                "sweep.pbt.quantile",
                format!("{q}: expected a fraction above 0 and at most 0.5, such as 0.25"),
            ));
        }
        let factors = pbt.factors();
        if factors.is_empty() || factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(SpecError::new(
                "sweep.pbt.factors",
                "expected positive numbers, such as [0.8, 1.2]",
            ));
        }
        if self.sweep.params.contains_key("steps") {
            return Err(SpecError::new(
                "sweep.params.steps",
                "a population trains for the same steps; set steps in [base]",
            ));
        }
        Ok(())
    }

    /// The domain of every swept parameter, in name order.
    pub fn domains(&self) -> Vec<(String, ParamDomain)> {
        self.sweep
            .params
            .iter()
            .map(|(name, value)| {
                let domain = ParamDomain::from_value(name, value).expect("domains are checked when the spec is parsed");
                (name.clone(), domain)
            })
            .collect()
    }

    /// The swept values among a trial's parameters (those `sweep.params` names).
    pub fn swept(&self, params: &Value) -> serde_json::Map<String, Value> {
        params
            .as_object()
            .map(|p| {
                p.iter()
                    .filter(|(k, _)| self.sweep.params.contains_key(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where a trial parameter came from, for error messages.
    pub fn param_path(&self, name: &str) -> String {
        if self.sweep.params.contains_key(name) {
            format!("sweep.params.{name}")
        } else {
            format!("base.{name}")
        }
    }

    /// A stable hash of the spec's content, stored with the experiment and its checkpoints.
    pub fn content_hash(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("a spec always serializes");
        let digest = Sha256::digest(&canonical);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn toml_message(error: &toml::de::Error) -> String {
    // toml's Display carries a source excerpt; the message alone reads better after a path.
    error.message().trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(text: &str, path: &str, needle: &str) {
        let err = SweepSpec::parse(text, SpecFormat::Toml).unwrap_err();
        assert_eq!(err.path, path, "{err}");
        assert!(err.message.contains(needle), "`{}` lacks `{needle}`", err.message);
    }

    #[test]
    fn overrides_set_nested_values_and_refuse_paths_through_values() {
        let text = "name = \"t\"\nfamily = \"dsir\"\n[base]\nsteps = 300\ntrain = { steps = 3000, lr = 0.001 }\n[sweep]\nsearcher = \"grid\"\nparams.width = [64, 128, 256]\n";
        let sets = [
            "base.steps=4".to_string(),
            "base.train.steps=10".to_string(),
            "sweep.params.width=[32]".to_string(),
            "base.data_dir=fashion-mnist".to_string(),
            "resources.fresh_process=true".to_string(),
        ];
        let yaml = apply_overrides(text, SpecFormat::Toml, &sets).unwrap();
        let spec = SweepSpec::parse(&yaml, SpecFormat::Yaml).unwrap();
        assert_eq!(spec.base["steps"], 4);
        assert_eq!(spec.base["train"]["steps"], 10);
        assert_eq!(spec.base["train"]["lr"], 0.001);
        assert_eq!(spec.base["data_dir"], "fashion-mnist");
        assert_eq!(spec.sweep.params["width"], serde_json::json!([32]));
        assert!(spec.resources.fresh_process);
        let err = apply_overrides(text, SpecFormat::Toml, &["base.steps.x=1".to_string()]).unwrap_err();
        assert_eq!(err.path, "base.steps", "{err}");
        let err = apply_overrides(text, SpecFormat::Toml, &["base.steps".to_string()]).unwrap_err();
        assert!(err.message.contains("PATH=VALUE"), "{err}");
    }

    const GOOD: &str = r#"
name = "t"
family = "train"
[base]
steps = 10
[sweep]
searcher = "grid"
params.seed = [0, 1]
params.log2_lr = { range = [-4, -1], step = 1 }
"#;

    #[test]
    fn good_spec_parses_and_ranges_expand() {
        let spec = SweepSpec::parse(GOOD, SpecFormat::Toml).unwrap();
        let domains = spec.domains();
        assert_eq!(domains[0].0, "log2_lr");
        let values = domains[0].1.grid_values().unwrap();
        assert_eq!(
            values,
            vec![Value::from(-4), Value::from(-3), Value::from(-2), Value::from(-1)]
        );
        assert_eq!(spec.max_attempts, 3);
    }

    #[test]
    fn unknown_top_level_field_names_its_path() {
        check_err(&format!("bogus = 1\n{GOOD}"), "bogus", "unknown field");
        check_err(&format!("{GOOD}\nbogus = 1\n"), "sweep.bogus", "unknown field");
        check_err(
            &GOOD.replace("searcher = ", "serching = "),
            "sweep.serching",
            "unknown field",
        );
    }

    #[test]
    fn wrong_type_names_its_path() {
        check_err(&GOOD.replace("name = \"t\"", "name = 3"), "name", "string");
        check_err(
            &GOOD.replace("searcher = \"grid\"", "searcher = \"bayes\""),
            "sweep.searcher",
            "grid",
        );
    }

    #[test]
    fn empty_sweeps_are_refused() {
        check_err(
            &GOOD.replace("params.seed = [0, 1]", "params.seed = []"),
            "sweep.params.seed",
            "empty list",
        );
        let no_params = GOOD
            .replace("params.seed = [0, 1]\n", "")
            .replace("params.log2_lr = { range = [-4, -1], step = 1 }\n", "");
        check_err(&no_params, "sweep.params", "empty sweep");
    }

    #[test]
    fn yaml_errors_name_the_path_too() {
        let yaml = "name: t\nfamily: train\nsweep:\n  searcher: grid\n  params:\n    seed: [0]\n  extra: 1\n";
        let err = SweepSpec::parse(yaml, SpecFormat::Yaml).unwrap_err();
        assert_eq!(err.path, "sweep.extra", "{err}");
        assert!(err.message.contains("extra"), "{err}");
        let ok = "name: t\nfamily: train\nsweep:\n  searcher: grid\n  params:\n    seed: [0, 1]\n";
        assert_eq!(SweepSpec::parse(ok, SpecFormat::Yaml).unwrap().sweep.params.len(), 1);
    }

    const ASHA: &str = r#"
name = "t"
family = "train"
[sweep]
searcher = "asha"
params.log2_lr = [-8, -6, -4]
[sweep.asha]
min_steps = 20
max_steps = 300
"#;

    #[test]
    fn asha_ladders_rise_by_the_reduction_factor_below_max_steps() {
        let spec = SweepSpec::parse(ASHA, SpecFormat::Toml).unwrap();
        let ladder = spec.sweep.ladder().unwrap();
        assert_eq!(ladder.rungs(0), vec![20, 60, 180]);
        assert_eq!(ladder.rung_after(0, 60), Some(180));
        assert_eq!(ladder.rung_after(0, 180), None);
        assert_eq!(ladder.brackets, 1);
        let hb = SweepSpec::parse(
            &ASHA
                .replace("\"asha\"", "\"hyperband\"")
                .replace("[sweep.asha]", "[sweep.hyperband]"),
            SpecFormat::Toml,
        )
        .unwrap();
        let ladder = hb.sweep.ladder().unwrap();
        assert_eq!(ladder.brackets, 4);
        assert_eq!(ladder.rungs(1), vec![60, 180]);
        assert_eq!(ladder.rungs(3), Vec::<u64>::new());
        assert_eq!(ladder.bracket_of(5), 1);
    }

    #[test]
    fn asha_tables_are_checked_with_their_paths() {
        check_err(
            &ASHA.replace("[sweep.asha]\nmin_steps = 20\nmax_steps = 300\n", ""),
            "sweep.asha",
            "min_steps",
        );
        check_err(
            &ASHA.replace("max_steps = 300", "max_steps = 20"),
            "sweep.asha.max_steps",
            "not above",
        );
        check_err(
            &ASHA.replace("min_steps = 20", "min_steps = 0"),
            "sweep.asha.min_steps",
            "at least 1",
        );
        check_err(
            &ASHA.replace("max_steps = 300", "max_steps = 300\nreduction_factor = 1"),
            "sweep.asha.reduction_factor",
            "2 to 100",
        );
        check_err(
            &ASHA.replace("\"asha\"", "\"grid\""),
            "sweep.asha",
            "searcher = \"asha\" only",
        );
        check_err(
            &ASHA.replace("[sweep]", "[base]\nsteps = 100\n[sweep]"),
            "base.steps",
            "leave steps out",
        );
        check_err(
            &ASHA.replace("[-8, -6, -4]", "{ uniform = [-8, -4] }"),
            "sweep.params.log2_lr",
            "samples = N",
        );
        let drawn = ASHA.replace("[-8, -6, -4]", "{ uniform = [-8, -4] }\nsamples = 9");
        assert!(SweepSpec::parse(&drawn, SpecFormat::Toml).unwrap().sweep.draws());
    }

    #[test]
    fn fuse_takes_a_count_or_auto_and_refuses_what_it_cannot_fuse() {
        let spec = |fuse: &str, sweep: &str| {
            format!("name = \"f\"\nfamily = \"train\"\n{fuse}\n[base]\nsteps = 300\n[sweep]\n{sweep}\nparams.seed = [1, 2]\n")
        };
        let grid = "searcher = \"grid\"";
        let parsed = |fuse: &str| SweepSpec::parse(&spec(fuse, grid), SpecFormat::Toml).unwrap().fuse;
        assert_eq!(parsed("fuse = 8"), Some(Fuse::Members(8)));
        assert_eq!(parsed("fuse = \"auto\""), Some(Fuse::Auto));
        assert_eq!(parsed(""), None);
        check_err(&spec("fuse = 0", grid), "fuse", "expected 1 to 64");
        check_err(&spec("fuse = 65", grid), "fuse", "expected 1 to 64");
        check_err(&spec("fuse = \"many\"", grid), "fuse", "`many`: expected a number");
        check_err(&spec("fuse = 1.5", grid), "fuse", "");
        let asha = "searcher = \"asha\"\nasha = { min_steps = 10, max_steps = 300 }";
        check_err(&spec("fuse = 8", asha), "fuse", "pause at rungs");
        // A spec that says it round-trips: fuse is stored and read back the same.
        let text = spec("fuse = \"auto\"", grid);
        let stored = serde_json::to_value(SweepSpec::parse(&text, SpecFormat::Toml).unwrap()).unwrap();
        assert_eq!(stored["fuse"], "auto");
        let back: SweepSpec = serde_json::from_value(stored).unwrap();
        assert_eq!(back.fuse, Some(Fuse::Auto));
    }

    #[test]
    fn continuous_domains_need_the_random_searcher() {
        check_err(
            &GOOD.replace("params.seed = [0, 1]", "params.seed = { uniform = [0, 1] }"),
            "sweep.params.seed",
            "random",
        );
    }
}
