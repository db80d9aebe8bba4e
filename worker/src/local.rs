//! Runs a whole spec in this process: every trial through the same trial
//! function the daemon's trial processes run, one thread per device slot,
//! checkpoints and metrics kept in memory, a trial started only once the
//! trials it depends on succeeded (as the coordinator's queue does), trials of
//! one fusion key (`fuse` in the spec) trained as one group. Then the family's
//! report.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use ablate_experiments::report::{Report, TrialOutcome};
use ablate_experiments::trial::{DirData, MemoryCheckpoints, MemoryMetrics, TrialContext};
use ablate_experiments::Family;
use ablate_schema::SpecFormat;

use crate::backend::{self, Slot};

/// Checks and expands the spec, runs every trial over `slots`, and reports.
/// With `log`, every finished trial is appended to it at once as a JSON line,
/// so a run cut short keeps what it finished. Objects trials write (data
/// selections, ...) go under `store/experiments/<spec name>/`; by default
/// `store` is a new `ablate-sweep-<pid>-<time>` in the system's temporary
/// directory, so a run never reads what an earlier run of the same spec left
/// (a later stage would take the earlier run's selection for its own).
pub fn run(
    text: &str,
    format: SpecFormat,
    slots: &[Slot],
    log: Option<&std::path::Path>,
    store: Option<&std::path::Path>,
) -> anyhow::Result<(Report, Vec<TrialOutcome>)> {
    let log = match log {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("trial log {}: {e}", path.display()))?,
        )),
        None => None,
    };
    let checked = ablate_experiments::sweep::check(text, format).map_err(|e| anyhow::anyhow!("invalid spec: {e}"))?;
    if checked.spec.sweep.pauses() {
        anyhow::bail!(
            "invalid spec: sweep.searcher: the {} searcher decides rungs on the coordinator; submit it with \
             `ablate submit` (this runs whole sweeps only: grid or random)",
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
    let queue = Queue::new(
        checked
            .trials
            .iter()
            .enumerate()
            .map(|(i, t)| Waiting {
                ordinal: i,
                params: t.params.clone(),
                depends_on: t.depends_on.clone(),
                group: match (&t.fuse_key, checked.spec.fuse) {
                    (Some(key), Some(fuse)) => Some((
                        key.clone(),
                        ablate_experiments::fusion::group_size(fuse, family, &t.params, memory) as usize,
                    )),
                    _ => None,
                },
            })
            .collect(),
    );
    let store = store.map_or_else(
        || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            std::env::temp_dir().join(format!("ablate-sweep-{}-{now}", std::process::id()))
        },
        std::path::Path::to_path_buf,
    );
    let outcomes = Mutex::new(Vec::new());
    let total = checked.trials.len();
    let experiment = &checked.spec.name;
    std::thread::scope(|scope| {
        for device in &devices {
            let (queue, outcomes, log, store) = (&queue, &outcomes, &log, &store);
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
                    // A trial that fuses takes the fused code alone too (its rounding).
                    [(_, params, None)] if !fused => vec![family.run(params, &mut ctxs[0]).map_err(|e| e.to_string())],
                    _ => {
                        let params: Vec<serde_json::Value> = members.iter().map(|m| m.1.clone()).collect();
                        family
                            .run_fused(&params, &mut ctxs)
                            .into_iter()
                            .map(|r| r.map_err(|e| e.to_string()))
                            .collect()
                    }
                };
                drop(ctxs);
                for (((ordinal, params, _), result), mut metrics) in members.into_iter().zip(results).zip(metrics) {
                    queue.end(ordinal, result.is_ok());
                    let outcome = outcome(family, ordinal, params, &result, &mut metrics);
                    if let Some(file) = log {
                        use std::io::Write;
                        let line = serde_json::to_string(&outcome).expect("an outcome serializes");
                        if let Err(error) = writeln!(file.lock().expect("log lock"), "{line}") {
                            tracing::warn!(%error, "cannot append to the trial log");
                        }
                    }
                    let mut done = outcomes.lock().expect("outcomes lock");
                    done.push(outcome);
                    if done.len() % 10 == 0 || done.len() == total {
                        tracing::info!(finished = done.len(), total, "sweep progress");
                    }
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().expect("outcomes lock");
    outcomes.sort_by_key(|o| o.ordinal);
    let report = family.report(&outcomes).map_err(|e| anyhow::anyhow!("report: {e}"))?;
    Ok((report, outcomes))
}

/// A trial's outcome as the family's report reads it: its last value of each
/// metric, its series and outputs.
fn outcome(
    family: Family,
    ordinal: usize,
    params: serde_json::Value,
    result: &Result<(), String>,
    metrics: &mut MemoryMetrics,
) -> TrialOutcome {
    let mut last = serde_json::Map::new();
    let mut series = std::collections::BTreeMap::<String, Vec<(u64, f64)>>::new();
    for (name, step, value) in &metrics.points {
        last.insert(name.clone(), serde_json::json!(value));
        if family.series_metrics().contains(&name.as_str()) {
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

/// A trial not started yet: what it waits for, and its fusion key with the
/// most members a group it leads may hold.
struct Waiting {
    ordinal: usize,
    params: serde_json::Value,
    depends_on: Vec<usize>,
    group: Option<(String, usize)>,
}

/// What a slot's thread does next.
enum Next {
    /// One trial, or a fused group (in order), and whether they fuse (a trial
    /// that fuses may run as a group of one).
    Run(Vec<(usize, serde_json::Value)>, bool),
    /// A trial it waits for failed: it fails without running, with the reason.
    Failed(usize, serde_json::Value, String),
    /// Nothing is left to start.
    Done,
}

/// The trials not started yet, in order; a thread takes the first whose
/// dependencies succeeded, with the next ready ones of its fusion key, or
/// waits for one to end.
struct Queue {
    state: Mutex<QueueState>,
    ended_one: Condvar,
}

struct QueueState {
    waiting: Vec<Waiting>,
    /// Trials that ended, and whether they succeeded.
    ended: HashMap<usize, bool>,
}

impl QueueState {
    fn ready(&self, t: &Waiting) -> bool {
        t.depends_on.iter().all(|d| self.ended.get(d) == Some(&true))
    }
}

impl Queue {
    fn new(waiting: Vec<Waiting>) -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                waiting,
                ended: HashMap::new(),
            }),
            ended_one: Condvar::new(),
        }
    }

    fn next(&self) -> Next {
        let mut state = self.state.lock().expect("queue lock");
        loop {
            if state.waiting.is_empty() {
                return Next::Done;
            }
            let failed = state.waiting.iter().enumerate().find_map(|(i, t)| {
                let dep = t.depends_on.iter().find(|d| state.ended.get(d) == Some(&false))?;
                Some((i, *dep))
            });
            if let Some((i, dep)) = failed {
                let t = state.waiting.remove(i);
                return Next::Failed(t.ordinal, t.params, format!("it waits for trial {dep}, which failed"));
            }
            if let Some(head) = state.waiting.iter().position(|t| state.ready(t)) {
                let mut take = vec![head];
                let fuses = state.waiting[head].group.is_some();
                if let Some((key, size)) = &state.waiting[head].group {
                    take.extend(
                        (head + 1..state.waiting.len())
                            .filter(|&j| {
                                let t = &state.waiting[j];
                                t.group.as_ref().is_some_and(|(k, _)| k == key) && state.ready(t)
                            })
                            .take(size.saturating_sub(1)),
                    );
                }
                let mut members: Vec<(usize, serde_json::Value)> = take
                    .into_iter()
                    .rev()
                    .map(|i| state.waiting.remove(i))
                    .map(|t| (t.ordinal, t.params))
                    .collect();
                members.reverse();
                return Next::Run(members, fuses);
            }
            // Dependencies are earlier trials, so one of them is running and will end.
            state = self.ended_one.wait(state).expect("queue lock");
        }
    }

    fn end(&self, ordinal: usize, succeeded: bool) {
        self.state.lock().expect("queue lock").ended.insert(ordinal, succeeded);
        self.ended_one.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(ordinal: usize, depends_on: Vec<usize>, group: Option<(&str, usize)>) -> Waiting {
        Waiting {
            ordinal,
            params: serde_json::json!({ "n": ordinal }),
            depends_on,
            group: group.map(|(k, n)| (k.to_string(), n)),
        }
    }

    /// The trials a slot takes next, and whether they fuse.
    fn ordinals(next: Next) -> (Vec<usize>, bool) {
        match next {
            Next::Run(members, fuses) => (members.into_iter().map(|m| m.0).collect(), fuses),
            Next::Failed(..) => panic!("a trial failed"),
            Next::Done => (vec![], false),
        }
    }

    #[test]
    fn the_queue_groups_ready_trials_of_one_key_up_to_the_group_size() {
        let queue = Queue::new(vec![
            waiting(0, vec![], Some(("a", 3))),
            waiting(1, vec![], Some(("b", 3))),
            waiting(2, vec![], Some(("a", 3))),
            waiting(3, vec![0], Some(("a", 3))),
            waiting(4, vec![], Some(("a", 3))),
            waiting(5, vec![], Some(("a", 3))),
            waiting(6, vec![], None),
        ]);
        // Trial 3 waits for 0, so the first group skips it; at most three members.
        assert_eq!(ordinals(queue.next()), (vec![0, 2, 4], true));
        // Alone, but it fuses: a group of one.
        assert_eq!(ordinals(queue.next()), (vec![1], true));
        for ordinal in [0, 2, 4, 1] {
            queue.end(ordinal, true);
        }
        assert_eq!(ordinals(queue.next()), (vec![3, 5], true));
        assert_eq!(ordinals(queue.next()), (vec![6], false));
        assert!(matches!(queue.next(), Next::Done));
    }

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
        let run = |text: &str| run(text, SpecFormat::Toml, &slots, None, None).unwrap().1;
        let fuse = |n: u32| SPEC.replace("family = \"train\"", &format!("family = \"train\"\nfuse = {n}"));
        let alone = run(SPEC);
        let fused = run(&fuse(6));
        assert_eq!(alone.len(), 6);
        for (a, f) in alone.iter().zip(&fused) {
            assert_eq!((a.ordinal, &a.state), (f.ordinal, &f.state));
            assert_eq!(
                a.metrics.keys().collect::<Vec<_>>(),
                f.metrics.keys().collect::<Vec<_>>()
            );
            for (name, value) in &a.metrics {
                let (x, y) = (value.as_f64().unwrap(), f.metrics[name].as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                    "trial {} {name}: {x} alone, {y} fused",
                    a.ordinal
                );
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
            assert_eq!((f.ordinal, &f.state, &f.metrics), (r.ordinal, &r.state, &r.metrics));
        }
    }
}
