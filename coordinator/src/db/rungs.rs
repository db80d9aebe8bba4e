//! ASHA and Hyperband: a trial that stopped at its rung, and the promotions
//! that rung then allows. One decision at a time per experiment (an advisory
//! lock held to the end of the transaction), so concurrent pauses on several
//! replicas see each other's values.

use ablate_schema::{LeaseToken, SweepSpec, TrialId};
use serde_json::Value;
use sqlx::{Connection, PgConnection, Row};

use crate::error::{Error, Result};

/// What a pause decided.
#[derive(Debug, Default)]
pub struct Pause {
    /// The objective at the rung, when the trial logged it.
    pub value: Option<f64>,
    /// Trials promoted to the next rung by this pause (perhaps the paused one).
    pub promoted: Vec<TrialId>,
}

/// Records a trial that stopped at its rung with a checkpoint at `step`
/// (fenced by its lease): its objective there goes into `rungs`, the attempt
/// ends `paused` (not counted against `max_attempts`) and the trial is
/// `pruned` unless promoted. Then the best `1/reduction_factor` of the trials
/// at that rung so far (by the spec's objective) that are not yet promoted
/// are: pending again, resuming from their checkpoint, stopping at the next
/// rung. Repeating the same report is harmless.
pub async fn pause(
    conn: &mut PgConnection,
    trial: TrialId,
    token: LeaseToken,
    step: u64,
    provenance: Option<&Value>,
) -> Result<Pause> {
    let stale = || Error::StaleLease {
        trial: trial.to_string(),
    };
    let mut tx = conn.begin().await?;
    // The experiment's lock before any trial's row: promotions write other trials' rows.
    let experiment: uuid::Uuid = sqlx::query_scalar("select experiment_id from trials where id = $1")
        .bind(trial.0)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(stale)?;
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1::text, 0))")
        .bind(experiment)
        .execute(&mut *tx)
        .await?;
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
        return Ok(Pause::default()); // this report again
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
    let spec: SweepSpec = serde_json::from_value(row.try_get("spec")?)
        .map_err(|e| Error::InvalidArgument(format!("the experiment's stored spec does not read back: {e}")))?;
    let ladder = spec
        .sweep
        .ladder()
        .ok_or_else(|| Error::InvalidArgument(format!("trial {trial} paused, but its sweep has no rungs")))?;
    let metric: Option<String> = row.try_get("objective_metric")?;
    let maximize = row.try_get::<Option<String>, _>("goal")?.as_deref() == Some("maximize");

    let value: Option<f64> = sqlx::query_scalar(
        "insert into rungs (trial_id, experiment_id, bracket, step, value)
         select $1, $2, $3, $4,
                (select nullif(m.value, 'NaN') from metrics m join metric_names n on n.id = m.name_id
                 where m.trial_id = $1 and n.name = $5 and m.step <= $4
                 order by m.step desc limit 1)
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
    // Asynchronous successive halving: of the n trials at this rung so far, the best
    // floor(n / rf) go on; those among them not yet promoted are promoted now.
    let order = if maximize { "desc" } else { "asc" };
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
    .bind(experiment)
    .bind(bracket)
    .bind(step as i64)
    .bind(ladder.reduction_factor as i64)
    .fetch_all(&mut *tx)
    .await?;
    let next = ladder.rung_after(bracket as u32, step).map(|s| s as i64);
    let promoted: Vec<uuid::Uuid> = sqlx::query_scalar(
        "update trials
         set state = 'pending', pause_at = $2, finished_at = null
         where id = any($1) and state = 'pruned'
         returning id",
    )
    .bind(&promoted)
    .bind(next)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Pause {
        value,
        promoted: promoted.into_iter().map(TrialId).collect(),
    })
}
