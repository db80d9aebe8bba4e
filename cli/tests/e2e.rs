//! End to end: real PostgreSQL, real libtorch, real processes killed for real.

mod harness;

use std::time::Duration;

use ablate_schema::proto::{self, experiments_client::ExperimentsClient};
use harness::{assert_same_curves, curve_of, spec_path, stderr, text, Stack, RESUME_SPEC};

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn quickstart_sweep_finishes_with_one_row_per_metric_step() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker("cpu:2");
    let spec = spec_path("quickstart.toml");
    let out = stack.ablate(&["submit", &spec.to_string_lossy(), "--wait"]);
    assert!(out.status.success(), "sweep failed: {}\n{}", stderr(&out), stack.logs());
    let id = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        uuid::Uuid::parse_str(id.trim()).is_ok(),
        "stdout should hold only the id, got {id:?}"
    );
    assert!(stderr(&out).contains("best trials by eval_loss"), "{}", stderr(&out));

    let out = stack.ablate(&[
        "sql",
        "select count(*) from ablate.trial_results where state = 'succeeded'",
        "--format",
        "csv",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "count\n12\n", "{}", stderr(&out));

    // Every trial logged train_loss at steps 1..=300 exactly once, eval metrics and its
    // training FLOPs so far at 50, 100, ..., 300, and its parameter count once, at step 0.
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "select name, count(*), min(step), max(step) from ablate.metric_series group by trial_id, name order by name",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 12 * 7, "{rows:?}");
    for (name, count, min, max) in rows {
        let expected = match name.as_str() {
            "train_loss" => (300, 1, 300),
            "eval_loss" | "eval_accuracy" | "train_flops" => (6, 50, 300),
            "train_loss_tail" | "train_loss_final" => (1, 300, 300),
            "num_params" => (1, 0, 0),
            other => panic!("unexpected metric {other}"),
        };
        assert_eq!((count, min, max), expected, "{name}");
    }
    let best: f64 = sqlx::query_scalar("select min(objective) from ablate.trial_results")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(
        best < 0.3,
        "the best quickstart trial should learn digits, eval_loss {best}"
    );
    let checkpoints = stack.scalar_i64("select count(*) from ablate.checkpoints").await;
    assert_eq!(checkpoints, 12 * 2, "checkpoints at steps 100 and 200 of every trial");
}

async fn final_metrics(stack: &Stack, experiment: &str) -> (f64, f64) {
    sqlx::query_as(
        "select (metrics->>'eval_loss')::float8, (metrics->>'train_loss_tail')::float8
         from ablate.trial_results where experiment_id = $1::uuid",
    )
    .bind(experiment)
    .fetch_one(&stack.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_trial_resumes_from_its_checkpoint_on_the_same_curve() {
    killed_worker_resumes(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_trial_resumes_from_a_checkpoint_in_s3() {
    killed_worker_resumes(true).await;
}

async fn killed_worker_resumes(s3: bool) {
    let mut stack = Stack::start(2.0).await;
    if s3 {
        stack.use_s3();
    }
    let spec = stack.write_spec("resume.toml", &RESUME_SPEC.replace("NAME", "resume"));
    let experiment = stack.submit(&spec);
    let worker = stack.start_worker("cpu:1");
    stack
        .wait_for("select coalesce(max(step), 0) >= 120 from ablate.checkpoints", MINUTE)
        .await;
    stack.kill_worker(worker);
    let killed_at: sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc> =
        sqlx::query_scalar("select now()").fetch_one(&stack.pool).await.unwrap();
    let resume_step = stack.scalar_i64("select max(step) from ablate.checkpoints").await;
    let state: String = sqlx::query_scalar("select state from ablate.trial_results")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(state, "running", "the trial should be mid-way when killed");

    stack.start_worker("cpu:1");
    stack.wait_finished(&experiment, 2 * MINUTE).await;
    let (state, attempt): (String, i32) = sqlx::query_as("select state, attempt from ablate.trial_results")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!((state.as_str(), attempt), ("succeeded", 2), "{}", stack.logs());

    // The second attempt started at the checkpoint: no point at or before it was logged again.
    let replayed: i64 = sqlx::query_scalar(
        "select count(*) from ablate.metric_series where name = 'train_loss' and step <= $1 and recorded_at > $2",
    )
    .bind(resume_step)
    .bind(killed_at)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        replayed, 0,
        "the resumed trial re-ran steps before its checkpoint at {resume_step}"
    );
    let first_new_checkpoint: i64 = sqlx::query_scalar("select min(step) from ablate.checkpoints where attempt = 2")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(
        first_new_checkpoint > resume_step,
        "attempt 2 checkpointed {first_new_checkpoint} <= {resume_step}"
    );
    let steps = stack
        .scalar_i64("select count(*) from ablate.metric_series where name = 'train_loss'")
        .await;
    assert_eq!(steps, 300);
    let path: String = sqlx::query_scalar("select path from ablate.checkpoints order by step limit 1")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    let local = stack.dir.join("objects").join(&path);
    if s3 {
        assert!(path.starts_with("checkpoints/experiments/"), "{path}");
        assert!(!local.exists(), "with S3 nothing is written to the local directory");
    } else {
        assert!(local.exists(), "{} is missing", local.display());
    }

    // An unbroken run with the same seed is on the same curves, and ends where they end.
    let spec = stack.write_spec("reference.toml", &RESUME_SPEC.replace("NAME", "reference"));
    let reference = stack.submit(&spec);
    stack.wait_finished(&reference, 2 * MINUTE).await;
    let (resumed_train, unbroken_train) = (
        curve_of(&stack, &experiment, "train_loss").await,
        curve_of(&stack, &reference, "train_loss").await,
    );
    assert_same_curves(&resumed_train, &unbroken_train);
    let (resumed_eval, unbroken_eval) = (
        curve_of(&stack, &experiment, "eval_loss").await,
        curve_of(&stack, &reference, "eval_loss").await,
    );
    assert_eq!(resumed_eval.len(), 6, "eval_loss at steps 50, 100, ..., 300");
    assert_same_curves(&resumed_eval, &unbroken_eval);
    let mut tails = Vec::new();
    for (id, eval) in [(&experiment, &resumed_eval), (&reference, &unbroken_eval)] {
        let (final_eval, tail) = final_metrics(&stack, id).await;
        assert_eq!(
            final_eval, eval[5].2,
            "trial_results' eval_loss is the last point of its curve"
        );
        assert!(tail.is_finite() && tail > 0.0, "train_loss_tail {tail}");
        tails.push(tail);
    }
    if resumed_train == unbroken_train {
        let (a_tail, b_tail) = (tails[0], tails[1]);
        assert!(
            (a_tail - b_tail).abs() <= 1e-6,
            "train_loss_tail resumed {a_tail} vs unbroken {b_tail} on equal curves"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_mid_sweep_loses_no_trial_and_no_metric() {
    let mut stack = Stack::start(5.0).await;
    let spec = stack.write_spec(
        "restart.toml",
        &RESUME_SPEC
            .replace("NAME", "restart")
            .replace("steps = 300", "steps = 150")
            .replace("step_delay_ms = 15", "step_delay_ms = 8")
            .replace("params.seed = [3]", "params.seed = [0, 1, 2, 3]"),
    );
    let experiment = stack.submit(&spec);
    stack.start_worker("cpu:2");
    stack
        .wait_for("select count(*) > 100 from ablate.metric_series", MINUTE)
        .await;
    stack.kill_coordinator();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.start_coordinator().await;
    stack.wait_finished(&experiment, 3 * MINUTE).await;
    let succeeded = stack
        .scalar_i64("select count(*) from ablate.trial_results where state = 'succeeded'")
        .await;
    assert_eq!(succeeded, 4, "{}", stack.logs());
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "select count(*), min(step), max(step) from ablate.metric_series where name = 'train_loss' group by trial_id",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![(150, 1, 150); 4],
        "every train_loss step of every trial is stored once"
    );
    let evals = stack
        .scalar_i64("select count(*) from ablate.metric_series where name = 'eval_loss'")
        .await;
    assert_eq!(evals, 4 * 3, "eval_loss at 50, 100, 150 for each trial");
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_in_one_call_are_fenced_one_by_one_and_checked_before_any_is_kept() {
    let stack = Stack::start(15.0).await;
    let spec = RESUME_SPEC
        .replace("NAME", "many")
        .replace("params.seed = [3]", "params.seed = [3, 4, 5]");
    stack.submit(&stack.write_spec("many.toml", &spec));
    let (mut workers, mut leased) = stack.lease_as_worker(3).await;
    assert_eq!(leased.len(), 3);
    leased.sort_by_key(|t| t.trial_id.clone());
    let ids: Vec<String> = leased.iter().map(|t| t.trial_id.clone()).collect();
    let with = |t: &proto::LeasedTrial, token: &str, outcome: &str| proto::CompleteRequest {
        lease_token: token.to_string(),
        outcome: outcome.to_string(),
        error: if outcome == "crashed" {
            "signal: 9".into()
        } else {
            String::new()
        },
        ..proto::CompleteRequest::succeeded(t.clone())
    };
    let wrong = uuid::Uuid::new_v4().to_string();

    // A bad outcome anywhere refuses the whole call: nothing changes.
    let refused = workers
        .complete_many(proto::CompleteManyRequest {
            completions: vec![
                with(&leased[0], &leased[0].lease_token, "succeeded"),
                with(&leased[1], &leased[1].lease_token, "exploded"),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("exploded"), "{}", refused.message());
    let running = stack
        .scalar_i64("select count(*) from trials where state = 'running'")
        .await;
    assert_eq!(running, 3, "a refused call records nothing");

    let answer = workers
        .complete_many(proto::CompleteManyRequest {
            completions: vec![
                with(&leased[0], &leased[0].lease_token, "succeeded"),
                with(&leased[1], &wrong, "succeeded"),
                with(&leased[2], &leased[2].lease_token, "crashed"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.stale_trial_ids,
        vec![ids[1].clone()],
        "only the wrong token is stale"
    );
    let states: Vec<(String, String)> = sqlx::query_as("select id::text, state from trials order by id::text")
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    assert_eq!(
        states,
        vec![
            (ids[0].clone(), "succeeded".to_string()),
            (ids[1].clone(), "running".to_string()),
            (ids[2].clone(), "pending".to_string())
        ],
        "one succeeded, the stale one untouched, the crashed one back in the queue"
    );
    let attempts: Vec<(String, String)> =
        sqlx::query_as("select trial_id::text, outcome from ablate.trial_attempts order by trial_id::text")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(
        attempts,
        vec![
            (ids[0].clone(), "succeeded".to_string()),
            (ids[2].clone(), "crashed".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_lease_tokens_are_refused_over_grpc() {
    let stack = Stack::start(15.0).await;
    let spec = stack.write_spec("stale.toml", &RESUME_SPEC.replace("NAME", "stale"));
    stack.submit(&spec);
    let (mut workers, mut leased) = stack.lease_as_worker(1).await;
    let leased = leased.remove(0);
    let wrong = uuid::Uuid::new_v4().to_string();
    let batch = |token: &str, seq| proto::MetricBatch {
        seq,
        trial_id: leased.trial_id.clone(),
        lease_token: token.to_string(),
        names: vec!["train_loss".into()],
        name_index: vec![0],
        steps: vec![1],
        values: vec![0.5],
    };
    let batches = vec![batch(&wrong, 1), batch(&leased.lease_token, 2)];
    let mut acks = workers
        .stream_metrics(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    // Acks may come in any order; each names its batch.
    let mut got = [
        acks.message().await.unwrap().unwrap(),
        acks.message().await.unwrap().unwrap(),
    ];
    got.sort_by_key(|a| a.seq);
    assert_eq!((got[0].seq, got[0].status.as_str()), (1, "stale_lease"));
    assert_eq!((got[1].seq, got[1].status.as_str()), (2, "durable"));

    let checkpoint = workers
        .report_checkpoint(proto::CheckpointReport {
            trial_id: leased.trial_id.clone(),
            lease_token: wrong.clone(),
            checkpoint: Some(proto::Checkpoint {
                step: 1,
                path: "x".into(),
                bytes: 1,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(checkpoint.code(), tonic::Code::FailedPrecondition);
    let complete = |token: String| proto::CompleteRequest {
        lease_token: token,
        ..proto::CompleteRequest::succeeded(leased.clone())
    };
    let refused = workers.complete(complete(wrong)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    workers.complete(complete(leased.lease_token.clone())).await.unwrap();
    let stored = stack.scalar_i64("select count(*) from ablate.metric_series").await;
    assert_eq!(stored, 1, "only the current holder's point is stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_specs_are_refused_with_the_field_path_and_nothing_is_stored() {
    let stack = Stack::start(15.0).await;
    let good = RESUME_SPEC.replace("NAME", "bad");
    let cases = [
        (good.replace("width = 64", "width = 64\nwidht = 32"), "base.widht"),
        (good.replace("width = 64", "width = \"wide\""), "base.width"),
        (
            good.replace("params.seed = [3]", "params.seed = []"),
            "sweep.params.seed",
        ),
        (good.replace("params.seed = [3]", ""), "sweep.params"),
        (
            good.replace("searcher = \"grid\"", "searcher = \"grid\"\nbogus = 1"),
            "sweep.bogus",
        ),
    ];
    for (i, (text, path)) in cases.iter().enumerate() {
        let spec = stack.write_spec(&format!("bad-{i}.toml"), text);
        let out = stack.ablate(&["submit", &spec.to_string_lossy()]);
        assert!(!out.status.success(), "case {i} was accepted");
        assert!(out.stdout.is_empty(), "no id is printed for a refused spec");
        assert!(
            stderr(&out).contains(&format!("{path}:")),
            "case {i}: `{}` lacks `{path}:`",
            stderr(&out)
        );
    }
    let yaml = stack.write_spec(
        "bad.yaml",
        "name: y\nfamily: train\nsweep:\n  searcher: grid\n  params: {}\n",
    );
    let out = stack.ablate(&["submit", &yaml.to_string_lossy()]);
    assert!(stderr(&out).contains("sweep.params:"), "{}", stderr(&out));
    assert_eq!(stack.scalar_i64("select count(*) from experiments").await, 0);
    assert_eq!(stack.scalar_i64("select count(*) from trials").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn ablate_sql_refuses_writes_and_formats_results() {
    let stack = Stack::start(15.0).await;
    let spec = stack.write_spec("sql.toml", &RESUME_SPEC.replace("NAME", "sql"));
    stack.submit(&spec);
    for write in [
        "delete from ablate.trial_results",
        "update trials set state = 'failed'",
        "with d as (delete from trials returning 1) select count(*) from d",
        "insert into experiments select * from experiments",
        "truncate trials",
    ] {
        let out = stack.ablate(&["sql", write]);
        assert!(!out.status.success(), "`{write}` was accepted");
        assert!(stderr(&out).contains("error:"), "{}", stderr(&out));
    }
    assert_eq!(stack.scalar_i64("select count(*) from trials").await, 1);
    let out = stack.ablate(&[
        "sql",
        "select name, 'a,b' as tricky from ablate.experiments",
        "--format",
        "csv",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "name,tricky\nsql,\"a,b\"\n");
    let out = stack.ablate(&["sql", "select name, 2 as n from ablate.experiments", "--format", "json"]);
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(parsed, serde_json::json!([{"name": "sql", "n": 2}]));
}

#[tokio::test(flavor = "multi_thread")]
async fn ablate_up_runs_a_sweep_on_the_embedded_default_and_down_stops_it() {
    let dir = std::env::temp_dir().join(format!("ablate-up-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = harness::free_port();
    let pg_port = harness::free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let ablate = |args: &[&str]| {
        std::process::Command::new(harness::bin("ablate"))
            .args(args)
            .env_remove("DATABASE_URL")
            .env("ABLATE_COORDINATOR", &addr)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let state = dir.join("state");
    let state = state.to_string_lossy();
    let listen = format!("127.0.0.1:{port}");
    let http = format!("127.0.0.1:{}", harness::free_port());
    let up = ablate(&[
        "up",
        "--detach",
        "--state-dir",
        &state,
        "--listen",
        &listen,
        "--http-listen",
        &http,
        "--pg-port",
        &pg_port.to_string(),
        "--devices",
        "cpu:2",
    ]);
    let log = || std::fs::read_to_string(dir.join("state/up.log")).unwrap_or_default();
    assert!(up.status.success(), "ablate up failed: {}\n{}", stderr(&up), log());
    // The HTTP listener answers probes and serves metrics.
    assert_eq!(harness::http_get(&http, "/readyz").unwrap().0, 200, "{}", log());
    let (status, page) = harness::http_get(&http, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("ablate_trials{state=\"pending\"}"), "{page}");
    let spec = dir.join("tiny.toml");
    std::fs::write(
        &spec,
        "name = \"tiny\"\nfamily = \"train\"\n[base]\noptimizer = \"sgd\"\nlr = 0.1\nsteps = 30\n[sweep]\nsearcher = \"grid\"\nparams.width = [16, 32]\n",
    )
    .unwrap();
    let out = ablate(&["submit", &spec.to_string_lossy(), "--wait"]);
    let down = ablate(&["down", "--state-dir", &state]);
    assert!(out.status.success(), "sweep failed: {}\n{}", stderr(&out), log());
    assert!(down.status.success(), "down failed: {}", stderr(&down));
    assert!(
        ablate(&["workers"]).status.code() != Some(0),
        "the coordinator still answers after down"
    );
    let mut client = ExperimentsClient::connect(addr.clone()).await;
    assert!(client.as_mut().is_err(), "the coordinator still accepts connections");
    assert!(
        dir.join("state/pg/data/PG_VERSION").exists(),
        "the embedded PostgreSQL keeps its data"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_trial_fails_with_its_stderr_tail_and_the_sweep_exits_non_zero() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker("cpu:2");
    let spec = stack.write_spec(
        "diverge.toml",
        "name = \"diverge\"\nfamily = \"train\"\n[base]\noptimizer = \"sgd\"\nsteps = 50\n[sweep]\nsearcher = \"grid\"\nparams.lr = [0.05, 1e9]\n",
    );
    let out = stack.ablate(&["submit", &spec.to_string_lossy(), "--wait"]);
    assert!(!out.status.success(), "a sweep with a failed trial must exit non-zero");
    assert!(stderr(&out).contains("ended failed"), "{}", stderr(&out));
    let (error, tail): (String, String) =
        sqlx::query_as("select error, stderr_tail from trials where state = 'failed'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert!(error.contains("diverged"), "{error}");
    assert!(tail.contains("training diverged at step"), "stderr tail: {tail}");
    let succeeded = stack
        .scalar_i64("select count(*) from ablate.trial_results where state = 'succeeded'")
        .await;
    assert_eq!(succeeded, 1, "the other trial is unaffected");
    let id = String::from_utf8(out.stdout).unwrap();
    let status = stack.ablate(&["status", id.trim()]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("training diverged"),
        "{}",
        stderr(&status)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_running_trials_and_frees_the_worker() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker("cpu:2");
    let spec = stack.write_spec(
        "long.toml",
        &RESUME_SPEC
            .replace("NAME", "long")
            .replace("steps = 300", "steps = 100000")
            .replace("params.seed = [3]", "params.seed = [0, 1, 2]"),
    );
    let experiment = stack.submit(&spec);
    stack
        .wait_for("select count(*) = 2 from trials where state = 'running'", MINUTE)
        .await;
    stack
        .wait_for("select count(*) > 0 from ablate.metric_series", MINUTE)
        .await;
    assert_eq!(stack.trial_processes(0), 2, "two trial processes run before the cancel");
    let out = stack.ablate(&["cancel", &experiment]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("cancelled 3 trial(s)"), "{}", stderr(&out));
    // The heartbeat carries the stop order; the worker kills its trial processes.
    let deadline = std::time::Instant::now() + MINUTE;
    while stack.trial_processes(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "trials still running after cancel:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state: String = sqlx::query_scalar("select state from ablate.experiments")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(state, "cancelled");
    assert!(stack.logs().contains("stopping trial"), "{}", stack.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coord_check_sweep_reports_its_verdict_with_figures() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker("cpu:2");
    let spec = spec_path("coord-check.toml");
    let id = stack.submit_and_wait(&spec);

    let json = stack.ablate(&["report", &id, "--format", "json"]);
    assert!(json.status.success(), "{}", stderr(&json));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["family"], "mup_transfer");
    let criteria = report["verdict"]["criteria"].as_array().unwrap();
    assert_eq!(criteria.len(), 2, "{report:#}");
    for c in criteria {
        assert!(
            c["name"].is_string() && c["threshold"].is_string() && c["measured"].is_number(),
            "{c}"
        );
    }
    assert_eq!(report["verdict"]["holds"], true, "{report:#}");

    let figures = stack.dir.join("figures");
    let text = stack.ablate(&["report", &id, "--out", &figures.to_string_lossy()]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(stdout.contains("coordinate check: slope"), "{stdout}");
    assert!(stdout.contains("verdict: every criterion holds"), "{stdout}");
    let svg = std::fs::read_to_string(figures.join("coord-check.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("layer 2"),
        "the SVG should hold the curves and their legend"
    );
    let png = std::fs::read(figures.join("coord-check.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_critical_batch_toy_reports_its_fit_from_curves_stored_in_postgres() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker("cpu:2");
    let spec = spec_path("cbs-toy.toml");
    let id = stack.submit_and_wait(&spec);

    // The curves the report reads are plain rows of the metric_series view.
    let sql = stack.ablate(&[
        "sql",
        &format!(
            "select count(distinct trial_id) from ablate.metric_series where experiment_id = '{id}' and name = 'b_simple'"
        ),
        "--format",
        "csv",
    ]);
    assert!(sql.status.success(), "{}", stderr(&sql));
    let out = String::from_utf8_lossy(&sql.stdout);
    let logged: i64 = out
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("a count under the header: {out}"));
    let trials = stack
        .scalar_i64(&format!("select count(*) from trials where experiment_id = '{id}'"))
        .await;
    assert_eq!((logged, trials), (30, 30), "every trial logs B_simple");

    let json = stack.ablate(&["report", &id, "--format", "json"]);
    assert!(json.status.success(), "{}", stderr(&json));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["family"], "critical_batch");
    let fit = &report["tables"][1];
    assert_eq!(
        fit["rows"].as_array().unwrap().len(),
        3,
        "one fit per budget: {report:#}"
    );
    for row in fit["rows"].as_array().unwrap() {
        let r2: f64 = row[5].as_str().unwrap().parse().unwrap();
        let cbs: f64 = row[6].as_str().unwrap().parse().unwrap();
        assert!(r2 >= 0.9 && cbs > 0.0, "{row}");
    }
    let growth = report["verdict"]["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().starts_with("CBS(16D)/CBS(D)"))
        .unwrap();
    assert_eq!(growth["holds"], true, "{report:#}");

    let figures = stack.dir.join("figures");
    let text = stack.ablate(&["report", &id, "--out", &figures.to_string_lossy()]);
    assert!(text.status.success(), "{}", stderr(&text));
    for name in ["cbs-steps", "cbs-scaling", "b-simple"] {
        let png = std::fs::read(figures.join(format!("{name}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}");
    }
}

/// A pool of JSONL shards in S3 (moto), featurized by trials on any of two workers, selected by
/// one trial, written back to S3 with a manifest whose key is a row of `ablate.outputs`.
#[tokio::test(flavor = "multi_thread")]
async fn dsir_selects_from_a_pool_in_s3_across_workers_and_names_the_selection_in_sql() {
    let mut stack = Stack::start(15.0).await;
    stack.use_s3();
    let data = std::path::PathBuf::from(ablate_experiments::nn::locations::data_root()).join("dsir");
    assert!(
        data.join("target/news.jsonl").exists(),
        "run `cargo xtask provision` for the DSIR corpus"
    );
    // A small pool: every fifth of the provisioned documents (the shards list genres in order).
    for shard in 0..4 {
        let text = std::fs::read_to_string(data.join(format!("pool/shard-{shard}.jsonl"))).unwrap();
        let head: String = text.lines().step_by(5).map(|l| format!("{l}\n")).collect();
        let file = stack.dir.join(format!("shard-{shard}.jsonl"));
        std::fs::write(&file, head).unwrap();
        stack.put_s3(&format!("pool/shard-{shard}.jsonl"), &file);
    }
    stack.put_s3("target/news.jsonl", &data.join("target/news.jsonl"));
    stack.start_worker("cpu:1");
    stack.start_worker("cpu:1");
    let spec = stack.write_spec(
        "dsir-s3.toml",
        r#"
name = "dsir-s3"
family = "dsir"
[base]
pool = "s3://e2e/pool"
target = "s3://e2e/target/news.jsonl"
target_genre = "news"
shards = 4
k = 200
[sweep]
searcher = "grid"
params.seed = [3]
"#,
    );
    let id = stack.submit_and_wait(&spec);

    let sql = stack.ablate(&[
        "sql",
        &format!(
            "select name, value->>'manifest' as manifest, value->>'documents' as documents from ablate.outputs \
             where experiment_id = '{id}' order by name"
        ),
        "--format",
        "csv",
    ]);
    assert!(sql.status.success(), "{}", stderr(&sql));
    let rows = String::from_utf8(sql.stdout).unwrap();
    let manifest_key = rows
        .lines()
        .find(|l| l.starts_with("selection,"))
        .and_then(|l| l.split(',').nth(1))
        .unwrap_or_else(|| panic!("no selection output: {rows}"))
        .to_string();
    assert!(rows.contains("random_selection,"), "{rows}");
    assert!(manifest_key.starts_with("checkpoints/experiments/"), "{manifest_key}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&stack.get_s3(&manifest_key).expect("manifest in S3")).unwrap();
    assert_eq!(manifest["documents"], 200);
    let mut selected = 0;
    for part in manifest["parts"].as_array().unwrap() {
        let bytes = stack.get_s3(part.as_str().unwrap()).expect("part in S3");
        selected += String::from_utf8(bytes).unwrap().lines().count();
    }
    assert_eq!(selected, 200, "the parts hold exactly the selection");

    let json = stack.ablate(&["report", &id, "--format", "json"]);
    assert!(json.status.success(), "{}", stderr(&json));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["family"], "dsir");
    let criteria = report["verdict"]["criteria"].as_array().unwrap();
    assert_eq!(criteria.len(), 2, "no downstream model in this spec: {report:#}");
    assert!(criteria.iter().all(|c| c["holds"] == true), "{report:#}");
    let stages = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_results where experiment_id = '{id}' and state = 'succeeded' \
             and params->>'stage' in ('features', 'select')"
        ))
        .await;
    assert_eq!(stages, 5, "four shards and one selection");
}

/// A completion the coordinator refuses as invalid (here outputs over `--max-output-bytes`)
/// fails the attempt at once with the coordinator's reason, not when its lease expires.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_completion_fails_the_attempt_at_once_with_the_coordinators_reason() {
    // Leases of 10 minutes: a worker that waited for its lease to expire would fail the test.
    let mut stack = Stack::start(600.0).await;
    stack.kill_coordinator();
    stack.coordinator_args = vec!["--max-output-bytes".into(), "64".into()];
    stack.start_coordinator().await;
    stack.start_worker("cpu:2");
    let spec = stack.write_spec(
        "dsir-outputs.toml",
        r#"
name = "dsir-outputs"
family = "dsir"
[base]
pool = "dsir/pool"
target = "dsir/target/news.jsonl"
target_genre = "news"
shards = 2
k = 100
[sweep]
searcher = "grid"
params.seed = [0]
"#,
    );
    let id = stack.submit(&spec);
    // The select trial's outputs (its manifests' keys) are over 64 bytes.
    stack
        .wait_for(
            &format!(
                "select count(*) = 1 from ablate.trial_attempts a join trials t on t.id = a.trial_id
                 where a.experiment_id = '{id}' and t.params->>'stage' = 'select' and a.outcome = 'failed'"
            ),
            Duration::from_secs(180),
        )
        .await;
    let error: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select a.error from ablate.trial_attempts a join trials t on t.id = a.trial_id
         where a.experiment_id = '{id}' and t.params->>'stage' = 'select'"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(
        error.starts_with("the coordinator refused the trial's completion: ") && error.contains("over the limit of 64"),
        "{error}"
    );
    stack.wait_finished(&id, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drained_worker_finishes_its_trial_takes_no_more_and_exits() {
    let mut stack = Stack::start(15.0).await;
    let worker = stack.start_worker("cpu:1");
    let spec = harness::resume_spec("drain", 0..2);
    let experiment = stack.submit(&stack.write_spec("drain.toml", &spec));
    stack
        .wait_for(
            "select count(*) = 1 from trials where state = 'running'",
            Duration::from_secs(60),
        )
        .await;
    let id: String = sqlx::query_scalar("select id::text from workers")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    // Bad input first: nothing is drained.
    for (arg, says) in [("zzz", "not a worker id"), ("0000000", "no worker's id starts with")] {
        let out = stack.ablate(&["workers", "drain", arg]);
        assert!(!out.status.success());
        assert!(text(&out).contains(says), "{arg}: {}", text(&out));
    }
    let out = stack.ablate(&["workers", "drain", &id[..8]]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1 running trial"), "{}", text(&out));
    stack
        .wait_for_workers("the worker listed as draining", |t| t.contains("draining since"))
        .await;
    let status = stack.wait_worker_exit(worker, Duration::from_secs(60)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", stack.logs());
    // It finished the trial it had and took no other.
    let states: Vec<(i32, String)> =
        sqlx::query_as("select ordinal, state from trials where experiment_id = $1::uuid order by ordinal")
            .bind(&experiment)
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    let succeeded = states.iter().filter(|(_, s)| s == "succeeded").count();
    let pending = states.iter().filter(|(_, s)| s == "pending").count();
    assert_eq!((succeeded, pending), (1, 1), "{states:?}");
    // A new worker takes the rest.
    stack.start_worker("cpu:1");
    stack.wait_finished(&experiment, Duration::from_secs(60)).await;
    let attempts = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_attempts where experiment_id = '{experiment}' and outcome = 'succeeded'"
        ))
        .await;
    assert_eq!(attempts, 2);
}
