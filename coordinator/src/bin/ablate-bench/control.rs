//! The control plane's rows: trial lifecycles and metric ingest through a real
//! coordinator, beside raw PostgreSQL of the same run and Optuna's and MLflow's
//! stores; the tracing rows (the same work exporting traces and not).

use super::*;

pub(super) fn spec(name: &str, trials: usize) -> String {
    format!(
        "name = \"{name}\"\nfamily = \"train\"\n[base]\noptimizer = \"adam\"\nlr = 0.001\nsteps = 1\n[sweep]\nsearcher = \"grid\"\nparams.seed = {{ range = [0, {}] }}\n",
        trials - 1
    )
}

pub(super) async fn submit(addr: &str, name: &str, trials: usize) -> Result<String> {
    let mut client = ExperimentsClient::connect(addr.to_string()).await?;
    let response = client
        .submit(proto::SubmitRequest {
            spec_text: spec(name, trials),
            format: "toml".into(),
            ..Default::default()
        })
        .await?;
    Ok(response.into_inner().experiment_id)
}

pub(super) async fn register(client: &mut WorkersClient<Channel>) -> Result<String> {
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
pub(super) async fn lifecycles(
    addr: &str,
    workers: usize,
    trials: usize,
    batch: u32,
) -> Result<(f64, Duration, Duration)> {
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

/// Streams `batches` on one metric stream and waits for `expected` acks;
/// returns the batches acked durable (fewer when the stream ended early).
pub(super) async fn stream_durable<I>(client: &mut WorkersClient<Channel>, batches: I, expected: usize) -> Result<usize>
where
    I: IntoIterator<Item = proto::MetricBatch> + Send + 'static,
    I::IntoIter: Send,
{
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
    Ok(durable)
}

/// Stream `per_trial` points for each of `trials` leased trials in batches of `batch` points.
pub(super) async fn metric_ingest(addr: &str, streams: usize, per_trial: usize, batch: usize) -> Result<f64> {
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
            let durable = stream_durable(&mut client, batches, expected).await?;
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
pub(super) async fn raw_commits(url: &str, conns: usize, per_conn: usize) -> Result<f64> {
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
pub(super) async fn metrics_shaped(pool: &sqlx::PgPool) -> Result {
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
pub(super) async fn raw_unnest(url: &str, batches: usize, batch: usize) -> Result<f64> {
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
pub(super) async fn raw_copy(url: &str, batches: usize, batch: usize) -> Result<f64> {
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
pub(super) async fn median3<T, F, Fut>(mut measure: F) -> Result<T>
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
pub(super) async fn median3_of<F, Fut>(mut measure: F) -> Result<f64>
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

/// A database on the bench's server for a peer; its URL for SQLAlchemy.
pub(super) async fn peer_database(admin_pool: &sqlx::PgPool, admin_url: &str, name: &str) -> Result<String> {
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(admin_pool)
        .await?;
    let (server, _) = admin_url.rsplit_once('/').ok_or("DATABASE_URL must name a database")?;
    let server = server.split_once("://").map(|(_, rest)| rest).unwrap_or(server);
    Ok(format!("postgresql+psycopg2://{server}/{name}"))
}

pub(super) async fn control_plane(
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
pub(super) async fn traced_rows(addr: &str) -> Result<Vec<Row>> {
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
pub(super) fn traced_child(endpoint: Option<&str>) -> Result<Vec<(String, f64)>> {
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
pub(super) async fn tracing() -> Result<Vec<Row>> {
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
