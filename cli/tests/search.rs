//! Smarter sweeps through the whole stack: ASHA's rungs (trials paused with a
//! checkpoint, the best promoted and resumed, the rest pruned) against the
//! full grid of the same configurations, Hyperband's brackets and BOHB's
//! proposals in them; PBT, synchronous and not; tpe with every slot busy;
//! constraints and several objectives.

mod harness;

use std::collections::BTreeMap;

use harness::{assert_same_curves, Stack};

/// 81 configurations of the quickstart task: 3 widths x 27 learning rates.
const GRID: &str = r#"
name = "NAME"
family = "train"
[base]
dataset = "digits"
model = "mlp"
depth = 2
optimizer = "adam"
batch_size = 64
eval_every = 20
checkpoint_every = 100
seed = 0
STEPS
[sweep]
searcher = "SEARCHER"
params.width = [32, 64, 128]
params.log2_lr = { range = [-11.5, -5], step = 0.25 }
RUNGS
[objective]
metric = "eval_loss"
goal = "minimize"
"#;

fn spec(name: &str, searcher: &str) -> String {
    let (steps, rungs) = match searcher {
        "grid" => ("steps = 300", String::new()),
        other => (
            "",
            format!("[sweep.{other}]\nmin_steps = 20\nmax_steps = 300\nreduction_factor = 3\n"),
        ),
    };
    GRID.replace("NAME", name)
        .replace("SEARCHER", searcher)
        .replace("STEPS", steps)
        .replace("RUNGS", &rungs)
}

/// Each trial's final objective, by its parameters.
async fn finals(stack: &Stack, experiment: &str) -> BTreeMap<String, (String, Option<f64>)> {
    let rows: Vec<(serde_json::Value, String, Option<f64>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select params - 'steps', state, objective from ablate.trial_results where experiment_id = '{experiment}'"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(p, s, o)| (p.to_string(), (s, o))).collect()
}

/// Every trial's train_loss curve by its parameters (less `steps`), as (0, step, value).
async fn curves(stack: &Stack, experiment: &str) -> BTreeMap<String, Vec<(i32, i64, f64)>> {
    let rows: Vec<(serde_json::Value, i64, f64)> = sqlx::query_as(
        "select r.params - 'steps', m.step, m.value from ablate.metric_series m
         join ablate.trial_results r on r.trial_id = m.trial_id
         where m.experiment_id = $1::uuid and m.name = 'train_loss' order by r.trial_id, m.step",
    )
    .bind(experiment)
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let mut out: BTreeMap<String, Vec<(i32, i64, f64)>> = BTreeMap::new();
    for (params, step, value) in rows {
        out.entry(params.to_string()).or_default().push((0, step, value));
    }
    out
}

async fn steps_trained(stack: &Stack, experiment: &str) -> i64 {
    stack
        .scalar_i64(&format!(
            "select count(*) from ablate.metric_series where experiment_id = '{experiment}' and name = 'train_loss'"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn asha_hyperband_and_bohb_find_the_grids_best_for_a_fraction_of_its_steps() {
    let mut stack = Stack::start(30.0).await;
    stack.start_worker("cpu:2");
    let grid_spec = stack.write_spec("grid.toml", &spec("grid", "grid"));
    let asha_spec = stack.write_spec("asha.toml", &spec("asha", "asha"));
    let grid = stack.submit_and_wait(&grid_spec);
    let asha = stack.submit_and_wait(&asha_spec);

    let (grid_steps, asha_steps) = (steps_trained(&stack, &grid).await, steps_trained(&stack, &asha).await);
    assert_eq!(grid_steps, 81 * 300);
    let grid_finals = finals(&stack, &grid).await;
    let asha_finals = finals(&stack, &asha).await;
    let best = |f: &BTreeMap<String, (String, Option<f64>)>| {
        f.values()
            .filter(|(state, _)| state == "succeeded")
            .filter_map(|(_, o)| *o)
            .fold(f64::INFINITY, f64::min)
    };
    let (grid_best, asha_best) = (best(&grid_finals), best(&asha_finals));
    println!(
        "grid: 81 trials, {grid_steps} steps, best eval_loss {grid_best:.4}; \
         asha: {asha_steps} steps ({:.1}% of the grid's), best {asha_best:.4}",
        100.0 * asha_steps as f64 / grid_steps as f64
    );
    assert!(
        asha_steps * 3 <= grid_steps,
        "ASHA trained {asha_steps} steps, over a third of the grid's {grid_steps}"
    );
    assert!(
        asha_best <= grid_best * 1.02,
        "ASHA's best eval_loss {asha_best} is not within 2% of the grid's {grid_best}"
    );

    // Every trial that ran to the end passed every rung, and trained the very
    // curve the grid's same configuration did, though paused and resumed from
    // its checkpoint at each rung (on whichever slot leased it next).
    let mut finished = 0;
    let (asha_curves, grid_curves) = (curves(&stack, &asha).await, curves(&stack, &grid).await);
    for (params, (state, _)) in &asha_finals {
        assert!(state == "succeeded" || state == "pruned", "{params}: {state}");
        if state == "succeeded" {
            finished += 1;
            assert_same_curves(&asha_curves[params], &grid_curves[params]);
        }
    }
    assert!(finished >= 1);
    // Rungs in SQL: all 81 at step 20; the promoted of each rung are exactly those at the next.
    let at = |step: i64| format!("select count(*) from ablate.rungs where experiment_id = '{asha}' and step = {step}");
    assert_eq!(stack.scalar_i64(&at(20)).await, 81);
    for (rung, next) in [(20, 60), (60, 180)] {
        let promoted = stack.scalar_i64(&format!("{} and promoted", at(rung))).await;
        assert_eq!(promoted, stack.scalar_i64(&at(next)).await, "rung {rung}");
        assert!(
            promoted * 3 >= stack.scalar_i64(&at(rung)).await,
            "rung {rung}: too few promoted"
        );
    }
    assert_eq!(
        stack.scalar_i64(&format!("{} and promoted", at(180))).await,
        finished as i64
    );
    // No step trained twice, none skipped: each trial's steps are 1..its last.
    let gaps = stack
        .scalar_i64(&format!(
            "select count(*) from (select trial_id from ablate.metric_series
             where experiment_id = '{asha}' and name = 'train_loss'
             group by trial_id having count(*) <> max(step) or min(step) <> 1) g"
        ))
        .await;
    assert_eq!(gaps, 0);
    // Pauses are attempts of their own, and spend none of max_attempts (3): a finished trial had 4 attempts.
    let paused = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_attempts where experiment_id = '{asha}' and outcome = 'paused'"
        ))
        .await;
    assert_eq!(
        paused,
        81 + stack.scalar_i64(&at(60)).await + stack.scalar_i64(&at(180)).await
    );
    let status = stack.ablate(&["status", &asha]);
    let status = harness::text(&status);
    assert!(
        status.contains(&format!("{finished} succeeded, {} pruned at a rung", 81 - finished)),
        "{status}"
    );

    // Hyperband: brackets of ASHA, each starting at a higher rung; the last trains fully.
    let hyperband_spec = stack.write_spec(
        "hb.toml",
        &spec("hb", "hyperband").replace(
            "{ range = [-11.5, -5], step = 0.25 }",
            "{ range = [-12, -5], step = 1 }",
        ),
    );
    let hb = stack.submit_and_wait(&hyperband_spec);
    let brackets: Vec<(i32, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select bracket, min(step), count(distinct trial_id) from ablate.rungs
         where experiment_id = '{hb}' group by bracket order by bracket"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    // 24 configurations over 4 brackets: 6 each; bracket 3 has no rung below 300.
    assert_eq!(brackets, vec![(0, 20, 6), (1, 60, 6), (2, 180, 6)]);
    let full = stack
        .scalar_i64(&format!(
            "select count(*) from trials where experiment_id = '{hb}' and bracket = 3 and state = 'succeeded' and pauses = 0"
        ))
        .await;
    assert_eq!(full, 6);

    // BOHB: tpe proposes each configuration of the same 81, never one twice, fitted at the
    // highest rung with enough results; Hyperband's brackets stop them.
    let bohb_spec = stack.write_spec(
        "bohb.toml",
        &GRID
            .replace("NAME", "bohb")
            .replace("SEARCHER", "bohb")
            .replace("STEPS", "")
            .replace("RUNGS", BOHB_RUNGS),
    );
    let bohb = stack.submit_and_wait(&bohb_spec);
    let bohb_steps = steps_trained(&stack, &bohb).await;
    let bohb_finals = finals(&stack, &bohb).await;
    let bohb_best = best(&bohb_finals);
    println!(
        "bohb: {} configurations, {bohb_steps} steps ({:.1}% of the grid's, {:.1}% of ASHA's), best {bohb_best:.4}",
        bohb_finals.len(),
        100.0 * bohb_steps as f64 / grid_steps as f64,
        100.0 * bohb_steps as f64 / asha_steps as f64
    );
    assert!(
        bohb_steps <= asha_steps,
        "BOHB trained {bohb_steps} steps, more than ASHA's {asha_steps}"
    );
    assert!(
        bohb_best <= grid_best * 1.02,
        "BOHB's best eval_loss {bohb_best} is not within 2% of the grid's {grid_best}"
    );
    // Every configuration once (`finals` is keyed by them), each a point of the grid, and
    // every one trained to the end on the grid's very curve.
    let held = stack
        .scalar_i64(&format!("select count(*) from trials where experiment_id = '{bohb}'"))
        .await;
    assert_eq!(held, bohb_finals.len() as i64, "a configuration was proposed twice");
    assert_eq!(held, 40);
    let bohb_curves = curves(&stack, &bohb).await;
    for (params, (state, _)) in &bohb_finals {
        assert!(grid_finals.contains_key(params), "{params} is not a grid point");
        assert!(state == "succeeded" || state == "pruned", "{params}: {state}");
        if state == "succeeded" {
            assert_same_curves(&bohb_curves[params], &grid_curves[params]);
        }
    }
    // The brackets: configuration i in bracket i mod 2, the second starting at rung 60.
    let firsts: Vec<(i32, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select bracket, min(step) from ablate.rungs where experiment_id = '{bohb}' group by bracket order by bracket"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(firsts, vec![(0, 20), (1, 60)]);
}

/// BOHB's budget on the 81 configurations: 40 of them, 10 at random first, in two of
/// Hyperband's brackets (first rungs 20 and 60).
const BOHB_RUNGS: &str = "[sweep.hyperband]
min_steps = 20
max_steps = 300
reduction_factor = 3
brackets = 2
[sweep.tpe]
trials = 40
n_startup = 10
seed = 0
";

/// DSIR's stages on the local pool: 4 features trials, the select trial, a DSIR and a random train trial.
const DSIR: &str = r#"
name = "NAME"
family = "dsir"
[base]
pool = "dsir/pool"
target = "dsir/target/news.jsonl"
target_genre = "news"
shards = 4
k = K
seed = 0
train = { model = "gpt", width = 16, depth = 1, heads = 2, context = 16, optimizer = "adamw", lr = 0.003, steps = 20, batch_size = 8, eval_every = 10, checkpoint_every = 100 }
[sweep]
searcher = "grid"
params.train_seed = [0]
[resources]
fresh_process = true
"#;

/// Trials of a stage that run while a trial they wait for has not succeeded (must stay 0).
async fn waiting_in_a_slot(stack: &Stack, experiment: &str) -> i64 {
    stack
        .scalar_i64(&format!(
            "select count(*) from trials t where t.experiment_id = '{experiment}' and t.state = 'running'
             and exists (select 1 from trials d where d.id = any(t.depends_on) and d.state <> 'succeeded')"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn dsir_stages_wait_in_the_queue_not_in_a_slot_and_outlive_a_crashed_shard() {
    let mut stack = Stack::start(30.0).await;
    let worker = stack.start_worker("cpu:2");
    let spec = stack.write_spec("dsir.toml", &DSIR.replace("NAME", "dsir").replace("K", "200"));
    let id = stack.submit(&spec);
    // The first features trial seen running is killed (SIGKILL: a real crash) until one crash is recorded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let crashed = |id: &str| {
        format!(
            "select count(*) from ablate.trial_attempts a join trials t on t.id = a.trial_id
             where a.experiment_id = '{id}' and a.outcome = 'crashed' and t.params->>'stage' = 'features'"
        )
    };
    loop {
        assert_eq!(
            waiting_in_a_slot(&stack, &id).await,
            0,
            "a stage holds a slot while it waits"
        );
        if stack.scalar_i64(&crashed(&id)).await >= 1 {
            break;
        }
        let features_running = stack
            .scalar_i64(&format!(
                "select count(*) from trials where experiment_id = '{id}' and state = 'running'
                 and params->>'stage' = 'features'"
            ))
            .await;
        if features_running > 0 {
            for pid in stack.trial_pids(worker) {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no features trial crashed\n{}",
            stack.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    while stack
        .scalar_i64(&format!(
            "select count(*) from ablate.experiments where experiment_id = '{id}' and state = 'running'"
        ))
        .await
        > 0
    {
        assert_eq!(
            waiting_in_a_slot(&stack, &id).await,
            0,
            "a stage holds a slot while it waits"
        );
        assert!(std::time::Instant::now() < deadline, "sweep too slow\n{}", stack.logs());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let states: Vec<(String, String, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select params->>'stage', state, attempt from trials where experiment_id = '{id}' order by ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert!(
        states.iter().all(|s| s.1 == "succeeded"),
        "{states:?}\n{}",
        stack.logs()
    );
    assert!(states.iter().any(|s| s.0 == "features" && s.2 >= 2), "{states:?}");
    // Each later stage was leased once, after all it waits for had finished: no polling, no retry.
    let order = stack
        .scalar_i64(&format!(
            "select count(*) from trials t join ablate.trial_dependencies d on d.trial_id = t.id
             join trials w on w.id = d.depends_on_trial_id
             where t.experiment_id = '{id}' and (t.started_at < w.finished_at or t.attempt <> 1)"
        ))
        .await;
    assert_eq!(order, 0, "{states:?}");
    let edges = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_dependencies where experiment_id = '{id}'"
        ))
        .await;
    assert_eq!(
        edges,
        4 + 2,
        "select waits for 4 shards, each train trial for the select"
    );

    // A stage that fails for good fails what waits for it, with the reason; nothing is left pending.
    let spec = stack.write_spec("bad.toml", &DSIR.replace("NAME", "dsir-bad").replace("K", "100000000"));
    let bad = stack.submit(&spec);
    stack.wait_finished(&bad, std::time::Duration::from_secs(300)).await;
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select params->>'stage', state, error from trials where experiment_id = '{bad}' order by ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    for (stage, state, error) in &rows {
        let error = error.clone().unwrap_or_default();
        match stage.as_str() {
            "features" => assert_eq!(state, "succeeded"),
            "select" => assert!(state == "failed" && error.contains("k"), "{stage}: {state} {error}"),
            _ => assert!(
                state == "failed" && error.contains("waits for trial") && error.contains("(ordinal 4)"),
                "{stage}: {state} {error}"
            ),
        }
    }
    let status = harness::text(&stack.ablate(&["status", &bad]));
    assert!(status.contains("3 failed"), "{status}");
}

/// TPE over a learning rate on a log scale and a width: 4 random trials, then 6 proposed.
const TPE: &str = r#"
name = "NAME"
family = "train"
[base]
dataset = "digits"
model = "mlp"
depth = 2
optimizer = "adam"
batch_size = 64
steps = 100
eval_every = 50
seed = 0
[sweep]
searcher = "tpe"
params.log2_lr = { uniform = [-12.0, -4.0] }
params.width = [32, 64]
[sweep.tpe]
trials = 10
n_startup = 4
seed = 7
[objective]
metric = "eval_loss"
goal = "minimize"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn tpe_proposes_each_trial_as_one_finishes_and_repeats_from_its_seed() {
    let mut stack = Stack::start(30.0).await;
    stack.start_worker("cpu:1");
    let mut runs = Vec::new();
    for name in ["tpe-a", "tpe-b"] {
        let spec = stack.write_spec(&format!("{name}.toml"), &TPE.replace("NAME", name));
        let out = stack.ablate(&["submit", &spec.to_string_lossy(), "--wait"]);
        assert!(out.status.success(), "{}", harness::stderr(&out));
        assert!(
            harness::stderr(&out).contains("with 10 trials"),
            "{}",
            harness::stderr(&out)
        );
        let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let trials: Vec<(i32, serde_json::Value, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select ordinal, params, state from trials where experiment_id = '{id}' order by ordinal"
        )))
        .fetch_all(&stack.pool)
        .await
        .unwrap();
        assert_eq!(trials.len(), 10, "{trials:?}");
        assert!(trials.iter().all(|t| t.2 == "succeeded"), "{trials:?}");
        // Each proposal came after as many trials had finished as it is beyond the start.
        let early = stack
            .scalar_i64(&format!(
                "select count(*) from trials p where p.experiment_id = '{id}' and p.ordinal >= 4
                 and (select count(*) from trials f where f.experiment_id = p.experiment_id
                      and f.finished_at <= p.created_at) < p.ordinal - 3"
            ))
            .await;
        assert_eq!(early, 0, "a trial was proposed before its predecessors finished");
        for t in &trials {
            let lr = t.1["log2_lr"].as_f64().unwrap();
            assert!((-12.0..=-4.0).contains(&lr), "{t:?}");
        }
        runs.push(trials.into_iter().map(|t| t.1).collect::<Vec<_>>());
    }
    assert_eq!(runs[0], runs[1], "the same seed on one slot proposes the same trials");
    // Proposals are not the random start again: the estimator used the results.
    let start: Vec<f64> = runs[0][..4].iter().map(|p| p["log2_lr"].as_f64().unwrap()).collect();
    assert!(runs[0][4..]
        .iter()
        .all(|p| !start.contains(&p["log2_lr"].as_f64().unwrap())));
}

/// Linear regression on power-law features with label noise under SGD at a constant
/// learning rate: a large rate gains fastest early, a small one ends lower (its noise
/// floor is lower), so the best rate falls during training.
const NOISY_REGRESSION: &str = r#"
name = "NAME"
family = "train"
[base]
dataset = "power_law"
model = "linear"
width = 64
spectrum_exponent = 1.5
label_noise = 1.0
optimizer = "sgd"
schedule = "constant"
batch_size = 8
steps = 400
eval_every = 50
checkpoint_every = 1000
seed = 0
[sweep]
SWEEP
[objective]
metric = "eval_loss"
goal = "minimize"
"#;

async fn best_final(stack: &Stack, experiment: &str) -> f64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select min(objective) from ablate.trial_results where experiment_id = '{experiment}' and state = 'succeeded'"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn pbt_synchronous_and_asynchronous_beats_the_best_fixed_learning_rate_when_the_best_rate_falls() {
    let mut stack = Stack::start(30.0).await;
    // Eight slots: the fixed rates run at once, which warms every slot for the populations.
    stack.start_worker("cpu:8");
    let fixed = NOISY_REGRESSION.replace("NAME", "fixed").replace(
        "SWEEP",
        "searcher = \"grid\"\nparams.log2_lr = { range = [-8, -1], step = 1 }",
    );
    let fixed = stack.submit_and_wait(&stack.write_spec("fixed.toml", &fixed));
    let pbt = NOISY_REGRESSION.replace("NAME", "pbt").replace(
        "SWEEP",
        "searcher = \"pbt\"\nparams.log2_lr = { uniform = [-8.0, -1.0] }\n\
         [sweep.pbt]\npopulation = 8\ninterval = 50\nquantile = 0.25\nfactors = [0.8, 1.25]\nseed = 1",
    );
    let pbt = stack.submit_and_wait(&stack.write_spec("pbt.toml", &pbt));
    let (fixed_best, pbt_best) = (best_final(&stack, &fixed).await, best_final(&stack, &pbt).await);
    println!(
        "eval_loss after 400 steps: best of 8 fixed learning rates {fixed_best:.5}, best PBT member {pbt_best:.5}"
    );
    assert!(pbt_best < fixed_best, "PBT {pbt_best} against fixed {fixed_best}");
    // The lineage: 7 generations of 8 members, a quarter of each copied a top member.
    let lineage: Vec<(i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select step, count(*), count(*) filter (where action = 'exploit') from ablate.pbt_lineage
         where experiment_id = '{pbt}' group by step order by step"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(lineage, (1..8).map(|g| (g * 50, 8, 2)).collect::<Vec<_>>());
    // An exploiting member resumed from its donor's checkpoint object.
    let copied = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.pbt_lineage l
             join ablate.checkpoints c on c.trial_id = l.trial_id and c.step = l.step
             join ablate.checkpoints d on d.trial_id = l.donor_trial_id and d.step = l.step
             where l.experiment_id = '{pbt}' and l.action = 'exploit' and c.path = d.path"
        ))
        .await;
    assert_eq!(copied, 14);

    // Asynchronous PBT with one member slowed (40 ms a step, the others 4; kept as its own
    // when it copies another): on 8 slots each member decides at its interval against the
    // others' results there and goes on at once.
    let slowed = NOISY_REGRESSION.replace("NAME", "pbt-async").replace(
        "SWEEP",
        "searcher = \"pbt\"\nparams.log2_lr = { uniform = [-8.0, -1.0] }\nparams.step_delay_ms = [4, 40]\n\
         [sweep.pbt]\npopulation = 8\ninterval = 50\nquantile = 0.25\nfactors = [0.8, 1.25]\nseed = ASYNC_SEED\n\
         asynchronous = true\nkeep = [\"step_delay_ms\"]"
            .replace("ASYNC_SEED", &ASYNC_SEED.to_string())
            .as_str(),
    );
    let slowed = stack.submit_and_wait(&stack.write_spec("pbt-async.toml", &slowed));
    let async_best = best_final(&stack, &slowed).await;
    // Per member: its delay (the one it started with, kept), its span from first lease to
    // end, its pause at step 350 and its end, in seconds from the sweep's first lease.
    let members: Vec<(i32, i64, f64, f64, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "with t0 as (select min(started_at) s from trials where experiment_id = '{slowed}')
         select t.ordinal, (t.params ->> 'step_delay_ms')::int8,
                extract(epoch from t.finished_at - t.started_at)::float8,
                extract(epoch from r.recorded_at - t0.s)::float8,
                extract(epoch from t.finished_at - t0.s)::float8
         from trials t cross join t0 join rungs r on r.trial_id = t.id and r.step = 350
         where t.experiment_id = '{slowed}' and t.state = 'succeeded' order by t.ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(members.len(), 8, "every member ran to the end: {members:?}");
    let slow: Vec<_> = members.iter().filter(|m| m.1 == 40).collect();
    assert_eq!(members.iter().filter(|m| m.1 == 4).count(), 7, "{members:?}");
    assert_eq!(slow.len(), 1, "exactly one member slowed: {members:?}");
    let (_, _, slow_span, slow_at_350, _) = *slow[0];
    let sweep_time = members.iter().map(|m| m.4).fold(0.0, f64::max);
    let interval = slow_span / 8.0;
    println!(
        "asynchronous PBT, one member at 40 ms a step: best member {async_best:.5} (fixed {fixed_best:.5}); \
         sweep {sweep_time:.1} s, the slow member's own {slow_span:.1} s (an interval {interval:.1} s); \
         the others ended by {:.1} s, the slow one paused at step 350 at {slow_at_350:.1} s",
        members.iter().filter(|m| m.1 == 4).map(|m| m.4).fold(0.0, f64::max)
    );
    assert!(
        sweep_time <= slow_span + interval,
        "the sweep took {sweep_time:.1} s, over the slow member's own {slow_span:.1} s plus an interval"
    );
    // No member waited for the slow one: all the others ended before it reached its last
    // interval (synchronous PBT holds each of them at every step until the slow one is there).
    for m in members.iter().filter(|m| m.1 == 4) {
        assert!(
            m.4 < slow_at_350,
            "member {} ended at {:.1} s, after the slow member's pause at step 350 ({slow_at_350:.1} s)",
            m.0,
            m.4
        );
    }
    assert!(
        async_best < fixed_best,
        "asynchronous PBT {async_best} against fixed {fixed_best}"
    );
    // Each member's 7 decisions are in the lineage; some copied a better member's checkpoint
    // (the synchronous population copies 14: a decision there always sees 8 members; here
    // the first member at a step has no one to compare with).
    let (decisions, exploits): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select count(*), count(*) filter (where action = 'exploit') from ablate.pbt_lineage
         where experiment_id = '{slowed}'"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    println!("{exploits} of the 56 decisions copied a better member");
    assert_eq!(decisions, 56);
    // The slow member arrives after every other: it is ranked against all of them, and
    // its poor first learning rate (2^-7.7) copies a better member at step 50.
    assert!(exploits >= 2, "{exploits} exploits in 56 decisions");
    let slow_first: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select l.action from ablate.pbt_lineage l join trials t on t.id = l.trial_id
         where l.experiment_id = '{slowed}' and l.step = 50 and (t.params ->> 'step_delay_ms')::int = 40"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(slow_first, "exploit");
}

/// The seed of the asynchronous population: it draws exactly one member of 8 with
/// `step_delay_ms = 40` (the test checks).
const ASYNC_SEED: u64 = 59;

/// The bench's synthetic task (`ablate_experiments::tpe::synthetic`) as a command trial
/// that takes 1 s: its minimum, 0, at lr = 10^-2.5, log2_batch 6, gelu, x = 0.3.
const SYNTHETIC_SH: &str = r#"sleep 1
loss=$(awk -v lr="$1" -v b="$2" -v act="$3" -v x="$4" 'BEGIN {
    a = 0.4; if (act == "gelu") a = 0; if (act == "silu") a = 0.1
    l = log(lr) / log(10) + 2.5
    printf "%.12g", l * l + ((b - 6) / 3) ^ 2 + a + 2 * (x - 0.3) ^ 2 }')
echo "{\"step\": 1, \"metrics\": {\"loss\": $loss}}" >&3
"#;

const BUSY_TPE: &str = r#"
name = "tpe-busy"
family = "train"
[trial]
command = ["sh", "synthetic.sh", "{lr}", "{log2_batch}", "{activation}", "{x}"]
code = "."
[base]
steps = 1
[sweep]
searcher = "tpe"
params.activation = ["relu", "gelu", "tanh", "silu"]
params.log2_batch = { range = [2, 10], step = 1 }
params.lr = { log_uniform = [1e-5, 1.0] }
params.x = { uniform = [0.0, 1.0] }
[sweep.tpe]
trials = 64
n_startup = 4
seed = 3
[objective]
metric = "loss"
goal = "minimize"
"#;

/// With 8 slots and a random start of only 4, a tpe sweep proposes the other 4 at once
/// and one whenever a trial ends (the ones in flight as constant liars): sampled every
/// 20 ms from the first moment 8 run until fewer than 8 are left, 8 run nearly always.
#[tokio::test(flavor = "multi_thread")]
async fn tpe_keeps_every_free_slot_busy_with_proposals_made_beside_the_running_ones() {
    let mut stack = Stack::start(30.0).await;
    let dir = stack.dir.join("busy-tpe");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("synthetic.sh"), SYNTHETIC_SH).unwrap();
    std::fs::write(dir.join("sweep.toml"), BUSY_TPE).unwrap();
    stack.start_worker_from(&harness::bin("ablate-worker"), "cpu:8", &["--allow-commands"]);
    // The worker is live before the sweep arrives, so its free slots are known at submit.
    for _ in 0..200 {
        if stack.scalar_i64("select count(*) from workers").await == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let experiment = stack.submit(&dir.join("sweep.toml"));
    let mut samples: Vec<(i64, i64)> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let (running, ended): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select count(*) filter (where state = 'running'),
                    count(*) filter (where state in ('succeeded', 'failed', 'pruned', 'cancelled'))
             from trials where experiment_id = '{experiment}'"
        )))
        .fetch_one(&stack.pool)
        .await
        .unwrap();
        samples.push((running, ended));
        if ended == 64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep did not end: {samples:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        samples.iter().all(|(running, _)| *running <= 8),
        "more than 8 ran: {samples:?}"
    );
    let first = samples
        .iter()
        .position(|(running, _)| *running == 8)
        .expect("8 ran at once");
    let window: Vec<i64> = samples[first..]
        .iter()
        .filter(|(_, ended)| 64 - ended >= 8)
        .map(|(running, _)| *running)
        .collect();
    // A slot is idle only between a completion and the next lease (milliseconds, more on
    // a loaded host): the slots are nearly always all busy.
    let full = window.iter().filter(|r| **r == 8).count();
    let mean = window.iter().sum::<i64>() as f64 / window.len().max(1) as f64;
    eprintln!(
        "8 running in {full} of {} samples while 8 or more were left; {mean:.2} on average",
        window.len()
    );
    assert!(
        window.len() >= 50 && mean >= 7.5 && full * 2 >= window.len(),
        "8 running in {full} of {} samples while 8 or more were left, {mean:.2} on average: {window:?}",
        window.len()
    );
    // Every trial succeeded, and the proposals used the results: the last half's median
    // loss is below the random start's.
    let losses: Vec<(i32, String, Option<f64>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select t.ordinal, t.state, (r.metrics ->> 'loss')::float8
         from trials t join ablate.trial_results r on r.trial_id = t.id
         where t.experiment_id = '{experiment}' order by t.ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(losses.len(), 64);
    assert!(losses.iter().all(|l| l.1 == "succeeded" && l.2.is_some()), "{losses:?}");
    let median = |v: &[Option<f64>]| {
        let mut v: Vec<f64> = v.iter().flatten().copied().collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let all: Vec<Option<f64>> = losses.iter().map(|l| l.2).collect();
    let (start, late) = (median(&all[..8]), median(&all[32..]));
    assert!(
        late < start,
        "median loss of the last 32 trials {late}, of the first 8 {start}"
    );
    // The report says which parameters mattered, as a table and in its JSON.
    let out = stack.ablate(&["report", &experiment, "--format", "json"]);
    assert!(out.status.success(), "{}", harness::stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shares = report["importance"].as_array().expect("an importance list");
    let mut params: Vec<&str> = shares.iter().map(|s| s["param"].as_str().unwrap()).collect();
    params.sort();
    assert_eq!(params, ["activation", "log2_batch", "lr", "x"], "{report}");
    assert!(
        shares
            .iter()
            .all(|s| (0.0..=1.0).contains(&s["share"].as_f64().unwrap())),
        "{report}"
    );
    let text = harness::text(&stack.ablate(&["report", &experiment]));
    assert!(
        text.contains("Importance: each swept parameter's share of loss's variance (64 trials)"),
        "{text}"
    );
}

/// A trainer whose loss is least at log2_batch 6 and whose memory doubles with the
/// batch: 2^log2_batch x 10^8 bytes.
const MEMORY_SH: &str = r#"loss=$(awk -v b="$1" -v lr="$2" 'BEGIN {
    l = log(lr) / log(10) + 2.5
    printf "%.12g", ((b - 6) / 3) ^ 2 + l * l }')
memory=$(awk -v b="$1" 'BEGIN { printf "%.0f", 2 ^ b * 1e8 }')
echo "{\"step\": 1, \"metrics\": {\"loss\": $loss, \"memory\": $memory}}" >&3
"#;

const CONSTRAINED: &str = r#"
name = "constrained"
family = "train"
[trial]
command = ["sh", "memory.sh", "{log2_batch}", "{lr}"]
code = "."
[base]
steps = 1
[sweep]
searcher = "grid"
params.log2_batch = { range = [2, 10], step = 1 }
params.lr = [0.001, 0.00316, 0.01]
[objective]
metric = "loss"
goal = "minimize"
constraints = ["memory <= 4e9"]
"#;

/// `memory <= 4e9` rules out log2_batch 6 and up, where the least loss is: the best
/// reported is at log2_batch 5, in `ablate status`, the report and SQL alike; a
/// constraint that names no metric of a built-in family, or no comparison, is refused
/// at submit with its field.
#[tokio::test(flavor = "multi_thread")]
async fn a_constrained_sweep_never_reports_an_infeasible_trial_as_best() {
    let mut stack = Stack::start(30.0).await;
    let dir = stack.dir.join("constrained");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("memory.sh"), MEMORY_SH).unwrap();
    std::fs::write(dir.join("sweep.toml"), CONSTRAINED).unwrap();
    stack.start_worker_from(&harness::bin("ablate-worker"), "cpu:2", &["--allow-commands"]);
    let out = stack.ablate(&["submit", &dir.join("sweep.toml").to_string_lossy(), "--wait"]);
    assert!(out.status.success(), "{}", harness::stderr(&out));
    let experiment = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (infeasible, least): (i64, f64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select count(*) filter (where not feasible), min(objective)
         from ablate.trial_results where experiment_id = '{experiment}' and state = 'succeeded'"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(infeasible, 15, "log2_batch 6 to 10 at 3 learning rates");
    let (batch, best): (String, f64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select params ->> 'log2_batch', objective from ablate.trial_results
         where experiment_id = '{experiment}' and feasible order by objective limit 1"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(batch, "5");
    assert!(
        least < best,
        "the least loss ({least}) is an infeasible trial's, below the best feasible {best}"
    );
    // `ablate status` ranks only feasible trials.
    let status = harness::text(&stack.ablate(&["status", &experiment]));
    let ranked = status.split("best trials by loss").nth(1).expect("a best-trials table");
    let ranked: Vec<&str> = ranked.lines().filter(|l| l.contains("log2_batch=")).collect();
    assert!(!ranked.is_empty(), "{status}");
    for line in &ranked {
        let b: i64 = line
            .split("log2_batch=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(b <= 5, "an infeasible trial ranked best: {line}\n{status}");
    }
    assert!(ranked[0].contains("log2_batch=5"), "{status}");
    // The report ranks the infeasible trials after the succeeded ones, marked.
    let out = stack.ablate(&["report", &experiment, "--format", "json"]);
    assert!(out.status.success(), "{}", harness::stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["tables"][0]["rows"].as_array().unwrap();
    let states: Vec<&str> = rows.iter().map(|r| r[1].as_str().unwrap()).collect();
    assert_eq!(states.iter().filter(|s| **s == "infeasible").count(), 15, "{states:?}");
    let first_infeasible = states.iter().position(|s| *s == "infeasible").unwrap();
    assert_eq!(first_infeasible, 12, "the 12 feasible trials come first: {states:?}");
    // Refused at submit, naming the field.
    for (constraint, says) in [
        ("no_such_metric <= 1", "is not a metric of family train"),
        ("eval_loss about 0.1", "no comparison"),
    ] {
        let spec = stack.write_spec(
            "refused.toml",
            &format!(
                "name = \"refused\"\nfamily = \"train\"\n[base]\ndataset = \"digits\"\nmodel = \"mlp\"\nsteps = 10\n[sweep]\nsearcher = \"grid\"\nparams.width = [32]\n[objective]\nmetric = \"eval_loss\"\ngoal = \"minimize\"\nconstraints = [\"{constraint}\"]\n"
            ),
        );
        let out = stack.ablate(&["submit", &spec.to_string_lossy()]);
        let err = harness::stderr(&out);
        assert!(!out.status.success(), "{constraint} was accepted");
        assert!(err.contains("objective.constraints[0]") && err.contains(says), "{err}");
    }
}

/// Two objectives with a known front: f1 = x, f2 = 1 - sqrt(x) + y; every trial with
/// y = 0 is on it, any other is dominated by the one at its x with y = 0.
const TWO_SH: &str = r#"awk -v x="$1" -v y="$2" 'BEGIN {
    printf "{\"step\": 1, \"metrics\": {\"f1\": %.12g, \"f2\": %.12g}}\n", x, 1 - sqrt(x) + y }' >&3
"#;

const TWO: &str = r#"
name = "NAME"
family = "train"
[trial]
command = ["sh", "two.sh", "{x}", "{y}"]
code = "."
[base]
steps = 1
[sweep]
SWEEP
[objective]
metric = "f1"
goal = "minimize"
also = [{ metric = "f2", goal = "minimize" }]
"#;

/// A grid over the two-objective problem: `ablate.pareto` and the report's front are
/// exactly its 11 trials at y = 0; a tpe sweep of the same problem learns that y only
/// costs (its proposals' median y falls below the random start's).
#[tokio::test(flavor = "multi_thread")]
async fn two_objectives_have_their_known_front_in_sql_and_the_report_and_tpe_proposes_toward_it() {
    let mut stack = Stack::start(30.0).await;
    let dir = stack.dir.join("two");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("two.sh"), TWO_SH).unwrap();
    stack.start_worker_from(&harness::bin("ablate-worker"), "cpu:2", &["--allow-commands"]);
    let submit = |name: &str, sweep: &str| {
        std::fs::write(
            dir.join("sweep.toml"),
            TWO.replace("NAME", name).replace("SWEEP", sweep),
        )
        .unwrap();
        let out = stack.ablate(&["submit", &dir.join("sweep.toml").to_string_lossy(), "--wait"]);
        assert!(out.status.success(), "{}", harness::stderr(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let grid = submit(
        "two-grid",
        "searcher = \"grid\"\nparams.x = { range = [0, 1], step = 0.1 }\nparams.y = [0, 0.5, 1]",
    );
    let front: Vec<(i32, f64, serde_json::Value)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select ordinal, (params ->> 'y')::float8, objectives from ablate.pareto
         where experiment_id = '{grid}' order by ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(front.len(), 11, "{front:?}");
    assert!(
        front
            .iter()
            .all(|(_, y, o)| *y == 0.0 && o["f1"].is_number() && o["f2"].is_number()),
        "{front:?}"
    );
    let out = stack.ablate(&["report", &grid, "--format", "json"]);
    assert!(out.status.success(), "{}", harness::stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut on: Vec<i64> = report["pareto"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_i64().unwrap())
        .collect();
    on.sort();
    assert_eq!(on, front.iter().map(|f| f.0 as i64).collect::<Vec<_>>(), "{report}");
    let text = harness::text(&stack.ablate(&["report", &grid]));
    assert!(
        text.contains("Pareto front of f1 (min), f2 (min): 11 of 33 succeeded trials"),
        "{text}"
    );
    // `ablate status` shows the front too, by the first objective.
    let status = harness::text(&stack.ablate(&["status", &grid]));
    let shown = status
        .split("Pareto front of f1, f2 (11 trials):")
        .nth(1)
        .expect("the front in status");
    let rows: Vec<&str> = shown.lines().filter(|l| l.contains("y=")).collect();
    assert_eq!(rows.len(), 11, "{status}");
    assert!(rows.iter().all(|l| l.trim_end().ends_with("y=0")), "{status}");
    assert!(rows[0].contains("x=0.0 "), "the least f1 (x = 0) first: {status}");
    // tpe against the front.
    let search = submit(
        "two-tpe",
        "searcher = \"tpe\"\nparams.x = { uniform = [0, 1] }\nparams.y = { uniform = [0, 1] }\n[sweep.tpe]\ntrials = 32\nn_startup = 8\nseed = 5",
    );
    let ys: Vec<f64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select (params ->> 'y')::float8 from trials where experiment_id = '{search}' and state = 'succeeded' order by ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(ys.len(), 32);
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (start, late) = (median(&ys[..8]), median(&ys[16..]));
    assert!(
        late < start,
        "median y of the last 16 proposals {late}, of the random start {start}"
    );
}
