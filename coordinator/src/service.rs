//! The gRPC edge: converts between `ablate.v1` messages and domain calls.
//! Nothing but conversions and request plumbing lives here.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ablate_schema::proto::{self, experiments_server, workers_server};
use ablate_schema::{ExperimentId, LeaseToken, SpecFormat, TrialId, TrialState, WorkerId};
use futures::Stream;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{self, Caller, Role, Tokens};
use crate::db::{self, CheckpointRecord, ExperimentRow, TrialRow};
use crate::error::Error;
use crate::reader::Reader;
use crate::submit;
use crate::telemetry::Telemetry;
use ablate_schema::Limits;

/// Metric batches of one stream written concurrently.
const INGEST_IN_FLIGHT: usize = 4;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub fn experiments_server(
    pool: PgPool,
    reader: Reader,
    tokens: Option<Tokens>,
    options: &crate::Options,
    http_port: Option<u16>,
) -> experiments_server::ExperimentsServer<ExperimentsService> {
    experiments_server::ExperimentsServer::new(ExperimentsService {
        pool,
        reader,
        limits: options.limits,
        lease_ttl: options.lease_ttl,
        tokens,
        database_url: options.database_url.clone(),
        data_roots: options.data_roots.clone(),
        http_port,
    })
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20)
}

pub fn workers_server(
    pool: PgPool,
    lease_ttl: Duration,
    limits: Limits,
    telemetry: Arc<Telemetry>,
) -> workers_server::WorkersServer<WorkersService> {
    workers_server::WorkersServer::new(WorkersService {
        pool,
        lease_ttl,
        limits,
        names: Arc::new(Mutex::new(HashMap::new())),
        telemetry,
    })
    .max_decoding_message_size(64 << 20)
}

fn parse_id<T>(parse: impl Fn(&str) -> Result<T, ablate_schema::ids::BadId>, text: &str) -> Result<T, Error> {
    parse(text).map_err(|e| Error::InvalidArgument(e.to_string()))
}

#[derive(Clone)]
pub struct ExperimentsService {
    pool: PgPool,
    /// Researchers' reads: their own pool and admission.
    reader: Reader,
    limits: Limits,
    /// A worker unheard of for longer than this is lost: its leases have expired.
    lease_ttl: Duration,
    /// The valid tokens, when auth is on.
    tokens: Option<Tokens>,
    /// Where the coordinator's database is (for the reader login's URL).
    database_url: String,
    /// Where trials may read local data.
    data_roots: Vec<std::path::PathBuf>,
    /// The HTTP listener's port (the dashboard), when there is one.
    http_port: Option<u16>,
}

impl ExperimentsService {
    /// A token change takes effect at once on this coordinator (others within a second).
    async fn reload_tokens(&self) -> Result<(), Error> {
        match &self.tokens {
            Some(tokens) => tokens.reload().await,
            None => Ok(()),
        }
    }

    async fn snapshot(&self, id: ExperimentId, best: u32) -> Result<proto::Experiment, Error> {
        let row = db::experiment(&self.pool, id).await?;
        let best_rows = db::best_trials(&self.pool, &row, best.max(1)).await?;
        let (running, failed) = db::active_and_failed_trials(&self.pool, id).await?;
        let mut message = experiment_message(&row, &best_rows, &running, &failed);
        message.waiting = db::waiting_reason(&self.pool, id, self.lease_ttl)
            .await?
            .unwrap_or_default();
        Ok(message)
    }
}

fn trial_message(t: &TrialRow) -> proto::TrialSummary {
    proto::TrialSummary {
        trial_id: t.id.to_string(),
        ordinal: t.ordinal as u32,
        state: t.state.clone(),
        params_json: t.params.to_string(),
        objective: t.objective,
        attempt: t.attempt as u32,
        step: t.step,
        total_steps: t.total_steps,
        error: t.error.clone().unwrap_or_default(),
    }
}

fn experiment_message(
    e: &ExperimentRow,
    best: &[TrialRow],
    running: &[TrialRow],
    failed: &[TrialRow],
) -> proto::Experiment {
    let c = &e.counts;
    proto::Experiment {
        id: e.id.to_string(),
        name: e.name.clone(),
        family: e.family.clone(),
        state: e.state.clone(),
        counts: Some(proto::TrialCounts {
            pending: c.pending as u32,
            running: c.running as u32,
            succeeded: c.succeeded as u32,
            failed: c.failed as u32,
            pruned: c.pruned as u32,
            cancelled: c.cancelled as u32,
        }),
        objective_metric: e.objective_metric.clone().unwrap_or_default(),
        goal: e.goal.clone().unwrap_or_default(),
        created_at: e.created_at.to_rfc3339(),
        best: best.iter().map(trial_message).collect(),
        running: running.iter().map(trial_message).collect(),
        failures: failed.iter().map(trial_message).collect(),
        swept_params: e.swept.clone(),
        waiting: String::new(),
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

#[tonic::async_trait]
impl experiments_server::Experiments for ExperimentsService {
    async fn submit(&self, request: Request<proto::SubmitRequest>) -> Result<Response<proto::SubmitResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        let format = SpecFormat::parse(&req.format).ok_or_else(|| {
            Status::invalid_argument(format!("unknown spec format `{}`, expected toml or yaml", req.format))
        })?;
        let by = caller.as_ref().map(|c| c.name.as_str());
        let (id, count) =
            submit::submit_as(&self.pool, &req.spec_text, format, &self.limits, &self.data_roots, by).await?;
        Ok(Response::new(proto::SubmitResponse {
            experiment_id: id.to_string(),
            trial_count: count as u32,
        }))
    }

    async fn get_experiment(
        &self,
        request: Request<proto::GetExperimentRequest>,
    ) -> Result<Response<proto::Experiment>, Status> {
        let req = request.into_inner();
        let id = parse_id(ExperimentId::parse, &req.experiment_id)?;
        Ok(Response::new(self.snapshot(id, req.best).await?))
    }

    async fn list_experiments(
        &self,
        request: Request<proto::ListExperimentsRequest>,
    ) -> Result<Response<proto::ListExperimentsResponse>, Status> {
        let limit = request.into_inner().limit;
        let rows = db::list_experiments(&self.pool, if limit == 0 { 50 } else { limit }).await?;
        let mut experiments = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut message = experiment_message(row, &[], &[], &[]);
            if row.counts.pending > 0 {
                message.waiting = db::waiting_reason(&self.pool, row.id, self.lease_ttl)
                    .await?
                    .unwrap_or_default();
            }
            experiments.push(message);
        }
        Ok(Response::new(proto::ListExperimentsResponse { experiments }))
    }

    async fn cancel(&self, request: Request<proto::CancelRequest>) -> Result<Response<proto::CancelResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let id = parse_id(ExperimentId::parse, &request.into_inner().experiment_id)?;
        if let Some(caller) = caller.filter(|c| c.role != Role::Admin) {
            let owner = db::submitter(&self.pool, id).await?;
            if owner.as_deref() != Some(caller.name.as_str()) {
                return Err(Status::permission_denied(format!(
                    "experiment {id} was submitted by {}; only they or an admin may cancel it",
                    owner.as_deref().unwrap_or("no one with a token")
                )));
            }
        }
        let n = db::cancel(&self.pool, id).await?;
        tracing::info!(experiment = %id, trials = n, "experiment cancelled");
        Ok(Response::new(proto::CancelResponse {
            trials_cancelled: n as u32,
        }))
    }

    async fn reader_url(
        &self,
        _request: Request<proto::ReaderUrlRequest>,
    ) -> Result<Response<proto::ReaderUrlResponse>, Status> {
        let password = auth::new_secret();
        db::set_reader_login(&self.pool, &password).await?;
        let mut url = url::Url::parse(&self.database_url)
            .map_err(|e| Status::internal(format!("the coordinator's database URL: {e}")))?;
        url.set_username(db::READER_LOGIN)
            .and_then(|_| url.set_password(Some(&password)))
            .map_err(|_| Status::internal("the coordinator's database URL takes no user"))?;
        tracing::info!("reader login re-keyed");
        Ok(Response::new(proto::ReaderUrlResponse { url: url.to_string() }))
    }

    async fn dashboard(
        &self,
        _request: Request<proto::DashboardRequest>,
    ) -> Result<Response<proto::DashboardResponse>, Status> {
        Ok(Response::new(proto::DashboardResponse {
            http_port: self.http_port.map_or(0, u32::from),
        }))
    }

    async fn create_token(
        &self,
        request: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        let req = request.into_inner();
        let role = Role::parse(&req.role).ok_or_else(|| {
            Status::invalid_argument(format!("role `{}`: expected researcher, worker or admin", req.role))
        })?;
        let name = if req.name.is_empty() {
            format!("{}-{}", role.as_str(), &uuid::Uuid::new_v4().simple().to_string()[..8])
        } else {
            req.name
        };
        self.limits
            .check_name("name", &name, self.limits.max_name_chars)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let expires =
            (req.expires_in_s > 0).then(|| chrono::Utc::now() + chrono::Duration::seconds(req.expires_in_s as i64));
        let token = auth::new_secret();
        db::create_token(&self.pool, &name, role.as_str(), &auth::hash(&token), expires).await?;
        self.reload_tokens().await?;
        tracing::info!(%name, role = role.as_str(), "token created");
        Ok(Response::new(proto::CreateTokenResponse { token, name }))
    }

    async fn list_tokens(
        &self,
        _request: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        let rows = db::list_tokens(&self.pool).await?;
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
        Ok(Response::new(proto::ListTokensResponse {
            tokens: rows
                .into_iter()
                .map(|t| proto::TokenInfo {
                    name: t.name,
                    role: t.role,
                    created_at: t.created_at.to_rfc3339(),
                    expires_at: time(t.expires_at),
                    revoked_at: time(t.revoked_at),
                })
                .collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        let name = request.into_inner().name;
        if !db::revoke_token(&self.pool, &name).await? {
            return Err(Status::not_found(format!("no live token named `{name}`")));
        }
        self.reload_tokens().await?;
        tracing::info!(%name, "token revoked");
        Ok(Response::new(proto::RevokeTokenResponse {}))
    }

    async fn set_token_weight(
        &self,
        request: Request<proto::SetTokenWeightRequest>,
    ) -> Result<Response<proto::SetTokenWeightResponse>, Status> {
        let req = request.into_inner();
        if !(req.weight.is_finite() && req.weight > 0.0 && req.weight <= 1000.0) {
            return Err(Status::invalid_argument(format!(
                "weight {}: expected above 0 and at most 1000, such as 2",
                req.weight
            )));
        }
        if !db::set_token_weight(&self.pool, &req.name, req.weight).await? {
            return Err(Status::not_found(format!("no token named `{}`", req.name)));
        }
        tracing::info!(name = %req.name, weight = req.weight, "fair-share weight set");
        Ok(Response::new(proto::SetTokenWeightResponse {}))
    }

    type WatchStream = ResponseStream<proto::Experiment>;

    async fn watch(
        &self,
        request: Request<proto::GetExperimentRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let id = parse_id(ExperimentId::parse, &req.experiment_id)?;
        let first = self.snapshot(id, req.best).await?;
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while last.state == "running" {
                tokio::time::sleep(Duration::from_millis(250)).await;
                match service.snapshot(id, req.best).await {
                    Ok(next) if next != last => {
                        if tx.send(Ok(next.clone())).await.is_err() {
                            return;
                        }
                        last = next;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        let _ = tx.send(Err(error.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_workers(
        &self,
        _request: Request<proto::ListWorkersRequest>,
    ) -> Result<Response<proto::ListWorkersResponse>, Status> {
        let rows = db::list_workers(&self.pool, self.lease_ttl).await?;
        Ok(Response::new(proto::ListWorkersResponse {
            workers: rows
                .into_iter()
                .map(|w| proto::WorkerInfo {
                    worker_id: w.id.to_string(),
                    hostname: w.hostname,
                    devices: w.devices,
                    registered_at: w.registered_at.to_rfc3339(),
                    last_seen_at: w.last_seen_at.to_rfc3339(),
                    running_trials: w.running as u32,
                    unhealthy: w.unhealthy.clone().unwrap_or_default(),
                    lost: w.lost,
                    draining_since: w.draining_since.map(|t| t.to_rfc3339()).unwrap_or_default(),
                    pool: w.pool.clone().unwrap_or_default(),
                    labels: w
                        .labels
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn drain_worker(
        &self,
        request: Request<proto::DrainWorkerRequest>,
    ) -> Result<Response<proto::DrainWorkerResponse>, Status> {
        let id = request.into_inner().worker_id;
        let id = id.trim();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(Status::invalid_argument(format!(
                "`{id}` is not a worker id; `ablate workers` lists them (a unique prefix will do)"
            )));
        }
        match db::drain(&self.pool, id).await? {
            db::Drained::Yes(worker, running) => {
                tracing::info!(%worker, running, "draining worker");
                Ok(Response::new(proto::DrainWorkerResponse {
                    worker_id: worker.to_string(),
                    running_trials: running as u32,
                }))
            }
            db::Drained::NoSuchWorker => Err(Status::not_found(format!(
                "no worker's id starts with `{id}`; `ablate workers` lists them"
            ))),
            db::Drained::Ambiguous(ids) => Err(Status::invalid_argument(format!(
                "`{id}` names several workers ({}); give more of the id",
                ids.join(", ")
            ))),
        }
    }

    async fn report(
        &self,
        request: Request<proto::GetExperimentRequest>,
    ) -> Result<Response<proto::ReportResponse>, Status> {
        let _admission = self.reader.admit(request.remote_addr().map(|a| a.ip()))?;
        let id = parse_id(ExperimentId::parse, &request.into_inner().experiment_id)?;
        let (family, outcomes) = db::report_outcomes(&self.reader.pool, id).await?;
        let family = ablate_experiments::Family::parse(&family).map_err(Error::InvalidArgument)?;
        let report = family
            .report(&outcomes)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(Response::new(proto::ReportResponse {
            report_json: serde_json::to_string(&report).expect("a report serializes"),
        }))
    }

    type QueryStream = ResponseStream<proto::QueryChunk>;

    async fn query(&self, request: Request<proto::QueryRequest>) -> Result<Response<Self::QueryStream>, Status> {
        let _admission = self.reader.admit(request.remote_addr().map(|a| a.ip()))?;
        let req = request.into_inner();
        let timeout = Duration::from_millis(if req.timeout_ms == 0 {
            30_000
        } else {
            req.timeout_ms as u64
        });
        let result = db::read_only_query(&self.reader.pool, &req.sql, timeout).await?;
        let mut chunks = Vec::new();
        let mut columns = Some(result.columns);
        let mut rows = result.rows.into_iter().peekable();
        loop {
            let rows_json: Vec<String> = rows
                .by_ref()
                .take(1000)
                .map(|r| serde_json::Value::from(r).to_string())
                .collect();
            let last = rows.peek().is_none();
            chunks.push(Ok(proto::QueryChunk {
                columns: columns.take().unwrap_or_default(),
                rows_json,
            }));
            if last {
                break;
            }
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

pub struct WorkersService {
    pool: PgPool,
    lease_ttl: Duration,
    limits: Limits,
    /// Metric name -> id; a cache of `metric_names`, refilled on a miss.
    names: Arc<Mutex<HashMap<String, i32>>>,
    telemetry: Arc<Telemetry>,
}

/// A call's trial and lease token; the trial's id goes on the call's span.
fn lease_of(trial: &str, token: &str) -> Result<(TrialId, LeaseToken), Error> {
    let ids = (parse_id(TrialId::parse, trial)?, parse_id(LeaseToken::parse, token)?);
    tracing::Span::current().record("trial_id", trial);
    Ok(ids)
}

/// Writes one metric batch; returns the number of points stored.
async fn ingest(
    pool: &PgPool,
    names: &Mutex<HashMap<String, i32>>,
    limits: &Limits,
    batch: &proto::MetricBatch,
) -> Result<u64, Error> {
    let (trial, token) = lease_of(&batch.trial_id, &batch.lease_token)?;
    let n = batch.steps.len();
    if n > limits.max_batch_points {
        return Err(Error::InvalidArgument(format!(
            "metric batch {} has {n} points, over the limit of {}; send smaller batches",
            batch.seq, limits.max_batch_points
        )));
    }
    if batch.names.len() > limits.max_metric_names {
        return Err(Error::InvalidArgument(format!(
            "metric batch {} names {} metrics, over the limit of {} per trial",
            batch.seq,
            batch.names.len(),
            limits.max_metric_names
        )));
    }
    for (i, name) in batch.names.iter().enumerate() {
        limits
            .check_name(&format!("metric name {i}"), name, limits.max_string_chars)
            .map_err(|e| Error::InvalidArgument(format!("metric batch {}: {e}", batch.seq)))?;
    }
    if batch.values.len() != n || batch.name_index.len() != n {
        return Err(Error::InvalidArgument(format!(
            "metric batch {} has {} steps, {} values and {} name indexes; they must match",
            batch.seq,
            n,
            batch.values.len(),
            batch.name_index.len()
        )));
    }
    if let Some(bad) = batch.name_index.iter().find(|&&i| i as usize >= batch.names.len()) {
        return Err(Error::InvalidArgument(format!(
            "metric batch {} refers to name {bad} of {}",
            batch.seq,
            batch.names.len()
        )));
    }
    let missing: Vec<String> = {
        let cache = names.lock().expect("name cache lock");
        batch
            .names
            .iter()
            .filter(|n| !cache.contains_key(*n))
            .cloned()
            .collect()
    };
    if !missing.is_empty() {
        let interned = db::intern_metric_names(pool, &missing).await?;
        names.lock().expect("name cache lock").extend(interned);
    }
    let ids: Vec<i32> = {
        let cache = names.lock().expect("name cache lock");
        batch.names.iter().map(|n| cache[n]).collect()
    };
    // The same (name, step) twice in one batch: the later point wins.
    let mut latest: HashMap<(i32, i64), f64> = HashMap::with_capacity(n);
    let mut order = Vec::with_capacity(n);
    for i in 0..n {
        let key = (ids[batch.name_index[i] as usize], batch.steps[i]);
        if latest.insert(key, batch.values[i]).is_none() {
            order.push(key);
        }
    }
    // Rows in key order, so concurrent batches lock keys in the same order and never deadlock.
    order.sort_unstable();
    let name_ids: Vec<i32> = order.iter().map(|k| k.0).collect();
    let steps: Vec<i64> = order.iter().map(|k| k.1).collect();
    let values: Vec<f64> = order.iter().map(|k| latest[k]).collect();
    db::insert_metrics(pool, trial, token, &name_ids, &steps, &values).await
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
            },
        )
        .await?;
        tracing::info!(worker = %id, hostname = %req.hostname, devices = ?req.devices, pool = %req.pool, labels = ?req.labels, "worker registered");
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
        let leased = db::lease(
            &self.pool,
            worker,
            req.max_trials,
            req.free_gpus,
            req.slot_memory_bytes,
            self.lease_ttl,
        )
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
                        let result = ingest(&pool, &names, &limits, &batch).await;
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
        let completion = Completion::check(request.into_inner(), &self.limits)?;
        let mut conn = self.pool.acquire().await.map_err(Error::from)?;
        completion.record(&mut conn).await?;
        completion.count(&self.telemetry);
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
            .map(|c| Completion::check(c, &self.limits))
            .collect::<Result<Vec<_>, Status>>()?;
        let mut tx = self.pool.begin().await.map_err(Error::from)?;
        let mut stale_trial_ids = Vec::new();
        for completion in &completions {
            match completion.record(&mut tx).await {
                Ok(()) => completion.count(&self.telemetry),
                Err(Error::StaleLease { trial }) => stale_trial_ids.push(trial),
                Err(error) => return Err(error.into()),
            }
        }
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::CompleteManyResponse { stale_trial_ids }))
    }
}

/// A worker's report of how a trial ended, checked and ready to record.
enum Completion {
    /// It stopped at its rung (ASHA, Hyperband) with a checkpoint there.
    Paused {
        trial: TrialId,
        token: LeaseToken,
        step: u64,
        provenance: Option<serde_json::Value>,
    },
    /// Its process crashed: pending again while attempts remain.
    Crashed {
        trial: TrialId,
        token: LeaseToken,
        error: String,
        tail: Option<String>,
        provenance: Option<serde_json::Value>,
    },
    Finished {
        trial: TrialId,
        token: LeaseToken,
        outcome: TrialState,
        error: Option<String>,
        tail: Option<String>,
        outputs: serde_json::Value,
        provenance: Option<serde_json::Value>,
    },
}

/// A worker's provenance report: a JSON object of short strings, or nothing.
fn provenance(text: &str, limits: &Limits) -> Result<Option<serde_json::Value>, Status> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let bad = || {
        Status::invalid_argument(
            "provenance_json must be a JSON object of names to short strings (ablate_version, git_commit, ...)",
        )
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|_| bad())?;
    let object = value.as_object().ok_or_else(bad)?;
    if object.len() > 32
        || object
            .values()
            .any(|v| !v.is_string() || v.as_str().is_some_and(|s| s.len() > limits.max_string_chars))
    {
        return Err(bad());
    }
    let clean: serde_json::Map<String, serde_json::Value> = object
        .iter()
        .map(|(k, v)| {
            (
                pg_text(k),
                serde_json::Value::String(pg_text(v.as_str().unwrap_or_default())),
            )
        })
        .collect();
    Ok(Some(serde_json::Value::Object(clean)))
}

impl Completion {
    fn check(req: proto::CompleteRequest, limits: &Limits) -> Result<Completion, Status> {
        let (trial, token) = lease_of(&req.trial_id, &req.lease_token)?;
        let provenance = provenance(&req.provenance_json, limits)?;
        // A crashed trial's stderr may hold anything; PostgreSQL text can't hold NUL.
        let nonempty = |s: &str| Some(pg_text(s)).filter(|s| !s.is_empty());
        if req.outcome == "paused" {
            return Ok(Completion::Paused {
                trial,
                token,
                step: req.paused_at_step,
                provenance,
            });
        }
        if req.outcome == "crashed" {
            return Ok(Completion::Crashed {
                trial,
                token,
                error: clip_reason(&req.error, limits.max_string_chars),
                tail: nonempty(&req.stderr_tail),
                provenance,
            });
        }
        let outcome = match TrialState::parse(&req.outcome) {
            Some(s @ (TrialState::Succeeded | TrialState::Failed)) => s,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "outcome `{}` is not one of succeeded, failed, crashed, paused",
                    req.outcome
                )))
            }
        };
        if req.outputs_json.len() > limits.max_output_bytes {
            return Err(Status::invalid_argument(format!(
                "the trial's outputs are {} bytes of JSON, over the limit of {}; store large results in object storage and output their keys",
                req.outputs_json.len(),
                limits.max_output_bytes
            )));
        }
        let outputs: serde_json::Value = if req.outputs_json.trim().is_empty() {
            serde_json::json!({})
        } else {
            match serde_json::from_str(&req.outputs_json) {
                Ok(v @ serde_json::Value::Object(_)) => v,
                _ => {
                    return Err(Status::invalid_argument(
                        "outputs_json must be a JSON object of output name to value",
                    ))
                }
            }
        };
        Ok(Completion::Finished {
            trial,
            token,
            outcome,
            error: nonempty(&req.error),
            tail: nonempty(&req.stderr_tail),
            outputs,
            provenance,
        })
    }

    fn count(&self, telemetry: &Telemetry) {
        match self {
            Completion::Paused { .. } => telemetry.completions_paused.add(1),
            Completion::Crashed { .. } => telemetry.completions_crashed.add(1),
            Completion::Finished {
                outcome: TrialState::Succeeded,
                ..
            } => telemetry.completions_succeeded.add(1),
            Completion::Finished { .. } => telemetry.completions_failed.add(1),
        }
    }

    async fn record(&self, conn: &mut sqlx::PgConnection) -> Result<(), Error> {
        match self {
            Completion::Paused {
                trial,
                token,
                step,
                provenance,
            } => {
                let pause = db::pause(&mut *conn, *trial, *token, *step, provenance.as_ref()).await?;
                tracing::info!(trial = %trial, step, value = ?pause.value, promoted = ?pause.promoted, "trial paused at its rung");
            }
            Completion::Crashed {
                trial,
                token,
                error,
                tail,
                provenance,
            } => {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                let again = db::crashed(&mut *tx, *trial, *token, error, tail.as_deref(), provenance.as_ref()).await?;
                if !again {
                    db::top_up_after(&mut tx, *trial).await?;
                }
                tx.commit().await?;
                tracing::warn!(trial = %trial, %error, retried = again, "trial process crashed");
            }
            Completion::Finished {
                trial,
                token,
                outcome,
                error,
                tail,
                outputs,
                provenance,
            } => {
                // The completion and what it makes the searcher propose commit together, so the
                // experiment never looks finished in between.
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                db::complete(
                    &mut *tx,
                    *trial,
                    *token,
                    *outcome,
                    error.as_deref(),
                    tail.as_deref(),
                    outputs,
                    provenance.as_ref(),
                )
                .await?;
                db::top_up_after(&mut tx, *trial).await?;
                tx.commit().await?;
                tracing::info!(trial = %trial, outcome = outcome.as_str(), "trial completed");
            }
        }
        Ok(())
    }
}

/// A worker's reason as PostgreSQL can keep it: no NUL, at most `max` characters.
fn clip_reason(reason: &str, max: usize) -> String {
    pg_text(reason).chars().take(max).collect()
}

/// Text PostgreSQL can keep: NUL, which it can't, shown as U+FFFD.
fn pg_text(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}
