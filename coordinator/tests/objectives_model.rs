//! Constraints and the Pareto front exist twice: in SQL (`trial_feasible` and
//! `pareto_dominates`, which `ablate.trial_results`, `ablate.pareto`, `ablate
//! status` and the dashboard read) and in Rust (`report::mark_infeasible`,
//! `pareto::dominates` and `pareto::ranks`, which reports, local sweeps and tpe
//! read). Random cases, with ties, missing values and values of the wrong type,
//! go through both against real PostgreSQL, and every answer must agree.

use ablate_experiments::pareto;
use ablate_experiments::report::{mark_infeasible, TrialOutcome};
use ablate_schema::Constraint;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use sqlx::PgPool;

const NAMES: [&str; 3] = ["loss", "memory", "flops"];
const OPS: [&str; 4] = ["<=", "<", ">=", ">"];

/// A value as a trial might report it: a small number (so bounds tie often), a string,
/// or nothing.
fn value(rng: &mut ChaCha8Rng) -> Option<Value> {
    match rng.gen_range(0..10) {
        0 => None,
        1 => Some(json!("3")),
        _ => Some(json!(rng.gen_range(0..5) as f64 / 2.0)),
    }
}

fn values(rng: &mut ChaCha8Rng) -> Map<String, Value> {
    NAMES
        .iter()
        .filter_map(|n| value(rng).map(|v| (n.to_string(), v)))
        .collect()
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn constraints_judge_a_trial_alike_in_sql_and_in_rust(pool: PgPool) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut infeasible = 0;
    for case in 0..400 {
        let constraints: Vec<String> = (0..rng.gen_range(0..3))
            .map(|_| {
                let (name, op) = (NAMES[rng.gen_range(0..3)], OPS[rng.gen_range(0..4)]);
                let bound = rng.gen_range(0..5) as f64 / 2.0;
                // Spacing as a researcher might write it.
                if rng.gen_bool(0.5) {
                    format!("{name} {op} {bound}")
                } else {
                    format!("{name}{op}{bound:e}")
                }
            })
            .collect();
        let (metrics, outputs) = (values(&mut rng), values(&mut rng));
        let sql: bool = sqlx::query_scalar("select trial_feasible($1, $2, $3)")
            .bind(Value::Object(metrics.clone()))
            .bind(Value::Object(outputs.clone()))
            .bind(json!(constraints))
            .fetch_one(&pool)
            .await
            .unwrap();
        let parsed: Vec<Constraint> = constraints.iter().map(|c| Constraint::parse(c).unwrap()).collect();
        let mut outcome = [TrialOutcome {
            ordinal: case,
            state: "succeeded".into(),
            params: json!({}),
            metrics: metrics.clone(),
            series: Default::default(),
            outputs: outputs.clone(),
        }];
        let rust = mark_infeasible(&mut outcome, &parsed) == 0;
        assert_eq!(
            sql, rust,
            "case {case}: {constraints:?} over metrics {metrics:?}, outputs {outputs:?}"
        );
        infeasible += usize::from(!rust);
    }
    // Both answers occur often enough to mean something.
    assert!((100..300).contains(&infeasible), "{infeasible} of 400 infeasible");
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn dominance_and_the_front_agree_in_sql_and_in_rust(pool: PgPool) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for case in 0..60 {
        let dims: usize = rng.gen_range(2..=3);
        let points: Vec<Vec<f64>> = (0..rng.gen_range(1..12))
            .map(|_| (0..dims).map(|_| rng.gen_range(0..4) as f64).collect())
            .collect();
        // Every ordered pair.
        for a in &points {
            for b in &points {
                let sql: bool = sqlx::query_scalar("select pareto_dominates($1, $2)")
                    .bind(a)
                    .bind(b)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                assert_eq!(sql, pareto::dominates(a, b), "case {case}: {a:?} over {b:?}");
            }
        }
        // The front as ablate.pareto takes it (no other point dominates), against rank 0.
        let flat: Vec<f64> = points.iter().flatten().copied().collect();
        let mut sql_front: Vec<i32> = sqlx::query_scalar(
            "with p as (
                 select i::int as i, array(select unnest($1::float8[]) offset (i - 1) * $2 limit $2) as v
                 from generate_series(1, cardinality($1::float8[]) / $2) i
             )
             select p.i - 1 from p
             where not exists (select 1 from p q where q.i <> p.i and pareto_dominates(q.v, p.v))
             order by p.i",
        )
        .bind(&flat)
        .bind(dims as i32)
        .fetch_all(&pool)
        .await
        .unwrap();
        sql_front.sort();
        let rust_front: Vec<i32> = pareto::ranks(&points)
            .iter()
            .enumerate()
            .filter(|(_, r)| **r == 0)
            .map(|(i, _)| i as i32)
            .collect();
        assert_eq!(sql_front, rust_front, "case {case}: {points:?}");
    }
}
