//! Worker registration and the workers table.

use ablate_schema::WorkerId;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::Row;

use crate::error::Result;

pub async fn register_worker(pool: &PgPool, id: WorkerId, hostname: &str, devices: &[String]) -> Result<()> {
    sqlx::query(
        "insert into workers (id, hostname, devices) values ($1, $2, $3)
         on conflict (id) do update set hostname = excluded.hostname, devices = excluded.devices,
             last_seen_at = now()",
    )
    .bind(id.0)
    .bind(hostname)
    .bind(devices)
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
}

/// Every worker, live ones first, then by when they were last seen.
pub async fn list_workers(pool: &PgPool, lease_ttl: std::time::Duration) -> Result<Vec<WorkerRow>> {
    let rows = sqlx::query(
        "select w.id, w.hostname, w.devices, w.registered_at, w.last_seen_at,
                (select count(*) from trials t where t.lease_owner = w.id and t.state = 'running') as running,
                w.unhealthy,
                w.last_seen_at < now() - make_interval(secs => $1) as lost,
                w.draining_since
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

/// Whether an admin has drained the worker.
pub async fn draining(pool: &PgPool, worker: WorkerId) -> Result<bool> {
    Ok(
        sqlx::query_scalar::<_, bool>("select draining_since is not null from workers where id = $1")
            .bind(worker.0)
            .fetch_optional(pool)
            .await?
            .unwrap_or(false),
    )
}
