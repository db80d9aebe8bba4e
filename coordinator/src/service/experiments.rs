//! The `Experiments` service: submit, status, watch, reports, queries, tokens, workers.

use std::time::Duration;

use ablate_schema::proto::{self, experiments_server};
use ablate_schema::{ExperimentId, SpecFormat, TrialId};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{self, Caller, Role, Tokens};
use crate::db::{self, ExperimentRow, TrialRow};
use crate::error::Error;
use crate::platform::experiments;
use crate::platform::parse_id;
use crate::reader::Reader;
use crate::submit;
use ablate_schema::Limits;

use super::ResponseStream;

#[derive(Clone)]
pub struct ExperimentsService {
    pub(super) pool: PgPool,
    /// Researchers' reads: their own pool and admission.
    pub(super) reader: Reader,
    pub(super) limits: Limits,
    /// A worker unheard of for longer than this is lost: its leases have expired.
    pub(super) lease_ttl: Duration,
    /// The valid tokens, when auth is on.
    pub(super) tokens: Option<Tokens>,
    /// Where the coordinator's database is (for the reader login's URL).
    pub(super) database_url: String,
    /// Where trials may read local data.
    pub(super) data_roots: Vec<std::path::PathBuf>,
    /// The HTTP listener's port (the dashboard), when there is one.
    pub(super) http_port: Option<u16>,
    /// The workers' object store: command trials' code, trials' logs.
    pub(super) objects: Option<crate::Objects>,
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
        message.pareto = db::pareto_front(&self.pool, id, 50)
            .await?
            .into_iter()
            .map(|(trial, ordinal, params, objectives)| proto::ParetoPoint {
                trial_id: trial.to_string(),
                ordinal: ordinal as u32,
                params_json: params.to_string(),
                objectives_json: objectives.to_string(),
            })
            .collect();
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
        reused_from: t.reused_from.map(|r| r.to_string()).unwrap_or_default(),
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
        tags: e.tags.clone(),
        note: e.note.clone().unwrap_or_default(),
        reused: e.reused as u32,
        keep_checkpoints: e.keep_checkpoints.clone(),
        pareto: Vec::new(),
    }
}

#[tonic::async_trait]
impl experiments_server::Experiments for ExperimentsService {
    async fn submit(&self, request: Request<proto::SubmitRequest>) -> Result<Response<proto::SubmitResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        let format = SpecFormat::parse(&req.format).ok_or_else(|| {
            Status::invalid_argument(format!("unknown spec format `{}`, expected toml or yaml", req.format))
        })?;
        let into = (!req.into_experiment_id.is_empty())
            .then(|| parse_id(ExperimentId::parse, &req.into_experiment_id))
            .transpose()?;
        let submission = submit::Submission {
            text: &req.spec_text,
            format,
            limits: &self.limits,
            data_roots: &self.data_roots,
            caller: caller.as_ref(),
            code: Some(submit::Code {
                archive: &req.code_archive,
                hash: &req.code_hash,
            }),
            objects: self.objects.as_ref(),
            into,
        };
        let done = submit::submit_as(&self.pool, &submission).await?;
        Ok(Response::new(proto::SubmitResponse {
            experiment_id: done.id.to_string(),
            trial_count: done.planned as u32,
            reused: done.reused as u32,
            already_held: done.already_held as u32,
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
        let req = request.into_inner();
        let limit = if req.limit == 0 { 50 } else { req.limit };
        let tag = Some(req.tag.trim()).filter(|t| !t.is_empty());
        let rows = db::list_experiments(&self.pool, limit, tag).await?;
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
        let n = experiments::cancel(&self.pool, caller.as_ref(), id).await?;
        Ok(Response::new(proto::CancelResponse {
            trials_cancelled: n as u32,
        }))
    }

    async fn retry(&self, request: Request<proto::RetryRequest>) -> Result<Response<proto::RetryResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        let id = parse_id(ExperimentId::parse, &req.experiment_id)?;
        let outcomes = experiments::outcomes(&req.outcomes)?;
        let n = experiments::retry(&self.pool, caller.as_ref(), id, &outcomes).await?;
        Ok(Response::new(proto::RetryResponse {
            trials_retried: n as u32,
        }))
    }

    async fn tag(&self, request: Request<proto::TagRequest>) -> Result<Response<proto::TagResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        let id = parse_id(ExperimentId::parse, &req.experiment_id)?;
        let tags = experiments::tag(&self.pool, caller.as_ref(), id, &req.add, &req.remove).await?;
        Ok(Response::new(proto::TagResponse { tags }))
    }

    async fn note(&self, request: Request<proto::NoteRequest>) -> Result<Response<proto::NoteResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        let id = parse_id(ExperimentId::parse, &req.experiment_id)?;
        experiments::note(&self.pool, caller.as_ref(), id, &req.note).await?;
        Ok(Response::new(proto::NoteResponse {}))
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Result<Response<proto::DeleteResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let id = parse_id(ExperimentId::parse, &request.into_inner().experiment_id)?;
        let done = experiments::delete(&self.pool, self.objects.as_ref(), caller.as_ref(), id).await?;
        Ok(Response::new(proto::DeleteResponse {
            trials: done.trials,
            objects: done.objects,
            bytes: done.bytes,
            handed_over: done.handed_over,
        }))
    }

    async fn collect_garbage(
        &self,
        request: Request<proto::CollectGarbageRequest>,
    ) -> Result<Response<proto::CollectGarbageResponse>, Status> {
        let req = request.into_inner();
        let objects = self.objects.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator does not reach the workers' object store: start it with `ablate serve --object-store URL`",
            )
        })?;
        let min_age = Duration::from_secs(req.min_age_seconds);
        let (garbage, scanned) =
            crate::platform::retention::collect_garbage(&self.pool, objects, req.dry_run, min_age).await?;
        Ok(Response::new(proto::CollectGarbageResponse {
            bytes: garbage.iter().map(|g| g.bytes).sum(),
            objects: garbage
                .into_iter()
                .map(|g| proto::CollectedObject {
                    path: g.path,
                    bytes: g.bytes,
                    reason: g.reason,
                })
                .collect(),
            scanned,
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
        let token = crate::platform::tokens::create(&self.pool, &name, role, expires).await?;
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

    async fn trial_logs(
        &self,
        request: Request<proto::TrialLogsRequest>,
    ) -> Result<Response<proto::TrialLogsResponse>, Status> {
        let req = request.into_inner();
        let trial = parse_id(TrialId::parse, &req.trial_id)?;
        let logs = crate::platform::logs::read(&self.pool, self.objects.as_ref(), trial, req.attempt).await?;
        Ok(Response::new(proto::TrialLogsResponse {
            attempt: logs.attempt,
            attempts: logs.attempts,
            text: logs.text,
            running: logs.running,
        }))
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
        let report = crate::platform::reports::build(&self.reader.pool, id)
            .await
            .map_err(|e| self.reader.explain(e))?;
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
        let result = db::read_only_query(&self.reader.pool, &req.sql, timeout)
            .await
            .map_err(|e| self.reader.explain(e))?;
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
