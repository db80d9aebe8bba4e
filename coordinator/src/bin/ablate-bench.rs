//! `ablate-bench` (run it with `cargo xtask bench`): ablate beside its peers
//! and beside raw PostgreSQL, all measured in the same run on this machine, so
//! the ratios hold on any machine even where the absolute figures move. It
//! prints tables and, with `--json FILE`, writes the side-by-side rows as a
//! JSON list of `{name, ours, peer, peer_name, unit, ratio}` (ratio > 1: ours
//! is better). It asserts nothing about time.
//!
//! - Control plane: trial lifecycles through a real coordinator over gRPC on
//!   loopback and a durable PostgreSQL (beside Optuna's RDB storage), metric
//!   ingest (beside MLflow's `log_batch`), each also as a share of the raw
//!   PostgreSQL rows of the same run (one-row commits, UNNEST and binary COPY
//!   into a table shaped and keyed like `metrics`).
//! - Sweep bookkeeping: sleeping trials on 2 slots through a real worker daemon
//!   (ABLATE_WORKER_BIN), beside Ray Tune and Optuna on the same work.
//! - The training step: the quickstart MLP and a small GPT in tch beside the
//!   same models in PyTorch from Python, same libtorch, same threads.
//! - DSIR: documents/s of our importance weights beside data-selection 1.0.3.
//! - Tracing: the lifecycle and ingest rows again, each in a process of its own
//!   logging as a deployed coordinator does, once exporting traces (OTLP/gRPC to
//!   a receiver in this process) and once with traces off, side by side.
//!
//! - Command trials: a no-op program's slot time beside a built-in trial's in a
//!   warm process, and metric points/s from a Python program through the
//!   `ablate` package beside a built-in trial's (`ablate-bench commands` runs
//!   only these).
//! - Dashboard: the web dashboard's data requests and its experiment page in
//!   headless Chromium on an experiment of 1,000 trials x 10,000 steps x 2
//!   metrics (`ablate-bench dashboard` runs only these).
//!
//! - Scale: 100 million points through the real ingest path into chunks, then
//!   storage, curves, the trial table of 10,000 trials, `ablate status`, a
//!   best-per-width query and the experiment page, beside raw binary COPY and
//!   MLflow given the same runs and points (`ablate-bench scale`, alone).
//!
//! The peers run from ABLATE_PEERS_PYTHON (xtask/scripts/peers.py); rows whose
//! peer is missing say so. `ablate-bench dsir` runs only the DSIR rows,
//! `ablate-bench control` only the control plane's and the tracing rows;
//! `ablate-bench lifecycles WORKERS TRIALS BATCH` runs one lifecycle row once;
//! `ablate-bench traced` runs the rows the tracing section compares and
//! prints them as JSON (traces go where OTEL_EXPORTER_OTLP_ENDPOINT says).

use std::time::{Duration, Instant};

#[path = "ablate-bench/commands.rs"]
mod commands;
#[path = "ablate-bench/control.rs"]
mod control;
#[path = "ablate-bench/dashboard.rs"]
mod dashboard;
#[path = "ablate-bench/dsir.rs"]
mod dsir;
#[path = "ablate-bench/peers.rs"]
mod peers;
#[path = "ablate-bench/scale.rs"]
mod scale;
#[path = "ablate-bench/training.rs"]
mod training;

use control::*;
use dsir::*;
use peers::*;
use training::*;

use ablate_coordinator::{Coordinator, Options};
use ablate_schema::proto::{self, experiments_client::ExperimentsClient, workers_client::WorkersClient};
use sqlx::postgres::PgPoolOptions;
use tonic::transport::Channel;
type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One figure of ours, beside a peer's on the same work where there is one.
struct Row {
    name: String,
    ours: f64,
    peer: Option<f64>,
    peer_name: String,
    unit: &'static str,
    /// Rates: larger is better; times: smaller is.
    higher_is_better: bool,
    note: String,
}

impl Row {
    fn new(name: impl Into<String>, ours: f64, unit: &'static str) -> Row {
        Row {
            name: name.into(),
            ours,
            peer: None,
            peer_name: String::new(),
            unit,
            higher_is_better: true,
            note: String::new(),
        }
    }

    fn peer(mut self, name: &str, figure: std::result::Result<f64, String>) -> Row {
        self.peer_name = name.into();
        match figure {
            Ok(f) => self.peer = Some(f),
            Err(why) => self.note = format!("{} not measured: {why}", name),
        }
        self
    }

    fn note(mut self, note: impl Into<String>) -> Row {
        let note = note.into();
        self.note = if self.note.is_empty() {
            note
        } else {
            format!("{note}; {}", self.note)
        };
        self
    }

    fn lower_is_better(mut self) -> Row {
        self.higher_is_better = false;
        self
    }

    /// How many times better ours is than the peer's.
    fn ratio(&self) -> Option<f64> {
        let peer = self.peer.filter(|p| *p > 0.0)?;
        Some(if self.higher_is_better {
            self.ours / peer
        } else {
            peer / self.ours
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "ours": self.ours,
            "peer": self.peer,
            "peer_name": self.peer_name,
            "unit": self.unit,
            "ratio": self.ratio(),
        })
    }
}

fn print(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "{:<62} {:>12} {:>12} {:<24} {:<10} {:>7}  notes",
        "benchmark", "ours", "peer", "peer (same run)", "unit", "ratio"
    );
    println!("{}", "-".repeat(160));
    for r in rows {
        let figure = |f: f64| {
            if f.abs() >= 100.0 {
                format!("{f:.0}")
            } else {
                format!("{f:.2}")
            }
        };
        println!(
            "{:<62} {:>12} {:>12} {:<24} {:<10} {:>7}  {}",
            r.name,
            figure(r.ours),
            r.peer.map(figure).unwrap_or_else(|| "-".into()),
            r.peer_name,
            r.unit,
            r.ratio().map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into()),
            r.note
        );
    }
}

fn write_json(path: &str, rows: &[Row]) -> Result {
    let list: Vec<serde_json::Value> = rows.iter().map(Row::json).collect();
    std::fs::write(path, serde_json::to_vec_pretty(&list)?)?;
    eprintln!("wrote {path}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // The benches that stand alone: their table, and its rows as JSON when asked.
    let alone = match args.first().map(String::as_str) {
        Some("stop-rule") => Some((
            "Critical-batch stop rule (cbs-mnist, 112 runs, ablate-worker sweep on 2 CPU slots)",
            stop_rule_rows()?,
        )),
        Some("fused") => Some((
            "Fused trials (muP width sweep MLPs on digits, 300 steps, groups of 8 against one by one, 1 CPU thread)",
            fused_rows()?,
        )),
        Some("search") => Some((SEARCH_TITLE, search_rows(search_database(None).await))),
        Some("dsir") => Some(("DSIR", dsir_rows()?)),
        _ => None,
    };
    if let Some((title, rows)) = alone {
        print(title, &rows);
        if let Some(path) = json {
            write_json(&path, &rows)?;
        }
        return Ok(());
    }
    let traced = args.first().map(String::as_str) == Some("traced");
    let _traces = if traced {
        Some(ablate_schema::trace::init("ablate-bench")?)
    } else {
        None
    };
    let admin = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL (cargo xtask bench does)")?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let db = format!("ablate_bench_{tag}");
    let admin_pool = PgPoolOptions::new().max_connections(1).connect(&admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}")))
        .execute(&admin_pool)
        .await?;
    let url = match admin.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{db}"),
        None => return Err("DATABASE_URL must name a database".into()),
    };
    let mut options = Options::new(url.clone(), "127.0.0.1:0".parse()?);
    options.max_connections = 32;
    // The workers' object store, where command trials' code is kept.
    let work_dir = std::env::temp_dir().join(format!("ablate-bench-{tag}"));
    std::fs::create_dir_all(&work_dir)?;
    options.object_store = Some(work_dir.join("objects").display().to_string());
    options.http_listen = Some("127.0.0.1:0".parse()?);
    let coordinator = Coordinator::build(options).await?;
    let addr = format!("http://{}", coordinator.local_addr());
    let http = coordinator.http_addr().ok_or("no HTTP listener")?.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coordinator.run(async {
        let _ = stopped.await;
    }));
    let pool = PgPoolOptions::new().max_connections(2).connect(&url).await?;
    let synchronous_commit: String = sqlx::query_scalar("show synchronous_commit")
        .fetch_one(&admin_pool)
        .await?;
    let fsync: String = sqlx::query_scalar("show fsync").fetch_one(&admin_pool).await?;
    if !traced {
        println!("PostgreSQL fsync={fsync} synchronous_commit={synchronous_commit}; coordinator at {addr}");
    }

    let only_control = args.first().map(String::as_str) == Some("control");
    let only_dashboard = args.first().map(String::as_str) == Some("dashboard");
    let only_commands = args.first().map(String::as_str) == Some("commands");
    let only_scale = args.first().map(String::as_str) == Some("scale");
    // `ablate-bench lifecycles WORKERS TRIALS BATCH`: one lifecycle row, for profiling.
    let only_lifecycles = (args.first().map(String::as_str) == Some("lifecycles")).then(|| {
        let n = |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
        (n(1, 8), n(2, 2000), n(3, 4) as u32)
    });
    let commands_title = "Command trials (median of 3 runs)";
    let measured = async {
        if traced {
            return Ok(vec![("traced", traced_rows(&addr).await?)]);
        }
        let dashboard_title = "Dashboard (1,000 trials x 10,000 steps x 2 metrics; median of 3)";
        if only_dashboard {
            return Ok(vec![(dashboard_title, dashboard::rows(&addr, &http, &pool).await?)]);
        }
        if let Some((workers, trials, batch)) = only_lifecycles {
            let (rate, p50, p99) = lifecycles(&addr, workers, trials, batch).await?;
            let row = Row::new(
                format!("trial lifecycles, {workers} worker(s), leases and completions of {batch}"),
                rate,
                "trials/s",
            )
            .note(format!("lease p50 {:.1} ms, p99 {:.1} ms", ms(p50), ms(p99)));
            return Ok(vec![("Lifecycles (one run)", vec![row])]);
        }
        if only_scale {
            return Ok(vec![(
                "Results at scale (one run; reads median of 3)",
                scale::rows(&addr, &http, &url, &pool, &admin, &tag).await?,
            )]);
        }
        if only_commands {
            return Ok(vec![(commands_title, commands::rows(&addr, &pool, &work_dir).await?)]);
        }
        let mut sections = vec![(
            "Control plane (median of 3 runs)",
            control_plane(&addr, &url, &admin_pool, &admin, &tag).await?,
        )];
        sections.push((
            "Tracing (median of 3 runs each, one process per column)",
            tracing().await?,
        ));
        if !only_control {
            sections.push((
                "Sweep bookkeeping (one run each)",
                sweeps(&addr, &pool, &admin_pool, &admin, &tag).await?,
            ));
            sections.push(("Training step (median of 3 runs)", training_steps()));
            sections.push((commands_title, commands::rows(&addr, &pool, &work_dir).await?));
            sections.push(("DSIR", dsir_rows()?));
            sections.push((SEARCH_TITLE, search_rows(search_database(Some(&admin_pool)).await)));
            sections.push((dashboard_title, dashboard::rows(&addr, &http, &pool).await?));
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(sections)
    }
    .await;
    let _ = stop.send(());
    let _ = server.await;
    pool.close().await;
    let dbs: Vec<String> = sqlx::query_scalar("select datname::text from pg_database where datname like $1")
        .bind(format!("ablate_bench_%{tag}"))
        .fetch_all(&admin_pool)
        .await?;
    for name in dbs {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists {name} with (force)"
        )))
        .execute(&admin_pool)
        .await?;
    }
    let sections = measured?;
    if traced {
        let rows: Vec<serde_json::Value> = sections
            .iter()
            .flat_map(|(_, rows)| rows.iter().map(Row::json))
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    for (title, rows) in &sections {
        print(title, rows);
    }
    if let Some(path) = json {
        let all: Vec<Row> = sections.into_iter().flat_map(|(_, rows)| rows).collect();
        write_json(&path, &all)?;
    }
    Ok(())
}
const SEARCH_TITLE: &str =
    "Search (synthetic task, minimum 0; median over 10 seeds of the best of 60 trials one at a time, over 20 of 64 with 8 at once; ZDT1: hypervolume, 10 seeds)";

/// A database of its own for Optuna's RDB storage in the search rows (on `admin`'s
/// server, or DATABASE_URL's); the error says why there is none.
async fn search_database(admin: Option<&sqlx::PgPool>) -> std::result::Result<String, String> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL (cargo xtask bench does)".to_string())?;
    let name = format!("ablate_bench_optuna_search_{}", uuid::Uuid::new_v4().simple());
    let made = match admin {
        Some(pool) => peer_database(pool, &url, &name).await,
        None => match PgPoolOptions::new().max_connections(1).connect(&url).await {
            Ok(pool) => peer_database(&pool, &url, &name).await,
            Err(e) => Err(e.into()),
        },
    };
    made.map_err(|e| format!("a database for Optuna's storage: {e}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
