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
/// The trial row is locked `for key share`, so the compactor (which locks it
/// `for update`) never moves points while a batch is being written, and a
/// point at or below the trial's seal (already in a chunk: a replay of a
/// durable batch) is left out. Returns the points written.
pub async fn insert_metrics(
    pool: &PgPool,
    trial: TrialId,
    token: LeaseToken,
    name_ids: &[i32],
    steps: &[i64],
    values: &[f64],
) -> Result<u64> {
    let (held, written): (i64, i64) = sqlx::query_as(
        "with t as (
             select id, metrics_sealed from trials
             where id = $1 and lease_token = $2 and state = 'running'
             for key share
         ),
         written as (
             insert into metrics (trial_id, name_id, step, value)
             select t.id, u.name_id, u.step, u.value
             from t, unnest($3::int4[], $4::int8[], $5::float8[]) as u(name_id, step, value)
             where t.metrics_sealed is null or u.step > t.metrics_sealed
             on conflict (trial_id, name_id, step) do update
             set value = excluded.value, recorded_at = now()
             returning 1
         )
         select (select count(*) from t), (select count(*) from written)",
    )
    .bind(trial.0)
    .bind(token.0)
    .bind(name_ids)
    .bind(steps)
    .bind(values)
    .fetch_one(pool)
    .await?;
    if held == 0 && !steps.is_empty() {
        return Err(Error::StaleLease {
            trial: trial.to_string(),
        });
    }
    Ok(written as u64)
}

/// The most points one chunk holds, and the buckets of its downsampled copy.
pub const CHUNK_POINTS: usize = 16_384;
const CHUNK_BUCKETS: usize = 256;

/// One trial's metric points, moved or to be moved into chunks.
pub struct Points {
    pub name_id: i32,
    pub steps: Vec<i64>,
    pub values: Vec<f64>,
    /// Microseconds since the Unix epoch.
    pub recorded_us: Vec<i64>,
}

/// A chunk as `metric_chunks` stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub name_id: i32,
    pub step_lo: i64,
    pub step_hi: i64,
    /// `None` when the steps are `step_lo, step_lo + stride, ...`.
    pub steps: Option<Vec<i64>>,
    pub stride: i64,
    pub values: Vec<f64>,
    pub recorded_lo: i64,
    pub recorded_us: Vec<i64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub last: f64,
    pub ds_steps: Vec<i64>,
    pub ds_values: Vec<f64>,
}

/// Cuts one metric's points (in step order) into chunks of at most
/// [`CHUNK_POINTS`], each with its summary and its downsampled copy: per
/// bucket its first, lowest, highest and last point (NaN is never the lowest
/// or highest), so a drawn curve keeps every spike.
pub fn chunks_of(points: &Points) -> Vec<Chunk> {
    let n = points.steps.len();
    let mut out = Vec::with_capacity(n.div_ceil(CHUNK_POINTS));
    let mut lo = 0;
    while lo < n {
        let hi = (lo + CHUNK_POINTS).min(n);
        let steps = &points.steps[lo..hi];
        let values = &points.values[lo..hi];
        let recorded = &points.recorded_us[lo..hi];
        let stride = if steps.len() > 1 { steps[1] - steps[0] } else { 1 };
        let regular = stride > 0 && steps.windows(2).all(|w| w[1] - w[0] == stride);
        let finite = values.iter().copied().filter(|v| !v.is_nan());
        let min = finite.clone().reduce(f64::min);
        let max = finite.reduce(f64::max);
        let recorded_lo = recorded.iter().copied().min().unwrap_or(0);
        let keep = downsample(values, CHUNK_BUCKETS);
        out.push(Chunk {
            name_id: points.name_id,
            step_lo: steps[0],
            step_hi: steps[steps.len() - 1],
            steps: (!regular).then(|| steps.to_vec()),
            stride: if regular { stride } else { 1 },
            values: values.to_vec(),
            recorded_lo,
            recorded_us: recorded.iter().map(|r| r - recorded_lo).collect(),
            min,
            max,
            last: values[values.len() - 1],
            ds_steps: keep.iter().map(|&i| steps[i]).collect(),
            ds_values: keep.iter().map(|&i| values[i]).collect(),
        });
        lo = hi;
    }
    out
}

/// The indexes kept of `values` in `buckets` buckets: each bucket's first,
/// lowest, highest and last, in order; every index when there are few.
fn downsample(values: &[f64], buckets: usize) -> Vec<usize> {
    let n = values.len();
    if n <= buckets * 4 {
        return (0..n).collect();
    }
    let mut keep = Vec::with_capacity(buckets * 4);
    for b in 0..buckets {
        let (lo, hi) = (b * n / buckets, (b + 1) * n / buckets);
        let mut low: Option<usize> = None;
        let mut high: Option<usize> = None;
        for i in lo..hi {
            if values[i].is_nan() {
                continue;
            }
            if low.is_none_or(|l| values[i] < values[l]) {
                low = Some(i);
            }
            if high.is_none_or(|h| values[i] > values[h]) {
                high = Some(i);
            }
        }
        let mut picked: Vec<usize> = [Some(lo), low, high, Some(hi - 1)].into_iter().flatten().collect();
        picked.sort_unstable();
        picked.dedup();
        keep.extend(picked);
    }
    keep
}

/// How far a trial's points may move into chunks, decided under its row lock.
pub enum Seal {
    /// A finished trial: every point.
    All,
    /// A running trial: the points before its newest checkpoint (durable, and
    /// below where a new attempt resumes).
    BeforeCheckpoint { min_points: i64 },
}

/// Moves a trial's points into chunks in one transaction: the trial row
/// locked `for update` (no batch is being written), its rows up to the seal
/// read, written as chunks and deleted, the seal raised. Returns the points
/// moved; none when the trial is not in the state `seal` is for.
pub async fn compact_trial(pool: &PgPool, trial: uuid::Uuid, seal: &Seal) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
        "select t.state, t.metrics_sealed,
                (select max(c.step) from checkpoints c where c.trial_id = t.id)
         from trials t where t.id = $1 for update",
    )
    .bind(trial)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((state, sealed, checkpoint)) = row else {
        return Ok(0);
    };
    let upto = match seal {
        Seal::All if matches!(state.as_str(), "succeeded" | "failed" | "pruned" | "cancelled") => i64::MAX,
        Seal::BeforeCheckpoint { .. } if state == "running" => match checkpoint {
            Some(step) if step > sealed.unwrap_or(i64::MIN).saturating_add(1) => step - 1,
            _ => return Ok(0),
        },
        _ => {
            sqlx::query("update trials set metrics_due = false where id = $1 and metrics_due")
                .bind(trial)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(0);
        }
    };
    if let Seal::BeforeCheckpoint { min_points } = seal {
        let enough: bool = sqlx::query_scalar(
            "select count(*) >= $3 from (select 1 from metrics where trial_id = $1 and step <= $2 limit $3) m",
        )
        .bind(trial)
        .bind(upto)
        .bind(min_points)
        .fetch_one(&mut *tx)
        .await?;
        if !enough {
            return Ok(0);
        }
    }
    let rows: Vec<(i32, i64, f64, i64)> = sqlx::query_as(
        "select name_id, step, value, (extract(epoch from recorded_at) * 1000000)::int8
         from metrics where trial_id = $1 and step <= $2 order by name_id, step",
    )
    .bind(trial)
    .bind(upto)
    .fetch_all(&mut *tx)
    .await?;
    let moved = rows.len() as u64;
    let mut highest = sealed;
    let mut start = 0;
    while start < rows.len() {
        let name_id = rows[start].0;
        let end = start + rows[start..].iter().take_while(|r| r.0 == name_id).count();
        let points = Points {
            name_id,
            steps: rows[start..end].iter().map(|r| r.1).collect(),
            values: rows[start..end].iter().map(|r| r.2).collect(),
            recorded_us: rows[start..end].iter().map(|r| r.3).collect(),
        };
        highest = highest.max(points.steps.last().copied());
        for chunk in chunks_of(&points) {
            insert_chunk(&mut tx, trial, &chunk).await?;
        }
        start = end;
    }
    if moved > 0 {
        sqlx::query("delete from metrics where trial_id = $1 and step <= $2")
            .bind(trial)
            .bind(upto)
            .execute(&mut *tx)
            .await?;
    }
    let sealed = match seal {
        Seal::All => highest,
        Seal::BeforeCheckpoint { .. } => Some(upto),
    };
    sqlx::query("update trials set metrics_sealed = $2, metrics_due = false where id = $1")
        .bind(trial)
        .bind(sealed)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(moved)
}

async fn insert_chunk(tx: &mut sqlx::PgConnection, trial: uuid::Uuid, c: &Chunk) -> Result<()> {
    sqlx::query(
        "insert into metric_chunks (trial_id, name_id, step_lo, step_hi, n, steps, stride, vals,
                                    recorded_lo, recorded_us, v_min, v_max, v_last, ds_steps, ds_vals)
         values ($1, $2, $3, $4, $5, $6, $7, $8,
                 timestamptz 'epoch' + $9 * interval '1 microsecond', $10, $11, $12, $13, $14, $15)",
    )
    .bind(trial)
    .bind(c.name_id)
    .bind(c.step_lo)
    .bind(c.step_hi)
    .bind(c.values.len() as i32)
    .bind(&c.steps)
    .bind(c.stride)
    .bind(&c.values)
    .bind(c.recorded_lo)
    .bind(&c.recorded_us)
    .bind(c.min)
    .bind(c.max)
    .bind(c.last)
    .bind(&c.ds_steps)
    .bind(&c.ds_values)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Finished trials whose points wait to move, oldest first.
pub async fn trials_due(pool: &PgPool, limit: i64) -> Result<Vec<uuid::Uuid>> {
    Ok(
        sqlx::query_scalar("select id from trials where metrics_due order by finished_at nulls first limit $1")
            .bind(limit)
            .fetch_all(pool)
            .await?,
    )
}

/// Running trials with a checkpoint past their seal: their points before it may move.
pub async fn running_past_seal(pool: &PgPool) -> Result<Vec<uuid::Uuid>> {
    Ok(sqlx::query_scalar(
        "select t.id from trials t
         where t.state = 'running'
           and (select max(c.step) from checkpoints c where c.trial_id = t.id) > coalesce(t.metrics_sealed + 1, -1)",
    )
    .fetch_all(pool)
    .await?)
}
