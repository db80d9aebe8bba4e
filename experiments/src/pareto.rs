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
