//! The peers' runs (xtask/scripts/peers.py) and the sweep bookkeeping rows: sleeping
//! trials through a real worker daemon beside Ray Tune and Optuna; the searchers' rows.

use super::*;

/// Runs `peers.py ARGS` with the peers' python; its JSON answer.
pub(super) fn peer(args: &[&str]) -> std::result::Result<serde_json::Value, String> {
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

pub(super) fn field(v: &serde_json::Value, name: &str) -> std::result::Result<f64, String> {
    v[name].as_f64().ok_or_else(|| format!("no {name} in {v}"))
}

/// TPE and random search at the same budget on the synthetic task (`ablate_experiments::tpe`),
/// ours (the proposer the coordinator runs) beside Optuna's samplers with the same seeds:
/// one trial at a time, then 8 at once over 20 seeds (ours simulated as the coordinator
/// schedules it, Optuna's through its RDB storage on PostgreSQL at `pg`, each trial
/// taking 0.5 to 1.5 s).
pub(super) fn search_rows(pg: std::result::Result<String, String>) -> Vec<Row> {
    use ablate_experiments::tpe::{best_of, median, parallel_search};
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
    // The best of 64 in parallel varies more from seed to seed (the order results come
    // back in matters): twice the seeds.
    let (wide, slots, parallel_seeds) = (64, 8, 2 * seeds);
    let runs: Vec<(f64, usize, usize)> = (0..parallel_seeds)
        .map(|s| parallel_search(wide, startup, slots, s))
        .collect();
    let parallel = median(runs.iter().map(|r| r.0).collect());
    let fewest = runs.iter().map(|r| r.2).min().unwrap_or(0);
    let optuna_parallel = pg.and_then(|pg| {
        peer(&[
            "search-parallel",
            "--pg",
            &pg,
            "--trials",
            &wide.to_string(),
            "--startup",
            &startup.to_string(),
            "--seeds",
            &parallel_seeds.to_string(),
            "--jobs",
            &slots.to_string(),
        ])
    });
    let optuna_fewest = optuna_parallel.as_ref().ok().and_then(|v| {
        v["fewest_in_flight"]
            .as_array()
            .and_then(|a| a.iter().filter_map(|f| f.as_u64()).min())
    });
    // Two objectives (ZDT1): the hypervolume after the budget, ours against Optuna's
    // multi-objective TPE with the same seeds.
    let volumes: Vec<f64> = (0..seeds)
        .map(|s| ablate_experiments::pareto::zdt1::tpe_hypervolume(budget, startup, s))
        .collect();
    let hypervolume = median(volumes);
    let optuna_pareto = peer(&[
        "search-pareto",
        "--trials",
        &budget.to_string(),
        "--startup",
        &startup.to_string(),
        "--seeds",
        &seeds.to_string(),
    ]);
    vec![
        Row::new(format!("TPE ({startup} random first), best loss"), tpe, "loss")
            .lower_is_better()
            .peer("Optuna TPESampler", figure("tpe"))
            .note(format!("our random search at the same budget: {random:.4}")),
        Row::new("random search, best loss", random, "loss")
            .lower_is_better()
            .peer("Optuna RandomSampler", figure("random")),
        Row::new(
            format!("TPE, {slots} at once (multivariate, constant liar), best of {wide}"),
            parallel,
            "loss",
        )
        .lower_is_better()
        .peer(
            "Optuna multivariate, constant_liar, n_jobs=8, RDB",
            optuna_parallel
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|v| field(v, "tpe")),
        )
        .note(format!(
            "fewest in flight while {slots} were left: ours {fewest}, Optuna {}",
            optuna_fewest.map_or("-".to_string(), |f| f.to_string())
        )),
        Row::new(
            format!("two objectives (ZDT1), hypervolume after {budget}"),
            hypervolume,
            "hv",
        )
        .peer(
            "Optuna multi-objective TPESampler",
            optuna_pareto
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|v| field(v, "hypervolume")),
        )
        .note(format!(
            "the front's own: {:.4}, reference point (1.1, 1.1)",
            ablate_experiments::pareto::zdt1::BEST_HYPERVOLUME
        )),
    ]
}

/// A real worker daemon (ABLATE_WORKER_BIN) with `slots` CPU slots on the coordinator at `addr`.
pub(super) fn start_worker(addr: &str, slots: usize, dir: &std::path::Path) -> Result<std::process::Child> {
    start_worker_with(addr, slots, dir, &[])
}

/// The same with `extra` flags.
pub(super) fn start_worker_with(
    addr: &str,
    slots: usize,
    dir: &std::path::Path,
    extra: &[&str],
) -> Result<std::process::Child> {
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
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// Submits `trials` train trials of one step sleeping `delay_ms`; the seconds until the sweep is done.
pub(super) async fn sweep_ours(addr: &str, pool: &sqlx::PgPool, trials: usize, delay_ms: u64) -> Result<f64> {
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
            ..Default::default()
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

pub(super) async fn sweeps(
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
