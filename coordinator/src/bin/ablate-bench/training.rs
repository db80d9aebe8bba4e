//! The worker's rows: a training step in tch beside PyTorch, fused trials beside
//! one at a time, the critical-batch stop rule.

use super::*;

/// cbs-mnist run whole and under the stop rule (`cbs.stop_at_targets`): the steps each spent,
/// the wall time, and whether the steps-to-target tables are the same.
/// Trials per hour of the muP width sweep's MLPs, fused in groups of 8 and one by one
/// (`ablate-worker bench-fused`: the trial code itself, in one process, on the CPU).
pub(super) fn fused_rows() -> Result<Vec<Row>> {
    let bin = std::env::var("ABLATE_WORKER_BIN").map_err(|_| "set ABLATE_WORKER_BIN (cargo xtask bench does)")?;
    let out = std::process::Command::new(&bin)
        .args(["bench-fused", "--members", "8", "--threads", "1"])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "ablate-worker bench-fused: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|line| -> Result<Row> {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let figure = |k: &str| {
                v[k].as_f64()
                    .ok_or_else(|| format!("bench-fused printed no {k}: {line}"))
            };
            Ok(Row::new(
                format!("width {} MLP, fused x{}", v["width"], v["members"]),
                figure("fused_trials_per_hour")?,
                "trials/h",
            )
            .peer("one by one", figure("unfused_trials_per_hour")))
        })
        .collect()
}

pub(super) fn stop_rule_rows() -> Result<Vec<Row>> {
    let bin = std::env::var("ABLATE_WORKER_BIN").map_err(|_| "set ABLATE_WORKER_BIN (cargo xtask bench does)")?;
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/specs/cbs-mnist.toml");
    let run = |sets: &[&str]| -> Result<(serde_json::Value, u64, f64)> {
        let out = std::env::temp_dir().join(format!("ablate-bench-cbs-{}-{}.json", std::process::id(), sets.len()));
        let start = Instant::now();
        let status = std::process::Command::new(&bin)
            .args([
                "sweep",
                &spec.to_string_lossy(),
                "--devices",
                "cpu:2",
                "--out",
                &out.to_string_lossy(),
            ])
            .args(sets)
            .stdout(std::process::Stdio::null())
            .status()?;
        let wall = start.elapsed().as_secs_f64();
        if !status.success() {
            return Err(format!("ablate-worker sweep cbs-mnist: {status}").into());
        }
        let result: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
        let _ = std::fs::remove_file(&out);
        let steps = result["trials"]
            .as_array()
            .ok_or("no trials in the sweep's output")?
            .iter()
            .map(|t| match t["outputs"]["stopped_early"]["step"].as_u64() {
                Some(step) => step,
                None => {
                    let p = &t["params"];
                    let by_examples = p["examples"]
                        .as_u64()
                        .unwrap_or(0)
                        .div_ceil(p["batch_size"].as_u64().unwrap_or(1));
                    p["steps"].as_u64().unwrap_or(0).max(by_examples)
                }
            })
            .sum();
        Ok((result["report"]["tables"][0].clone(), steps, wall))
    };
    let (full_table, full_steps, full_wall) = run(&[])?;
    let (table, steps, wall) = run(&["--set", "base.cbs.stop_at_targets=true"])?;
    let same = if table == full_table {
        "the same steps-to-target table".to_string()
    } else {
        format!("THE STEPS-TO-TARGET TABLES DIFFER: {table} against {full_table}")
    };
    Ok(vec![
        Row::new("training steps, with the stop rule", steps as f64, "steps")
            .lower_is_better()
            .peer("without it", Ok(full_steps as f64))
            .note(same),
        Row::new("wall time, with the stop rule", wall, "s")
            .lower_is_better()
            .peer("without it", Ok(full_wall)),
    ])
}

/// Steps/s of one training step, ours (ablate-worker bench-step) beside PyTorch's.
pub(super) fn training_steps() -> Vec<Row> {
    // (model, extra arguments, what, threads, steps): a small MLP (dispatch-bound),
    // the quickstart-sized one, and a small GPT (kernel-bound).
    let cases: [(&str, &[&str], &str, &str, &str); 4] = [
        (
            "mlp",
            &["--width", "32", "--batch", "32"],
            "MLP 64-32-32-10, batch 32",
            "1",
            "2000",
        ),
        (
            "mlp",
            &["--width", "256", "--batch", "128"],
            "MLP 64-256-256-10, batch 128",
            "1",
            "500",
        ),
        ("gpt", &[], "char GPT 2x128, ctx 64, batch 32", "1", "50"),
        ("gpt", &[], "char GPT 2x128, ctx 64, batch 32", "2", "50"),
    ];
    let median = |mut runs: Vec<f64>| {
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    };
    let mut rows = Vec::new();
    for (model, extra, what, threads, steps) in cases {
        let mut args = vec!["--model", model, "--threads", threads, "--steps", steps];
        args.extend_from_slice(extra);
        let ours = || -> std::result::Result<f64, String> {
            let bin = std::env::var("ABLATE_WORKER_BIN").map_err(|_| "set ABLATE_WORKER_BIN".to_string())?;
            let mut runs = Vec::new();
            for _ in 0..3 {
                let out = std::process::Command::new(&bin)
                    .arg("bench-step")
                    .args(&args)
                    .output()
                    .map_err(|e| e.to_string())?;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .map_err(|e| format!("bench-step: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
                runs.push(field(&v, "rate")?);
            }
            Ok(median(runs))
        };
        let theirs = || -> std::result::Result<f64, String> {
            let mut peer_args = vec!["torch-step"];
            peer_args.extend_from_slice(&args);
            let mut runs = Vec::new();
            for _ in 0..3 {
                runs.push(field(&peer(&peer_args)?, "rate")?);
            }
            Ok(median(runs))
        };
        let name = format!("train step + Adam, {what}, {threads} thr");
        match ours() {
            Ok(rate) => rows.push(Row::new(name, rate, "steps/s").peer("PyTorch 2.11, Python", theirs())),
            Err(why) => rows.push(Row::new(name, 0.0, "steps/s").note(format!("ours not measured: {why}"))),
        }
    }
    rows
}
