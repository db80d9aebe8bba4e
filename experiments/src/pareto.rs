//! Several objectives: the spec's `[objective]` metric and those it lists in
//! `also`, each with its goal. A trial dominates another when it is no worse in
//! every objective and better in one; the Pareto front is the succeeded (and
//! feasible) trials no other dominates. The tpe searcher ranks trials by
//! non-dominated sorting (front 0, the front once it is taken away 1, ...) and
//! breaks ties within a front by the sum of the objectives scaled to [0, 1].

use ablate_schema::{Goal, SweepSpec};
use serde_json::{Map, Value};

use crate::report::{Report, Table, TrialOutcome};

/// The objectives of `spec`: each metric and whether it is maximized; one unless
/// `[objective] also` lists more.
pub fn objectives(spec: &SweepSpec) -> Vec<(String, bool)> {
    spec.objective
        .iter()
        .flat_map(|o| {
            std::iter::once((o.metric.clone(), o.goal == Goal::Maximize))
                .chain(o.also.iter().map(|a| (a.metric.clone(), a.goal == Goal::Maximize)))
        })
        .collect()
}

/// A trial's objectives as values to minimize (maximized ones negated), from its
/// final `metrics`; `None` when one is missing or not a finite number.
pub fn point(metrics: &Map<String, Value>, objectives: &[(String, bool)]) -> Option<Vec<f64>> {
    objectives
        .iter()
        .map(|(name, maximize)| {
            let v = metrics.get(name)?.as_f64().filter(|v| v.is_finite())?;
            Some(if *maximize { -v } else { v })
        })
        .collect()
}

/// Whether `a` dominates `b` (both to minimize).
pub fn dominates(a: &[f64], b: &[f64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x <= y) && a.iter().zip(b).any(|(x, y)| x < y)
}

/// Each point's front by non-dominated sorting: 0 for the Pareto front, 1 for the
/// front of what is left without it, and so on.
pub fn ranks(points: &[Vec<f64>]) -> Vec<usize> {
    let mut rank = vec![usize::MAX; points.len()];
    let mut level = 0;
    while rank.contains(&usize::MAX) {
        let left: Vec<usize> = (0..points.len()).filter(|&i| rank[i] == usize::MAX).collect();
        let front: Vec<usize> = left
            .iter()
            .copied()
            .filter(|&i| !left.iter().any(|&j| j != i && dominates(&points[j], &points[i])))
            .collect();
        for i in front {
            rank[i] = level;
        }
        level += 1;
    }
    rank
}

/// One loss per point for a single-objective searcher: its front, plus within the
/// front the sum of its objectives scaled to [0, 1] over all points, divided so it
/// stays below 1 (a better front always comes first).
pub fn scalar_losses(points: &[Vec<f64>]) -> Vec<f64> {
    let ranks = ranks(points);
    let dims = points.first().map_or(0, Vec::len);
    let (lo, hi): (Vec<f64>, Vec<f64>) = (0..dims)
        .map(|d| {
            let values = points.iter().map(|p| p[d]);
            (
                values.clone().fold(f64::INFINITY, f64::min),
                values.fold(f64::NEG_INFINITY, f64::max),
            )
        })
        .unzip();
    points
        .iter()
        .zip(ranks)
        .map(|(p, rank)| {
            let spread: f64 = (0..dims)
                .map(|d| {
                    if hi[d] > lo[d] {
                        (p[d] - lo[d]) / (hi[d] - lo[d])
                    } else {
                        0.0
                    }
                })
                .sum();
            rank as f64 + spread / (dims as f64 + 1.0)
        })
        .collect()
}

/// The hypervolume the points (to minimize) dominate up to `reference`, for two
/// objectives: the area of the union of the boxes from each point to the reference.
pub fn hypervolume_2d(points: &[Vec<f64>], reference: [f64; 2]) -> f64 {
    let mut inside: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p[0] < reference[0] && p[1] < reference[1])
        .map(|p| (p[0], p[1]))
        .collect();
    inside.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut area = 0.0;
    let mut ceiling = reference[1];
    for (x, y) in inside {
        if y < ceiling {
            area += (reference[0] - x) * (ceiling - y);
            ceiling = y;
        }
    }
    area
}

/// Adds to `report` the Pareto front of the succeeded trials of `outcomes`
/// (ordinals in `pareto`, and a table), when `spec` has several objectives.
pub fn add_to(report: &mut Report, spec: &SweepSpec, outcomes: &[TrialOutcome]) {
    let objectives = objectives(spec);
    if objectives.len() < 2 {
        return;
    }
    let done: Vec<(&TrialOutcome, Vec<f64>)> = outcomes
        .iter()
        .filter(|t| t.state == "succeeded")
        .filter_map(|t| Some((t, point(&t.metrics, &objectives)?)))
        .collect();
    let points: Vec<Vec<f64>> = done.iter().map(|(_, p)| p.clone()).collect();
    let ranks = ranks(&points);
    let mut front: Vec<&(&TrialOutcome, Vec<f64>)> = done
        .iter()
        .zip(&ranks)
        .filter(|(_, r)| **r == 0)
        .map(|(d, _)| d)
        .collect();
    front.sort_by(|a, b| {
        a.1.iter()
            .zip(&b.1)
            .map(|(x, y)| x.total_cmp(y))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let names: Vec<String> = objectives
        .iter()
        .map(|(m, max)| format!("{m} ({})", if *max { "max" } else { "min" }))
        .collect();
    let mut columns = vec!["trial".to_string()];
    columns.extend(objectives.iter().map(|(m, _)| m.clone()));
    columns.push("params".into());
    report.tables.push(Table {
        title: format!(
            "Pareto front of {}: {} of {} succeeded trials",
            names.join(", "),
            front.len(),
            done.len()
        ),
        columns,
        rows: front
            .iter()
            .map(|(t, _)| {
                let mut row = vec![t.ordinal.to_string()];
                row.extend(objectives.iter().map(|(m, _)| crate::report::cell(t.metric(m))));
                row.push(
                    t.params
                        .as_object()
                        .map(|p| {
                            p.iter()
                                .filter(|(k, _)| spec.sweep.params.contains_key(*k))
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default(),
                );
                row
            })
            .collect(),
    });
    report.pareto = front.iter().map(|(t, _)| t.ordinal).collect();
}

/// ZDT1 (Zitzler, Deb and Thiele, 2000) on four parameters in [0, 1], the two-objective
/// task the searchers are compared on: f1 = x1, f2 = g (1 - sqrt(x1 / g)) with
/// g = 1 + 3 (x2 + x3 + x4). Its front is x2 = x3 = x4 = 0, f2 = 1 - sqrt(f1): up to
/// [`zdt1::REFERENCE`] it bounds a hypervolume of [`zdt1::BEST_HYPERVOLUME`].
pub mod zdt1 {
    use ablate_schema::ParamDomain;
    use serde_json::{json, Map, Value};

    /// The reference point of the hypervolumes compared.
    pub const REFERENCE: [f64; 2] = [1.1, 1.1];
    /// The front's hypervolume up to [`REFERENCE`]: 1.1^2 less the area below the
    /// curve f2 = 1 - sqrt(f1) on [0, 1], which it does not dominate (1/3).
    pub const BEST_HYPERVOLUME: f64 = 1.21 - 1.0 / 3.0;

    pub fn domains() -> Vec<(String, ParamDomain)> {
        (1..=4)
            .map(|i| {
                let domain = ParamDomain::from_value("", &json!({"uniform": [0.0, 1.0]})).expect("a valid domain");
                (format!("x{i}"), domain)
            })
            .collect()
    }

    /// The two objectives (both to minimize) at `p`.
    pub fn objectives(p: &Map<String, Value>) -> Vec<f64> {
        let x = |i: usize| p[&format!("x{i}")].as_f64().unwrap_or(1.0);
        let g = 1.0 + 3.0 * (x(2) + x(3) + x(4));
        vec![x(1), g * (1.0 - (x(1) / g).sqrt())]
    }

    /// The hypervolume a sequential tpe search of `budget` trials reaches (the first
    /// `n_startup` random), each proposal made as the coordinator makes it: every
    /// finished trial's loss its non-dominated rank, ties broken by the scaled sum
    /// (`scalar_losses`), joint over the parameters.
    pub fn tpe_hypervolume(budget: usize, n_startup: usize, seed: u64) -> f64 {
        use crate::tpe::{propose, Observation};
        let domains = domains();
        let mut seen: Vec<(Map<String, Value>, Vec<f64>)> = Vec::new();
        for ordinal in 0..budget {
            let params = if ordinal < n_startup {
                crate::draw::random_point(&domains, seed, ordinal)
            } else {
                let points: Vec<Vec<f64>> = seen.iter().map(|(_, f)| f.clone()).collect();
                let history: Vec<Observation> = seen
                    .iter()
                    .zip(super::scalar_losses(&points))
                    .map(|((p, _), loss)| Observation::new(p.clone(), Some(loss), false))
                    .collect();
                propose(&domains, &history, seed, ordinal, true)
            };
            let f = objectives(&params);
            seen.push((params, f));
        }
        let points: Vec<Vec<f64>> = seen.into_iter().map(|(_, f)| f).collect();
        super::hypervolume_2d(&points, REFERENCE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fronts_and_dominance() {
        let points = vec![
            vec![1.0, 5.0],
            vec![2.0, 2.0],
            vec![5.0, 1.0],
            vec![3.0, 3.0],
            vec![6.0, 6.0],
            vec![2.0, 2.0],
        ];
        assert!(dominates(&points[1], &points[3]));
        assert!(
            !dominates(&points[1], &points[5]),
            "equal points do not dominate each other"
        );
        assert_eq!(ranks(&points), vec![0, 0, 0, 1, 2, 0]);
        let losses = scalar_losses(&points);
        assert!(losses[3] > losses[0] && losses[4] > losses[3]);
        assert!(losses
            .iter()
            .enumerate()
            .all(|(i, l)| (l.floor() as usize) == ranks(&points)[i]));
    }

    #[test]
    fn zdt1_front_bounds_the_best_hypervolume_and_tpe_comes_near_it() {
        // Points on the front, densely: their hypervolume approaches the bound from below.
        let front: Vec<Vec<f64>> = (0..=2000)
            .map(|i| {
                let f1 = i as f64 / 2000.0;
                vec![f1, 1.0 - f1.sqrt()]
            })
            .collect();
        let hv = hypervolume_2d(&front, zdt1::REFERENCE);
        assert!(
            hv < zdt1::BEST_HYPERVOLUME && hv > zdt1::BEST_HYPERVOLUME - 0.002,
            "{hv}"
        );
        // tpe after 60 trials beats random search's 60 (the random start throughout), by median of 5 seeds.
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let tpe = median((0..5).map(|s| zdt1::tpe_hypervolume(60, 10, s)).collect());
        let random = median((0..5).map(|s| zdt1::tpe_hypervolume(60, 60, s)).collect());
        assert!(
            tpe > random && tpe < zdt1::BEST_HYPERVOLUME,
            "tpe {tpe}, random {random}"
        );
    }

    #[test]
    fn hypervolume_of_known_shapes() {
        // One point at the origin against (1, 1): the unit square.
        assert!((hypervolume_2d(&[vec![0.0, 0.0]], [1.0, 1.0]) - 1.0).abs() < 1e-12);
        // A staircase: 0.5 x 1 + 0.5 x 0.5 = 0.75; a dominated point adds nothing.
        let stairs = [vec![0.0, 0.5], vec![0.5, 0.0], vec![0.6, 0.6]];
        assert!((hypervolume_2d(&stairs, [1.0, 1.0]) - 0.75).abs() < 1e-12);
        // Outside the reference: nothing.
        assert_eq!(hypervolume_2d(&[vec![2.0, 0.0]], [1.0, 1.0]), 0.0);
    }
}
