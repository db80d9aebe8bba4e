//! The intrinsic-dimension analysis: mean accuracy against subspace dimension
//! per model and projection, d_int90 with its bracketing points, the verdict
//! and the figure.

use std::collections::BTreeMap;

use super::{ModelKey, ACCURACY, FRACTION};
use crate::report::{
    cell, furthest_from_one, mean, spearman, Criterion, Figure, Panel, Report, ReportError, Series, Table,
    TrialOutcome, Verdict,
};

/// One model's results under one projection.
struct Curve {
    projection: String,
    /// (d, mean accuracy over seeds, seeds).
    points: Vec<(u64, f64, usize)>,
    d_int90: Option<u64>,
}

struct ModelResult {
    key: ModelKey,
    params: Option<f64>,
    baseline: Option<f64>,
    curves: Vec<Curve>,
}

/// The intrinsic-dimension report over a sweep's finished trials.
pub fn analyze(outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
    if outcomes.is_empty() {
        return Err(ReportError("the experiment has no trials to report on".into()));
    }
    // model -> projection -> d -> accuracies; d = 0 is full training.
    let mut grid: BTreeMap<ModelKey, BTreeMap<String, BTreeMap<u64, Vec<f64>>>> = BTreeMap::new();
    let mut baselines: BTreeMap<ModelKey, Vec<f64>> = BTreeMap::new();
    let mut sizes: BTreeMap<ModelKey, f64> = BTreeMap::new();
    let mut failed = 0;
    for t in outcomes {
        let Some(accuracy) = t.metric(ACCURACY).filter(|_| t.state == "succeeded") else {
            failed += 1;
            continue;
        };
        let key = ModelKey::of(t);
        if let Some(d) = t.metric("num_params") {
            sizes.insert(key.clone(), d);
        }
        let dim = t.param_f64("subspace_dim").unwrap_or(0.0) as u64;
        if dim == 0 {
            baselines.entry(key).or_default().push(accuracy);
        } else {
            let projection = t.param_str("projection").unwrap_or("dense").to_string();
            grid.entry(key)
                .or_default()
                .entry(projection)
                .or_default()
                .entry(dim)
                .or_default()
                .push(accuracy);
        }
    }
    if grid.is_empty() {
        return Err(ReportError(
            "no subspace trial finished: give subspace_dim values above 0, and 0 for the full-training baseline".into(),
        ));
    }
    let mnist = outcomes.iter().any(|t| t.param_str("dataset") == Some("mnist"));

    let results: Vec<ModelResult> = grid
        .into_iter()
        .map(|(key, by_projection)| {
            let baseline = baselines.get(&key).and_then(|v| mean(v.iter().copied()));
            let curves = by_projection
                .into_iter()
                .map(|(projection, by_dim)| {
                    let points: Vec<(u64, f64, usize)> = by_dim
                        .iter()
                        .filter_map(|(d, accs)| Some((*d, mean(accs.iter().copied())?, accs.len())))
                        .collect();
                    let d_int90 =
                        baseline.and_then(|b| points.iter().find(|(_, acc, _)| *acc >= FRACTION * b).map(|p| p.0));
                    Curve {
                        projection,
                        points,
                        d_int90,
                    }
                })
                .collect();
            ModelResult {
                params: sizes.get(&key).copied(),
                key,
                baseline,
                curves,
            }
        })
        .collect();

    // Tables.
    let dims: Vec<u64> = {
        let mut all: Vec<u64> = results
            .iter()
            .flat_map(|r| r.curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    };
    let mut accuracy_columns = vec!["model".to_string(), "projection".to_string()];
    accuracy_columns.extend(dims.iter().map(|d| format!("d={d}")));
    accuracy_columns.push("full".into());
    let mut accuracy_rows = Vec::new();
    let mut dint_rows = Vec::new();
    for r in &results {
        for c in &r.curves {
            let mut row = vec![r.key.label(), c.projection.clone()];
            row.extend(dims.iter().map(|d| {
                let acc = c.points.iter().find(|p| p.0 == *d).map(|p| p.1);
                cell(acc)
            }));
            row.push(cell(r.baseline));
            accuracy_rows.push(row);
            let at = c.d_int90.and_then(|d| c.points.iter().position(|p| p.0 == d));
            let bracket = |i: Option<usize>| {
                i.map_or("-".to_string(), |i| {
                    format!("{} ({})", c.points[i].0, cell(Some(c.points[i].1)))
                })
            };
            dint_rows.push(vec![
                r.key.label(),
                c.projection.clone(),
                r.params.map_or("-".into(), |d| format!("{d:.0}")),
                cell(r.baseline),
                cell(r.baseline.map(|b| FRACTION * b)),
                c.d_int90.map_or("not reached".into(), |d| d.to_string()),
                bracket(at.and_then(|i| i.checked_sub(1))),
                bracket(at),
                match (c.d_int90, r.params) {
                    (Some(d), Some(full)) => format!("{:.4}", d as f64 / full),
                    _ => "-".into(),
                },
            ]);
        }
    }

    // Criteria.
    let rho = results
        .iter()
        .flat_map(|r| {
            r.curves.iter().map(|c| {
                let pts: Vec<(f64, f64)> = c.points.iter().map(|p| (p.0 as f64, p.1)).collect();
                spearman(&pts)
            })
        })
        .collect::<Option<Vec<f64>>>()
        .and_then(|v| v.into_iter().min_by(f64::total_cmp));
    let share = results
        .iter()
        .flat_map(|r| r.curves.iter().map(|c| Some(c.d_int90? as f64 / r.params?)))
        .collect::<Option<Vec<f64>>>()
        .and_then(|v| v.into_iter().max_by(f64::total_cmp));
    let mut criteria = vec![
        Criterion::at_least(
            "Spearman(d, accuracy), the smallest over models and projections",
            rho,
            0.9,
        ),
        Criterion::at_most("d_int90 / D, the largest over models and projections", share, 0.05),
    ];
    let d_of = |r: &ModelResult, projection: &str| {
        r.curves
            .iter()
            .find(|c| c.projection == projection)
            .and_then(|c| c.d_int90)
    };
    // Widths: models alike but for their width, under the same projection.
    let mut width_ratios: Vec<Option<f64>> = Vec::new();
    for (i, a) in results.iter().enumerate() {
        for b in &results[i + 1..] {
            if a.key.kind == b.key.kind && a.key.depth == b.key.depth && a.key.width != b.key.width {
                for c in &a.curves {
                    let (x, y) = (c.d_int90, d_of(b, &c.projection));
                    width_ratios.push(x.zip(y).map(|(x, y)| y as f64 / x as f64));
                }
            }
        }
    }
    if !width_ratios.is_empty() {
        let measured = furthest_from_one(width_ratios);
        criteria.push(Criterion::between(
            "d_int90(wider)/d_int90(narrower), the furthest from 1",
            measured,
            0.5,
            2.0,
        ));
    }
    let projection_ratios: Vec<Option<f64>> = results
        .iter()
        .filter(|r| {
            ["fastfood", "dense"]
                .iter()
                .all(|p| r.curves.iter().any(|c| c.projection == *p))
        })
        .map(|r| Some(d_of(r, "fastfood")? as f64 / d_of(r, "dense")? as f64))
        .collect();
    if !projection_ratios.is_empty() {
        let measured = furthest_from_one(projection_ratios);
        criteria.push(Criterion::between(
            "d_int90(fastfood)/d_int90(dense), the furthest from 1",
            measured,
            0.5,
            2.0,
        ));
    }
    if mnist {
        // The paper's MNIST figures: FC 784-200-200-10 about 750, LeNet about 290.
        let first = |kind: &str| {
            results
                .iter()
                .find(|r| r.key.kind == kind)
                .map(|r| d_of(r, "dense").or_else(|| r.curves.iter().find_map(|c| c.d_int90)))
        };
        let (fc, lenet) = (first("mlp"), first("lenet"));
        if let Some(fc) = fc {
            criteria.push(Criterion::between(
                "MNIST FC d_int90 (paper: 750)",
                fc.map(|d| d as f64),
                375.0,
                1500.0,
            ));
        }
        if let Some(lenet) = lenet {
            criteria.push(Criterion::between(
                "MNIST LeNet d_int90 (paper: 290)",
                lenet.map(|d| d as f64),
                145.0,
                580.0,
            ));
            if let Some(fc) = fc {
                criteria.push(Criterion::at_most(
                    "MNIST d_int90(LeNet)/d_int90(FC)",
                    lenet.zip(fc).map(|(l, f)| l as f64 / f as f64),
                    1.0,
                ));
            }
        }
    }
    let verdict = Verdict::new(criteria);

    let headline: Vec<String> = results
        .iter()
        .flat_map(|r| {
            r.curves.iter().map(move |c| {
                format!(
                    "{} {}: {}",
                    r.key.label(),
                    c.projection,
                    c.d_int90.map_or("not reached".into(), |d| d.to_string())
                )
            })
        })
        .collect();
    let mut summary = format!("d_int90: {}", headline.join("; "));
    if failed > 0 {
        summary.push_str(&format!(" ({failed} trials failed or logged no accuracy, left out)"));
    }

    let figures = vec![Figure {
        name: "intrinsic-dim".into(),
        title: "eval accuracy against subspace dimension, 90% of full training marked".into(),
        panels: results
            .iter()
            .map(|r| {
                let mut series: Vec<Series> = r
                    .curves
                    .iter()
                    .map(|c| Series {
                        label: c.projection.clone(),
                        points: c.points.iter().map(|p| (p.0 as f64, p.1)).collect(),
                    })
                    .collect();
                if let (Some(b), Some(lo), Some(hi)) = (r.baseline, dims.first(), dims.last()) {
                    series.push(Series {
                        label: format!("90% of full training ({})", cell(Some(b))),
                        points: vec![(*lo as f64, FRACTION * b), (*hi as f64, FRACTION * b)],
                    });
                }
                Panel {
                    title: r.key.label(),
                    x_label: "subspace dimension d".into(),
                    y_label: "eval accuracy".into(),
                    series,
                    log_x: true,
                    log_y: false,
                }
            })
            .collect(),
    }];

    Ok(Report {
        family: "intrinsic_dim".into(),
        title: "intrinsic dimension".into(),
        summary,
        tables: vec![
            Table {
                title: "mean eval accuracy against subspace dimension (full: every parameter trained)".into(),
                columns: accuracy_columns,
                rows: accuracy_rows,
            },
            Table {
                title: format!("d_int90: the smallest d reaching {FRACTION} x full training's accuracy"),
                columns: [
                    "model",
                    "projection",
                    "D",
                    "full",
                    "threshold",
                    "d_int90",
                    "below (acc)",
                    "at (acc)",
                    "d_int90/D",
                ]
                .map(String::from)
                .to_vec(),
                rows: dint_rows,
            },
        ],
        verdict,
        figures,
        importance: Vec::new(),
        pareto: Vec::new(),
    })
}
