//! The tpe searcher's proposals: an experiment holds `n_startup` trials at
//! submission and one more for each that finished, up to `[sweep.tpe] trials`,
//! each proposed from the finished ones (`ablate_experiments::tpe`). One
//! decision at a time per experiment (the same searcher lock as the rungs).

use ablate_experiments::tpe::{self, Observation};
use ablate_schema::{ExperimentId, TrialId};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool, Row};

use super::rungs::{lock_experiment, stored_spec};
use crate::error::Result;

/// Adds the trials a tpe experiment is owed; returns how many. Nothing for other searchers.
pub async fn top_up(conn: &mut PgConnection, experiment: ExperimentId) -> Result<usize> {
    let mut tx = conn.begin().await?;
    lock_experiment(&mut tx, experiment.0).await?;
    let Some(row) = sqlx::query(
        "select e.spec, e.objective_metric, e.goal, e.cancelled_at is not null as cancelled,
                (select count(*) from trials t where t.experiment_id = e.id) as total,
                (select count(*) from trials t where t.experiment_id = e.id
                   and t.state in ('succeeded', 'failed', 'pruned')) as finished
         from experiments e where e.id = $1 and e.searcher = 'tpe'",
    )
    .bind(experiment.0)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(0);
    };
    let spec = stored_spec(row.try_get("spec")?)?;
    let Some(budget) = spec.sweep.tpe.clone() else {
        return Ok(0);
    };
    let (total, finished): (i64, i64) = (row.try_get("total")?, row.try_get("finished")?);
    let owed = budget.owed(finished as u64, total as u64) as i64;
    if owed == 0 || row.try_get::<bool, _>("cancelled")? {
        return Ok(0);
    }
    let metric: Option<String> = row.try_get("objective_metric")?;
    let maximize = row.try_get::<Option<String>, _>("goal")?.as_deref() == Some("maximize");
    let finished: Vec<(Value, String, Option<f64>)> = sqlx::query_as(
        "select t.params, t.state,
                (select m.value from metrics m join metric_names n on n.id = m.name_id
                 where m.trial_id = t.id and n.name = $2 order by m.step desc limit 1)
         from trials t
         where t.experiment_id = $1 and t.state in ('succeeded', 'failed', 'pruned')
         order by t.ordinal",
    )
    .bind(experiment.0)
    .bind(metric)
    .fetch_all(&mut *tx)
    .await?;
    let history: Vec<Observation> = finished
        .into_iter()
        .map(|(params, state, value)| {
            Observation::new(spec.swept(&params), value.filter(|_| state == "succeeded"), maximize)
        })
        .collect();
    let domains = spec.domains();
    let seed = budget.seed.unwrap_or(0);
    for k in 0..owed {
        let ordinal = (total + k) as usize;
        let point = tpe::propose(&domains, &history, seed, ordinal);
        // A proposal the family refuses is kept as a failed trial, so the search goes on.
        let (params, steps, error, fuse_key) = match ablate_experiments::sweep::plan_point(&spec, point.clone()) {
            Ok(planned) => (planned.params, planned.total_steps as i64, None, planned.fuse_key),
            Err(e) => (Value::Object(point), 0, Some(e.to_string()), None),
        };
        sqlx::query(
            "insert into trials (id, experiment_id, ordinal, params, total_steps, state, error, finished_at, fuse_key)
             values ($1, $2, $3, $4, $5, case when $6::text is null then 'pending' else 'failed' end, $6,
                     case when $6::text is null then null else now() end, $7)",
        )
        .bind(TrialId::new_random().0)
        .bind(experiment.0)
        .bind(ordinal as i32)
        .bind(&params)
        .bind(steps)
        .bind(error)
        .bind(fuse_key)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(owed as usize)
}

/// [`top_up`] for the experiment of `trial`, when it is a tpe experiment.
pub async fn top_up_after(conn: &mut PgConnection, trial: TrialId) -> Result<usize> {
    let experiment: Option<uuid::Uuid> = sqlx::query_scalar(
        "select e.id from trials t join experiments e on e.id = t.experiment_id
         where t.id = $1 and e.searcher = 'tpe'",
    )
    .bind(trial.0)
    .fetch_optional(&mut *conn)
    .await?;
    match experiment {
        Some(id) => top_up(conn, ExperimentId(id)).await,
        None => Ok(0),
    }
}

/// [`top_up`] for every tpe experiment still owed trials (the reaper's pass: a trial that
/// failed for good when its lease expired finished without a completion).
pub async fn top_up_all(pool: &PgPool) -> Result<usize> {
    let owed: Vec<uuid::Uuid> = sqlx::query_scalar(
        "select e.id from experiments e
         where e.searcher = 'tpe' and e.cancelled_at is null
           and (select count(*) from trials t where t.experiment_id = e.id) < (e.spec #>> '{sweep,tpe,trials}')::int",
    )
    .fetch_all(pool)
    .await?;
    let mut added = 0;
    for id in owed {
        let mut conn = pool.acquire().await?;
        added += top_up(&mut conn, ExperimentId(id)).await?;
    }
    Ok(added)
}
