//! A trial's calls to the coordinator, fenced by its lease: its metric batches
//! (`Batcher`), its completion once they are durable (`Finish`), each call retried
//! while the coordinator is away (`retry`) until the lease is gone.

use std::collections::VecDeque;
use std::time::Duration;

use ablate_schema::proto;
use tokio::sync::{oneshot, watch};
use tonic::Code;
use tracing::Instrument;

use super::Shared;
use crate::relay::{Ack, Relay};

/// What is left of a trial once its process is done with it: its last metrics
/// to make durable, then its completion. It runs after the slot is free again,
/// so the slot's next trial need not wait for it; the daemon keeps heartbeating
/// the lease until it ends.
pub struct Finish {
    pub(super) metrics: Batcher,
    pub(super) request: proto::CompleteRequest,
    pub(super) stop: watch::Receiver<Option<String>>,
    /// The trial's span: the completion is part of its trace.
    pub(super) span: tracing::Span,
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
        let mut request = self.request;
        let mut refused_once = false;
        loop {
            let sent = request.clone();
            match retry(
                || {
                    let r = sent.clone();
                    let mut c = shared.client.clone();
                    async move { c.complete(r).await }
                },
                &mut self.stop,
            )
            .await
            {
                Ok(()) => tracing::info!(trial = %id, outcome = %request.outcome, "trial finished"),
                // A report the coordinator refuses would be refused again: the attempt fails
                // now, with the coordinator's reason, instead of waiting for its lease to expire.
                Err(GaveUp::Refused(why)) if !refused_once => {
                    tracing::warn!(trial = %id, %why, "the coordinator refused the trial's completion; failing the attempt");
                    refused_once = true;
                    request.outcome = "failed".into();
                    request.error = format!("the coordinator refused the trial's completion: {why}");
                    request.outputs_json.clear();
                    continue;
                }
                Err(why) => tracing::info!(trial = %id, %why, "trial finished but its lease is gone"),
            }
            return;
        }
    }
}

/// Why a fenced call gave up.
#[derive(Debug)]
pub(super) enum GaveUp {
    /// The coordinator refused what was sent as invalid (`INVALID_ARGUMENT`), with its reason.
    Refused(String),
    /// The lease is stale, or the trial was stopped.
    Gone(String),
}

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GaveUp::Refused(why) | GaveUp::Gone(why) => f.write_str(why),
        }
    }
}

impl From<GaveUp> for String {
    fn from(why: GaveUp) -> String {
        why.to_string()
    }
}

/// Retries a fenced call while the coordinator is unreachable; gives up when the lease is
/// stale, the trial is stopped, or the coordinator refuses the call as invalid.
pub(super) async fn retry<F, Fut, T>(mut call: F, stop: &mut watch::Receiver<Option<String>>) -> Result<(), GaveUp>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(_) => return Ok(()),
            Err(status) if status.code() == Code::FailedPrecondition => {
                return Err(GaveUp::Gone(status.message().to_string()))
            }
            Err(status) if status.code() == Code::InvalidArgument => {
                return Err(GaveUp::Refused(status.message().to_string()))
            }
            Err(status) => {
                tracing::debug!(%status, "coordinator unreachable; retrying");
                if let Some(why) = stop.borrow().clone() {
                    return Err(GaveUp::Gone(why));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Collects one trial's points into columnar batches and tracks their acks.
pub(super) struct Batcher {
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
    pub(super) fn new(trial: &proto::LeasedTrial) -> Batcher {
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

    pub(super) fn len(&self) -> usize {
        self.steps.len()
    }

    pub(super) fn push(&mut self, name: String, step: i64, value: f64) {
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

    pub(super) async fn send(&mut self, relay: &Relay) {
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
    pub(super) fn any_stale(&mut self) -> bool {
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
    pub(super) async fn drain(&mut self, relay: &Relay) -> Result<(), String> {
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
