//! Which swept parameters mattered: per parameter, the share of the objective's
//! variance its main effect explains (a first-order, fANOVA-style estimate).
//!
//! The trials are grouped by the parameter's value: a list by item, a number with
//! at most 10 distinct values (a grid) by value, any other number by equal-count
//! bins in the space it is swept in (log space for log-uniform). The
//! share is the variance of the group means over the variance of the objective
//! (the between-group sum of squares over the total), less what that ratio
//! comes to by chance for as many groups and trials (`(groups - 1) / (n - 1)`),
//! rescaled and floored at 0 (the epsilon-squared of a one-way analysis of
//! variance). Parameters that act only together show less than their joint
//! share; the shares need not sum to 1.

use ablate_schema::ParamDomain;
use serde_json::{Map, Value};

pub use crate::report::Importance;
use crate::report::{Report, Table, TrialOutcome};

/// The fewest trials with an objective for an estimate.
pub const FEWEST: usize = 8;

/// The most bins a number's values are split into.
const MOST_BINS: usize = 10;

/// Each swept parameter's share of the variance of `objective` over `trials`
/// (swept values and objective), largest first; empty with fewer than
/// [`FEWEST`] trials with a finite objective or none that varies.
pub fn importance(domains: &[(String, ParamDomain)], trials: &[(Map<String, Value>, f64)]) -> Vec<Importance> {
    let trials: Vec<&(Map<String, Value>, f64)> = trials.iter().filter(|(_, y)| y.is_finite()).collect();
    let n = trials.len();
    if n < FEWEST {
        return Vec::new();
    }
    let mean = trials.iter().map(|(_, y)| y).sum::<f64>() / n as f64;
    let total: f64 = trials.iter().map(|(_, y)| (y - mean).powi(2)).sum();
    if total <= f64::EPSILON * mean.abs().max(1.0) {
        return Vec::new();
    }
    let mut shares: Vec<Importance> = domains
        .iter()
        .filter_map(|(name, domain)| {
            let groups = group(domain, trials.iter().map(|(p, y)| (p.get(name), *y)).collect())?;
            let k = groups.len();
            let between: f64 = groups
                .iter()
                .map(|g| g.len() as f64 * (g.iter().sum::<f64>() / g.len() as f64 - mean).powi(2))
                .sum();
            let chance = (k as f64 - 1.0) / (n as f64 - 1.0);
            let share = ((between / total - chance) / (1.0 - chance)).clamp(0.0, 1.0);
            Some(Importance {
                param: name.clone(),
                share,
                groups: k,
            })
        })
        .collect();
    shares.sort_by(|a, b| b.share.total_cmp(&a.share).then_with(|| a.param.cmp(&b.param)));
    shares
}

/// The objectives grouped by the parameter's value; `None` when it took one value.
fn group(domain: &ParamDomain, values: Vec<(Option<&Value>, f64)>) -> Option<Vec<Vec<f64>>> {
    let groups: Vec<Vec<f64>> = match domain {
        ParamDomain::List(_) => {
            let mut by: Vec<(String, Vec<f64>)> = Vec::new();
            for (v, y) in values {
                let key = v.map(Value::to_string).unwrap_or_default();
                match by.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, ys)) => ys.push(y),
                    None => by.push((key, vec![y])),
                }
            }
            by.into_iter().map(|(_, ys)| ys).collect()
        }
        numeric => {
            let log = matches!(numeric, ParamDomain::LogUniform { .. });
            let mut xs: Vec<(f64, f64)> = values
                .into_iter()
                .filter_map(|(v, y)| {
                    let x = v?.as_f64()?;
                    Some((if log { x.max(f64::MIN_POSITIVE).ln() } else { x }, y))
                })
                .collect();
            xs.sort_by(|a, b| a.0.total_cmp(&b.0));
            // A grid's few values each a group of their own; else equal-count bins, about
            // sqrt(n) of them. Equal values never split.
            let distinct = 1 + xs.windows(2).filter(|w| w[0].0 != w[1].0).count();
            let bins = if distinct <= MOST_BINS {
                xs.len()
            } else {
                ((xs.len() as f64).sqrt().round() as usize).clamp(2, MOST_BINS)
            };
            let mut groups: Vec<Vec<f64>> = Vec::new();
            let mut last: Option<f64> = None;
            for (i, (x, y)) in xs.iter().enumerate() {
                let bin = i * bins / xs.len();
                let new_bin = groups.len() <= bin && last != Some(*x);
                if groups.is_empty() || new_bin {
                    groups.push(Vec::new());
                }
                groups.last_mut().expect("a group").push(*y);
                last = Some(*x);
            }
            groups
        }
    };
    (groups.len() > 1).then_some(groups)
}

/// The report's table of the shares, for objective `metric`.
pub fn table(metric: &str, shares: &[Importance], trials: usize) -> Table {
    Table {
        title: format!("Importance: each swept parameter's share of {metric}'s variance ({trials} trials)"),
        columns: vec!["parameter".into(), "share".into(), "groups".into()],
        rows: shares
            .iter()
            .map(|s| vec![s.param.clone(), format!("{:.3}", s.share), s.groups.to_string()])
            .collect(),
    }
}

/// Adds to `report` the importance of `spec`'s swept parameters to its objective, over
/// the succeeded trials of `outcomes` (nothing without an objective or enough trials).
pub fn add_to(report: &mut Report, spec: &ablate_schema::SweepSpec, outcomes: &[TrialOutcome]) {
    let Some(objective) = &spec.objective else {
        return;
    };
    let trials: Vec<(Map<String, Value>, f64)> = outcomes
        .iter()
        .filter(|t| t.state == "succeeded")
        .filter_map(|t| Some((spec.swept(&t.params), t.metric(&objective.metric)?)))
        .collect();
    let shares = importance(&spec.domains(), &trials);
    if !shares.is_empty() {
        report.tables.push(table(&objective.metric, &shares, trials.len()));
        report.importance = shares;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::draw::random_point;
    use serde_json::json;

    fn domains() -> Vec<(String, ParamDomain)> {
        let d = |v: Value| ParamDomain::from_value("", &v).expect("a valid domain");
        vec![
            ("a".into(), d(json!({"uniform": [0.0, 1.0]}))),
            ("b".into(), d(json!({"log_uniform": [1e-4, 1.0]}))),
            ("c".into(), d(json!(["w", "x", "y", "z"]))),
        ]
    }

    /// f = 3a + c's effect (0, 0.5, 1, 1.5), b none: Var(3a) = 0.75, Var(c) = 0.3125,
    /// so a explains 0.706 of the variance, c 0.294 and b 0.
    #[test]
    fn the_shares_match_a_known_objective_within_a_tenth() {
        let trials: Vec<(Map<String, Value>, f64)> = (0..400)
            .map(|i| {
                let p = random_point(&domains(), 11, i);
                let c = ["w", "x", "y", "z"].iter().position(|c| p["c"] == *c).unwrap() as f64;
                let y = 3.0 * p["a"].as_f64().unwrap() + 0.5 * c;
                (p, y)
            })
            .collect();
        let shares = importance(&domains(), &trials);
        let share = |name: &str| shares.iter().find(|s| s.param == name).unwrap().share;
        eprintln!("{shares:?}");
        assert_eq!(
            shares.iter().map(|s| s.param.as_str()).collect::<Vec<_>>(),
            ["a", "c", "b"]
        );
        assert!((share("a") - 0.706).abs() < 0.1, "{shares:?}");
        assert!((share("c") - 0.294).abs() < 0.1, "{shares:?}");
        assert!(share("b") < 0.1, "{shares:?}");
    }

    /// A grid of 3 widths x 4 learning rates, the loss U-shaped in the learning rate and
    /// flat in the width: each learning rate is a group, and it explains nearly all.
    #[test]
    fn a_grid_groups_by_value_and_finds_a_u_shaped_effect() {
        let d = |v: Value| ParamDomain::from_value("", &v).expect("a valid domain");
        let domains = vec![
            ("log2_lr".to_string(), d(json!({"range": [-12, -6], "step": 2}))),
            ("width".to_string(), d(json!([32, 64, 128]))),
        ];
        let mut trials = Vec::new();
        for (i, width) in [32, 64, 128].into_iter().enumerate() {
            for lr in [-12.0, -10.0, -8.0, -6.0] {
                let p: Map<String, Value> = json!({"log2_lr": lr, "width": width}).as_object().unwrap().clone();
                let y = (lr + 9.0f64).powi(2) + 0.01 * i as f64;
                trials.push((p, y));
            }
        }
        let shares = importance(&domains, &trials);
        eprintln!("{shares:?}");
        assert_eq!(shares[0].param, "log2_lr");
        assert_eq!(shares[0].groups, 4);
        assert!(shares[0].share > 0.95, "{shares:?}");
        assert!(shares[1].share < 0.05, "{shares:?}");
    }

    #[test]
    fn too_few_trials_or_a_flat_objective_give_no_estimate() {
        let few: Vec<(Map<String, Value>, f64)> = (0..5).map(|i| (random_point(&domains(), 1, i), i as f64)).collect();
        assert!(importance(&domains(), &few).is_empty());
        let flat: Vec<(Map<String, Value>, f64)> = (0..50).map(|i| (random_point(&domains(), 1, i), 2.0)).collect();
        assert!(importance(&domains(), &flat).is_empty());
    }
}
