//! Worker registration and the workers table.

use ablate_schema::{ExperimentId, WorkerId};
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::error::Result;

/// A worker as it registers: where it runs, its slots, its pool and labels.
pub struct NewWorker<'a> {
    pub id: WorkerId,
    pub hostname: &'a str,
    pub devices: &'a [String],
    pub pool: Option<&'a str>,
    pub labels: serde_json::Value,
    /// Its operator lets it run command trials (`--allow-commands`).
    pub allow_commands: bool,
}

pub async fn register_worker(pool: &PgPool, w: &NewWorker<'_>) -> Result<()> {
    sqlx::query(
        "insert into workers (id, hostname, devices, pool, labels, allow_commands) values ($1, $2, $3, $4, $5, $6)
         on conflict (id) do update set hostname = excluded.hostname, devices = excluded.devices,
             pool = excluded.pool, labels = excluded.labels, allow_commands = excluded.allow_commands,
             last_seen_at = now()",
    )
    .bind(w.id.0)
    .bind(w.hostname)
    .bind(w.devices)
    .bind(w.pool)
    .bind(&w.labels)
    .bind(w.allow_commands)
    .execute(pool)
    .await?;
    Ok(())
}

pub struct WorkerRow {
    pub id: WorkerId,
    pub hostname: String,
    pub devices: Vec<String>,
    pub registered_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub running: i64,
    pub unhealthy: Option<String>,
    /// Unheard of for longer than a lease lasts: its trials are (or will be) leased again.
    pub lost: bool,
    pub draining_since: Option<DateTime<Utc>>,
    pub pool: Option<String>,
    pub labels: serde_json::Value,
}

/// Every worker, live ones first, then by when they were last seen.
pub async fn list_workers(pool: &PgPool, lease_ttl: std::time::Duration) -> Result<Vec<WorkerRow>> {
    let rows = sqlx::query(
        "select w.id, w.hostname, w.devices, w.registered_at, w.last_seen_at,
                (select count(*) from trials t where t.lease_owner = w.id and t.state = 'running') as running,
                w.unhealthy,
                w.last_seen_at < now() - make_interval(secs => $1) as lost,
                w.draining_since, w.pool, w.labels
         from workers w
         order by (w.last_seen_at < now() - make_interval(secs => $1)), w.last_seen_at desc",
    )
    .bind(lease_ttl.as_secs_f64())
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(WorkerRow {
                id: WorkerId(row.try_get("id")?),
                hostname: row.try_get("hostname")?,
                devices: row.try_get("devices")?,
                registered_at: row.try_get("registered_at")?,
                last_seen_at: row.try_get("last_seen_at")?,
                running: row.try_get("running")?,
                unhealthy: row.try_get("unhealthy")?,
                lost: row.try_get("lost")?,
                draining_since: row.try_get("draining_since")?,
                pool: row.try_get("pool")?,
                labels: row.try_get("labels")?,
            })
        })
        .collect()
}

/// What draining a worker did.
pub enum Drained {
    /// The worker (its full id) drains now, with this many trials still running.
    Yes(WorkerId, i64),
    NoSuchWorker,
    /// The prefix names several workers.
    Ambiguous(Vec<String>),
}

/// Marks the worker whose id is `id` (or starts with it) as draining: it is
/// leased nothing more and told so with its next heartbeat.
pub async fn drain(pool: &PgPool, id: &str) -> Result<Drained> {
    let matching: Vec<uuid::Uuid> =
        sqlx::query_scalar("select id from workers where id::text like $1 || '%' order by id limit 5")
            .bind(id.to_ascii_lowercase())
            .fetch_all(pool)
            .await?;
    match matching.as_slice() {
        [] => Ok(Drained::NoSuchWorker),
        [one] => {
            let running: i64 = sqlx::query_scalar(
                "with marked as (
                     update workers set draining_since = coalesce(draining_since, now()) where id = $1
                 )
                 select count(*) from trials where lease_owner = $1 and state = 'running'",
            )
            .bind(one)
            .fetch_one(pool)
            .await?;
            Ok(Drained::Yes(WorkerId(*one), running))
        }
        many => Ok(Drained::Ambiguous(many.iter().map(|u| u.to_string()).collect())),
    }
}

/// Why an experiment's pending trials wait, when no live worker (one heard
/// from within `lease_ttl` and not draining) matches its pool and labels or
/// has as many GPUs as its trials ask for.
pub async fn waiting_reason(pool: &PgPool, id: ExperimentId, lease_ttl: std::time::Duration) -> Result<Option<String>> {
    // The pool and labels asked for, GPUs per trial, the most GPUs of a matching live worker.
    // Then how many pending trials still wait for others (trial dependencies), of how many.
    type Wants = (
        Option<String>,
        Option<serde_json::Value>,
        i32,
        Option<i64>,
        i64,
        i64,
        bool,
    );
    let row: Option<Wants> = sqlx::query_as(
        "select e.pool, e.labels, e.gpus_per_trial,
                (select max((select count(distinct split_part(d, '#', 1)) from unnest(w.devices) d
                             where d like 'cuda:%'))
                 from workers w
                 where w.last_seen_at > now() - make_interval(secs => $2) and w.draining_since is null
                   and (e.pool is null or w.pool = e.pool)
                   and (e.labels is null or w.labels @> e.labels)
                   and (e.command is null or w.allow_commands)),
                (select count(*) from trials t where t.experiment_id = e.id and t.state = 'pending'
                   and exists (select 1 from trials d where d.id = any(t.depends_on) and d.state <> 'succeeded')),
                (select count(*) from trials t where t.experiment_id = e.id and t.state = 'pending'),
                e.command is not null
         from experiments e
         where e.id = $1 and exists (select 1 from trials t where t.experiment_id = e.id and t.state = 'pending')",
    )
    .bind(id.0)
    .bind(lease_ttl.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    // `most_gpus`: the most GPUs of a matching live worker (none: no such worker).
    let Some((wanted_pool, labels, gpus, most_gpus, blocked, pending, command)) = row else {
        return Ok(None);
    };
    let blocked = (blocked == pending).then(|| {
        format!(
            "its {pending} pending trial(s) wait for trials they depend on to succeed (see ablate.trial_dependencies)"
        )
    });
    let mut wants = Vec::new();
    if let Some(p) = wanted_pool {
        wants.push(format!("in pool `{p}`"));
    }
    if let Some(serde_json::Value::Object(labels)) = labels {
        let pairs: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        wants.push(format!("with labels {}", pairs.join(",")));
    }
    if command {
        wants.push(
            "allowed to run command trials (the researchers' own programs: `ablate-worker daemon --allow-commands`)"
                .to_string(),
        );
    }
    Ok(match most_gpus {
        None if wants.is_empty() => blocked,
        None => Some(format!("no live worker {} (see `ablate workers`)", wants.join(" and "))),
        Some(most) if gpus > 1 && most < gpus as i64 => {
            let workers = if wants.is_empty() {
                "live worker".to_string()
            } else {
                format!("live worker {}", wants.join(" and "))
            };
            Some(format!(
                "its trials need {gpus} GPUs each (resources.gpus_per_trial); the largest {workers} has {most} (see `ablate workers`)"
            ))
        }
        Some(_) => blocked,
    })
}
