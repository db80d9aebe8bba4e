//! Population-based training (Jaderberg et al., 2017). Synchronous
//! ([`generation`]): when every member has reached a generation's step, the
//! members are ranked by their objective there. Asynchronous ([`decide`]): a
//! member that reaches the step is ranked at once against the members already
//! there, by their results there, and goes on without waiting. In both, a
//! member of the bottom `quantile` copies the checkpoint of a member of the top
//! `quantile` (exploit) and takes that member's hyperparameters perturbed
//! (explore): a number multiplied by one of the `factors` (kept within its
//! domain, rounded to a range's step), a list's value redrawn with probability
//! 1/4. Parameters the spec keeps per member are left out of the domains passed
//! here, so the member keeps its own. Draws are seeded by the sweep's seed and
//! the step (and, asynchronous, the member), so a population evolves the same
//! way from the same results.

use ablate_schema::ParamDomain;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

/// What one member does at a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Goes on with its own weights and hyperparameters.
    Continue,
    /// Takes member `donor`'s checkpoint and these hyperparameters (the donor's, perturbed).
    Exploit { donor: usize, params: Map<String, Value> },
}

fn rng_at(seed: u64, step: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ step.wrapping_mul(0x2545_f491_4f6c_dd1d))
}

/// A loss as ranks compare it: a missing or non-finite one after every other.
fn loss_key(loss: Option<f64>) -> f64 {
    loss.filter(|v| v.is_finite()).unwrap_or(f64::INFINITY)
}

/// The members `indices`, best (least `loss`) first, a member without a value last, ties
/// by index.
fn best_first(mut indices: Vec<usize>, loss: impl Fn(usize) -> Option<f64>) -> Vec<usize> {
    indices.sort_by(|&a, &b| loss_key(loss(a)).total_cmp(&loss_key(loss(b))).then(a.cmp(&b)));
    indices
}

/// Decides a generation. `members` are (swept parameters, objective to minimize, `None`
/// when it logged none), in the population's order; returns one [`Step`] per member.
pub fn generation(
    domains: &[(String, ParamDomain)],
    members: &[(Map<String, Value>, Option<f64>)],
    quantile: f64,
    factors: &[f64],
    seed: u64,
    step: u64,
) -> Vec<Step> {
    let n = members.len();
    let order = best_first((0..n).collect(), |i| members[i].1);
    let k = ((n as f64 * quantile).floor() as usize).clamp(1, n / 2);
    let (top, bottom) = (&order[..k], &order[n - k..]);
    let mut rng = rng_at(seed, step);
    let mut steps = vec![Step::Continue; n];
    for &member in bottom {
        let donor = top[rng.gen_range(0..top.len())];
        let params = perturb(domains, &members[donor].0, factors, &mut rng);
        steps[member] = Step::Exploit { donor, params };
    }
    steps
}

/// Where a member stands when another reaches an interval (asynchronous PBT): its swept
/// values, whether it has reached that step (a checkpoint there to copy) and its
/// objective there, to minimize (`None` when it logged none).
#[derive(Debug, Clone)]
pub struct Standing {
    pub params: Map<String, Value>,
    pub at_step: bool,
    pub loss: Option<f64>,
}

/// Asynchronous PBT: member `me` has reached `step` and decides alone, never waiting for
/// the others. It is ranked among the members that have reached `step`, by their
/// results there (`me` last when it has none; a member still behind is not compared,
/// its result coming from fewer steps, so the first member there goes on). In the
/// bottom `quantile` (at least one) it copies one of the top `quantile` of the better
/// members there (a checkpoint at `step`) and takes its hyperparameters perturbed;
/// otherwise it continues. Seeded by the sweep's seed, the step and the member.
pub fn decide(
    domains: &[(String, ParamDomain)],
    standings: &[Standing],
    me: usize,
    quantile: f64,
    factors: &[f64],
    seed: u64,
    step: u64,
) -> Step {
    let key = |i: usize| loss_key(standings[i].loss);
    let there = |s: &Standing| s.at_step && s.loss.is_some_and(f64::is_finite);
    let order = best_first(
        (0..standings.len())
            .filter(|&i| i == me || there(&standings[i]))
            .collect(),
        |i| standings[i].loss,
    );
    let n = order.len();
    if n < 2 {
        return Step::Continue;
    }
    let k = ((n as f64 * quantile).ceil() as usize).clamp(1, n / 2);
    if !order[n - k..].contains(&me) {
        return Step::Continue;
    }
    let better: Vec<usize> = order.iter().copied().filter(|&d| d != me && key(d) < key(me)).collect();
    let donors = &better[..((better.len() as f64 * quantile).ceil() as usize).min(better.len())];
    if donors.is_empty() {
        return Step::Continue;
    }
    let mut rng = rng_at(seed ^ (me as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15), step);
    let donor = donors[rng.gen_range(0..donors.len())];
    let params = perturb(domains, &standings[donor].params, factors, &mut rng);
    Step::Exploit { donor, params }
}

/// The donor's swept values, perturbed.
pub fn perturb(
    domains: &[(String, ParamDomain)],
    params: &Map<String, Value>,
    factors: &[f64],
    rng: &mut ChaCha8Rng,
) -> Map<String, Value> {
    domains
        .iter()
        .map(|(name, domain)| {
            let current = params.get(name).cloned().unwrap_or(Value::Null);
            let factor = factors[rng.gen_range(0..factors.len())];
            let value = match domain {
                ParamDomain::List(items) => {
                    if rng.gen::<f64>() < 0.25 {
                        items[rng.gen_range(0..items.len())].clone()
                    } else {
                        current
                    }
                }
                ParamDomain::Uniform { lo, hi } | ParamDomain::LogUniform { lo, hi } => match current.as_f64() {
                    Some(x) => Value::from((x * factor).clamp(*lo, *hi)),
                    None => current,
                },
                ParamDomain::Range { lo, step, .. } => match current.as_f64() {
                    Some(x) => {
                        let len = domain.grid_len().unwrap_or(1);
                        let i = (((x * factor - lo) / step).round().max(0.0) as u64).min(len - 1);
                        domain.grid_value(i).unwrap_or(current)
                    }
                    None => current,
                },
            };
            (name.clone(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_asynchronous_member_is_ranked_among_those_at_its_step_and_copies_a_better_one() {
        let domains = vec![(
            "lr".to_string(),
            ParamDomain::from_value("lr", &json!({"log_uniform": [0.001, 1.0]})).unwrap(),
        )];
        let standing = |i: usize, at_step: bool, loss: Option<f64>| Standing {
            params: json!({"lr": 0.01 * (i + 1) as f64}).as_object().unwrap().clone(),
            at_step,
            loss,
        };
        // Eight members, loss = their index; 1 has not reached the step; 6 logged nothing.
        let mut standings: Vec<Standing> = (0..8).map(|i| standing(i, true, Some(i as f64))).collect();
        standings[1].at_step = false;
        standings[6].loss = None;
        // Six ranked (0, 2, 3, 4, 5, 7), k = ceil(6 / 4) = 2: 5 and 7 are the bottom.
        let decide_for = |s: &[Standing], me| decide(&domains, s, me, 0.25, &[0.8, 1.25], 4, 100);
        match decide_for(&standings, 7) {
            // The better ones there: 0, 2, 3, 4, 5; their top quarter, rounded up: 0 and 2.
            Step::Exploit { donor, params } => {
                assert!([0, 2].contains(&donor), "{donor}");
                let ratio = params["lr"].as_f64().unwrap() / standings[donor].params["lr"].as_f64().unwrap();
                assert!((ratio - 0.8).abs() < 1e-9 || (ratio - 1.25).abs() < 1e-9, "{ratio}");
            }
            other => panic!("member 7 should copy a better one: {other:?}"),
        }
        assert!(matches!(decide_for(&standings, 5), Step::Exploit { .. }));
        for me in [0, 2, 3, 4] {
            assert_eq!(decide_for(&standings, me), Step::Continue, "member {me}");
        }
        // One without a result ranks last and copies.
        assert!(matches!(decide_for(&standings, 6), Step::Exploit { .. }));
        // The first member at the step has no one to compare with.
        let first: Vec<Standing> = (0..8).map(|i| standing(i, i == 7, Some(i as f64))).collect();
        assert_eq!(decide_for(&first, 7), Step::Continue);
        // The draws repeat.
        assert_eq!(decide_for(&standings, 7), decide_for(&standings, 7));
    }

    #[test]
    fn the_bottom_quarter_copies_the_top_quarter_with_perturbed_hyperparameters() {
        let domains = vec![(
            "lr".to_string(),
            ParamDomain::from_value("lr", &json!({"log_uniform": [0.001, 1.0]})).unwrap(),
        )];
        let members: Vec<(Map<String, Value>, Option<f64>)> = (0..8)
            .map(|i| {
                let p = json!({"lr": 0.01 * (i + 1) as f64}).as_object().unwrap().clone();
                (p, if i == 5 { None } else { Some(i as f64) })
            })
            .collect();
        let steps = generation(&domains, &members, 0.25, &[0.8, 1.2], 3, 100);
        assert_eq!(steps, generation(&domains, &members, 0.25, &[0.8, 1.2], 3, 100));
        // Best: members 0 and 1; worst: 7 and 5 (no value).
        for (i, s) in steps.iter().enumerate() {
            match s {
                Step::Continue => assert!(![5, 7].contains(&i), "{i} should copy"),
                Step::Exploit { donor, params } => {
                    assert!([5, 7].contains(&i) && [0, 1].contains(donor), "{i} <- {donor}");
                    let (lr, from) = (
                        params["lr"].as_f64().unwrap(),
                        members[*donor].0["lr"].as_f64().unwrap(),
                    );
                    assert!(
                        (lr / from - 0.8).abs() < 1e-9 || (lr / from - 1.2).abs() < 1e-9,
                        "{lr} from {from}"
                    );
                }
            }
        }
    }
}
