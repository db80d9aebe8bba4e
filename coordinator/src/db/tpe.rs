//! The SQL of the searchers that propose with tpe (`tpe`, `bohb`): what an experiment
//! holds and has finished, BOHB's results by rung, and a proposal's insert. The decisions are `platform::searchers`'.

use ablate_schema::{ExperimentId, SweepSpec, TrialId};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};

use super::rungs::stored_spec;
use crate::error::Result;

/// A tpe experiment as its searcher reads it.
#[derive(Debug)]
pub struct TpeExperiment {
    pub spec: SweepSpec,
    pub objective_metric: Option<String>,
    pub maximize: bool,
    pub cancelled: bool,
    /// Trials it holds, and those finished (succeeded, failed or pruned).
    pub total: u64,
    pub finished: u64,
    /// How many of its trials may be in flight at once: its `max_concurrent`, or else
    /// the slots free for it (of the live workers it may run on, those not running
    /// another experiment's trials); `None` when no worker is live.
    pub in_flight: Option<u64>,
}

/// The experiment, when its searcher proposes with tpe (`tpe`, `bohb`).
pub async fn tpe_experiment(tx: &mut PgConnection, experiment: ExperimentId) -> Result<Option<TpeExperiment>> {
    let Some(row) = sqlx::query(
        "select e.spec, e.objective_metric, e.goal, e.cancelled_at is not null as cancelled,
                (select count(*) from trials t where t.experiment_id = e.id) as total,
                (select count(*) from trials t where t.experiment_id = e.id
                   and t.state in ('succeeded', 'failed', 'pruned')) as finished,
                coalesce(e.max_concurrent::int8, (
                    select sum(cardinality(w.devices)
                               - (select count(*) from trials r
                                  where r.lease_owner = w.id and r.state = 'running' and r.experiment_id <> e.id))
                           / greatest(e.gpus_per_trial, 1)
                    from workers w
                    where w.last_seen_at > now() - interval '1 minute' and w.draining_since is null
                      and (e.pool is null or w.pool = e.pool)
                      and (e.labels is null or coalesce(w.labels, '{}'::jsonb) @> e.labels)
                      and (e.command is null or w.allow_commands))::int8) as in_flight
         from experiments e where e.id = $1 and e.searcher in ('tpe', 'bohb')",
    )
    .bind(experiment.0)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(TpeExperiment {
        spec: stored_spec(row.try_get("spec")?)?,
        objective_metric: row.try_get("objective_metric")?,
        maximize: row.try_get::<Option<String>, _>("goal")?.as_deref() == Some("maximize"),
        cancelled: row.try_get("cancelled")?,
        total: row.try_get::<i64, _>("total")? as u64,
        finished: row.try_get::<i64, _>("finished")? as u64,
        in_flight: row.try_get::<Option<i64>, _>("in_flight")?.map(|n| n.max(0) as u64),
    }))
}

/// Every trial, in order: parameters, state, (once finished) its final metrics, and
/// whether it meets the objective's constraints (`trial_feasible`).
pub async fn trials_seen(
    tx: &mut PgConnection,
    experiment: ExperimentId,
) -> Result<Vec<(Value, String, Option<Value>, bool)>> {
    Ok(sqlx::query_as(
        "select t.params, t.state, f.final,
                case when e.spec -> 'objective' -> 'constraints' is null or t.state <> 'succeeded' then true
                     else trial_feasible(f.final, t.outputs, e.spec -> 'objective' -> 'constraints')
                end
         from trials t join experiments e on e.id = t.experiment_id
         cross join lateral (
             select case when t.state in ('succeeded', 'failed', 'pruned')
                         then coalesce(t.final_metrics, trial_final_metrics(coalesce(t.reused_from, t.id))) end as final
             offset 0
         ) f
         where t.experiment_id = $1
         order by t.ordinal",
    )
    .bind(experiment.0)
    .fetch_all(&mut *tx)
    .await?)
}

/// Every configuration of a bohb experiment but the cancelled, in order, as
/// `ablate_experiments::bohb` reads it: its swept values, whether it is pending or
/// running, and its objective (negated when maximized) at each rung it reached and,
/// once succeeded, at the end of its run.
pub async fn bohb_configs(
    tx: &mut PgConnection,
    experiment: ExperimentId,
    spec: &SweepSpec,
    maximize: bool,
) -> Result<Vec<ablate_experiments::bohb::Config>> {
    let rows: Vec<(Value, bool, Value, Option<f64>, i64)> = sqlx::query_as(
        "select t.params, t.state in ('pending', 'running'),
                coalesce((select jsonb_object_agg(r.step::text, r.value) from rungs r
                          where r.trial_id = t.id and r.value is not null), '{}'::jsonb),
                case when t.state = 'succeeded' then
                    (coalesce(t.final_metrics, trial_final_metrics(coalesce(t.reused_from, t.id)))
                        ->> e.objective_metric)::float8
                end,
                t.total_steps
         from trials t join experiments e on e.id = t.experiment_id
         where t.experiment_id = $1 and t.state <> 'cancelled'
         order by t.ordinal",
    )
    .bind(experiment.0)
    .fetch_all(&mut *tx)
    .await?;
    let loss = |v: f64| if maximize { -v } else { v };
    Ok(rows
        .into_iter()
        .map(|(params, in_flight, rungs, last, total_steps)| {
            let mut results: std::collections::BTreeMap<u64, f64> = rungs
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(step, v)| Some((step.parse().ok()?, loss(v.as_f64()?))))
                .collect();
            if let Some(last) = last.filter(|v| v.is_finite()) {
                results.insert(total_steps.max(0) as u64, loss(last));
            }
            ablate_experiments::bohb::Config {
                params: spec.swept(&params),
                in_flight,
                results,
            }
        })
        .collect())
}

/// A searcher's proposal as a trial: pending, or failed with `error` (a proposal its family refused).
pub struct Proposal {
    pub ordinal: usize,
    pub params: Value,
    pub total_steps: u64,
    pub error: Option<String>,
    pub fuse_key: Option<String>,
    /// BOHB: its bracket and first rung.
    pub bracket: Option<i32>,
    pub pause_at: Option<i64>,
}

pub async fn insert_proposal(tx: &mut PgConnection, experiment: ExperimentId, p: &Proposal) -> Result<()> {
    sqlx::query(
        "insert into trials (id, experiment_id, ordinal, params, total_steps, state, error, finished_at, fuse_key,
                             bracket, pause_at)
         values ($1, $2, $3, $4, $5, case when $6::text is null then 'pending' else 'failed' end, $6,
                 case when $6::text is null then null else now() end, $7, $8, $9)",
    )
    .bind(TrialId::new_random().0)
    .bind(experiment.0)
    .bind(p.ordinal as i32)
    .bind(&p.params)
    .bind(p.total_steps as i64)
    .bind(&p.error)
    .bind(&p.fuse_key)
    .bind(p.bracket)
    .bind(p.pause_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The experiment of `trial`, when its searcher proposes with tpe (`tpe`, `bohb`).
pub async fn tpe_experiment_of(conn: &mut PgConnection, trial: TrialId) -> Result<Option<ExperimentId>> {
    let experiment: Option<uuid::Uuid> = sqlx::query_scalar(
        "select e.id from trials t join experiments e on e.id = t.experiment_id
         where t.id = $1 and e.searcher in ('tpe', 'bohb')",
    )
    .bind(trial.0)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(experiment.map(ExperimentId))
}

/// The experiments that propose with tpe, not cancelled, that hold fewer trials than their budget.
pub async fn tpe_experiments_owed(pool: &PgPool) -> Result<Vec<ExperimentId>> {
    let owed: Vec<uuid::Uuid> = sqlx::query_scalar(
        "select e.id from experiments e
         where e.searcher in ('tpe', 'bohb') and e.cancelled_at is null
           and (select count(*) from trials t where t.experiment_id = e.id) < (e.spec #>> '{sweep,tpe,trials}')::int",
    )
    .fetch_all(pool)
    .await?;
    Ok(owed.into_iter().map(ExperimentId).collect())
}
