//! Fused trials through the whole stack: a spec with `fuse = 8` is leased in
//! groups run by one trial process each, every member still its own trial
//! (metrics, checkpoints, attempts, outcome), on the curve of its unfused run,
//! through a SIGKILL of the group's process mid-run.

mod harness;

use std::collections::BTreeMap;
use std::time::Duration;

use harness::Stack;

/// 12 trials: 4 seeds x 3 learning rates, the largest of which diverges.
const SPEC: &str = r#"
name = "NAME"
family = "train"
FUSE
[base]
dataset = "digits"
model = "mlp"
width = 64
depth = 2
optimizer = "sgd"
steps = 200
checkpoint_every = 40
eval_every = 50
step_delay_ms = 20
[sweep]
searcher = "grid"
params.seed = [1, 2, 3, 4]
params.log2_lr = [-4, -3, 30]
"#;

/// Each trial's (ordinal, state) and its metric points, by ordinal.
async fn outcome(stack: &Stack, experiment: &str) -> (Vec<(i32, String)>, BTreeMap<(i32, String, i64), f64>) {
    let states: Vec<(i32, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select ordinal, state from trials where experiment_id = '{experiment}' order by ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let points: Vec<(i32, String, i64, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select t.ordinal, m.name, m.step, m.value from ablate.metric_series m
         join trials t on t.id = m.trial_id where m.experiment_id = '{experiment}'"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let points = points.into_iter().map(|(o, n, s, v)| ((o, n, s), v)).collect();
    (states, points)
}

#[tokio::test(flavor = "multi_thread")]
async fn fused_groups_run_in_one_process_and_keep_each_members_curve_through_a_sigkill() {
    let mut stack = Stack::start(15.0).await;
    let worker = stack.start_worker("cpu:1");
    let fused_spec = stack.write_spec("fused.toml", &SPEC.replace("NAME", "fused").replace("FUSE", "fuse = 8"));
    let fused = stack.submit(&fused_spec);
    // The first group (8 trials) runs at once on the worker's one slot, in one process.
    stack
        .wait_for(
            &format!(
                "select count(distinct trial_id) = 8 from checkpoints c join trials t on t.id = c.trial_id
                 where t.experiment_id = '{fused}'"
            ),
            Duration::from_secs(120),
        )
        .await;
    let running = stack
        .scalar_i64(&format!(
            "select count(*) from trials where experiment_id = '{fused}' and state = 'running'"
        ))
        .await;
    assert_eq!(running, 8, "one group of 8 on one slot\n{}", stack.logs());
    let pids = stack.trial_pids(worker);
    assert_eq!(pids.len(), 1, "one process for the group: {pids:?}");
    // As the OOM killer would: every member crashes, and resumes from its own checkpoint.
    // SAFETY: signalling a process this test's worker started.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    stack.wait_finished(&fused, Duration::from_secs(300)).await;

    let alone_spec = stack.write_spec("alone.toml", &SPEC.replace("NAME", "alone").replace("FUSE", ""));
    let alone = stack.submit(&alone_spec);
    stack.wait_finished(&alone, Duration::from_secs(300)).await;

    let (fused_states, fused_points) = outcome(&stack, &fused).await;
    let (alone_states, alone_points) = outcome(&stack, &alone).await;
    // The same outcomes: the diverging learning rate fails alone, fused or not.
    let errors: Vec<(i32, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select ordinal, error from trials where experiment_id = '{fused}' order by ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(fused_states, alone_states, "{errors:?}\n{}", stack.logs());
    let failed: Vec<i32> = fused_states.iter().filter(|s| s.1 == "failed").map(|s| s.0).collect();
    assert_eq!(
        failed.len(),
        4,
        "log2_lr = 30 diverges, the rest succeed: {fused_states:?}"
    );
    // Every point of every member equals its unfused run's to 1e-5 (relative to values
    // above 1: a diverging run's losses reach 1e22 before they stop being finite),
    // none missing or extra.
    assert_eq!(
        fused_points.keys().collect::<Vec<_>>(),
        alone_points.keys().collect::<Vec<_>>(),
        "the fused trials logged other points"
    );
    for (key, value) in &fused_points {
        let single = alone_points[key];
        assert!(
            (value - single).abs() <= 1e-5 * single.abs().max(1.0),
            "{key:?}: fused {value}, alone {single}"
        );
    }
    // Each member is its own trial: the first group crashed once each and resumed.
    let attempts: Vec<(i32, i32, String, Option<i64>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select t.ordinal, a.attempt, a.outcome, a.fused_members::int8
         from ablate.trial_attempts a join trials t on t.id = a.trial_id
         where a.experiment_id = '{fused}' order by t.ordinal, a.attempt"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    // The first group was ordinals 0 to 7; those that had not diverged by the kill crashed once.
    let crashed: Vec<i32> = attempts.iter().filter(|a| a.2 == "crashed").map(|a| a.0).collect();
    let expected: Vec<i32> = (0..8).filter(|o| !failed.contains(o)).collect();
    assert_eq!(
        crashed, expected,
        "each running member of the killed group crashed once: {attempts:?}"
    );
    assert!(
        attempts.iter().filter(|a| a.1 == 1 && a.0 < 8).all(|a| a.3 == Some(8)),
        "the first group ran as one of 8: {attempts:?}"
    );
    // Every attempt took the fused code, a group of one too (its rounding).
    assert!(attempts.iter().all(|a| a.3.is_some()), "{attempts:?}");
    // The resumed members went on from their own checkpoints, not from step 0.
    let resumed_from_zero = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.metric_series m where m.experiment_id = '{fused}'
             and m.name = 'num_params' and m.step = 0"
        ))
        .await;
    assert_eq!(
        resumed_from_zero, 12,
        "num_params is logged once per trial, at its start"
    );
}

/// 9 configurations under ASHA: rungs at 20 and 60 of 180 steps, the best third promoted.
const ASHA: &str = r#"
name = "NAME"
family = "train"
FUSE
[base]
dataset = "digits"
model = "mlp"
width = 32
depth = 2
optimizer = "adam"
batch_size = 32
eval_every = 20
checkpoint_every = 1000
[sweep]
searcher = "asha"
params.seed = [1, 2, 3]
params.log2_lr = [-9, -7, -5]
[sweep.asha]
min_steps = 20
max_steps = 180
reduction_factor = 3
[objective]
metric = "eval_loss"
goal = "minimize"
"#;

/// Every metric point of an experiment, by the trial's parameters (less `steps`), name and step.
async fn curves(stack: &Stack, experiment: &str) -> BTreeMap<(String, String, i64), f64> {
    let points: Vec<(serde_json::Value, String, i64, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select t.params - 'steps', m.name, m.step, m.value from ablate.metric_series m
         join trials t on t.id = m.trial_id where m.experiment_id = '{experiment}'"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    points
        .into_iter()
        .map(|(p, n, s, v)| ((p.to_string(), n, s), v))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_asha_sweep_with_fuse_pauses_and_promotes_fused_members_on_their_unfused_curves() {
    let mut stack = Stack::start(15.0).await;
    stack.start_worker("cpu:1");
    let fused_spec = stack.write_spec(
        "asha-fused.toml",
        &ASHA.replace("NAME", "asha-fused").replace("FUSE", "fuse = 4"),
    );
    let fused = stack.submit(&fused_spec);
    stack.wait_finished(&fused, Duration::from_secs(300)).await;
    let alone_spec = stack.write_spec(
        "asha-alone.toml",
        &ASHA.replace("NAME", "asha-alone").replace("FUSE", ""),
    );
    let alone = stack.submit(&alone_spec);
    stack.wait_finished(&alone, Duration::from_secs(300)).await;

    // Members of fused groups paused at their rungs, and promoted ones went on past them.
    let paused_in_groups = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_attempts
             where experiment_id = '{fused}' and outcome = 'paused' and fused_members::int > 1"
        ))
        .await;
    assert!(
        paused_in_groups >= 4,
        "{paused_in_groups} paused attempts in groups\n{}",
        stack.logs()
    );
    let rungs = |exp: &str, step: i64| {
        format!("select count(*) from ablate.rungs where experiment_id = '{exp}' and step = {step}")
    };
    assert_eq!(
        stack.scalar_i64(&rungs(&fused, 20)).await,
        9,
        "every configuration reached the first rung"
    );
    assert!(
        stack.scalar_i64(&rungs(&fused, 60)).await >= 1,
        "a promoted member reached the second"
    );
    let finished = stack
        .scalar_i64(&format!(
            "select count(*) from trials where experiment_id = '{fused}' and state = 'succeeded'"
        ))
        .await;
    assert!(finished >= 1, "a promoted member trained to the end");

    // Each member's curve is its unfused run's, to 1e-5, wherever both trained (which
    // configurations ASHA promotes depends on the order trials finish in).
    let (fused_points, alone_points) = (curves(&stack, &fused).await, curves(&stack, &alone).await);
    let mut common = 0;
    for (key, value) in &fused_points {
        if let Some(single) = alone_points.get(key) {
            common += 1;
            assert!(
                (value - single).abs() <= 1e-5 * single.abs().max(1.0),
                "{key:?}: fused {value}, alone {single}"
            );
        }
    }
    let first_rung = fused_points.keys().filter(|k| k.1 == "train_loss" && k.2 <= 20).count();
    assert_eq!(first_rung, 9 * 20, "every configuration's first 20 steps");
    assert!(common >= first_rung, "{common} points in common");
}
