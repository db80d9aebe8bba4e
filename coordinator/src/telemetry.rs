//! The coordinator's HTTP listener (`--http-listen`): Prometheus metrics at
//! `/metrics`, liveness at `/healthz` and readiness (PostgreSQL answers) at
//! `/readyz`, and the web dashboard (`crate::web`). Counters and histograms live here; the gauges (trials by state,
//! workers, slots) are read from PostgreSQL at each scrape, so every replica
//! reports the same queue.

use std::sync::Arc;
use std::time::Duration;

use ablate_schema::exposition::{Counter, Histogram, Page, CONTENT_TYPE, LATENCY_BOUNDS};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use sqlx::PgPool;

use crate::db;

/// What the coordinator counts as it serves.
pub struct Telemetry {
    pub trials_leased: Counter,
    pub lease_seconds: Histogram,
    pub metric_points: Counter,
    pub metric_batch_seconds: Histogram,
    pub reaper_requeues: Counter,
    pub completions_succeeded: Counter,
    pub completions_failed: Counter,
    pub completions_crashed: Counter,
    pub completions_paused: Counter,
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        Telemetry {
            trials_leased: Counter::default(),
            lease_seconds: Histogram::new(LATENCY_BOUNDS),
            metric_points: Counter::default(),
            metric_batch_seconds: Histogram::new(LATENCY_BOUNDS),
            reaper_requeues: Counter::default(),
            completions_succeeded: Counter::default(),
            completions_failed: Counter::default(),
            completions_crashed: Counter::default(),
            completions_paused: Counter::default(),
        }
    }
}

#[derive(Clone)]
struct Http {
    pool: PgPool,
    telemetry: Arc<Telemetry>,
    lease_ttl: Duration,
}

/// Serves the HTTP listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pool: PgPool,
    telemetry: Arc<Telemetry>,
    lease_ttl: Duration,
    dashboard: axum::Router,
    tokens: Option<crate::auth::Tokens>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(ready))
        .with_state(Http {
            pool,
            telemetry,
            lease_ttl,
        })
        .merge(dashboard)
        .route_layer(axum::middleware::from_fn_with_state(tokens, crate::web::authorize));
    // Each request knows its peer's address (the SQL endpoint admits per address).
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(%error, "the HTTP listener stopped");
    }
}

async fn ready(State(http): State<Http>) -> impl IntoResponse {
    match sqlx::query("select 1").execute(&http.pool).await {
        Ok(_) => (StatusCode::OK, "ready\n".to_string()),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("PostgreSQL: {error}\n")),
    }
}

async fn metrics(State(http): State<Http>) -> impl IntoResponse {
    match page(&http).await {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("cannot read the queue: {error}\n"),
        ),
    }
}

async fn page(http: &Http) -> crate::Result<String> {
    let t = &http.telemetry;
    let states: Vec<(String, i64)> = sqlx::query_as("select state, count(*) from trials group by state")
        .fetch_all(&http.pool)
        .await?;
    let workers = db::list_workers(&http.pool, http.lease_ttl).await?;
    let mut p = Page::new();
    p.family("ablate_trials", "gauge", "Trials by state, over every experiment.");
    for state in ["pending", "running", "succeeded", "failed", "pruned", "cancelled"] {
        let n = states.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
        p.sample("ablate_trials", &[("state", state)], n as f64);
    }
    p.family(
        "ablate_workers",
        "gauge",
        "Registered workers by health: ok, unhealthy, or lost (unheard of for a lease TTL).",
    );
    for health in ["ok", "unhealthy", "lost"] {
        let n = workers
            .iter()
            .filter(|w| match health {
                "lost" => w.lost,
                "unhealthy" => !w.lost && w.unhealthy.is_some(),
                _ => !w.lost && w.unhealthy.is_none(),
            })
            .count();
        p.sample("ablate_workers", &[("health", health)], n as f64);
    }
    let live = workers.iter().filter(|w| !w.lost);
    let (slots, busy) = live.fold((0, 0), |(s, b), w| (s + w.devices.len() as i64, b + w.running));
    p.family(
        "ablate_slots",
        "gauge",
        "Device slots of live workers: busy (running a trial) or free.",
    );
    p.sample("ablate_slots", &[("state", "busy")], busy as f64);
    p.sample("ablate_slots", &[("state", "free")], (slots - busy).max(0) as f64);
    p.counter(
        "ablate_trials_leased_total",
        "Trials handed to workers under a lease.",
        &t.trials_leased,
    )
    .histogram(
        "ablate_lease_duration_seconds",
        "Time to answer a worker's lease call.",
        &t.lease_seconds,
    )
    .counter(
        "ablate_metric_points_total",
        "Metric points made durable.",
        &t.metric_points,
    )
    .histogram(
        "ablate_metric_batch_duration_seconds",
        "Time to make one metric batch durable.",
        &t.metric_batch_seconds,
    )
    .counter(
        "ablate_reaper_requeues_total",
        "Trials whose lease expired, put back in the queue or failed by the reaper.",
        &t.reaper_requeues,
    );
    p.family(
        "ablate_trial_completions_total",
        "counter",
        "Trial attempts workers reported ended, by outcome.",
    );
    for (outcome, c) in [
        ("succeeded", &t.completions_succeeded),
        ("failed", &t.completions_failed),
        ("crashed", &t.completions_crashed),
        ("paused", &t.completions_paused),
    ] {
        p.sample(
            "ablate_trial_completions_total",
            &[("outcome", outcome)],
            c.get() as f64,
        );
    }
    Ok(p.text())
}
