//! All SQL of ablate, by concern. Plain async functions over a pool; nothing
//! here holds a transaction open for longer than one request.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::error::Result;

mod dashboard;
mod experiments;
mod lifecycle;
mod metrics;
mod queue;
mod reader;
mod rungs;
mod tokens;
mod tpe;
mod workers;

pub use dashboard::*;
pub use experiments::*;
pub use lifecycle::*;
pub use metrics::*;
pub use queue::*;
pub use reader::*;
pub use rungs::*;
pub use tokens::*;
pub use tpe::*;
pub use workers::*;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connects and brings the schema up to date. The coordinator's statements
/// are short and run many times: JIT compilation (which PostgreSQL starts
/// for any plan it costs high, such as the dashboard's reads of a large
/// experiment) would cost more than it saves, so it is off; and each
/// prepared statement keeps one generic plan instead of being planned again
/// at every run (planning the lease statement took longer than running it,
/// and a statement bound to arrays of a new length was planned afresh).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?.options([("jit", "off"), ("plan_cache_mode", "force_generic_plan")]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// `host:port` of a database URL, for messages (no user or password).
pub fn server_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!("{}:{}", u.host_str().unwrap_or("localhost"), u.port().unwrap_or(5432)),
        Err(_) => "the --reader-database-url server".to_string(),
    }
}

/// The researchers' pool: its own connections, without a statement cache, so
/// `DISCARD ALL` after each query can leave nothing behind on a connection.
pub async fn connect_reader(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?.statement_cache_capacity(0);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}
