//! The reads behind the web dashboard's JSON API (`/api/v1`), through the
//! public views in schema `ablate`. PostgreSQL builds the JSON; curves come
//! back as points for the coordinator to reduce.

use ablate_schema::{ExperimentId, TrialId};
use serde_json::Value;
use sqlx::postgres::PgPool;

use super::experiments::not_found;
use crate::error::{Error, Result};

/// What the experiments page may filter by.
#[derive(Debug, Default)]
pub struct ExperimentFilter {
    pub state: Option<String>,
    pub family: Option<String>,
    /// A part of the name, any case.
    pub name: Option<String>,
    /// One of its tags.
    pub tag: Option<String>,
    pub limit: u32,
}

/// Experiments, newest first: counts by state, the best objective so far, who
/// submitted, when (nothing that changes unless the experiment does, so an
/// unchanged list keeps its ETag).
pub async fn dashboard_experiments(pool: &PgPool, filter: &ExperimentFilter) -> Result<Value> {
    Ok(sqlx::query_scalar(
        "select coalesce(json_agg(x order by x.created_at desc), '[]'::json) from (
             select e.experiment_id as id, e.name, e.family, e.state, e.trials, e.pending, e.running,
                    e.succeeded, e.failed, e.pruned, e.cancelled, e.objective_metric, e.goal,
                    e.submitted_by, e.created_at, e.tags, e.note, e.reused,
                    (select case when e.goal = 'maximize' then max(r.objective) else min(r.objective) end
                     from ablate.trial_results r
                     where r.experiment_id = e.experiment_id and r.state = 'succeeded' and r.feasible) as best
             from ablate.experiments e
             where ($1::text is null or e.state = $1)
               and ($2::text is null or e.family = $2)
               and ($3::text is null or strpos(lower(e.name), lower($3)) > 0)
               and ($5::text is null or e.tags @> array[$5::text])
             order by e.created_at desc
             limit $4
         ) x",
    )
    .bind(&filter.state)
    .bind(&filter.family)
    .bind(&filter.name)
    .bind(filter.limit as i64)
    .bind(&filter.tag)
    .fetch_one(pool)
    .await?)
}

/// One experiment: its row, spec, swept parameters, metric names, recent failures and,
/// with several objectives (`also`), the ordinals of its Pareto front.
pub async fn dashboard_experiment(pool: &PgPool, id: ExperimentId) -> Result<Value> {
    let row: Option<Value> = sqlx::query_scalar(
        "select json_build_object(
             'id', e.experiment_id, 'name', e.name, 'family', e.family, 'state', e.state,
             'trials', e.trials, 'pending', e.pending, 'running', e.running, 'succeeded', e.succeeded,
             'failed', e.failed, 'pruned', e.pruned, 'cancelled', e.cancelled,
             'objective_metric', e.objective_metric, 'goal', e.goal, 'submitted_by', e.submitted_by,
             'created_at', e.created_at, 'spec_text', x.spec_text,
             'tags', e.tags, 'note', e.note, 'reused', e.reused, 'keep_checkpoints', e.keep_checkpoints,
             'extended_at', e.extended_at,
             'also', x.spec -> 'objective' -> 'also',
             'pareto', case when x.spec -> 'objective' -> 'also' is not null then
                 (select coalesce(json_agg(p.ordinal order by p.ordinal), '[]'::json)
                  from ablate.pareto p where p.experiment_id = e.experiment_id) end,
             'params', (select coalesce(json_agg(k order by k), '[]'::json)
                        from (select distinct jsonb_object_keys(t.params) as k
                              from trials t where t.experiment_id = e.experiment_id) keys),
             'failures', (select coalesce(json_agg(f order by f.finished_at desc), '[]'::json)
                          from (select a.trial_id, a.ordinal, a.attempt, a.outcome, a.error, a.stderr_tail,
                                       a.finished_at, a.host
                                from ablate.trial_attempts a
                                where a.experiment_id = e.experiment_id and a.outcome in ('failed', 'crashed')
                                order by a.finished_at desc limit 50) f))
         from ablate.experiments e join experiments x on x.id = e.experiment_id
         where e.experiment_id = $1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await?;
    let mut experiment = row.ok_or_else(|| not_found(id))?;
    experiment["metrics"] = metric_names(pool, TrialScope::Experiment(id)).await?.into();
    Ok(experiment)
}

/// Every trial of an experiment in order: parameters, state, objective,
/// attempts, final metrics; a JSON array as PostgreSQL wrote it (a 10,000-trial
/// table is megabytes, passed on as they are).
pub async fn dashboard_trials(pool: &PgPool, id: ExperimentId) -> Result<String> {
    Ok(sqlx::query_scalar(
        "select coalesce(json_agg(json_build_object(
                    'id', r.trial_id, 'ordinal', r.ordinal, 'state', r.state, 'params', r.params,
                    'objective', r.objective, 'attempts', r.attempt, 'metrics', r.metrics, 'error', r.error,
                    'started_at', r.started_at, 'finished_at', r.finished_at, 'reused_from', r.reused_from,
                    'feasible', r.feasible)
                order by r.ordinal), '[]'::json)::text
         from ablate.trial_results r where r.experiment_id = $1",
    )
    .bind(id.0)
    .fetch_one(pool)
    .await?)
}

/// The `k` trials whose curves the experiment page draws first: the best by
/// objective (succeeded, then running), then the rest in order.
pub async fn top_trials(pool: &PgPool, id: ExperimentId, k: u32) -> Result<Vec<TrialId>> {
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "select r.trial_id from ablate.trial_results r join experiments e on e.id = r.experiment_id
         where r.experiment_id = $1 and r.state in ('succeeded', 'running', 'failed', 'pruned')
         order by (r.objective is null), (r.state <> 'succeeded'), (not r.feasible),
                  case when e.goal = 'maximize' then -r.objective else r.objective end, r.ordinal
         limit $2",
    )
    .bind(id.0)
    .bind(k as i64)
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(TrialId).collect())
}

/// The ordinals of those of `trials` that belong to `experiment` (to any, when `None`).
pub async fn trial_ordinals(
    pool: &PgPool,
    experiment: Option<ExperimentId>,
    trials: &[TrialId],
) -> Result<Vec<(uuid::Uuid, i32)>> {
    let ids: Vec<uuid::Uuid> = trials.iter().map(|t| t.0).collect();
    Ok(
        sqlx::query_as(
            "select id, ordinal from trials where id = any($1) and ($2::uuid is null or experiment_id = $2)",
        )
        .bind(&ids)
        .bind(experiment.map(|e| e.0))
        .fetch_all(pool)
        .await?,
    )
}

/// Each of `trials`' curve of metric `name`, by trial then step: its points
/// when its chunks hold no more than `full` of them, else the chunks'
/// downsampled copies (each bucket's first, lowest, highest and last point),
/// so the rows read do not grow with the curve; with the points not yet moved
/// into chunks. Also each trial's count of points.
pub async fn curve_points(
    pool: &PgPool,
    trials: &[uuid::Uuid],
    name: &str,
    full: usize,
) -> Result<(Vec<(uuid::Uuid, i64, f64)>, Vec<(uuid::Uuid, i64)>)> {
    let points = sqlx::query_as(
        "select t.id, c.step, c.value
         from trials t
         cross join lateral metric_curve(coalesce(t.reused_from, t.id),
                                         (select id from metric_names where name = $2), $3) c
         where t.id = any($1)
         order by t.id, c.step",
    )
    .bind(trials)
    .bind(name)
    .bind(full as i32)
    .fetch_all(pool)
    .await?;
    let totals = sqlx::query_as(
        "with n as (select id from metric_names where name = $2)
         select t.id,
                coalesce((select sum(c.n) from metric_chunks c, n
                          where c.trial_id = coalesce(t.reused_from, t.id) and c.name_id = n.id), 0)::int8
                + (select count(*) from metrics m, n
                   where m.trial_id = coalesce(t.reused_from, t.id) and m.name_id = n.id)
         from trials t where t.id = any($1)",
    )
    .bind(trials)
    .bind(name)
    .fetch_all(pool)
    .await?;
    Ok((points, totals))
}

/// One trial: its result row with the experiment's name, attempts with
/// outcomes and where they ran, checkpoints with their object paths, metric names.
pub async fn dashboard_trial(pool: &PgPool, id: TrialId) -> Result<Value> {
    let row: Option<Value> = sqlx::query_scalar(
        "select json_build_object(
             'id', r.trial_id, 'experiment_id', r.experiment_id, 'experiment', r.experiment,
             'ordinal', r.ordinal, 'state', r.state, 'params', r.params, 'metrics', r.metrics,
             'objective', r.objective, 'attempts', r.attempt, 'error', r.error,
             'started_at', r.started_at, 'finished_at', r.finished_at, 'reused_from', r.reused_from,
             'feasible', r.feasible,
             'attempt_log', (select coalesce(json_agg(a order by a.attempt), '[]'::json)
                             from (select attempt, worker_id, outcome, error, stderr_tail, finished_at,
                                          host, device, device_name, ablate_version, git_commit
                                   from ablate.trial_attempts where trial_id = r.trial_id) a),
             'checkpoints', (select coalesce(json_agg(c order by c.step), '[]'::json)
                             from (select step, path, bytes, attempt, created_at
                                   from ablate.checkpoints where trial_id = r.trial_id) c))
         from ablate.trial_results r where r.trial_id = $1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await?;
    let mut trial = row.ok_or_else(|| Error::NotFound(format!("no trial {id}")))?;
    trial["metric_names"] = metric_names(pool, TrialScope::Trial(id)).await?.into();
    Ok(trial)
}

enum TrialScope {
    Experiment(ExperimentId),
    Trial(TrialId),
}

/// The names of the metrics recorded for a trial, or for an experiment's
/// first 20 trials that have any: a loose index scan, a few probes per name
/// however long the curves are.
async fn metric_names(pool: &PgPool, scope: TrialScope) -> Result<Vec<String>> {
    let (experiment, trial) = match scope {
        TrialScope::Experiment(e) => (Some(e.0), None),
        TrialScope::Trial(t) => (None, Some(t.0)),
    };
    Ok(sqlx::query_scalar(
        "with recursive chosen as (
             select coalesce(reused_from, id) as id from trials
             where ($1::uuid is not null and experiment_id = $1 and state <> 'pending') or id = $2
             order by ordinal limit 20
         ),
         names as (select distinct metric_name_ids(c.id) as name_id from chosen c)
         select mn.name from names n join metric_names mn on mn.id = n.name_id order by mn.name",
    )
    .bind(experiment)
    .bind(trial)
    .fetch_all(pool)
    .await?)
}

/// The trials running now, by worker: (worker, trial, experiment, experiment name).
pub async fn running_by_worker(pool: &PgPool) -> Result<Vec<(uuid::Uuid, uuid::Uuid, uuid::Uuid, String)>> {
    Ok(sqlx::query_as(
        "select t.lease_owner, t.id, t.experiment_id, e.name
         from trials t join experiments e on e.id = t.experiment_id
         where t.state = 'running' and t.lease_owner is not null
         order by e.name, t.ordinal",
    )
    .fetch_all(pool)
    .await?)
}
