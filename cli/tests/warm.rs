//! Warm slots: a worker runs trial after trial in one process per slot, with
//! the curves a fresh process gives, and replaces a process that crashes.

mod harness;

use std::collections::BTreeSet;
use std::time::Duration;

use harness::{Stack, RESUME_SPEC};

const MINUTE: Duration = Duration::from_secs(60);

/// Three seeded trials of about 1.5 s each.
const THREE: &str = r#"
name = "NAME"
family = "train"
[base]
optimizer = "adam"
log2_lr = -6
width = 32
steps = 60
eval_every = 20
step_delay_ms = 25
[sweep]
searcher = "grid"
params.seed = [0, 1, 2]
"#;

/// Every point of every metric of an experiment, as (ordinal, metric, step, the value's bits).
async fn points(stack: &Stack, experiment: &str) -> Vec<(i32, String, i64, u64)> {
    let rows: Vec<(i32, String, i64, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select t.ordinal, m.name, m.step, m.value from ablate.metric_series m
         join trials t on t.id = m.trial_id
         where m.experiment_id = '{experiment}' order by t.ordinal, m.name, m.step"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(o, n, s, v)| (o, n, s, v.to_bits())).collect()
}

/// Polls the worker's trial processes until the experiment finishes; returns every pid seen.
async fn pids_until_finished(stack: &Stack, worker: usize, experiment: &str) -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        seen.extend(stack.trial_pids(worker));
        let running = stack
            .scalar_i64(&format!(
                "select count(*) from ablate.experiments where experiment_id = '{experiment}' and state = 'running'"
            ))
            .await;
        if running == 0 {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sweep too slow:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn succeeded(stack: &Stack, experiment: &str) -> i64 {
    stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_results where experiment_id = '{experiment}' and state = 'succeeded'"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_slot_runs_trial_after_trial_in_one_process_on_the_curves_of_fresh_ones() {
    let mut stack = Stack::start(15.0).await;
    let warm_worker = stack.start_worker("cpu:1");
    let warm = stack.submit(&stack.write_spec("warm.toml", &THREE.replace("NAME", "warm")));
    let pids = pids_until_finished(&stack, warm_worker, &warm).await;
    assert_eq!(succeeded(&stack, &warm).await, 3, "{}", stack.logs());
    assert_eq!(
        pids.len(),
        1,
        "one process ran all three trials: {pids:?}\n{}",
        stack.logs()
    );
    assert_eq!(
        stack.trial_pids(warm_worker),
        pids.iter().copied().collect::<Vec<_>>(),
        "the warm process waits for the next trial"
    );
    let log = std::fs::read_to_string(stack.dir.join("worker.log")).unwrap();
    let pid = pids.first().unwrap();
    assert_eq!(log.matches(&format!("warm pid {pid}")).count(), 2, "{log}");

    stack.kill_worker(warm_worker);
    let fresh_worker = stack.start_worker_from(&harness::bin("ablate-worker"), "cpu:1", &["--fresh-process-per-trial"]);
    let fresh = stack.submit(&stack.write_spec("fresh.toml", &THREE.replace("NAME", "fresh")));
    let fresh_pids = pids_until_finished(&stack, fresh_worker, &fresh).await;
    assert_eq!(succeeded(&stack, &fresh).await, 3, "{}", stack.logs());
    assert!(fresh_pids.len() >= 2, "a process per trial: {fresh_pids:?}");
    assert!(
        stack.trial_pids(fresh_worker).is_empty(),
        "no process is kept after a fresh one's trial"
    );

    let (a, b) = (points(&stack, &warm).await, points(&stack, &fresh).await);
    assert!(a.len() >= 3 * 60, "{} points", a.len());
    assert_eq!(a, b, "warm and fresh processes give bit-identical curves");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_in_a_warm_process_is_retried_on_a_new_one_on_the_same_curve() {
    let mut stack = Stack::start(15.0).await;
    let worker = stack.start_worker("cpu:1");
    let spec = RESUME_SPEC
        .replace("NAME", "crash")
        .replace("params.seed = [3]", "params.seed = [3, 4]");
    let crashed = stack.submit(&stack.write_spec("crash.toml", &spec));
    // The first trial runs in the slot's process; the second is handed to the same one.
    stack
        .wait_for("select count(*) = 1 from trials where state = 'succeeded'", MINUTE)
        .await;
    let first = stack.trial_pids(worker);
    assert_eq!(first.len(), 1, "{first:?}");
    stack
        .wait_for(
            "select count(*) >= 2 from checkpoints c join trials t on t.id = c.trial_id where t.ordinal = 1",
            MINUTE,
        )
        .await;
    assert_eq!(
        stack.trial_pids(worker),
        first,
        "the second trial runs in the warm process"
    );
    // As the OOM killer would.
    // SAFETY: signalling a process this test's worker started.
    unsafe { libc::kill(first[0] as i32, libc::SIGKILL) };
    stack.wait_finished(&crashed, 2 * MINUTE).await;
    assert_eq!(succeeded(&stack, &crashed).await, 2, "{}", stack.logs());
    let attempts: Vec<(i32, i32, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select ordinal, attempt, outcome from ablate.trial_attempts
         where experiment_id = '{crashed}' order by ordinal, attempt"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        attempts,
        vec![
            (0, 1, "succeeded".to_string()),
            (1, 1, "crashed".to_string()),
            (1, 2, "succeeded".to_string())
        ]
    );
    let now = stack.trial_pids(worker);
    assert_eq!(now.len(), 1, "a new warm process: {now:?}");
    assert_ne!(now, first, "the crashed process was replaced");

    let unbroken = stack.submit(
        &stack.write_spec(
            "unbroken.toml",
            &RESUME_SPEC
                .replace("NAME", "unbroken")
                .replace("params.seed = [3]", "params.seed = [3, 4]"),
        ),
    );
    stack.wait_finished(&unbroken, 2 * MINUTE).await;
    let (a, b) = (points(&stack, &crashed).await, points(&stack, &unbroken).await);
    assert!(
        a.iter().filter(|p| p.1 == "train_loss").count() == 600,
        "every step exactly once"
    );
    assert_eq!(a, b, "the resumed trial is on the unbroken curve");
}
