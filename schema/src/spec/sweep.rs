//! The `[sweep]` table (searchers, rungs, TPE, PBT) and what trials need of a worker.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    pub(super) fn is_default(&self) -> bool {
        *self == Resources::default()
    }
}

/// The most GPUs one trial may ask for: all of one large host's.
pub const MAX_GPUS_PER_TRIAL: u32 = 16;

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
    /// Hyperband's brackets (`[sweep.hyperband]`) with each new configuration proposed by
    /// tpe (`[sweep.tpe]`) from the results at the highest rung that has enough of them.
    Bohb,
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
            Searcher::Bohb => "bohb",
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

/// `[sweep.tpe]`: how many trials in all, how many random ones first, the seed, and
/// whether the estimator is joint over the parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tpe {
    /// Trials in all: the random start, then each proposed as a slot frees.
    pub trials: u32,
    /// Random trials before the estimator proposes any (default 10), held from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_startup: Option<u32>,
    /// The same seed gives the same trials on one worker slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// One joint density over the swept parameters (default true); false: one per parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multivariate: Option<bool>,
}

impl Tpe {
    pub fn n_startup(&self) -> u32 {
        self.n_startup.unwrap_or(10).min(self.trials)
    }

    pub fn multivariate(&self) -> bool {
        self.multivariate.unwrap_or(true)
    }

    /// The proposals owed now to a sweep that holds `total` trials, `finished` of them
    /// ended, with `in_flight` trials wanted unfinished at once (the experiment's
    /// `max_concurrent`, or the slots free for it; `None`: unknown, then `n_startup`):
    /// it holds at least `n_startup`, and `in_flight` beyond the finished ones, up to
    /// `trials`.
    pub fn owed(&self, finished: u64, total: u64, in_flight: Option<u64>) -> u64 {
        let n_startup = u64::from(self.n_startup());
        let in_flight = in_flight.filter(|n| *n > 0).unwrap_or(n_startup);
        u64::from(self.trials)
            .min(n_startup.max(finished + in_flight))
            .saturating_sub(total)
    }
}

/// `[sweep.pbt]`: the population and how it evolves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pbt {
    /// Members, drawn at random from the swept domains.
    pub population: u32,
    /// Steps between generations: each member stops there (checkpointed) until all have
    /// (or, `asynchronous`, until it has been compared with the others).
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
    /// Each member decides alone when it reaches an interval, against the others' results
    /// at that step (or their latest), and goes on at once (default false: a generation
    /// waits for every member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<bool>,
    /// Swept parameters a member keeps as its own when it copies another (its data
    /// seed, say): neither copied nor perturbed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
}

impl Pbt {
    pub fn asynchronous(&self) -> bool {
        self.asynchronous.unwrap_or(false)
    }

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
    /// The rungs of `searcher = "hyperband"` and `"bohb"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyperband: Option<Rungs>,
    /// The budget of `searcher = "tpe"` and `"bohb"`.
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
            Searcher::Tpe | Searcher::Pbt | Searcher::Bohb => true,
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
            Searcher::Hyperband | Searcher::Bohb => (self.hyperband.as_ref()?, true),
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
