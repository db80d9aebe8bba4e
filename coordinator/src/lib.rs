//! The coordinator: stores sweeps, trials, metrics and checkpoint records in
//! PostgreSQL and hands trials to workers under leases.
//!
//! **Architecture invariant:** PostgreSQL is the single source of truth. The
//! coordinator keeps nothing it cannot rebuild from the database (the metric
//! name cache is only a cache), so it can be killed at any moment and several
//! replicas can serve one database.

pub mod auth;
pub mod db;
mod downsample;
pub mod error;
pub mod platform;
pub mod policy;
mod reader;
mod service;
pub mod submit;
mod telemetry;
mod web;

use std::net::SocketAddr;
use std::time::Duration;

pub use error::{Error, Result};

/// The object store the coordinator shares with its workers: where it keeps
/// command trials' packed code and reads trials' logs.
#[derive(Clone)]
pub struct Objects {
    pub store: std::sync::Arc<dyn object_store::ObjectStore>,
    pub prefix: object_store::path::Path,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Objects({})", self.store)
    }
}
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
    /// Connections of the researchers' own pool (`ablate sql`, reports, the dashboard's reads).
    pub reader_connections: u32,
    /// A streaming replica of the database for the researchers' pool; `None`: the primary.
    pub reader_database_url: Option<String>,
    /// Researchers' queries one caller (an address) may run at once.
    pub queries_per_caller: u32,
    /// What one spec, trial or batch may hold.
    pub limits: ablate_schema::Limits,
    /// Require a token with the right role on every call.
    pub auth: bool,
    /// With auth: an admin token to keep in (or, when missing, to create and
    /// write to, mode 0600) this file, so the first admin can log in.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// TLS for the listener: a PEM certificate chain and its PEM private key.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Where trials may read local data (specs naming other paths are refused).
    pub data_roots: Vec<std::path::PathBuf>,
    /// The HTTP listener: the web dashboard at / (its API at /api/v1), Prometheus
    /// metrics at /metrics, /healthz, /readyz.
    pub http_listen: Option<SocketAddr>,
    /// The workers' object store (`--object-store`): where command trials' code is
    /// kept and trials' logs are read. `None`: no command trial with `code`, no logs.
    pub object_store: Option<String>,
    /// A running trial's points before its newest checkpoint move into chunks
    /// once there are this many.
    pub chunk_running_after: i64,
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
            reader_database_url: None,
            queries_per_caller: 2,
            limits: ablate_schema::Limits::default(),
            auth: false,
            admin_token_file: None,
            tls: None,
            data_roots: ablate_experiments::nn::locations::default_roots(),
            http_listen: None,
            object_store: None,
            chunk_running_after: 8192,
        }
    }
}

/// A bound, migrated coordinator, ready to serve.
pub struct Coordinator {
    listener: TcpListener,
    http: Option<TcpListener>,
    pool: sqlx::PgPool,
    reader: reader::Reader,
    tokens: Option<auth::Tokens>,
    options: Options,
    objects: Option<Objects>,
}

impl Coordinator {
    /// Connects to PostgreSQL, applies migrations and binds the listen address.
    pub async fn build(options: Options) -> Result<Coordinator> {
        let pool = db::connect(&options.database_url, options.max_connections).await?;
        let reader_url = options.reader_database_url.as_deref().unwrap_or(&options.database_url);
        let reader_pool = db::connect_reader(reader_url, options.reader_connections).await?;
        let mut reader = reader::Reader::new(
            reader_pool,
            options.reader_connections as usize,
            options.queries_per_caller as usize,
        );
        if let Some(url) = &options.reader_database_url {
            reader = reader.on_replica(db::server_of(url));
        }
        let tokens = if options.auth {
            if let Some(file) = &options.admin_token_file {
                ensure_token_file(&pool, file, auth::Role::Admin).await?;
            }
            Some(auth::Tokens::load(pool.clone()).await?)
        } else {
            None
        };
        let listener = TcpListener::bind(options.listen)
            .await
            .map_err(|e| Error::InvalidArgument(format!("cannot listen on {}: {e}", options.listen)))?;
        let http = match options.http_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot listen for HTTP on {addr}: {e}; pick another --http-listen"
                ))
            })?),
            None => None,
        };
        let objects = match &options.object_store {
            Some(url) => {
                let (store, prefix) = ablate_schema::objects::open(url).map_err(Error::InvalidArgument)?;
                Some(Objects { store, prefix })
            }
            None => None,
        };
        Ok(Coordinator {
            listener,
            http,
            pool,
            reader,
            tokens,
            options,
            objects,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The HTTP listener's address, when there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves both gRPC services and runs the lease reaper until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send) -> Result<()> {
        let addr = self.local_addr();
        let grace = self.options.reap_grace.unwrap_or(self.options.lease_ttl * 2);
        let telemetry = std::sync::Arc::new(telemetry::Telemetry::default());
        let reaper = tokio::spawn(reap_forever(
            self.pool.clone(),
            grace,
            self.options.reap_interval,
            telemetry.clone(),
        ));
        let compactor = tokio::spawn(platform::compaction::compact_forever(
            self.pool.clone(),
            self.options.reap_interval.max(std::time::Duration::from_secs(1)),
            self.options.chunk_running_after,
        ));
        // Retention needs the object store: without one, every checkpoint stays.
        let retention = self.objects.clone().map(|objects| {
            tokio::spawn(platform::retention::retain_forever(
                self.pool.clone(),
                objects,
                self.options.reap_interval.max(std::time::Duration::from_secs(1)),
            ))
        });
        tracing::info!(%addr, "coordinator listening");
        let http_port = self.http.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port());
        let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let http = self.http.map(|listener| {
            tracing::info!(addr = ?listener.local_addr().ok(), "HTTP listener: the dashboard at /, /api/v1, /metrics, /healthz, /readyz");
            tokio::spawn(telemetry::serve(
                listener,
                self.pool.clone(),
                telemetry.clone(),
                self.options.lease_ttl,
                web::router(
                    self.pool.clone(),
                    self.tokens.clone(),
                    &self.options,
                    self.objects.clone(),
                    self.reader.clone(),
                ),
                self.tokens.clone(),
                async {
                    let _ = http_stopped.await;
                },
            ))
        });
        let reloads = self.tokens.as_ref().map(auth::Tokens::spawn_reloads);
        let mut builder = tonic::transport::Server::builder();
        if let Some((cert, key)) = &self.options.tls {
            let identity = tonic::transport::Identity::from_pem(cert, key);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| Error::InvalidArgument(format!("TLS: {e}")))?;
        }
        let result = builder
            .trace_fn(rpc_span)
            .layer(auth::AuthLayer {
                tokens: self.tokens.clone(),
            })
            .add_service(service::experiments_server(
                self.pool.clone(),
                self.reader.clone(),
                self.tokens.clone(),
                &self.options,
                http_port,
                self.objects.clone(),
            ))
            .add_service(service::workers_server(
                self.pool.clone(),
                self.options.lease_ttl,
                self.options.limits,
                telemetry,
            ))
            .serve_with_incoming_shutdown(incoming(self.listener), shutdown)
            .await;
        reaper.abort();
        compactor.abort();
        if let Some(retention) = retention {
            retention.abort();
        }
        let _ = http_stop.send(());
        if let Some(http) = http {
            let _ = http.await;
        }
        if let Some(reloads) = reloads {
            reloads.abort();
        }
        result.map_err(|e| Error::InvalidArgument(format!("grpc server: {e}")))
    }
}

/// Makes sure `file` holds a valid token of `role`: keeps a valid one, else
/// creates a token and writes it (mode 0600, replacing what was there).
async fn ensure_token_file(pool: &sqlx::PgPool, file: &std::path::Path, role: auth::Role) -> Result<()> {
    let io = |e: std::io::Error| Error::InvalidArgument(format!("token file {}: {e}", file.display()));
    if let Ok(text) = std::fs::read_to_string(file) {
        let hash = auth::hash(text.trim());
        let known = db::valid_tokens(pool)
            .await?
            .iter()
            .any(|(h, _, r, _)| *h == hash && r == role.as_str());
        if known {
            return Ok(());
        }
        tracing::warn!(file = %file.display(), "the token file holds no valid token of this database; making a new one");
    }
    let name = format!("{}-{}", role.as_str(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let token = platform::tokens::create(pool, &name, role, None).await?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .map_err(io)?;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    writeln!(f, "{token}").map_err(io)?;
    tracing::info!(file = %file.display(), %name, role = role.as_str(), "created a token");
    Ok(())
}

impl Coordinator {
    /// With auth on: a valid token of `role` in `file` (kept, or made anew). For
    /// `ablate up`, which hands them to its user and its worker.
    pub async fn ensure_token_file(&self, file: &std::path::Path, role: auth::Role) -> Result<()> {
        ensure_token_file(&self.pool, file, role).await?;
        if let Some(tokens) = &self.tokens {
            tokens.reload().await?;
        }
        Ok(())
    }
}

/// The span of one gRPC call: named by its method, a child of the caller's span
/// when the call carries a `traceparent`; handlers record the ids they learn.
fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    let method = request.uri().path().rsplit('/').next().unwrap_or_default();
    let span = tracing::info_span!("rpc",
        otel.name = %format_args!("coordinator {method}"),
        otel.kind = "server",
        rpc.method = %method,
        experiment_id = tracing::field::Empty,
        trial_id = tracing::field::Empty);
    ablate_schema::trace::set_parent_from_headers(&span, request.headers());
    span
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

async fn reap_forever(
    pool: sqlx::PgPool,
    grace: Duration,
    every: Duration,
    telemetry: std::sync::Arc<telemetry::Telemetry>,
) {
    tracing::info!(?grace, "reaping expired leases after the start-up grace period");
    tokio::time::sleep(grace).await;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match db::reap_expired(&pool).await {
            Ok(0) => {}
            Ok(n) => {
                telemetry.reaper_requeues.add(n);
                tracing::info!(trials = n, "reaped expired leases")
            }
            Err(error) => tracing::warn!(%error, "reaper pass failed"),
        }
        if let Err(error) = platform::searchers::top_up_all(&pool).await {
            tracing::warn!(%error, "tpe proposals failed");
        }
        if let Err(error) = platform::searchers::advance_generations(&pool).await {
            tracing::warn!(%error, "pbt generations failed");
        }
    }
}

/// `ablate db migrate`: applies the migrations, then registers tokens whose
/// secrets the operator made, each `(role, name, secret)`. Returns a line per token.
pub async fn migrate(database_url: &str, tokens: &[(auth::Role, String, String)]) -> Result<Vec<String>> {
    let pool = db::connect(database_url, 2).await?;
    let mut said = Vec::new();
    for (role, name, secret) in tokens {
        let secret = secret.trim();
        if secret.len() < 32 {
            return Err(Error::InvalidArgument(format!(
                "the {} token for `{name}` has {} characters; use 32 or more random ones (openssl rand -hex 32)",
                role.as_str(),
                secret.len()
            )));
        }
        let done = db::register_token(&pool, name, role.as_str(), &auth::hash(secret)).await?;
        said.push(format!(
            "{} token `{name}`: {}",
            role.as_str(),
            match done {
                db::Registered::New => "registered",
                db::Registered::Kept => "already registered",
                db::Registered::Replaced => "replaced (the old one no longer works)",
            }
        ));
    }
    pool.close().await;
    Ok(said)
}
