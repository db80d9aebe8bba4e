//! A worker's report of how a trial ended: checked (outcome, outputs, provenance, within
//! the limits), then recorded fenced by the lease, together with what it makes the
//! searchers decide (a rung's promotion, the next TPE proposals).

use std::collections::HashSet;

use ablate_schema::{LeaseToken, Limits, TrialId, TrialState};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::{clip_reason, lease_of, pg_text};
use crate::db;
use crate::error::Error;
use crate::telemetry::Telemetry;

/// A completion as a worker sent it.
pub struct Report<'a> {
    pub trial_id: &'a str,
    pub lease_token: &'a str,
    /// succeeded, failed, crashed or paused.
    pub outcome: &'a str,
    pub paused_at_step: u64,
    pub error: &'a str,
    pub stderr_tail: &'a str,
    pub outputs_json: &'a str,
    pub provenance_json: &'a str,
}

/// A worker's report of how a trial ended, checked and ready to record.
pub enum Completion {
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
fn provenance(text: &str, limits: &Limits) -> Result<Option<serde_json::Value>, Error> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let bad = || {
        Error::InvalidArgument(
            "provenance_json must be a JSON object of names to short strings (ablate_version, git_commit, ...)".into(),
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
    /// The trial it reports on.
    pub fn trial(&self) -> TrialId {
        match self {
            Completion::Paused { trial, .. }
            | Completion::Crashed { trial, .. }
            | Completion::Finished { trial, .. } => *trial,
        }
    }

    pub fn check(req: &Report<'_>, limits: &Limits) -> Result<Completion, Error> {
        let (trial, token) = lease_of(req.trial_id, req.lease_token)?;
        let provenance = provenance(req.provenance_json, limits)?;
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
                error: clip_reason(req.error, limits.max_string_chars),
                tail: nonempty(req.stderr_tail),
                provenance,
            });
        }
        let outcome = match TrialState::parse(req.outcome) {
            Some(s @ (TrialState::Succeeded | TrialState::Failed)) => s,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "outcome `{}` is not one of succeeded, failed, crashed, paused",
                    req.outcome
                )))
            }
        };
        if req.outputs_json.len() > limits.max_output_bytes {
            return Err(Error::InvalidArgument(format!(
                "the trial's outputs are {} bytes of JSON, over the limit of {}; store large results in object storage and output their keys",
                req.outputs_json.len(),
                limits.max_output_bytes
            )));
        }
        let outputs: serde_json::Value = if req.outputs_json.trim().is_empty() {
            serde_json::json!({})
        } else {
            match serde_json::from_str(req.outputs_json) {
                Ok(v @ serde_json::Value::Object(_)) => v,
                _ => {
                    return Err(Error::InvalidArgument(
                        "outputs_json must be a JSON object of output name to value".into(),
                    ))
                }
            }
        };
        Ok(Completion::Finished {
            trial,
            token,
            outcome,
            error: nonempty(req.error),
            tail: nonempty(req.stderr_tail),
            outputs,
            provenance,
        })
    }

    pub fn count(&self, telemetry: &Telemetry) {
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

    pub async fn record(&self, conn: &mut sqlx::PgConnection) -> Result<(), Error> {
        match self {
            Completion::Paused {
                trial,
                token,
                step,
                provenance,
            } => {
                let pause = super::searchers::pause(&mut *conn, *trial, *token, *step, provenance.as_ref()).await?;
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
                    super::searchers::top_up_after(&mut tx, *trial).await?;
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
                super::searchers::top_up_after(&mut tx, *trial).await?;
                tx.commit().await?;
                tracing::info!(trial = %trial, outcome = outcome.as_str(), "trial completed");
            }
        }
        Ok(())
    }
}

/// The most completions one transaction of the [`Completer`] records.
const MOST_AT_ONCE: usize = 512;

/// Completions waiting to be recorded: one call's, all of them finished.
struct Job {
    completions: Vec<Completion>,
    answer: oneshot::Sender<Result<Vec<String>, Error>>,
}

/// Records completions in batches: while one transaction commits, the calls
/// that arrive meanwhile wait and go together in the next, finished trials in
/// one statement (`db::complete_all`) and one commit, with the tpe proposals
/// they call for. A call with a pause or a crash, and every call of a batch
/// whose transaction failed, is recorded on its own as before.
#[derive(Clone)]
pub struct Completer {
    pool: PgPool,
    telemetry: std::sync::Arc<Telemetry>,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Completer {
    /// Starts the completer's task (it ends when the last `Completer` is dropped).
    pub fn spawn(pool: PgPool, telemetry: std::sync::Arc<Telemetry>) -> Completer {
        let (jobs, mut waiting) = mpsc::unbounded_channel::<Job>();
        let batch_pool = pool.clone();
        let batch_telemetry = telemetry.clone();
        tokio::spawn(async move {
            while let Some(first) = waiting.recv().await {
                let mut batch = vec![first];
                let mut count = batch[0].completions.len();
                while count < MOST_AT_ONCE {
                    match waiting.try_recv() {
                        Ok(job) => {
                            count += job.completions.len();
                            batch.push(job);
                        }
                        Err(_) => break,
                    }
                }
                record_batch(&batch_pool, &batch_telemetry, batch).await;
            }
        });
        Completer { pool, telemetry, jobs }
    }

    /// Records one call's completions (checked already); returns the trials whose
    /// lease was stale. A database error leaves the call's completions unrecorded.
    pub async fn record(&self, completions: Vec<Completion>) -> Result<Vec<String>, Error> {
        let all_finished = completions.iter().all(|c| matches!(c, Completion::Finished { .. }));
        if !all_finished || completions.is_empty() {
            return record_alone(&self.pool, &self.telemetry, &completions).await;
        }
        let (answer, answered) = oneshot::channel();
        self.jobs
            .send(Job { completions, answer })
            .map_err(|_| Error::Busy("the coordinator is shutting down; retry".into()))?;
        answered
            .await
            .map_err(|_| Error::Busy("the completion was dropped; retry".into()))?
    }
}

/// One call's completions in a transaction of their own; the stale ones' trial ids.
async fn record_alone(pool: &PgPool, telemetry: &Telemetry, completions: &[Completion]) -> Result<Vec<String>, Error> {
    let mut tx = pool.begin().await?;
    let mut stale = Vec::new();
    for completion in completions {
        match completion.record(&mut tx).await {
            Ok(()) => completion.count(telemetry),
            Err(Error::StaleLease { trial }) => stale.push(trial),
            Err(error) => return Err(error),
        }
    }
    tx.commit().await?;
    Ok(stale)
}

async fn record_batch(pool: &PgPool, telemetry: &Telemetry, batch: Vec<Job>) {
    match record_together(pool, &batch).await {
        Ok(done) => {
            for job in batch {
                let mut stale = Vec::new();
                for completion in &job.completions {
                    if done.contains(&completion.trial()) {
                        completion.count(telemetry);
                    } else {
                        stale.push(completion.trial().to_string());
                    }
                }
                let _ = job.answer.send(Ok(stale));
            }
        }
        Err(error) => {
            tracing::warn!(%error, calls = batch.len(), "a batch of completions failed; recording each call alone");
            for job in batch {
                let _ = job.answer.send(record_alone(pool, telemetry, &job.completions).await);
            }
        }
    }
}

/// Every job's finished trials in one statement; with the tpe proposals their
/// experiments call for in one transaction when any is a tpe experiment's.
/// Returns the trials recorded.
async fn record_together(pool: &PgPool, batch: &[Job]) -> Result<HashSet<TrialId>, Error> {
    let finishes: Vec<db::Finish> = batch
        .iter()
        .flat_map(|job| job.completions.iter())
        .filter_map(|c| match c {
            Completion::Finished {
                trial,
                token,
                outcome,
                error,
                tail,
                outputs,
                provenance,
            } => Some(db::Finish {
                trial: *trial,
                token: *token,
                outcome: *outcome,
                error: error.as_deref(),
                stderr_tail: tail.as_deref(),
                outputs,
                provenance: provenance.as_ref(),
            }),
            _ => None,
        })
        .collect();
    // Alone, in one statement, unless a tpe experiment's proposals must commit with them.
    if let Some(done) = db::complete_all(pool, &finishes, true).await? {
        for (trial, _) in &done {
            tracing::info!(trial = %trial, "trial completed");
        }
        return Ok(done.into_iter().map(|(t, _)| t).collect());
    }
    let mut tx = pool.begin().await?;
    let done = db::complete_all(&mut *tx, &finishes, false).await?.unwrap_or_default();
    let mut topped = HashSet::new();
    for (trial, tpe) in &done {
        if *tpe {
            if let Some(experiment) = db::tpe_experiment_of(&mut tx, *trial).await? {
                if topped.insert(experiment) {
                    super::searchers::top_up(&mut tx, experiment).await?;
                }
            }
        }
    }
    tx.commit().await?;
    for (trial, _) in &done {
        tracing::info!(trial = %trial, "trial completed");
    }
    Ok(done.into_iter().map(|(t, _)| t).collect())
}
