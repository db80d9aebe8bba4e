//! One trial's life in the daemon: hand it to its slot's process, relay its
//! metrics, record its checkpoints once the metrics before them are durable,
//! obey stop orders, and report how it ended, all fenced by its lease token.

use std::sync::Arc;
use std::time::Duration;

use ablate_schema::proto;
use object_store::ObjectStoreExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::backend::Slot;
use crate::process::TrialProcess;
use crate::relay::Relay;
use crate::trial_process::{Event, TrialInput};

mod calls;
pub use calls::Finish;
use calls::{retry, Batcher};

/// Points per metric batch, at most.
const BATCH_POINTS: usize = 4096;
/// How long metric points may wait before they are sent.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// How often a running trial's log is kept in the object store, when it grew.
const LOG_EVERY: Duration = Duration::from_secs(2);

/// What the daemon shares with every runner.
pub struct Shared {
    pub client: crate::Client,
    pub relay: Relay,
    pub object_store: String,
    /// The object store, opened: where the runner keeps trials' logs.
    pub objects: (Arc<dyn object_store::ObjectStore>, object_store::path::Path),
    pub scratch_dir: String,
    /// What trial processes run: `/proc/self/exe` by default, so a daemon
    /// whose executable is replaced or deleted on disk still starts trials.
    pub trial_exe: std::path::PathBuf,
    /// Where trials may read local data; empty for the default roots.
    pub data_roots: Vec<std::path::PathBuf>,
    /// This daemon's id, for the coordinator's records of what it gave back.
    pub worker_id: String,
    /// Every trial in a fresh process of its own, none kept warm.
    pub fresh_processes: bool,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// What this worker runs trials on and with, reported with every attempt's end.
    pub provenance: crate::provenance::Provenance,
}

/// Whether the worker got a trial going.
pub enum Started {
    /// Its process ran (whatever its outcome, which was reported).
    Yes,
    /// The worker could not start it, for a cause of its own; the trial was not touched.
    No(String),
}

/// How a trial process's part ended.
enum End {
    /// A warm process finished the trial or group (with the trial's error if it
    /// failed) and waits for the next.
    Done(Option<String>),
    Exited(std::process::ExitStatus),
    /// Every lease is gone (stale, cancelled, pruned): nothing more is reported.
    Stopped(String),
}

/// How `drive` left the trials.
enum Driven {
    /// Its process is done with them: the process, if it may run the slot's next
    /// trial, and what is left to report of each (nothing where a lease is gone).
    Ended(Box<Option<TrialProcess>>, Vec<Finish>),
    /// The worker could not start them, for this reason.
    NotStarted(String),
}

/// One leased trial a runner drives, with the channel that tells it to stop.
pub struct Member {
    pub trial: proto::LeasedTrial,
    pub stop: watch::Receiver<Option<String>>,
}

/// Runs leased trials in the slot's warm process (`warm`, when it has one that
/// fits) or a new one: one trial, or a fused group (members of one
/// `fuse_group`) trained as one model in one process. Returns whether they
/// started, the process to keep for the slot's next trial, and what is left to
/// report of each once the slot is free. Never panics the daemon: every error
/// is reported or logged.
pub async fn run(
    shared: Arc<Shared>,
    slot: Slot,
    warm: Option<TrialProcess>,
    members: Vec<Member>,
) -> (Started, Option<TrialProcess>, Vec<Finish>) {
    // The trial's span continues its lease's (and so its submit's) trace; its
    // process's spans and the coordinator's for its calls are its children.
    let head = &members[0].trial;
    let span = tracing::info_span!("trial",
        otel.name = "worker trial",
        experiment_id = %head.experiment_id,
        trial_id = %head.trial_id,
        attempt = head.attempt,
        fused = members.len(),
        slot = %slot.name);
    ablate_schema::trace::set_parent(&span, &head.traceparent);
    run_in_span(shared, slot, warm, members).instrument(span).await
}

async fn run_in_span(
    shared: Arc<Shared>,
    slot: Slot,
    warm: Option<TrialProcess>,
    mut members: Vec<Member>,
) -> (Started, Option<TrialProcess>, Vec<Finish>) {
    let head = members[0].trial.clone();
    let fresh = shared.fresh_processes || head.fresh_process;
    // A process that does not fit (or died while idle) is dropped, which kills it.
    let warm = warm.filter(|p| !fresh && p.device == slot.device && p.visible_devices == slot.visible_devices);
    let warm = warm.and_then(|mut p| (!p.exited()).then_some(p));
    tracing::info!(trial = %head.trial_id, slot = %slot.name, attempt = head.attempt, fused = members.len(),
        resume_step = head.resume_from.as_ref().map(|c| c.step),
        process = warm.as_ref().and_then(|p| p.pid()).map(|p| format!("warm pid {p}")).unwrap_or_else(|| "new".into()),
        "trial starting");
    let process = match warm {
        Some(p) => Ok(p),
        None => TrialProcess::spawn(&shared.trial_exe, !fresh, &slot),
    };
    let not_started = match process {
        Err(error) => format!("cannot start trial processes ({}): {error}", shared.trial_exe.display()),
        Ok(process) => match drive(&shared, &slot, &mut members, process).await {
            Ok(Driven::Ended(keep, finishes)) => return (Started::Yes, *keep, finishes),
            Ok(Driven::NotStarted(reason)) => reason,
            // Never leave a lease hanging on a runner failure: the trials go back.
            Err(error) => {
                tracing::error!(trial = %head.trial_id, %error, "trial runner failed");
                format!("the trial runner failed: {error:#}")
            }
        },
    };
    for member in &mut members {
        shared.telemetry.exit("not_started");
        give_back(&shared, &member.trial, &not_started, &mut member.stop).await;
    }
    (Started::No(not_started), None, Vec::new())
}

/// Gives a trial the worker could not start back to the queue, its attempt not counted.
async fn give_back(
    shared: &Shared,
    trial: &proto::LeasedTrial,
    reason: &str,
    stop: &mut watch::Receiver<Option<String>>,
) {
    tracing::error!(trial = %trial.trial_id, %reason, "could not start the trial; giving it back");
    let request = proto::ReleaseRequest {
        trial_id: trial.trial_id.clone(),
        lease_token: trial.lease_token.clone(),
        worker_id: shared.worker_id.clone(),
        reason: reason.to_string(),
    };
    let given = retry(
        || {
            let r = request.clone();
            let mut c = shared.client.clone();
            async move { c.release(r).await }
        },
        stop,
    )
    .await;
    if let Err(why) = given {
        tracing::warn!(trial = %trial.trial_id, %why, "could not give the trial back; its lease will expire");
    }
}

/// Exit code of a process whose program or libraries the dynamic loader could not find.
const LOADER_FAILED: i32 = 127;

/// What the runner keeps of one trial while its process runs.
struct Progress {
    metrics: Batcher,
    outputs: serde_json::Map<String, serde_json::Value>,
    /// The step it stopped at for its rung (ASHA, Hyperband), checkpointed there.
    paused: Option<u64>,
    /// A fused member's own end, with its error if it failed.
    done: Option<Option<String>>,
    /// Why its lease is gone, once it is: its events are dropped from then on.
    stopped: Option<String>,
}

/// The process's input for `trial` on `slot`.
fn input_for(shared: &Shared, slot: &Slot, trial: &proto::LeasedTrial) -> anyhow::Result<TrialInput> {
    Ok(TrialInput {
        trial_id: trial.trial_id.clone(),
        experiment_id: trial.experiment_id.clone(),
        family: trial.family.clone(),
        params: serde_json::from_str(&trial.params_json)?,
        device: slot.device.clone(),
        threads: slot.threads,
        object_store: shared.object_store.clone(),
        resume_from: trial.resume_from.as_ref().map(|c| c.path.clone()),
        spec_hash: trial.spec_hash.clone(),
        scratch_dir: shared.scratch_dir.clone(),
        data_roots: shared.data_roots.clone(),
        traceparent: ablate_schema::trace::current(),
        pause_at: trial.pause_at_step,
        fused: Vec::new(),
        command: command_of(trial)?,
        workdir: None,
        code: (!trial.code_hash.is_empty()).then(|| trial.code_hash.clone()),
        visible_devices: Some(crate::command::run::visible_devices(
            &slot.device,
            slot.visible_devices.as_deref(),
            std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        )),
    })
}

/// A leased command trial's program (`[trial]`); `None` for a built-in family's trial.
fn command_of(trial: &proto::LeasedTrial) -> anyhow::Result<Option<ablate_schema::CommandTrial>> {
    if trial.command_json.is_empty() {
        return Ok(None);
    }
    let command = serde_json::from_str(&trial.command_json)
        .map_err(|e| anyhow::anyhow!("the coordinator sent a command this worker cannot read: {e}"))?;
    Ok(Some(command))
}

async fn drive(
    shared: &Arc<Shared>,
    slot: &Slot,
    members: &mut [Member],
    mut process: TrialProcess,
) -> anyhow::Result<Driven> {
    // A group of one too: a trial that fuses keeps the fused code's rounding alone.
    let fused = members.len() > 1 || !members[0].trial.fuse_group.is_empty();
    let mut input = input_for(shared, slot, &members[0].trial)?;
    if fused {
        input.fused = members
            .iter()
            .map(|m| input_for(shared, slot, &m.trial))
            .collect::<anyhow::Result<_>>()?;
    }
    if let Err(error) = process.send(&input).await {
        if process.trials > 1 {
            // A warm process that died between trials is the worker's matter, not
            // the trial's: a new one takes the trial.
            tracing::warn!(trial = %input.trial_id, %error, "the slot's warm process is gone; starting a new one");
            process = TrialProcess::spawn(&shared.trial_exe, process.warm, slot)?;
            if let Err(error) = process.send(&input).await {
                tracing::debug!(trial = %input.trial_id, %error, "the trial process took no input");
            }
        } else {
            // A process that dies at once (its loader failed) closes stdin first: its
            // exit status, read below, says what happened.
            tracing::debug!(trial = %input.trial_id, %error, "the trial process took no input");
        }
    }

    let mut progress: Vec<Progress> = members
        .iter()
        .map(|m| Progress {
            metrics: Batcher::new(&m.trial),
            outputs: serde_json::Map::new(),
            paused: None,
            done: None,
            stopped: None,
        })
        .collect();
    // Each member's stop order, on one channel.
    let (stop_tx, mut stops) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    let watchers: Vec<tokio::task::JoinHandle<()>> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (mut rx, tx) = (m.stop.clone(), stop_tx.clone());
            tokio::spawn(async move {
                if rx.changed().await.is_ok() {
                    let why = rx.borrow().clone().unwrap_or_else(|| "stopped".into());
                    let _ = tx.send((i, why));
                }
            })
        })
        .collect();
    // Whether the process said anything on stdout: a trial that ran did.
    let mut any_event = false;
    // The log's version last kept in the object store, and when.
    let (mut log_version, mut last_log) = (0u64, std::time::Instant::now());
    let mut tick = tokio::time::interval(BATCH_DELAY);
    // Once every member's lease is gone or its trial ended, nothing is left to run
    // for: why the first stopped member was stopped.
    let settled = |p: &[Progress]| {
        let all = p.iter().all(|m| m.stopped.is_some() || m.done.is_some());
        all.then(|| p.iter().find_map(|m| m.stopped.clone())).flatten()
    };
    let end = loop {
        tokio::select! {
            line = process.stdout.next_line() => match line?.inspect(|_| any_event = true) {
                Some(line) => {
                    let (i, event) = match serde_json::from_str::<Event>(&line) {
                        Ok(Event::Done(error)) => break End::Done(error),
                        Ok(Event::Member(i, event)) if fused && i < members.len() => (i, *event),
                        Ok(event) if !fused => (0, event),
                        _ => {
                            tracing::warn!(trial = %input.trial_id, %line, "ignoring a stdout line that is not an event");
                            continue;
                        }
                    };
                    let (member, state) = (&mut members[i], &mut progress[i]);
                    if state.stopped.is_some() {
                        continue;
                    }
                    if let Err(why) = take_event(shared, member, state, event).await {
                        state.stopped = Some(why);
                    }
                    if let Some(why) = settled(&progress) {
                        break End::Stopped(why);
                    }
                }
                None => break End::Exited(process.wait().await?),
            },
            _ = tick.tick() => {
                if last_log.elapsed() >= LOG_EVERY {
                    last_log = std::time::Instant::now();
                    if let Some((text, version)) = process.log_since(log_version) {
                        log_version = version;
                        let (shared, trials) = (shared.clone(), log_targets(members));
                        tokio::spawn(async move { keep_log(&shared, &trials, text).await });
                    }
                }
                for state in progress.iter_mut().filter(|m| m.stopped.is_none()) {
                    if state.metrics.len() > 0 {
                        state.metrics.send(&shared.relay).await;
                    }
                    if state.metrics.any_stale() {
                        state.stopped = Some("lease lost: the coordinator refused its metrics".into());
                    }
                }
                if let Some(why) = settled(&progress) {
                    break End::Stopped(why);
                }
            }
            Some((i, why)) = stops.recv() => {
                progress[i].stopped.get_or_insert(why);
                if let Some(why) = settled(&progress) {
                    break End::Stopped(why);
                }
            }
        }
    };
    for watcher in watchers {
        watcher.abort();
    }

    match &end {
        End::Stopped(why) => {
            tracing::info!(trial = %input.trial_id, %why, "stopping trial");
            // A program gets its spec's grace period after SIGTERM, and its trial
            // process a little more to pass it on and end.
            let grace = input
                .command
                .as_ref()
                .map_or(crate::process::STOP_GRACE, |c| c.grace() + Duration::from_secs(2));
            process.terminate(grace).await;
        }
        End::Done(_) => process.wait_done_mark(&input.trial_id).await,
        End::Exited(_) => {}
    }
    if let Some((text, _)) = process.log_since(log_version) {
        keep_log(shared, &log_targets(members), text).await;
    }
    let tail = process.tail();
    // A warm process that finished its trials stays for the slot's next one.
    let keep = matches!(end, End::Done(_)) && process.warm;
    let last_line = || {
        tail.iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .cloned()
            .unwrap_or_default()
    };
    // The process never ran the trial: the loader could not find its program or
    // libraries (a node that lost libtorch or its shared file system). The
    // worker's fault, not the trial's: it goes back without spending an attempt.
    if let End::Exited(status) = &end {
        let quiet = progress.iter().all(|m| m.metrics.len() == 0 && m.outputs.is_empty());
        if status.code() == Some(LOADER_FAILED) && quiet && !any_event {
            return Ok(Driven::NotStarted(format!(
                "trial processes cannot start ({status}): {}",
                last_line()
            )));
        }
    }
    let mut finishes = Vec::new();
    for (member, state) in members.iter().zip(progress) {
        if state.stopped.is_some() {
            shared.telemetry.exit("stopped");
            continue;
        }
        // A fused member's end is its own `Done`; a single trial's, its process's.
        let ended = match (&state.done, &end) {
            (Some(error), _) => End::Done(error.clone()),
            (None, _) if fused => match &end {
                End::Exited(status) => End::Exited(*status),
                _ => End::Exited(std::process::ExitStatus::default()),
            },
            (None, End::Done(error)) => End::Done(error.clone()),
            (None, End::Exited(status)) => End::Exited(*status),
            (None, End::Stopped(_)) => continue,
        };
        let (outcome, error) = match &ended {
            End::Done(None) if state.paused.is_some() => ("paused", String::new()),
            End::Exited(status) if status.success() && state.paused.is_some() && !fused => ("paused", String::new()),
            End::Done(None) => ("succeeded", String::new()),
            // The trial's own failure (bad parameters, divergence, data): running it again would fail again.
            End::Done(Some(error)) => ("failed", format!("trial failed: error: {error}")),
            // A fused member without its end: its process died under it.
            End::Exited(status) if fused => ("crashed", format!("trial process {status}: {}", last_line())),
            End::Exited(status) if status.success() => ("succeeded", String::new()),
            End::Exited(status) => {
                let reported_error = tail.iter().rev().find(|l| l.starts_with("error: ")).cloned();
                // Exit code 1 with an `error: ` line is a fresh process's report of the
                // trial's own failure. Anything else (a signal such as the OOM killer's,
                // a panic, a segfault in libtorch) is a crash: the coordinator retries
                // it from its checkpoint.
                let own_failure = status.code() == Some(1) && reported_error.is_some();
                let last = reported_error.unwrap_or_else(last_line);
                let outcome = if own_failure { "failed" } else { "crashed" };
                (outcome, format!("trial process {status}: {last}"))
            }
            End::Stopped(_) => unreachable!("a stopped trial has no end to report"),
        };
        shared.telemetry.exit(outcome);
        let mut provenance = shared.provenance.for_slot(slot);
        if fused {
            provenance = with_group(&provenance, &input.trial_id, members.len());
        }
        if !member.trial.code_hash.is_empty() {
            provenance = with_fields(&provenance, &[("code", &member.trial.code_hash)]);
        }
        let request = proto::CompleteRequest {
            trial_id: member.trial.trial_id.clone(),
            lease_token: member.trial.lease_token.clone(),
            outcome: outcome.into(),
            error,
            paused_at_step: state.paused.unwrap_or(0),
            stderr_tail: if outcome == "succeeded" || outcome == "paused" {
                String::new()
            } else {
                tail.join("\n")
            },
            outputs_json: if state.outputs.is_empty() {
                String::new()
            } else {
                serde_json::Value::Object(state.outputs).to_string()
            },
            provenance_json: provenance,
        };
        finishes.push(Finish {
            metrics: state.metrics,
            request,
            stop: member.stop.clone(),
            span: tracing::Span::current(),
        });
    }
    Ok(Driven::Ended(Box::new(keep.then_some(process)), finishes))
}

/// Takes one event of a trial's; `Err` when its lease is gone.
async fn take_event(shared: &Shared, member: &mut Member, state: &mut Progress, event: Event) -> Result<(), String> {
    match event {
        Event::M(name, step, value) => {
            state.metrics.push(name, step, value);
            if state.metrics.len() >= BATCH_POINTS {
                state.metrics.send(&shared.relay).await;
            }
        }
        Event::Output(name, value) => {
            state.outputs.insert(name, value);
        }
        Event::Paused(step) => state.paused = Some(step),
        Event::Done(error) => state.done = Some(error),
        Event::Member(..) => tracing::warn!(trial = %member.trial.trial_id, "ignoring a nested member event"),
        Event::Checkpoint(written) => {
            // A checkpoint is recorded only after every metric before it is durable,
            // so a resume from it never skips a point.
            state.metrics.drain(&shared.relay).await?;
            let report = proto::CheckpointReport {
                trial_id: member.trial.trial_id.clone(),
                lease_token: member.trial.lease_token.clone(),
                checkpoint: Some(proto::Checkpoint {
                    step: written.step as i64,
                    path: written.path,
                    bytes: written.bytes,
                }),
            };
            retry(
                || {
                    let r = report.clone();
                    let mut c = shared.client.clone();
                    async move { c.report_checkpoint(r).await }
                },
                &mut member.stop,
            )
            .await?;
        }
    }
    Ok(())
}

/// A fused member's provenance: the worker's, with the group it ran in (its first
/// member, `fused_group`) and the group's size (`fused_members`).
fn with_group(provenance: &str, group: &str, members: usize) -> String {
    with_fields(
        provenance,
        &[("fused_group", group), ("fused_members", &members.to_string())],
    )
}

/// `provenance` with more fields (a command trial's `code`: its packed code's hash).
fn with_fields(provenance: &str, fields: &[(&str, &str)]) -> String {
    let mut json: serde_json::Value = serde_json::from_str(provenance).unwrap_or_default();
    if let Some(map) = json.as_object_mut() {
        for (k, v) in fields {
            map.insert((*k).into(), (*v).into());
        }
    }
    json.to_string()
}

/// Where each member's attempt keeps its log: (experiment, trial, attempt).
fn log_targets(members: &[Member]) -> Vec<(String, String, u32)> {
    members
        .iter()
        .map(|m| (m.trial.experiment_id.clone(), m.trial.trial_id.clone(), m.trial.attempt))
        .collect()
}

/// Keeps `text` as the log of each of `trials`' attempts; a failure is logged, not fatal.
async fn keep_log(shared: &Shared, trials: &[(String, String, u32)], text: String) {
    let (store, prefix) = &shared.objects;
    let body = bytes::Bytes::from(text);
    for (experiment, trial, attempt) in trials {
        let path = ablate_schema::objects::log_path(prefix, experiment, trial, *attempt);
        if let Err(error) = store.put(&path, body.clone().into()).await {
            tracing::warn!(%trial, %error, "could not keep the trial's log");
        }
    }
}
