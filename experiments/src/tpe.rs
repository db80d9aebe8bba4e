//! The tree-structured Parzen estimator (Bergstra et al., 2011). The finished
//! trials are split at the best `gamma(n)` (10% of them, at most 25) into "good"
//! and "bad"; a Parzen density is fitted to each group; 24 candidates drawn from
//! the good density are scored by `log l(x) - log g(x)` and the best is proposed.
//!
//! - **Multivariate** (the default, as Optuna's `multivariate=True`): one joint
//!   density over all swept parameters, a product kernel per observation (a
//!   Gaussian per number, a peaked distribution per list) plus a wide prior
//!   component, so parameters that only work together are proposed together.
//!   Univariate (`multivariate = false`): a density per parameter, as Optuna's
//!   default sampler.
//! - **Constant liar**: trials still pending or running count as observed with the
//!   worst loss (in the bad group), so proposals made while others are in flight
//!   spread out instead of repeating each other, and every free slot gets one.
//!
//! Log-uniform domains are modelled in log space, ranges as numbers rounded to
//! their step, lists as categories. Every draw comes from a generator seeded by
//! the sweep's seed and the trial's ordinal, so the same history gives the same
//! proposal.

use ablate_schema::ParamDomain;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::draw::{random_point, rng_for};

/// Candidates drawn from the good density per proposal.
pub const CANDIDATES: usize = 24;

/// A trial as the estimator sees it: its swept values and its objective (to minimize;
/// negate a maximized one), `None` when it failed or has not finished; `running`
/// when it is still pending or running (a constant liar's trial).
pub struct Observation {
    pub params: Map<String, Value>,
    pub loss: Option<f64>,
    pub running: bool,
}

impl Observation {
    /// A finished trial's swept values and objective (`None`: it failed, and counts
    /// as neither good nor bad), turned into a loss when the goal is to maximize.
    pub fn new(params: Map<String, Value>, objective: Option<f64>, maximize: bool) -> Observation {
        Observation {
            params,
            loss: objective.map(|v| if maximize { -v } else { v }),
            running: false,
        }
    }

    /// A trial still in flight: it counts as bad (the worst loss) until it finishes.
    /// So does a finished trial that missed a constraint (it never counts as good).
    pub fn in_flight(params: Map<String, Value>) -> Observation {
        Observation {
            params,
            loss: None,
            running: true,
        }
    }
}

/// How many of `n` finished trials count as good.
pub fn n_good(n: usize) -> usize {
    n.div_ceil(10).min(25)
}

/// Some trials' swept values.
type Group<'a> = Vec<&'a Map<String, Value>>;

/// The good and bad trials' parameters (the trials in flight among the bad), or
/// `None` while fewer than two trials finished with an objective.
fn split(history: &[Observation]) -> Option<(Group<'_>, Group<'_>)> {
    let mut done: Vec<&Observation> = history
        .iter()
        .filter(|o| !o.running && o.loss.is_some_and(f64::is_finite))
        .collect();
    if done.len() < 2 {
        return None;
    }
    done.sort_by(|a, b| a.loss.unwrap().total_cmp(&b.loss.unwrap()));
    let in_flight = history.iter().filter(|o| o.running);
    let good_count = n_good(done.len() + in_flight.clone().count()).clamp(1, done.len() - 1);
    let (good, bad) = done.split_at(good_count);
    let good = good.iter().map(|o| &o.params).collect();
    let bad = bad
        .iter()
        .map(|o| &o.params)
        .chain(in_flight.map(|o| &o.params))
        .collect();
    Some((good, bad))
}

/// Proposes trial `ordinal`'s point from `history` (random while fewer than two trials
/// finished with an objective): jointly over the parameters with `multivariate`, one
/// parameter at a time without.
pub fn propose(
    domains: &[(String, ParamDomain)],
    history: &[Observation],
    seed: u64,
    ordinal: usize,
    multivariate: bool,
) -> Map<String, Value> {
    let Some((good, bad)) = split(history) else {
        return random_point(domains, seed, ordinal);
    };
    let mut rng = rng_for(seed, ordinal);
    if multivariate {
        return joint::candidates(domains, &good, &bad, &mut rng).swap_remove(0);
    }
    domains
        .iter()
        .map(|(name, domain)| {
            let values = |group: &[&Map<String, Value>]| -> Vec<Value> {
                group.iter().filter_map(|p| p.get(name).cloned()).collect()
            };
            let value = match domain {
                ParamDomain::List(items) => pick_category(items, &values(&good), &values(&bad), &mut rng),
                numeric => pick_number(numeric, &values(&good), &values(&bad), &mut rng),
            };
            (name.clone(), value)
        })
        .collect()
}

/// Trial `ordinal`'s point in a sweep that starts with `n_startup` random trials: random
/// until that many have finished (as Optuna's `n_startup_trials` counts), [`propose`]d
/// after. With one trial at a time the first `n_startup` ordinals are the random ones;
/// with several in flight the estimator waits for as many results, instead of fitting
/// the first few and steering every slot by them.
pub fn propose_after_start(
    domains: &[(String, ParamDomain)],
    history: &[Observation],
    seed: u64,
    ordinal: usize,
    multivariate: bool,
    n_startup: usize,
) -> Map<String, Value> {
    if history.iter().filter(|o| !o.running).count() < n_startup {
        return random_point(domains, seed, ordinal);
    }
    propose(domains, history, seed, ordinal, multivariate)
}

/// [`propose`], never a point `taken` holds (a configuration the sweep has already
/// tried, on a finite domain such as a grid): jointly, the best-scored candidate not
/// taken; else (and before the estimator has enough) a random point not taken; when
/// every draw was taken, the proposal as [`propose`] makes it.
pub fn propose_new(
    domains: &[(String, ParamDomain)],
    history: &[Observation],
    seed: u64,
    ordinal: usize,
    multivariate: bool,
    taken: &dyn Fn(&Map<String, Value>) -> bool,
) -> Map<String, Value> {
    let first = match split(history) {
        Some((good, bad)) if multivariate => {
            let candidates = joint::candidates(domains, &good, &bad, &mut rng_for(seed, ordinal));
            match candidates.iter().find(|c| !taken(c)) {
                Some(fresh) => return fresh.clone(),
                None => candidates.into_iter().next().expect("at least one candidate"),
            }
        }
        _ => propose(domains, history, seed, ordinal, multivariate),
    };
    if !taken(&first) {
        return first;
    }
    (1..=RANDOM_TRIES)
        .map(|k| random_point(domains, seed, ordinal + k * FRESH_STRIDE))
        .find(|p| !taken(p))
        .unwrap_or(first)
}

/// Random draws [`propose_new`] makes for a point not yet taken, before it gives up.
const RANDOM_TRIES: usize = 256;
/// Spaces the ordinals of those draws past any sweep's own.
const FRESH_STRIDE: usize = 1 << 24;

fn pick_category(items: &[Value], good: &[Value], bad: &[Value], rng: &mut ChaCha8Rng) -> Value {
    // Smoothed counts: every item has a prior weight of one.
    let weights = |seen: &[Value]| -> Vec<f64> {
        let counts: Vec<f64> = items
            .iter()
            .map(|item| 1.0 + seen.iter().filter(|v| *v == item).count() as f64)
            .collect();
        let total: f64 = counts.iter().sum();
        counts.into_iter().map(|c| c / total).collect()
    };
    let (l, g) = (weights(good), weights(bad));
    let mut best = (f64::NEG_INFINITY, 0);
    for _ in 0..CANDIDATES {
        let mut u = rng.gen::<f64>();
        let mut i = 0;
        while i + 1 < l.len() && u >= l[i] {
            u -= l[i];
            i += 1;
        }
        let score = l[i].ln() - g[i].ln();
        if score > best.0 {
            best = (score, i);
        }
    }
    items[best.1].clone()
}

/// A numeric domain as the estimator models it: bounds (in log space for log-uniform),
/// and the step to round to.
struct Space {
    lo: f64,
    hi: f64,
    log: bool,
    step: Option<f64>,
}

impl Space {
    fn of(domain: &ParamDomain) -> Space {
        match *domain {
            ParamDomain::Uniform { lo, hi } => Space {
                lo,
                hi,
                log: false,
                step: None,
            },
            ParamDomain::LogUniform { lo, hi } => Space {
                lo: lo.ln(),
                hi: hi.ln(),
                log: true,
                step: None,
            },
            ParamDomain::Range { lo, hi, step } => Space {
                // Half a step beyond each end, so the end values are as likely as the others.
                lo: lo - step / 2.0,
                hi: lo + step * ((hi - lo) / step + 1e-9).floor() + step / 2.0,
                log: false,
                step: Some(step),
            },
            ParamDomain::List(_) => unreachable!("lists are categories"),
        }
    }

    fn inner(&self, v: &Value) -> Option<f64> {
        let x = v.as_f64()?;
        Some(if self.log { x.ln() } else { x })
    }

    fn outer(&self, domain: &ParamDomain, x: f64) -> Value {
        match (domain, self.step) {
            (ParamDomain::Range { lo, step, .. }, Some(_)) => {
                let len = domain.grid_len().unwrap_or(1);
                let i = (((x - lo) / step).round().max(0.0) as u64).min(len - 1);
                domain.grid_value(i).expect("an index below the length")
            }
            _ if self.log => Value::from(x.exp().clamp(self.lo.exp(), self.hi.exp())),
            _ => Value::from(x.clamp(self.lo, self.hi)),
        }
    }
}

/// A Parzen density: equal-weight Gaussians at the observations and one wide prior
/// Gaussian at the middle, each truncated to the domain.
struct Parzen {
    mus: Vec<f64>,
    sigmas: Vec<f64>,
    lo: f64,
    hi: f64,
}

impl Parzen {
    fn fit(points: &[f64], lo: f64, hi: f64) -> Parzen {
        let width = hi - lo;
        let mut mus: Vec<f64> = points.to_vec();
        mus.push((lo + hi) / 2.0);
        let mut order: Vec<usize> = (0..mus.len()).collect();
        order.sort_by(|&a, &b| mus[a].total_cmp(&mus[b]));
        let mut sigmas = vec![width; mus.len()];
        // Each observation's bandwidth: the larger gap to its neighbours (the bounds at the ends),
        // clipped to [width / min(100, n + 1), width]; the prior keeps the whole width.
        let floor = width / (100f64.min(mus.len() as f64 + 1.0));
        for (rank, &i) in order.iter().enumerate() {
            if i == mus.len() - 1 {
                continue;
            }
            let left = if rank == 0 { lo } else { mus[order[rank - 1]] };
            let right = if rank + 1 == order.len() {
                hi
            } else {
                mus[order[rank + 1]]
            };
            sigmas[i] = (mus[i] - left).max(right - mus[i]).clamp(floor, width);
        }
        Parzen { mus, sigmas, lo, hi }
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> f64 {
        let k = rng.gen_range(0..self.mus.len());
        for _ in 0..100 {
            let x = self.mus[k] + self.sigmas[k] * normal(rng);
            if (self.lo..=self.hi).contains(&x) {
                return x;
            }
        }
        self.mus[k].clamp(self.lo, self.hi)
    }

    fn log_density(&self, x: f64) -> f64 {
        let n = self.mus.len() as f64;
        let sum: f64 = self
            .mus
            .iter()
            .zip(&self.sigmas)
            .map(|(&mu, &sigma)| {
                let mass = phi((self.hi - mu) / sigma) - phi((self.lo - mu) / sigma);
                let z = (x - mu) / sigma;
                (-0.5 * z * z).exp() / (sigma * (2.0 * std::f64::consts::PI).sqrt() * mass.max(1e-12))
            })
            .sum();
        (sum / n).max(1e-300).ln()
    }
}

fn pick_number(domain: &ParamDomain, good: &[Value], bad: &[Value], rng: &mut ChaCha8Rng) -> Value {
    let space = Space::of(domain);
    let inner = |vs: &[Value]| -> Vec<f64> { vs.iter().filter_map(|v| space.inner(v)).collect() };
    let (l, g) = (
        Parzen::fit(&inner(good), space.lo, space.hi),
        Parzen::fit(&inner(bad), space.lo, space.hi),
    );
    let mut best = (f64::NEG_INFINITY, (space.lo + space.hi) / 2.0);
    for _ in 0..CANDIDATES {
        let x = l.sample(rng);
        let score = l.log_density(x) - g.log_density(x);
        if score > best.0 {
            best = (score, x);
        }
    }
    space.outer(domain, best.1)
}

/// The multivariate estimator: one joint Parzen density over all parameters.
mod joint {
    use super::*;

    /// One parameter as the joint density models it.
    enum Dim {
        /// A number in the estimator's space (log space for log-uniform).
        Number(Space),
        /// A list of `n` items, by index.
        Category(usize),
    }

    impl Dim {
        fn of(domain: &ParamDomain) -> Dim {
            match domain {
                ParamDomain::List(items) => Dim::Category(items.len()),
                numeric => Dim::Number(Space::of(numeric)),
            }
        }

        /// A value's coordinate (an item's index for a list); `None` when it lies outside.
        fn coordinate(&self, domain: &ParamDomain, v: &Value) -> Option<f64> {
            match (self, domain) {
                (Dim::Category(_), ParamDomain::List(items)) => items.iter().position(|i| i == v).map(|i| i as f64),
                (Dim::Number(space), _) => space.inner(v).map(|x| x.clamp(space.lo, space.hi)),
                _ => None,
            }
        }
    }

    /// Equal-weight components, one per observation and one prior: for a number a
    /// Gaussian (bandwidth by Scott's rule as Optuna's, the prior one as wide as the
    /// domain), truncated to it; for a list a distribution peaked at the observed item.
    struct Density<'a> {
        dims: &'a [Dim],
        /// Each observation's coordinates; the prior component comes after them.
        points: Vec<Vec<f64>>,
        /// Per number dimension, the observations' bandwidth (unused for lists).
        sigmas: Vec<f64>,
        /// An observed item's share of its component's mass (the rest spread evenly).
        peak: f64,
    }

    impl<'a> Density<'a> {
        fn fit(dims: &'a [Dim], points: Vec<Vec<f64>>) -> Density<'a> {
            let n = points.len().max(1) as f64;
            let scale = 0.2 * n.powf(-1.0 / (dims.len() as f64 + 4.0));
            let sigmas = dims
                .iter()
                .map(|d| match d {
                    Dim::Number(s) => {
                        let width = s.hi - s.lo;
                        (scale * width).clamp(width / 100f64.min(n + 1.0), width)
                    }
                    Dim::Category(_) => 0.0,
                })
                .collect();
            Density {
                dims,
                points,
                sigmas,
                peak: n / (n + 1.0),
            }
        }

        fn components(&self) -> usize {
            self.points.len() + 1
        }

        /// Component `k`'s centre and bandwidth in dimension `d` (the prior's for the last).
        fn kernel(&self, k: usize, d: usize) -> (f64, f64) {
            match (&self.dims[d], self.points.get(k)) {
                (Dim::Number(_), Some(p)) => (p[d], self.sigmas[d]),
                (Dim::Number(s), None) => ((s.lo + s.hi) / 2.0, s.hi - s.lo),
                (Dim::Category(_), Some(p)) => (p[d], 0.0),
                (Dim::Category(_), None) => (-1.0, 0.0),
            }
        }

        fn sample(&self, rng: &mut ChaCha8Rng) -> Vec<f64> {
            let k = rng.gen_range(0..self.components());
            (0..self.dims.len())
                .map(|d| {
                    let (centre, sigma) = self.kernel(k, d);
                    match &self.dims[d] {
                        Dim::Number(s) => {
                            for _ in 0..100 {
                                let x = centre + sigma * normal(rng);
                                if (s.lo..=s.hi).contains(&x) {
                                    return x;
                                }
                            }
                            centre.clamp(s.lo, s.hi)
                        }
                        Dim::Category(n) => {
                            if centre >= 0.0 && rng.gen::<f64>() < self.peak {
                                centre
                            } else {
                                rng.gen_range(0..*n) as f64
                            }
                        }
                    }
                })
                .collect()
        }

        fn log_density(&self, x: &[f64]) -> f64 {
            let logs: Vec<f64> = (0..self.components())
                .map(|k| {
                    (0..self.dims.len())
                        .map(|d| {
                            let (centre, sigma) = self.kernel(k, d);
                            match &self.dims[d] {
                                Dim::Number(s) => {
                                    let mass = phi((s.hi - centre) / sigma) - phi((s.lo - centre) / sigma);
                                    let z = (x[d] - centre) / sigma;
                                    -0.5 * z * z - (sigma * (2.0 * std::f64::consts::PI).sqrt() * mass.max(1e-12)).ln()
                                }
                                Dim::Category(n) => {
                                    let spread = if centre >= 0.0 { 1.0 - self.peak } else { 1.0 } / *n as f64;
                                    let at = if centre >= 0.0 && x[d] == centre {
                                        self.peak
                                    } else {
                                        0.0
                                    };
                                    (at + spread).ln()
                                }
                            }
                        })
                        .sum::<f64>()
                })
                .collect();
            let most = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            most + logs.iter().map(|l| (l - most).exp()).sum::<f64>().ln() - (self.components() as f64).ln()
        }
    }

    /// The candidates drawn from the good density, best first by `log l(x) - log g(x)`.
    pub(super) fn candidates(
        domains: &[(String, ParamDomain)],
        good: &[&Map<String, Value>],
        bad: &[&Map<String, Value>],
        rng: &mut ChaCha8Rng,
    ) -> Vec<Map<String, Value>> {
        let dims: Vec<Dim> = domains.iter().map(|(_, d)| Dim::of(d)).collect();
        // A trial missing a swept value (the spec changed since) does not inform the joint density.
        let points = |group: &[&Map<String, Value>]| -> Vec<Vec<f64>> {
            group
                .iter()
                .filter_map(|p| {
                    domains
                        .iter()
                        .zip(&dims)
                        .map(|((name, domain), dim)| p.get(name).and_then(|v| dim.coordinate(domain, v)))
                        .collect()
                })
                .collect()
        };
        let (l, g) = (Density::fit(&dims, points(good)), Density::fit(&dims, points(bad)));
        let mut scored: Vec<(f64, Vec<f64>)> = (0..CANDIDATES)
            .map(|_| {
                let x = l.sample(rng);
                let score = l.log_density(&x) - g.log_density(&x);
                (if score.is_nan() { f64::NEG_INFINITY } else { score }, x)
            })
            .collect();
        // Best first; among equal scores the first drawn, as a strict maximum picks it.
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored
            .into_iter()
            .map(|(_, x)| {
                domains
                    .iter()
                    .zip(&dims)
                    .zip(x)
                    .map(|(((name, domain), dim), x)| {
                        let value = match (dim, domain) {
                            (Dim::Category(_), ParamDomain::List(items)) => items[x as usize].clone(),
                            (Dim::Number(space), _) => space.outer(domain, x),
                            _ => unreachable!("a dimension is made from its domain"),
                        };
                        (name.clone(), value)
                    })
                    .collect()
            })
            .collect()
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The standard normal CDF.
fn phi(z: f64) -> f64 {
    0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2))
}

/// erf to 1.5e-7 (Abramowitz and Stegun 7.1.26).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t + 0.254_829_592)
            * t
            * (-x * x).exp();
    y.copysign(x)
}

/// The synthetic task the searchers are compared on (its minimum, 0, at lr = 10^-2.5,
/// log2 batch 6, `gelu`, x = 0.3): a learning rate on a log scale, a batch size's
/// exponent on a grid, a category and a plain number.
pub mod synthetic {
    use ablate_schema::ParamDomain;
    use serde_json::{json, Map, Value};

    pub fn domains() -> Vec<(String, ParamDomain)> {
        let d = |v: Value| ParamDomain::from_value("", &v).expect("a valid domain");
        vec![
            ("activation".into(), d(json!(["relu", "gelu", "tanh", "silu"]))),
            ("log2_batch".into(), d(json!({"range": [2, 10], "step": 1}))),
            ("lr".into(), d(json!({"log_uniform": [1e-5, 1.0]}))),
            ("x".into(), d(json!({"uniform": [0.0, 1.0]}))),
        ]
    }

    pub fn loss(p: &Map<String, Value>) -> f64 {
        let lr = p["lr"].as_f64().unwrap_or(1.0);
        let b = p["log2_batch"].as_f64().unwrap_or(2.0);
        let x = p["x"].as_f64().unwrap_or(0.0);
        let act = match p["activation"].as_str() {
            Some("gelu") => 0.0,
            Some("silu") => 0.1,
            _ => 0.4,
        };
        (lr.log10() + 2.5).powi(2) + ((b - 6.0) / 3.0).powi(2) + act + 2.0 * (x - 0.3).powi(2)
    }
}

/// The best loss of a sequential search of `budget` trials on [`synthetic`]: TPE after
/// `n_startup` random trials (univariate, as Optuna's default), or random throughout
/// (`tpe = false`).
pub fn best_of(budget: usize, n_startup: usize, seed: u64, tpe: bool) -> f64 {
    let domains = synthetic::domains();
    let mut history: Vec<Observation> = Vec::new();
    for ordinal in 0..budget {
        let params = if tpe && ordinal >= n_startup {
            propose(&domains, &history, seed, ordinal, false)
        } else {
            random_point(&domains, seed, ordinal)
        };
        let loss = synthetic::loss(&params);
        history.push(Observation::new(params, Some(loss), false));
    }
    history.iter().filter_map(|o| o.loss).fold(f64::INFINITY, f64::min)
}

/// A search of `budget` trials on [`synthetic`] with `slots` of them in flight at
/// once, as the coordinator runs it: the first `n_startup` random, each later one
/// proposed (multivariate, constant liar) when a slot frees, the trials in flight
/// as liars. Each trial takes a seeded random time (0.5 to 1.5), so trials finish
/// out of order. Returns the best loss and the most and fewest trials in flight
/// while at least `slots` were left to finish.
pub fn parallel_search(budget: usize, n_startup: usize, slots: usize, seed: u64) -> (f64, usize, usize) {
    let domains = synthetic::domains();
    let mut history: Vec<Observation> = Vec::new();
    // (finish time, index in history)
    let mut running: Vec<(f64, usize)> = Vec::new();
    let mut clock = 0.0;
    let (mut most, mut fewest) = (0, usize::MAX);
    let start = |history: &mut Vec<Observation>, running: &mut Vec<(f64, usize)>, clock: f64| {
        let ordinal = history.len();
        let params = propose_after_start(&domains, history, seed, ordinal, true, n_startup);
        let took = 0.5 + rng_for(seed ^ 0x5eed, ordinal).gen::<f64>();
        running.push((clock + took, ordinal));
        history.push(Observation::in_flight(params));
    };
    while history.len() < budget.min(slots) {
        start(&mut history, &mut running, clock);
    }
    while !running.is_empty() {
        if budget - (history.len() - running.len()) >= slots {
            most = most.max(running.len());
            fewest = fewest.min(running.len());
        }
        let next = (0..running.len())
            .min_by(|&a, &b| running[a].0.total_cmp(&running[b].0))
            .expect("one running");
        let (at, i) = running.swap_remove(next);
        clock = at;
        let loss = synthetic::loss(&history[i].params);
        history[i].loss = Some(loss);
        history[i].running = false;
        if history.len() < budget {
            start(&mut history, &mut running, clock);
        }
    }
    let best = history.iter().filter_map(|o| o.loss).fold(f64::INFINITY, f64::min);
    (best, most, fewest)
}

/// The median of some numbers.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposals_stay_in_their_domains_and_repeat_from_the_same_history() {
        let domains = synthetic::domains();
        let history: Vec<Observation> = (0..20)
            .map(|i| {
                let params = random_point(&domains, 1, i);
                let loss = Some(synthetic::loss(&params));
                Observation::new(params, loss, false)
            })
            .collect();
        for ordinal in 20..60 {
            let multivariate = ordinal % 2 == 0;
            let p = propose(&domains, &history, 1, ordinal, multivariate);
            assert_eq!(p, propose(&domains, &history, 1, ordinal, multivariate));
            let lr = p["lr"].as_f64().unwrap();
            assert!((1e-5..=1.0).contains(&lr), "{p:?}");
            let b = p["log2_batch"].as_i64().unwrap();
            assert!((2..=10).contains(&b), "{p:?}");
            assert!(["relu", "gelu", "tanh", "silu"].contains(&p["activation"].as_str().unwrap()));
        }
    }

    #[test]
    fn tpe_beats_random_search_at_the_same_budget_over_ten_seeds() {
        let (budget, startup) = (60, 10);
        let tpe = median((0..10).map(|s| best_of(budget, startup, s, true)).collect());
        let random = median((0..10).map(|s| best_of(budget, startup, s, false)).collect());
        eprintln!("median best of {budget} trials over 10 seeds: TPE {tpe:.4}, random {random:.4}");
        assert!(tpe < random, "median best: TPE {tpe}, random {random}");
    }

    #[test]
    fn the_constant_liar_spreads_proposals_made_while_others_run() {
        let domains = synthetic::domains();
        let mut history: Vec<Observation> = (0..12)
            .map(|i| {
                let params = random_point(&domains, 3, i);
                let loss = Some(synthetic::loss(&params));
                Observation::new(params, loss, false)
            })
            .collect();
        // Eight proposals in a row with none finishing: each sees the earlier ones in flight.
        let mut lrs = Vec::new();
        for ordinal in 12..20 {
            let p = propose(&domains, &history, 3, ordinal, true);
            lrs.push(p["lr"].as_f64().unwrap().log10());
            history.push(Observation::in_flight(p));
        }
        lrs.sort_by(f64::total_cmp);
        let spread = lrs[lrs.len() - 1] - lrs[0];
        assert!(
            spread > 0.05,
            "eight proposals in flight at once bunched within {spread} decades: {lrs:?}"
        );
        // An in-flight trial is never among the good: with every finished one bad but two,
        // the estimator still proposes from the finished ones.
        let (good, bad) = split(&history).unwrap();
        assert_eq!(good.len() + bad.len(), history.len());
        assert!(good
            .iter()
            .all(|p| history.iter().any(|o| !o.running && &&o.params == p)));
    }

    #[test]
    fn parallel_multivariate_tpe_keeps_every_slot_busy_and_beats_random() {
        let (budget, startup, slots) = (64, 10, 8);
        let runs: Vec<(f64, usize, usize)> = (0..10).map(|s| parallel_search(budget, startup, slots, s)).collect();
        for (best, most, fewest) in &runs {
            assert_eq!((*most, *fewest), (slots, slots), "best {best}");
        }
        let tpe = median(runs.iter().map(|r| r.0).collect());
        let random = median((0..10).map(|s| best_of(budget, startup, s, false)).collect());
        eprintln!("median best of {budget} trials, {slots} at once, over 10 seeds: TPE {tpe:.4}, random {random:.4}");
        assert!(tpe < random, "median best: parallel TPE {tpe}, random {random}");
    }

    #[test]
    fn erf_matches_known_values() {
        assert!((erf(0.5) - 0.520_499_877_8).abs() < 1e-6);
        assert!((erf(-1.0) + 0.842_700_792_9).abs() < 1e-6);
        assert!((phi(0.0) - 0.5).abs() < 1e-9);
    }
}
