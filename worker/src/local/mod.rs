//! Runs a whole spec in this process: every trial through the same trial
//! function the daemon's trial processes run, one thread per device slot,
//! checkpoints and metrics kept in memory, trials leased by the queue's rules
//! (`queue`, on `ablate_experiments::queue`, as the coordinator's lease: a trial
//! starts once the trials it depends on succeeded, trials of one fusion key
//! train as one group). Then the family's report.

use std::path::PathBuf;
use std::sync::Mutex;

use ablate_experiments::report::{Report, TrialOutcome};
use ablate_experiments::sweep::PlannedTrial;
use ablate_experiments::trial::{DirData, MemoryCheckpoints, MemoryMetrics, TrialContext};
use ablate_experiments::Family;
use ablate_schema::{Goal, Limits, SpecFormat};
use serde_json::Value;

use crate::backend::{self, Slot};

mod queue;
use queue::{Next, Queue, Tpe, Waiting};

/// How a local sweep runs, beyond its spec and slots.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Every finished trial is appended here at once as a JSON line, so a run
    /// cut short keeps what it finished.
    pub log: Option<PathBuf>,
    /// Objects trials write (data selections, ...) go under
    /// `store/experiments/<spec name>/`; by default a new
    /// `ablate-sweep-<pid>-<time>` in the system's temporary directory, so a
    /// run never reads what an earlier run of the same spec left (a later stage
    /// would take the earlier run's selection for its own).
    pub store: Option<PathBuf>,
    /// Folders trials may read local data under; empty: the provisioned data
    /// folder and /usr/share/datasets (as the daemon's `--data-root`).
    pub data_roots: Vec<PathBuf>,
    /// Keeps every metric's points in each outcome's `series`, not only those
    /// the family's report reads.
    pub every_series: bool,
    /// Where a command trial's program runs (`[trial]`); by default the current folder.
    pub workdir: Option<PathBuf>,
}

/// Checks and expands the spec, runs every trial over `slots`, and reports.
/// A tpe sweep runs to its whole budget: each trial that ends brings the next
/// proposals, as the coordinator's searcher does.
pub fn run(
    text: &str,
    format: SpecFormat,
    slots: &[Slot],
    options: &Options,
) -> anyhow::Result<(Report, Vec<TrialOutcome>)> {
    let log = match &options.log {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("trial log {}: {e}", path.display()))?,
        )),
        None => None,
    };
    let roots = if options.data_roots.is_empty() {
        ablate_experiments::nn::locations::default_roots()
    } else {
        options.data_roots.clone()
    };
    let checked = ablate_experiments::sweep::check_confined(text, format, &Limits::default(), &roots)
        .map_err(|e| anyhow::anyhow!("invalid spec: {e}"))?;
    if checked.spec.sweep.pauses() {
        anyhow::bail!(
            "invalid spec: sweep.searcher: the {} searcher decides rungs on the coordinator; submit it with \
             `ablate submit` (this runs grid, random and tpe sweeps)",
            checked.spec.sweep.searcher.as_str()
        );
    }
    let family = Family::parse(&checked.spec.family).map_err(|e| anyhow::anyhow!(e))?;
    let threads = slots.iter().map(|s| s.threads).min().unwrap_or(1);
    tch::set_num_threads(threads as i32);
    let devices = slots
        .iter()
        .map(|s| backend::device(&s.device))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let memory = backend::slot_memory(slots);
    let spec = &checked.spec;
    let waiting = |t: &PlannedTrial| Waiting {
        params: t.params.clone(),
        queued: ablate_experiments::queue::Queued {
            depends_on: t.depends_on.clone(),
            group: ablate_experiments::fusion::group(spec.fuse, t.fuse_key.as_deref(), family, &t.params, memory)
                .map(|g| (g.key, g.size as usize)),
        },
        refused: None,
    };
    let searcher = spec.sweep.tpe.clone().map(|budget| Tpe {
        domains: spec.domains(),
        budget,
        maximize: checked.objective.goal == Goal::Maximize,
        slots: slots.len(),
        // The random start, in flight.
        ordinals: (0..checked.trials.len()).collect(),
        history: checked
            .trials
            .iter()
            .map(|t| ablate_experiments::tpe::Observation::in_flight(spec.swept(&t.params)))
            .collect(),
    });
    let queue = Queue::new(checked.trials.iter().map(waiting).collect(), searcher);
    let store = options.store.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        std::env::temp_dir().join(format!("ablate-sweep-{}-{now}", std::process::id()))
    });
    // The program runs in its code's folder (`[trial] code`, under the spec's), its
    // shared `workdir`, or the spec's folder.
    let folder = match &options.workdir {
        Some(dir) => dir.clone(),
        None => std::env::current_dir()?,
    };
    let workdir = match spec.trial.as_ref() {
        Some(t) => match (&t.code, &t.workdir) {
            (Some(code), _) => folder.join(code),
            (None, Some(shared)) => shared.clone(),
            (None, None) => folder,
        },
        None => folder,
    };
    let outcomes = Mutex::new(Vec::new());
    let experiment = &spec.name;
    let objective = checked.objective.metric.as_str();
    // A tpe proposal becomes a trial as at submission; one the family refuses fails with the reason.
    let propose =
        |point: serde_json::Map<String, Value>| match ablate_experiments::sweep::plan_point(spec, point.clone()) {
            Ok(planned) => waiting(&planned),
            Err(e) => Waiting {
                refused: Some(e.to_string()),
                ..waiting(&PlannedTrial {
                    params: Value::Object(point),
                    total_steps: 0,
                    depends_on: vec![],
                    fuse_key: None,
                })
            },
        };
    std::thread::scope(|scope| {
        for device in &devices {
            let (queue, outcomes, log, store, propose, workdir) = (&queue, &outcomes, &log, &store, &propose, &workdir);
            scope.spawn(move || loop {
                let (members, fused) = match queue.next() {
                    Next::Done => return,
                    Next::Failed(ordinal, params, why) => (vec![(ordinal, params, Some(why))], false),
                    Next::Run(members, fused) => (members.into_iter().map(|(o, p)| (o, p, None)).collect(), fused),
                };
                let n = members.len();
                let mut checkpoints: Vec<MemoryCheckpoints> = (0..n).map(|_| MemoryCheckpoints::default()).collect();
                let mut metrics: Vec<MemoryMetrics> = (0..n).map(|_| MemoryMetrics::default()).collect();
                let mut data: Vec<DirData> = (0..n)
                    .map(|_| DirData {
                        root: store.clone(),
                        experiment: experiment.clone(),
                    })
                    .collect();
                let mut ctxs: Vec<TrialContext<'_>> = checkpoints
                    .iter_mut()
                    .zip(metrics.iter_mut())
                    .zip(data.iter_mut())
                    .map(|((checkpoints, metrics), data)| TrialContext {
                        device: *device,
                        checkpoints,
                        metrics,
                        data,
                        pause_at: None,
                        paused: None,
                    })
                    .collect();
                let results: Vec<Result<(), String>> = match &members[..] {
                    [(_, _, Some(why))] => vec![Err(why.clone())],
                    [(ordinal, params, None)] if spec.trial.is_some() => {
                        let trial = spec.trial.as_ref().expect("a command trial");
                        let scratch = store.join("command").join(format!("trial-{ordinal}"));
                        let device = match *device {
                            tch::Device::Cuda(i) => format!("cuda:{i}"),
                            _ => "cpu".to_string(),
                        };
                        let daemon = std::env::var("CUDA_VISIBLE_DEVICES").ok();
                        let visible = crate::command::run::visible_devices(&device, None, daemon.as_deref());
                        let place = crate::command::run::Place {
                            workdir,
                            scratch: &scratch,
                            visible_devices: &visible,
                        };
                        vec![
                            crate::command::run::run(trial, params, &place, &mut ctxs[0], &Limits::default())
                                .map_err(|e| e.to_string()),
                        ]
                    }
                    // A trial that fuses takes the fused code alone too (its rounding).
                    [(_, params, None)] if !fused => vec![family.run(params, &mut ctxs[0]).map_err(|e| e.to_string())],
                    _ => {
                        let params: Vec<Value> = members.iter().map(|m| m.1.clone()).collect();
                        family
                            .run_fused(&params, &mut ctxs)
                            .into_iter()
                            .map(|r| r.map_err(|e| e.to_string()))
                            .collect()
                    }
                };
                drop(ctxs);
                for (((ordinal, params, _), result), mut metrics) in members.into_iter().zip(results).zip(metrics) {
                    let outcome = outcome(family, ordinal, params, &result, &mut metrics, options.every_series);
                    let value = outcome.metric(objective).filter(|_| result.is_ok());
                    queue.end(ordinal, result.is_ok(), spec.swept(&outcome.params), value, propose);
                    if let Some(file) = log {
                        use std::io::Write;
                        let line = serde_json::to_string(&outcome).expect("an outcome serializes");
                        if let Err(error) = writeln!(file.lock().expect("log lock"), "{line}") {
                            tracing::warn!(%error, "cannot append to the trial log");
                        }
                    }
                    let mut done = outcomes.lock().expect("outcomes lock");
                    done.push(outcome);
                    let total = queue.total();
                    if done.len() % 10 == 0 || done.len() == total {
                        tracing::info!(finished = done.len(), total, "sweep progress");
                    }
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().expect("outcomes lock");
    outcomes.sort_by_key(|o| o.ordinal);
    let report =
        ablate_experiments::sweep::report(family, spec, &mut outcomes).map_err(|e| anyhow::anyhow!("report: {e}"))?;
    Ok((report, outcomes))
}

/// What a finished local sweep must show for `ablate-worker sweep` to exit 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Require {
    /// Nothing: the report is printed whatever it says.
    Nothing,
    /// Every trial succeeded and the report has a verdict with criteria.
    Succeeded,
    /// Every trial succeeded and every criterion of the verdict holds.
    Verdict,
}

/// What falls short of `require`, one line each (empty: it holds).
pub fn shortfalls(require: Require, report: &Report, outcomes: &[TrialOutcome]) -> Vec<String> {
    let mut short = Vec::new();
    if require == Require::Nothing {
        return short;
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|t| t.state != "succeeded")
        .map(|t| t.ordinal.to_string())
        .collect();
    if !failed.is_empty() {
        short.push(format!(
            "{} of {} trials did not succeed (ordinals {}); their errors are in the log",
            failed.len(),
            outcomes.len(),
            failed.join(", ")
        ));
    }
    if report.verdict.criteria.is_empty() {
        short.push(format!("the {} report has no verdict criteria", report.family));
    }
    if require == Require::Verdict {
        short.extend(
            report
                .verdict
                .criteria
                .iter()
                .filter(|c| !c.holds)
                .map(|c| format!("criterion not met: {}", c.failure())),
        );
    }
    short
}

/// A trial's outcome as the family's report reads it: its last value of each
/// metric, its series (every metric's with `every_series`) and outputs.
fn outcome(
    family: Family,
    ordinal: usize,
    params: Value,
    result: &Result<(), String>,
    metrics: &mut MemoryMetrics,
    every_series: bool,
) -> TrialOutcome {
    let mut last = serde_json::Map::new();
    let mut series = std::collections::BTreeMap::<String, Vec<(u64, f64)>>::new();
    for (name, step, value) in &metrics.points {
        last.insert(name.clone(), serde_json::json!(value));
        if every_series || family.series_metrics().contains(&name.as_str()) {
            series.entry(name.clone()).or_default().push((*step, *value));
        }
    }
    let state = match result {
        Ok(()) => "succeeded",
        Err(error) => {
            tracing::warn!(trial = ordinal, %error, "trial failed");
            "failed"
        }
    };
    TrialOutcome {
        ordinal: ordinal as i64,
        state: state.into(),
        params,
        metrics: last,
        series,
        outputs: std::mem::take(&mut metrics.outputs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name = "local-fuse"
family = "train"
[base]
optimizer = "adam"
width = 16
steps = 40
eval_every = 20
checkpoint_every = 20
[sweep]
searcher = "grid"
params.seed = [0, 1]
params.log2_lr = [-7, 40, -5]
"#;

    #[test]
    fn a_fused_sweep_gives_each_trial_its_one_by_one_metrics() {
        let slots = [Slot::new("cpu:0".into(), "cpu".into(), 1)];
        let options = Options {
            every_series: true,
            ..Options::default()
        };
        let run = |text: &str| run(text, SpecFormat::Toml, &slots, &options).unwrap().1;
        let fuse = |n: u32| SPEC.replace("family = \"train\"", &format!("family = \"train\"\nfuse = {n}"));
        let alone = run(SPEC);
        let fused = run(&fuse(6));
        assert_eq!(alone.len(), 6);
        for (a, f) in alone.iter().zip(&fused) {
            assert_eq!((a.ordinal, &a.state), (f.ordinal, &f.state));
            assert_eq!(a.series.keys().collect::<Vec<_>>(), f.series.keys().collect::<Vec<_>>());
            // Every point of every metric, not only the last.
            for (name, points) in &a.series {
                let theirs = &f.series[name];
                assert_eq!(
                    points.iter().map(|p| p.0).collect::<Vec<_>>(),
                    theirs.iter().map(|p| p.0).collect::<Vec<_>>(),
                    "trial {} {name}: the steps",
                    a.ordinal
                );
                for ((step, x), (_, y)) in points.iter().zip(theirs) {
                    assert!(
                        (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                        "trial {} {name} step {step}: {x} alone, {y} fused",
                        a.ordinal
                    );
                }
            }
        }
        // log2_lr = 40 diverges, alone as in the group; the others succeed.
        let failed: Vec<i64> = fused
            .iter()
            .filter(|t| t.state == "failed")
            .map(|t| t.ordinal)
            .collect();
        assert_eq!(failed.len(), 2, "{failed:?}");
        // Groups of 5 and of one (the fused code alone): the same numbers, bit for bit.
        let regrouped = run(&fuse(5));
        for (f, r) in fused.iter().zip(&regrouped) {
            assert_eq!((f.ordinal, &f.state, &f.series), (r.ordinal, &r.state, &r.series));
        }
    }

    const TPE: &str = r#"
name = "local-tpe"
family = "train"
[base]
optimizer = "adam"
width = 8
steps = 20
eval_every = 20
[sweep]
searcher = "tpe"
params.log2_lr = { range = [-10, -2], step = 1 }
params.seed = [0, 1]
[sweep.tpe]
trials = 9
n_startup = 3
seed = 4
[objective]
metric = "eval_loss"
goal = "minimize"
"#;

    #[test]
    fn a_tpe_sweep_runs_its_whole_budget_and_repeats_from_its_seed() {
        let one = [Slot::new("cpu:0".into(), "cpu".into(), 1)];
        let (_, first) = run(TPE, SpecFormat::Toml, &one, &Options::default()).unwrap();
        assert_eq!(
            first.iter().map(|t| t.ordinal).collect::<Vec<_>>(),
            (0..9).collect::<Vec<_>>()
        );
        assert!(first.iter().all(|t| t.state == "succeeded"), "{first:?}");
        // One slot: the same proposals again.
        let (_, again) = run(TPE, SpecFormat::Toml, &one, &Options::default()).unwrap();
        let params = |o: &[TrialOutcome]| o.iter().map(|t| t.params.clone()).collect::<Vec<_>>();
        assert_eq!(params(&first), params(&again));
        // Two slots: the whole budget too.
        let two = [
            Slot::new("cpu:0".into(), "cpu".into(), 1),
            Slot::new("cpu:1".into(), "cpu".into(), 1),
        ];
        let (_, both) = run(TPE, SpecFormat::Toml, &two, &Options::default()).unwrap();
        assert_eq!(both.len(), 9);
    }
}
