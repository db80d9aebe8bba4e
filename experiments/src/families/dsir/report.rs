//! The DSIR report: KL reduction and target share of both selections,
//! featurization throughput, the downstream perplexities and the verdict.

use serde_json::Value;

use crate::report::{cell, mean, Criterion, Report, ReportError, Table, TrialOutcome, Verdict};

/// The DSIR report: KL reduction and target share of both selections, throughput, and the
/// downstream perplexities.
pub fn analyze(outcomes: &[TrialOutcome]) -> Result<Report, ReportError> {
    let stage = |t: &TrialOutcome| t.param_str("stage").map(String::from);
    let select = outcomes
        .iter()
        .find(|t| stage(t).as_deref() == Some("select"))
        .ok_or_else(|| ReportError("no select trial: not a dsir experiment".into()))?;
    if select.state != "succeeded" {
        return Err(ReportError(format!(
            "the select trial has not succeeded (state {}); see `ablate status` for its error",
            select.state
        )));
    }
    let m = |name: &str| select.metric(name);
    let share_ratio = m("target_share_dsir").zip(m("target_base_rate")).map(|(s, b)| s / b);
    let selection_rows = ["dsir", "random"]
        .iter()
        .map(|s| {
            vec![
                s.to_string(),
                cell(m(&format!("kl_{s}"))),
                cell(m(&format!("kl_reduction_{s}"))),
                cell(m(&format!("target_share_{s}"))),
                cell(m("target_base_rate")),
            ]
        })
        .collect();

    let features: Vec<&TrialOutcome> = outcomes
        .iter()
        .filter(|t| stage(t).as_deref() == Some("features") && t.state == "succeeded")
        .collect();
    let docs: f64 = features.iter().filter_map(|t| t.metric("documents")).sum();
    let per_core = mean(features.iter().filter_map(|t| t.metric("docs_per_s")));

    let mut perplexity = Vec::new();
    let mut lm_rows = Vec::new();
    for selection in ["dsir", "random"] {
        let losses: Vec<f64> = outcomes
            .iter()
            .filter(|t| stage(t).as_deref() == Some("train") && t.param_str("selection") == Some(selection))
            .filter_map(|t| t.metric("eval_loss"))
            .collect();
        let mean_loss = mean(losses.iter().copied());
        let ppl = mean_loss.map(f64::exp);
        perplexity.push(ppl);
        if !losses.is_empty() {
            lm_rows.push(vec![
                selection.to_string(),
                losses.len().to_string(),
                cell(mean_loss),
                cell(ppl),
            ]);
        }
    }

    let mut criteria = vec![
        Criterion::at_least(
            "target share among DSIR's selection / its base rate in the pool",
            share_ratio,
            3.0,
        ),
        Criterion::at_least(
            "KL reduction of DSIR minus that of random selection",
            m("kl_reduction_dsir").zip(m("kl_reduction_random")).map(|(d, r)| d - r),
            1e-9,
        ),
    ];
    if !lm_rows.is_empty() {
        criteria.push(Criterion::at_most(
            "target perplexity of the LM trained on DSIR's selection / on random's",
            perplexity[0].zip(perplexity[1]).map(|(d, r)| d / r),
            1.0,
        ));
    }
    let selection_id = select
        .outputs
        .get("selection")
        .and_then(|v| v.get("manifest"))
        .and_then(Value::as_str)
        .unwrap_or("-");
    Ok(Report {
        family: "dsir".into(),
        title: "data selection with importance resampling".into(),
        summary: format!(
            "{} of {docs:.0} documents selected; KL reduction {} (random {}); selection manifest {selection_id}",
            m("selected").map_or("-".into(), |k| format!("{k:.0}")),
            cell(m("kl_reduction_dsir")),
            cell(m("kl_reduction_random")),
        ),
        tables: vec![
            Table {
                title: format!(
                    "selections (KL(target || raw) = {}; target genre: {})",
                    cell(m("kl_raw")),
                    select.param_str("target_genre").unwrap_or("-")
                ),
                columns: [
                    "selection",
                    "KL(target || selected)",
                    "KL reduction",
                    "target share",
                    "base rate",
                ]
                .map(String::from)
                .to_vec(),
                rows: selection_rows,
            },
            Table {
                title: "featurization".into(),
                columns: ["shards", "documents", "documents/s per core"]
                    .map(String::from)
                    .to_vec(),
                rows: vec![vec![features.len().to_string(), format!("{docs:.0}"), cell(per_core)]],
            },
            Table {
                title: "downstream: the same LM on each selection, evaluated on the target".into(),
                columns: ["trained on", "seeds", "eval loss", "perplexity"]
                    .map(String::from)
                    .to_vec(),
                rows: lm_rows,
            },
        ],
        verdict: Verdict::new(criteria),
        figures: Vec::new(),
        importance: Vec::new(),
        pareto: Vec::new(),
    })
}
