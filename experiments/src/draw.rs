//! Seeded draws from parameter domains, shared by the searchers (`searcher`'s random
//! sweeps, the random start of `tpe` and the first generation of PBT).

use ablate_schema::ParamDomain;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

/// The generator of trial `ordinal` of a sweep seeded with `seed`.
pub(crate) fn rng_for(seed: u64, ordinal: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (ordinal as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The random point of trial `ordinal` (the start, before the estimator has enough).
pub fn random_point(domains: &[(String, ParamDomain)], seed: u64, ordinal: usize) -> Map<String, Value> {
    let mut rng = rng_for(seed, ordinal);
    domains
        .iter()
        .map(|(name, domain)| (name.clone(), value(domain, &mut rng)))
        .collect()
}

/// One value of a domain, drawn from `rng`.
pub fn value(domain: &ParamDomain, rng: &mut ChaCha8Rng) -> Value {
    match domain {
        ParamDomain::List(items) => items[rng.gen_range(0..items.len())].clone(),
        ParamDomain::Range { .. } => {
            // Value i directly: a range of any length costs no memory.
            let len = domain.grid_len().expect("ranges are finite") as usize;
            domain
                .grid_value(rng.gen_range(0..len) as u64)
                .expect("an index below the length")
        }
        ParamDomain::Uniform { lo, hi } => Value::from(lo + (hi - lo) * rng.gen::<f64>()),
        ParamDomain::LogUniform { lo, hi } => {
            let (a, b) = (lo.ln(), hi.ln());
            Value::from((a + (b - a) * rng.gen::<f64>()).exp())
        }
    }
}
