//! ASHA and Hyperband: a trial that stopped at its rung, and the promotions
//! that rung then allows. One decision at a time per experiment (a row of
//! `searcher_locks` locked to the end of the transaction), so concurrent
//! pauses on several replicas see each other's values.

use ablate_schema::{ExperimentId, LeaseToken, SweepSpec, TrialId};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool, Row};

use crate::error::{Error, Result};

/// Holds the experiment's searcher lock to the end of the transaction: rung promotions,
/// PBT generations and TPE proposals decide one at a time per experiment. Take it before
/// any trial's row, since a decision writes other trials' rows. The lock is the
/// experiment's row of `searcher_locks` (made on first use), which no other role can
/// see or lock: a researcher's query can't stall a sweep's decisions.
pub(super) async fn lock_experiment(tx: &mut PgConnection, experiment: uuid::Uuid) -> Result<()> {
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
pub(super) fn stored_spec(spec: Value) -> Result<SweepSpec> {
    serde_json::from_value(spec)
        .map_err(|e| Error::InvalidArgument(format!("the experiment's stored spec does not read back: {e}")))
}

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
    let experiment: uuid::Uuid = sqlx::query_scalar("select experiment_id from trials where id = $1")
        .bind(trial.0)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(stale)?;
    lock_experiment(&mut tx, experiment).await?;
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
    let Some(ladder) = spec.sweep.ladder() else {
        // Population-based training: the generation is decided once every member is here.
        let promoted = generation(&mut tx, ExperimentId(experiment), &spec, maximize, step).await?;
        tx.commit().await?;
        return Ok(Pause { value, promoted });
    };
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

/// Decides a PBT generation at `step` once every live member of the population has
/// stopped there (`ablate_experiments::pbt`): the bottom members take a top member's
/// checkpoint (their checkpoint row at `step` points at its object) and its
/// hyperparameters perturbed; every decision goes into `pbt_lineage`; then all go on
/// to the next generation. Returns the members set going, none while some are missing.
async fn generation(
    tx: &mut PgConnection,
    experiment: ExperimentId,
    spec: &SweepSpec,
    maximize: bool,
    step: u64,
) -> Result<Vec<TrialId>> {
    let Some(pbt) = spec.sweep.pbt.clone() else {
        return Ok(Vec::new());
    };
    // (id, params, total steps, value at the step, whether it is waiting there)
    type Member = (uuid::Uuid, Value, i64, Option<f64>, bool);
    let members: Vec<Member> = sqlx::query_as(
        "select t.id, t.params, t.total_steps, r.value, r.trial_id is not null and t.state = 'pruned'
         from trials t left join rungs r on r.trial_id = t.id and r.step = $2
         where t.experiment_id = $1 and t.state not in ('failed', 'cancelled')
         order by t.ordinal",
    )
    .bind(experiment.0)
    .bind(step as i64)
    .fetch_all(&mut *tx)
    .await?;
    if members.is_empty() || members.iter().any(|m| !m.4) {
        return Ok(Vec::new());
    }
    let population: Vec<(serde_json::Map<String, Value>, Option<f64>)> = members
        .iter()
        .map(|m| (spec.swept(&m.1), m.3.map(|v| if maximize { -v } else { v })))
        .collect();
    let decisions = ablate_experiments::pbt::generation(
        &spec.domains(),
        &population,
        pbt.quantile(),
        &pbt.factors(),
        pbt.seed.unwrap_or(0),
        step,
    );
    for (member, decision) in members.iter().zip(&decisions) {
        let (action, donor, params) = match decision {
            ablate_experiments::pbt::Step::Continue => ("continue", None, member.1.clone()),
            ablate_experiments::pbt::Step::Exploit { donor, params } => {
                let mut next = member.1.as_object().cloned().unwrap_or_default();
                next.extend(params.clone());
                ("exploit", Some(members[*donor].0), Value::Object(next))
            }
        };
        if let Some(donor) = donor {
            let copied = sqlx::query(
                "update checkpoints c set path = d.path, bytes = d.bytes, created_at = now()
                 from checkpoints d
                 where c.trial_id = $1 and c.step = $3 and d.trial_id = $2 and d.step = $3",
            )
            .bind(member.0)
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
                .bind(member.0)
                .bind(&params)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "insert into pbt_lineage (experiment_id, trial_id, step, value, action, donor_trial_id, params)
             values ($1, $2, $3, $4, $5, $6, $7)
             on conflict do nothing",
        )
        .bind(experiment.0)
        .bind(member.0)
        .bind(step as i64)
        .bind(member.3)
        .bind(action)
        .bind(donor)
        .bind(&params)
        .execute(&mut *tx)
        .await?;
    }
    let going: Vec<uuid::Uuid> = sqlx::query_scalar(
        "update trials
         set state = 'pending', finished_at = null,
             pause_at = case when $2 + $3 < total_steps then $2 + $3 end
         where id = any($1) and state = 'pruned'
         returning id",
    )
    .bind(members.iter().map(|m| m.0).collect::<Vec<_>>())
    .bind(step as i64)
    .bind(pbt.interval as i64)
    .fetch_all(&mut *tx)
    .await?;
    Ok(going.into_iter().map(TrialId).collect())
}

/// Decides the PBT generations that wait on no one any more (a member failed for good
/// while the others waited for it): the reaper's pass.
pub async fn advance_generations(pool: &PgPool) -> Result<usize> {
    let waiting: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "select e.id, (select max(r.step) from rungs r where r.experiment_id = e.id)
         from experiments e
         where e.searcher = 'pbt' and e.cancelled_at is null
           and exists (select 1 from trials t where t.experiment_id = e.id and t.state = 'pruned')
           and not exists (select 1 from trials t where t.experiment_id = e.id and t.state in ('pending', 'running'))",
    )
    .fetch_all(pool)
    .await?;
    let mut advanced = 0;
    for (id, step) in waiting {
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        lock_experiment(&mut tx, id).await?;
        let (spec, goal): (Value, Option<String>) = sqlx::query_as("select spec, goal from experiments where id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let Ok(spec) = stored_spec(spec) else {
            continue;
        };
        advanced += generation(
            &mut tx,
            ExperimentId(id),
            &spec,
            goal.as_deref() == Some("maximize"),
            step as u64,
        )
        .await?
        .len();
        tx.commit().await?;
    }
    Ok(advanced)
}
