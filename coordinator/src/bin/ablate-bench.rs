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
//! - Dashboard: the web dashboard's data requests and its experiment page in
//!   headless Chromium on an experiment of 1,000 trials x 10,000 steps x 2
//!   metrics (`ablate-bench dashboard` runs only these).
//!
//! The peers run from ABLATE_PEERS_PYTHON (xtask/scripts/peers.py); rows whose
//! peer is missing say so. `ablate-bench dsir` runs only the DSIR rows,
//! `ablate-bench control` only the control plane's and the tracing rows;
//! `ablate-bench traced` runs the rows the tracing section compares and
//! prints them as JSON (traces go where OTEL_EXPORTER_OTLP_ENDPOINT says).

use std::time::{Duration, Instant};

#[path = "ablate-bench/dashboard.rs"]
mod dashboard;

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
            ..Default::default()
        })
        .await?;
    Ok(id)
}

/// Submit `trials` no-op trials, then `workers` simulated workers lease (up to
/// `batch` at a time) and complete them (a batch in one CompleteMany call) until none are left.
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
                        free_gpus: 1,
                        slot_memory_bytes: 0,
                    })
                    .await?
                    .into_inner()
                    .trials;
                latencies.push(t.elapsed());
                if leased.is_empty() {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(latencies);
                }
                if batch == 1 {
                    for trial in leased {
                        client.complete(proto::CompleteRequest::succeeded(trial)).await?;
                    }
                } else {
                    // What a batch's trials report together goes in one call and one commit.
                    let completions = leased.into_iter().map(proto::CompleteRequest::succeeded).collect();
                    client.complete_many(proto::CompleteManyRequest { completions }).await?;
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
            free_gpus: 1,
            slot_memory_bytes: 0,
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
            // Done with it: a trial left running would be re-leased by the sweep rows' worker.
            client.complete(proto::CompleteRequest::succeeded(trial)).await?;
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

/// A table shaped and keyed like `metrics`, for the raw baselines of metric ingest.
async fn metrics_shaped(pool: &sqlx::PgPool) -> Result {
    sqlx::query(
        "create table if not exists bench_metrics (
             trial_id uuid not null, name_id integer not null, step bigint not null,
             value double precision not null, recorded_at timestamptz not null default now(),
             primary key (trial_id, name_id, step))",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Raw PostgreSQL: rows/s for INSERT ... SELECT FROM UNNEST into the metrics-shaped
/// table, `batch` rows (two metrics) per commit.
async fn raw_unnest(url: &str, batches: usize, batch: usize) -> Result<f64> {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    metrics_shaped(&pool).await?;
    let names: Vec<i32> = (0..batch).map(|i| (i % 2) as i32).collect();
    let steps: Vec<i64> = (0..batch as i64).map(|i| i / 2).collect();
    let values: Vec<f64> = steps.iter().map(|s| 1.0 / (1.0 + *s as f64)).collect();
    let start = Instant::now();
    for _ in 0..batches {
        sqlx::query(
            "insert into bench_metrics (trial_id, name_id, step, value)
             select $1, * from unnest($2::int4[], $3::int8[], $4::float8[])",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(&names)
        .bind(&steps)
        .bind(&values)
        .execute(&pool)
        .await?;
    }
    Ok((batches * batch) as f64 / start.elapsed().as_secs_f64())
}

/// Raw PostgreSQL: rows/s for `COPY ... FROM STDIN (FORMAT binary)` into the
/// metrics-shaped table, `batch` rows per COPY (one commit each).
async fn raw_copy(url: &str, batches: usize, batch: usize) -> Result<f64> {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    metrics_shaped(&pool).await?;
    let mut conn = pool.acquire().await?;
    let start = Instant::now();
    for _ in 0..batches {
        let trial = uuid::Uuid::new_v4();
        // The binary format: signature, flags, header extension, then per row the
        // field count and each field as length + big-endian bytes; -1 ends it.
        let mut data = Vec::with_capacity(19 + batch * 46 + 2);
        data.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        data.extend_from_slice(&0i32.to_be_bytes());
        data.extend_from_slice(&0i32.to_be_bytes());
        for i in 0..batch {
            let step = (i / 2) as i64;
            data.extend_from_slice(&4i16.to_be_bytes());
            data.extend_from_slice(&16i32.to_be_bytes());
            data.extend_from_slice(trial.as_bytes());
            data.extend_from_slice(&4i32.to_be_bytes());
            data.extend_from_slice(&((i % 2) as i32).to_be_bytes());
            data.extend_from_slice(&8i32.to_be_bytes());
            data.extend_from_slice(&step.to_be_bytes());
            data.extend_from_slice(&8i32.to_be_bytes());
            data.extend_from_slice(&(1.0 / (1.0 + step as f64)).to_be_bytes());
        }
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let mut copy = conn
            .copy_in_raw("copy bench_metrics (trial_id, name_id, step, value) from stdin (format binary)")
            .await?;
        copy.send(data).await?;
        copy.finish().await?;
    }
    Ok((batches * batch) as f64 / start.elapsed().as_secs_f64())
}

/// The median of three runs of a short measurement, by its first figure.
async fn median3<T, F, Fut>(mut measure: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(f64, T)>>,
{
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(measure().await?);
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(runs.swap_remove(1).1)
}

/// The median of three runs of a measurement that yields one figure.
async fn median3_of<F, Fut>(mut measure: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    median3(|| {
        let run = measure();
        async move {
            let r = run.await?;
            Ok((r, r))
        }
    })
    .await
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

/// Runs `peers.py ARGS` with the peers' python; its JSON answer.
fn peer(args: &[&str]) -> std::result::Result<serde_json::Value, String> {
    let python = std::env::var("ABLATE_PEERS_PYTHON")
        .map_err(|_| "set ABLATE_PEERS_PYTHON (cargo xtask bench does)".to_string())?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/scripts/peers.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
        return Err(format!("peers.py {}: {}", args.join(" "), last));
    }
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("peers.py {}: {e}", args.join(" ")))
}

fn field(v: &serde_json::Value, name: &str) -> std::result::Result<f64, String> {
    v[name].as_f64().ok_or_else(|| format!("no {name} in {v}"))
}

/// cbs-mnist run whole and under the stop rule (`cbs.stop_at_targets`): the steps each spent,
/// the wall time, and whether the steps-to-target tables are the same.
/// Trials per hour of the muP width sweep's MLPs, fused in groups of 8 and one by one
/// (`ablate-worker bench-fused`: the trial code itself, in one process, on the CPU).
fn fused_rows() -> Result<Vec<Row>> {
    let bin = std::env::var("ABLATE_WORKER_BIN").map_err(|_| "set ABLATE_WORKER_BIN (cargo xtask bench does)")?;
    let out = std::process::Command::new(&bin)
        .args(["bench-fused", "--members", "8", "--threads", "1"])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "ablate-worker bench-fused: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|line| -> Result<Row> {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let figure = |k: &str| {
                v[k].as_f64()
                    .ok_or_else(|| format!("bench-fused printed no {k}: {line}"))
            };
            Ok(Row::new(
                format!("width {} MLP, fused x{}", v["width"], v["members"]),
                figure("fused_trials_per_hour")?,
                "trials/h",
            )
            .peer("one by one", figure("unfused_trials_per_hour")))
        })
        .collect()
}

fn stop_rule_rows() -> Result<Vec<Row>> {
    let bin = std::env::var("ABLATE_WORKER_BIN").map_err(|_| "set ABLATE_WORKER_BIN (cargo xtask bench does)")?;
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/specs/cbs-mnist.toml");
    let run = |sets: &[&str]| -> Result<(serde_json::Value, u64, f64)> {
        let out = std::env::temp_dir().join(format!("ablate-bench-cbs-{}-{}.json", std::process::id(), sets.len()));
        let start = Instant::now();
        let status = std::process::Command::new(&bin)
            .args([
                "sweep",
                &spec.to_string_lossy(),
                "--devices",
                "cpu:2",
                "--out",
                &out.to_string_lossy(),
            ])
            .args(sets)
            .stdout(std::process::Stdio::null())
            .status()?;
        let wall = start.elapsed().as_secs_f64();
        if !status.success() {
            return Err(format!("ablate-worker sweep cbs-mnist: {status}").into());
        }
        let result: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
        let _ = std::fs::remove_file(&out);
        let steps = result["trials"]
            .as_array()
            .ok_or("no trials in the sweep's output")?
            .iter()
            .map(|t| match t["outputs"]["stopped_early"]["step"].as_u64() {
                Some(step) => step,
                None => {
                    let p = &t["params"];
                    let by_examples = p["examples"]
                        .as_u64()
                        .unwrap_or(0)
                        .div_ceil(p["batch_size"].as_u64().unwrap_or(1));
                    p["steps"].as_u64().unwrap_or(0).max(by_examples)
                }
            })
            .sum();
        Ok((result["report"]["tables"][0].clone(), steps, wall))
    };
    let (full_table, full_steps, full_wall) = run(&[])?;
    let (table, steps, wall) = run(&["--set", "base.cbs.stop_at_targets=true"])?;
    let same = if table == full_table {
        "the same steps-to-target table".to_string()
    } else {
        format!("THE STEPS-TO-TARGET TABLES DIFFER: {table} against {full_table}")
    };
    Ok(vec![
        Row::new("training steps, with the stop rule", steps as f64, "steps")
            .lower_is_better()
            .peer("without it", Ok(full_steps as f64))
            .note(same),
        Row::new("wall time, with the stop rule", wall, "s")
            .lower_is_better()
            .peer("without it", Ok(full_wall)),
    ])
}

/// TPE and random search at the same budget on the synthetic task (`ablate_experiments::tpe`),
/// ours (the proposer the coordinator runs) beside Optuna's samplers with the same seeds.
fn search_rows() -> Vec<Row> {
    use ablate_experiments::tpe::{best_of, median};
    let (budget, startup, seeds) = (60, 10, 10u64);
    let ours = |tpe: bool| median((0..seeds).map(|s| best_of(budget, startup, s, tpe)).collect());
    let optuna = peer(&[
        "search",
        "--trials",
        &budget.to_string(),
        "--startup",
        &startup.to_string(),
        "--seeds",
        &seeds.to_string(),
    ]);
    let figure = |name: &str| optuna.as_ref().map_err(Clone::clone).and_then(|v| field(v, name));
    let (tpe, random) = (ours(true), ours(false));
    vec![
        Row::new(format!("TPE ({startup} random first), best loss"), tpe, "loss")
            .lower_is_better()
            .peer("Optuna TPESampler", figure("tpe"))
            .note(format!("our random search at the same budget: {random:.4}")),
        Row::new("random search, best loss", random, "loss")
            .lower_is_better()
            .peer("Optuna RandomSampler", figure("random")),
    ]
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

/// Our importance weights end to end, as the reference's timed call does them: each
/// shard's JSONL read and parsed, its documents featurized and weighed, the weights
/// written to a file, on `threads` threads (a featurizer each, cold): documents/s.
fn dsir_ours(pool: &[std::path::PathBuf], ratio: &[f64], threads: usize) -> Result<f64> {
    use ablate_experiments::families::dsir::method::{self as dsir, log_weight, Featurizer, BUCKETS};
    let work = std::env::temp_dir().join(format!("ablate-bench-dsir-ours-{}-{threads}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let start = Instant::now();
    let counts: Vec<std::result::Result<usize, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pool
            .chunks(pool.len().div_ceil(threads))
            .map(|shards| {
                let work = &work;
                scope.spawn(move || {
                    let mut f = Featurizer::new(BUCKETS);
                    let mut n = 0;
                    for path in shards {
                        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
                        let docs = dsir::parse_jsonl(&bytes, "text", &path.display().to_string())?;
                        let weights: Vec<u8> = docs
                            .iter()
                            .flat_map(|d| log_weight(ratio, &f.features(&d.text)).to_le_bytes())
                            .collect();
                        let name = path.file_name().unwrap_or_default();
                        std::fs::write(work.join(name).with_extension("weights"), weights)
                            .map_err(|e| e.to_string())?;
                        n += docs.len();
                    }
                    Ok(n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a DSIR thread")).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&work);
    let docs: usize = counts
        .into_iter()
        .collect::<std::result::Result<Vec<_>, _>>()?
        .into_iter()
        .sum();
    Ok(docs as f64 / seconds)
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
        let ours = dsir_ours(&pool, &ratio, threads)?;
        let row = Row::new(
            format!(
                "DSIR importance weights, {} 128-word docs in {} JSONL shards, {threads} core(s)",
                docs.len(),
                pool.len()
            ),
            ours,
            "docs/s",
        )
        .note(
            "timed end to end on both sides: JSONL files read and parsed, documents featurized and \
             weighed, weights written to files (the reference's compute_importance_weights, its process \
             pool included)",
        );
        rows.push(match &python {
            Some(py) => row.peer(
                "data-selection 1.0.3",
                dsir_reference(py, &pool, &target, threads).map_err(|e| e.to_string()),
            ),
            None => row.note("reference not run: set ABLATE_DSIR_PYTHON (cargo xtask bench does)"),
        });
    }
    Ok(rows)
}

/// A real worker daemon (ABLATE_WORKER_BIN) with `slots` CPU slots on the coordinator at `addr`.
fn start_worker(addr: &str, slots: usize, dir: &std::path::Path) -> Result<std::process::Child> {
    let bin = std::env::var("ABLATE_WORKER_BIN").map_err(|_| "set ABLATE_WORKER_BIN (cargo xtask bench does)")?;
    let log = std::fs::File::create(dir.join("worker.log"))?;
    Ok(std::process::Command::new(bin)
        .args([
            "daemon",
            "--coordinator",
            addr,
            "--devices",
            &format!("cpu:{slots}"),
            "--poll-ms",
            "50",
        ])
        .arg("--object-store")
        .arg(dir.join("objects"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// Submits `trials` train trials of one step sleeping `delay_ms`; the seconds until the sweep is done.
async fn sweep_ours(addr: &str, pool: &sqlx::PgPool, trials: usize, delay_ms: u64) -> Result<f64> {
    let text = format!(
        "name = \"sleep-{trials}x{delay_ms}\"\nfamily = \"train\"\n[base]\noptimizer = \"adam\"\nlr = 0.001\nwidth = 16\nsteps = 1\nstep_delay_ms = {delay_ms}\n[sweep]\nsearcher = \"grid\"\nparams.seed = {{ range = [0, {}] }}\n",
        trials - 1
    );
    let mut client = ExperimentsClient::connect(addr.to_string()).await?;
    let start = Instant::now();
    let id = client
        .submit(proto::SubmitRequest {
            spec_text: text,
            format: "toml".into(),
        })
        .await?
        .into_inner()
        .experiment_id;
    let id = uuid::Uuid::parse_str(&id)?;
    loop {
        let (state, succeeded): (String, i64) =
            sqlx::query_as("select state, succeeded::bigint from ablate.experiments where experiment_id = $1")
                .bind(id)
                .fetch_one(pool)
                .await?;
        if state != "running" {
            if succeeded as usize != trials {
                return Err(format!("sweep ended {state} with {succeeded} of {trials} trials succeeded").into());
            }
            return Ok(start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A database on the bench's server for a peer; its URL for SQLAlchemy.
async fn peer_database(admin_pool: &sqlx::PgPool, admin_url: &str, name: &str) -> Result<String> {
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(admin_pool)
        .await?;
    let (server, _) = admin_url.rsplit_once('/').ok_or("DATABASE_URL must name a database")?;
    let server = server.split_once("://").map(|(_, rest)| rest).unwrap_or(server);
    Ok(format!("postgresql+psycopg2://{server}/{name}"))
}

async fn control_plane(
    addr: &str,
    url: &str,
    admin_pool: &sqlx::PgPool,
    admin_url: &str,
    tag: &str,
) -> Result<Vec<Row>> {
    let one_commit = median3_of(|| raw_commits(url, 1, 500)).await?;
    let many_commits = median3_of(|| raw_commits(url, 16, 200)).await?;
    let unnest = median3_of(|| raw_unnest(url, 100, 4096)).await?;
    let copy = median3_of(|| raw_copy(url, 100, 4096)).await?;
    let mut rows = vec![
        Row::new(
            "raw PostgreSQL: 1-row INSERT per commit, 1 connection",
            one_commit,
            "rows/s",
        )
        .note("baseline"),
        Row::new(
            "raw PostgreSQL: 1-row INSERT per commit, 16 connections",
            many_commits,
            "rows/s",
        )
        .note("baseline; concurrent commits share fsyncs"),
        Row::new(
            "raw PostgreSQL: INSERT from UNNEST into metrics' shape, 4,096/commit",
            unnest,
            "rows/s",
        )
        .note("baseline; same columns and key as metrics"),
        Row::new(
            "raw PostgreSQL: COPY binary into metrics' shape, 4,096/commit",
            copy,
            "rows/s",
        )
        .note("baseline; same columns and key as metrics"),
    ];

    let optuna_db = peer_database(admin_pool, admin_url, &format!("ablate_bench_optuna_{tag}")).await?;
    let optuna = peer(&["optuna-lifecycles", "--pg", &optuna_db, "--trials", "300"]).and_then(|v| field(&v, "rate"));
    for (workers, trials, batch) in [(1, 1000, 1), (8, 2000, 4), (64, 4000, 4)] {
        let (rate, p50, p99) = median3(|| async {
            let (rate, p50, p99) = lifecycles(addr, workers, trials, batch).await?;
            Ok((rate, (rate, p50, p99)))
        })
        .await?;
        let raw = if workers == 1 { one_commit } else { many_commits };
        let row = Row::new(
            format!("trial lifecycles, {workers} worker(s), leases and completions of {batch}"),
            rate,
            "trials/s",
        )
        .note(format!(
            "lease p50 {:.1} ms, p99 {:.1} ms; {} commits per trial: {:.0}% of raw 1-row commits/s ({} conn)",
            ms(p50),
            ms(p99),
            2.0 / batch as f64,
            100.0 * 2.0 / batch as f64 * rate / raw,
            if workers == 1 { 1 } else { 16 }
        ));
        rows.push(if workers == 1 {
            row.peer("Optuna ask+tell, RDB", optuna.clone())
        } else {
            row
        });
    }
    let mlflow_db = peer_database(admin_pool, admin_url, &format!("ablate_bench_mlflow_{tag}")).await?;
    let mlflow = peer(&["mlflow-ingest", "--pg", &mlflow_db, "--points", "50000"]).and_then(|v| field(&v, "rate"));
    for streams in [1, 4] {
        let rate = median3_of(|| metric_ingest(addr, streams, 200_000, 4096)).await?;
        let row = Row::new(
            format!("metric points -> durable rows, {streams} stream(s)"),
            rate,
            "points/s",
        )
        .note(format!(
            "{:.0}% of raw UNNEST, {:.0}% of raw COPY",
            100.0 * rate / unnest,
            100.0 * rate / copy
        ));
        rows.push(if streams == 1 {
            row.peer("MLflow log_batch", mlflow.clone())
        } else {
            row
        });
    }
    Ok(rows)
}

/// The rows the tracing section compares, measured in this process.
async fn traced_rows(addr: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (workers, trials, batch) in [(1, 1000, 1), (8, 2000, 4)] {
        let rate = median3_of(|| async { Ok(lifecycles(addr, workers, trials, batch).await?.0) }).await?;
        rows.push(Row::new(
            format!("trial lifecycles, {workers} worker(s), leases and completions of {batch}"),
            rate,
            "trials/s",
        ));
    }
    let rate = median3_of(|| metric_ingest(addr, 1, 200_000, 4096)).await?;
    rows.push(Row::new("metric points -> durable rows, 1 stream", rate, "points/s"));
    Ok(rows)
}

/// `ablate-bench traced` in a child process, traces exported to `endpoint` or off.
fn traced_child(endpoint: Option<&str>) -> Result<Vec<(String, f64)>> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .arg("traced")
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stderr(std::process::Stdio::null());
    if let Some(endpoint) = endpoint {
        command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    }
    let out = command.output()?;
    if !out.status.success() {
        return Err(format!("ablate-bench traced: {}", out.status).into());
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_string(),
                r["ours"].as_f64().unwrap_or(0.0),
            )
        })
        .collect())
}

/// The same rows with traces exported and without, side by side.
async fn tracing() -> Result<Vec<Row>> {
    let (receiver, endpoint) = ablate_schema::trace::receiver::Receiver::start().await?;
    let off = tokio::task::spawn_blocking(|| traced_child(None)).await??;
    let on = tokio::task::spawn_blocking(move || traced_child(Some(&endpoint))).await??;
    // The last batch of spans is exported as the child exits.
    let spans = receiver.count();
    Ok(on
        .into_iter()
        .zip(off)
        .map(|((name, on), (_, off))| {
            let unit = if name.starts_with("metric") {
                "points/s"
            } else {
                "trials/s"
            };
            Row::new(format!("{name}, traces exported"), on, unit)
                .peer("same, traces off", Ok(off))
                .note(format!("{spans} spans received in all"))
        })
        .collect())
}

async fn sweeps(
    addr: &str,
    pool: &sqlx::PgPool,
    admin_pool: &sqlx::PgPool,
    admin_url: &str,
    tag: &str,
) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("ablate-bench-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let mut worker = start_worker(addr, 2, &dir)?;
    let mut rows = Vec::new();
    for (i, (trials, delay_ms)) in [(1000usize, 50u64), (200, 500)].into_iter().enumerate() {
        let ideal = trials as f64 * delay_ms as f64 / 1000.0 / 2.0;
        let ours = sweep_ours(addr, pool, trials, delay_ms).await?;
        let seconds = format!("{}", delay_ms as f64 / 1000.0);
        let n = trials.to_string();
        let overhead = |wall: f64| format!("{:.0}%", 100.0 * (wall / ideal - 1.0));
        let name = format!("sweep of {trials} trials of {delay_ms} ms on 2 slots (ideal {ideal:.0} s)");
        let sweep = |tool: &str, extra: &[&str]| {
            let mut args = vec![
                "sweep",
                "--tool",
                tool,
                "--trials",
                &n,
                "--seconds",
                &seconds,
                "--slots",
                "2",
            ];
            args.extend_from_slice(extra);
            peer(&args).and_then(|v| field(&v, "wall"))
        };
        let ray = sweep("ray", &[]);
        let db = peer_database(admin_pool, admin_url, &format!("ablate_bench_sweep{i}_{tag}")).await?;
        let optuna = sweep("optuna", &["--pg", &db]);
        for (peer_name, figure) in [("Ray Tune, reuse_actors", ray), ("Optuna, RDB, 2 processes", optuna)] {
            let note = match &figure {
                Ok(wall) => format!(
                    "overhead over ideal: ours {}, theirs {}",
                    overhead(ours),
                    overhead(*wall)
                ),
                Err(_) => format!("overhead over ideal: ours {}", overhead(ours)),
            };
            rows.push(
                Row::new(name.clone(), ours, "s")
                    .lower_is_better()
                    .peer(peer_name, figure)
                    .note(note)
                    .note(
                        "timed from the first trial asked to the last finished; ours on a running \
                         coordinator and worker, theirs with Ray started, or Optuna's worker processes \
                         started and studies loaded, before the clock",
                    ),
            );
        }
    }
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

/// Steps/s of one training step, ours (ablate-worker bench-step) beside PyTorch's.
fn training_steps() -> Vec<Row> {
    // (model, extra arguments, what, threads, steps): a small MLP (dispatch-bound),
    // the quickstart-sized one, and a small GPT (kernel-bound).
    let cases: [(&str, &[&str], &str, &str, &str); 4] = [
        (
            "mlp",
            &["--width", "32", "--batch", "32"],
            "MLP 64-32-32-10, batch 32",
            "1",
            "2000",
        ),
        (
            "mlp",
            &["--width", "256", "--batch", "128"],
            "MLP 64-256-256-10, batch 128",
            "1",
            "500",
        ),
        ("gpt", &[], "char GPT 2x128, ctx 64, batch 32", "1", "50"),
        ("gpt", &[], "char GPT 2x128, ctx 64, batch 32", "2", "50"),
    ];
    let median = |mut runs: Vec<f64>| {
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    };
    let mut rows = Vec::new();
    for (model, extra, what, threads, steps) in cases {
        let mut args = vec!["--model", model, "--threads", threads, "--steps", steps];
        args.extend_from_slice(extra);
        let ours = || -> std::result::Result<f64, String> {
            let bin = std::env::var("ABLATE_WORKER_BIN").map_err(|_| "set ABLATE_WORKER_BIN".to_string())?;
            let mut runs = Vec::new();
            for _ in 0..3 {
                let out = std::process::Command::new(&bin)
                    .arg("bench-step")
                    .args(&args)
                    .output()
                    .map_err(|e| e.to_string())?;
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .map_err(|e| format!("bench-step: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
                runs.push(field(&v, "rate")?);
            }
            Ok(median(runs))
        };
        let theirs = || -> std::result::Result<f64, String> {
            let mut peer_args = vec!["torch-step"];
            peer_args.extend_from_slice(&args);
            let mut runs = Vec::new();
            for _ in 0..3 {
                runs.push(field(&peer(&peer_args)?, "rate")?);
            }
            Ok(median(runs))
        };
        let name = format!("train step + Adam, {what}, {threads} thr");
        match ours() {
            Ok(rate) => rows.push(Row::new(name, rate, "steps/s").peer("PyTorch 2.11, Python", theirs())),
            Err(why) => rows.push(Row::new(name, 0.0, "steps/s").note(format!("ours not measured: {why}"))),
        }
    }
    rows
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
        Some("search") => Some((
            "Search (synthetic task, minimum 0; median over 10 seeds of the best of 60 trials)",
            search_rows(),
        )),
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
    let measured = async {
        if traced {
            return Ok(vec![("traced", traced_rows(&addr).await?)]);
        }
        let dashboard_title = "Dashboard (1,000 trials x 10,000 steps x 2 metrics; median of 3)";
        if only_dashboard {
            return Ok(vec![(dashboard_title, dashboard::rows(&addr, &http, &pool).await?)]);
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
            sections.push(("DSIR", dsir_rows()?));
            sections.push((
                "Search (synthetic task, minimum 0; median over 10 seeds of the best of 60 trials)",
                search_rows(),
            ));
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
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
