//! The critical-batch analysis: targets per budget, steps-to-target read off
//! the EMA eval-loss curves, the fit S(B) = a + b/B, CBS, B_simple against
//! loss, the verdict and the figures.

use std::collections::BTreeMap;

use super::{CbsSettings, LOSS, NOISE};
use crate::report::{
    cell, fit_line_weighted, furthest_from_one, mean, spearman, Criterion, Figure, Panel, Report, ReportError, Series,
    Table, TrialOutcome, Verdict,
};

/// The loss of `curve` at `step`, linear between evaluations; `None` past its end.
pub fn loss_at(curve: &[(u64, f64)], step: f64) -> Option<f64> {
    let last = curve.last()?;
    if step > last.0 as f64 {
        return None;
    }
    let i = curve.iter().position(|p| p.0 as f64 >= step)?;
    if i == 0 {
        return Some(curve[0].1);
    }
    let ((s0, v0), (s1, v1)) = (curve[i - 1], curve[i]);
    let t = (step - s0 as f64) / (s1 - s0) as f64;
    Some(v0 + t * (v1 - v0))
}

/// The first step at which `curve` reaches `target`, linear between evaluations.
pub fn steps_to(curve: &[(u64, f64)], target: f64) -> Option<f64> {
    let i = curve.iter().position(|p| p.1 <= target)?;
    if i == 0 {
        return Some(curve[0].0 as f64);
    }
    let ((s0, v0), (s1, v1)) = (curve[i - 1], curve[i]);
    Some(s0 as f64 + (v0 - target) / (v0 - v1) * (s1 - s0) as f64)
}

/// One model size of the sweep.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ModelKey {
    width: u64,
    depth: u64,
    kind: String,
}

impl ModelKey {
    fn label(&self) -> String {
        format!("{} width {} depth {}", self.kind, self.width, self.depth)
    }
}

/// Runs of one model, by batch size, then learning rate (as bits), then seeds.
type Runs<'a> = BTreeMap<u32, BTreeMap<u64, Vec<&'a TrialOutcome>>>;

/// S(B) and its fit for one model at one budget.
struct BudgetResult {
    examples: u64,
    target: f64,
    /// (B, S(B) at the best lr, that lr); `None` when no lr reached the target.
    steps: Vec<(u32, Option<(f64, f64)>)>,
    fit: Option<crate::report::LineFit>,
    cbs: Option<f64>,
}

/// The mean over seeds, `None` unless every seed has a value.
fn mean_all(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    mean(values.collect::<Option<Vec<f64>>>()?)
}

fn analyze_budget(runs: &Runs<'_>, b0: u32, examples: u64) -> Option<BudgetResult> {
    let reference = runs.get(&b0)?;
    let at = examples as f64 / b0 as f64;
    let target = reference
        .values()
        .filter_map(|seeds| mean_all(seeds.iter().map(|t| loss_at(t.curve(LOSS), at))))
        .min_by(f64::total_cmp)?;
    let steps: Vec<(u32, Option<(f64, f64)>)> = runs
        .iter()
        .map(|(&b, by_lr)| {
            let best = by_lr
                .iter()
                .filter_map(|(lr, seeds)| {
                    let s = mean_all(seeds.iter().map(|t| steps_to(t.curve(LOSS), target)))?;
                    Some((s, f64::from_bits(*lr)))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0));
            (b, best)
        })
        .collect();
    // Relative errors: S spans orders of magnitude across batch sizes, and each S is read
    // off an evaluation grid of fixed relative resolution.
    let points: Vec<(f64, f64, f64)> = steps
        .iter()
        .filter_map(|(b, s)| s.map(|(s, _)| (1.0 / *b as f64, s, 1.0 / (s * s))))
        .collect();
    let fit = if points.len() >= 3 {
        fit_line_weighted(&points)
    } else {
        None
    };
    let cbs = fit.and_then(|f| (f.intercept > 0.0).then(|| 1.2 * b0 as f64 + 0.2 * f.slope / f.intercept));
    Some(BudgetResult {
        examples,
        target,
        steps,
        fit,
        cbs,
    })
}

fn budget_name(examples: u64, smallest: u64) -> String {
    let ratio = examples as f64 / smallest as f64;
    if ratio == 1.0 {
        "D".into()
    } else if ratio.fract() == 0.0 {
        format!("{ratio}D")
    } else {
        format!("{ratio:.2}D")
    }
}

/// The critical-batch report over a sweep's finished trials.
pub fn analyze(outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
    let first = outcomes
        .first()
        .ok_or_else(|| ReportError("the experiment has no trials to report on".into()))?;
    let settings: CbsSettings = first
        .params
        .get("cbs")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| ReportError("trials lack the `cbs` table: not a critical_batch experiment".into()))?;
    let b0 = settings.reference_batch;
    let smallest = settings.budgets[0];
    let largest = *settings
        .budgets
        .last()
        .ok_or_else(|| ReportError("the `cbs` table has no budgets".into()))?;
    let mut models: BTreeMap<ModelKey, Runs<'_>> = BTreeMap::new();
    let mut failed = 0;
    for t in outcomes {
        if t.state != "succeeded" || t.curve(LOSS).is_empty() {
            failed += 1;
            continue;
        }
        let key = ModelKey {
            width: t.param_f64("width").unwrap_or(64.0) as u64,
            depth: t.param_f64("depth").unwrap_or(2.0) as u64,
            kind: t.param_str("model").unwrap_or("mlp").to_string(),
        };
        let batch = t.param_f64("batch_size").unwrap_or(64.0) as u32;
        let lr = t
            .param_f64("lr")
            .or_else(|| t.param_f64("log2_lr").map(f64::exp2))
            .unwrap_or(f64::NAN);
        models
            .entry(key)
            .or_default()
            .entry(batch)
            .or_default()
            .entry(lr.to_bits())
            .or_default()
            .push(t);
    }
    if models.is_empty() {
        return Err(ReportError("no trial finished with an eval_loss_ema curve".into()));
    }

    let mut results: Vec<(ModelKey, Vec<BudgetResult>)> = Vec::new();
    for (key, runs) in &models {
        if !runs.contains_key(&b0) {
            return Err(ReportError(format!(
                "{}: no finished run at the reference batch {b0}, so no targets",
                key.label()
            )));
        }
        let budgets = settings
            .budgets
            .iter()
            .filter_map(|&d| analyze_budget(runs, b0, d))
            .collect();
        results.push((key.clone(), budgets));
    }

    let batches: Vec<u32> = {
        let mut all: Vec<u32> = models.values().flat_map(|r| r.keys().copied()).collect();
        all.sort_unstable();
        all.dedup();
        all
    };
    let mut steps_columns = vec!["model".to_string(), "budget".to_string(), "target".to_string()];
    steps_columns.extend(batches.iter().map(|b| format!("B={b}")));
    let mut steps_rows = Vec::new();
    let mut fit_rows = Vec::new();
    for (key, budgets) in &results {
        for r in budgets {
            let mut row = vec![key.label(), budget_name(r.examples, smallest), cell(Some(r.target))];
            row.extend(batches.iter().map(|b| match r.steps.iter().find(|(x, _)| x == b) {
                Some((_, Some((s, _)))) => format!("{s:.0}"),
                Some((_, None)) => "not reached".into(),
                None => "-".into(),
            }));
            steps_rows.push(row);
            fit_rows.push(vec![
                key.label(),
                budget_name(r.examples, smallest),
                r.examples.to_string(),
                cell(r.fit.map(|f| f.intercept)),
                cell(r.fit.map(|f| f.slope)),
                r.fit.map_or("-".into(), |f| format!("{:.3}", f.r_squared)),
                r.cbs.map_or("-".into(), |c| format!("{c:.1}")),
            ]);
        }
    }

    // Gradient noise scale against loss along the best run at the reference batch (the lr
    // that sets the largest budget's target), from the smallest budget's target on: the
    // start of training, warmup included, is a transient, and runs at poor learning rates
    // stall or overfit, where B_simple means little.
    let mut noise_rows = Vec::new();
    let mut noise_series = Vec::new();
    let mut correlations = Vec::new();
    for ((key, runs), (_, budgets)) in models.iter().zip(&results) {
        let from = budgets.first().map_or(f64::INFINITY, |r| r.target);
        let at = largest as f64 / b0 as f64;
        let best = runs[&b0].values().min_by(|a, b| {
            let reached = |seeds: &&Vec<&TrialOutcome>| {
                mean_all(seeds.iter().map(|t| loss_at(t.curve(LOSS), at))).unwrap_or(f64::INFINITY)
            };
            reached(a).total_cmp(&reached(b))
        });
        let mut pairs: Vec<(f64, f64)> = Vec::new();
        for t in best.into_iter().flatten() {
            let noise: BTreeMap<u64, f64> = t.curve(NOISE).iter().copied().collect();
            pairs.extend(
                t.curve(LOSS)
                    .iter()
                    .filter_map(|(step, loss)| Some((*loss, *noise.get(step)?)))
                    .filter(|(l, b)| *l <= from && b.is_finite()),
            );
        }
        if pairs.is_empty() {
            continue;
        }
        correlations.push(spearman(&pairs));
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let stride = (pairs.len() / 6).max(1);
        for (loss, b) in pairs.iter().step_by(stride) {
            noise_rows.push(vec![key.label(), cell(Some(*loss)), cell(Some(*b))]);
        }
        noise_series.push(Series {
            label: key.label(),
            points: pairs.iter().filter(|(_, b)| *b > 0.0).copied().collect(),
        });
    }

    // Criteria.
    let worst_r2 = results
        .iter()
        .flat_map(|(_, b)| b.iter().map(|r| r.fit.map(|f| f.r_squared)))
        .collect::<Option<Vec<f64>>>()
        .and_then(|v| v.into_iter().min_by(f64::total_cmp));
    let growth: Option<f64> = results
        .iter()
        .map(|(_, b)| Some(b.last()?.cbs? / b.first()?.cbs?))
        .collect::<Option<Vec<f64>>>()
        .and_then(|v| v.into_iter().min_by(f64::total_cmp));
    let model_ratio: Option<f64> = if results.len() < 2 {
        None
    } else {
        let (narrow, wide) = (&results[0].1, &results[results.len() - 1].1);
        furthest_from_one(settings.budgets.iter().map(|d| {
            let c = |rs: &Vec<BudgetResult>| rs.iter().find(|r| r.examples == *d)?.cbs;
            Some(c(wide)? / c(narrow)?)
        }))
    };
    let noise_rho = correlations
        .iter()
        .copied()
        .collect::<Option<Vec<f64>>>()
        .and_then(|v| v.into_iter().max_by(f64::total_cmp));
    let criteria = vec![
        Criterion::at_least("fit R^2 of S(B) = a + b/B (worst model and budget)", worst_r2, 0.9),
        Criterion::at_least(
            format!(
                "CBS({})/CBS(D), the smallest over models",
                budget_name(largest, smallest)
            ),
            growth,
            2.0,
        ),
        Criterion::between(
            "CBS(widest)/CBS(narrowest) at equal D, the furthest from 1",
            model_ratio,
            0.5,
            2.0,
        ),
        Criterion::at_most(
            "Spearman(eval loss, B_simple) along the best reference run, the largest over models (B_simple rises as loss falls)",
            noise_rho,
            -0.7,
        ),
    ];
    let verdict = Verdict::new(criteria);

    let cbs_line: Vec<String> = results
        .iter()
        .map(|(key, b)| {
            let values: Vec<String> = b
                .iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        budget_name(r.examples, smallest),
                        r.cbs.map_or("-".into(), |c| format!("{c:.0}"))
                    )
                })
                .collect();
            format!("{}: {}", key.label(), values.join(", "))
        })
        .collect();
    let mut summary = format!("CBS by budget: {}", cbs_line.join("; "));
    if failed > 0 {
        summary.push_str(&format!(" ({failed} trials failed or logged no curve, left out)"));
    }

    // Figures.
    let steps_panels = results
        .iter()
        .map(|(key, budgets)| Panel {
            title: key.label(),
            x_label: "batch size".into(),
            y_label: "steps to target".into(),
            series: budgets
                .iter()
                .map(|r| Series {
                    label: budget_name(r.examples, smallest),
                    points: r
                        .steps
                        .iter()
                        .filter_map(|(b, s)| s.map(|(s, _)| (*b as f64, s)))
                        .collect(),
                })
                .collect(),
            log_x: true,
            log_y: true,
        })
        .collect();
    let cbs_vs_data = Panel {
        title: "CBS against data".into(),
        x_label: "data budget (examples)".into(),
        y_label: "critical batch size".into(),
        series: results
            .iter()
            .map(|(key, b)| Series {
                label: key.label(),
                points: b.iter().filter_map(|r| Some((r.examples as f64, r.cbs?))).collect(),
            })
            .collect(),
        log_x: true,
        log_y: true,
    };
    let cbs_vs_model = Panel {
        title: "CBS against model size".into(),
        x_label: "width".into(),
        y_label: "critical batch size".into(),
        series: settings
            .budgets
            .iter()
            .map(|d| Series {
                label: budget_name(*d, smallest),
                points: results
                    .iter()
                    .filter_map(|(key, b)| Some((key.width as f64, b.iter().find(|r| r.examples == *d)?.cbs?)))
                    .collect(),
            })
            .collect(),
        log_x: true,
        log_y: true,
    };
    let figures = vec![
        Figure {
            name: "cbs-steps".into(),
            title: "steps to target against batch size, one curve per data budget".into(),
            panels: steps_panels,
        },
        Figure {
            name: "cbs-scaling".into(),
            title: "critical batch size against data and against model size".into(),
            panels: vec![cbs_vs_data, cbs_vs_model],
        },
        Figure {
            name: "b-simple".into(),
            title: "gradient noise scale against eval loss at the reference batch".into(),
            panels: vec![Panel {
                title: format!("B_simple, batch {b0}"),
                x_label: "eval loss (EMA weights)".into(),
                y_label: "B_simple".into(),
                series: noise_series,
                log_x: false,
                log_y: true,
            }],
        },
    ];

    Ok(Report {
        family: "critical_batch".into(),
        title: "critical batch size".into(),
        summary,
        tables: vec![
            Table {
                title: format!("steps to target S(B), best lr per batch size (reference batch {b0})"),
                columns: steps_columns,
                rows: steps_rows,
            },
            Table {
                title: "fit S(B) = a + b/B and CBS = 1.2*B0 + 0.2*b/a".into(),
                columns: ["model", "budget", "examples", "a", "b", "R^2", "CBS"]
                    .map(String::from)
                    .to_vec(),
                rows: fit_rows,
            },
            Table {
                title: format!("gradient noise scale B_simple against eval loss (best run at batch {b0})"),
                columns: ["model", "eval_loss_ema", "B_simple"].map(String::from).to_vec(),
                rows: noise_rows,
            },
        ],
        verdict,
        figures,
        importance: Vec::new(),
        pareto: Vec::new(),
    })
}
