//! One trial's life in the daemon: hand it to its slot's process, relay its
//! metrics, record its checkpoints once the metrics before them are durable,
//! obey stop orders, and report how it ended, all fenced by its lease token.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ablate_schema::proto;
use tokio::sync::{oneshot, watch};
use tonic::Code;
use tracing::Instrument;

use crate::backend::Slot;
use crate::process::TrialProcess;
use crate::relay::{Ack, Relay};
use crate::trial_process::{Event, TrialInput};

/// Points per metric batch, at most.
const BATCH_POINTS: usize = 4096;
/// How long metric points may wait before they are sent.
const BATCH_DELAY: Duration = Duration::from_millis(200);

/// What the daemon shares with every runner.
pub struct Shared {
    pub client: crate::Client,
    pub relay: Relay,
    pub object_store: String,
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
    /// A warm process finished the trial (with its error if it failed) and waits for the next.
    Done(Option<String>),
    Exited(std::process::ExitStatus),
    /// The lease is gone (stale, cancelled, pruned): nothing more is reported.
    Stopped(String),
}

/// How `drive` left the trial.
enum Driven {
    /// Its process is done with it: the process, if it may run the slot's next
    /// trial, and what is left to report (nothing when its lease is gone).
    Ended(Box<(Option<TrialProcess>, Option<Finish>)>),
    /// The worker could not start it, for this reason.
    NotStarted(String),
}

/// Runs one leased trial in the slot's warm process (`warm`, when it has one
/// that fits) or a new one. Returns whether it started, the process to keep for
/// the slot's next trial, and what is left to report once the slot is free.
/// Never panics the daemon: every error is reported or logged.
pub async fn run(
    shared: Arc<Shared>,
    slot: Slot,
    warm: Option<TrialProcess>,
    trial: proto::LeasedTrial,
    stop: watch::Receiver<Option<String>>,
) -> (Started, Option<TrialProcess>, Option<Finish>) {
    // The trial's span continues its lease's (and so its submit's) trace; its
    // process's spans and the coordinator's for its calls are its children.
    let span = tracing::info_span!("trial",
        otel.name = "worker trial",
        experiment_id = %trial.experiment_id,
        trial_id = %trial.trial_id,
        attempt = trial.attempt,
        slot = %slot.name);
    ablate_schema::trace::set_parent(&span, &trial.traceparent);
    run_in_span(shared, slot, warm, trial, stop).instrument(span).await
}

async fn run_in_span(
    shared: Arc<Shared>,
    slot: Slot,
    warm: Option<TrialProcess>,
    trial: proto::LeasedTrial,
    mut stop: watch::Receiver<Option<String>>,
) -> (Started, Option<TrialProcess>, Option<Finish>) {
    let id = trial.trial_id.clone();
    let fresh = shared.fresh_processes || trial.fresh_process;
    // A process that does not fit (or died while idle) is dropped, which kills it.
    let warm = warm.filter(|p| !fresh && p.device == slot.device && p.visible_devices == slot.visible_devices);
    let warm = warm.and_then(|mut p| (!p.exited()).then_some(p));
    tracing::info!(trial = %id, slot = %slot.name, attempt = trial.attempt,
        resume_step = trial.resume_from.as_ref().map(|c| c.step),
        process = warm.as_ref().and_then(|p| p.pid()).map(|p| format!("warm pid {p}")).unwrap_or_else(|| "new".into()),
        "trial starting");
    let process = match warm {
        Some(p) => Ok(p),
        None => TrialProcess::spawn(&shared.trial_exe, !fresh, &slot),
    };
    let not_started = match process {
        Err(error) => format!("cannot start trial processes ({}): {error}", shared.trial_exe.display()),
        Ok(process) => match drive(&shared, &slot, &trial, &mut stop, process).await {
            Ok(Driven::Ended(ended)) => {
                let (keep, finish) = *ended;
                return (Started::Yes, keep, finish);
            }
            Ok(Driven::NotStarted(reason)) => reason,
            // Never leave a lease hanging on a runner failure: the trial goes back.
            Err(error) => {
                tracing::error!(trial = %id, %error, "trial runner failed");
                format!("the trial runner failed: {error:#}")
            }
        },
    };
    shared.telemetry.exit("not_started");
    give_back(&shared, &trial, &not_started, &mut stop).await;
    (Started::No(not_started), None, None)
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

async fn drive(
    shared: &Shared,
    slot: &Slot,
    trial: &proto::LeasedTrial,
    stop: &mut watch::Receiver<Option<String>>,
    mut process: TrialProcess,
) -> anyhow::Result<Driven> {
    let params: serde_json::Value = serde_json::from_str(&trial.params_json)?;
    let input = TrialInput {
        trial_id: trial.trial_id.clone(),
        experiment_id: trial.experiment_id.clone(),
        family: trial.family.clone(),
        params,
        device: slot.device.clone(),
        threads: slot.threads,
        object_store: shared.object_store.clone(),
        resume_from: trial.resume_from.as_ref().map(|c| c.path.clone()),
        spec_hash: trial.spec_hash.clone(),
        scratch_dir: shared.scratch_dir.clone(),
        data_roots: shared.data_roots.clone(),
        traceparent: ablate_schema::trace::current(),
        pause_at: trial.pause_at_step,
    };
    if let Err(error) = process.send(&input).await {
        if process.trials > 1 {
            // A warm process that died between trials is the worker's matter, not
            // the trial's: a new one takes the trial.
            tracing::warn!(trial = %trial.trial_id, %error, "the slot's warm process is gone; starting a new one");
            process = TrialProcess::spawn(&shared.trial_exe, process.warm, slot)?;
            if let Err(error) = process.send(&input).await {
                tracing::debug!(trial = %trial.trial_id, %error, "the trial process took no input");
            }
        } else {
            // A process that dies at once (its loader failed) closes stdin first: its
            // exit status, read below, says what happened.
            tracing::debug!(trial = %trial.trial_id, %error, "the trial process took no input");
        }
    }

    let mut metrics = Batcher::new(trial);
    let mut outputs = serde_json::Map::new();
    // Whether the process said anything on stdout: a trial that ran did.
    let mut any_event = false;
    // The step it stopped at for its rung (ASHA, Hyperband), checkpointed there.
    let mut paused: Option<u64> = None;
    let mut tick = tokio::time::interval(BATCH_DELAY);
    let end = loop {
        tokio::select! {
            line = process.stdout.next_line() => match line?.inspect(|_| any_event = true) {
                Some(line) => match serde_json::from_str::<Event>(&line) {
                    Ok(Event::M(name, step, value)) => {
                        metrics.push(name, step, value);
                        if metrics.len() >= BATCH_POINTS {
                            metrics.send(&shared.relay).await;
                        }
                    }
                    Ok(Event::Output(name, value)) => {
                        outputs.insert(name, value);
                    }
                    Ok(Event::Paused(step)) => paused = Some(step),
                    Ok(Event::Done(error)) => break End::Done(error),
                    Ok(Event::Checkpoint(written)) => {
                        // A checkpoint is recorded only after every metric before it is durable,
                        // so a resume from it never skips a point.
                        if let Err(why) = metrics.drain(&shared.relay).await {
                            break End::Stopped(why);
                        }
                        let report = proto::CheckpointReport {
                            trial_id: trial.trial_id.clone(),
                            lease_token: trial.lease_token.clone(),
                            checkpoint: Some(proto::Checkpoint {
                                step: written.step as i64,
                                path: written.path,
                                bytes: written.bytes,
                            }),
                        };
                        let reported = retry(
                            || {
                                let r = report.clone();
                                let mut c = shared.client.clone();
                                async move { c.report_checkpoint(r).await }
                            },
                            stop,
                        )
                        .await;
                        if let Err(why) = reported {
                            break End::Stopped(why);
                        }
                    }
                    Err(_) => tracing::warn!(trial = %trial.trial_id, %line, "ignoring a stdout line that is not an event"),
                },
                None => break End::Exited(process.wait().await?),
            },
            _ = tick.tick() => {
                if metrics.len() > 0 {
                    metrics.send(&shared.relay).await;
                }
                if metrics.any_stale() {
                    break End::Stopped("lease lost: the coordinator refused its metrics".into());
                }
            }
            _ = stop.changed() => {
                let why = stop.borrow().clone().unwrap_or_else(|| "stopped".into());
                break End::Stopped(why);
            }
        }
    };

    match &end {
        End::Stopped(why) => {
            tracing::info!(trial = %trial.trial_id, %why, "stopping trial");
            shared.telemetry.exit("stopped");
            process.terminate().await;
            return Ok(Driven::Ended(Box::new((None, None))));
        }
        End::Done(_) => process.wait_done_mark(&trial.trial_id).await,
        End::Exited(_) => {}
    }
    let tail = process.tail();
    // A warm process that finished its trial stays for the slot's next one.
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
        if status.code() == Some(LOADER_FAILED) && metrics.len() == 0 && outputs.is_empty() && !any_event {
            return Ok(Driven::NotStarted(format!(
                "trial processes cannot start ({status}): {}",
                last_line()
            )));
        }
    }
    let (outcome, error) = match &end {
        End::Done(None) if paused.is_some() => ("paused", String::new()),
        End::Exited(status) if status.success() && paused.is_some() => ("paused", String::new()),
        End::Done(None) => ("succeeded", String::new()),
        // The trial's own failure (bad parameters, divergence, data): running it again would fail again.
        End::Done(Some(error)) => ("failed", format!("trial failed: error: {error}")),
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
        End::Stopped(_) => unreachable!("a stopped trial returned above"),
    };
    shared.telemetry.exit(outcome);
    let request = proto::CompleteRequest {
        trial_id: trial.trial_id.clone(),
        lease_token: trial.lease_token.clone(),
        outcome: outcome.into(),
        error,
        paused_at_step: paused.unwrap_or(0),
        stderr_tail: if outcome == "succeeded" || outcome == "paused" {
            String::new()
        } else {
            tail.join("\n")
        },
        outputs_json: if outputs.is_empty() {
            String::new()
        } else {
            serde_json::Value::Object(outputs).to_string()
        },
        provenance_json: shared.provenance.for_slot(slot),
    };
    let finish = Finish {
        metrics,
        request,
        stop: stop.clone(),
        span: tracing::Span::current(),
    };
    Ok(Driven::Ended(Box::new((keep.then_some(process), Some(finish)))))
}

/// What is left of a trial once its process is done with it: its last metrics
/// to make durable, then its completion. It runs after the slot is free again,
/// so the slot's next trial need not wait for it; the daemon keeps heartbeating
/// the lease until it ends.
pub struct Finish {
    metrics: Batcher,
    request: proto::CompleteRequest,
    stop: watch::Receiver<Option<String>>,
    /// The trial's span: the completion is part of its trace.
    span: tracing::Span,
}

impl Finish {
    pub async fn run(self, shared: &Shared) {
        let span = self.span.clone();
        self.report(shared).instrument(span).await
    }

    async fn report(mut self, shared: &Shared) {
        let id = self.request.trial_id.clone();
        if let Err(why) = self.metrics.drain(&shared.relay).await {
            tracing::info!(trial = %id, %why, "trial finished but its lease is gone");
            return;
        }
        let request = self.request;
        match retry(
            || {
                let r = request.clone();
                let mut c = shared.client.clone();
                async move { c.complete(r).await }
            },
            &mut self.stop,
        )
        .await
        {
            Ok(()) => tracing::info!(trial = %id, outcome = %request.outcome, "trial finished"),
            Err(why) => tracing::info!(trial = %id, %why, "trial finished but its lease is gone"),
        }
    }
}

/// Retries a fenced call while the coordinator is unreachable; gives up when the lease is stale or the trial is stopped.
async fn retry<F, Fut, T>(mut call: F, stop: &mut watch::Receiver<Option<String>>) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(_) => return Ok(()),
            Err(status) if status.code() == Code::FailedPrecondition => return Err(status.message().to_string()),
            Err(status) if status.code() == Code::InvalidArgument => return Err(status.message().to_string()),
            Err(status) => {
                tracing::debug!(%status, "coordinator unreachable; retrying");
                if let Some(why) = stop.borrow().clone() {
                    return Err(why);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Collects one trial's points into columnar batches and tracks their acks.
struct Batcher {
    trial_id: String,
    lease_token: String,
    names: Vec<String>,
    name_index: Vec<u32>,
    steps: Vec<i64>,
    values: Vec<f64>,
    in_flight: VecDeque<oneshot::Receiver<Ack>>,
    stale: bool,
}

impl Batcher {
    fn new(trial: &proto::LeasedTrial) -> Batcher {
        Batcher {
            trial_id: trial.trial_id.clone(),
            lease_token: trial.lease_token.clone(),
            names: Vec::new(),
            name_index: Vec::new(),
            steps: Vec::new(),
            values: Vec::new(),
            in_flight: VecDeque::new(),
            stale: false,
        }
    }

    fn len(&self) -> usize {
        self.steps.len()
    }

    fn push(&mut self, name: String, step: i64, value: f64) {
        let index = match self.names.iter().position(|n| *n == name) {
            Some(i) => i,
            None => {
                self.names.push(name);
                self.names.len() - 1
            }
        };
        self.name_index.push(index as u32);
        self.steps.push(step);
        self.values.push(value);
    }

    async fn send(&mut self, relay: &Relay) {
        let batch = proto::MetricBatch {
            seq: 0,
            trial_id: self.trial_id.clone(),
            lease_token: self.lease_token.clone(),
            names: std::mem::take(&mut self.names),
            name_index: std::mem::take(&mut self.name_index),
            steps: std::mem::take(&mut self.steps),
            values: std::mem::take(&mut self.values),
        };
        self.in_flight.push_back(relay.send(batch).await);
        self.any_stale();
    }

    /// Takes in the acks that have arrived, without waiting; true once any said the lease is stale.
    fn any_stale(&mut self) -> bool {
        while let Some(front) = self.in_flight.front_mut() {
            match front.try_recv() {
                Ok(ack) => {
                    self.stale |= ack == Ack::Stale;
                    self.in_flight.pop_front();
                }
                Err(_) => break,
            }
        }
        self.stale
    }

    /// Sends what is buffered and waits until every batch is durable.
    async fn drain(&mut self, relay: &Relay) -> Result<(), String> {
        if self.len() > 0 {
            self.send(relay).await;
        }
        while let Some(rx) = self.in_flight.pop_front() {
            match rx.await {
                Ok(Ack::Durable) | Ok(Ack::Invalid(_)) => {}
                Ok(Ack::Stale) => self.stale = true,
                Err(_) => return Err("metric relay stopped".into()),
            }
        }
        if self.stale {
            Err("lease lost: the coordinator refused its metrics".into())
        } else {
            Ok(())
        }
    }
}
