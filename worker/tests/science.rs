//! The science families' pass criteria (CRITERIA.md), checked on the real
//! trial code: each spec in experiments/specs is checked and expanded as the
//! coordinator does, every trial runs in-process (`ablate-worker sweep`)
//! through the same trial function as the trial processes, and the family's
//! report gives the verdict.

use std::path::Path;

use ablate_experiments::report::{Criterion, Report, TrialOutcome};
use ablate_schema::SpecFormat;
use ablate_worker::backend::Slot;

/// Runs every trial of a spec in-process on `threads` CPU slots of one libtorch thread each.
fn run_spec(name: &str, threads: usize) -> (Report, Vec<TrialOutcome>) {
    run_spec_logged(name, threads, None)
}

fn run_spec_logged(name: &str, threads: usize, log: Option<&Path>) -> (Report, Vec<TrialOutcome>) {
    run_spec_set(name, threads, log, &[])
}

/// Runs a spec with `--set` overrides (`PATH=VALUE`).
fn run_spec_set(name: &str, threads: usize, log: Option<&Path>, sets: &[String]) -> (Report, Vec<TrialOutcome>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../experiments/specs")
        .join(name);
    let mut text = std::fs::read_to_string(&path).unwrap();
    let mut format = SpecFormat::Toml;
    if !sets.is_empty() {
        text = ablate_schema::spec::apply_overrides(&text, format, sets).unwrap();
        format = SpecFormat::Yaml;
    }
    let slots: Vec<Slot> = (0..threads)
        .map(|i| Slot::new(format!("cpu:{i}"), "cpu".into(), 1))
        .collect();
    let options = ablate_worker::local::Options {
        log: log.map(Path::to_path_buf),
        ..Default::default()
    };
    ablate_worker::local::run(&text, format, &slots, &options).unwrap()
}

/// Training steps a critical-batch sweep spent: each run's steps, or where the stop rule ended it.
fn steps_spent(outcomes: &[TrialOutcome]) -> u64 {
    outcomes
        .iter()
        .map(|t| match t.outputs.get("stopped_early") {
            Some(stop) => stop["step"].as_u64().unwrap(),
            None => {
                let (p, _) = ablate_experiments::families::critical_batch::split(&t.params).unwrap();
                p.total_steps()
            }
        })
        .sum()
}

/// A run's parameters but its `cbs` table (where the stop rule is asked for).
fn without_cbs(params: &serde_json::Value) -> serde_json::Value {
    let mut params = params.clone();
    if let Some(map) = params.as_object_mut() {
        map.remove("cbs");
    }
    params
}

/// Runs a critical-batch spec again with the stop rule (`cbs.stop_at_targets`), with `sets`
/// (such as one model of the spec's): the same rows of steps-to-target for those models,
/// for fewer steps, both printed.
fn stop_rule_keeps_the_table(name: &str, full: &(Report, Vec<TrialOutcome>), sets: &[&str]) {
    let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    sets.push("base.cbs.stop_at_targets=true".to_string());
    let stopping = run_spec_set(name, 2, None, &sets);
    // The same computation per model: only the models it ran are compared.
    let models: std::collections::BTreeSet<&String> = stopping.0.tables[0].rows.iter().map(|r| &r[0]).collect();
    let full_rows: Vec<&Vec<String>> = full.0.tables[0]
        .rows
        .iter()
        .filter(|r| models.contains(&r[0]))
        .collect();
    let full_outcomes: Vec<TrialOutcome> = full
        .1
        .iter()
        .filter(|t| {
            stopping
                .1
                .iter()
                .any(|s| without_cbs(&s.params) == without_cbs(&t.params))
        })
        .cloned()
        .collect();
    assert_eq!(full_outcomes.len(), stopping.1.len(), "the runs are the full sweep's");
    let (with, without) = (steps_spent(&stopping.1), steps_spent(&full_outcomes));
    let stopped = stopping
        .1
        .iter()
        .filter(|t| t.outputs.contains_key("stopped_early"))
        .count();
    eprintln!(
        "{name}: {without} steps without the stop rule, {with} with it ({:.0}%; {stopped} of {} runs stopped early)",
        100.0 * with as f64 / without as f64,
        stopping.1.len()
    );
    eprintln!(
        "{}",
        ablate_experiments::report::text_table(&stopping.0.tables[0].columns, &stopping.0.tables[0].rows)
    );
    assert!(!full_rows.is_empty(), "no model of the stop-rule run in the full table");
    assert_eq!(stopping.0.tables[0].columns, full.0.tables[0].columns);
    assert_eq!(
        stopping.0.tables[0].rows.iter().collect::<Vec<_>>(),
        full_rows,
        "steps to target differ under the stop rule"
    );
    assert!(with < without, "the stop rule saved nothing: {with} steps");
    assert!(stopping.1.iter().all(|t| t.state == "succeeded"));
}

fn show(report: &Report) -> String {
    serde_json::to_string_pretty(&(&report.summary, &report.tables, &report.verdict)).unwrap()
}

/// Asserts that every named criterion (matched by the start of its name) holds.
fn assert_hold(report: &Report, names: &[&str]) {
    for name in names {
        let c = criterion(report, name);
        assert!(c.holds, "{name}: {}", show(report));
    }
}

fn criterion<'a>(report: &'a Report, starts: &str) -> &'a Criterion {
    report
        .verdict
        .criteria
        .iter()
        .find(|c| c.name.starts_with(starts))
        .unwrap_or_else(|| panic!("no criterion `{starts}` in {}", show(report)))
}

#[test]
fn mup_width_transfer_holds_on_digits() {
    let (report, outcomes) = run_spec("mup-width-digits.toml", 2);
    assert_eq!(outcomes.len(), 260);
    eprintln!("{}", show(&report));
    // The spec starts muP's readout at zero, so at the base width muP starts from other
    // weights than SP (the default widened form equals SP there; see the trial tests).
    let base = |p: &str| {
        let mut v: Vec<(i64, i64, u64)> = outcomes
            .iter()
            .filter(|t| t.param_f64("width") == Some(32.0) && t.param_str("parametrization") == Some(p))
            .map(|t| {
                let lr = t.param_f64("log2_lr").unwrap() as i64;
                let seed = t.param_f64("seed").unwrap() as i64;
                (lr, seed, t.metric("train_loss_final").map_or(0, f64::to_bits))
            })
            .collect();
        v.sort();
        v
    };
    assert_ne!(base("sp"), base("mup"), "a zero readout is not SP's readout");
    assert_hold(
        &report,
        &[
            "muP spread",
            "SP spread",
            "times SP's best lr increases",
            "times muP's best loss rises",
        ],
    );
    assert!(report.verdict.holds, "{}", show(&report));
}

#[test]
fn the_coordinate_check_is_flat_under_mup_and_grows_under_sp() {
    let log = std::env::temp_dir().join(format!("ablate-coord-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let (report, outcomes) = run_spec_logged("coord-check.toml", 2, Some(&log));
    // Every finished trial was appended to the log as it finished.
    let logged: Vec<TrialOutcome> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), outcomes.len());
    assert_eq!(logged.len(), 36);
    let _ = std::fs::remove_file(&log);
    eprintln!("{}", show(&report));
    assert!(report.verdict.holds, "{}", show(&report));
}

#[test]
fn depth_mup_transfers_the_learning_rate_across_depths() {
    let (report, outcomes) = run_spec("mup-depth-digits.toml", 2);
    assert_eq!(outcomes.len(), 260);
    eprintln!("{}", show(&report));
    assert!(report.verdict.holds, "{}", show(&report));
}

#[test]
fn critical_batch_grows_with_data_not_model_size_on_mnist() {
    let full = run_spec("cbs-mnist.toml", 2);
    let (report, outcomes) = (&full.0, &full.1);
    assert_eq!(outcomes.len(), 112);
    eprintln!("{}", show(report));
    assert!(
        outcomes.iter().all(|t| t.state == "succeeded"),
        "every run finishes: {}",
        show(report)
    );
    assert_hold(
        report,
        &[
            "fit R^2",
            "CBS(16D)/CBS(D)",
            "CBS(widest)/CBS(narrowest)",
            "Spearman(eval loss, B_simple)",
        ],
    );
    // Every budget's target is reached by the reference batch itself after exactly its budget.
    let steps = &report.tables[0];
    for row in &steps.rows {
        assert_ne!(row[3], "not reached", "the reference batch sets the target: {row:?}");
    }
    assert!(report.verdict.holds, "{}", show(report));
    // The stop rule on MNIST: `the_stop_rule_keeps_the_table_when_the_learning_rates_train_fused`
    // (a smaller cbs-mnist, fused) and the toy sweep's test, at a fraction of this sweep's cost.
}

#[test]
fn the_stop_rule_keeps_the_table_when_the_learning_rates_train_fused() {
    // A small cbs-mnist: 3 batch sizes x 3 learning rates, each batch size's rates one
    // fused group, with and without the stop rule; a member's numbers do not depend on
    // its group, so the steps to target are the same.
    let sets = [
        "fuse=3",
        "sweep.params.width=[64]",
        "sweep.params.batch_size=[4, 16, 64]",
        "sweep.params.log2_lr=[-9, -7, -5]",
        "base.examples=8192",
        "base.cbs.budgets=[256, 1024, 4096]",
    ];
    let owned: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let full = run_spec_set("cbs-mnist.toml", 2, None, &owned);
    assert_eq!(full.1.len(), 9);
    assert!(full.1.iter().all(|t| t.state == "succeeded"), "{}", show(&full.0));
    stop_rule_keeps_the_table("cbs-mnist.toml", &full, &sets);
}

#[test]
fn critical_batch_toy_runs_in_seconds_and_its_cbs_grows_with_data() {
    let full = run_spec("cbs-toy.toml", 2);
    let (report, outcomes) = &full;
    assert_eq!(outcomes.len(), 30);
    let c = criterion(report, "CBS(16D)/CBS(D)");
    assert!(c.holds, "{}", show(report));
    let c = criterion(report, "fit R^2");
    assert!(c.holds, "{}", show(report));
    stop_rule_keeps_the_table("cbs-toy.toml", &full, &[]);
}

#[test]
fn intrinsic_dimension_is_small_and_alike_across_widths_and_projections_on_digits() {
    let (report, outcomes) = run_spec("intrinsic-digits.toml", 2);
    assert_eq!(
        outcomes.len(),
        150,
        "144 subspace trials and one full-training run per width and seed"
    );
    eprintln!("{}", show(&report));
    assert!(outcomes.iter().all(|t| t.state == "succeeded"), "{}", show(&report));
    assert_hold(
        &report,
        &[
            "Spearman(d, accuracy)",
            "d_int90 / D",
            "d_int90(wider)/d_int90(narrower)",
            "d_int90(fastfood)/d_int90(dense)",
        ],
    );
    // Three projections for each of the two widths, each with a d_int90 bracketed from below.
    let table = &report.tables[1];
    assert_eq!(table.rows.len(), 6, "{}", show(&report));
    for row in &table.rows {
        assert_ne!(row[5], "not reached", "{row:?}");
        assert_ne!(
            row[6], "-",
            "d_int90 is above the smallest d, so it has a point below: {row:?}"
        );
    }
    assert!(report.verdict.holds, "{}", show(&report));
}

#[test]
fn dsir_selects_the_target_genre_and_its_lm_fits_the_target_better() {
    let (report, outcomes) = run_spec("dsir-brown.toml", 2);
    assert_eq!(
        outcomes.len(),
        4 + 1 + 4,
        "4 shards, 1 selection, 2 seeds x 2 selections"
    );
    eprintln!("{}", show(&report));
    assert!(outcomes.iter().all(|t| t.state == "succeeded"), "{}", show(&report));
    assert_hold(&report, &["target share", "KL reduction of DSIR", "target perplexity"]);
    let select = outcomes
        .iter()
        .find(|t| t.param_str("stage") == Some("select"))
        .unwrap();
    assert_eq!(select.metric("selected"), Some(1000.0));
    assert!(select.outputs["selection"]["manifest"]
        .as_str()
        .unwrap()
        .ends_with("dsir/manifest.json"));
}
