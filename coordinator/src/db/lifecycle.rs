//! Experiments after their first run: retried trials, extensions, reused trials,
//! tags and notes, deletion, and what checkpoint retention and `ablate gc` read.

use std::collections::{HashMap, HashSet};

use ablate_schema::{ExperimentId, TrialId};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};

use super::experiments::not_found;
use crate::error::{Error, Result};

/// An experiment as a change to it sees it, its row locked for the transaction.
pub struct Held {
    pub name: String,
    pub family: String,
    pub spec: Value,
    pub code_hash: Option<String>,
    pub command: Option<Value>,
    pub pending: i64,
    pub running: i64,
    pub total: i64,
}

impl Held {
    /// Refuses a change to an experiment that still runs, saying what to do.
    pub fn refuse_running(&self, id: ExperimentId, what: &str) -> Result<()> {
        if self.pending + self.running > 0 {
            return Err(Error::Conflict(format!(
                "experiment {id} ({}) is running ({} pending, {} running): {what} it once it has ended \
                 (`ablate watch {id}`), or cancel it first (`ablate cancel {id}`)",
                self.name, self.pending, self.running
            )));
        }
        Ok(())
    }
}

/// Locks an experiment's row (so two changes to it take turns) and reads it.
pub async fn hold(tx: &mut PgConnection, id: ExperimentId) -> Result<Held> {
    let row = sqlx::query(
        "select e.name, e.family, e.spec, e.code_hash, e.command,
                (select count(*) from trials t where t.experiment_id = e.id and t.state = 'pending') as pending,
                (select count(*) from trials t where t.experiment_id = e.id and t.state = 'running') as running,
                (select count(*) from trials t where t.experiment_id = e.id) as total
         from experiments e where e.id = $1 for update",
    )
    .bind(id.0)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| not_found(id))?;
    Ok(Held {
        name: row.try_get("name")?,
        family: row.try_get("family")?,
        spec: row.try_get("spec")?,
        code_hash: row.try_get("code_hash")?,
        command: row.try_get("command")?,
        pending: row.try_get("pending")?,
        running: row.try_get("running")?,
        total: row.try_get("total")?,
    })
}

/// The parameters of an experiment's trials, by trial.
pub async fn trial_params(tx: &mut PgConnection, id: ExperimentId) -> Result<Vec<(TrialId, Value)>> {
    let rows: Vec<(uuid::Uuid, Value)> =
        sqlx::query_as("select id, params from trials where experiment_id = $1 order by ordinal")
            .bind(id.0)
            .fetch_all(&mut *tx)
            .await?;
    Ok(rows.into_iter().map(|(id, p)| (TrialId(id), p)).collect())
}

/// What a trial's configuration must equal for it to be reused: the family, the
/// program and its code (a command trial) or the version of ablate that ran it.
pub struct Configuration<'a> {
    pub family: &'a str,
    pub command: Option<&'a Value>,
    pub code_hash: Option<&'a str>,
    pub ablate_version: &'a str,
}

/// For each of `params`, a succeeded trial of another experiment with the same
/// configuration, when there is one: the trial that holds its data (the newest).
pub async fn reusable(
    tx: &mut PgConnection,
    config: &Configuration<'_>,
    except: ExperimentId,
    params: &[Value],
) -> Result<HashMap<usize, TrialId>> {
    if params.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, uuid::Uuid)> = sqlx::query_as(
        "select distinct on (c.i) c.i, coalesce(t.reused_from, t.id)
         from unnest($1::jsonb[]) with ordinality as c(params, i)
         join trials t on t.params = c.params and t.state = 'succeeded'
         join experiments e on e.id = t.experiment_id
         where e.id <> $2 and e.family = $3
           and e.command is not distinct from $4 and e.code_hash is not distinct from $5
           and ($4 is not null or exists (
                   select 1 from trial_attempts a
                   where a.trial_id = coalesce(t.reused_from, t.id) and a.outcome = 'succeeded'
                     and a.provenance ->> 'ablate_version' = $6))
         order by c.i, t.finished_at desc",
    )
    .bind(params)
    .bind(except.0)
    .bind(config.family)
    .bind(config.command)
    .bind(config.code_hash)
    .bind(config.ablate_version)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(i, source)| (i as usize - 1, TrialId(source)))
        .collect())
}

/// An extension's new spec, recorded on the experiment it extends.
pub async fn record_extension(
    tx: &mut PgConnection,
    id: ExperimentId,
    spec: &Value,
    spec_text: &str,
    spec_hash: &str,
) -> Result<()> {
    sqlx::query(
        "update experiments set spec = $2, spec_text = $3, spec_hash = $4, extended_at = now(), cancelled_at = null
         where id = $1",
    )
    .bind(id.0)
    .bind(spec)
    .bind(spec_text)
    .bind(spec_hash)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Which finished trials `ablate retry` puts back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Failed by the program's own report, or without an attempt (a failed dependency).
    Failed,
    /// Failed after its process crashed or its lease expired on every attempt.
    Crashed,
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Failed, Outcome::Crashed, Outcome::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Failed => "failed",
            Outcome::Crashed => "crashed",
            Outcome::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == text)
    }
}

/// Puts an experiment's finished trials of these outcomes back to pending: a fresh
/// allowance of attempts (their numbers going on), their error cleared, resuming
/// from their newest checkpoint. Returns how many.
pub async fn retry(tx: &mut PgConnection, id: ExperimentId, outcomes: &[Outcome]) -> Result<u64> {
    let has = |o| outcomes.contains(&o);
    let done = sqlx::query(
        "with last as (
             select t.id, t.state,
                    (select a.outcome from trial_attempts a where a.trial_id = t.id
                     order by a.attempt desc limit 1) as outcome
             from trials t
             where t.experiment_id = $1 and t.state in ('failed', 'cancelled')
         )
         update trials t
         set state = 'pending', attempt_base = t.attempt - t.pauses, error = null, stderr_tail = null,
             finished_at = null
         from last
         where t.id = last.id
           and (($2 and last.state = 'failed' and coalesce(last.outcome, 'failed') not in ('crashed', 'lease_expired'))
             or ($3 and last.state = 'failed' and last.outcome in ('crashed', 'lease_expired'))
             or ($4 and last.state = 'cancelled'))",
    )
    .bind(id.0)
    .bind(has(Outcome::Failed))
    .bind(has(Outcome::Crashed))
    .bind(has(Outcome::Cancelled))
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() > 0 {
        sqlx::query("update experiments set cancelled_at = null where id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
    }
    Ok(done.rows_affected())
}

/// Adds and removes tags; returns the experiment's tags now, sorted.
pub async fn tag(pool: &PgPool, id: ExperimentId, add: &[String], remove: &[String]) -> Result<Vec<String>> {
    let tags: Option<Vec<String>> = sqlx::query_scalar(
        "update experiments
         set tags = array(select distinct x from unnest(tags || $2::text[]) x where x <> all($3::text[]) order by x)
         where id = $1 returning tags",
    )
    .bind(id.0)
    .bind(add)
    .bind(remove)
    .fetch_optional(pool)
    .await?;
    tags.ok_or_else(|| not_found(id))
}

/// Sets (or, empty, clears) an experiment's note.
pub async fn set_note(pool: &PgPool, id: ExperimentId, note: &str) -> Result<()> {
    let done = sqlx::query("update experiments set note = nullif($2, '') where id = $1")
        .bind(id.0)
        .bind(note)
        .execute(pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(not_found(id));
    }
    Ok(())
}

/// What a deletion removed from the database, and which of its objects must stay.
pub struct Deleted {
    pub trials: u64,
    /// Trials of other experiments that reused its trials, now holding their data.
    pub handed_over: u64,
    /// Checkpoint objects another experiment's rows still reference.
    pub kept_paths: HashSet<String>,
    /// Its code archive's hash when no other experiment runs that code.
    pub unused_code: Option<String>,
}

/// Deletes an experiment's rows. A trial another experiment reused hands its data
/// (metrics, checkpoints, attempts, outputs) to one of the trials that reuse it,
/// and the others then reuse that one: what they show does not change.
pub async fn delete(tx: &mut PgConnection, id: ExperimentId) -> Result<Deleted> {
    // Each reused trial of this experiment and the trial of another that takes its data.
    let heirs: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(
        "select distinct on (s.id) s.id, r.id
         from trials s join trials r on r.reused_from = s.id
         where s.experiment_id = $1 and r.experiment_id <> $1
         order by s.id, r.created_at, r.id",
    )
    .bind(id.0)
    .fetch_all(&mut *tx)
    .await?;
    let (sources, heirs): (Vec<uuid::Uuid>, Vec<uuid::Uuid>) = heirs.into_iter().unzip();
    if !sources.is_empty() {
        // The heir holds the data now, so it reuses nothing; the others reuse the heir.
        sqlx::query(
            "with h as (select * from unnest($1::uuid[], $2::uuid[]) as h(source, heir))
             update trials t set reused_from = case when t.id = h.heir then null else h.heir end,
                                 outputs = (select s.outputs from trials s where s.id = h.source),
                                 final_metrics = (select s.final_metrics from trials s where s.id = h.source)
             from h where t.reused_from = h.source",
        )
        .bind(&sources)
        .bind(&heirs)
        .execute(&mut *tx)
        .await?;
        for (table, column) in [
            ("metrics", "trial_id"),
            ("metric_chunks", "trial_id"),
            ("metric_curves", "trial_id"),
            ("checkpoints", "trial_id"),
            ("trial_attempts", "trial_id"),
        ] {
            // Table and column names are constants.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "update {table} x set {column} = h.heir
                 from unnest($1::uuid[], $2::uuid[]) as h(source, heir) where x.{column} = h.source"
            )))
            .bind(&sources)
            .bind(&heirs)
            .execute(&mut *tx)
            .await?;
        }
    }
    let kept_paths: Vec<String> = sqlx::query_scalar(
        "select c.path from checkpoints c join trials t on t.id = c.trial_id where t.experiment_id <> $1
         and c.path like '%experiments/' || $1::text || '/%'",
    )
    .bind(id.0)
    .fetch_all(&mut *tx)
    .await?;
    let unused_code: Option<String> = sqlx::query_scalar(
        "select e.code_hash from experiments e where e.id = $1 and e.code_hash is not null
         and not exists (select 1 from experiments o where o.code_hash = e.code_hash and o.id <> e.id)",
    )
    .bind(id.0)
    .fetch_optional(&mut *tx)
    .await?
    .flatten();
    let trials = "select id from trials where experiment_id = $1";
    for statement in [
        format!("delete from metrics where trial_id in ({trials})"),
        format!("delete from metric_chunks where trial_id in ({trials})"),
        format!("delete from metric_curves where trial_id in ({trials})"),
        format!("delete from checkpoints where trial_id in ({trials})"),
        format!("delete from trial_attempts where trial_id in ({trials})"),
        format!("delete from pbt_lineage where experiment_id = $1 or donor_trial_id in ({trials})"),
        "delete from rungs where experiment_id = $1".to_string(),
        "delete from searcher_locks where experiment_id = $1".to_string(),
        format!("update trials set reused_from = null where reused_from in ({trials})"),
    ] {
        // Built from constants only.
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
    }
    let removed = sqlx::query("delete from trials where experiment_id = $1")
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    sqlx::query("delete from experiments where id = $1")
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    Ok(Deleted {
        trials: removed.rows_affected(),
        handed_over: heirs.len() as u64,
        kept_paths: kept_paths.into_iter().collect(),
        unused_code,
    })
}

/// A finished trial whose checkpoints retention has yet to look at.
pub struct ToRetain {
    pub trial: TrialId,
    pub keep: String,
    pub objective: Option<String>,
    pub maximize: bool,
}

/// Up to `limit` finished trials of experiments that keep fewer than all checkpoints,
/// not yet looked at (their rows locked for the caller's transaction).
pub async fn to_retain(tx: &mut PgConnection, limit: i64) -> Result<Vec<ToRetain>> {
    let rows = sqlx::query(
        "select t.id, e.keep_checkpoints, e.objective_metric, e.goal = 'maximize' as maximize
         from experiments e
         join trials t on t.experiment_id = e.id and t.retained_at is null and t.state in ('succeeded', 'pruned')
         where e.keep_checkpoints <> 'all'
         limit $1
         for update of t skip locked",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ToRetain {
                trial: TrialId(r.try_get("id")?),
                keep: r.try_get("keep_checkpoints")?,
                objective: r.try_get("objective_metric")?,
                maximize: r.try_get::<Option<bool>, _>("maximize")?.unwrap_or(false),
            })
        })
        .collect()
}

/// A trial's checkpoints, newest first, each with the objective's value at its step
/// (the newest point at or before it) and whether a PBT member took it.
pub async fn checkpoints_for_retention(
    tx: &mut PgConnection,
    trial: TrialId,
    objective: Option<&str>,
) -> Result<Vec<(i64, String, Option<f64>, bool)>> {
    let rows: Vec<(i64, String, Option<f64>, bool)> = sqlx::query_as(
        "select c.step, c.path,
                nullif(metric_value_at(c.trial_id, (select id from metric_names where name = $2), c.step), 'NaN'),
                exists (select 1 from pbt_lineage l where l.donor_trial_id = c.trial_id and l.step = c.step)
         from checkpoints c where c.trial_id = $1 order by c.step desc",
    )
    .bind(trial.0)
    .bind(objective)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows)
}

/// Drops a trial's checkpoint rows at `steps` and marks it looked at; returns the
/// dropped paths that no other row references (their objects may go).
pub async fn drop_checkpoints(tx: &mut PgConnection, trial: TrialId, steps: &[i64]) -> Result<Vec<String>> {
    let paths: Vec<String> = sqlx::query_scalar(
        "with gone as (delete from checkpoints where trial_id = $1 and step = any($2) returning path)
         select g.path from gone g
         where not exists (select 1 from checkpoints c where c.path = g.path and c.trial_id <> $1)",
    )
    .bind(trial.0)
    .bind(steps)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("update trials set retained_at = now() where id = $1")
        .bind(trial.0)
        .execute(&mut *tx)
        .await?;
    Ok(paths)
}

/// What the database references in the object store, for `ablate gc`.
pub struct References {
    pub checkpoint_paths: HashSet<String>,
    /// Every experiment, with its trials and whether each has ended (not pending or
    /// running: no attempt writes to it now).
    pub experiments: HashMap<uuid::Uuid, HashMap<uuid::Uuid, bool>>,
    pub code_hashes: HashSet<String>,
}

pub async fn references(pool: &PgPool) -> Result<References> {
    let mut tx = pool.begin().await?;
    // One snapshot for all three reads.
    sqlx::query("set transaction isolation level repeatable read read only")
        .execute(&mut *tx)
        .await?;
    let trials: Vec<(uuid::Uuid, Option<uuid::Uuid>, bool)> = sqlx::query_as(
        "select e.id, t.id, t.state not in ('pending', 'running') from experiments e left join trials t on t.experiment_id = e.id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut experiments: HashMap<uuid::Uuid, HashMap<uuid::Uuid, bool>> = HashMap::new();
    for (e, t, done) in trials {
        let entry = experiments.entry(e).or_default();
        if let Some(t) = t {
            entry.insert(t, done);
        }
    }
    let checkpoint_paths: Vec<String> = sqlx::query_scalar("select path from checkpoints")
        .fetch_all(&mut *tx)
        .await?;
    let code_hashes: Vec<String> =
        sqlx::query_scalar("select distinct code_hash from experiments where code_hash is not null")
            .fetch_all(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(References {
        checkpoint_paths: checkpoint_paths.into_iter().collect(),
        experiments,
        code_hashes: code_hashes.into_iter().collect(),
    })
}
