//! All SQL of ablate. Plain async functions over a pool; nothing here holds a
//! transaction open for longer than one request.

use std::time::Duration;

use ablate_schema::{ExperimentId, LeaseToken, TrialId, WorkerId};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row};

use crate::error::{Error, Result};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connects and brings the schema up to date.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

pub struct NewExperiment<'a> {
    pub id: ExperimentId,
    pub name: &'a str,
    pub family: &'a str,
    pub spec: Value,
    pub spec_text: &'a str,
    pub spec_hash: &'a str,
    pub objective_metric: Option<&'a str>,
    pub goal: Option<&'a str>,
    pub max_attempts: u32,
}

pub struct NewTrial {
    pub id: TrialId,
    pub params: Value,
    pub total_steps: i64,
}

/// Stores an experiment and all its trials in one transaction.
pub async fn insert_experiment(pool: &PgPool, e: &NewExperiment<'_>, trials: &[NewTrial]) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "insert into experiments (id, name, family, spec, spec_text, spec_hash, objective_metric, goal, max_attempts)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(e.id.0)
    .bind(e.name)
    .bind(e.family)
    .bind(&e.spec)
    .bind(e.spec_text)
    .bind(e.spec_hash)
    .bind(e.objective_metric)
    .bind(e.goal)
    .bind(e.max_attempts as i32)
    .execute(&mut *tx)
    .await?;
    let ids: Vec<uuid::Uuid> = trials.iter().map(|t| t.id.0).collect();
    let ordinals: Vec<i32> = (0..trials.len() as i32).collect();
    let params: Vec<Value> = trials.iter().map(|t| t.params.clone()).collect();
    let steps: Vec<i64> = trials.iter().map(|t| t.total_steps).collect();
    sqlx::query(
        "insert into trials (id, experiment_id, ordinal, params, total_steps)
         select u.id, $1, u.ordinal, u.params, u.total_steps
         from unnest($2::uuid[], $3::int4[], $4::jsonb[], $5::int8[]) as u(id, ordinal, params, total_steps)",
    )
    .bind(e.id.0)
    .bind(&ids)
    .bind(&ordinals)
    .bind(&params)
    .bind(&steps)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct CheckpointRecord {
    pub step: i64,
    pub path: String,
    pub bytes: i64,
}

#[derive(Debug, Clone)]
pub struct LeasedTrial {
    pub trial: TrialId,
    pub experiment: ExperimentId,
    pub token: LeaseToken,
    pub attempt: i32,
    pub family: String,
    pub params: Value,
    pub resume_from: Option<CheckpointRecord>,
    pub spec_hash: String,
}

/// Leases up to `max` pending trials to `worker` in one statement.
pub async fn lease(pool: &PgPool, worker: WorkerId, max: u32, ttl: Duration) -> Result<Vec<LeasedTrial>> {
    let rows = sqlx::query(
        "with picked as (
             select id from trials
             where state = 'pending'
             order by created_at, ordinal
             for update skip locked
             limit $2
         )
         update trials t
         set state = 'running',
             lease_token = gen_random_uuid(),
             lease_owner = $1,
             lease_expires_at = now() + make_interval(secs => $3),
             attempt = t.attempt + 1,
             started_at = coalesce(t.started_at, now())
         from picked, experiments e
         where t.id = picked.id and e.id = t.experiment_id
         returning t.id, t.experiment_id, t.lease_token, t.attempt, e.family, t.params, e.spec_hash,
             (select jsonb_build_object('step', c.step, 'path', c.path, 'bytes', c.bytes)
              from checkpoints c where c.trial_id = t.id order by c.step desc limit 1) as checkpoint",
    )
    .bind(worker.0)
    .bind(max as i64)
    .bind(ttl.as_secs_f64())
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let checkpoint: Option<Value> = row.try_get("checkpoint")?;
            Ok(LeasedTrial {
                trial: TrialId(row.try_get("id")?),
                experiment: ExperimentId(row.try_get("experiment_id")?),
                token: LeaseToken(row.try_get("lease_token")?),
                attempt: row.try_get("attempt")?,
                family: row.try_get("family")?,
                params: row.try_get("params")?,
                spec_hash: row.try_get("spec_hash")?,
                resume_from: checkpoint.map(|c| CheckpointRecord {
                    step: c["step"].as_i64().unwrap_or(0),
                    path: c["path"].as_str().unwrap_or_default().to_string(),
                    bytes: c["bytes"].as_i64().unwrap_or(0),
                }),
            })
        })
        .collect()
}

/// Extends the leases `worker` holds; returns the trials it must stop, with why.
pub async fn heartbeat(
    pool: &PgPool,
    worker: WorkerId,
    held: &[(TrialId, LeaseToken)],
    ttl: Duration,
) -> Result<Vec<(TrialId, String)>> {
    let trials: Vec<uuid::Uuid> = held.iter().map(|h| h.0 .0).collect();
    let tokens: Vec<uuid::Uuid> = held.iter().map(|h| h.1 .0).collect();
    let rows: Vec<(uuid::Uuid, Option<String>)> = sqlx::query_as(
        "with held as (
             select * from unnest($2::uuid[], $3::uuid[]) as h(trial_id, token)
         ),
         seen as (
             update workers set last_seen_at = now() where id = $1
         ),
         extended as (
             update trials t
             set lease_expires_at = now() + make_interval(secs => $4)
             from held
             where t.id = held.trial_id and t.lease_token = held.token and t.state = 'running'
             returning t.id
         )
         select held.trial_id, t.state
         from held
         left join trials t on t.id = held.trial_id and t.lease_token = held.token
         where held.trial_id not in (select id from extended)",
    )
    .bind(worker.0)
    .bind(&trials)
    .bind(&tokens)
    .bind(ttl.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, state)| {
            let reason = match state.as_deref() {
                Some("cancelled") => "cancelled".to_string(),
                Some("pruned") => "pruned".to_string(),
                Some(other) => format!("trial is {other}"),
                None => "lease lost: it expired and the trial went back to the queue".to_string(),
            };
            (TrialId(id), reason)
        })
        .collect())
}

/// Returns expired leases to the queue, or fails trials out of attempts.
pub async fn reap_expired(pool: &PgPool) -> Result<u64> {
    let done = sqlx::query(
        "update trials t
         set state = case when t.attempt >= e.max_attempts then 'failed' else 'pending' end,
             error = case when t.attempt >= e.max_attempts
                 then format('lease expired on attempt %s of %s (last held by worker %s)', t.attempt, e.max_attempts, t.lease_owner)
                 else t.error end,
             finished_at = case when t.attempt >= e.max_attempts then now() end,
             lease_token = null,
             lease_owner = null,
             lease_expires_at = null
         from experiments e
         where e.id = t.experiment_id and t.state = 'running' and t.lease_expires_at < now()",
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Interns metric names; returns their ids in the order given.
pub async fn intern_metric_names(pool: &PgPool, names: &[String]) -> Result<Vec<(String, i32)>> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "insert into metric_names (name) select distinct unnest($1::text[])
         on conflict (name) do update set name = excluded.name
         returning name, id",
    )
    .bind(names)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Writes one batch of metric points in one statement, fenced by the lease.
/// Points are keyed by (trial, name, step): a replay overwrites, never duplicates.
pub async fn insert_metrics(
    pool: &PgPool,
    trial: TrialId,
    token: LeaseToken,
    name_ids: &[i32],
    steps: &[i64],
    values: &[f64],
) -> Result<u64> {
    let done = sqlx::query(
        "insert into metrics (trial_id, name_id, step, value)
         select t.id, u.name_id, u.step, u.value
         from trials t, unnest($3::int4[], $4::int8[], $5::float8[]) as u(name_id, step, value)
         where t.id = $1 and t.lease_token = $2 and t.state = 'running'
         on conflict (trial_id, name_id, step) do update
         set value = excluded.value, recorded_at = now()",
    )
    .bind(trial.0)
    .bind(token.0)
    .bind(name_ids)
    .bind(steps)
    .bind(values)
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 && !steps.is_empty() {
        return Err(Error::StaleLease {
            trial: trial.to_string(),
        });
    }
    Ok(done.rows_affected())
}

/// Records a checkpoint whose object is already durable, fenced by the lease.
pub async fn record_checkpoint(
    pool: &PgPool,
    trial: TrialId,
    token: LeaseToken,
    checkpoint: &CheckpointRecord,
) -> Result<()> {
    let done = sqlx::query(
        "insert into checkpoints (trial_id, step, path, bytes, attempt)
         select t.id, $3, $4, $5, t.attempt from trials t
         where t.id = $1 and t.lease_token = $2 and t.state = 'running'
         on conflict (trial_id, step) do update
         set path = excluded.path, bytes = excluded.bytes, attempt = excluded.attempt, created_at = now()",
    )
    .bind(trial.0)
    .bind(token.0)
    .bind(checkpoint.step)
    .bind(&checkpoint.path)
    .bind(checkpoint.bytes)
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(Error::StaleLease {
            trial: trial.to_string(),
        });
    }
    Ok(())
}

/// Finishes a trial, fenced by the lease; repeating the same completion is harmless.
pub async fn complete(
    pool: &PgPool,
    trial: TrialId,
    token: LeaseToken,
    outcome: ablate_schema::TrialState,
    error: Option<&str>,
    stderr_tail: Option<&str>,
    outputs: &Value,
) -> Result<()> {
    let done = sqlx::query(
        "update trials
         set state = $3, finished_at = coalesce(finished_at, now()), error = $4, stderr_tail = $5,
             lease_expires_at = null, outputs = $6
         where id = $1 and lease_token = $2 and state in ('running', $3)",
    )
    .bind(trial.0)
    .bind(token.0)
    .bind(outcome.as_str())
    .bind(error)
    .bind(stderr_tail)
    .bind(outputs)
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(Error::StaleLease {
            trial: trial.to_string(),
        });
    }
    Ok(())
}

/// Cancels an experiment: its pending and running trials become cancelled.
pub async fn cancel(pool: &PgPool, experiment: ExperimentId) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let found = sqlx::query("update experiments set cancelled_at = coalesce(cancelled_at, now()) where id = $1")
        .bind(experiment.0)
        .execute(&mut *tx)
        .await?;
    if found.rows_affected() == 0 {
        return Err(not_found(experiment));
    }
    let done = sqlx::query(
        "update trials set state = 'cancelled', finished_at = now()
         where experiment_id = $1 and state in ('pending', 'running')",
    )
    .bind(experiment.0)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

fn not_found(experiment: ExperimentId) -> Error {
    Error::NotFound(format!(
        "no experiment {experiment}; `ablate status` lists the experiments"
    ))
}

#[derive(Debug, Clone, Default)]
pub struct TrialCounts {
    pub pending: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub pruned: i64,
    pub cancelled: i64,
}

#[derive(Debug, Clone)]
pub struct ExperimentRow {
    pub id: ExperimentId,
    pub name: String,
    pub family: String,
    pub state: String,
    pub counts: TrialCounts,
    pub objective_metric: Option<String>,
    pub goal: Option<String>,
    pub created_at: DateTime<Utc>,
    pub swept: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TrialRow {
    pub id: TrialId,
    pub ordinal: i32,
    pub state: String,
    pub params: Value,
    pub objective: Option<f64>,
    pub attempt: i32,
    pub step: i64,
    pub total_steps: i64,
    pub error: Option<String>,
}

const EXPERIMENT_COLUMNS: &str = "experiment_id, name, family, state, pending, running, succeeded, failed,
     pruned, cancelled, objective_metric, goal, created_at,
     (select coalesce(array_agg(k order by k), '{}') from jsonb_object_keys(spec -> 'sweep' -> 'params') k) as swept";

fn experiment_row(row: &sqlx::postgres::PgRow) -> Result<ExperimentRow> {
    Ok(ExperimentRow {
        id: ExperimentId(row.try_get("experiment_id")?),
        name: row.try_get("name")?,
        family: row.try_get("family")?,
        state: row.try_get("state")?,
        counts: TrialCounts {
            pending: row.try_get("pending")?,
            running: row.try_get("running")?,
            succeeded: row.try_get("succeeded")?,
            failed: row.try_get("failed")?,
            pruned: row.try_get("pruned")?,
            cancelled: row.try_get("cancelled")?,
        },
        objective_metric: row.try_get("objective_metric")?,
        goal: row.try_get("goal")?,
        created_at: row.try_get("created_at")?,
        swept: row.try_get("swept")?,
    })
}

pub async fn experiment(pool: &PgPool, id: ExperimentId) -> Result<ExperimentRow> {
    let row = sqlx::query(&format!(
        "select {EXPERIMENT_COLUMNS} from ablate.experiments where experiment_id = $1"
    ))
    .bind(id.0)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| not_found(id))?;
    experiment_row(&row)
}

pub async fn list_experiments(pool: &PgPool, limit: u32) -> Result<Vec<ExperimentRow>> {
    let rows = sqlx::query(&format!(
        "select {EXPERIMENT_COLUMNS} from ablate.experiments order by created_at desc limit $1"
    ))
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    rows.iter().map(experiment_row).collect()
}

/// The best succeeded trials by the objective, best first.
pub async fn best_trials(pool: &PgPool, e: &ExperimentRow, limit: u32) -> Result<Vec<TrialRow>> {
    let order = if e.goal.as_deref() == Some("maximize") {
        "desc"
    } else {
        "asc"
    };
    let rows = sqlx::query(&format!(
        "select r.trial_id, r.ordinal, r.state, r.params, r.objective, r.attempt, r.error,
                t.total_steps, t.total_steps as step
         from ablate.trial_results r join trials t on t.id = r.trial_id
         where r.experiment_id = $1 and r.state = 'succeeded' and r.objective is not null
         order by r.objective {order}, r.ordinal
         limit $2"
    ))
    .bind(e.id.0)
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    rows.iter().map(trial_row).collect()
}

/// Running trials with the newest step they logged, and failed trials with their reason.
pub async fn active_and_failed_trials(pool: &PgPool, id: ExperimentId) -> Result<(Vec<TrialRow>, Vec<TrialRow>)> {
    let rows = sqlx::query(
        "select t.id as trial_id, t.ordinal, t.state, t.params, null::float8 as objective, t.attempt,
                coalesce(t.error, '') || case when t.stderr_tail is not null and t.stderr_tail <> ''
                    then E'\\n' || t.stderr_tail else '' end as error,
                t.total_steps,
                coalesce((select max(m.step) from metrics m where m.trial_id = t.id), 0) as step
         from trials t
         where t.experiment_id = $1 and t.state in ('running', 'failed')
         order by t.ordinal",
    )
    .bind(id.0)
    .fetch_all(pool)
    .await?;
    let all = rows.iter().map(trial_row).collect::<Result<Vec<_>>>()?;
    Ok(all.into_iter().partition(|t| t.state == "running"))
}

fn trial_row(row: &sqlx::postgres::PgRow) -> Result<TrialRow> {
    Ok(TrialRow {
        id: TrialId(row.try_get("trial_id")?),
        ordinal: row.try_get("ordinal")?,
        state: row.try_get("state")?,
        params: row.try_get("params")?,
        objective: row.try_get("objective")?,
        attempt: row.try_get("attempt")?,
        step: row.try_get("step")?,
        total_steps: row.try_get("total_steps")?,
        error: row.try_get("error")?,
    })
}

/// The family and every trial with its final metrics, for a report.
pub async fn report_outcomes(
    pool: &PgPool,
    id: ExperimentId,
) -> Result<(String, Vec<ablate_experiments::report::TrialOutcome>)> {
    let family: String = sqlx::query_scalar("select family from experiments where id = $1")
        .bind(id.0)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| not_found(id))?;
    let rows: Vec<(i32, String, Value, Value, Value)> = sqlx::query_as(
        "select r.ordinal, r.state, r.params, r.metrics, t.outputs
         from ablate.trial_results r join trials t on t.id = r.trial_id
         where r.experiment_id = $1 order by r.ordinal",
    )
    .bind(id.0)
    .fetch_all(pool)
    .await?;
    let mut outcomes: Vec<ablate_experiments::report::TrialOutcome> = rows
        .into_iter()
        .map(
            |(ordinal, state, params, metrics, outputs)| ablate_experiments::report::TrialOutcome {
                ordinal: ordinal as i64,
                state,
                params,
                metrics: match metrics {
                    Value::Object(m) => m,
                    _ => Default::default(),
                },
                series: Default::default(),
                outputs: match outputs {
                    Value::Object(m) => m,
                    _ => Default::default(),
                },
            },
        )
        .collect();
    let wanted: Vec<String> = ablate_experiments::Family::parse(&family)
        .map(|f| f.series_metrics().iter().map(|m| m.to_string()).collect())
        .unwrap_or_default();
    if !wanted.is_empty() {
        let points: Vec<(i32, String, i64, f64)> = sqlx::query_as(
            "select t.ordinal, n.name, m.step, m.value
             from metrics m join metric_names n on n.id = m.name_id join trials t on t.id = m.trial_id
             where t.experiment_id = $1 and n.name = any($2)
             order by t.ordinal, n.name, m.step",
        )
        .bind(id.0)
        .bind(&wanted)
        .fetch_all(pool)
        .await?;
        let by_ordinal: std::collections::HashMap<i64, usize> =
            outcomes.iter().enumerate().map(|(i, o)| (o.ordinal, i)).collect();
        for (ordinal, name, step, value) in points {
            if let Some(&i) = by_ordinal.get(&(ordinal as i64)) {
                outcomes[i].series.entry(name).or_default().push((step as u64, value));
            }
        }
    }
    Ok((family, outcomes))
}

pub async fn register_worker(pool: &PgPool, id: WorkerId, hostname: &str, devices: &[String]) -> Result<()> {
    sqlx::query(
        "insert into workers (id, hostname, devices) values ($1, $2, $3)
         on conflict (id) do update set hostname = excluded.hostname, devices = excluded.devices,
             last_seen_at = now()",
    )
    .bind(id.0)
    .bind(hostname)
    .bind(devices)
    .execute(pool)
    .await?;
    Ok(())
}

pub struct WorkerRow {
    pub id: WorkerId,
    pub hostname: String,
    pub devices: Vec<String>,
    pub registered_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub running: i64,
}

pub async fn list_workers(pool: &PgPool) -> Result<Vec<WorkerRow>> {
    let rows = sqlx::query(
        "select w.id, w.hostname, w.devices, w.registered_at, w.last_seen_at,
                (select count(*) from trials t where t.lease_owner = w.id and t.state = 'running') as running
         from workers w order by w.last_seen_at desc",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(WorkerRow {
                id: WorkerId(row.try_get("id")?),
                hostname: row.try_get("hostname")?,
                devices: row.try_get("devices")?,
                registered_at: row.try_get("registered_at")?,
                last_seen_at: row.try_get("last_seen_at")?,
                running: row.try_get("running")?,
            })
        })
        .collect()
}

/// The first keyword of a query, after comments and parentheses.
fn leading_keyword(sql: &str) -> String {
    let mut rest = sql.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map(|x| x.1).unwrap_or("").trim_start();
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map(|x| x.1).unwrap_or("").trim_start();
        } else if let Some(after) = rest.strip_prefix('(') {
            rest = after.trim_start();
        } else {
            break;
        }
    }
    rest.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Result of a read-only query: column names and rows as JSON arrays.
pub struct QueryRows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// Runs a researcher's query in a read-only transaction, as the read-only
/// role, under a statement timeout. Writes of any kind are refused.
pub async fn read_only_query(pool: &PgPool, sql: &str, timeout: Duration) -> Result<QueryRows> {
    let keyword = leading_keyword(sql);
    if !matches!(keyword.as_str(), "select" | "with" | "values" | "table") {
        return Err(Error::Query(format!(
            "ablate sql runs read-only queries: `{keyword}` is not allowed; start with select, with, values or table"
        )));
    }
    let body = sql.trim().trim_end_matches(';');
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction read only").execute(&mut *tx).await?;
    sqlx::query(&format!("set local statement_timeout = {}", timeout.as_millis().max(1)))
        .execute(&mut *tx)
        .await?;
    sqlx::query("set local role ablate_reader").execute(&mut *tx).await?;
    let described = sqlx::Executor::describe(&mut *tx, body).await.map_err(query_error)?;
    let columns: Vec<String> = described
        .columns()
        .iter()
        .map(|c| sqlx::Column::name(c).to_string())
        .collect();
    // json (not jsonb) keeps duplicate column names and their order.
    let wrapped = format!(
        "select coalesce((select json_agg(e.value order by e.n)
                          from json_each(row_to_json(q)) with ordinality as e(key, value, n)), '[]')::text
         from ({body}\n) as q"
    );
    let texts: Vec<(String,)> = sqlx::query_as::<Postgres, (String,)>(&wrapped)
        .fetch_all(&mut *tx)
        .await
        .map_err(query_error)?;
    tx.rollback().await?;
    let mut rows = Vec::with_capacity(texts.len());
    for (text,) in texts {
        let row: Vec<Value> = serde_json::from_str(&text).map_err(|e| Error::Query(format!("unreadable row: {e}")))?;
        rows.push(row);
    }
    Ok(QueryRows { columns, rows })
}

fn query_error(error: sqlx::Error) -> Error {
    match error {
        sqlx::Error::Database(db) => Error::Query(db.message().to_string()),
        other => Error::Db(other),
    }
}

#[cfg(test)]
mod tests {
    use super::leading_keyword;

    #[test]
    fn leading_keyword_skips_comments_and_parentheses() {
        assert_eq!(leading_keyword("  -- hi\n /* x */ (SELECT 1)"), "select");
        assert_eq!(leading_keyword("delete from x"), "delete");
        assert_eq!(leading_keyword("With a as (select 1) select * from a"), "with");
    }
}
