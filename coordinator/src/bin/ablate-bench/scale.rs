//! Results at scale (`ablate-bench scale`): 100 million metric points (1,000
//! trials x 10,000 steps x 10 metrics) written through the real ingest path
//! (trials leased over gRPC, their points streamed in batches, completed), moved
//! into chunks by the coordinator's compactor; then the storage and the reads a
//! researcher and the dashboard make, on that experiment and on one of 10,000
//! trials, beside raw binary COPY into a plain table and beside MLflow given the
//! same runs and points (xtask/scripts/peers.py `mlflow-scale`).
//!
//! ABLATE_SCALE_TRIALS, ABLATE_SCALE_STEPS and ABLATE_SCALE_WIDE shrink it for a
//! quick try (multiples of 100 trials).

use std::time::{Duration, Instant};

use super::dashboard::{get, page_ready};
use super::*;

const METRICS: usize = 10;
const WIDTHS: [i64; 10] = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192];

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A width x learning rate x seed grid of `trials` trials (100 per seed).
fn spec(name: &str, trials: usize, steps: usize) -> String {
    format!(
        "name = \"{name}\"\nfamily = \"train\"\n[base]\noptimizer = \"adam\"\nsteps = {steps}\n[sweep]\nsearcher = \"grid\"\n\
         params.width = {WIDTHS:?}\nparams.log2_lr = {{ range = [-14, -5] }}\nparams.seed = {{ range = [0, {}] }}\n",
        (trials / 100).max(1) - 1
    )
}

/// The value of metric `k` at `step` for a trial: a decaying curve whose best
/// learning rate moves with the width, and a little noise. peers.py computes
/// the same in SQL for MLflow.
fn value(width_index: usize, log2_lr: f64, seed: i64, k: usize, step: i64) -> f64 {
    let base = 0.1 + (log2_lr + 9.0 + 0.3 * width_index as f64).abs() / 5.0;
    base * (1.0 + 0.1 * k as f64) * (1.0 + 2.0 * (-(step as f64) / 2000.0).exp())
        + 0.005 * (0.37 * step as f64 + 7.0 * seed as f64 + k as f64).sin()
}

fn metric_names() -> Vec<String> {
    (0..METRICS).map(|k| format!("m{k}")).collect()
}

async fn submit_spec(addr: &str, text: String) -> Result<String> {
    let mut client = ExperimentsClient::connect(addr.to_string()).await?;
    Ok(client
        .submit(proto::SubmitRequest {
            spec_text: text,
            format: "toml".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .experiment_id)
}

/// Binary COPY of `rows` metric-shaped rows into a plain table (no key, no
/// index) on `conns` connections at once, 100,000 rows a statement; rows/s.
async fn raw_copy(url: &str, rows: usize, conns: usize) -> Result<f64> {
    let admin = PgPoolOptions::new().max_connections(1).connect(url).await?;
    sqlx::query("drop table if exists scale_raw").execute(&admin).await?;
    sqlx::query("create table scale_raw (trial_id uuid, name_id int4, step int8, value float8)")
        .execute(&admin)
        .await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let pool = PgPoolOptions::new().max_connections(1).connect(&url).await?;
            let trial = uuid::Uuid::new_v4();
            let per = rows / conns;
            let mut done = 0;
            while done < per {
                let n = (per - done).min(100_000);
                let mut data = Vec::with_capacity(19 + n * 46 + 2);
                data.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
                data.extend_from_slice(&0i32.to_be_bytes());
                data.extend_from_slice(&0i32.to_be_bytes());
                for i in done..done + n {
                    let step = (i / METRICS) as i64;
                    data.extend_from_slice(&4i16.to_be_bytes());
                    data.extend_from_slice(&16i32.to_be_bytes());
                    data.extend_from_slice(trial.as_bytes());
                    data.extend_from_slice(&4i32.to_be_bytes());
                    data.extend_from_slice(&((i % METRICS) as i32).to_be_bytes());
                    data.extend_from_slice(&8i32.to_be_bytes());
                    data.extend_from_slice(&step.to_be_bytes());
                    data.extend_from_slice(&8i32.to_be_bytes());
                    data.extend_from_slice(&value(c % 10, -9.0, 0, i % METRICS, step).to_be_bytes());
                }
                data.extend_from_slice(&(-1i16).to_be_bytes());
                let mut conn = pool.acquire().await?;
                let mut copy = conn.copy_in_raw("copy scale_raw from stdin (format binary)").await?;
                copy.send(data).await?;
                copy.finish().await?;
                done += n;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    sqlx::query("drop table scale_raw").execute(&admin).await?;
    Ok(rate)
}

/// `streams` simulated workers lease the experiment's trials one at a time,
/// stream each one's `steps` x 10 metrics in batches of `batch_steps` steps
/// (acked once durable) and complete it. Returns the points written.
async fn ingest(addr: &str, streams: usize, steps: usize, batch_steps: usize) -> Result<u64> {
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = WorkersClient::connect(addr).await?;
            let worker = register(&mut client).await?;
            let mut points = 0u64;
            loop {
                let leased = client
                    .lease(proto::LeaseRequest {
                        worker_id: worker.clone(),
                        max_trials: 1,
                        free_gpus: 1,
                        slot_memory_bytes: 0,
                    })
                    .await?
                    .into_inner()
                    .trials;
                let Some(trial) = leased.into_iter().next() else {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(points);
                };
                let params: serde_json::Value = serde_json::from_str(&trial.params_json)?;
                let width = params["width"].as_i64().unwrap_or(16);
                let wi = WIDTHS.iter().position(|&w| w == width).unwrap_or(0);
                let lr = params["log2_lr"].as_f64().unwrap_or(-9.0);
                let seed = params["seed"].as_i64().unwrap_or(0);
                let names = metric_names();
                let (trial_id, token) = (trial.trial_id.clone(), trial.lease_token.clone());
                let batches = (0..steps.div_ceil(batch_steps)).map(move |b| {
                    let first = b * batch_steps;
                    let last = (first + batch_steps).min(steps);
                    let n = (last - first) * METRICS;
                    let mut batch = proto::MetricBatch {
                        seq: b as u64 + 1,
                        trial_id: trial_id.clone(),
                        lease_token: token.clone(),
                        names: names.clone(),
                        name_index: Vec::with_capacity(n),
                        steps: Vec::with_capacity(n),
                        values: Vec::with_capacity(n),
                    };
                    for step in first as i64..last as i64 {
                        for k in 0..METRICS {
                            batch.name_index.push(k as u32);
                            batch.steps.push(step);
                            batch.values.push(value(wi, lr, seed, k, step));
                        }
                    }
                    batch
                });
                let expected = steps.div_ceil(batch_steps);
                let durable = stream_durable(&mut client, batches, expected).await?;
                if durable < expected {
                    return Err(format!("{durable} of {expected} batches acked before the stream ended").into());
                }
                points += (steps * METRICS) as u64;
                client.complete(proto::CompleteRequest::succeeded(trial)).await?;
            }
        }));
    }
    let mut points = 0;
    for task in tasks {
        points += task.await??;
    }
    Ok(points)
}

/// Waits until the compactor has moved every finished trial's points.
async fn compacted(pool: &sqlx::PgPool) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let left: i64 = sqlx::query_scalar("select count(*) from trials where metrics_due")
            .fetch_one(pool)
            .await?;
        if left == 0 {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The experiment of `trials` trials whose points are written straight into
/// the rows (`steps` of two metrics each) and which then all succeed.
async fn populate_wide(addr: &str, pool: &sqlx::PgPool, trials: usize, steps: usize) -> Result<String> {
    let id = submit_spec(addr, spec("scale-wide", trials, steps)).await?;
    let uuid: uuid::Uuid = id.parse()?;
    // Two metrics, one of them the family's objective (eval_loss), so the page
    // draws its scatters and parallel coordinates of every trial too.
    sqlx::query("insert into metric_names (name) values ('m0'), ('eval_loss') on conflict do nothing")
        .execute(pool)
        .await?;
    sqlx::query(
        "insert into metrics (trial_id, name_id, step, value)
         select t.id, n.id, s, (1 + (t.ordinal % 97) / 100.0) * exp(-s / 30.0) + 0.05
         from trials t cross join metric_names n cross join generate_series(0, $2 - 1) s
         where t.experiment_id = $1 and n.name in ('m0', 'eval_loss')",
    )
    .bind(uuid)
    .bind(steps as i64)
    .execute(pool)
    .await?;
    sqlx::query(
        "update trials set state = 'succeeded', attempt = 1, started_at = now(), finished_at = now()
         where experiment_id = $1",
    )
    .bind(uuid)
    .execute(pool)
    .await?;
    Ok(id)
}

/// The median of three timings of `f`.
fn median3(mut f: impl FnMut() -> Result<Duration>) -> Result<f64> {
    let mut times = [f()?, f()?, f()?];
    times.sort();
    Ok(super::ms(times[1]))
}

/// GET on the dashboard's listener, checked.
fn timed_get(http: &str, path: &str) -> Result<(f64, String)> {
    let (_, status, body) = get(http, path)?;
    if status != 200 {
        return Err(format!("{path}: HTTP {status}: {}", body.chars().take(300).collect::<String>()).into());
    }
    Ok((median3(|| Ok(get(http, path)?.0))?, body))
}

/// One `ablate` command against the coordinator, timed (process start included).
fn cli(addr: &str, args: &[&str]) -> Result<(Duration, String)> {
    let bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("ablate"))
        .ok_or("no folder for the ablate binary")?;
    let started = Instant::now();
    let out = std::process::Command::new(&bin)
        .args(args)
        .env("ABLATE_COORDINATOR", addr)
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        return Err(format!("ablate {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok((elapsed, String::from_utf8_lossy(&out.stdout).into_owned()))
}

pub async fn rows(
    addr: &str,
    http: &str,
    url: &str,
    pool: &sqlx::PgPool,
    admin_url: &str,
    tag: &str,
) -> Result<Vec<Row>> {
    let trials = env_or("ABLATE_SCALE_TRIALS", 1000).max(100) / 100 * 100;
    let steps = env_or("ABLATE_SCALE_STEPS", 10_000);
    let wide = env_or("ABLATE_SCALE_WIDE", 10_000).max(100) / 100 * 100;
    let total = (trials * steps * METRICS) as u64;
    let mut rows = Vec::new();
    eprintln!("scale: {trials} trials x {steps} steps x {METRICS} metrics = {total} points");

    // Raw binary COPY into a plain table, 1 and 2 connections: the faster is the baseline.
    let copy_rows = (total as usize / 10).clamp(1_000_000, 10_000_000);
    let copy1 = raw_copy(url, copy_rows, 1).await?;
    let copy2 = raw_copy(url, copy_rows, 2).await?;
    let copy = copy1.max(copy2);
    rows.push(
        Row::new("raw PostgreSQL: binary COPY into a plain table", copy, "rows/s").note(format!(
            "baseline: {copy_rows} rows, 100,000 a statement; 1 connection {copy1:.0}/s, 2 connections {copy2:.0}/s"
        )),
    );

    // Ingest through the real path, then the move into chunks.
    let experiment = submit_spec(addr, spec("scale", trials, steps)).await?;
    let started = Instant::now();
    let points = ingest(addr, 4, steps, 400).await?;
    let ingest_time = started.elapsed();
    let settle = compacted(pool).await?;
    let rate = points as f64 / ingest_time.as_secs_f64();
    let whole = points as f64 / (ingest_time + settle).as_secs_f64();
    rows.push(
        Row::new(
            format!("ingest of {points} points, leased trials, 4 streams"),
            rate,
            "points/s",
        )
        .note(format!(
            "{:.0}% of raw COPY (target >= 60%); {:.0} s; 4,000-point batches acked once durable; the compactor \
             kept finished curves' downsampled copies meanwhile and for {:.1} s after the last ({:.0} points/s, \
             {:.0}% of COPY, all compacted)",
            100.0 * rate / copy,
            ingest_time.as_secs_f64(),
            settle.as_secs_f64(),
            whole,
            100.0 * whole / copy
        )),
    );
    // What autovacuum does on a server that has it on (this one may not).
    sqlx::query("vacuum analyze metrics, metric_chunks, metric_curves, trials")
        .execute(pool)
        .await?;

    // Storage of the finished trials.
    let (stored, chunk_bytes, row_bytes, chunks): (i64, i64, i64, i64) = sqlx::query_as(
        "select (select coalesce(sum(n), 0) from metric_chunks)::int8 + (select count(*) from metrics),
                pg_total_relation_size('metric_chunks') + pg_total_relation_size('metric_curves'),
                pg_total_relation_size('metrics'), (select count(*) from metric_chunks)",
    )
    .fetch_one(pool)
    .await?;
    let per_point = (chunk_bytes + row_bytes) as f64 / stored as f64;
    let mlflow_db = peer_database(pool, admin_url, &format!("ablate_bench_mlflow_scale_{tag}")).await;

    let ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("select id from trials where experiment_id = $1::uuid order by ordinal limit 100")
            .bind(&experiment)
            .fetch_all(pool)
            .await?;
    let hundred = ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let (curves, body) = timed_get(
        http,
        &format!("/api/v1/experiments/{experiment}/curves?metric=m0&points=1000&trials={hundred}"),
    )?;
    let drawn: usize = serde_json::from_str::<serde_json::Value>(&body)?["series"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["steps"].as_array().map(Vec::len)).sum())
        .unwrap_or(0);

    let wide_id = populate_wide(addr, pool, wide, 10).await?;
    compacted(pool).await?;
    sqlx::query("analyze trials").execute(pool).await?;
    let (table, body) = timed_get(http, &format!("/api/v1/experiments/{wide_id}/trials"))?;
    let listed = serde_json::from_str::<serde_json::Value>(&body)?["trials"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    let status_wide = median3(|| Ok(cli(addr, &["status", &wide_id])?.0))?;
    let status_big = median3(|| Ok(cli(addr, &["status", &experiment])?.0))?;
    let best_summary = format!(
        "select (r.params->>'width')::int as width, min(s.min_value) as best
         from ablate.metric_summary s join ablate.trial_results r on r.trial_id = s.trial_id
         where s.experiment_id = '{experiment}' and s.name = 'm0' group by 1 order by 1"
    );
    let best_points = format!(
        "select (r.params->>'width')::int as width, min(m.value) as best
         from ablate.metric_series m join ablate.trial_results r on r.trial_id = m.trial_id
         where m.experiment_id = '{experiment}' and m.name = 'm0' group by 1 order by 1"
    );
    let (best_a, best_a_out) = {
        let (t, out) = cli(addr, &["sql", &best_summary])?;
        let t2 = cli(addr, &["sql", &best_summary])?.0;
        (t.min(t2), out)
    };
    let (best_b, best_b_out) = cli(addr, &["sql", "--timeout", "600", &best_points])?;
    eprintln!("best per width:\n{best_a_out}");
    let same_best = best_a_out == best_b_out;
    let page = page_ready(&format!("http://{http}/#/experiments/{wide_id}"));

    // MLflow: the same runs and points, the same reads.
    let mlflow = match &mlflow_db {
        Ok(db) => peer(&[
            "mlflow-scale",
            "--pg",
            db,
            "--trials",
            &trials.to_string(),
            "--steps",
            &steps.to_string(),
            "--wide",
            &wide.to_string(),
        ]),
        Err(e) => Err(e.to_string()),
    };
    let m = |name: &str| mlflow.as_ref().map_err(Clone::clone).and_then(|v| field(v, name));

    rows.push(
        Row::new("storage of finished trials' points", per_point, "bytes/point")
            .lower_is_better()
            .peer("MLflow's metrics tables", m("bytes_per_point"))
            .note(format!(
                "{stored} points in {chunks} chunks and the curves' downsampled copies: {chunk_bytes} bytes \
                 with TOAST and keys, {row_bytes} in rows (target <= 16; a row a point took 160)"
            )),
    );
    rows.push(
        Row::new(format!("trial table of a {wide}-trial experiment (HTTP)"), table, "ms")
            .lower_is_better()
            .peer("MLflow search_runs, every run", m("search_wide_ms"))
            .note(format!("{listed} trials in {} KB (target < 200 ms)", body.len() / 1024)),
    );
    rows.push(
        Row::new(format!("100 curves of {steps} points (HTTP, 1,000 px)"), curves, "ms")
            .lower_is_better()
            .peer("MLflow get_metric_history x 100", m("history_100_ms"))
            .note(format!(
                "{drawn} points drawn from the finished curves' downsampled copies (target < 300 ms); MLflow returns every point"
            )),
    );
    rows.push(
        Row::new(format!("ablate status, {wide}-trial experiment"), status_wide, "ms")
            .lower_is_better()
            .peer("mlflow runs list", m("runs_list_ms"))
            .note("a process started and answered (target < 100 ms)"),
    );
    rows.push(
        Row::new(
            format!("ablate status, {trials}-trial experiment of {points} points"),
            status_big,
            "ms",
        )
        .lower_is_better()
        .note("a process started and answered"),
    );
    rows.push(
        Row::new(
            "best per width over every point (ablate sql, metric_summary)",
            super::ms(best_a),
            "ms",
        )
        .lower_is_better()
        .peer("MLflow: every history fetched", m("best_api_ms"))
        .note(format!(
            "min of m0 over {} points per width from the chunks' summaries (target < 2 s); {} the answer \
                 read point by point from ablate.metric_series",
            total / METRICS as u64,
            if same_best { "same as" } else { "DIFFERENT from" }
        )),
    );
    rows.push(
        Row::new(
            "best per width, point by point (ablate sql, metric_series)",
            super::ms(best_b),
            "ms",
        )
        .lower_is_better()
        .peer("MLflow: SQL on its metrics table", m("best_sql_ms"))
        .note("every point of m0 unnested from the chunks"),
    );
    rows.push(match page {
        Ok((wall, own)) => Row::new(
            format!("experiment page of {wide} trials drawn in Chromium"),
            wall,
            "ms",
        )
        .lower_is_better()
        .note(format!(
            "navigation to table, curves, a scatter per parameter and parallel coordinates of every trial, \
                 and the report drawn; the page's own clock {own:.0} ms (target < 1,000 ms); table rows drawn as \
                 they scroll into view"
        )),
        Err(why) => Row::new(
            format!("experiment page of {wide} trials drawn in Chromium"),
            f64::NAN,
            "ms",
        )
        .note(format!("not measured: {why}")),
    });
    rows.push(
        Row::new(
            "MLflow: log_batch (1,000 points a call)",
            m("log_batch_rate").unwrap_or(f64::NAN),
            "points/s",
        )
        .note(format!(
            "MLflow's own ingest on a sample; its {points} points were loaded by SQL into its tables ({} s) \
                 since log_batch would take {:.1} h",
            m("load_s").map(|s| format!("{s:.0}")).unwrap_or_else(|e| e),
            m("log_batch_rate")
                .map(|r| points as f64 / r / 3600.0)
                .unwrap_or(f64::NAN)
        )),
    );
    Ok(rows)
}
