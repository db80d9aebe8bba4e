//! The `Workers` service: register, lease, heartbeat, metrics, checkpoints, completion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ablate_schema::proto::{self, workers_server};
use ablate_schema::WorkerId;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::db::{self, CheckpointRecord};
use crate::error::Error;
use crate::platform::completion::{self, Completion};
use crate::platform::ingest::{ingest, Batch};
use crate::platform::{clip_reason, lease_of, parse_id};
use crate::telemetry::Telemetry;
use ablate_schema::Limits;

use super::{ResponseStream, INGEST_IN_FLIGHT};

pub struct WorkersService {
    pub(super) pool: PgPool,
    /// Leases, served together when workers ask at once.
    pub(super) lessor: crate::platform::lease::Lessor,
    /// Completions, recorded together when workers report at once.
    pub(super) completer: crate::platform::completion::Completer,
    pub(super) lease_ttl: Duration,
    pub(super) limits: Limits,
    /// Metric name -> id; a cache of `metric_names`, refilled on a miss.
    pub(super) names: Arc<Mutex<HashMap<String, i32>>>,
    pub(super) telemetry: Arc<Telemetry>,
}

#[tonic::async_trait]
impl workers_server::Workers for WorkersService {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let req = request.into_inner();
        let id = parse_id(WorkerId::parse, &req.worker_id)?;
        let limits = &self.limits;
        let text = |path: &str, s: &str| {
            limits
                .check_name(path, s, limits.max_string_chars)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        };
        text("pool", &req.pool)?;
        for (k, v) in &req.labels {
            text("labels", k)?;
            text("labels", v)?;
        }
        db::register_worker(
            &self.pool,
            &db::NewWorker {
                id,
                hostname: &req.hostname,
                devices: &req.devices,
                pool: (!req.pool.is_empty()).then_some(req.pool.as_str()),
                labels: serde_json::to_value(&req.labels).expect("labels serialize"),
                allow_commands: req.allow_commands,
            },
        )
        .await?;
        tracing::info!(worker = %id, hostname = %req.hostname, devices = ?req.devices, pool = %req.pool, labels = ?req.labels, allow_commands = req.allow_commands, "worker registered");
        let ttl = self.lease_ttl.as_millis() as u32;
        Ok(Response::new(proto::RegisterResponse {
            lease_ttl_ms: ttl,
            heartbeat_interval_ms: (ttl / 5).max(100),
        }))
    }

    async fn lease(&self, request: Request<proto::LeaseRequest>) -> Result<Response<proto::LeaseResponse>, Status> {
        let req = request.into_inner();
        let worker = parse_id(WorkerId::parse, &req.worker_id)?;
        let started = std::time::Instant::now();
        let leased = self
            .lessor
            .lease(worker, req.max_trials, req.free_gpus, req.slot_memory_bytes)
            .await?;
        self.telemetry.lease_seconds.observe(started.elapsed().as_secs_f64());
        self.telemetry.trials_leased.add(leased.len() as u64);
        Ok(Response::new(proto::LeaseResponse {
            trials: leased
                .into_iter()
                .map(|t| proto::LeasedTrial {
                    traceparent: lease_span(&t, &worker),
                    trial_id: t.trial.to_string(),
                    experiment_id: t.experiment.to_string(),
                    lease_token: t.token.to_string(),
                    attempt: t.attempt as u32,
                    family: t.family,
                    params_json: t.params.to_string(),
                    spec_hash: t.spec_hash,
                    fresh_process: t.fresh_process,
                    gpus: t.gpus,
                    pause_at_step: t.pause_at,
                    fuse_group: t.fuse_group.map(|g| g.to_string()).unwrap_or_default(),
                    command_json: t.command.map(|c| c.to_string()).unwrap_or_default(),
                    code_hash: t.code_hash.unwrap_or_default(),
                    resume_from: t.resume_from.map(|c| proto::Checkpoint {
                        step: c.step,
                        path: c.path,
                        bytes: c.bytes as u64,
                    }),
                })
                .collect(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let worker = parse_id(WorkerId::parse, &req.worker_id)?;
        let held = req
            .leases
            .iter()
            .map(|l| lease_of(&l.trial_id, &l.lease_token))
            .collect::<Result<Vec<_>, _>>()?;
        let unhealthy = clip_reason(&req.unhealthy, self.limits.max_string_chars);
        let unhealthy = (!unhealthy.is_empty()).then_some(unhealthy.as_str());
        let beat = db::heartbeat(&self.pool, worker, &held, self.lease_ttl, unhealthy).await?;
        Ok(Response::new(proto::HeartbeatResponse {
            drain: beat.drain,
            stop: beat
                .stop
                .into_iter()
                .map(|(trial, reason)| proto::StopOrder {
                    trial_id: trial.to_string(),
                    reason,
                })
                .collect(),
        }))
    }

    type StreamMetricsStream = ResponseStream<proto::MetricAck>;

    async fn stream_metrics(
        &self,
        request: Request<Streaming<proto::MetricBatch>>,
    ) -> Result<Response<Self::StreamMetricsStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let pool = self.pool.clone();
        let names = self.names.clone();
        let limits = self.limits;
        let telemetry = self.telemetry.clone();
        tokio::spawn(async move {
            // Up to INGEST_IN_FLIGHT batches of one stream are written at once; acks carry
            // the batch's sequence number, so they may arrive out of order.
            let mut acks = inbound
                .filter_map(|next| futures::future::ready(next.ok()))
                .map(|batch| {
                    let (pool, names, telemetry) = (pool.clone(), names.clone(), telemetry.clone());
                    async move {
                        let started = std::time::Instant::now();
                        let view = Batch {
                            seq: batch.seq,
                            trial_id: &batch.trial_id,
                            lease_token: &batch.lease_token,
                            names: &batch.names,
                            name_index: &batch.name_index,
                            steps: &batch.steps,
                            values: &batch.values,
                        };
                        let result = ingest(&pool, &names, &limits, &view).await;
                        if result.is_ok() {
                            telemetry.metric_batch_seconds.observe(started.elapsed().as_secs_f64());
                            telemetry.metric_points.add(batch.steps.len() as u64);
                        }
                        (batch.seq, result)
                    }
                })
                .buffer_unordered(INGEST_IN_FLIGHT);
            while let Some((seq, result)) = acks.next().await {
                let ack = |status: &str, error: String| proto::MetricAck {
                    seq,
                    status: status.into(),
                    error,
                };
                let ack = match result {
                    Ok(_) => ack("durable", String::new()),
                    Err(Error::StaleLease { trial }) => ack("stale_lease", format!("stale lease for trial {trial}")),
                    Err(Error::InvalidArgument(message)) => ack("invalid", message),
                    Err(error) => {
                        // Not durable and not refused: end the stream; the worker resends.
                        let _ = tx.send(Err(Status::from(error))).await;
                        return;
                    }
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_checkpoint(
        &self,
        request: Request<proto::CheckpointReport>,
    ) -> Result<Response<proto::CheckpointAck>, Status> {
        let req = request.into_inner();
        let (trial, token) = lease_of(&req.trial_id, &req.lease_token)?;
        let c = req
            .checkpoint
            .ok_or_else(|| Status::invalid_argument("checkpoint report without a checkpoint"))?;
        let record = CheckpointRecord {
            step: c.step,
            path: c.path,
            bytes: c.bytes as i64,
        };
        db::record_checkpoint(&self.pool, trial, token, &record).await?;
        Ok(Response::new(proto::CheckpointAck {}))
    }

    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let req = request.into_inner();
        let worker = parse_id(WorkerId::parse, &req.worker_id)?;
        let (trial, token) = lease_of(&req.trial_id, &req.lease_token)?;
        let reason = clip_reason(&req.reason, self.limits.max_string_chars);
        let released = db::release(&self.pool, worker, trial, token, &reason).await?;
        tracing::warn!(trial = %trial, worker = %worker, %reason, released, "worker could not start a trial; it goes back to the queue");
        Ok(Response::new(proto::ReleaseResponse { released }))
    }

    async fn complete(
        &self,
        request: Request<proto::CompleteRequest>,
    ) -> Result<Response<proto::CompleteResponse>, Status> {
        let completion = Completion::check(&report(&request.into_inner()), &self.limits)?;
        let trial = completion.trial();
        let stale = self.completer.record(vec![completion]).await?;
        if !stale.is_empty() {
            return Err(Error::StaleLease {
                trial: trial.to_string(),
            }
            .into());
        }
        Ok(Response::new(proto::CompleteResponse {}))
    }

    async fn complete_many(
        &self,
        request: Request<proto::CompleteManyRequest>,
    ) -> Result<Response<proto::CompleteManyResponse>, Status> {
        let req = request.into_inner();
        if req.completions.len() as u64 > self.limits.max_trials {
            return Err(Status::invalid_argument(format!(
                "{} completions in one call, over the limit of {}",
                req.completions.len(),
                self.limits.max_trials
            )));
        }
        // Every completion is checked before any is recorded: a bad one refuses the call and changes nothing.
        let completions = req
            .completions
            .into_iter()
            .map(|c| Completion::check(&report(&c), &self.limits))
            .collect::<Result<Vec<_>, Error>>()?;
        let stale_trial_ids = self.completer.record(completions).await?;
        Ok(Response::new(proto::CompleteManyResponse { stale_trial_ids }))
    }
}

/// A completion message as the platform reads it.
fn report(req: &proto::CompleteRequest) -> completion::Report<'_> {
    completion::Report {
        trial_id: &req.trial_id,
        lease_token: &req.lease_token,
        outcome: &req.outcome,
        paused_at_step: req.paused_at_step,
        error: &req.error,
        stderr_tail: &req.stderr_tail,
        outputs_json: &req.outputs_json,
        provenance_json: &req.provenance_json,
    }
}

/// The span of one trial's lease, in the trace its experiment's submit began
/// (when traces are on); its `traceparent` goes to the worker with the trial.
fn lease_span(trial: &db::LeasedTrial, worker: &WorkerId) -> String {
    if !ablate_schema::trace::enabled() {
        return String::new();
    }
    let span = tracing::info_span!("lease",
        experiment_id = %trial.experiment,
        trial_id = %trial.trial,
        attempt = trial.attempt,
        worker_id = %worker);
    if let Some(parent) = &trial.traceparent {
        ablate_schema::trace::set_parent(&span, parent);
    }
    ablate_schema::trace::traceparent(&span).unwrap_or_default()
}
