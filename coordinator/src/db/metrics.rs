//! Metric ingest: interned names and fenced batches of points.

use ablate_schema::{LeaseToken, TrialId};
use sqlx::postgres::PgPool;

use crate::error::{Error, Result};

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
