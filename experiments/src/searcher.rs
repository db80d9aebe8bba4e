//! Searchers turn a spec's sweep into the parameter sets of its trials.
//!
//! `grid` is the cartesian product in name order (the last name varies
//! fastest); `random` draws `samples` sets from a seeded generator, so the
//! same spec always gives the same trials. `asha` and `hyperband` take the
//! grid, or `samples` draws, in a seeded random order, each trial set to
//! train `max_steps`; their rungs are kept and decided by the coordinator.
//! `tpe` and `bohb` start from `n_startup` random draws (`bohb`'s all distinct);
//! the coordinator proposes the rest.

use ablate_schema::{ParamDomain, Searcher, SweepSpec};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

/// Expands a spec's sweep into one swept-parameter map per trial, at most `max_trials`
/// (parsing already refused a sweep whose domains multiply past it).
pub fn expand(spec: &SweepSpec, max_trials: u64) -> Result<Vec<Map<String, Value>>, ablate_schema::SpecError> {
    let domains = spec.domains();
    let mut trials = if let Some(pbt) = &spec.sweep.pbt {
        (0..pbt.population)
            .map(|member| crate::draw::random_point(&domains, pbt.seed.unwrap_or(0), member as usize))
            .collect()
    } else if let Some(tpe) = &spec.sweep.tpe {
        // The random start; the estimator proposes the rest as trials finish (`crate::tpe`,
        // `crate::bohb`). BOHB's start holds no configuration twice.
        let seed = tpe.seed.unwrap_or(0);
        let mut start: Vec<Map<String, Value>> = Vec::new();
        for ordinal in 0..tpe.n_startup() as usize {
            let point = if spec.sweep.searcher == Searcher::Bohb {
                crate::tpe::propose_new(&domains, &[], seed, ordinal, true, &|p| start.contains(p))
            } else {
                crate::draw::random_point(&domains, seed, ordinal)
            };
            start.push(point);
        }
        start
    } else if spec.sweep.draws() {
        random(
            &domains,
            spec.sweep.samples.unwrap_or(1) as usize,
            spec.sweep.seed.unwrap_or(0),
        )
    } else {
        grid(&domains)
    };
    if let Some(ladder) = spec.sweep.ladder() {
        // Every configuration may train the whole run; its rungs stop it before.
        for trial in &mut trials {
            trial.insert("steps".to_string(), Value::from(ladder.max_steps));
        }
        // Configurations reach the first rung in lease order, and each is judged against those
        // before it: in the grid's order (say, learning rates rising) every newcomer could be
        // the best so far and go on. A seeded shuffle makes the order as good as random.
        trials.shuffle(&mut ChaCha8Rng::seed_from_u64(spec.sweep.seed.unwrap_or(0) ^ 0x5a5a));
    }
    if trials.len() as u64 > max_trials {
        return Err(ablate_schema::SpecError::new(
            "sweep",
            format!(
                "the sweep expands to {} trials, over the limit of {max_trials}; split it",
                trials.len()
            ),
        ));
    }
    Ok(trials)
}

fn grid(domains: &[(String, ParamDomain)]) -> Vec<Map<String, Value>> {
    let mut trials = vec![Map::new()];
    for (name, domain) in domains {
        let values = domain.grid_values().expect("grid domains are checked at parse time");
        trials = trials
            .into_iter()
            .flat_map(|partial| {
                values.iter().map(move |v| {
                    let mut next = partial.clone();
                    next.insert(name.clone(), v.clone());
                    next
                })
            })
            .collect();
    }
    trials
}

fn random(domains: &[(String, ParamDomain)], samples: usize, seed: u64) -> Vec<Map<String, Value>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..samples)
        .map(|_| {
            domains
                .iter()
                .map(|(name, domain)| (name.clone(), crate::draw::value(domain, &mut rng)))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use ablate_schema::{SpecFormat, SweepSpec};

    use super::expand;

    fn expand_default(
        spec: &SweepSpec,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, ablate_schema::SpecError> {
        expand(spec, ablate_schema::Limits::default().max_trials)
    }

    fn spec(sweep: &str) -> SweepSpec {
        let text = format!("name = \"s\"\nfamily = \"train\"\n[sweep]\n{sweep}\n");
        SweepSpec::parse(&text, SpecFormat::Toml).unwrap()
    }

    #[test]
    fn grid_is_the_full_product_in_a_stable_order() {
        let trials = expand_default(&spec(
            "searcher = \"grid\"\nparams.a = [1, 2]\nparams.b = [\"x\", \"y\", \"z\"]",
        ))
        .unwrap();
        assert_eq!(trials.len(), 6);
        assert_eq!(trials[0]["a"], 1);
        assert_eq!(trials[0]["b"], "x");
        assert_eq!(trials[1]["b"], "y");
        assert_eq!(trials[5]["a"], 2);
        assert_eq!(trials[5]["b"], "z");
    }

    #[test]
    fn random_is_reproducible_from_its_seed_and_stays_in_bounds() {
        let text = "searcher = \"random\"\nsamples = 50\nseed = 3\nparams.lr = { log_uniform = [1e-4, 1e-1] }\nparams.w = [8, 16]";
        let a = expand_default(&spec(text)).unwrap();
        let b = expand_default(&spec(text)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 50);
        for t in &a {
            let lr = t["lr"].as_f64().unwrap();
            assert!((1e-4..=1e-1).contains(&lr), "{lr}");
        }
        let c = expand_default(&spec(&text.replace("seed = 3", "seed = 4"))).unwrap();
        assert_ne!(a, c);
    }
}
