//! The coordinator: stores sweeps, trials, metrics and checkpoint records in
//! PostgreSQL and hands trials to workers under leases.
//!
//! **Architecture invariant:** PostgreSQL is the single source of truth. The
//! coordinator keeps nothing it cannot rebuild from the database (the metric
//! name cache is only a cache), so it can be killed at any moment and several
//! replicas can serve one database.

pub mod db;
pub mod error;
mod reader;
mod service;
pub mod submit;

use std::net::SocketAddr;
use std::time::Duration;

pub use error::{Error, Result};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct Options {
    pub database_url: String,
    pub listen: SocketAddr,
    /// How long a lease lasts without a heartbeat.
    pub lease_ttl: Duration,
    /// How often expired leases are reaped.
    pub reap_interval: Duration,
    /// How long after start-up nothing is reaped: workers that kept running
    /// while the coordinator was away re-attach their leases with their next
    /// heartbeat (the token proves them), so a restart or upgrade shorter
    /// than this restarts no trial. `None`: twice the lease TTL.
    pub reap_grace: Option<Duration>,
    pub max_connections: u32,
    /// Connections of the researchers' own pool (`ablate sql`, reports).
    pub reader_connections: u32,
    /// Researchers' queries one caller (an address) may run at once.
    pub queries_per_caller: u32,
    /// What one spec, trial or batch may hold.
    pub limits: ablate_schema::Limits,
}

impl Options {
    pub fn new(database_url: impl Into<String>, listen: SocketAddr) -> Options {
        Options {
            database_url: database_url.into(),
            listen,
            lease_ttl: Duration::from_secs(15),
            reap_interval: Duration::from_secs(1),
            reap_grace: None,
            max_connections: 16,
            reader_connections: 4,
            queries_per_caller: 2,
            limits: ablate_schema::Limits::default(),
        }
    }
}

/// A bound, migrated coordinator, ready to serve.
pub struct Coordinator {
    listener: TcpListener,
    pool: sqlx::PgPool,
    reader: reader::Reader,
    options: Options,
}

impl Coordinator {
    /// Connects to PostgreSQL, applies migrations and binds the listen address.
    pub async fn build(options: Options) -> Result<Coordinator> {
        let pool = db::connect(&options.database_url, options.max_connections).await?;
        let reader_pool = db::connect_reader(&options.database_url, options.reader_connections).await?;
        let reader = reader::Reader::new(
            reader_pool,
            options.reader_connections as usize,
            options.queries_per_caller as usize,
        );
        let listener = TcpListener::bind(options.listen)
            .await
            .map_err(|e| Error::InvalidArgument(format!("cannot listen on {}: {e}", options.listen)))?;
        Ok(Coordinator {
            listener,
            pool,
            reader,
            options,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves both gRPC services and runs the lease reaper until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send) -> Result<()> {
        let addr = self.local_addr();
        let grace = self.options.reap_grace.unwrap_or(self.options.lease_ttl * 2);
        let reaper = tokio::spawn(reap_forever(self.pool.clone(), grace, self.options.reap_interval));
        tracing::info!(%addr, "coordinator listening");
        let result = tonic::transport::Server::builder()
            .add_service(service::experiments_server(
                self.pool.clone(),
                self.reader.clone(),
                self.options.limits,
                self.options.lease_ttl,
            ))
            .add_service(service::workers_server(
                self.pool.clone(),
                self.options.lease_ttl,
                self.options.limits,
            ))
            .serve_with_incoming_shutdown(incoming(self.listener), shutdown)
            .await;
        reaper.abort();
        result.map_err(|e| Error::InvalidArgument(format!("grpc server: {e}")))
    }
}

/// Accepted connections with TCP_NODELAY, so small replies are not held back by Nagle's algorithm.
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

async fn reap_forever(pool: sqlx::PgPool, grace: Duration, every: Duration) {
    tracing::info!(?grace, "reaping expired leases after the start-up grace period");
    tokio::time::sleep(grace).await;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match db::reap_expired(&pool).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(trials = n, "reaped expired leases"),
            Err(error) => tracing::warn!(%error, "reaper pass failed"),
        }
    }
}
