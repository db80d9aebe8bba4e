//! `ablate-bench` (run it with `cargo xtask bench`): control-plane and metric
//! ingest throughput through a real coordinator over gRPC on loopback and a
//! durable PostgreSQL, beside raw PostgreSQL baselines measured in the same run.
//! It prints a table; it asserts nothing about time. `ablate-bench dsir` runs only
//! the DSIR rows: documents/s of our importance weights beside the reference
//! package's (data-selection 1.0.3, from the python named by ABLATE_DSIR_PYTHON),
//! on the same corpus in the same run.

use std::time::{Duration, Instant};

use ablate_coordinator::{Coordinator, Options};
use ablate_schema::proto::{self, experiments_client::ExperimentsClient, workers_client::WorkersClient};
use sqlx::postgres::PgPoolOptions;
use tonic::transport::Channel;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Row {
    what: String,
    ours: f64,
    unit: &'static str,
    reference: &'static str,
    target: &'static str,
    extra: String,
}

fn spec(name: &str, trials: usize) -> String {
    format!(
        "name = \"{name}\"\nfamily = \"train\"\n[base]\noptimizer = \"adam\"\nlr = 0.001\nsteps = 1\n[sweep]\nsearcher = \"grid\"\nparams.seed = {{ range = [0, {}] }}\n",
        trials - 1
    )
}

async fn submit(addr: &str, name: &str, trials: usize) -> Result<String> {
    let mut client = ExperimentsClient::connect(addr.to_string()).await?;
    let response = client
        .submit(proto::SubmitRequest {
            spec_text: spec(name, trials),
            format: "toml".into(),
        })
        .await?;
    Ok(response.into_inner().experiment_id)
}

async fn register(client: &mut WorkersClient<Channel>) -> Result<String> {
    let id = uuid::Uuid::new_v4().to_string();
    client
        .register(proto::RegisterRequest {
            worker_id: id.clone(),
            hostname: "bench".into(),
            devices: vec!["cpu:0".into()],
        })
        .await?;
    Ok(id)
}

/// Submit `trials` no-op trials, then `workers` simulated workers lease (up to
/// `batch` at a time) and complete them until none are left.
async fn lifecycles(addr: &str, workers: usize, trials: usize, batch: u32) -> Result<(f64, Duration, Duration)> {
    let start = Instant::now();
    submit(addr, &format!("bench-{workers}"), trials).await?;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = WorkersClient::connect(addr).await?;
            let id = register(&mut client).await?;
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                let leased = client
                    .lease(proto::LeaseRequest {
                        worker_id: id.clone(),
                        max_trials: batch,
                    })
                    .await?
                    .into_inner()
                    .trials;
                latencies.push(t.elapsed());
                if leased.is_empty() {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(latencies);
                }
                for trial in leased {
                    client
                        .complete(proto::CompleteRequest {
                            trial_id: trial.trial_id,
                            lease_token: trial.lease_token,
                            outcome: "succeeded".into(),
                            error: String::new(),
                            stderr_tail: String::new(),
                            outputs_json: String::new(),
                        })
                        .await?;
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let wall = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    Ok((trials as f64 / wall.as_secs_f64(), pct(0.5), pct(0.99)))
}

/// Stream `per_trial` points for each of `trials` leased trials in batches of `batch` points.
async fn metric_ingest(addr: &str, streams: usize, per_trial: usize, batch: usize) -> Result<f64> {
    submit(addr, "bench-metrics", streams).await?;
    let mut client = WorkersClient::connect(addr.to_string()).await?;
    let id = register(&mut client).await?;
    let leased = client
        .lease(proto::LeaseRequest {
            worker_id: id,
            max_trials: streams as u32,
        })
        .await?
        .into_inner()
        .trials;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for trial in leased {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let names = vec!["train_loss".to_string(), "grad_norm".to_string()];
            let batches: Vec<proto::MetricBatch> = (0..per_trial / batch)
                .map(|b| {
                    let steps: Vec<i64> = (0..batch).map(|i| ((b * batch + i) / 2) as i64).collect();
                    proto::MetricBatch {
                        seq: b as u64 + 1,
                        trial_id: trial.trial_id.clone(),
                        lease_token: trial.lease_token.clone(),
                        names: names.clone(),
                        name_index: (0..batch).map(|i| (i % 2) as u32).collect(),
                        values: steps.iter().map(|s| 1.0 / (1.0 + *s as f64)).collect(),
                        steps,
                    }
                })
                .collect();
            let expected = batches.len();
            let mut acks = client.stream_metrics(tokio_stream::iter(batches)).await?.into_inner();
            let mut durable = 0;
            while let Some(ack) = acks.message().await? {
                if ack.status != "durable" {
                    return Err(format!("batch {} not durable: {} {}", ack.seq, ack.status, ack.error).into());
                }
                durable += 1;
                if durable == expected {
                    break;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(durable * batch)
        }));
    }
    let mut points = 0;
    for task in tasks {
        points += task.await??;
    }
    Ok(points as f64 / start.elapsed().as_secs_f64())
}

/// Raw PostgreSQL: single-row INSERT, one durable commit each, from `conns` connections.
async fn raw_commits(url: &str, conns: usize, per_conn: usize) -> Result<f64> {
    let pool = PgPoolOptions::new().max_connections(conns as u32).connect(url).await?;
    sqlx::query("create table if not exists bench_raw (id bigserial primary key, v float8)")
        .execute(&pool)
        .await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_conn {
                sqlx::query("insert into bench_raw (v) values ($1)")
                    .bind(i as f64)
                    .execute(&pool)
                    .await?;
            }
            Ok::<_, sqlx::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((conns * per_conn) as f64 / start.elapsed().as_secs_f64())
}

/// Raw PostgreSQL: rows/s for multi-row INSERT ... SELECT FROM UNNEST, `batch` rows per commit.
async fn raw_unnest(url: &str, batches: usize, batch: usize) -> Result<f64> {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    let steps: Vec<i64> = (0..batch as i64).collect();
    let values: Vec<f64> = steps.iter().map(|s| *s as f64).collect();
    let start = Instant::now();
    for _ in 0..batches {
        sqlx::query("insert into bench_raw (v) select * from unnest($1::float8[])")
            .bind(&values)
            .execute(&pool)
            .await?;
    }
    Ok((batches * batch) as f64 / start.elapsed().as_secs_f64())
}

fn print(rows: &[Row]) {
    println!(
        "\n{:<58} {:>12} {:<9} {:<34} {:<16} notes",
        "benchmark", "ours", "unit", "reference (BENCHMARKS.md)", "target"
    );
    println!("{}", "-".repeat(150));
    for r in rows {
        println!(
            "{:<58} {:>12.0} {:<9} {:<34} {:<16} {}",
            r.what, r.ours, r.unit, r.reference, r.target, r.extra
        );
    }
}

/// The DSIR corpus `cargo xtask provision` builds: the pool's shards and the news target.
fn dsir_corpus() -> Result<(Vec<std::path::PathBuf>, std::path::PathBuf)> {
    let root = std::path::PathBuf::from(ablate_experiments::nn::locations::data_root()).join("dsir");
    let mut pool: Vec<_> = std::fs::read_dir(root.join("pool"))
        .map_err(|e| format!("{}: {e}; run `cargo xtask provision`", root.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    pool.sort();
    Ok((pool, root.join("target/news.jsonl")))
}

/// Our importance weights over `docs` on `threads` threads (a featurizer each, cold): documents/s.
fn dsir_ours(docs: &[String], ratio: &[f64], threads: usize) -> f64 {
    use ablate_experiments::families::dsir::method::{log_weight, Featurizer, BUCKETS};
    let start = Instant::now();
    std::thread::scope(|scope| {
        for chunk in docs.chunks(docs.len().div_ceil(threads)) {
            scope.spawn(move || {
                let mut f = Featurizer::new(BUCKETS);
                chunk.iter().map(|d| log_weight(ratio, &f.features(d))).sum::<f64>()
            });
        }
    });
    docs.len() as f64 / start.elapsed().as_secs_f64()
}

/// The reference's importance weights (`compute_importance_weights`) on `procs` processes: documents/s.
fn dsir_reference(python: &str, pool: &[std::path::PathBuf], target: &std::path::Path, procs: usize) -> Result<f64> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/tests/support/dsir_reference.py");
    let work = std::env::temp_dir().join(format!("ablate-bench-dsir-{}-{procs}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let out = std::process::Command::new(python)
        .arg(script)
        .args(pool)
        .arg("--target")
        .arg(target)
        .args(["--k", "1000", "--num-proc", &procs.to_string(), "--work"])
        .arg(&work)
        .output()?;
    let _ = std::fs::remove_dir_all(&work);
    if !out.status.success() {
        return Err(format!("reference DSIR failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["documents"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(f64::INFINITY))
}

fn dsir_rows() -> Result<Vec<Row>> {
    use ablate_experiments::families::dsir::method::{self as dsir, Featurizer, BUCKETS};
    let (pool, target) = dsir_corpus()?;
    let mut docs = Vec::new();
    for path in &pool {
        let bytes = std::fs::read(path)?;
        docs.extend(
            dsir::parse_jsonl(&bytes, "text", &path.display().to_string())?
                .into_iter()
                .map(|d| d.text),
        );
    }
    let mut f = Featurizer::new(BUCKETS);
    let (mut raw, mut tgt) = (vec![0u64; BUCKETS as usize], vec![0u64; BUCKETS as usize]);
    for d in &docs {
        dsir::count(&mut raw, &f.features(d));
    }
    for d in dsir::parse_jsonl(&std::fs::read(&target)?, "text", "target")? {
        dsir::count(&mut tgt, &f.features(&d.text));
    }
    let ratio = dsir::log_ratio(&tgt, &raw);
    let python = std::env::var("ABLATE_DSIR_PYTHON").ok();
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let ours = dsir_ours(&docs, &ratio, threads);
        let reference = match &python {
            Some(py) => Some(dsir_reference(py, &pool, &target, threads)?),
            None => None,
        };
        rows.push(Row {
            what: format!(
                "DSIR importance weights, {} 128-word docs, {threads} core(s)",
                docs.len()
            ),
            ours,
            unit: "docs/s",
            reference: "data-selection 1,300 (1 proc), 1,900 (2)",
            target: ">= 26,000/s/core",
            extra: match reference {
                Some(r) => format!("reference measured now: {r:.0} docs/s; ours {:.1}x", ours / r),
                None => "reference not run: set ABLATE_DSIR_PYTHON (cargo xtask bench does)".into(),
            },
        });
    }
    Ok(rows)
}

#[tokio::main]
async fn main() -> Result {
    if std::env::args().nth(1).as_deref() == Some("dsir") {
        print(&dsir_rows()?);
        return Ok(());
    }
    let admin = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL (cargo xtask bench does)")?;
    let db = format!("ablate_bench_{}", uuid::Uuid::new_v4().simple());
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
    let coordinator = Coordinator::build(options).await?;
    let addr = format!("http://{}", coordinator.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coordinator.run(async {
        let _ = stopped.await;
    }));
    let synchronous_commit: String = sqlx::query_scalar("show synchronous_commit")
        .fetch_one(&admin_pool)
        .await?;
    let fsync: String = sqlx::query_scalar("show fsync").fetch_one(&admin_pool).await?;
    println!("PostgreSQL fsync={fsync} synchronous_commit={synchronous_commit}; coordinator at {addr}");

    let mut rows = Vec::new();
    for (workers, trials, batch) in [(1, 1000, 1), (8, 2000, 4), (64, 4000, 4)] {
        let (rate, p50, p99) = lifecycles(&addr, workers, trials, batch).await?;
        rows.push(Row {
            what: format!("no-op trial lifecycles, {workers} workers, lease batch {batch}"),
            ours: rate,
            unit: "trials/s",
            reference: "Optuna 8.9-57 trials/s",
            target: ">= 2,000/s",
            extra: format!("lease p50 {:.1} ms, p99 {:.1} ms", ms(p50), ms(p99)),
        });
    }
    for (streams, per_trial) in [(1, 200_000), (4, 200_000)] {
        let rate = metric_ingest(&addr, streams, per_trial, 4096).await?;
        rows.push(Row {
            what: format!("metric points worker -> durable row, {streams} stream(s)"),
            ours: rate,
            unit: "points/s",
            reference: "MLflow log_batch 2,481 rows/s",
            target: ">= 250,000/s",
            extra: "batches of 4,096 points over one gRPC stream each".into(),
        });
    }
    rows.push(Row {
        what: "raw PostgreSQL: 1-row INSERT per commit, 1 connection".into(),
        ours: raw_commits(&url, 1, 500).await?,
        unit: "rows/s",
        reference: "254 commits/s",
        target: "(baseline)",
        extra: String::new(),
    });
    rows.push(Row {
        what: "raw PostgreSQL: 1-row INSERT per commit, 16 connections".into(),
        ours: raw_commits(&url, 16, 200).await?,
        unit: "rows/s",
        reference: "",
        target: "(baseline)",
        extra: "concurrent commits share fsyncs".into(),
    });
    rows.extend(dsir_rows()?);
    rows.push(Row {
        what: "raw PostgreSQL: INSERT from UNNEST, 4,096 rows per commit".into(),
        ours: raw_unnest(&url, 100, 4096).await?,
        unit: "rows/s",
        reference: "36,463 rows/s (1,000/commit)",
        target: "(baseline)",
        extra: String::new(),
    });
    print(&rows);

    let _ = stop.send(());
    let _ = server.await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(&admin_pool)
    .await?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
