//! BOHB (Falkner, Klein and Hutter, 2018): Hyperband's brackets, each new
//! configuration proposed by tpe instead of drawn at random. The estimator is
//! fitted at one budget: the highest rung (or the end of the run) where enough
//! configurations have a result (`d + 3` for `d` swept parameters, BOHB's
//! `N_min + 2`), on their results there. Configurations still pending or
//! running that have no result there count as constant liars, and those
//! stopped at a lower rung as worse than any that reached it (as Optuna's TPE
//! ranks pruned trials): without them, the few configurations at a high rung,
//! all promoted for being good, would make the "bad" density sit where the
//! good ones are. Until a rung has enough, proposals are random. A configuration the sweep already holds is
//! never proposed again (`tpe::propose_new`), so a grid's points are each tried
//! at most once.

use std::collections::BTreeMap;

use ablate_schema::ParamDomain;
use serde_json::{Map, Value};

use crate::tpe::{self, Observation};

/// A configuration as BOHB sees it: its swept values, whether it is pending or
/// running, and its objective (to minimize) at each step it reached a rung or
/// the end of its run.
#[derive(Debug, Clone)]
pub struct Config {
    pub params: Map<String, Value>,
    pub in_flight: bool,
    pub results: BTreeMap<u64, f64>,
}

/// Results a budget needs before the estimator is fitted there: BOHB's `N_min + 2`,
/// with `N_min = d + 1` for `d` swept parameters.
pub fn enough(dimensions: usize) -> usize {
    dimensions + 3
}

/// The budget the estimator is fitted at: the highest step where at least `enough`
/// configurations have a result; `None` while none has.
pub fn budget(configs: &[Config], enough: usize) -> Option<u64> {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for config in configs {
        for step in config.results.keys() {
            *counts.entry(*step).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .rev()
        .find(|(_, n)| *n >= enough)
        .map(|(step, _)| step)
}

/// The estimator's history at `budget`: each configuration's result there; the
/// configurations in flight without one (constant liars) and those stopped at a rung
/// below it (judged worse than those that went on) count as the worst. Those with
/// results only above it (a bracket that starts higher) and those without any (failed)
/// are left out.
pub fn history(configs: &[Config], budget: Option<u64>) -> Vec<Observation> {
    let Some(budget) = budget else {
        return Vec::new();
    };
    configs
        .iter()
        .filter_map(|c| match c.results.get(&budget) {
            Some(loss) => Some(Observation::new(c.params.clone(), Some(*loss), false)),
            None if c.in_flight => Some(Observation::in_flight(c.params.clone())),
            None if c.results.keys().next_back().is_some_and(|&last| last < budget) => {
                Some(Observation::in_flight(c.params.clone()))
            }
            None => None,
        })
        .collect()
}

/// Proposes configuration `ordinal`: tpe at the highest budget with enough results,
/// never one `configs` holds.
pub fn propose(
    domains: &[(String, ParamDomain)],
    configs: &[Config],
    seed: u64,
    ordinal: usize,
    multivariate: bool,
) -> Map<String, Value> {
    let history = history(configs, budget(configs, enough(domains.len())));
    let taken = |p: &Map<String, Value>| configs.iter().any(|c| &c.params == p);
    tpe::propose_new(domains, &history, seed, ordinal, multivariate, &taken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(x: f64, in_flight: bool, results: &[(u64, f64)]) -> Config {
        Config {
            params: json!({ "x": x }).as_object().unwrap().clone(),
            in_flight,
            results: results.iter().copied().collect(),
        }
    }

    #[test]
    fn the_model_moves_up_to_the_highest_rung_with_enough_results() {
        let mut configs: Vec<Config> = (0..5).map(|i| config(i as f64, false, &[(20, i as f64)])).collect();
        assert_eq!(budget(&configs, 4), Some(20));
        assert_eq!(budget(&configs[..3], 4), None);
        for c in configs.iter_mut().take(4) {
            c.results.insert(60, 1.0);
        }
        assert_eq!(budget(&configs, 4), Some(60));
        configs.push(config(9.0, true, &[]));
        configs.push(config(8.0, false, &[]));
        configs.push(config(7.0, false, &[(180, 0.5)]));
        // At 60: the four there; the one in flight and the fifth (stopped at 20) as the
        // worst; the failed one, and the one whose bracket starts at 180, left out.
        let at_60 = history(&configs, Some(60));
        assert_eq!(at_60.len(), 6);
        assert_eq!(at_60.iter().filter(|o| o.running).count(), 2);
        assert!(at_60.iter().all(|o| o.params["x"] != 8.0 && o.params["x"] != 7.0));
        assert!(history(&configs, None).is_empty());
    }

    #[test]
    fn a_grid_point_is_never_proposed_twice_until_every_point_is_held() {
        let domains = vec![("x".to_string(), ParamDomain::List((0..6).map(Value::from).collect()))];
        let mut configs: Vec<Config> = Vec::new();
        for ordinal in 0..6 {
            let point = propose(&domains, &configs, 7, ordinal, true);
            assert!(
                configs.iter().all(|c| c.params != point),
                "{point:?} proposed again after {configs:?}"
            );
            let x = point["x"].as_f64().unwrap();
            configs.push(Config {
                params: point,
                in_flight: false,
                results: [(20, (x - 2.0).powi(2))].into_iter().collect(),
            });
        }
        // All six held: a seventh proposal is still a point of the domain.
        let again = propose(&domains, &configs, 7, 6, true);
        assert!(domains[0].1 == ParamDomain::List((0..6).map(Value::from).collect()));
        assert!(again["x"].as_i64().is_some_and(|x| (0..6).contains(&x)));
    }
}
