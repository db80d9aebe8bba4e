//! No sick part hurts anyone else: a worker that can't start trials gives
//! them back without spending their attempts and says why in `ablate
//! workers`; one whose executable is deleted under it keeps working; one
//! whose object store refuses writes refuses to start; `submit --wait` rides
//! out a coordinator restart. Real coordinator, workers, PostgreSQL.

mod harness;

use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{assert_same_curves, bin, curve, text, Stack, RESUME_SPEC};

const SPEC: &str = r#"
name = "NAME"
family = "train"
[base]
optimizer = "adam"
log2_lr = -7
width = 32
steps = 60
checkpoint_every = 20
[sweep]
searcher = "grid"
params.seed = [0, 1, 2, 3, 4, 5]
"#;

/// Starts a healthy worker and checks that it finishes all six trials of `SPEC`, each on its first attempt.
async fn a_healthy_worker_finishes_every_trial_first_time(stack: &mut Stack, experiment: &str) {
    stack.start_worker("cpu:2");
    stack.wait_finished(experiment, Duration::from_secs(120)).await;
    assert_eq!(
        first_attempt_successes(stack, experiment).await,
        (6, 1),
        "every trial succeeded on its first attempt:\n{}",
        stack.logs()
    );
}

async fn first_attempt_successes(stack: &Stack, experiment: &str) -> (i64, i64) {
    let ok = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_results where experiment_id = '{experiment}' and state = 'succeeded'"
        ))
        .await;
    let most = stack
        .scalar_i64(&format!(
            "select coalesce(max(attempt), 0)::bigint from ablate.trial_results where experiment_id = '{experiment}'"
        ))
        .await;
    (ok, most)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_cannot_start_trials_fails_none_and_says_why() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker_from(
        &bin("ablate-worker"),
        "cpu:2",
        &["--trial-exe", "/nonexistent/ablate-worker"],
    );
    let spec = stack.write_spec("sick.toml", &SPEC.replace("NAME", "sick"));
    let experiment = stack.submit(&spec);
    // The sick worker tries, gives back, backs off and says why.
    stack
        .wait_for_workers("unhealthy: cannot start trial processes", |t| {
            t.contains("unhealthy: cannot start trial processes")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let failed = stack
        .scalar_i64("select count(*) from trials where state = 'failed' or attempt > 1")
        .await;
    assert_eq!(
        failed,
        0,
        "the sick worker spent no trial's attempts:\n{}",
        stack.logs()
    );
    let held = stack
        .scalar_i64("select count(*) from trials where state = 'running'")
        .await;
    assert!(held <= 1, "a sick worker holds at most one lease, held {held}");

    a_healthy_worker_finishes_every_trial_first_time(&mut stack, &experiment).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_executable_is_deleted_keeps_running_trials() {
    let mut stack = Stack::start(15.0).await;
    let copy = stack.dir.join("ablate-worker-copy");
    std::fs::copy(bin("ablate-worker"), &copy).unwrap();
    stack.start_worker_from(&copy, "cpu:2", &[]);
    stack
        .wait_for("select count(*) = 1 from workers", Duration::from_secs(30))
        .await;
    std::fs::remove_file(&copy).unwrap();
    let spec = stack.write_spec("deleted.toml", &SPEC.replace("NAME", "deleted"));
    let experiment = stack.submit(&spec);
    stack.wait_finished(&experiment, Duration::from_secs(120)).await;
    assert_eq!(
        first_attempt_successes(&stack, &experiment).await,
        (6, 1),
        "every trial succeeded on its first attempt:\n{}",
        stack.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_object_store_refuses_writes_refuses_to_start() {
    let stack = Stack::start(15.0).await;
    let spec = stack.write_spec("waiting.toml", &SPEC.replace("NAME", "waiting"));
    stack.submit(&spec);
    // A path under a regular file: no directory can be made there.
    let out = Command::new(bin("ablate-worker"))
        .args(["daemon", "--coordinator", &stack.addr(), "--devices", "cpu:1"])
        .args(["--object-store", "/etc/hostname/objects"])
        .arg("--state-dir")
        .arg(stack.dir.join("refused"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the worker started:\n{}", text(&out));
    assert!(
        text(&out).contains("refuses this worker"),
        "the refusal says why:\n{}",
        text(&out)
    );
    assert_eq!(stack.scalar_i64("select count(*) from workers").await, 0);
    assert_eq!(
        stack
            .scalar_i64("select count(*) from trials where state <> 'pending' or attempt > 0")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_rides_out_a_coordinator_restart() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker("cpu:2");
    let slow = SPEC
        .replace("NAME", "restart")
        .replace("steps = 60", "steps = 150\nstep_delay_ms = 30")
        .replace("params.seed = [0, 1, 2, 3, 4, 5]", "params.seed = [0, 1, 2, 3]");
    let spec = stack.write_spec("restart.toml", &slow);
    let waiting = Command::new(bin("ablate"))
        .args(["submit", &spec.to_string_lossy(), "--wait"])
        .env("ABLATE_COORDINATOR", stack.addr())
        .env("ABLATE_TOKEN", &stack.admin_token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    stack
        .wait_for(
            "select count(*) >= 2 from trials where state = 'running'",
            Duration::from_secs(60),
        )
        .await;
    stack.kill_coordinator();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.start_coordinator().await;
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "submit --wait failed:\n{}\n{}",
        text(&out),
        stack.logs()
    );
    assert!(text(&out).contains("reconnecting"), "{}", text(&out));
    let experiment = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (ok, _) = first_attempt_successes(&stack, &experiment).await;
    assert_eq!(ok, 4, "{}", stack.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_trial_process_is_retried_from_its_checkpoint_on_the_same_curve() {
    let mut stack = Stack::start(15.0).await;
    let worker = stack.start_worker("cpu:1");
    let spec = stack.write_spec("crash.toml", &RESUME_SPEC.replace("NAME", "crash"));
    let crashed = stack.submit(&spec);
    stack
        .wait_for("select count(*) >= 2 from checkpoints", Duration::from_secs(60))
        .await;
    // Its batches' chunks before the newest checkpoint have been merged (a
    // batch holds about 13 steps): the crash and the resume happen across a merge.
    stack
        .wait_for(
            "select count(*) > 0 from metric_chunks c join trials t on t.id = c.trial_id
             where t.state = 'running' and c.n >= 40",
            Duration::from_secs(30),
        )
        .await;
    let pids = stack.trial_pids(worker);
    assert_eq!(pids.len(), 1, "one trial process: {pids:?}");
    // As the OOM killer would.
    // SAFETY: signalling a process this test's worker started.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    stack.wait_finished(&crashed, Duration::from_secs(120)).await;
    assert_eq!(
        first_attempt_successes(&stack, &crashed).await,
        (1, 2),
        "the trial succeeded on its second attempt:\n{}",
        stack.logs()
    );
    let attempts: Vec<(i32, String, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select attempt, outcome, error from ablate.trial_attempts where experiment_id = '{crashed}' order by attempt"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!((attempts[0].0, attempts[0].1.as_str()), (1, "crashed"), "{attempts:?}");
    assert!(
        attempts[0].2.as_deref().unwrap_or_default().contains("signal: 9"),
        "{attempts:?}"
    );
    assert_eq!((attempts[1].0, attempts[1].1.as_str()), (2, "succeeded"));

    let spec = stack.write_spec("unbroken.toml", &RESUME_SPEC.replace("NAME", "unbroken"));
    let unbroken = stack.submit(&spec);
    stack.wait_finished(&unbroken, Duration::from_secs(120)).await;
    // Both finished trials' chunks are merged now.
    stack
        .wait_for(
            "select count(*) = 0 from trials where metrics_due",
            Duration::from_secs(30),
        )
        .await;
    let (a, b) = (curve(&stack, &crashed).await, curve(&stack, &unbroken).await);
    assert_eq!(a.len(), 300, "every step exactly once");
    assert_same_curves(&a, &b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_away_for_three_lease_lifetimes_restarts_no_trial() {
    // Lease TTL 2 s; the coordinator is gone for 6 s while both trials run.
    let mut stack = Stack::start(2.0).await;
    stack.start_worker("cpu:2");
    let long = RESUME_SPEC
        .replace("steps = 300", "steps = 600")
        .replace("params.seed = [3]", "params.seed = [3, 4]");
    let spec = stack.write_spec("away.toml", &long.replace("NAME", "away"));
    let away = stack.submit(&spec);
    stack
        .wait_for(
            "select count(*) = 2 from trials where state = 'running'",
            Duration::from_secs(60),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.kill_coordinator();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stack.start_coordinator().await;
    stack.wait_finished(&away, Duration::from_secs(180)).await;
    assert_eq!(
        first_attempt_successes(&stack, &away).await,
        (2, 1),
        "both trials finished on their first attempt:\n{}",
        stack.logs()
    );
    let spec = stack.write_spec("steady.toml", &long.replace("NAME", "steady"));
    let steady = stack.submit(&spec);
    stack.wait_finished(&steady, Duration::from_secs(180)).await;
    let (a, b) = (curve(&stack, &away).await, curve(&stack, &steady).await);
    assert_eq!(a.len(), 2 * 600, "every step of both trials exactly once");
    assert_same_curves(&a, &b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_is_listed_as_lost_after_the_live_ones() {
    let mut stack = Stack::start(2.0).await;
    let doomed = stack.start_worker("cpu:1");
    stack
        .wait_for("select count(*) = 1 from workers", Duration::from_secs(30))
        .await;
    stack.kill_worker(doomed);
    stack.start_worker("cpu:1");
    stack
        .wait_for_workers("the live worker, then the lost one", |t| {
            let lines: Vec<&str> = t.lines().skip(2).collect();
            lines.len() == 2 && lines[0].ends_with(" ok") && lines[1].ends_with(" lost")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_mid_sweep_loses_and_repeats_nothing() {
    // A server of the test's own, so that restarting it disturbs no other test.
    let pg_dir = std::env::temp_dir().join(format!("ablate-pg-restart-{}", std::process::id()));
    let pg_dir_arg = pg_dir.to_string_lossy().into_owned();
    let pg_port = harness::free_port().to_string();
    let db = |action: &str| {
        let mut args = vec!["db", action, "--state-dir", &pg_dir_arg];
        if action == "start" {
            args.extend(["--pg-port", &pg_port]);
        }
        let out = Command::new(bin("ablate")).args(&args).output().unwrap();
        assert!(out.status.success(), "ablate db {action}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let url = db("start");
    let mut stack = Stack::start_on(&url, 15.0).await;
    stack.start_worker("cpu:2");
    let spec_text = RESUME_SPEC.replace("params.seed = [3]", "params.seed = [3, 4, 5, 6]");
    let spec = stack.write_spec("pg.toml", &spec_text.replace("NAME", "pg-restart"));
    let restarted = stack.submit(&spec);
    stack
        .wait_for(
            "select coalesce(sum(n), 0) > 200 from metric_chunks",
            Duration::from_secs(60),
        )
        .await;
    db("stop");
    tokio::time::sleep(Duration::from_secs(3)).await;
    db("start");
    stack.wait_finished(&restarted, Duration::from_secs(180)).await;
    assert_eq!(
        first_attempt_successes(&stack, &restarted).await,
        (4, 1),
        "every trial finished on its first attempt:\n{}",
        stack.logs()
    );
    let spec = stack.write_spec("steady.toml", &spec_text.replace("NAME", "steady"));
    let steady = stack.submit(&spec);
    stack.wait_finished(&steady, Duration::from_secs(180)).await;
    stack
        .wait_for(
            "select count(*) = 0 from trials where metrics_due",
            Duration::from_secs(30),
        )
        .await;
    let (a, b) = (curve(&stack, &restarted).await, curve(&stack, &steady).await);
    assert_eq!(a.len(), 4 * 300, "every (trial, step) exactly once");
    assert_same_curves(&a, &b);
    let evals = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.metric_series where experiment_id = '{restarted}' and name = 'eval_loss'"
        ))
        .await;
    assert_eq!(evals, 4 * 6, "eval_loss at 50, 100, ..., 300 of each trial, once");
    drop(stack);
    db("stop");
    std::fs::remove_dir_all(&pg_dir).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_store_away_mid_checkpoint_costs_no_trial_and_leaves_no_dangling_record() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker("cpu:1");
    let objects = stack.dir.join("objects");
    let spec = stack.write_spec("store.toml", &RESUME_SPEC.replace("NAME", "store-away"));
    let away = stack.submit(&spec);
    stack
        .wait_for("select count(*) >= 1 from checkpoints", Duration::from_secs(60))
        .await;
    // The store goes away for 3 s: its folder becomes a file, so every write fails.
    let parked = stack.dir.join("objects-away");
    std::fs::rename(&objects, &parked).unwrap();
    std::fs::write(&objects, b"not a folder").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::remove_file(&objects).unwrap();
    std::fs::rename(&parked, &objects).unwrap();
    stack.wait_finished(&away, Duration::from_secs(120)).await;
    assert_eq!(
        first_attempt_successes(&stack, &away).await,
        (1, 1),
        "the trial succeeded on its first attempt:\n{}",
        stack.logs()
    );
    let paths: Vec<(String,)> = sqlx::query_as("select path from ablate.checkpoints")
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    assert!(paths.len() >= 5, "{paths:?}");
    for (path,) in &paths {
        assert!(
            objects.join(path).is_file(),
            "the checkpoint record {path} names no object"
        );
    }
    let spec = stack.write_spec("steady.toml", &RESUME_SPEC.replace("NAME", "steady"));
    let steady = stack.submit(&spec);
    stack.wait_finished(&steady, Duration::from_secs(120)).await;
    assert_same_curves(&curve(&stack, &away).await, &curve(&stack, &steady).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_a_wrong_s3_secret_refuses_to_start_and_fails_no_trial() {
    let mut stack = Stack::start(15.0).await;
    let (key, _) = stack.use_s3_checking_signatures();
    let (url, env) = stack.object_store.clone().unwrap();
    let spec = stack.write_spec("s3.toml", &SPEC.replace("NAME", "s3-keys"));
    let experiment = stack.submit(&spec);
    let out = Command::new(bin("ablate-worker"))
        .args(["daemon", "--coordinator", &stack.addr(), "--devices", "cpu:1"])
        .args(["--object-store", &url])
        .arg("--state-dir")
        .arg(stack.dir.join("wrong-secret"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("AWS_ACCESS_KEY_ID", &key)
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the worker started:\n{}", text(&out));
    assert!(text(&out).contains("refuses this worker"), "{}", text(&out));
    assert_eq!(stack.scalar_i64("select count(*) from workers").await, 0);
    assert_eq!(
        stack
            .scalar_i64("select count(*) from trials where state <> 'pending' or attempt > 0")
            .await,
        0,
        "no trial was touched"
    );
    // With the right secret, every trial runs on its first attempt.
    a_healthy_worker_finishes_every_trial_first_time(&mut stack, &experiment).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_lost_its_libraries_fails_no_trial() {
    let mut stack = Stack::start(15.0).await;
    // What the dynamic loader does on a node that lost libtorch.
    let exe = stack.dir.join("lost-libraries.sh");
    std::fs::write(
        &exe,
        "#!/bin/sh\necho 'ablate-worker: error while loading shared libraries: libtorch_cpu.so: \
         cannot open shared object file: No such file or directory' >&2\nexit 127\n",
    )
    .unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    stack.start_worker_from(&bin("ablate-worker"), "cpu:2", &["--trial-exe", &exe.to_string_lossy()]);
    let spec = stack.write_spec("libs.toml", &SPEC.replace("NAME", "lost-libraries"));
    let experiment = stack.submit(&spec);
    stack
        .wait_for_workers("error while loading shared libraries", |t| {
            t.contains("error while loading shared libraries")
        })
        .await;
    assert_eq!(
        stack
            .scalar_i64("select count(*) from trials where state = 'failed' or attempt > 1")
            .await,
        0,
        "no trial spent an attempt on the sick node"
    );
    a_healthy_worker_finishes_every_trial_first_time(&mut stack, &experiment).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_coordinators_share_a_sweep_and_one_killed_loses_nothing() {
    let mut stack = Stack::start(15.0).await;
    let (replica, _replica) = stack.start_replica().await;
    let both = format!("{},{replica}", stack.addr());
    // Workers list both replicas (in either order); the CLI goes through the replica.
    stack.worker_coordinator = Some(both.clone());
    stack.start_worker("cpu:1");
    stack.worker_coordinator = Some(format!("{replica},{}", stack.addr()));
    stack.start_worker("cpu:1");
    let spec = stack.write_spec("replicas.toml", &harness::resume_spec("replicas", 0..4));
    let token = stack.admin_token.clone();
    let via = |addr: &str, args: &[&str]| {
        Command::new(bin("ablate"))
            .args(args)
            .env("ABLATE_COORDINATOR", addr)
            .env("ABLATE_TOKEN", &token)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = via(&replica, &["submit", &spec.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out));
    let experiment = String::from_utf8_lossy(&out.stdout).trim().to_string();
    stack
        .wait_for(
            "select count(*) >= 2 from trials t where t.state = 'running'
               and exists (select 1 from checkpoints c where c.trial_id = t.id)",
            Duration::from_secs(60),
        )
        .await;
    // SIGKILL the first coordinator mid-sweep: its workers' calls move to the replica.
    stack.kill_coordinator();
    stack.wait_finished(&experiment, Duration::from_secs(120)).await;
    let succeeded = stack
        .scalar_i64(&format!(
            "select count(*) from trials where experiment_id = '{experiment}' and state = 'succeeded'"
        ))
        .await;
    assert_eq!(succeeded, 4, "{}", stack.logs());
    // Nothing lost or counted twice: every step's point exactly once, no attempt lost.
    let points = curve(&stack, &experiment).await;
    assert_eq!(points.len(), 4 * 300, "{}", stack.logs());
    let attempts = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_attempts where experiment_id = '{experiment}' and outcome <> 'succeeded'"
        ))
        .await;
    assert_eq!(attempts, 0, "{}", stack.logs());
    // The CLI given both addresses, the dead one first, reaches the live one.
    let out = via(&both, &["status", &experiment]);
    assert!(
        out.status.success() && text(&out).contains("succeeded"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_mid_compaction_loses_and_repeats_no_point() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker("cpu:1");
    let spec = stack.write_spec(
        "compact.toml",
        &RESUME_SPEC
            .replace("NAME", "compact")
            .replace("steps = 300", "steps = 1500")
            .replace("checkpoint_every = 40", "checkpoint_every = 500")
            .replace("eval_every = 50", "eval_every = 500")
            .replace("step_delay_ms = 15", "step_delay_ms = 0"),
    );
    // Held while the trial finishes, the lock stops the compactor's transaction
    // at its downsampled copy (of the 1,500-point train_loss curve), after
    // everything else it does to the trial's points and before it commits.
    let mut blocker = stack.pool.begin().await.unwrap();
    sqlx::query("lock table metric_curves in share mode")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let experiment = stack.submit(&spec);
    stack.wait_finished(&experiment, Duration::from_secs(180)).await;
    let compacting = "select count(*) > 0 from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid()
           and wait_event_type = 'Lock' and query like 'insert into metric_curves%'";
    stack.wait_for(compacting, Duration::from_secs(30)).await;
    let points = "select step, value from ablate.metric_series where name = 'train_loss' order by step";
    let before: Vec<(i64, f64)> = sqlx::query_as(points).fetch_all(&stack.pool).await.unwrap();
    assert_eq!(before.len(), 1500, "{}", stack.logs());

    stack.kill_coordinator();
    blocker.rollback().await.unwrap();
    // The compactor's backend finds its client gone and rolls back.
    let gone = "select count(*) = 0 from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid() and query like 'insert into metric_curves%'
           and state <> 'idle'";
    stack.wait_for(gone, Duration::from_secs(30)).await;
    let (due, kept, copies): (bool, Option<serde_json::Value>, i64) = sqlx::query_as(
        "select bool_or(metrics_due), max(final_metrics::text)::jsonb, (select count(*) from metric_curves) from trials",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!((due, kept, copies), (true, None, 0), "the compaction was undone whole");
    let undone: Vec<(i64, f64)> = sqlx::query_as(points).fetch_all(&stack.pool).await.unwrap();
    assert_eq!(undone, before, "every point as it was");

    stack.start_coordinator().await;
    stack
        .wait_for(
            "select count(*) = 0 from trials where metrics_due",
            Duration::from_secs(30),
        )
        .await;
    let after: Vec<(i64, f64)> = sqlx::query_as(points).fetch_all(&stack.pool).await.unwrap();
    assert_eq!(after, before, "compacted after the restart: each point once, as it was");
    let (copy_points, finals, results): (i64, serde_json::Value, serde_json::Value) = sqlx::query_as(
        "select d.points, t.final_metrics, r.metrics from metric_curves d
         join metric_names n on n.id = d.name_id and n.name = 'train_loss'
         join trials t on t.id = d.trial_id join ablate.trial_results r on r.trial_id = t.id",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(copy_points, 1500, "the downsampled copy stands for every point");
    assert_eq!(finals, results);
    assert_eq!(finals["train_loss"].as_f64(), Some(before[1499].1));
}
