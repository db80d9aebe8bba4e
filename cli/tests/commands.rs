//! Command trials (the researcher's own program, `[trial]`) on a real stack: the
//! program's code packed by `ablate submit` and unpacked by the worker, the
//! operator's permission, SIGKILL of the program mid-run, ASHA over programs,
//! programs that misbehave, stops that reach the program, and the PyTorch
//! example's muP sweep through `ablate up` with its report's verdict.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{assert_same_curves, bin, free_port, pids_of, text, Stack};

/// The examples folder of this repository.
fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A Python with torch 2.11 (`cargo xtask test` provisions one and sets ABLATE_TORCH_PYTHON).
fn torch_python() -> PathBuf {
    PathBuf::from(
        std::env::var_os("ABLATE_TORCH_PYTHON")
            .expect("ABLATE_TORCH_PYTHON must name a Python with torch 2.11; `cargo xtask test` sets it"),
    )
}

/// A folder of code for a spec's `[trial] code = "."`: the spec and `files` in it.
fn code_dir(stack: &Stack, name: &str, spec: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = stack.dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, body) in files {
        std::fs::write(dir.join(file), body).unwrap();
    }
    std::fs::write(dir.join("sweep.toml"), spec).unwrap();
    dir.join("sweep.toml")
}

/// The PyTorch example as a spec of `trials` learning rates at width 32, run by the
/// torch Python, slowed to `delay` seconds a step so a test can kill it mid-run.
fn pytorch_spec(stack: &Stack, name: &str, delay: f64) -> PathBuf {
    let example = examples().join("pytorch-mup");
    let dir = stack.dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(example.join("train.py"), dir.join("train.py")).unwrap();
    // The package travels with the code, as the example's link to it does.
    std::os::unix::fs::symlink(examples().join("../python"), dir.join("python")).unwrap();
    let spec = format!(
        r#"name = "{name}"
family = "train"
[trial]
command = ["{python}", "train.py"]
code = "."
env = {{ PYTHONPATH = "python" }}
[base]
width = 32
parametrization = "mup"
steps = 300
checkpoint_every = 100
step_delay = {delay}
[sweep]
searcher = "grid"
params.log2_lr = [-6]
[objective]
metric = "train_loss"
goal = "minimize"
"#,
        python = torch_python().display()
    );
    std::fs::write(dir.join("sweep.toml"), spec).unwrap();
    dir.join("sweep.toml")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_without_permission_leases_no_command_trial_and_one_with_it_runs_them() {
    let mut stack = Stack::start(5.0).await;
    let spec = code_dir(
        &stack,
        "allowed",
        r#"name = "allowed"
family = "train"
[trial]
command = ["sh", "count.sh", "{steps}"]
code = "."
[base]
steps = 5
[sweep]
searcher = "grid"
params.seed = [1, 2]
[objective]
metric = "train_loss"
goal = "minimize"
"#,
        &[(
            "count.sh",
            "i=0\nwhile [ $i -lt $1 ]; do i=$((i+1)); echo \"{\\\"step\\\": $i, \\\"metrics\\\": {\\\"train_loss\\\": $i}}\" >&3; done\n",
        )],
    );
    stack.start_worker("cpu:2");
    let experiment = stack.submit(&spec);
    // The worker without the permission takes nothing, and status says why they wait.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = stack
        .scalar_i64(&format!(
            "select count(*) from trials where experiment_id = '{experiment}' and attempt > 0"
        ))
        .await;
    assert_eq!(started, 0, "a worker without --allow-commands leased a command trial");
    let status = text(&stack.ablate(&["status", &experiment]));
    assert!(status.contains("--allow-commands"), "{status}");
    stack.start_worker_from(&bin("ablate-worker"), "cpu:1", &["--allow-commands"]);
    stack.wait_finished(&experiment, Duration::from_secs(60)).await;
    let succeeded = stack
        .scalar_i64(&format!(
            "select count(*) from trials where experiment_id = '{experiment}' and state = 'succeeded'"
        ))
        .await;
    assert_eq!(succeeded, 2, "{}", stack.logs());
    // Both ran on the permitted worker, from the code `ablate submit` packed: its hash is in
    // each attempt's provenance, and `ablate logs` shows the attempt's log.
    let hashes = stack
        .scalar_i64(&format!(
            "select count(distinct provenance ->> 'code') from trial_attempts a join trials t on t.id = a.trial_id
             where t.experiment_id = '{experiment}' and length(provenance ->> 'code') = 64"
        ))
        .await;
    assert_eq!(hashes, 1);
    let trials: Vec<uuid::Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select id from trials where experiment_id = '{experiment}' order by ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let mut unpacked = 0;
    for trial in trials {
        let logs = stack.ablate(&["logs", &trial.to_string()]);
        assert!(logs.status.success(), "{}", text(&logs));
        assert!(text(&logs).contains("trial starting"), "{}", text(&logs));
        unpacked += usize::from(text(&logs).contains("unpacked the trial's code"));
    }
    // Once per worker: the second trial found the code in the cache.
    assert_eq!(unpacked, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_program_killed_mid_run_resumes_from_its_checkpoint_with_the_same_curve() {
    let mut stack = Stack::start(5.0).await;
    stack.start_worker_from(&bin("ablate-worker"), "cpu:1", &["--allow-commands"]);
    let unbroken = stack.submit_and_wait(&pytorch_spec(&stack, "unbroken", 0.0));

    let spec = pytorch_spec(&stack, "killed", 0.02);
    let experiment = stack.submit(&spec);
    stack
        .wait_for(
            &format!(
                "select exists (select 1 from checkpoints c join trials t on t.id = c.trial_id
                 where t.experiment_id = '{experiment}' and c.step = 100)"
            ),
            Duration::from_secs(120),
        )
        .await;
    // The program: a train.py whose working directory (its unpacked code) is this stack's.
    let programs: Vec<i32> = pids_of("train.py")
        .into_iter()
        .filter(|p| std::fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|cwd| cwd.starts_with(&stack.dir)))
        .collect();
    assert!(!programs.is_empty(), "the program is not running");
    for pid in &programs {
        // SAFETY: SIGKILL to the trial's program, found by its command line.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    stack.wait_finished(&experiment, Duration::from_secs(120)).await;
    let attempts: Vec<(i32, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select attempt, outcome from ablate.trial_attempts where experiment_id = '{experiment}' order by attempt"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        attempts,
        [(1, "crashed".to_string()), (2, "succeeded".to_string())],
        "{}",
        stack.logs()
    );
    let error: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select error from ablate.trial_attempts where experiment_id = '{experiment}' and attempt = 1"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(error.contains("killed by signal 9"), "{error}");
    // Every step once, and the curve an unbroken run's.
    let (points, distinct) = sqlx::query_as::<_, (i64, i64)>(sqlx::AssertSqlSafe(format!(
        "select count(*), count(distinct (trial_id, name, step)) from ablate.metric_series
         where experiment_id = '{experiment}' and name = 'train_loss'"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!((points, distinct), (300, 300));
    assert_same_curves(
        &harness::curve(&stack, &experiment).await,
        &harness::curve(&stack, &unbroken).await,
    );
}

/// A trainer in shell that pauses at its rung with a checkpoint and resumes from it.
const SHELL_TRAINER: &str = include_str!("../../examples/shell-trainer/train.sh");

#[tokio::test(flavor = "multi_thread")]
async fn asha_pauses_command_trials_at_rungs_and_resumes_the_promoted_from_their_checkpoints() {
    let mut stack = Stack::start(5.0).await;
    stack.start_worker_from(&bin("ablate-worker"), "cpu:2", &["--allow-commands"]);
    let spec = code_dir(
        &stack,
        "asha",
        r#"name = "asha-commands"
family = "train"
[trial]
command = ["sh", "train.sh", "{lr}", "{steps}"]
code = "."
[base]
steps = 90
[sweep]
searcher = "asha"
params.lr = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
[sweep.asha]
min_steps = 10
max_steps = 90
reduction_factor = 3
[objective]
metric = "eval_loss"
goal = "minimize"
"#,
        &[("train.sh", SHELL_TRAINER)],
    );
    let experiment = stack.submit_and_wait(&spec);
    // Rungs at 10 and 30: each trial stopped at one or ran to the end; asynchronous
    // promotion takes at least a third of the trials past each rung.
    let ends: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select max(step), count(*) from ablate.metric_series m join trials t on t.id = m.trial_id
         where m.experiment_id = '{experiment}' and m.name = 'train_loss' group by t.id order by 1"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let last: Vec<i64> = ends.iter().map(|e| e.0).collect();
    assert!(last.iter().all(|s| [10, 30, 90].contains(s)), "{last:?}");
    let past = |step: i64| last.iter().filter(|&&s| s >= step).count();
    assert!(past(30) >= 3 && past(90) >= 1 && past(30) < 9, "{last:?}");
    // Every step once: a promoted trial went on from its rung's checkpoint.
    assert!(ends.iter().all(|(last, points)| last == points), "{ends:?}");
    let resumed = stack
        .scalar_i64(&format!(
            "select count(*) from trials where experiment_id = '{experiment}' and pauses > 0 and attempt > 1"
        ))
        .await;
    assert!(resumed >= 3, "promoted trials ran again: {resumed}");
    let checkpoints_at_rungs = stack
        .scalar_i64(&format!(
            "select count(*) from checkpoints c join trials t on t.id = c.trial_id
             where t.experiment_id = '{experiment}' and c.step in (10, 30)"
        ))
        .await;
    assert!(checkpoints_at_rungs >= 12, "{checkpoints_at_rungs}");
}

/// Programs that misbehave, one per `mode`, beside one that behaves.
const BAD: &str = r#"mode=$1
case $mode in
good) echo '{"step": 1, "metrics": {"train_loss": 1}}' >&3 ;;
flood) yes 'a line of output that goes on and on and on' | head -c 1073741824; echo '{"step": 1, "metrics": {"train_loss": 2}}' >&3 ;;
malformed) echo '{"step": 1, "metrics": ' >&3 ;;
unknown) echo '{"steps": 1}' >&3 ;;
nul) printf '{"step": 1, "metrics": {"lo\\u0000ss": 1}}\n' >&3 ;;
nan) echo '{"step": 1, "metrics": {"train_loss": "nan"}}' >&3 ;;
nocheckpoint) echo '{"checkpoint": 1}' >&3 ;;
orphan) sleep 1000 ablate-orphan-marker & echo '{"step": 1, "metrics": {"train_loss": 3}}' >&3 ;;
esac
"#;

#[tokio::test(flavor = "multi_thread")]
async fn programs_that_misbehave_fail_clearly_and_leave_nothing_behind() {
    let mut stack = Stack::start(5.0).await;
    let worker = stack.start_worker_from(&bin("ablate-worker"), "cpu:2", &["--allow-commands"]);
    let spec = code_dir(
        &stack,
        "bad",
        r#"name = "bad-programs"
family = "train"
max_attempts = 1
[trial]
command = ["{program}", "bad.sh", "{mode}"]
code = "."
[base]
program = "sh"
[sweep]
searcher = "grid"
params.mode = ["good", "flood", "malformed", "unknown", "nul", "nan", "nocheckpoint", "orphan"]
[objective]
metric = "train_loss"
goal = "minimize"
"#,
        &[("bad.sh", BAD)],
    );
    let experiment = stack.submit(&spec);
    let missing = code_dir(
        &stack,
        "missing",
        r#"name = "missing-program"
family = "train"
max_attempts = 1
[trial]
command = ["no-such-program-here", "x"]
code = "."
[sweep]
searcher = "grid"
params.seed = [1]
"#,
        &[],
    );
    let missing = stack.submit(&missing);
    stack.wait_finished(&experiment, Duration::from_secs(300)).await;
    stack.wait_finished(&missing, Duration::from_secs(60)).await;
    let rows: Vec<(serde_json::Value, String, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select t.params, a.outcome, a.error from ablate.trial_attempts a join trials t on t.id = a.trial_id
         where a.experiment_id in ('{experiment}', '{missing}')"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let of = |mode: &str| {
        rows.iter()
            .find(|(p, _, _)| {
                p.get("mode").and_then(|m| m.as_str()) == Some(mode) || (mode == "missing" && p.get("mode").is_none())
            })
            .map(|(_, outcome, error)| (outcome.clone(), error.clone().unwrap_or_default()))
            .unwrap_or_else(|| panic!("no attempt of {mode}: {rows:?}\n{}", stack.logs()))
    };
    let expect = [
        ("good", "succeeded", ""),
        ("flood", "succeeded", ""),
        ("nan", "succeeded", ""),
        ("orphan", "succeeded", ""),
        ("malformed", "failed", "event line"),
        ("unknown", "failed", "steps"),
        ("nul", "failed", "U+0000"),
        ("nocheckpoint", "failed", "holds no file"),
        ("missing", "failed", "cannot start `no-such-program-here`"),
    ];
    for (mode, outcome, says) in expect {
        let (got, error) = of(mode);
        assert_eq!(got, outcome, "{mode}: {error}");
        assert!(
            error.contains(says),
            "{mode}: the error `{error}` does not say `{says}`"
        );
    }
    // The flood's log is bounded, and says how much it left out.
    let flood: uuid::Uuid = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select id from trials where experiment_id = '{experiment}' and params ->> 'mode' = 'flood'"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    let out = stack.ablate(&["logs", &flood.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(out.stdout.len() < 2 << 20, "a log of {} bytes", out.stdout.len());
    assert!(text(&out).contains("bytes left out"));
    // No process outlived its program, and the worker's memory stayed bounded.
    assert!(
        pids_of("ablate-orphan-marker").is_empty(),
        "an orphan outlived its program"
    );
    let daemon_and_trials = pids_of(&format!("{}/worker-{worker}", stack.dir.display()));
    assert!(!daemon_and_trials.is_empty());
    for pid in daemon_and_trials {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let peak_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        assert!(peak_kib < 600 << 10, "worker process {pid} peaked at {peak_kib} KiB");
    }
    // `ablate status` shows each failure's reason.
    let status = text(&stack.ablate(&["status", &experiment]));
    for says in ["event line is not JSON", "unknown event", "U+0000", "holds no file"] {
        assert!(
            status.contains(says),
            "`ablate status` does not say `{says}`:\n{status}"
        );
    }
    let status = text(&stack.ablate(&["status", &missing]));
    assert!(status.contains("cannot start `no-such-program-here`"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_program_gets_sigterm_and_its_grace_period() {
    let mut stack = Stack::start(5.0).await;
    stack.start_worker_from(&bin("ablate-worker"), "cpu:1", &["--allow-commands"]);
    let marker = stack.dir.join("stopped-cleanly");
    let spec = code_dir(
        &stack,
        "graceful",
        r#"name = "graceful"
family = "train"
[trial]
command = ["sh", "slow.sh"]
code = "."
grace_seconds = 20
[sweep]
searcher = "grid"
params.seed = [1]
"#,
        &[(
            "slow.sh",
            &format!(
                "trap 'sleep 1; test -e \"$ABLATE_STOP_FILE\" && touch {}; exit 0' TERM\n\
                 echo '{{\"step\": 1, \"metrics\": {{\"train_loss\": 1}}}}' >&3\n\
                 while true; do sleep 0.1; done\n",
                marker.display()
            ),
        )],
    );
    let experiment = stack.submit(&spec);
    stack
        .wait_for(
            &format!("select exists (select 1 from ablate.metric_series where experiment_id = '{experiment}')"),
            Duration::from_secs(60),
        )
        .await;
    let out = stack.ablate(&["cancel", &experiment]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the program never saw its stop\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pids_of("slow.sh").is_empty() {
        assert!(Instant::now() < deadline, "the program outlived its stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `ablate` with a configuration folder of the test's own and `PATH` led by `path`.
fn ablate_in(config: &Path, path: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin("ablate"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env("XDG_CONFIG_HOME", config)
        .env("PATH", path)
        .env_remove("DATABASE_URL")
        .env_remove("ABLATE_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn the_pytorch_example_transfers_its_learning_rate_under_mup_through_ablate_up() {
    let home = std::env::temp_dir().join(format!("ablate-pytorch-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&home).unwrap();
    let (state, config) = (home.join(".ablate"), home.join("config"));
    // The researcher's venv first on PATH, as when it is activated: `python3` is its.
    let venv_bin = torch_python().parent().unwrap().to_path_buf();
    let path = format!("{}:{}", venv_bin.display(), std::env::var("PATH").unwrap_or_default());
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = format!("http://{listen}");
    let up = [
        "up",
        "--detach",
        "--state-dir",
        &state.to_string_lossy(),
        "--pg-port",
        &free_port().to_string(),
        "--listen",
        &listen,
        "--http-listen",
        "off",
        "--devices",
        "cpu:2",
    ];
    let out = ablate_in(&config, &path, &up);
    assert!(out.status.success(), "{}", text(&out));
    let down = || ablate_in(&config, &path, &["down", "--state-dir", &state.to_string_lossy()]);
    let spec = examples().join("pytorch-mup/sweep.toml");
    let out = ablate_in(
        &config,
        &path,
        &["--coordinator", &addr, "submit", &spec.to_string_lossy(), "--wait"],
    );
    if !out.status.success() {
        let log = std::fs::read_to_string(state.join("up.log")).unwrap_or_default();
        down();
        panic!("the sweep failed: {}\n{log}", text(&out));
    }
    let experiment = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let report = ablate_in(&config, &path, &["--coordinator", &addr, "report", &experiment]);
    down();
    let report = text(&report);
    eprintln!("{report}");
    assert!(report.contains("transfer holds"), "{report}");
    let _ = std::fs::remove_dir_all(&home);
}
