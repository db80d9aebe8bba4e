//! Metric ingest and the compact store: interned names; a batch written as one
//! chunk per metric, fenced by the lease (merged with the chunks it overlaps,
//! its points replacing theirs at the same steps); the compactor's merges.

use std::collections::BTreeMap;

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

/// Writes one batch of metric points, fenced by the lease: point i is
/// (`name_ids[i]`, `steps[i]`, `values[i]`); the same (name, step) twice, the
/// later wins. Each metric's points become one chunk (`metric_chunks`), written
/// in one statement under the trial row locked `for key share` when they
/// overlap no chunk; else merged with the chunks they overlap under the row
/// locked `for update`, the batch's points replacing theirs at the same steps,
/// so a replay or a new attempt logging again never duplicates a point.
/// Returns the points written.
pub async fn insert_metrics(
    pool: &PgPool,
    trial: TrialId,
    token: LeaseToken,
    name_ids: &[i32],
    steps: &[i64],
    values: &[f64],
) -> Result<u64> {
    let batch = by_metric(name_ids, steps, values);
    if batch.is_empty() {
        return Ok(0);
    }
    let mut cols = ChunkColumns::default();
    for points in batch.values() {
        for chunk in chunks_of(points) {
            cols.push(&chunk, &points.steps[chunk_range(points, &chunk)]);
        }
    }
    let (held, clashes, written, chunks): (i64, i64, i64, i64) = sqlx::query_as(
        "with t as (
             select id from trials
             where id = $1 and lease_token = $2 and state = 'running'
             for key share
         ),
         c as (
             select * from unnest($3::int4[], $4::int8[], $5::int8[], $6::int4[], $7::int8[], $8::bool[],
                                  $9::int4[], $10::float8[], $11::float8[], $12::float8[])
                 as c(name_id, step_lo, step_hi, n, stride, regular, v_off, v_min, v_max, v_last)
         ),
         clash as (
             select 1 from t, c, metric_chunks m
             where m.trial_id = t.id and m.name_id = c.name_id and m.step_lo <= c.step_hi and m.step_hi >= c.step_lo
             limit 1
         ),
         written as (
             insert into metric_chunks (trial_id, name_id, step_lo, step_hi, n, steps, stride, vals,
                                        recorded_lo, recorded_us, v_min, v_max, v_last)
             select t.id, c.name_id, c.step_lo, c.step_hi, c.n,
                    case when c.regular then null else ($13::int8[])[c.v_off:c.v_off + c.n - 1] end,
                    c.stride, ($14::float8[])[c.v_off:c.v_off + c.n - 1],
                    now(), array_fill(0::int8, array[c.n]), c.v_min, c.v_max, c.v_last
             from t, c
             where not exists (select 1 from clash)
             on conflict (trial_id, name_id, step_lo) do nothing
             returning n
         )
         select (select count(*) from t), (select count(*) from clash),
                coalesce((select sum(n) from written), 0)::int8, (select count(*) from written)",
    )
    .bind(trial.0)
    .bind(token.0)
    .bind(&cols.name_id)
    .bind(&cols.step_lo)
    .bind(&cols.step_hi)
    .bind(&cols.n)
    .bind(&cols.stride)
    .bind(&cols.regular)
    .bind(&cols.v_off)
    .bind(&cols.v_min)
    .bind(&cols.v_max)
    .bind(&cols.v_last)
    .bind(&cols.steps)
    .bind(&cols.values)
    .fetch_one(pool)
    .await?;
    if held == 0 {
        return Err(Error::StaleLease {
            trial: trial.to_string(),
        });
    }
    if clashes == 0 && chunks as usize == cols.name_id.len() {
        return Ok(written as u64);
    }
    merge_batch(pool, trial, token, batch).await
}

/// A batch's points per metric, in step order, the later of equal steps kept.
fn by_metric(name_ids: &[i32], steps: &[i64], values: &[f64]) -> BTreeMap<i32, Points> {
    let mut latest: BTreeMap<i32, BTreeMap<i64, (f64, i64)>> = BTreeMap::new();
    for ((&name, &step), &value) in name_ids.iter().zip(steps).zip(values) {
        latest.entry(name).or_default().insert(step, (value, 0));
    }
    latest
        .into_iter()
        .map(|(name, points)| (name, Points::from_steps(name, points)))
        .collect()
}

/// Where `chunk`'s points lie in `points` (chunks are cut in order).
fn chunk_range(points: &Points, chunk: &Chunk) -> std::ops::Range<usize> {
    let start = points.steps.partition_point(|&s| s < chunk.step_lo);
    start..start + chunk.values.len()
}

/// Chunks as the columns of one insert: per chunk its fields and where its
/// points lie in the flat arrays (1-based, as SQL slices).
#[derive(Default)]
struct ChunkColumns {
    name_id: Vec<i32>,
    step_lo: Vec<i64>,
    step_hi: Vec<i64>,
    n: Vec<i32>,
    stride: Vec<i64>,
    regular: Vec<bool>,
    v_off: Vec<i32>,
    v_min: Vec<Option<f64>>,
    v_max: Vec<Option<f64>>,
    v_last: Vec<f64>,
    steps: Vec<i64>,
    values: Vec<f64>,
}

impl ChunkColumns {
    fn push(&mut self, c: &Chunk, steps: &[i64]) {
        self.name_id.push(c.name_id);
        self.step_lo.push(c.step_lo);
        self.step_hi.push(c.step_hi);
        self.n.push(c.values.len() as i32);
        self.stride.push(c.stride);
        self.regular.push(c.steps.is_none());
        self.v_off.push(self.values.len() as i32 + 1);
        self.steps.extend_from_slice(steps);
        self.values.extend_from_slice(&c.values);
        self.v_min.push(c.min);
        self.v_max.push(c.max);
        self.v_last.push(c.last);
    }
}

/// The slow path of a batch that overlaps chunks: under the trial row locked
/// `for update`, each metric's overlapping chunks read, the batch's points put
/// in place of theirs at the same steps, and the result written as new chunks.
async fn merge_batch(pool: &PgPool, trial: TrialId, token: LeaseToken, batch: BTreeMap<i32, Points>) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let now: Option<i64> = sqlx::query_scalar(
        "select (extract(epoch from now()) * 1000000)::int8 from trials
         where id = $1 and lease_token = $2 and state = 'running' for update",
    )
    .bind(trial.0)
    .bind(token.0)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(now) = now else {
        return Err(Error::StaleLease {
            trial: trial.to_string(),
        });
    };
    let mut written = 0;
    for (name, mut new) in batch {
        let (lo, hi) = (new.steps[0], new.steps[new.steps.len() - 1]);
        new.recorded_us = vec![now; new.steps.len()];
        let old = read_points(&mut tx, trial.0, Some(name), Some((lo, hi))).await?;
        let merged = match old.into_values().next() {
            Some(old) => overwrite(old, new),
            None => new,
        };
        delete_points(&mut tx, trial.0, Some(name), Some((lo, hi))).await?;
        sqlx::query("delete from metric_curves where trial_id = $1 and name_id = $2")
            .bind(trial.0)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        for chunk in chunks_of(&merged) {
            insert_chunk(&mut tx, trial.0, &chunk).await?;
        }
        written += merged.steps.len() as u64;
    }
    tx.commit().await?;
    Ok(written)
}

/// `old`'s points with `new`'s put in, `new` winning at equal steps.
fn overwrite(old: Points, new: Points) -> Points {
    let name_id = new.name_id;
    let mut all: BTreeMap<i64, (f64, i64)> = BTreeMap::new();
    for points in [old, new] {
        for i in 0..points.steps.len() {
            all.insert(points.steps[i], (points.values[i], points.recorded_us[i]));
        }
    }
    Points::from_steps(name_id, all)
}

/// A trial's points in chunks (those of `name`, or every metric's; those of
/// chunks overlapping `range`, or all) and in rows, per metric in step order,
/// with the time each was recorded (microseconds since the epoch).
async fn read_points(
    tx: &mut sqlx::PgConnection,
    trial: uuid::Uuid,
    name: Option<i32>,
    range: Option<(i64, i64)>,
) -> Result<BTreeMap<i32, Points>> {
    let (lo, hi) = range.unwrap_or((i64::MIN, i64::MAX));
    let chunks: Vec<StoredChunk> = sqlx::query_as(
        "select c.name_id, c.step_lo, c.stride, c.steps, c.vals,
                (extract(epoch from c.recorded_lo) * 1000000)::int8, c.recorded_us
         from metric_chunks c
         where c.trial_id = $1 and ($2::int4 is null or c.name_id = $2) and c.step_lo <= $4 and c.step_hi >= $3
         order by c.name_id, c.step_lo",
    )
    .bind(trial)
    .bind(name)
    .bind(lo)
    .bind(hi)
    .fetch_all(&mut *tx)
    .await?;
    let rows: Vec<(i32, i64, f64, i64)> = sqlx::query_as(
        "select m.name_id, m.step, m.value, (extract(epoch from m.recorded_at) * 1000000)::int8
         from metrics m
         where m.trial_id = $1 and ($2::int4 is null or m.name_id = $2) and m.step between $3 and $4
         order by 1, 2",
    )
    .bind(trial)
    .bind(name)
    .bind(lo)
    .bind(hi)
    .fetch_all(&mut *tx)
    .await?;
    let mut all: BTreeMap<i32, BTreeMap<i64, (f64, i64)>> = BTreeMap::new();
    for (name, step_lo, stride, steps, values, recorded_lo, recorded_us) in chunks {
        let points = all.entry(name).or_default();
        for (i, value) in values.into_iter().enumerate() {
            let step = steps.as_ref().map_or(step_lo + i as i64 * stride, |s| s[i]);
            points.insert(step, (value, recorded_lo + recorded_us.get(i).copied().unwrap_or(0)));
        }
    }
    // A row and a chunk at one step (rows written straight into `metrics`): the row wins.
    for (name, step, value, recorded) in rows {
        all.entry(name).or_default().insert(step, (value, recorded));
    }
    Ok(all
        .into_iter()
        .map(|(name, points)| (name, Points::from_steps(name, points)))
        .collect())
}

/// A chunk as read back: name, first step, stride, steps (irregular), values,
/// when its first point was recorded and the others' offsets (microseconds).
type StoredChunk = (i32, i64, i64, Option<Vec<i64>>, Vec<f64>, i64, Vec<i64>);

/// Deletes what [`read_points`] read.
async fn delete_points(
    tx: &mut sqlx::PgConnection,
    trial: uuid::Uuid,
    name: Option<i32>,
    range: Option<(i64, i64)>,
) -> Result<()> {
    let (lo, hi) = range.unwrap_or((i64::MIN, i64::MAX));
    sqlx::query(
        "delete from metric_chunks c
         where c.trial_id = $1 and ($2::int4 is null or c.name_id = $2) and c.step_lo <= $4 and c.step_hi >= $3",
    )
    .bind(trial)
    .bind(name)
    .bind(lo)
    .bind(hi)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "delete from metrics m where m.trial_id = $1 and ($2::int4 is null or m.name_id = $2) and m.step between $3 and $4",
    )
    .bind(trial)
    .bind(name)
    .bind(lo)
    .bind(hi)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The most points one chunk holds.
pub const CHUNK_POINTS: usize = 16_384;
/// The buckets of a finished curve's downsampled copy (each keeps up to 4 points).
pub const CURVE_BUCKETS: usize = 256;
/// Chunks smaller than this on average are rewritten into larger ones.
pub const SMALL_CHUNK: i64 = 256;

/// A curve's downsampled copy when it has more than 4 points a bucket: per
/// bucket its first, lowest, highest and last point, so a drawn curve keeps
/// every spike.
pub fn downsampled(points: &Points) -> Option<(Vec<i64>, Vec<f64>)> {
    (points.values.len() > CURVE_BUCKETS * 4).then(|| {
        let keep = downsample(&points.values, CURVE_BUCKETS);
        (
            keep.iter().map(|&i| points.steps[i]).collect(),
            keep.iter().map(|&i| points.values[i]).collect(),
        )
    })
}

/// One trial's metric points, moved or to be moved into chunks.
pub struct Points {
    pub name_id: i32,
    pub steps: Vec<i64>,
    pub values: Vec<f64>,
    /// Microseconds since the Unix epoch.
    pub recorded_us: Vec<i64>,
}

impl Points {
    /// One metric's points from (step -> (value, recorded)), in step order.
    fn from_steps(name_id: i32, points: BTreeMap<i64, (f64, i64)>) -> Points {
        let mut out = Points {
            name_id,
            steps: Vec::with_capacity(points.len()),
            values: Vec::with_capacity(points.len()),
            recorded_us: Vec::with_capacity(points.len()),
        };
        for (step, (value, recorded)) in points {
            out.steps.push(step);
            out.values.push(value);
            out.recorded_us.push(recorded);
        }
        out
    }
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
}

/// Cuts one metric's points (in step order) into chunks of at most
/// [`CHUNK_POINTS`], each with its summary (NaN is never the lowest or highest).
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
        });
        lo = hi;
    }
    out
}

/// The indexes kept of `values` in `buckets` buckets: each bucket's first,
/// lowest, highest and last, in order.
fn downsample(values: &[f64], buckets: usize) -> Vec<usize> {
    let n = values.len();
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

/// What the compactor does to a trial's points.
pub enum Compaction {
    /// A finished trial: rows and small chunks rewritten, long curves' downsampled copies kept.
    Finished,
    /// A running trial: its small chunks that end before its newest checkpoint
    /// rewritten, once they hold `min_points`.
    BeforeCheckpoint { min_points: i64 },
}

/// Compacts a trial in one transaction under its row locked `for update` (no
/// batch is being written): rows of `metrics` and chunks smaller than
/// [`SMALL_CHUNK`] on average rewritten into chunks of up to [`CHUNK_POINTS`];
/// for a finished trial, each curve of more than 1,024 points kept downsampled
/// in `metric_curves`. Returns the points rewritten.
pub async fn compact_trial(pool: &PgPool, trial: uuid::Uuid, how: &Compaction) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, Option<i64>)> = sqlx::query_as(
        "select t.state, (select max(c.step) from checkpoints c where c.trial_id = t.id)
         from trials t where t.id = $1 for update",
    )
    .bind(trial)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((state, checkpoint)) = row else {
        return Ok(0);
    };
    let finished = matches!(state.as_str(), "succeeded" | "failed" | "pruned" | "cancelled");
    match how {
        Compaction::Finished if finished => {}
        Compaction::BeforeCheckpoint { min_points } if state == "running" => {
            let Some(step) = checkpoint else { return Ok(0) };
            // Only chunks that end before the checkpoint: no batch arrives for them but a replay.
            let (points, chunks): (i64, i64) = sqlx::query_as(
                "select coalesce(sum(n), 0)::int8, count(*) from metric_chunks where trial_id = $1 and step_hi < $2",
            )
            .bind(trial)
            .bind(step)
            .fetch_one(&mut *tx)
            .await?;
            if points < *min_points || chunks == 0 || points / chunks >= SMALL_CHUNK {
                return Ok(0);
            }
            // Chunks that straddle the checkpoint are read (and rewritten) whole.
            let points = read_points(&mut tx, trial, None, Some((i64::MIN, step - 1))).await?;
            delete_points(&mut tx, trial, None, Some((i64::MIN, step - 1))).await?;
            let mut moved = 0;
            for merged in points.values() {
                moved += merged.steps.len() as u64;
                for chunk in chunks_of(merged) {
                    insert_chunk(&mut tx, trial, &chunk).await?;
                }
            }
            tx.commit().await?;
            return Ok(moved);
        }
        _ => {
            sqlx::query("update trials set metrics_due = false where id = $1 and metrics_due")
                .bind(trial)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(0);
        }
    }
    let (chunks, points, rows): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from metric_chunks where trial_id = $1),
                (select coalesce(sum(n), 0)::int8 from metric_chunks where trial_id = $1),
                (select count(*) from metrics where trial_id = $1)",
    )
    .bind(trial)
    .fetch_one(&mut *tx)
    .await?;
    let rewrite = rows > 0 || (chunks > 0 && points / chunks < SMALL_CHUNK);
    let all = read_points(&mut tx, trial, None, None).await?;
    let mut moved = 0;
    if rewrite {
        delete_points(&mut tx, trial, None, None).await?;
        for merged in all.values() {
            moved += merged.steps.len() as u64;
            for chunk in chunks_of(merged) {
                insert_chunk(&mut tx, trial, &chunk).await?;
            }
        }
    }
    for (name, merged) in &all {
        if let Some((steps, values)) = downsampled(merged) {
            sqlx::query(
                "insert into metric_curves (trial_id, name_id, points, steps, vals) values ($1, $2, $3, $4, $5)
                 on conflict (trial_id, name_id) do update
                 set points = excluded.points, steps = excluded.steps, vals = excluded.vals",
            )
            .bind(trial)
            .bind(name)
            .bind(merged.steps.len() as i64)
            .bind(&steps)
            .bind(&values)
            .execute(&mut *tx)
            .await?;
        }
    }
    // Its points are final now: so are its final metrics, kept for the readers.
    sqlx::query("update trials set metrics_due = false, final_metrics = trial_final_metrics(id) where id = $1")
        .bind(trial)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(moved)
}

async fn insert_chunk(tx: &mut sqlx::PgConnection, trial: uuid::Uuid, c: &Chunk) -> Result<()> {
    sqlx::query(
        "insert into metric_chunks (trial_id, name_id, step_lo, step_hi, n, steps, stride, vals,
                                    recorded_lo, recorded_us, v_min, v_max, v_last)
         values ($1, $2, $3, $4, $5, $6, $7, $8,
                 timestamptz 'epoch' + $9 * interval '1 microsecond', $10, $11, $12, $13)",
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

/// Running trials with a checkpoint and chunks before it.
pub async fn running_with_chunks(pool: &PgPool) -> Result<Vec<uuid::Uuid>> {
    Ok(sqlx::query_scalar(
        "select t.id from trials t
         where t.state = 'running'
           and exists (select 1 from metric_chunks c where c.trial_id = t.id
                       and c.step_hi < (select max(k.step) from checkpoints k where k.trial_id = t.id))",
    )
    .fetch_all(pool)
    .await?)
}
