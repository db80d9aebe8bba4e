//! The compact metric store against real PostgreSQL: batches written as
//! chunks and merged by the compactor are read back once each by every view
//! and read; a replay, also one that waits on a merge, and a new attempt that
//! logs again over a finished trial's points replace points, never add them.

use std::time::Duration;

use ablate_coordinator::db::{self, CheckpointRecord};
use ablate_coordinator::platform::{compaction, lease::lease};
use ablate_coordinator::submit;
use ablate_schema::{SpecFormat, TrialState, WorkerId};
use sqlx::PgPool;

const SPEC: &str = r#"
name = "chunks"
family = "train"
[base]
optimizer = "adam"
steps = 10
lr = 0.01
[sweep]
searcher = "grid"
params.seed = [0]
"#;

const TTL: Duration = Duration::from_secs(60);

async fn intern(pool: &PgPool, name: &str) -> i32 {
    db::intern_metric_names(pool, &[name.to_string()]).await.unwrap()[0].1
}

async fn scalar<T>(pool: &PgPool, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A noisy, decaying curve: values that do not compress, like a real loss.
fn loss(step: i64, seed: u64) -> f64 {
    let mut x = (step as u64).wrapping_mul(6364136223846793005).wrapping_add(seed);
    x ^= x >> 33;
    let noise = (x % 10_000) as f64 / 10_000.0;
    2.0 / (1.0 + step as f64 / 1000.0) + 0.05 * noise
}

async fn series(pool: &PgPool, name: &str) -> Vec<(i64, f64)> {
    sqlx::query_as("select step, value from ablate.metric_series where name = $1 order by step")
        .bind(name)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn moved_points_are_read_once_each_and_take_under_16_bytes(pool: PgPool) {
    submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let t = lease(&pool, WorkerId::new_random(), 1, 1, 0, TTL)
        .await
        .unwrap()
        .remove(0);
    let (loss_id, acc_id, odd_id) = (
        intern(&pool, "loss").await,
        intern(&pool, "acc").await,
        intern(&pool, "odd").await,
    );
    // 40,000 steps of two metrics in batches of 100 steps, and an
    // irregular metric (every third step, one NaN) beside them.
    let mut expected_odd = Vec::new();
    for batch in 0..400 {
        let (mut names, mut steps, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for step in batch * 100 + 1..=(batch + 1) * 100 {
            names.extend([loss_id, acc_id]);
            steps.extend([step, step]);
            values.extend([loss(step, 1), 1.0 - loss(step, 2)]);
            if step % 3 == 0 || step == 7 {
                let v = if step == 30_000 { f64::NAN } else { loss(step, 3) };
                names.push(odd_id);
                steps.push(step);
                values.push(v);
                expected_odd.push((step, v));
            }
        }
        db::insert_metrics(&pool, t.trial, t.token, &names, &steps, &values)
            .await
            .unwrap();
        if batch == 249 {
            let ckpt = CheckpointRecord {
                step: 25_000,
                path: "ckpt/25000".into(),
                bytes: 1,
            };
            db::record_checkpoint(&pool, t.trial, t.token, &ckpt).await.unwrap();
            // While it runs: its small chunks before the checkpoint are rewritten
            // (the last batch's, which reaches it, whole).
            let (_, moved) = compaction::compact(&pool, 64, Some(1)).await.unwrap();
            assert_eq!(
                moved,
                2 * 25_000 + expected_odd.len() as u64,
                "every point to step 25,000"
            );
            let merged: i64 = scalar(&pool, "select count(*) from metric_chunks where step_lo < 25000").await;
            assert_eq!(merged, 5, "250 chunks of each metric in 2, and the odd metric's in 1");
        }
    }
    // A replay of a batch, before and after the merge: its points replace theirs.
    for first in [2001, 30_001] {
        let steps: Vec<i64> = (first..first + 100).collect();
        let names = vec![loss_id; 100];
        let values: Vec<f64> = steps.iter().map(|&s| loss(s, 1)).collect();
        let written = db::insert_metrics(&pool, t.trial, t.token, &names, &steps, &values)
            .await
            .unwrap();
        assert!(written >= 100, "{written}");
    }
    let mid: Vec<(i64, f64)> = series(&pool, "loss").await;
    assert_eq!(mid.len(), 40_000, "each step once");
    let overlaps: i64 = scalar(
        &pool,
        "select count(*) from metric_chunks a join metric_chunks b on a.trial_id = b.trial_id and a.name_id = b.name_id
         and a.step_lo < b.step_lo and a.step_hi >= b.step_lo",
    )
    .await;
    assert_eq!(overlaps, 0, "no two chunks of a metric share a step");

    db::complete(
        &pool,
        t.trial,
        t.token,
        TrialState::Succeeded,
        None,
        None,
        &serde_json::json!({}),
        None,
    )
    .await
    .unwrap();
    compaction::compact(&pool, 64, None).await.unwrap();
    assert_eq!(
        scalar::<i64>(&pool, "select count(*) from metrics").await,
        0,
        "every row moved"
    );
    assert!(!scalar::<bool>(&pool, "select metrics_due from trials").await);

    let got = series(&pool, "loss").await;
    let want: Vec<(i64, f64)> = (1..=40_000).map(|s| (s, loss(s, 1))).collect();
    assert_eq!(got, want, "the loss curve, exactly");
    let got_odd = series(&pool, "odd").await;
    assert_eq!(got_odd.len(), expected_odd.len());
    for ((gs, gv), (es, ev)) in got_odd.iter().zip(&expected_odd) {
        assert_eq!(gs, es);
        assert!(gv == ev || (gv.is_nan() && ev.is_nan()), "step {gs}: {gv} vs {ev}");
    }
    let irregular: i64 = scalar(&pool, "select count(*) from metric_chunks where steps is not null").await;
    assert!(irregular > 0, "the irregular metric keeps its steps");
    let times_ordered: bool = scalar(
        &pool,
        "select bool_and(ok) from (select recorded_at >= lag(recorded_at) over (order by step) is not false as ok
         from ablate.metric_series where name = 'acc') x",
    )
    .await;
    assert!(times_ordered, "recorded_at kept per point");

    // Finals, summaries and a value at a step, from the chunks.
    let finals: serde_json::Value = scalar(&pool, "select metrics from ablate.trial_results").await;
    assert_eq!(finals["loss"].as_f64(), Some(loss(40_000, 1)));
    assert_eq!(finals["acc"].as_f64(), Some(1.0 - loss(40_000, 2)));
    // The compactor kept them on the trial, as the points give them.
    let (kept, from_points): (Option<serde_json::Value>, serde_json::Value) =
        sqlx::query_as("select final_metrics, trial_final_metrics(id) from trials")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(kept.as_ref(), Some(&from_points), "final metrics kept at compaction");
    assert_eq!(kept.as_ref(), Some(&finals));
    let (points, min, max, last): (i64, f64, f64, f64) = sqlx::query_as(
        "select points, min_value, max_value, last_value from ablate.metric_summary where name = 'loss'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(points, 40_000);
    assert_eq!(min, want.iter().map(|p| p.1).fold(f64::INFINITY, f64::min));
    assert_eq!(max, want.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max));
    assert_eq!(last, loss(40_000, 1));
    let at: f64 = sqlx::query_scalar("select metric_value_at(trial_id, $1, 12345) from metric_chunks limit 1")
        .bind(loss_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(at, loss(12_345, 1));

    // A drawn curve reads the downsampled copy and keeps the extremes.
    let (curve, totals) = db::curve_points(&pool, &[t.trial.0], "loss", 4000).await.unwrap();
    assert_eq!(totals[0].1, 40_000);
    assert!(
        curve.len() <= 1024,
        "{} points read for a 40,000-point curve",
        curve.len()
    );
    assert!(curve.iter().any(|p| p.2 == min) && curve.iter().any(|p| p.2 == max));
    assert!(curve.windows(2).all(|w| w[0].1 < w[1].1), "in step order");

    // Storage: under 16 bytes a point, indexes, TOAST and the downsampled copies
    // included (rewritten first: the small chunks the compactor replaced are
    // dead rows until a vacuum makes their room reusable).
    sqlx::query("vacuum full metric_chunks, metric_curves")
        .execute(&pool)
        .await
        .unwrap();
    let stored: i64 = scalar(&pool, "select count(*) from ablate.metric_series").await;
    let bytes: i64 = scalar(
        &pool,
        "select pg_total_relation_size('metric_chunks') + pg_total_relation_size('metric_curves')",
    )
    .await;
    let per_point = bytes as f64 / stored as f64;
    assert!(per_point <= 16.0, "{per_point:.1} bytes a point ({bytes} for {stored})");
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn a_replay_that_waits_on_a_merge_replaces_its_points(pool: PgPool) {
    submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let t = lease(&pool, WorkerId::new_random(), 1, 1, 0, TTL)
        .await
        .unwrap()
        .remove(0);
    let name = intern(&pool, "loss").await;
    let steps: Vec<i64> = (1..=20).collect();
    let values: Vec<f64> = steps.iter().map(|&s| loss(s, 0)).collect();
    for half in [0..10, 10..20] {
        db::insert_metrics(
            &pool,
            t.trial,
            t.token,
            &[name; 10],
            &steps[half.clone()],
            &values[half],
        )
        .await
        .unwrap();
    }
    assert_eq!(scalar::<i64>(&pool, "select count(*) from metric_chunks").await, 2);
    // A merge in progress holds the trial row; a replay of the first batch arrives.
    let mut mover = pool.begin().await.unwrap();
    sqlx::query("select 1 from trials where id = $1 for update")
        .bind(t.trial.0)
        .execute(&mut *mover)
        .await
        .unwrap();
    let replay = {
        let pool = pool.clone();
        let (trial, token) = (t.trial, t.token);
        let (steps, values) = (steps[..10].to_vec(), values[..10].to_vec());
        tokio::spawn(async move { db::insert_metrics(&pool, trial, token, &[name; 10], &steps, &values).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!replay.is_finished(), "the batch waits for the merge");
    // The merge: both chunks become one.
    sqlx::query(
        "with old as (delete from metric_chunks where trial_id = $1 returning *)
         insert into metric_chunks (trial_id, name_id, step_lo, step_hi, n, steps, stride, vals,
                                    recorded_lo, recorded_us, v_min, v_max, v_last)
         select a.trial_id, a.name_id, a.step_lo, b.step_hi, a.n + b.n, null, 1, a.vals || b.vals,
                a.recorded_lo, a.recorded_us || b.recorded_us, least(a.v_min, b.v_min),
                greatest(a.v_max, b.v_max), b.v_last
         from old a join old b on a.step_lo = 1 and b.step_lo = 11",
    )
    .bind(t.trial.0)
    .execute(&mut *mover)
    .await
    .unwrap();
    mover.commit().await.unwrap();
    replay.await.unwrap().unwrap();
    assert_eq!(series(&pool, "loss").await.len(), 20, "each step once after the replay");
    assert_eq!(scalar::<i64>(&pool, "select count(*) from metric_chunks").await, 1);
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn a_new_attempt_over_a_finished_trial_replaces_its_points_from_the_checkpoint(pool: PgPool) {
    submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let t = lease(&pool, WorkerId::new_random(), 1, 1, 0, TTL)
        .await
        .unwrap()
        .remove(0);
    let name = intern(&pool, "loss").await;
    let steps: Vec<i64> = (1..=100).collect();
    let values: Vec<f64> = steps.iter().map(|&s| loss(s, 0)).collect();
    db::insert_metrics(&pool, t.trial, t.token, &vec![name; 100], &steps, &values)
        .await
        .unwrap();
    let ckpt = CheckpointRecord {
        step: 60,
        path: "ckpt/60".into(),
        bytes: 1,
    };
    db::record_checkpoint(&pool, t.trial, t.token, &ckpt).await.unwrap();
    db::complete(
        &pool,
        t.trial,
        t.token,
        TrialState::Failed,
        Some("boom"),
        None,
        &serde_json::json!({}),
        None,
    )
    .await
    .unwrap();
    compaction::compact(&pool, 64, None).await.unwrap();
    let kept: Option<serde_json::Value> = scalar(&pool, "select final_metrics from trials").await;
    assert_eq!(kept, Some(serde_json::json!({"loss": loss(100, 0)})));
    // Pending again (as `ablate retry` or a rung's promotion makes it).
    sqlx::query("update trials set state = 'pending', finished_at = null")
        .execute(&pool)
        .await
        .unwrap();
    let kept: Option<serde_json::Value> = scalar(&pool, "select final_metrics from trials").await;
    assert_eq!(
        kept, None,
        "a trial that runs again has its final metrics worked out again"
    );
    assert_eq!(series(&pool, "loss").await.len(), 100, "nothing lost on the way back");
    let again = lease(&pool, WorkerId::new_random(), 1, 1, 0, TTL)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(again.resume_from.as_ref().map(|c| c.step), Some(60));
    // The new attempt logs from its checkpoint on, with other values.
    let steps: Vec<i64> = (61..=120).collect();
    let values: Vec<f64> = steps.iter().map(|&s| loss(s, 9)).collect();
    let written = db::insert_metrics(&pool, again.trial, again.token, &vec![name; 60], &steps, &values)
        .await
        .unwrap();
    assert_eq!(written, 120, "merged with the first attempt's chunk");
    db::complete(
        &pool,
        again.trial,
        again.token,
        TrialState::Succeeded,
        None,
        None,
        &serde_json::json!({}),
        None,
    )
    .await
    .unwrap();
    compaction::compact(&pool, 64, None).await.unwrap();
    let got = series(&pool, "loss").await;
    let want: Vec<(i64, f64)> = (1..=120)
        .map(|s| (s, if s <= 60 { loss(s, 0) } else { loss(s, 9) }))
        .collect();
    assert_eq!(
        got, want,
        "the first attempt's curve to the checkpoint, the second's after it"
    );
    let finals: serde_json::Value = scalar(&pool, "select metrics from ablate.trial_results").await;
    assert_eq!(
        finals,
        serde_json::json!({"loss": loss(120, 9)}),
        "the second attempt's final"
    );
    let kept: Option<serde_json::Value> = scalar(&pool, "select final_metrics from trials").await;
    assert_eq!(kept.as_ref(), Some(&finals));
}

#[test]
fn chunks_cut_long_curves_and_keep_each_buckets_extremes() {
    let n = 40_000usize;
    let points = db::Points {
        name_id: 1,
        steps: (0..n as i64).map(|s| s * 5 + 3).collect(),
        values: (0..n)
            .map(|i| if i == 12_345 { -100.0 } else { (i as f64).sin() })
            .collect(),
        recorded_us: vec![7; n],
    };
    let chunks = db::chunks_of(&points);
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks.iter().map(|c| c.values.len()).sum::<usize>(), n);
    assert!(chunks.iter().all(|c| c.steps.is_none() && c.stride == 5));
    assert_eq!(chunks[1].step_lo, 16_384 * 5 + 3);
    assert_eq!(chunks[0].min, Some(-100.0));
    let (ds_steps, ds_values) = db::downsampled(&points).expect("a long curve is downsampled");
    let highest = points.values.iter().copied().fold(f64::MIN, f64::max);
    assert!(
        ds_values.contains(&-100.0) && ds_values.contains(&highest),
        "the extremes kept"
    );
    assert!(ds_steps.len() <= 1024 && ds_steps.windows(2).all(|w| w[0] < w[1]));
    assert!(chunks
        .iter()
        .all(|c| c.recorded_us.iter().all(|&r| r == 0) && c.recorded_lo == 7));
    let short = db::chunks_of(&db::Points {
        name_id: 1,
        steps: vec![1, 2, 4],
        values: vec![f64::NAN, 1.0, 2.0],
        recorded_us: vec![1, 2, 3],
    });
    assert_eq!(short[0].steps, Some(vec![1, 2, 4]));
    assert_eq!((short[0].min, short[0].max), (Some(1.0), Some(2.0)));
    assert!(db::downsampled(&db::Points {
        name_id: 1,
        steps: vec![1, 2, 4],
        values: vec![0.0; 3],
        recorded_us: vec![0; 3],
    })
    .is_none());
}
