//! Experiments and their trials: storing a submission, cancelling, and the reads behind status and reports.

use ablate_schema::{ExperimentId, TrialId};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};

use crate::error::{Error, Result};

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
    /// The name of the token the spec came with; `None` without auth.
    pub submitted_by: Option<&'a str>,
    /// The submit's span, in W3C `traceparent` form, when traces are on.
    pub traceparent: Option<String>,
    /// What the queue decides by, as typed columns.
    pub scheduling: Scheduling,
}

/// The spec's scheduling fields, stored in columns of their own so that the lease
/// statement reads no spec JSON.
pub struct Scheduling {
    pub priority: f64,
    pub max_concurrent: Option<i32>,
    pub gpus_per_trial: i32,
    pub pool: Option<String>,
    /// `None` when it asks for no labels.
    pub labels: Option<Value>,
    /// The spec's `fuse` as it stores it (a number or "auto").
    pub fuse: Option<Value>,
    pub fresh_process: bool,
    pub searcher: &'static str,
    /// A command trial's `[trial]` table; `None` for a built-in family's trials.
    pub command: Option<Value>,
    /// The SHA-256 of its packed code, when it has code.
    pub code_hash: Option<String>,
    /// Which checkpoints of a finished trial stay (`ablate_schema::Keep::as_column`).
    pub keep_checkpoints: String,
}

pub struct NewTrial {
    pub id: TrialId,
    pub ordinal: i32,
    pub params: Value,
    pub total_steps: i64,
    /// ASHA and Hyperband: its bracket and first rung.
    pub bracket: Option<i32>,
    pub pause_at: Option<i64>,
    /// The trials of the same experiment it waits for.
    pub depends_on: Vec<TrialId>,
    /// The key it fuses under (`fuse`); `None`: it runs alone.
    pub fuse_key: Option<String>,
    /// A succeeded trial whose results it takes instead of running (`reuse`).
    pub reused_from: Option<TrialId>,
}

/// Stores an experiment's row (its trials follow with [`insert_trials`], in the same transaction).
pub async fn insert_experiment(tx: &mut sqlx::PgConnection, e: &NewExperiment<'_>) -> Result<()> {
    sqlx::query(
        "insert into experiments (id, name, family, spec, spec_text, spec_hash, objective_metric, goal, max_attempts,
                                  submitted_by, traceparent, priority, max_concurrent, gpus_per_trial, pool, labels,
                                  fuse, fresh_process, searcher, command, code_hash, keep_checkpoints)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
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
    .bind(e.submitted_by)
    .bind(&e.traceparent)
    .bind(e.scheduling.priority)
    .bind(e.scheduling.max_concurrent)
    .bind(e.scheduling.gpus_per_trial)
    .bind(&e.scheduling.pool)
    .bind(&e.scheduling.labels)
    .bind(&e.scheduling.fuse)
    .bind(e.scheduling.fresh_process)
    .bind(e.scheduling.searcher)
    .bind(&e.scheduling.command)
    .bind(&e.scheduling.code_hash)
    .bind(&e.scheduling.keep_checkpoints)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Stores trials of an experiment in one statement. A reused trial is stored
/// succeeded, with its source's outputs, and never runs.
pub async fn insert_trials(tx: &mut sqlx::PgConnection, experiment: ExperimentId, trials: &[NewTrial]) -> Result<()> {
    let ids: Vec<uuid::Uuid> = trials.iter().map(|t| t.id.0).collect();
    let ordinals: Vec<i32> = trials.iter().map(|t| t.ordinal).collect();
    let params: Vec<Value> = trials.iter().map(|t| t.params.clone()).collect();
    let steps: Vec<i64> = trials.iter().map(|t| t.total_steps).collect();
    let brackets: Vec<Option<i32>> = trials.iter().map(|t| t.bracket).collect();
    let pause_at: Vec<Option<i64>> = trials.iter().map(|t| t.pause_at).collect();
    // Arrays of arrays can't be ragged: each trial's dependencies travel as a JSON list.
    let depends_on: Vec<Value> = trials
        .iter()
        .map(|t| Value::from(t.depends_on.iter().map(|d| d.to_string()).collect::<Vec<_>>()))
        .collect();
    let fuse_keys: Vec<Option<String>> = trials.iter().map(|t| t.fuse_key.clone()).collect();
    let reused: Vec<Option<uuid::Uuid>> = trials.iter().map(|t| t.reused_from.map(|r| r.0)).collect();
    sqlx::query(
        "insert into trials (id, experiment_id, ordinal, params, total_steps, bracket, pause_at, depends_on, fuse_key,
                             reused_from, state, outputs, started_at, finished_at)
         select u.id, $1, u.ordinal, u.params, u.total_steps, u.bracket,
                case when u.reused_from is null then u.pause_at end,
                array(select d::uuid from jsonb_array_elements_text(u.depends_on) d), u.fuse_key,
                u.reused_from,
                case when u.reused_from is null then 'pending' else 'succeeded' end,
                coalesce((select s.outputs from trials s where s.id = u.reused_from), '{}'::jsonb),
                case when u.reused_from is not null then now() end,
                case when u.reused_from is not null then now() end
         from unnest($2::uuid[], $3::int4[], $4::jsonb[], $5::int8[], $6::int4[], $7::int8[], $8::jsonb[], $9::text[],
                     $10::uuid[])
              as u(id, ordinal, params, total_steps, bracket, pause_at, depends_on, fuse_key, reused_from)",
    )
    .bind(experiment.0)
    .bind(&ids)
    .bind(&ordinals)
    .bind(&params)
    .bind(&steps)
    .bind(&brackets)
    .bind(&pause_at)
    .bind(&depends_on)
    .bind(&fuse_keys)
    .bind(&reused)
    .execute(&mut *tx)
    .await?;
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

pub(super) fn not_found(experiment: ExperimentId) -> Error {
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
    pub tags: Vec<String>,
    pub note: Option<String>,
    /// Trials that took another experiment's results instead of running.
    pub reused: i64,
    pub keep_checkpoints: String,
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
    pub reused_from: Option<TrialId>,
}

const EXPERIMENT_COLUMNS: &str = "experiment_id, name, family, state, pending, running, succeeded, failed,
     pruned, cancelled, objective_metric, goal, created_at, tags, note, reused, keep_checkpoints,
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
        tags: row.try_get("tags")?,
        note: row.try_get("note")?,
        reused: row.try_get("reused")?,
        keep_checkpoints: row.try_get("keep_checkpoints")?,
    })
}

pub async fn experiment(pool: &PgPool, id: ExperimentId) -> Result<ExperimentRow> {
    // Built from constants only.
    let row = sqlx::query(AssertSqlSafe(format!(
        "select {EXPERIMENT_COLUMNS} from ablate.experiments where experiment_id = $1"
    )))
    .bind(id.0)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| not_found(id))?;
    experiment_row(&row)
}

/// The newest experiments, those with `tag` alone when it is given.
pub async fn list_experiments(pool: &PgPool, limit: u32, tag: Option<&str>) -> Result<Vec<ExperimentRow>> {
    // Built from constants only.
    let rows = sqlx::query(AssertSqlSafe(format!(
        "select {EXPERIMENT_COLUMNS} from ablate.experiments
         where $2::text is null or tags @> array[$2::text]
         order by created_at desc limit $1"
    )))
    .bind(limit as i64)
    .bind(tag)
    .fetch_all(pool)
    .await?;
    rows.iter().map(experiment_row).collect()
}

/// The best succeeded trials by the objective, best first (feasible ones only: an
/// infeasible trial is never reported best).
pub async fn best_trials(pool: &PgPool, e: &ExperimentRow, limit: u32) -> Result<Vec<TrialRow>> {
    let order = if e.goal.as_deref() == Some("maximize") {
        "desc"
    } else {
        "asc"
    };
    // `order` is one of two constants.
    let rows = sqlx::query(AssertSqlSafe(format!(
        "select r.trial_id, r.ordinal, r.state, r.params, r.objective, r.attempt, r.error,
                t.total_steps, t.total_steps as step, t.reused_from
         from ablate.trial_results r join trials t on t.id = r.trial_id
         where r.experiment_id = $1 and r.state = 'succeeded' and r.objective is not null and r.feasible
         order by r.objective {order}, r.ordinal
         limit $2"
    )))
    .bind(e.id.0)
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    rows.iter().map(trial_row).collect()
}

/// An experiment's Pareto front (`ablate.pareto`; none with one objective), at most
/// `limit` trials by its first objective: id, ordinal, params, objectives.
pub async fn pareto_front(pool: &PgPool, id: ExperimentId, limit: u32) -> Result<Vec<(uuid::Uuid, i32, Value, Value)>> {
    Ok(sqlx::query_as(
        "select p.trial_id, p.ordinal, p.params, p.objectives
         from ablate.pareto p join experiments e on e.id = p.experiment_id
         where p.experiment_id = $1
         order by (p.objectives ->> (e.spec -> 'objective' ->> 'metric'))::float8
                  * case when e.spec -> 'objective' ->> 'goal' = 'maximize' then -1 else 1 end, p.ordinal
         limit $2",
    )
    .bind(id.0)
    .bind(limit as i64)
    .fetch_all(pool)
    .await?)
}

/// Running trials with the newest step they logged, and failed trials with their reason.
pub async fn active_and_failed_trials(pool: &PgPool, id: ExperimentId) -> Result<(Vec<TrialRow>, Vec<TrialRow>)> {
    let rows = sqlx::query(
        "select t.id as trial_id, t.ordinal, t.state, t.params, null::float8 as objective, t.attempt,
                coalesce(t.error, '') || case when t.stderr_tail is not null and t.stderr_tail <> ''
                    then E'\\n' || t.stderr_tail else '' end as error,
                t.total_steps, t.reused_from,
                coalesce(metric_last_step(t.id), 0) as step
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
        reused_from: row.try_get::<Option<uuid::Uuid>, _>("reused_from")?.map(TrialId),
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
             from trials t join metric_points m on m.trial_id = coalesce(t.reused_from, t.id)
             join metric_names n on n.id = m.name_id
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

/// Who submitted an experiment (the token's name), if anyone did with a token.
pub async fn submitter(pool: &PgPool, id: ExperimentId) -> Result<Option<String>> {
    let row: Option<(Option<String>,)> = sqlx::query_as("select submitted_by from experiments where id = $1")
        .bind(id.0)
        .fetch_optional(pool)
        .await?;
    row.map(|(who,)| who).ok_or_else(|| not_found(id))
}
