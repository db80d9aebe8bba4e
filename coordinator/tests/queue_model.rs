//! The queue's rules hold in SQL as in the model (`ablate_experiments::queue`,
//! which `ablate-worker sweep` runs by): random sequences of lease, complete,
//! crash, expire and cancel, over experiments with random dependencies and
//! fusion keys, driven through the coordinator's lease statement, its completion
//! layer and its reaper against real PostgreSQL and through the model, compared
//! after every step: each trial's state, attempts and reason, and every lease's groups.

use std::collections::HashMap;
use std::time::Duration;

use ablate_coordinator::db;
use ablate_coordinator::platform::completion::{Completion, Report};
use ablate_coordinator::submit;
use ablate_experiments::queue::{Queue, Queued};
use ablate_schema::{ExperimentId, LeaseToken, Limits, SpecFormat, TrialId, TrialState, WorkerId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::PgPool;

const TRIALS: usize = 9;
const MAX_ATTEMPTS: u32 = 2;
const FUSE: usize = 3;
const TTL: Duration = Duration::from_secs(60);

fn spec() -> String {
    format!(
        r#"
name = "queue-model"
family = "train"
max_attempts = {MAX_ATTEMPTS}
fuse = {FUSE}
[base]
optimizer = "adam"
steps = 10
lr = 0.01
[sweep]
searcher = "grid"
params.seed = {:?}
"#,
        (0..TRIALS).collect::<Vec<_>>()
    )
}

/// One experiment driven both ways.
struct Run {
    experiment: ExperimentId,
    ids: Vec<TrialId>,
    tokens: HashMap<usize, LeaseToken>,
    model: Queue,
}

impl Run {
    /// Submits the experiment, then gives its trials random dependencies and fusion keys.
    async fn start(pool: &PgPool, rng: &mut ChaCha8Rng) -> Run {
        let (experiment, n) = submit::submit(pool, &spec(), SpecFormat::Toml, &Default::default())
            .await
            .unwrap();
        assert_eq!(n, TRIALS);
        let ids: Vec<TrialId> = sqlx::query_scalar("select id from trials where experiment_id = $1 order by ordinal")
            .bind(experiment.0)
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .map(TrialId)
            .collect();
        let mut model = Queue::new(MAX_ATTEMPTS);
        for (i, id) in ids.iter().enumerate() {
            let mut depends_on: Vec<usize> = Vec::new();
            if i > 0 && rng.gen_bool(0.35) {
                for _ in 0..rng.gen_range(1..=2) {
                    let d = rng.gen_range(0..i);
                    if !depends_on.contains(&d) {
                        depends_on.push(d);
                    }
                }
                depends_on.sort();
            }
            let key = ["a", "b", ""][rng.gen_range(0..3)];
            let key = (!key.is_empty()).then(|| key.to_string());
            let deps: Vec<uuid::Uuid> = depends_on.iter().map(|&d| ids[d].0).collect();
            sqlx::query("update trials set depends_on = $2, fuse_key = $3 where id = $1")
                .bind(id.0)
                .bind(&deps)
                .bind(&key)
                .execute(pool)
                .await
                .unwrap();
            model.push(Queued {
                depends_on,
                group: key.map(|k| (k, FUSE)),
            });
        }
        Run {
            experiment,
            ids,
            tokens: HashMap::new(),
            model,
        }
    }

    fn ordinal(&self, id: TrialId) -> usize {
        self.ids
            .iter()
            .position(|&t| t == id)
            .expect("a trial of this experiment")
    }

    /// Leases in SQL and in the model; the step's description, and whether a group fused trials.
    async fn lease(&mut self, pool: &PgPool, slots: usize) -> (String, bool) {
        let leased = ablate_coordinator::platform::lease::lease(pool, WorkerId::new_random(), slots as u32, 1, 0, TTL)
            .await
            .unwrap();
        // Members of one group come one after another, sharing fuse_group.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut last_group = None;
        for t in &leased {
            let ordinal = self.ordinal(t.trial);
            self.tokens.insert(ordinal, t.token);
            match (t.fuse_group, last_group) {
                (Some(g), Some(last)) if g == last => groups.last_mut().unwrap().push(ordinal),
                _ => groups.push(vec![ordinal]),
            }
            last_group = t.fuse_group;
        }
        let expected = self.model.lease(slots);
        assert_eq!(groups, expected, "lease of {slots} slot(s)");
        let fused = groups.iter().any(|g| g.len() > 1);
        (format!("lease {slots}: {groups:?}"), fused)
    }

    async fn finish(&mut self, pool: &PgPool, ordinal: usize, outcome: &str) {
        let token = self.tokens[&ordinal].to_string();
        let trial = self.ids[ordinal].to_string();
        let report = Report {
            trial_id: &trial,
            lease_token: &token,
            outcome,
            paused_at_step: 0,
            error: if outcome == "succeeded" { "" } else { "it broke" },
            stderr_tail: "",
            outputs_json: "{}",
            provenance_json: "",
        };
        let completion = Completion::check(&report, &Limits::default()).unwrap();
        let mut conn = pool.acquire().await.unwrap();
        completion.record(&mut conn).await.unwrap();
    }

    async fn expire(&mut self, pool: &PgPool, ordinal: usize) {
        sqlx::query("update trials set lease_expires_at = now() - interval '1 second' where id = $1")
            .bind(self.ids[ordinal].0)
            .execute(pool)
            .await
            .unwrap();
        assert_eq!(db::reap_expired(pool).await.unwrap(), 1);
    }

    /// Every trial's state and attempts agree, and a trial that failed waiting names the same trial.
    async fn compare(&self, pool: &PgPool, history: &[String]) {
        let rows: Vec<(String, i32, Option<String>)> =
            sqlx::query_as("select state, attempt, error from trials where experiment_id = $1 order by ordinal")
                .bind(self.experiment.0)
                .fetch_all(pool)
                .await
                .unwrap();
        for (i, (state, attempt, error)) in rows.iter().enumerate() {
            let context = || format!("trial {i} after: {}", history.join("; "));
            assert_eq!(state, self.model.state(i).as_str(), "state of {}", context());
            assert_eq!(*attempt as u32, self.model.attempts(i), "attempts of {}", context());
            if let Some(d) = self.model.waited_for(i) {
                let named = format!("(ordinal {d}), which failed");
                assert!(
                    error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("it waits for trial ") && e.contains(&named)),
                    "reason of {}: {error:?}",
                    context()
                );
            }
        }
    }
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn the_sql_queue_reaches_the_states_of_the_model_under_random_sequences(pool: PgPool) {
    let mut steps_with_fusion = 0;
    let mut dependents_failed = 0;
    for seed in 0..40u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut run = Run::start(&pool, &mut rng).await;
        let mut history = vec![format!("seed {seed}")];
        for _ in 0..60 {
            let running: Vec<usize> = (0..TRIALS)
                .filter(|&i| run.model.state(i) == TrialState::Running)
                .collect();
            let roll = rng.gen_range(0..100);
            let step = if running.is_empty() || roll < 30 {
                let slots = rng.gen_range(1..=3);
                let (done, fused) = run.lease(&pool, slots).await;
                steps_with_fusion += usize::from(fused);
                done
            } else {
                let ordinal = running[rng.gen_range(0..running.len())];
                match roll {
                    30..=59 => {
                        run.finish(&pool, ordinal, "succeeded").await;
                        run.model.complete(ordinal, true);
                        format!("{ordinal} succeeded")
                    }
                    60..=74 => {
                        run.finish(&pool, ordinal, "failed").await;
                        run.model.complete(ordinal, false);
                        format!("{ordinal} failed")
                    }
                    75..=86 => {
                        run.finish(&pool, ordinal, "crashed").await;
                        run.model.crash(ordinal);
                        format!("{ordinal} crashed")
                    }
                    87..=97 => {
                        run.expire(&pool, ordinal).await;
                        run.model.expire(ordinal);
                        format!("{ordinal} expired")
                    }
                    _ => {
                        db::cancel(&pool, run.experiment).await.unwrap();
                        run.model.cancel();
                        "cancel".to_string()
                    }
                }
            };
            history.push(step);
            run.compare(&pool, &history).await;
            if run.model.finished() {
                break;
            }
        }
        dependents_failed += (0..TRIALS).filter(|&i| run.model.waited_for(i).is_some()).count();
        // What is left makes way for the next sequence's experiment.
        db::cancel(&pool, run.experiment).await.unwrap();
    }
    // The sequences reached the rules they test.
    eprintln!("{steps_with_fusion} leases fused trials; {dependents_failed} trials failed waiting");
    assert!(steps_with_fusion > 10, "{steps_with_fusion} leases fused trials");
    assert!(dependents_failed > 5, "{dependents_failed} trials failed waiting");
}
