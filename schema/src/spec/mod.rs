//! Sweep specs: the TOML or YAML file a researcher submits.
//!
//! Parsing refuses unknown fields and wrong types with the path of the bad
//! field. Family-specific checks of the trial parameters live with the family
//! (in `ablate-experiments`); expansion into trials lives with the searchers.
//! `text` holds the formats and overrides, `sweep` the `[sweep]` table and
//! the scheduling fields, `domain` the swept values and the objective.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::SpecError;
use crate::limits::Limits;

mod command;
mod domain;
mod sweep;
mod text;

pub use command::CommandTrial;

pub use domain::{Constraint, Goal, MoreObjective, Objective, ParamDomain};
pub use sweep::{Fuse, Ladder, Pbt, Resources, Rungs, Searcher, Sweep, Tpe, MAX_FUSE, MAX_GPUS_PER_TRIAL};
use text::toml_message;
pub use text::{apply_overrides, SpecFormat};

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
    /// `[trial]`: each trial runs this program (the researcher's own) instead of the
    /// family's model; the family's report reads what the program logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial: Option<CommandTrial>,
    /// Takes a succeeded trial of the same configuration (family, every parameter,
    /// the program and its code, or ablate's version) from any experiment instead of
    /// running it again: its metrics, outputs and checkpoints are referenced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reuse: bool,
    /// `[checkpoints]`: which checkpoints of a finished trial are kept.
    #[serde(default, skip_serializing_if = "Checkpoints::is_default")]
    pub checkpoints: Checkpoints,
}

/// `[checkpoints]`: retention, applied as each trial finishes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoints {
    /// "all" (the default), "last", "best" (by the objective at the checkpoint's
    /// step), or a number N: the newest N.
    #[serde(default)]
    pub keep: Keep,
}

impl Checkpoints {
    fn is_default(&self) -> bool {
        self.keep == Keep::All
    }
}

/// The most checkpoints `keep = N` may ask for.
pub const MAX_KEEP_NEWEST: u64 = 10_000;

/// Which of a finished trial's checkpoints stay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Keep {
    #[default]
    All,
    Last,
    Best,
    Newest(u32),
}

impl Keep {
    /// As the experiments table stores it: all, last, best or newest:N.
    pub fn as_column(self) -> String {
        match self {
            Keep::All => "all".into(),
            Keep::Last => "last".into(),
            Keep::Best => "best".into(),
            Keep::Newest(n) => format!("newest:{n}"),
        }
    }

    pub fn from_column(text: &str) -> Option<Keep> {
        match text {
            "all" => Some(Keep::All),
            "last" => Some(Keep::Last),
            "best" => Some(Keep::Best),
            _ => text.strip_prefix("newest:")?.parse().ok().map(Keep::Newest),
        }
    }
}

const KEEP_EXPECTED: &str = "expected \"all\", \"last\", \"best\" or a number of newest checkpoints from 1 to 10000";

impl Serialize for Keep {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Keep::Newest(n) => s.serialize_u32(*n),
            other => s.serialize_str(&other.as_column()),
        }
    }
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keep, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => match s.as_str() {
                "all" => Ok(Keep::All),
                "last" => Ok(Keep::Last),
                "best" => Ok(Keep::Best),
                other => Err(D::Error::custom(format!("\"{other}\": {KEEP_EXPECTED}"))),
            },
            Value::Number(n) => match n.as_u64() {
                Some(k @ 1..=MAX_KEEP_NEWEST) => Ok(Keep::Newest(k as u32)),
                _ => Err(D::Error::custom(format!("{n}: {KEEP_EXPECTED}"))),
            },
            other => Err(D::Error::custom(format!("{other}: {KEEP_EXPECTED}"))),
        }
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
            if objective.constraints.len() > 16 {
                return Err(SpecError::new(
                    "objective.constraints",
                    format!("{} constraints, over the limit of 16", objective.constraints.len()),
                ));
            }
            for (i, more) in objective.also.iter().enumerate() {
                let field = format!("objective.also[{i}].metric");
                limits.check_name(&field, &more.metric, limits.max_string_chars)?;
                if more.metric == objective.metric || objective.also[..i].iter().any(|m| m.metric == more.metric) {
                    return Err(SpecError::new(
                        field,
                        format!("`{}` is an objective already", more.metric),
                    ));
                }
            }
            if objective.also.len() > 7 {
                return Err(SpecError::new("objective.also", "at most 8 objectives in all"));
            }
            for (i, text) in objective.constraints.iter().enumerate() {
                let field = format!("objective.constraints[{i}]");
                limits.check_string(&field, text, limits.max_string_chars)?;
                Constraint::parse(text).map_err(|why| SpecError::new(field, why))?;
            }
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
        if self.fuse.is_some() && self.resources.gpus_per_trial.is_some_and(|g| g > 1) {
            return Err(SpecError::new(
                "fuse",
                "fused trials share one device; drop fuse or resources.gpus_per_trial",
            ));
        }
        if self.reuse && !matches!(self.sweep.searcher, Searcher::Grid | Searcher::Random) {
            return Err(SpecError::new(
                "reuse",
                format!(
                    "reuse takes finished trials in place of a grid's or a random search's points; \
                     sweep.searcher = \"{}\" decides from results the reused trials never reported \
                     (drop reuse, or sweep with grid or random)",
                    self.sweep.searcher.as_str()
                ),
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
        if let Some(trial) = &self.trial {
            let params: Vec<&str> = self
                .base
                .keys()
                .chain(self.sweep.params.keys())
                .map(String::as_str)
                .collect();
            trial.check(&params, limits)?;
            if self.fuse.is_some() {
                return Err(SpecError::new(
                    "fuse",
                    "a command trial runs its own program, which can't fuse with others; drop fuse",
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
        for (name, table, searchers) in [
            ("asha", &sweep.asha, &[Searcher::Asha][..]),
            (
                "hyperband",
                &sweep.hyperband,
                &[Searcher::Hyperband, Searcher::Bohb][..],
            ),
        ] {
            match (table, searchers.contains(&sweep.searcher)) {
                (Some(_), false) => {
                    return Err(SpecError::new(
                        format!("sweep.{name}"),
                        format!(
                            "[sweep.{name}] applies to searcher = {} only; this sweep's searcher is \"{}\"",
                            searchers
                                .iter()
                                .map(|s| format!("\"{}\"", s.as_str()))
                                .collect::<Vec<_>>()
                                .join(" or "),
                            sweep.searcher.as_str()
                        ),
                    ))
                }
                (None, true) => {
                    return Err(SpecError::new(
                        format!("sweep.{name}"),
                        format!(
                            "searcher = \"{}\" needs a [sweep.{name}] table: min_steps = N (the first rung), \
                             max_steps = M (the whole run), and optionally reduction_factor = 3",
                            sweep.searcher.as_str()
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
                    match (rungs.brackets, sweep.searcher) {
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
                                    "the {} searcher sets every trial's steps to sweep.{name}.max_steps ({}); \
                                     leave steps out",
                                    sweep.searcher.as_str(),
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
        match (&sweep.tpe, matches!(sweep.searcher, Searcher::Tpe | Searcher::Bohb)) {
            (Some(_), false) => Err(SpecError::new(
                "sweep.tpe",
                format!(
                    "[sweep.tpe] applies to searcher = \"tpe\" or \"bohb\" only; this sweep's searcher is \"{}\"",
                    sweep.searcher.as_str()
                ),
            )),
            (None, true) => Err(SpecError::new(
                "sweep.tpe",
                format!(
                    "searcher = \"{}\" needs a [sweep.tpe] table: trials = N (in all), and optionally \
                     n_startup = 10 (random ones first) and seed = 0",
                    sweep.searcher.as_str()
                ),
            )),
            (Some(tpe), true) => {
                if sweep.samples.is_some() || sweep.seed.is_some() {
                    return Err(SpecError::new(
                        if sweep.samples.is_some() {
                            "sweep.samples"
                        } else {
                            "sweep.seed"
                        },
                        format!(
                            "the {} searcher takes its budget and seed from [sweep.tpe] (trials, seed)",
                            sweep.searcher.as_str()
                        ),
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
                     optionally quantile = 0.25, factors = [0.8, 1.2], seed = 0, asynchronous = false, keep = []",
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
        for (i, name) in pbt.keep.iter().enumerate() {
            if !self.sweep.params.contains_key(name) {
                let swept: Vec<&str> = self.sweep.params.keys().map(String::as_str).collect();
                return Err(SpecError::new(
                    format!("sweep.pbt.keep[{i}]"),
                    format!(
                        "`{name}` is not a swept parameter; keep names some of [sweep.params]: {}",
                        swept.join(", ")
                    ),
                ));
            }
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

fn default_max_attempts() -> u32 {
    3
}

#[cfg(test)]
mod tests;
