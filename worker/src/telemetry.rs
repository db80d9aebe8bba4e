//! The worker daemon's HTTP listener (`--metrics-listen`): Prometheus metrics
//! at `/metrics` (slots, trial exits by outcome, the metric spool's size, and
//! each GPU's memory and utilisation where nvidia-smi answers) and `/healthz`
//! (200 while the worker can start trials, 503 with the reason when it can't).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ablate_schema::exposition::{Counter, Page, CONTENT_TYPE};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

/// What the daemon counts as it runs trials.
#[derive(Default)]
pub struct Telemetry {
    pub slots: AtomicU64,
    pub busy: AtomicU64,
    pub succeeded: Counter,
    pub failed: Counter,
    pub crashed: Counter,
    pub stopped: Counter,
    pub paused: Counter,
    pub not_started: Counter,
}

impl Telemetry {
    /// Counts a trial's end by the outcome the worker reported.
    pub fn exit(&self, outcome: &str) {
        match outcome {
            "succeeded" => self.succeeded.add(1),
            "failed" => self.failed.add(1),
            "crashed" => self.crashed.add(1),
            "stopped" => self.stopped.add(1),
            "paused" => self.paused.add(1),
            _ => self.not_started.add(1),
        }
    }
}

#[derive(Clone)]
struct Http {
    telemetry: Arc<Telemetry>,
    spool: PathBuf,
    health: Arc<Mutex<Option<String>>>,
}

/// Serves the listener for the daemon's life.
pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    spool: PathBuf,
    health: Arc<Mutex<Option<String>>>,
) {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(healthz))
        .with_state(Http {
            telemetry,
            spool,
            health,
        });
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "the metrics listener stopped");
    }
}

async fn healthz(State(http): State<Http>) -> impl IntoResponse {
    match http.health.lock().expect("health lock").clone() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("cannot start trials: {why}\n")),
    }
}

async fn metrics(State(http): State<Http>) -> impl IntoResponse {
    let t = &http.telemetry;
    let mut p = Page::new();
    let slots = t.slots.load(Ordering::Relaxed);
    let busy = t.busy.load(Ordering::Relaxed).min(slots);
    p.family(
        "ablate_worker_slots",
        "gauge",
        "This worker's device slots: busy (a trial in hand) or free.",
    )
    .sample("ablate_worker_slots", &[("state", "busy")], busy as f64)
    .sample("ablate_worker_slots", &[("state", "free")], (slots - busy) as f64);
    p.family(
        "ablate_worker_trial_exits_total",
        "counter",
        "Trials this worker ran to an end, by outcome (stopped: cancelled, pruned or lease lost; paused: at an ASHA rung; not_started: given back).",
    );
    for (outcome, c) in [
        ("succeeded", &t.succeeded),
        ("failed", &t.failed),
        ("crashed", &t.crashed),
        ("stopped", &t.stopped),
        ("paused", &t.paused),
        ("not_started", &t.not_started),
    ] {
        p.sample(
            "ablate_worker_trial_exits_total",
            &[("outcome", outcome)],
            c.get() as f64,
        );
    }
    p.gauge(
        "ablate_worker_spool_bytes",
        "Bytes of metric batches spooled on disk while the coordinator is away.",
        dir_bytes(&http.spool) as f64,
    );
    let gpus = tokio::task::spawn_blocking(gpus).await.unwrap_or_default();
    let per_gpu: [GpuGauge; 3] = [
        (
            "ablate_worker_gpu_memory_used_bytes",
            "GPU memory in use (nvidia-smi).",
            |g| g.used_mib * 1048576.0,
        ),
        (
            "ablate_worker_gpu_memory_total_bytes",
            "GPU memory (nvidia-smi).",
            |g| g.total_mib * 1048576.0,
        ),
        (
            "ablate_worker_gpu_utilization_ratio",
            "GPU utilisation, 0 to 1 (nvidia-smi).",
            |g| g.utilization / 100.0,
        ),
    ];
    if !gpus.is_empty() {
        for (name, help, value) in per_gpu {
            p.family(name, "gauge", help);
            for g in &gpus {
                p.sample(name, &[("device", &g.device), ("name", &g.name)], value(g));
            }
        }
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], p.text())
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A per-GPU gauge: its name, its help, and its value for one GPU.
type GpuGauge = (&'static str, &'static str, fn(&Gpu) -> f64);

struct Gpu {
    device: String,
    name: String,
    used_mib: f64,
    total_mib: f64,
    utilization: f64,
}

/// Each GPU's memory and utilisation from nvidia-smi; none where it is missing.
fn gpus() -> Vec<Gpu> {
    let Ok(out) = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
            "--format=csv,noheader,nounits",
        ])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
            Some(Gpu {
                device: format!("cuda:{}", f.first()?),
                name: f.get(1)?.to_string(),
                used_mib: num(2)?,
                total_mib: num(3)?,
                utilization: num(4).unwrap_or(0.0),
            })
        })
        .collect()
}

/// The memory of GPU `device` (such as `cuda:0`) in bytes, from nvidia-smi; `None` where it doesn't answer.
pub fn gpu_memory_total(device: &str) -> Option<u64> {
    let gpu = gpus().into_iter().find(|g| g.device == device)?;
    Some((gpu.total_mib * 1024.0 * 1024.0) as u64)
}
