//! The tree-structured Parzen estimator (Bergstra et al., 2011), univariate as
//! Optuna's default: the finished trials are split at the best `gamma(n)`
//! (10% of them, at most 25) into "good" and "bad"; for each parameter a
//! Parzen density is fitted to each group (Gaussians at the observations
//! with a prior over the whole domain, truncated to it; for a list, smoothed
//! counts); 24 candidates drawn from the good density are scored by
//! `log l(x) - log g(x)` and the best is proposed. Log-uniform domains are
//! modelled in log space, ranges as numbers rounded to their step.
//!
//! Every draw comes from a generator seeded by the sweep's seed and the
//! trial's ordinal, so the same history gives the same proposal.

use ablate_schema::ParamDomain;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::draw::{random_point, rng_for};

/// Candidates drawn from the good density per parameter.
pub const CANDIDATES: usize = 24;

/// A finished trial as the estimator sees it: its swept values and its objective
/// (to minimize; negate a maximized one), `None` when it failed.
pub struct Observation {
    pub params: Map<String, Value>,
    pub loss: Option<f64>,
}

impl Observation {
    /// A finished trial's swept values and objective (`None`: it failed, and counts
    /// as neither good nor bad), turned into a loss when the goal is to maximize.
    pub fn new(params: Map<String, Value>, objective: Option<f64>, maximize: bool) -> Observation {
        Observation {
            params,
            loss: objective.map(|v| if maximize { -v } else { v }),
        }
    }
}

/// How many of `n` finished trials count as good.
pub fn n_good(n: usize) -> usize {
    n.div_ceil(10).min(25)
}

/// Proposes trial `ordinal`'s point from `history` (random while fewer than two trials
/// finished with an objective).
pub fn propose(
    domains: &[(String, ParamDomain)],
    history: &[Observation],
    seed: u64,
    ordinal: usize,
) -> Map<String, Value> {
    let mut done: Vec<&Observation> = history.iter().filter(|o| o.loss.is_some_and(f64::is_finite)).collect();
    if done.len() < 2 {
        return random_point(domains, seed, ordinal);
    }
    done.sort_by(|a, b| a.loss.unwrap().total_cmp(&b.loss.unwrap()));
    let (good, bad) = done.split_at(n_good(done.len()));
    let mut rng = rng_for(seed, ordinal);
    domains
        .iter()
        .map(|(name, domain)| {
            let values = |group: &[&Observation]| -> Vec<Value> {
                group.iter().filter_map(|o| o.params.get(name).cloned()).collect()
            };
            let value = match domain {
                ParamDomain::List(items) => pick_category(items, &values(good), &values(bad), &mut rng),
                numeric => pick_number(numeric, &values(good), &values(bad), &mut rng),
            };
            (name.clone(), value)
        })
        .collect()
}

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
/// `n_startup` random trials, or random throughout (`tpe = false`).
pub fn best_of(budget: usize, n_startup: usize, seed: u64, tpe: bool) -> f64 {
    let domains = synthetic::domains();
    let mut history: Vec<Observation> = Vec::new();
    for ordinal in 0..budget {
        let params = if tpe && ordinal >= n_startup {
            propose(&domains, &history, seed, ordinal)
        } else {
            random_point(&domains, seed, ordinal)
        };
        let loss = synthetic::loss(&params);
        history.push(Observation {
            params,
            loss: Some(loss),
        });
    }
    history.iter().filter_map(|o| o.loss).fold(f64::INFINITY, f64::min)
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
                Observation { params, loss }
            })
            .collect();
        for ordinal in 20..60 {
            let p = propose(&domains, &history, 1, ordinal);
            assert_eq!(p, propose(&domains, &history, 1, ordinal));
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
    fn erf_matches_known_values() {
        assert!((erf(0.5) - 0.520_499_877_8).abs() < 1e-6);
        assert!((erf(-1.0) + 0.842_700_792_9).abs() < 1e-6);
        assert!((phi(0.0) - 0.5).abs() < 1e-9);
    }
}
