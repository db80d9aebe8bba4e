//! Command trials beside built-in ones, through one coordinator and one real worker
//! daemon with one slot: what a trial's slot costs when the trial does nothing (a
//! program that exits at once, against a built-in trial of one step in a warm
//! process), and metric points per second from one trial (a Python program logging
//! through the `ablate` package, against a built-in trial logging every step).

use std::time::{Duration, Instant};

use ablate_schema::proto::{self, experiments_client::ExperimentsClient};

use super::{peers::start_worker_with, Result, Row};

/// Submits `spec` (with its code folder `code`, when it has one) and waits for it to
/// succeed; the seconds from submit to its end, and the metric points it stored.
async fn run(addr: &str, pool: &sqlx::PgPool, spec: &str, code: Option<&std::path::Path>) -> Result<(f64, i64)> {
    let packed = code.map(ablate_schema::code::pack).transpose()?;
    let mut client = ExperimentsClient::connect(addr.to_string()).await?;
    let start = Instant::now();
    let (code_archive, code_hash) = packed.map(|p| (p.archive, p.hash)).unwrap_or_default();
    let id = client
        .submit(proto::SubmitRequest {
            spec_text: spec.to_string(),
            format: "toml".into(),
            code_archive,
            code_hash,
            ..Default::default()
        })
        .await?
        .into_inner()
        .experiment_id;
    let id = uuid::Uuid::parse_str(&id)?;
    loop {
        let (state, failed): (String, i64) =
            sqlx::query_as("select state, failed::bigint from ablate.experiments where experiment_id = $1")
                .bind(id)
                .fetch_one(pool)
                .await?;
        if state != "running" {
            if state != "succeeded" {
                return Err(format!("the bench's sweep ended {state} ({failed} failed)").into());
            }
            let wall = start.elapsed().as_secs_f64();
            let points: i64 = sqlx::query_scalar("select count(*) from ablate.metric_series where experiment_id = $1")
                .bind(id)
                .fetch_one(pool)
                .await?;
            return Ok((wall, points));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The program of the points row: `points` metric points logged as fast as the
/// package takes them.
const LOGGER: &str =
    "import ablate.trial as t\nn = int(t.params()['points'])\nfor i in range(n):\n    t.log(i, loss=1.0 / (i + 1))\n";

fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

pub(super) async fn rows(addr: &str, pool: &sqlx::PgPool, dir: &std::path::Path) -> Result<Vec<Row>> {
    let code = dir.join("command-code");
    std::fs::create_dir_all(&code)?;
    std::fs::write(code.join("log.py"), LOGGER)?;
    let package = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    let link = code.join("python");
    if !link.exists() {
        std::os::unix::fs::symlink(std::fs::canonicalize(package)?, &link)?;
    }
    let mut worker = start_worker_with(addr, 1, dir, &["--allow-commands"])?;
    let measured = async {
        const TRIALS: usize = 40;
        let noop = format!(
            "name = \"noop\"\nfamily = \"train\"\n[trial]\ncommand = [\"true\"]\n[sweep]\nsearcher = \"grid\"\nparams.seed = {{ range = [0, {}] }}\n",
            TRIALS - 1
        );
        let builtin = format!(
            "name = \"one-step\"\nfamily = \"train\"\n[base]\noptimizer = \"adam\"\nlr = 0.001\nwidth = 16\nsteps = 1\n[sweep]\nsearcher = \"grid\"\nparams.seed = {{ range = [0, {}] }}\n",
            TRIALS - 1
        );
        // A warm process first, as on a worker that has run a trial.
        run(addr, pool, &builtin, None).await?;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            ours.push(run(addr, pool, &noop, None).await?.0 / TRIALS as f64 * 1000.0);
            theirs.push(run(addr, pool, &builtin, None).await?.0 / TRIALS as f64 * 1000.0);
        }
        let slot = Row::new(
            format!("slot time of a trial that does nothing ({TRIALS} in a row, 1 slot)"),
            median(ours),
            "ms",
        )
        .lower_is_better()
        .peer("built-in trial of 1 step, warm process", Ok(median(theirs)))
        .note("command `true` (a process started, its trial's folder made, its end reported) against one train step");

        const POINTS: u64 = 200_000;
        let logger = format!(
            "name = \"points\"\nfamily = \"train\"\n[trial]\ncommand = [\"python3\", \"log.py\"]\ncode = \".\"\nenv = {{ PYTHONPATH = \"python\" }}\n[base]\npoints = {POINTS}\n[sweep]\nsearcher = \"grid\"\nparams.seed = [0]\n"
        );
        let steps = 20_000;
        let training = format!(
            "name = \"points-builtin\"\nfamily = \"train\"\n[base]\noptimizer = \"sgd\"\nlr = 0.01\nwidth = 4\nbatch_size = 1\nsteps = {steps}\neval_every = {steps}\ncheckpoint_every = {steps}\n[sweep]\nsearcher = \"grid\"\nparams.seed = [0]\n"
        );
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let (wall, points) = run(addr, pool, &logger, Some(&code)).await?;
            if points as u64 != POINTS {
                return Err(format!("the Python trial stored {points} of {POINTS} points").into());
            }
            ours.push(points as f64 / wall);
            let (wall, points) = run(addr, pool, &training, None).await?;
            theirs.push(points as f64 / wall);
        }
        let points = Row::new(
            format!("metric points/s from one trial ({POINTS} through the Python package)"),
            median(ours),
            "points/s",
        )
        .peer(
            format!("built-in train trial, {steps} steps of a width-4 MLP").as_str(),
            Ok(median(theirs)),
        )
        .note("submit to stored, the program's start and ingest included");
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(vec![slot, points])
    }
    .await;
    let _ = worker.kill();
    let _ = worker.wait();
    measured
}
