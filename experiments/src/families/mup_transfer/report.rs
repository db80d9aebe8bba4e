//! The `mup_transfer` family's analysis: the best learning rate per width (or
//! depth) for each parametrization, its spread across the sweep, the
//! coordinate check's slopes, and the verdict against CRITERIA.md section 1.
//!
//! Trials are `train` trials with a `parametrization`; the sweep axis is width
//! when several widths appear, depth otherwise. Seeds are averaged first.
//! Trials without the objective (diverged, failed) count as infinitely bad.

use std::collections::BTreeMap;

use crate::report::{slope, Criterion, Figure, Panel, Report, ReportError, Series, Table, TrialOutcome, Verdict};

/// Relative tolerance when asking whether the best loss rose with width.
const LOSS_RISE_TOLERANCE: f64 = 0.005;

/// The objective a transfer sweep ranks learning rates by.
pub const OBJECTIVE: &str = "train_loss_final";

fn key(v: f64) -> i64 {
    (v * 1e6).round() as i64
}

/// Mean objective by (parametrization, axis value, log2 lr): (log2 lr, mean loss).
type Grid = BTreeMap<String, BTreeMap<i64, BTreeMap<i64, (f64, f64)>>>;
/// As [`Grid`], while summing: (log2 lr, sum of losses, count).
type Sums = BTreeMap<String, BTreeMap<i64, BTreeMap<i64, (f64, f64, usize)>>>;
/// Coordinate-check slopes by parametrization: (layer, slope).
type Slopes = BTreeMap<String, Vec<(usize, f64)>>;

struct Best {
    axis: f64,
    log2_lr: f64,
    loss: f64,
}

fn axis_of(trials: &[&TrialOutcome]) -> &'static str {
    let widths: std::collections::BTreeSet<i64> = trials.iter().filter_map(|t| t.param_f64("width")).map(key).collect();
    if widths.len() > 1 {
        "width"
    } else {
        "depth"
    }
}

fn log2_lr(t: &TrialOutcome) -> Option<f64> {
    t.param_f64("log2_lr").or_else(|| t.param_f64("lr").map(f64::log2))
}

fn parametrization(t: &TrialOutcome) -> String {
    t.param_str("parametrization").unwrap_or("sp").to_string()
}

/// Mean loss per (parametrization, axis, lr), seeds averaged; missing objectives are +inf.
fn grid(trials: &[&TrialOutcome], axis: &str) -> Grid {
    let mut sums: Sums = BTreeMap::new();
    for t in trials {
        let (Some(a), Some(lr)) = (t.param_f64(axis), log2_lr(t)) else {
            continue;
        };
        let loss = t
            .metric(OBJECTIVE)
            .filter(|v| v.is_finite() && t.state == "succeeded")
            .unwrap_or(f64::INFINITY);
        let cell = sums
            .entry(parametrization(t))
            .or_default()
            .entry(key(a))
            .or_default()
            .entry(key(lr))
            .or_insert((lr, 0.0, 0));
        cell.1 += loss;
        cell.2 += 1;
    }
    sums.into_iter()
        .map(|(p, by_axis)| {
            let by_axis = by_axis
                .into_iter()
                .map(|(a, by_lr)| {
                    (
                        a,
                        by_lr
                            .into_iter()
                            .map(|(k, (lr, s, n))| (k, (lr, s / n as f64)))
                            .collect(),
                    )
                })
                .collect();
            (p, by_axis)
        })
        .collect()
}

fn bests(by_axis: &BTreeMap<i64, BTreeMap<i64, (f64, f64)>>) -> Vec<Best> {
    by_axis
        .iter()
        .filter_map(|(a, by_lr)| {
            by_lr
                .values()
                .filter(|(_, loss)| loss.is_finite())
                .min_by(|x, y| x.1.total_cmp(&y.1))
                .map(|(lr, loss)| Best {
                    axis: *a as f64 / 1e6,
                    log2_lr: *lr,
                    loss: *loss,
                })
        })
        .collect()
}

fn grid_step(trials: &[&TrialOutcome]) -> f64 {
    let mut lrs: Vec<f64> = trials.iter().filter_map(|t| log2_lr(t)).collect();
    lrs.sort_by(f64::total_cmp);
    lrs.dedup_by(|a, b| key(*a) == key(*b));
    lrs.windows(2).map(|w| w[1] - w[0]).fold(f64::INFINITY, f64::min)
}

fn spread(best: &[Best], step: f64) -> Option<f64> {
    if best.len() < 2 || !step.is_finite() {
        return None;
    }
    let max = best.iter().map(|b| b.log2_lr).fold(f64::NEG_INFINITY, f64::max);
    let min = best.iter().map(|b| b.log2_lr).fold(f64::INFINITY, f64::min);
    Some(((max - min) / step).round())
}

/// The spread criteria and their summary line ("transfer holds: muP spread 0
/// steps, SP 3 steps"): the transferring side stays within one grid step, the
/// control side moves at least two.
fn spread_verdict(
    headline: &str,
    across: &str,
    transfer: (&str, Option<f64>),
    control: (&str, Option<f64>),
) -> (Vec<Criterion>, String) {
    let name = |label: &str| format!("{label} spread of best log2 lr across {across} (steps)");
    let criteria = vec![
        Criterion::at_most(name(transfer.0), transfer.1, 1.0),
        Criterion::at_least(name(control.0), control.1, 2.0),
    ];
    let show = |s: Option<f64>| s.map_or("?".to_string(), |s| s.to_string());
    let line = format!(
        "{headline} {}: {} spread {} steps, {} {} steps",
        if criteria.iter().all(|c| c.holds) {
            "holds"
        } else {
            "does not hold"
        },
        transfer.0,
        show(transfer.1),
        control.0,
        show(control.1)
    );
    (criteria, line)
}

fn fmt_axis(v: f64) -> String {
    format!("{v}")
}

pub fn analyze(outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
    let sweep: Vec<&TrialOutcome> = outcomes
        .iter()
        .filter(|t| t.params.get("coord_check").and_then(|v| v.as_bool()) != Some(true))
        .collect();
    let coord: Vec<&TrialOutcome> = outcomes
        .iter()
        .filter(|t| t.params.get("coord_check").and_then(|v| v.as_bool()) == Some(true))
        .collect();
    if sweep.is_empty() && coord.is_empty() {
        return Err(ReportError("the experiment has no trials to report on".into()));
    }
    let mut tables = Vec::new();
    let mut figures = Vec::new();
    let mut criteria = Vec::new();
    let mut summary = Vec::new();

    if !sweep.is_empty() {
        let axis = axis_of(&sweep);
        let step = grid_step(&sweep);
        let grid = grid(&sweep, axis);
        let best: BTreeMap<&String, Vec<Best>> = grid.iter().map(|(p, by_axis)| (p, bests(by_axis))).collect();
        let names: Vec<&String> = best.keys().copied().collect();
        let axes: Vec<f64> = {
            let mut a: Vec<f64> = best.values().flatten().map(|b| b.axis).collect();
            a.sort_by(f64::total_cmp);
            a.dedup();
            a
        };
        let mut columns = vec![axis.to_string()];
        for p in &names {
            columns.push(format!("{p} best log2 lr"));
            columns.push(format!("{p} best {OBJECTIVE}"));
        }
        let rows = axes
            .iter()
            .map(|a| {
                let mut row = vec![fmt_axis(*a)];
                for p in &names {
                    match best[p].iter().find(|b| b.axis == *a) {
                        Some(b) => {
                            row.push(format!("{}", b.log2_lr));
                            row.push(format!("{:.4}", b.loss));
                        }
                        None => row.extend(["diverged".to_string(), "-".to_string()]),
                    }
                }
                row
            })
            .collect();
        tables.push(Table {
            title: format!("best log2 learning rate per {axis} (mean of seeds)"),
            columns,
            rows,
        });
        let spreads: BTreeMap<&String, Option<f64>> = best.iter().map(|(p, b)| (*p, spread(b, step))).collect();
        tables.push(Table {
            title: format!("spread of the best log2 lr across {axis}s, in grid steps of {step}"),
            columns: vec!["parametrization".into(), "spread (steps)".into()],
            rows: spreads
                .iter()
                .map(|(p, s)| vec![p.to_string(), s.map(|s| s.to_string()).unwrap_or("-".into())])
                .collect(),
        });
        let get = |p: &str| spreads.iter().find(|(k, _)| k.as_str() == p).and_then(|(_, s)| *s);
        if axis == "width" {
            let (spread_criteria, line) = spread_verdict("transfer", "widths", ("muP", get("mup")), ("SP", get("sp")));
            criteria.extend(spread_criteria);
            summary.push(line);
            let sp_increases = best
                .iter()
                .find(|(p, _)| p.as_str() == "sp")
                .map(|(_, b)| b.windows(2).filter(|w| w[1].log2_lr > w[0].log2_lr).count() as f64);
            criteria.push(Criterion::at_most(
                "times SP's best lr increases with width",
                sp_increases,
                0.0,
            ));
            let mup_rises = best.iter().find(|(p, _)| p.as_str() == "mup").map(|(_, b)| {
                b.windows(2)
                    .filter(|w| w[1].loss > w[0].loss * (1.0 + LOSS_RISE_TOLERANCE))
                    .count() as f64
            });
            criteria.push(Criterion::at_most(
                "times muP's best loss rises with width (0.5% tolerance)",
                mup_rises,
                0.0,
            ));
        } else {
            let (spread_criteria, line) = spread_verdict(
                "depth transfer",
                "depths",
                ("depth-muP", get("depth_mup")),
                ("muP without 1/sqrt(L)", get("mup")),
            );
            criteria.extend(spread_criteria);
            summary.push(line);
        }
        figures.push(Figure {
            name: "loss-vs-lr".into(),
            title: format!("{OBJECTIVE} against log2 learning rate, one curve per {axis}"),
            panels: grid
                .iter()
                .map(|(p, by_axis)| Panel {
                    title: p.clone(),
                    x_label: "log2 learning rate".into(),
                    y_label: OBJECTIVE.into(),
                    series: by_axis
                        .iter()
                        .map(|(a, by_lr)| Series {
                            label: format!("{axis} {}", fmt_axis(*a as f64 / 1e6)),
                            points: by_lr.values().filter(|(_, l)| l.is_finite()).copied().collect(),
                        })
                        .collect(),
                    log_x: false,
                    log_y: false,
                })
                .collect(),
        });
    }

    if !coord.is_empty() {
        let (table, panels, slopes) = coord_check(&coord);
        tables.push(table);
        let mup_max = slopes
            .get("mup")
            .map(|s| s.iter().map(|(_, v)| v.abs()).fold(0.0, f64::max));
        let sp_output = slopes.get("sp").and_then(|s| s.last()).map(|(_, v)| *v);
        criteria.push(Criterion::at_most(
            "coord check: largest |slope| of any layer under muP",
            mup_max,
            0.15,
        ));
        criteria.push(Criterion::at_least(
            "coord check: slope of SP's output layer",
            sp_output,
            0.5,
        ));
        summary.push(format!(
            "coord check: muP max |slope| {}, SP output slope {}",
            mup_max.map_or("?".into(), |v| format!("{v:.3}")),
            sp_output.map_or("?".into(), |v| format!("{v:.3}"))
        ));
        figures.push(Figure {
            name: "coord-check".into(),
            title: "log2 mean |activation| against log2 width at the last logged step".into(),
            panels,
        });
    }

    Ok(Report {
        family: "mup_transfer".into(),
        title: "muP width and depth transfer".into(),
        summary: summary.join("; "),
        tables,
        verdict: Verdict::new(criteria),
        figures,
        importance: Vec::new(),
        pareto: Vec::new(),
    })
}

/// Slope of log2 mean |act| against log2 width per layer and parametrization.
fn coord_check(coord: &[&TrialOutcome]) -> (Table, Vec<Panel>, Slopes) {
    // (parametrization, layer) -> width -> values over seeds
    let mut acts: BTreeMap<(String, usize), BTreeMap<i64, Vec<f64>>> = BTreeMap::new();
    for t in coord {
        let Some(width) = t.param_f64("width") else { continue };
        for (name, value) in &t.metrics {
            let (Some(layer), Some(v)) = (name.strip_prefix("act.").and_then(|l| l.parse().ok()), value.as_f64())
            else {
                continue;
            };
            acts.entry((parametrization(t), layer))
                .or_default()
                .entry(key(width))
                .or_default()
                .push(v);
        }
    }
    let mut slopes: Slopes = BTreeMap::new();
    let mut panels: BTreeMap<String, Panel> = BTreeMap::new();
    for ((p, layer), by_width) in &acts {
        let points: Vec<(f64, f64)> = by_width
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(w, v)| {
                (
                    (*w as f64 / 1e6).log2(),
                    (v.iter().sum::<f64>() / v.len() as f64).log2(),
                )
            })
            .filter(|(_, y)| y.is_finite())
            .collect();
        if let Some(s) = slope(&points) {
            slopes.entry(p.clone()).or_default().push((*layer, s));
        }
        panels
            .entry(p.clone())
            .or_insert_with(|| Panel {
                title: p.clone(),
                x_label: "log2 width".into(),
                y_label: "log2 mean |activation|".into(),
                series: Vec::new(),
                log_x: false,
                log_y: false,
            })
            .series
            .push(Series {
                label: format!("layer {layer}"),
                points,
            });
    }
    let layers = slopes.values().map(|s| s.len()).max().unwrap_or(0);
    let mut columns = vec!["parametrization".to_string()];
    columns.extend((0..layers).map(|l| {
        if l + 1 == layers {
            format!("layer {l} (output)")
        } else {
            format!("layer {l}")
        }
    }));
    let rows = slopes
        .iter()
        .map(|(p, s)| {
            let mut row = vec![p.clone()];
            row.extend(s.iter().map(|(_, v)| format!("{v:.3}")));
            row
        })
        .collect();
    let table = Table {
        title: "coordinate check: slope of log2 mean |activation| against log2 width".into(),
        columns,
        rows,
    };
    (table, panels.into_values().collect(), slopes)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn trial(p: &str, width: u32, log2_lr: i32, loss: Option<f64>) -> TrialOutcome {
        let mut metrics = serde_json::Map::new();
        if let Some(l) = loss {
            metrics.insert(OBJECTIVE.into(), json!(l));
        }
        TrialOutcome {
            ordinal: 0,
            state: "succeeded".into(),
            params: json!({"parametrization": p, "width": width, "log2_lr": log2_lr}),
            metrics,
            series: Default::default(),
            outputs: Default::default(),
        }
    }

    #[test]
    fn spreads_and_the_verdict_come_from_the_best_lr_per_width() {
        let mut trials = Vec::new();
        for (i, width) in [32u32, 64, 128, 256].into_iter().enumerate() {
            for lr in -8..=-2 {
                // SP's optimum moves one step down per doubling; muP's stays at -5.
                let sp_best = -3 - i as i32;
                trials.push(trial(
                    "sp",
                    width,
                    lr,
                    Some(1.0 + 0.1 * ((lr - sp_best) as f64).powi(2)),
                ));
                let mup_loss = 1.0 + 0.1 * ((lr + 5) as f64).powi(2) - 0.01 * i as f64;
                trials.push(trial(
                    "mup",
                    width,
                    lr,
                    if lr == -2 && width == 256 { None } else { Some(mup_loss) },
                ));
            }
        }
        let report = analyze(&trials).unwrap();
        let spread_table = &report.tables[1];
        assert_eq!(
            spread_table.rows,
            vec![vec!["mup".to_string(), "0".into()], vec!["sp".into(), "3".into()]]
        );
        assert!(report.verdict.holds, "{:#?}", report.verdict);
        assert_eq!(report.summary, "transfer holds: muP spread 0 steps, SP 3 steps");
        assert_eq!(report.figures[0].panels.len(), 2);

        // If muP's optimum drifts too, the verdict says so.
        let drifted: Vec<TrialOutcome> = trials
            .iter()
            .cloned()
            .map(|mut t| {
                if t.param_str("parametrization") == Some("mup") {
                    t.params["parametrization"] = json!("sp_copy");
                }
                t
            })
            .collect();
        let report = analyze(&drifted).unwrap();
        assert!(!report.verdict.holds);
        assert_eq!(
            report.verdict.criteria[0].measured, None,
            "no muP trials, nothing measured"
        );
    }
}
