//! Runs a whole spec in this process: every trial through the same trial
//! function the daemon's trial processes run, one thread per device slot,
//! checkpoints and metrics kept in memory, a trial started only once the
//! trials it depends on succeeded (as the coordinator's queue does). Then the
//! family's report.

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
    let queue = Queue::new(
        checked
            .trials
            .iter()
            .enumerate()
            .map(|(i, t)| (i, t.params.clone(), t.depends_on.clone()))
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
    std::thread::scope(|scope| {
        for device in &devices {
            let (queue, outcomes, log) = (&queue, &outcomes, &log);
            let mut data = DirData {
                root: store.clone(),
                experiment: checked.spec.name.clone(),
            };
            scope.spawn(move || loop {
                let (ordinal, params, result) = match queue.next() {
                    Next::Done => return,
                    Next::Failed(ordinal, params, why) => (ordinal, params, Err(why)),
                    Next::Run(ordinal, params) => (ordinal, params, Ok(())),
                };
                let mut checkpoints = MemoryCheckpoints::default();
                let mut metrics = MemoryMetrics::default();
                let mut ctx = TrialContext {
                    device: *device,
                    checkpoints: &mut checkpoints,
                    metrics: &mut metrics,
                    data: &mut data,
                    pause_at: None,
                    paused: None,
                };
                let result = result.and_then(|()| family.run(&params, &mut ctx).map_err(|e| e.to_string()));
                queue.end(ordinal, result.is_ok());
                let mut last = serde_json::Map::new();
                let mut series = std::collections::BTreeMap::<String, Vec<(u64, f64)>>::new();
                for (name, step, value) in &metrics.points {
                    last.insert(name.clone(), serde_json::json!(value));
                    if family.series_metrics().contains(&name.as_str()) {
                        series.entry(name.clone()).or_default().push((*step, *value));
                    }
                }
                let state = match &result {
                    Ok(()) => "succeeded",
                    Err(error) => {
                        tracing::warn!(trial = ordinal, %error, "trial failed");
                        "failed"
                    }
                };
                let outcome = TrialOutcome {
                    ordinal: ordinal as i64,
                    state: state.into(),
                    params,
                    metrics: last,
                    series,
                    outputs: std::mem::take(&mut metrics.outputs),
                };
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
            });
        }
    });
    let mut outcomes = outcomes.into_inner().expect("outcomes lock");
    outcomes.sort_by_key(|o| o.ordinal);
    let report = family.report(&outcomes).map_err(|e| anyhow::anyhow!("report: {e}"))?;
    Ok((report, outcomes))
}

/// What a slot's thread does next.
enum Next {
    Run(usize, serde_json::Value),
    /// A trial it waits for failed: it fails without running, with the reason.
    Failed(usize, serde_json::Value, String),
    /// Nothing is left to start.
    Done,
}

/// The trials not started yet, in order, each with the trials it waits for; a thread
/// takes the first whose dependencies succeeded, or waits for one to end.
struct Queue {
    state: Mutex<QueueState>,
    ended_one: Condvar,
}

struct QueueState {
    waiting: Vec<(usize, serde_json::Value, Vec<usize>)>,
    /// Trials that ended, and whether they succeeded.
    ended: HashMap<usize, bool>,
}

impl Queue {
    fn new(waiting: Vec<(usize, serde_json::Value, Vec<usize>)>) -> Queue {
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
                let dep = t.2.iter().find(|d| state.ended.get(d) == Some(&false))?;
                Some((i, *dep))
            });
            if let Some((i, dep)) = failed {
                let (ordinal, params, _) = state.waiting.remove(i);
                return Next::Failed(ordinal, params, format!("it waits for trial {dep}, which failed"));
            }
            let ready = state
                .waiting
                .iter()
                .position(|t| t.2.iter().all(|d| state.ended.get(d) == Some(&true)));
            if let Some(i) = ready {
                let (ordinal, params, _) = state.waiting.remove(i);
                return Next::Run(ordinal, params);
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
