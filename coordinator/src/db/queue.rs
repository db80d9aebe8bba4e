//! The lease queue: leasing, heartbeats, the reaper, and the fenced writes of a trial's life
//! (checkpoint records, completion).

use std::collections::HashMap;
use std::time::Duration;

use ablate_schema::{ExperimentId, LeaseToken, TrialId, WorkerId};
use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct CheckpointRecord {
    pub step: i64,
    pub path: String,
    pub bytes: i64,
}

#[derive(Debug, Clone)]
pub struct LeasedTrial {
    pub trial: TrialId,
    pub experiment: ExperimentId,
    pub token: LeaseToken,
    pub attempt: i32,
    pub family: String,
    pub params: Value,
    pub resume_from: Option<CheckpointRecord>,
    pub spec_hash: String,
    pub fresh_process: bool,
    /// The experiment's submit span, when traces were on.
    pub traceparent: Option<String>,
    /// GPUs it takes together (`[resources] gpus_per_trial`).
    pub gpus: u32,
    /// The rung it stops at (ASHA, Hyperband); `None`: the end of the run.
    pub pause_at: Option<u64>,
    /// The key it fuses under, and the spec's `fuse`.
    pub fuse_key: Option<String>,
    pub fuse: Option<ablate_schema::Fuse>,
    /// The fused group it runs in: its first member's id; `None`: it runs alone.
    pub fuse_group: Option<TrialId>,
    /// A command trial's `[trial]` table; `None` for a built-in family's trial.
    pub command: Option<Value>,
    /// The SHA-256 of its packed code, when it has code.
    pub code_hash: Option<String>,
}

impl LeasedTrial {
    /// Whether it fuses (`fusion::group`: the spec asks to fuse and it has a key;
    /// members may pause at rungs of their own).
    pub fn fuses(&self) -> bool {
        ablate_experiments::fusion::fuses(self.fuse, self.fuse_key.as_deref())
    }
}

/// Leases pending trials to `worker` in one statement, filling at most `slots`
/// free slots (a trial of N GPUs, `[resources] gpus_per_trial`, fills N, and
/// is leased only when the worker has `free_gpus` >= N), by fair share: each
/// next trial goes to the user, then (among that user's) the experiment, whose
/// slots in use plus those picked so far are fewest for its weight (a user's
/// weight, set by an admin; an experiment's `priority`), ties to the older
/// experiment and the trial's order; an experiment never runs more than its
/// `[resources] max_concurrent` trials. The 64 candidates beyond `slots` are
/// for concurrent lessors, which skip the rows another one locked; rows picked
/// beyond the slots are left pending. Returns them in the order picked; the
/// platform's lease (`platform::lease`) fuses them into groups.
pub async fn lease_heads(
    pool: &PgPool,
    worker: WorkerId,
    slots: u32,
    free_gpus: u32,
    ttl: Duration,
) -> Result<Vec<LeasedTrial>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(lease_statement(false)))
        .bind(worker.0)
        .bind(slots as i64)
        .bind(ttl.as_secs_f64())
        .bind(free_gpus as i32)
        .fetch_all(pool)
        .await?;
    // In the order they were picked (fair share, then each experiment's order).
    let mut heads = rows
        .iter()
        .map(|row| Ok((row.try_get::<i64, _>("used")?, leased_trial(row)?)))
        .collect::<Result<Vec<_>>>()?;
    heads.sort_by_key(|(used, _)| *used);
    Ok(heads.into_iter().map(|(_, head)| head).collect())
}

/// [`lease_heads`] for several workers at once, in one statement: workers of one
/// pool, the same labels and the same permission to run commands, each with at
/// most one free GPU (`platform::lessor` groups them so). The trials are picked
/// as for one worker with all their slots, in the same fair-share order, and
/// dealt out in the order asked: the first worker's slots first. A draining
/// worker gets none. Returns each worker's heads in the order they were picked.
pub async fn lease_heads_many(
    pool: &PgPool,
    asks: &[(WorkerId, u32)],
    ttl: Duration,
) -> Result<Vec<(WorkerId, Vec<LeasedTrial>)>> {
    let workers: Vec<uuid::Uuid> = asks.iter().map(|(w, _)| w.0).collect();
    let slots: Vec<i32> = asks.iter().map(|(_, s)| *s as i32).collect();
    let total: i64 = asks.iter().map(|(_, s)| *s as i64).sum();
    let rows = sqlx::query(sqlx::AssertSqlSafe(lease_statement(true)))
        .bind(&workers)
        .bind(total)
        .bind(ttl.as_secs_f64())
        .bind(1i32)
        .bind(&slots)
        .fetch_all(pool)
        .await?;
    let mut heads: Vec<(uuid::Uuid, i64, LeasedTrial)> = rows
        .iter()
        .map(|row| {
            Ok((
                row.try_get("leased_by")?,
                row.try_get::<i64, _>("used")?,
                leased_trial(row)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    heads.sort_by_key(|(_, used, _)| *used);
    Ok(asks
        .iter()
        .map(|(worker, _)| {
            let mine = heads
                .iter()
                .filter(|(by, _, _)| *by == worker.0)
                .map(|(_, _, head)| head.clone())
                .collect();
            (*worker, mine)
        })
        .collect())
}

/// What makes workers alike for a shared lease: their pool, labels and
/// permission to run commands, as one text per worker.
pub async fn worker_kinds(pool: &PgPool, workers: &[uuid::Uuid]) -> Result<HashMap<uuid::Uuid, String>> {
    let rows: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "select id, concat_ws(' ', coalesce(pool, ''), labels::text, allow_commands::text) from workers where id = any($1)",
    )
    .bind(workers)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The lease statement, for one worker (`$1` a worker, `$2` its slots, `$4` its
/// free GPUs) or for several (`$1` the workers, `$5` each one's slots, `$2` their
/// sum, `$4` 1; the first worker's pool, labels and permissions stand for all).
fn lease_statement(many: bool) -> String {
    let (asked, me, draining, dealt, owner, leased_by) = if many {
        (
            "asked as (
             select a.worker, a.slots, sum(a.slots) over (order by a.i) - a.slots as first
             from unnest($1::uuid[], $5::int4[]) with ordinality as a(worker, slots, i)
             join workers w on w.id = a.worker and w.draining_since is null
         ),
         -- Each asked slot, numbered in the order asked: a trial goes to the worker
         -- whose slot its last one is (an equality join, however many ask).
         asked_slots as (
             select a.worker, n.slot from asked a, generate_series(a.first + 1, a.first + a.slots) as n(slot)
         ),
         ",
            "($1::uuid[])[1]",
            "true",
            "from fits join asked_slots a on a.slot = fits.used, experiments e
         where t.id = fits.id and e.id = t.experiment_id",
            "a.worker",
            "a.worker as leased_by, ",
        )
    } else {
        (
            "",
            "$1",
            "not exists (select 1 from workers w where w.id = $1 and w.draining_since is not null)",
            "from fits, experiments e
         where t.id = fits.id and fits.used <= $2 and e.id = t.experiment_id",
            "$1",
            "",
        )
    };
    let parts = [
            "with recursive {{ASKED}}pending_experiments as (
             (select experiment_id from trials where state = 'pending' order by experiment_id limit 1)
             union all
             select (select t.experiment_id from trials t
                     where t.state = 'pending' and t.experiment_id > p.experiment_id
                     order by t.experiment_id limit 1)
             from pending_experiments p where p.experiment_id is not null
         ),
         experiments_waiting as (
             select e.id, coalesce(e.submitted_by, '') as owner, e.created_at,
                    e.priority as weight,
                    e.gpus_per_trial as gpus,
                    (select count(*) from trials r where r.experiment_id = e.id and r.state = 'running')::float8 as running,
                    e.max_concurrent::float8 as cap
             from pending_experiments p join experiments e on e.id = p.experiment_id
             left join workers me on me.id = {{ME}}
             -- Only what this worker's pool, labels, free GPUs and permissions allow.
             where e.gpus_per_trial <= greatest($4, 1)
               and (e.command is null or coalesce(me.allow_commands, false))
               and (e.pool is null or e.pool = me.pool)
               and (e.labels is null or coalesce(me.labels, '{}'::jsonb) @> e.labels)
         ),
         users_waiting as (
             select x.owner, coalesce(max(k.weight), 1) as weight,
                    (select coalesce(sum(re.gpus_per_trial), 0)
                     from trials r join experiments re on re.id = r.experiment_id
                     where r.state = 'running' and coalesce(re.submitted_by, '') = x.owner)::float8 as running
             from experiments_waiting x left join tokens k on k.name = x.owner
             group by x.owner
         ),
         candidates as (
             select c.id, x.owner, x.created_at, c.ordinal, x.gpus,
                    (x.running + row_number() over (partition by x.id order by c.ordinal)) * x.gpus / x.weight as share
             from experiments_waiting x
             cross join lateral (
                 -- An experiment's trials in its own order (promoted ones first: ASHA's rungs),
                 -- numbered so that the order below keeps it.
                 select p.id, row_number() over (order by p.pauses desc, p.ordinal) as ordinal from (
                     select t.id, t.pauses, t.ordinal from trials t
                     where t.experiment_id = x.id and t.state = 'pending'
                       -- Only once every trial it waits for succeeded.
                       and ",
            DEPENDENCIES_MET,
            "
                     order by t.pauses desc, t.ordinal
                     limit greatest(0, least($2 + 64, coalesce(x.cap - x.running, $2 + 64)))::bigint
                 ) p
             ) c
         ),
         ordered as (
             select c.id, c.share, c.created_at, c.ordinal, c.gpus,
                    (u.running + sum(c.gpus) over (partition by c.owner order by c.share, c.created_at, c.ordinal
                                                   rows between unbounded preceding and current row))
                        / u.weight as user_share
             from candidates c join users_waiting u on u.owner = c.owner
             order by user_share, c.share, c.created_at, c.ordinal
             limit $2 + 64
         ),
         picked as (
             select t.id, o.gpus, o.user_share, o.share, o.created_at, o.ordinal
             from trials t join ordered o on o.id = t.id
             where t.state = 'pending'
               and {{DRAINING}}
             order by o.user_share, o.share, o.created_at, o.ordinal
             for update of t skip locked
             limit $2
         ),
         fits as (
             select p.id, p.gpus,
                    sum(p.gpus) over (order by p.user_share, p.share, p.created_at, p.ordinal
                                      rows between unbounded preceding and current row) as used
             from picked p
         )
         update trials t ",
            TAKE,
            "
         {{DEALT}}
         returning {{LEASED_BY}}fits.gpus, fits.used, ",
            LEASED,
        ];
    parts
        .concat()
        .replace("{{ASKED}}", asked)
        .replace("{{ME}}", me)
        .replace("{{DRAINING}}", draining)
        .replace("{{DEALT}}", dealt)
        .replace("{{LEASED_BY}}", leased_by)
        .replace("lease_owner = $1", &format!("lease_owner = {owner}"))
}

/// Whether every trial that trial `t` waits for succeeded: no trial is leased before.
const DEPENDENCIES_MET: &str = "(t.depends_on = '{}' or not exists (
    select 1 from trials d where d.id = any(t.depends_on) and d.state <> 'succeeded'))";

/// How every lease takes a trial `t`: a new token and attempt, for worker `$1` and TTL `$3` seconds.
const TAKE: &str = "set state = 'running',
             lease_token = gen_random_uuid(),
             lease_owner = $1,
             lease_expires_at = now() + make_interval(secs => $3),
             attempt = t.attempt + 1,
             started_at = coalesce(t.started_at, now())";

/// What every lease returns of a trial it leased (`t` the trial, `e` its experiment).
const LEASED: &str = "t.id, t.experiment_id, t.lease_token, t.attempt, e.family, t.params, e.spec_hash, e.traceparent,
    t.pause_at, t.fuse_key, e.fuse,
    e.fresh_process, e.command, e.code_hash,
    (select jsonb_build_object('step', c.step, 'path', c.path, 'bytes', c.bytes)
     from checkpoints c where c.trial_id = t.id order by c.step desc limit 1) as checkpoint";

fn leased_trial(row: &sqlx::postgres::PgRow) -> Result<LeasedTrial> {
    let checkpoint: Option<Value> = row.try_get("checkpoint")?;
    let fuse: Option<Value> = row.try_get("fuse")?;
    Ok(LeasedTrial {
        trial: TrialId(row.try_get("id")?),
        experiment: ExperimentId(row.try_get("experiment_id")?),
        token: LeaseToken(row.try_get("lease_token")?),
        attempt: row.try_get("attempt")?,
        family: row.try_get("family")?,
        params: row.try_get("params")?,
        spec_hash: row.try_get("spec_hash")?,
        fresh_process: row.try_get("fresh_process")?,
        traceparent: row.try_get("traceparent")?,
        gpus: row.try_get::<Option<i32>, _>("gpus").ok().flatten().unwrap_or(1) as u32,
        pause_at: row.try_get::<Option<i64>, _>("pause_at")?.map(|s| s as u64),
        fuse_key: row.try_get("fuse_key")?,
        fuse: fuse.and_then(|f| serde_json::from_value(f).ok()),
        fuse_group: None,
        command: row.try_get("command")?,
        code_hash: row.try_get("code_hash")?,
        resume_from: checkpoint.map(|c| CheckpointRecord {
            step: c["step"].as_i64().unwrap_or(0),
            path: c["path"].as_str().unwrap_or_default().to_string(),
            bytes: c["bytes"].as_i64().unwrap_or(0),
        }),
    })
}

/// Leases up to `room` more pending trials that fuse with `head` (same experiment and
/// fusion key, none waiting on a dependency, in their order; each keeps its own rung)
/// into its group, within the experiment's `max_concurrent`.
pub async fn fuse_with(
    pool: &PgPool,
    worker: WorkerId,
    head: &LeasedTrial,
    room: u32,
    ttl: Duration,
) -> Result<Vec<LeasedTrial>> {
    let Some(key) = head.fuse_key.as_deref() else {
        return Ok(Vec::new());
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(
        [
            "with room as (
             -- What max_concurrent leaves of the group's size.
             select greatest(0, least($5, coalesce(x.max_concurrent::bigint
                 - (select count(*) from trials r where r.experiment_id = $4 and r.state = 'running'), $5))) as n
             from experiments x where x.id = $4
         ),
         picked as (
             select t.id from trials t
             where t.experiment_id = $4 and t.state = 'pending' and t.fuse_key = $2
               and ",
            DEPENDENCIES_MET,
            "
             order by t.ordinal
             for update of t skip locked
             limit (select n from room)
         )
         update trials t ",
            TAKE,
            "
         from picked, experiments e
         where t.id = picked.id and e.id = t.experiment_id
         returning ",
            LEASED,
        ]
        .concat(),
    ))
    .bind(worker.0)
    .bind(key)
    .bind(ttl.as_secs_f64())
    .bind(head.experiment.0)
    .bind(i64::from(room))
    .fetch_all(pool)
    .await?;
    let mut members = rows.iter().map(leased_trial).collect::<Result<Vec<_>>>()?;
    for m in &mut members {
        m.fuse_group = Some(head.trial);
    }
    Ok(members)
}

/// What a heartbeat tells its worker.
#[derive(Debug, Default)]
pub struct Beat {
    /// The trials it must stop, with why.
    pub stop: Vec<(TrialId, String)>,
    /// An admin drained it: it takes no new trials.
    pub drain: bool,
}

/// Extends the leases `worker` holds and marks it seen, in one statement;
/// says which trials it must stop and whether it is drained.
pub async fn heartbeat(
    pool: &PgPool,
    worker: WorkerId,
    held: &[(TrialId, LeaseToken)],
    ttl: Duration,
    unhealthy: Option<&str>,
) -> Result<Beat> {
    let trials: Vec<uuid::Uuid> = held.iter().map(|h| h.0 .0).collect();
    let tokens: Vec<uuid::Uuid> = held.iter().map(|h| h.1 .0).collect();
    let (drain, stopped, states): (Option<bool>, Vec<uuid::Uuid>, Vec<Option<String>>) = sqlx::query_as(
        "with held as (
             select * from unnest($2::uuid[], $3::uuid[]) as h(trial_id, token)
         ),
         seen as (
             update workers set last_seen_at = now(), unhealthy = $5 where id = $1
             returning draining_since is not null as drain
         ),
         extended as (
             update trials t
             set lease_expires_at = now() + make_interval(secs => $4)
             from held
             where t.id = held.trial_id and t.lease_token = held.token and t.state = 'running'
             returning t.id
         ),
         stops as (
             select held.trial_id, t.state
             from held
             left join trials t on t.id = held.trial_id and t.lease_token = held.token
             where held.trial_id not in (select id from extended)
         )
         select (select bool_or(drain) from seen),
                coalesce(array_agg(stops.trial_id), '{}'),
                coalesce(array_agg(stops.state), '{}')
         from stops",
    )
    .bind(worker.0)
    .bind(&trials)
    .bind(&tokens)
    .bind(ttl.as_secs_f64())
    .bind(unhealthy)
    .fetch_one(pool)
    .await?;
    let stop = stopped
        .into_iter()
        .zip(states)
        .map(|(id, state)| {
            let reason = match state.as_deref() {
                Some("cancelled") => "cancelled".to_string(),
                Some("pruned") => "pruned".to_string(),
                Some(other) => format!("trial is {other}"),
                None => "lease lost: it expired and the trial went back to the queue".to_string(),
            };
            (TrialId(id), reason)
        })
        .collect();
    Ok(Beat {
        stop,
        drain: drain.unwrap_or(false),
    })
}

/// What clears a trial's lease (in an `update trials ... set`).
const CLEAR_LEASE: &str = "lease_token = null, lease_owner = null, lease_expires_at = null";

/// Requeue or fail, the one rule for a trial whose attempt ended without its own
/// result (a crash, an expired lease): back to pending while attempts remain, so it
/// resumes from its newest checkpoint, else failed with `failure` (an SQL text
/// expression); its lease cleared. For `update trials t set ...` over the held rows
/// `x` (with `tries`, attempts less pauses, and `max_attempts`).
fn requeue_or_fail(failure: &str) -> String {
    format!(
        "state = case when x.tries >= x.max_attempts then 'failed' else 'pending' end,
                 error = case when x.tries >= x.max_attempts then {failure} else t.error end,
                 finished_at = case when x.tries >= x.max_attempts then now() end,
                 {CLEAR_LEASE}"
    )
}

/// Gives back a trial its worker could not start: pending again, the attempt
/// not counted, fenced by the lease. Marks the worker unhealthy with `reason`.
pub async fn release(pool: &PgPool, worker: WorkerId, trial: TrialId, token: LeaseToken, reason: &str) -> Result<bool> {
    let released = sqlx::query(sqlx::AssertSqlSafe(format!(
        "with released as (
             update trials
             set state = 'pending', attempt = greatest(attempt - 1, 0), {CLEAR_LEASE}
             where id = $1 and lease_token = $2 and state = 'running'
             returning id
         ),
         marked as (
             update workers set unhealthy = $4, last_seen_at = now() where id = $3
         )
         select count(*) from released"
    )))
    .bind(trial.0)
    .bind(token.0)
    .bind(worker.0)
    .bind(reason)
    .fetch_one(pool)
    .await?
    .try_get::<i64, _>(0)?;
    Ok(released == 1)
}

/// Returns expired leases to the queue, or fails trials out of attempts; each
/// expiry is kept in `trial_attempts`.
pub async fn reap_expired(pool: &PgPool) -> Result<u64> {
    let reaped: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "with expired as (
             select t.id, t.attempt, t.attempt - t.pauses - t.attempt_base as tries, t.lease_owner, e.max_attempts
             from trials t join experiments e on e.id = t.experiment_id
             where t.state = 'running' and t.lease_expires_at < now()
             for update of t skip locked
         ),
         reaped as (
             update trials t
             set {}
             from expired x
             where t.id = x.id
             returning t.id
         ),
         logged as (
             insert into trial_attempts (trial_id, attempt, worker_id, outcome, error)
             select x.id, x.attempt, x.lease_owner, 'lease_expired',
                    format('lease expired (held by worker %s)', x.lease_owner)
             from expired x
             on conflict do nothing
         )
         select count(*) from reaped",
        requeue_or_fail("format('lease expired on attempt %s of %s (last held by worker %s)', x.tries, x.max_attempts, x.lease_owner)")
    )))
    .fetch_one(pool)
    .await?;
    Ok(reaped as u64)
}

/// Records a checkpoint whose object is already durable, fenced by the lease.
pub async fn record_checkpoint(
    pool: &PgPool,
    trial: TrialId,
    token: LeaseToken,
    checkpoint: &CheckpointRecord,
) -> Result<()> {
    let done = sqlx::query(
        "insert into checkpoints (trial_id, step, path, bytes, attempt)
         select t.id, $3, $4, $5, t.attempt from trials t
         where t.id = $1 and t.lease_token = $2 and t.state = 'running'
         on conflict (trial_id, step) do update
         set path = excluded.path, bytes = excluded.bytes, attempt = excluded.attempt, created_at = now()",
    )
    .bind(trial.0)
    .bind(token.0)
    .bind(checkpoint.step)
    .bind(&checkpoint.path)
    .bind(checkpoint.bytes)
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(Error::StaleLease {
            trial: trial.to_string(),
        });
    }
    Ok(())
}

/// Finishes a trial, fenced by the lease; repeating the same completion is harmless.
#[allow(clippy::too_many_arguments)] // the columns of one row, each bound once
pub async fn complete(
    db: impl sqlx::PgExecutor<'_>,
    trial: TrialId,
    token: LeaseToken,
    outcome: ablate_schema::TrialState,
    error: Option<&str>,
    stderr_tail: Option<&str>,
    outputs: &Value,
    provenance: Option<&Value>,
) -> Result<()> {
    let done = sqlx::query(
        "with done as (
             update trials
             set state = $3, finished_at = coalesce(finished_at, now()), error = $4, stderr_tail = $5,
                 lease_expires_at = null, outputs = $6
             where id = $1 and lease_token = $2 and state in ('running', $3)
             returning id, attempt, lease_owner
         ),
         logged as (
             insert into trial_attempts (trial_id, attempt, worker_id, outcome, error, stderr_tail, provenance)
             select id, attempt, lease_owner, $3, $4, $5, $7 from done
             on conflict do nothing
         )
         select count(*) from done",
    )
    .bind(trial.0)
    .bind(token.0)
    .bind(outcome.as_str())
    .bind(error)
    .bind(stderr_tail)
    .bind(outputs)
    .bind(provenance)
    .fetch_one(db)
    .await?
    .try_get::<i64, _>(0)?;
    if done == 0 {
        return Err(Error::StaleLease {
            trial: trial.to_string(),
        });
    }
    Ok(())
}

/// One finished trial's completion for [`complete_all`].
pub struct Finish<'a> {
    pub trial: TrialId,
    pub token: LeaseToken,
    pub outcome: ablate_schema::TrialState,
    pub error: Option<&'a str>,
    pub stderr_tail: Option<&'a str>,
    pub outputs: &'a Value,
    pub provenance: Option<&'a Value>,
}

/// [`complete`] for many trials in one statement (in the order of their ids, as
/// every statement that locks several trials takes them). Returns the trials
/// recorded (the others' leases were stale), each with whether its experiment
/// searches with tpe. With `unless_tpe`, records none (and returns `None`) when
/// any of them is a tpe experiment's, whose completion must commit together
/// with its next proposals; the caller then records them in a transaction.
pub async fn complete_all(
    db: impl sqlx::PgExecutor<'_>,
    finishes: &[Finish<'_>],
    unless_tpe: bool,
) -> Result<Option<Vec<(TrialId, bool)>>> {
    let mut order: Vec<&Finish> = finishes.iter().collect();
    order.sort_by_key(|f| f.trial.0);
    let rows: Vec<(Option<uuid::Uuid>, Option<bool>, bool)> = sqlx::query_as(
        "with u as (
             select * from unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[])
                 as u(id, token, outcome, error, tail, outputs, provenance)
         ),
         tpe as (
             select 1 from u join trials t on t.id = u.id join experiments e on e.id = t.experiment_id
             where $8 and e.searcher in ('tpe', 'bohb') limit 1
         ),
         done as (
             update trials t
             set state = u.outcome, finished_at = coalesce(t.finished_at, now()), error = u.error,
                 stderr_tail = u.tail, lease_expires_at = null, outputs = u.outputs
             from u
             where t.id = u.id and t.lease_token = u.token and t.state in ('running', u.outcome)
               and not exists (select 1 from tpe)
             returning t.id, t.attempt, t.lease_owner, t.experiment_id, u.outcome, u.error, u.tail, u.provenance
         ),
         logged as (
             insert into trial_attempts (trial_id, attempt, worker_id, outcome, error, stderr_tail, provenance)
             select id, attempt, lease_owner, outcome, error, tail, provenance from done
             on conflict do nothing
         )
         select d.id, e.searcher in ('tpe', 'bohb'), exists (select 1 from tpe)
         from (select 1) one
         left join done d on true
         left join experiments e on e.id = d.experiment_id",
    )
    .bind(order.iter().map(|f| f.trial.0).collect::<Vec<_>>())
    .bind(order.iter().map(|f| f.token.0).collect::<Vec<_>>())
    .bind(order.iter().map(|f| f.outcome.as_str()).collect::<Vec<_>>())
    .bind(order.iter().map(|f| f.error).collect::<Vec<_>>())
    .bind(order.iter().map(|f| f.stderr_tail).collect::<Vec<_>>())
    .bind(order.iter().map(|f| f.outputs.clone()).collect::<Vec<_>>())
    .bind(order.iter().map(|f| f.provenance.cloned()).collect::<Vec<_>>())
    .bind(unless_tpe)
    .fetch_all(db)
    .await?;
    if rows.iter().any(|r| r.2) {
        return Ok(None);
    }
    Ok(Some(
        rows.into_iter()
            .filter_map(|(id, tpe, _)| id.map(|id| (TrialId(id), tpe.unwrap_or(false))))
            .collect(),
    ))
}

/// A trial whose process crashed (a signal, a panic): pending again while
/// attempts remain, so it resumes from its newest checkpoint; failed after the
/// last. Fenced by the lease; the attempt is kept in `trial_attempts`. Returns
/// whether the trial will run again.
pub async fn crashed(
    db: impl sqlx::PgExecutor<'_>,
    trial: TrialId,
    token: LeaseToken,
    error: &str,
    stderr_tail: Option<&str>,
    provenance: Option<&Value>,
) -> Result<bool> {
    let row: Option<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "with held as (
             select t.id, t.attempt, t.attempt - t.pauses - t.attempt_base as tries, t.lease_owner, e.max_attempts
             from trials t join experiments e on e.id = t.experiment_id
             where t.id = $1 and t.lease_token = $2 and t.state = 'running'
             for update of t
         ),
         moved as (
             update trials t
             set {},
                 stderr_tail = case when x.tries >= x.max_attempts then $4 else t.stderr_tail end
             from held x
             where t.id = x.id
             returning t.state
         ),
         logged as (
             insert into trial_attempts (trial_id, attempt, worker_id, outcome, error, stderr_tail, provenance)
             select id, attempt, lease_owner, 'crashed', $3, $4, $5 from held
             on conflict do nothing
         )
         select state from moved",
        requeue_or_fail("format('crashed on attempt %s of %s: %s', x.tries, x.max_attempts, $3::text)")
    )))
    .bind(trial.0)
    .bind(token.0)
    .bind(error)
    .bind(stderr_tail)
    .bind(provenance)
    .fetch_optional(db)
    .await?;
    match row {
        Some((state,)) => Ok(state == "pending"),
        None => Err(Error::StaleLease {
            trial: trial.to_string(),
        }),
    }
}
