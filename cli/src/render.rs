//! Plain-text tables and the experiment summaries the commands print.

use ablate_schema::proto;

pub use ablate_experiments::report::text_table as table;

/// A JSON value as a table or CSV cell.
pub fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// (finished, total) trials of an experiment.
pub fn progress(c: &proto::TrialCounts) -> (u32, u32) {
    let finished = c.succeeded + c.failed + c.pruned + c.cancelled;
    (finished, finished + c.pending + c.running)
}

fn counts_line(e: &proto::Experiment) -> String {
    let c = e.counts.unwrap_or_default();
    let (_, total) = progress(&c);
    // Pruned: stopped at an ASHA or Hyperband rung (`ablate.rungs` has their values there).
    let pruned = if c.pruned > 0 {
        format!(", {} pruned at a rung", c.pruned)
    } else {
        String::new()
    };
    format!(
        "{total} trials: {} succeeded{pruned}, {} failed, {} running, {} pending, {} cancelled",
        c.succeeded, c.failed, c.running, c.pending, c.cancelled
    )
}

/// The summary printed after a sweep and by `ablate status EXP`.
pub fn experiment_summary(e: &proto::Experiment) -> String {
    let mut out = format!(
        "experiment {} ({}, family {}): {}\n{}\n",
        e.id,
        e.name,
        e.family,
        e.state,
        counts_line(e)
    );
    if !e.tags.is_empty() {
        out.push_str(&format!("tags: {}\n", e.tags.join(", ")));
    }
    if !e.note.is_empty() {
        out.push_str(&format!("note: {}\n", e.note));
    }
    if e.reused > 0 {
        out.push_str(&format!(
            "reused: {} trial(s) took the results of an earlier experiment's instead of running\n",
            e.reused
        ));
    }
    if !e.keep_checkpoints.is_empty() && e.keep_checkpoints != "all" {
        out.push_str(&format!(
            "checkpoints kept per finished trial: {}\n",
            e.keep_checkpoints
        ));
    }
    if !e.waiting.is_empty() {
        out.push_str(&format!("waiting: {}\n", e.waiting));
    }
    if !e.best.is_empty() {
        out.push_str(&format!("\nbest trials by {} ({}):\n", e.objective_metric, e.goal));
        // The "reused from" column only when a trial took another's results.
        let reused = e.best.iter().any(|t| !t.reused_from.is_empty());
        let mut header: Vec<String> = ["rank", "trial", e.objective_metric.as_str(), "params"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if reused {
            header.push("reused from".to_string());
        }
        let rows: Vec<Vec<String>> = e
            .best
            .iter()
            .enumerate()
            .map(|(i, t)| {
                vec![
                    (i + 1).to_string(),
                    t.ordinal.to_string(),
                    t.objective.map(|v| format!("{v:.6}")).unwrap_or_default(),
                    swept_params(&t.params_json, &e.swept_params),
                ]
                .into_iter()
                .chain(reused.then(|| t.reused_from.clone()))
                .collect()
            })
            .collect();
        out.push_str(&table(&header, &rows));
    }
    if !e.pareto.is_empty() {
        // The objective first, then the others by name.
        let objectives: Vec<serde_json::Map<String, serde_json::Value>> = e
            .pareto
            .iter()
            .map(|p| serde_json::from_str(&p.objectives_json).unwrap_or_default())
            .collect();
        let mut names: Vec<String> = objectives[0]
            .keys()
            .filter(|k| **k != e.objective_metric)
            .cloned()
            .collect();
        names.insert(0, e.objective_metric.clone());
        out.push_str(&format!(
            "\nPareto front of {} ({} trials):\n",
            names.join(", "),
            e.pareto.len()
        ));
        let mut header = vec!["trial".to_string()];
        header.extend(names.iter().cloned());
        header.push("params".into());
        let rows: Vec<Vec<String>> = e
            .pareto
            .iter()
            .zip(&objectives)
            .map(|(p, o)| {
                let mut row = vec![p.ordinal.to_string()];
                row.extend(names.iter().map(|n| {
                    o.get(n)
                        .and_then(|v| v.as_f64())
                        // A count (num_params, FLOPs) whole; a loss to 6 places.
                        .map(|v| {
                            if v.fract() == 0.0 && v.abs() < 1e15 {
                                format!("{v:.0}")
                            } else {
                                format!("{v:.6}")
                            }
                        })
                        .unwrap_or_default()
                }));
                row.push(swept_params(&p.params_json, &e.swept_params));
                row
            })
            .collect();
        out.push_str(&table(&header, &rows));
    }
    for f in &e.failures {
        out.push_str(&format!(
            "\ntrial {} failed (attempt {}): {}\n",
            f.ordinal,
            f.attempt,
            f.error.trim()
        ));
    }
    out
}

/// `name=value` for each swept parameter of a trial.
fn swept_params(params_json: &str, swept: &[String]) -> String {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(params_json) {
        Ok(map) => map
            .iter()
            .filter(|(k, _)| swept.is_empty() || swept.contains(k))
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => params_json.to_string(),
    }
}

/// How to look at the results in SQL.
pub fn sql_hint(e: &proto::Experiment) -> String {
    let order = if e.goal == "maximize" { "desc" } else { "asc" };
    format!(
        "\nquery the results in SQL:\n  ablate sql \"select ordinal, params, metrics from ablate.trial_results where experiment_id = '{}' order by objective {order} limit 5\"\n  ablate sql \"select name, step, value from ablate.metric_series where experiment_id = '{}' and name = 'eval_loss' order by step\"\n",
        e.id, e.id
    )
}
