//! The SQL of the searchers that stop trials at steps (ASHA, Hyperband, PBT): a trial's
//! pause at its rung recorded, the promotions a rung allows, a PBT generation's reads
//! and writes. The decisions are `platform::searchers`'. One decision at a time per
//! experiment (a row of `searcher_locks` locked to the end of the transaction), so
//! concurrent pauses on several replicas see each other's values.

use ablate_schema::{ExperimentId, LeaseToken, SweepSpec, TrialId};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};

use crate::error::{Error, Result};

/// Holds the experiment's searcher lock to the end of the transaction: rung promotions,
/// PBT generations and TPE proposals decide one at a time per experiment. Take it before
/// any trial's row, since a decision writes other trials' rows. The lock is the
/// experiment's row of `searcher_locks` (made on first use), which no other role can
/// see or lock: a researcher's query can't stall a sweep's decisions.
pub async fn lock_experiment(tx: &mut PgConnection, experiment: uuid::Uuid) -> Result<()> {
    sqlx::query(
        "insert into searcher_locks (experiment_id) values ($1)
         on conflict (experiment_id) do update set experiment_id = excluded.experiment_id",
    )
    .bind(experiment)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// An experiment's stored spec, read back.
pub fn stored_spec(spec: Value) -> Result<SweepSpec> {
    serde_json::from_value(spec)
        .map_err(|e| Error::InvalidArgument(format!("the experiment's stored spec does not read back: {e}")))
}

/// A pause at a rung, recorded.
#[derive(Debug)]
pub struct RungRecord {
    pub experiment: ExperimentId,
    pub bracket: i32,
    pub spec: SweepSpec,
    pub maximize: bool,
    /// The objective at the rung, when the trial logged it.
    pub value: Option<f64>,
}

/// Records, inside the caller's transaction and under the experiment's searcher lock,
/// a trial that stopped at its rung with a checkpoint at `step` (fenced by its lease):
/// its objective there goes into `rungs`, the attempt ends `paused` (not counted against
/// `max_attempts`) and the trial is `pruned` until a decision promotes it. `None`: this
/// report again, recorded before.
pub async fn record_rung(
    tx: &mut PgConnection,
    trial: TrialId,
    token: LeaseToken,
    step: u64,
    provenance: Option<&Value>,
) -> Result<Option<RungRecord>> {
    let stale = || Error::StaleLease {
        trial: trial.to_string(),
    };
    let experiment: uuid::Uuid = sqlx::query_scalar("select experiment_id from trials where id = $1")
        .bind(trial.0)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(stale)?;
    lock_experiment(&mut *tx, experiment).await?;
    let row = sqlx::query(
        "select t.bracket, t.pause_at, t.state, e.spec, e.objective_metric, e.goal,
                exists (select 1 from rungs r where r.trial_id = t.id and r.step = $3) as recorded
         from trials t join experiments e on e.id = t.experiment_id
         where t.id = $1 and t.lease_token = $2
         for update of t",
    )
    .bind(trial.0)
    .bind(token.0)
    .bind(step as i64)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(stale)?;
    let state: String = row.try_get("state")?;
    if row.try_get::<bool, _>("recorded")? && state != "running" {
        return Ok(None); // this report again
    }
    if state != "running" {
        return Err(stale());
    }
    let pause_at: Option<i64> = row.try_get("pause_at")?;
    if pause_at != Some(step as i64) {
        return Err(Error::InvalidArgument(format!(
            "trial {trial} reported a pause at step {step}, but its rung is {}",
            pause_at.map_or("the end of its run".to_string(), |s| format!("step {s}"))
        )));
    }
    let bracket: i32 = row.try_get::<Option<i32>, _>("bracket")?.unwrap_or(0);
    let spec = stored_spec(row.try_get("spec")?)?;
    if !spec.sweep.pauses() {
        return Err(Error::InvalidArgument(format!(
            "trial {trial} paused, but its sweep has no rungs"
        )));
    }
    let metric: Option<String> = row.try_get("objective_metric")?;
    let maximize = row.try_get::<Option<String>, _>("goal")?.as_deref() == Some("maximize");

    let value: Option<f64> = sqlx::query_scalar(
        "insert into rungs (trial_id, experiment_id, bracket, step, value)
         select $1, $2, $3, $4,
                nullif(metric_value_at($1, (select id from metric_names where name = $5), $4), 'NaN')
         on conflict (trial_id, step) do update set value = excluded.value
         returning value",
    )
    .bind(trial.0)
    .bind(experiment)
    .bind(bracket)
    .bind(step as i64)
    .bind(metric)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "with paused as (
             update trials
             set state = 'pruned', pauses = pauses + 1, pause_at = null, finished_at = now(), lease_expires_at = null
             where id = $1
             returning id, attempt, lease_owner
         )
         insert into trial_attempts (trial_id, attempt, worker_id, outcome, provenance)
         select id, attempt, lease_owner, 'paused', $2 from paused
         on conflict do nothing",
    )
    .bind(trial.0)
    .bind(provenance)
    .execute(&mut *tx)
    .await?;
    Ok(Some(RungRecord {
        experiment: ExperimentId(experiment),
        bracket,
        spec,
        maximize,
        value,
    }))
}

/// Asynchronous successive halving at a rung: of the n trials at this rung so far, the
/// best floor(n / `reduction_factor`) go on; those among them not yet promoted are pending
/// again, resuming from their checkpoint, stopping at `next` (`None`: the end of the run).
pub async fn promote_at_rung(
    tx: &mut PgConnection,
    rung: &RungRecord,
    step: u64,
    reduction_factor: u64,
    next: Option<u64>,
) -> Result<Vec<TrialId>> {
    let order = if rung.maximize { "desc" } else { "asc" };
    let promoted: Vec<uuid::Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "with here as (
             select trial_id, value, recorded_at, promoted_at from rungs
             where experiment_id = $1 and bracket = $2 and step = $3
         ),
         best as (
             select trial_id, promoted_at from here
             order by value {order} nulls last, recorded_at
             limit (select count(*) from here) / $4
         )
         update rungs r set promoted_at = now()
         from best
         where r.trial_id = best.trial_id and r.step = $3 and best.promoted_at is null
         returning r.trial_id"
    )))
    .bind(rung.experiment.0)
    .bind(rung.bracket)
    .bind(step as i64)
    .bind(reduction_factor as i64)
    .fetch_all(&mut *tx)
    .await?;
    let promoted: Vec<uuid::Uuid> = sqlx::query_scalar(
        "update trials
         set state = 'pending', pause_at = $2, finished_at = null
         where id = any($1) and state = 'pruned'
         returning id",
    )
    .bind(&promoted)
    .bind(next.map(|s| s as i64))
    .fetch_all(&mut *tx)
    .await?;
    Ok(promoted.into_iter().map(TrialId).collect())
}

/// A PBT population member at a step: its id, parameters, value there, whether it has
/// reached the step (a rung there: a checkpoint to copy) and whether it waits there (it
/// stopped at the step and is not yet set going).
#[derive(Debug, Clone)]
pub struct Member {
    pub id: uuid::Uuid,
    pub params: Value,
    pub value: Option<f64>,
    pub at_step: bool,
    pub waiting: bool,
}

/// The live members of an experiment's population at `step`, in order: what a
/// synchronous generation and an asynchronous member's decision both read.
pub async fn pbt_members(tx: &mut PgConnection, experiment: ExperimentId, step: u64) -> Result<Vec<Member>> {
    let rows: Vec<(uuid::Uuid, Value, Option<f64>, bool, bool)> = sqlx::query_as(
        "select t.id, t.params, r.value, r.trial_id is not null, r.trial_id is not null and t.state = 'pruned'
         from trials t left join rungs r on r.trial_id = t.id and r.step = $2
         where t.experiment_id = $1 and t.state not in ('failed', 'cancelled')
         order by t.ordinal",
    )
    .bind(experiment.0)
    .bind(step as i64)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, params, value, at_step, waiting)| Member {
            id,
            params,
            value,
            at_step,
            waiting,
        })
        .collect())
}

/// A member takes a donor's checkpoint at `step` (its checkpoint row there points at the
/// donor's object) and new parameters.
pub async fn pbt_exploit(
    tx: &mut PgConnection,
    member: uuid::Uuid,
    donor: uuid::Uuid,
    step: u64,
    params: &Value,
) -> Result<()> {
    let copied = sqlx::query(
        "update checkpoints c set path = d.path, bytes = d.bytes, created_at = now()
         from checkpoints d
         where c.trial_id = $1 and c.step = $3 and d.trial_id = $2 and d.step = $3",
    )
    .bind(member)
    .bind(donor)
    .bind(step as i64)
    .execute(&mut *tx)
    .await?;
    if copied.rows_affected() != 1 {
        return Err(Error::InvalidArgument(format!(
            "PBT at step {step}: trial {donor} has no checkpoint there to copy"
        )));
    }
    sqlx::query("update trials set params = $2 where id = $1")
        .bind(member)
        .bind(params)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Keeps one member's decision at a generation in `pbt_lineage`.
pub async fn pbt_lineage(
    tx: &mut PgConnection,
    experiment: ExperimentId,
    member: &Member,
    step: u64,
    action: &str,
    donor: Option<uuid::Uuid>,
    params: &Value,
) -> Result<()> {
    sqlx::query(
        "insert into pbt_lineage (experiment_id, trial_id, step, value, action, donor_trial_id, params)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict do nothing",
    )
    .bind(experiment.0)
    .bind(member.id)
    .bind(step as i64)
    .bind(member.value)
    .bind(action)
    .bind(donor)
    .bind(params)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Sets the members waiting at `step` going to the next generation, `interval` steps on
/// (or to the end of their run). Returns those set going.
pub async fn pbt_release(
    tx: &mut PgConnection,
    members: &[uuid::Uuid],
    step: u64,
    interval: u64,
) -> Result<Vec<TrialId>> {
    let going: Vec<uuid::Uuid> = sqlx::query_scalar(
        "update trials
         set state = 'pending', finished_at = null,
             pause_at = case when $2 + $3 < total_steps then $2 + $3 end
         where id = any($1) and state = 'pruned'
         returning id",
    )
    .bind(members)
    .bind(step as i64)
    .bind(interval as i64)
    .fetch_all(&mut *tx)
    .await?;
    Ok(going.into_iter().map(TrialId).collect())
}

/// The PBT experiments whose generation waits on no one any more (a member failed for
/// good while the others waited for it), with the step of their last rung.
pub async fn pbt_generations_due(pool: &PgPool) -> Result<Vec<(ExperimentId, u64)>> {
    let due: Vec<(uuid::Uuid, Option<i64>)> = sqlx::query_as(
        "select e.id, (select max(r.step) from rungs r where r.experiment_id = e.id)
         from experiments e
         where e.searcher = 'pbt' and e.cancelled_at is null
           and not coalesce((e.spec #>> '{sweep,pbt,asynchronous}')::boolean, false)
           and exists (select 1 from trials t where t.experiment_id = e.id and t.state = 'pruned')
           and not exists (select 1 from trials t where t.experiment_id = e.id and t.state in ('pending', 'running'))",
    )
    .fetch_all(pool)
    .await?;
    Ok(due
        .into_iter()
        .filter_map(|(id, step)| Some((ExperimentId(id), step? as u64)))
        .collect())
}

/// An experiment's stored spec and whether its objective is maximized.
pub async fn spec_and_goal(tx: &mut PgConnection, experiment: ExperimentId) -> Result<(SweepSpec, bool)> {
    let (spec, goal): (Value, Option<String>) = sqlx::query_as("select spec, goal from experiments where id = $1")
        .bind(experiment.0)
        .fetch_one(&mut *tx)
        .await?;
    Ok((stored_spec(spec)?, goal.as_deref() == Some("maximize")))
}
