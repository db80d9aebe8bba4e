//! The lease queue, fencing, metrics and read-only SQL against real PostgreSQL.
//! Each test gets its own freshly migrated database from `#[sqlx::test]`.

use std::time::Duration;

use ablate_coordinator::db::{self, CheckpointRecord};
use ablate_coordinator::submit;
use ablate_coordinator::Error;
use ablate_schema::{LeaseToken, SpecFormat, TrialState, WorkerId};
use sqlx::PgPool;

const SPEC: &str = r#"
name = "queue"
family = "train"
max_attempts = 2
[base]
optimizer = "adam"
steps = 10
lr = 0.01
[sweep]
searcher = "grid"
params.seed = [0, 1, 2, 3, 4, 5]
"#;

const TTL: Duration = Duration::from_secs(30);

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn expire_all(pool: &PgPool) {
    sqlx::query("update trials set lease_expires_at = now() - interval '1 second' where state = 'running'")
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn concurrent_leases_never_share_a_trial(pool: PgPool) {
    submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            ablate_coordinator::platform::lease::lease(&pool, WorkerId::new_random(), 2, 1, 0, TTL)
                .await
                .unwrap()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap().into_iter().map(|l| l.trial));
    }
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "a trial was leased twice");
    assert_eq!(n, 6, "4 workers asking for 2 each should drain all 6 trials");
    assert!(
        ablate_coordinator::platform::lease::lease(&pool, WorkerId::new_random(), 5, 1, 0, TTL)
            .await
            .unwrap()
            .is_empty()
    );
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn a_stale_token_is_refused_for_metrics_checkpoints_and_completion(pool: PgPool) {
    submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let first = ablate_coordinator::platform::lease::lease(&pool, WorkerId::new_random(), 1, 1, 0, TTL)
        .await
        .unwrap()
        .remove(0);
    db::insert_metrics(
        &pool,
        first.trial,
        first.token,
        &[intern(&pool, "train_loss").await],
        &[1],
        &[0.5],
    )
    .await
    .unwrap();
    expire_all(&pool).await;
    assert_eq!(db::reap_expired(&pool).await.unwrap(), 1);
    let second = ablate_coordinator::platform::lease::lease(&pool, WorkerId::new_random(), 1, 1, 0, TTL)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(second.trial, first.trial, "the reaped trial comes back first");
    assert_eq!(second.attempt, 2);
    assert_ne!(second.token, first.token);

    let name = intern(&pool, "train_loss").await;
    let stale = db::insert_metrics(&pool, first.trial, first.token, &[name], &[2], &[0.4]).await;
    assert!(matches!(stale, Err(Error::StaleLease { .. })), "{stale:?}");
    let ckpt = CheckpointRecord {
        step: 5,
        path: "x".into(),
        bytes: 1,
    };
    let stale = db::record_checkpoint(&pool, first.trial, first.token, &ckpt).await;
    assert!(matches!(stale, Err(Error::StaleLease { .. })), "{stale:?}");
    let stale = db::complete(
        &pool,
        first.trial,
        first.token,
        TrialState::Succeeded,
        None,
        None,
        &serde_json::json!({}),
        None,
    )
    .await;
    assert!(matches!(stale, Err(Error::StaleLease { .. })), "{stale:?}");
    let made_up = db::complete(
        &pool,
        first.trial,
        LeaseToken::new_random(),
        TrialState::Succeeded,
        None,
        None,
        &serde_json::json!({}),
        None,
    )
    .await;
    assert!(matches!(made_up, Err(Error::StaleLease { .. })), "{made_up:?}");

    // The current holder's writes go through, and completing twice is harmless.
    db::insert_metrics(&pool, second.trial, second.token, &[name], &[2], &[0.4])
        .await
        .unwrap();
    db::record_checkpoint(&pool, second.trial, second.token, &ckpt)
        .await
        .unwrap();
    db::complete(
        &pool,
        second.trial,
        second.token,
        TrialState::Succeeded,
        None,
        None,
        &serde_json::json!({}),
        None,
    )
    .await
    .unwrap();
    db::complete(
        &pool,
        second.trial,
        second.token,
        TrialState::Succeeded,
        None,
        None,
        &serde_json::json!({}),
        None,
    )
    .await
    .unwrap();
    let stored = count(&pool, "select count(*) from ablate.metric_series").await;
    assert_eq!(stored, 2, "the stale point must not be stored");
}

async fn intern(pool: &PgPool, name: &str) -> i32 {
    db::intern_metric_names(pool, &[name.to_string()]).await.unwrap()[0].1
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn the_reaper_requeues_then_fails_a_trial_out_of_attempts(pool: PgPool) {
    submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    for attempt in 1..=2 {
        let leased = ablate_coordinator::platform::lease::lease(&pool, WorkerId::new_random(), 1, 1, 0, TTL)
            .await
            .unwrap();
        assert_eq!(leased[0].attempt, attempt);
        expire_all(&pool).await;
        db::reap_expired(&pool).await.unwrap();
    }
    let failed: (String, String) = sqlx::query_as("select state, error from ablate.trial_results where attempt = 2")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(failed.0, "failed");
    assert!(failed.1.contains("attempt 2 of 2"), "{}", failed.1);
    assert_eq!(
        count(&pool, "select count(*) from trials where state = 'pending'").await,
        5
    );
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn metric_replays_overwrite_instead_of_duplicating(pool: PgPool) {
    submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let t = ablate_coordinator::platform::lease::lease(&pool, WorkerId::new_random(), 1, 1, 0, TTL)
        .await
        .unwrap()
        .remove(0);
    let name = intern(&pool, "train_loss").await;
    let steps: Vec<i64> = (1..=100).collect();
    let values: Vec<f64> = steps.iter().map(|s| 1.0 / *s as f64).collect();
    for _ in 0..3 {
        db::insert_metrics(&pool, t.trial, t.token, &vec![name; 100], &steps, &values)
            .await
            .unwrap();
    }
    assert_eq!(count(&pool, "select count(*) from ablate.metric_series").await, 100);
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn heartbeats_extend_leases_and_carry_stop_orders(pool: PgPool) {
    let (experiment, _) = submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let worker = WorkerId::new_random();
    db::register_worker(
        &pool,
        &db::NewWorker {
            id: worker,
            hostname: "host",
            devices: &["cpu:0".into()],
            pool: None,
            labels: serde_json::json!({}),
            allow_commands: false,
        },
    )
    .await
    .unwrap();
    let leased = ablate_coordinator::platform::lease::lease(&pool, worker, 2, 1, 0, Duration::from_secs(1))
        .await
        .unwrap();
    let held: Vec<_> = leased.iter().map(|l| (l.trial, l.token)).collect();
    assert!(db::heartbeat(&pool, worker, &held, TTL, None)
        .await
        .unwrap()
        .stop
        .is_empty());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        db::reap_expired(&pool).await.unwrap(),
        0,
        "the heartbeat extended the leases"
    );
    assert_eq!(db::cancel(&pool, experiment).await.unwrap(), 6);
    let stop = db::heartbeat(&pool, worker, &held, TTL, None).await.unwrap().stop;
    assert_eq!(stop.len(), 2);
    assert!(stop.iter().all(|(_, why)| why == "cancelled"), "{stop:?}");
    let state: String = sqlx::query_scalar("select state from ablate.experiments")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "cancelled");
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn a_bad_spec_stores_nothing(pool: PgPool) {
    for bad in [
        SPEC.replace("steps = 10", "steps = 10\nstepz = 1"),
        SPEC.replace("steps = 10\n", "steps = \"ten\"\n"),
        SPEC.replace("params.seed = [0, 1, 2, 3, 4, 5]", "params.seed = []"),
        // A command trial whose code folder came without its packed code.
        format!("{SPEC}[trial]\ncommand = [\"sh\", \"train.sh\", \"{{seed}}\"]\ncode = \".\"\n"),
    ] {
        let err = submit::submit(&pool, &bad, SpecFormat::Toml, &Default::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidSpec(_)), "{err}");
        if bad.contains("[trial]") {
            assert!(err.to_string().contains("which packs it"), "{err}");
        }
    }
    assert_eq!(count(&pool, "select count(*) from experiments").await, 0);
    assert_eq!(count(&pool, "select count(*) from trials").await, 0);
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn sql_is_read_only_and_keeps_columns_in_order(pool: PgPool) {
    submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let timeout = Duration::from_secs(5);
    let rows = db::read_only_query(
        &pool,
        "select count(*) as n, 1 as n, 'x' as s from ablate.trial_results",
        timeout,
    )
    .await
    .unwrap();
    assert_eq!(rows.columns, vec!["n", "n", "s"]);
    assert_eq!(
        rows.rows,
        vec![vec![serde_json::json!(6), serde_json::json!(1), serde_json::json!("x")]]
    );
    for write in [
        "delete from ablate.trial_results",
        "delete from trials",
        "update trials set state = 'failed'",
        "insert into metric_names (name) values ('x')",
        "with d as (delete from trials returning 1) select count(*) from d",
        "select 1; delete from trials",
        "drop table trials",
        "select * from trials",
    ] {
        let err = db::read_only_query(&pool, write, timeout).await;
        assert!(
            matches!(err, Err(Error::Query(_))),
            "`{write}` was not refused: {:?}",
            err.map(|r| r.rows)
        );
    }
    assert_eq!(count(&pool, "select count(*) from trials").await, 6);
    let slow = db::read_only_query(&pool, "select pg_sleep(2)", Duration::from_millis(200)).await;
    assert!(
        matches!(&slow, Err(Error::Query(m)) if m.contains("timeout")),
        "{:?}",
        slow.map(|r| r.rows)
    );
}

/// Advisory locks on keys 1 and 2 in this test's database (other tests' setup takes locks of its own).
const ADVISORY_1_AND_2: &str = "select count(*) from pg_locks where locktype = 'advisory' and classid = 0
     and objid in (1, 2) and database = (select oid from pg_database where datname = current_database())";

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn a_reader_query_leaves_no_lock_or_setting_behind(pool: PgPool) {
    let url = pool.connect_options();
    // The test pool's options with the reader's: one connection, so every query reuses it.
    let reader = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*url).clone())
        .await
        .unwrap();
    let timeout = Duration::from_secs(5);
    db::read_only_query(&reader, "select pg_advisory_lock(1)", timeout)
        .await
        .unwrap();
    db::read_only_query(&reader, "select set_config('work_mem', '77MB', false)", timeout)
        .await
        .unwrap();
    assert_eq!(
        count(&pool, ADVISORY_1_AND_2).await,
        0,
        "the advisory lock was released when the query ended"
    );
    let rows = db::read_only_query(&reader, "select current_setting('work_mem') as m", timeout)
        .await
        .unwrap();
    assert_ne!(rows.rows[0][0], serde_json::json!("77MB"), "settings are reset");
    // A failed query resets its connection too.
    assert!(db::read_only_query(&reader, "select pg_advisory_lock(2), 1/0", timeout)
        .await
        .is_err());
    assert_eq!(count(&pool, ADVISORY_1_AND_2).await, 0);
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn huge_sweeps_and_unprintable_names_are_refused_naming_the_field(pool: PgPool) {
    let cases = [
        (
            SPEC.replace(
                "params.seed = [0, 1, 2, 3, 4, 5]",
                "params.width = { range = [1, 100000000], step = 1 }",
            ),
            "sweep.params.width",
            "over the limit of 100000 trials",
        ),
        (
            SPEC.replace(
                "params.seed = [0, 1, 2, 3, 4, 5]",
                "params.a = { range = [1, 1000] }\nparams.b = { range = [1, 1000] }",
            ),
            "sweep.params.b",
            "1000000",
        ),
        (
            SPEC.replace("name = \"queue\"", "name = \"a\\u0000b\""),
            "name",
            "U+0000",
        ),
        (
            SPEC.replace("name = \"queue\"", &format!("name = \"{}\"", "n".repeat(200_000))),
            "name",
            "over the limit of 200",
        ),
        (
            SPEC.replace("lr = 0.01", "lr = 0.01\nnote = \"bell\\u0007\""),
            "base.note",
            "U+0007",
        ),
        (
            format!("{SPEC}\n# {}\n", "x".repeat(2 << 20)),
            ".",
            "bytes, over the limit",
        ),
    ];
    for (text, path, needle) in cases {
        let err = submit::submit(&pool, &text, SpecFormat::Toml, &Default::default())
            .await
            .unwrap_err();
        let Error::InvalidSpec(spec_err) = &err else {
            panic!("{err}")
        };
        assert_eq!(spec_err.path, path, "{err}");
        assert!(spec_err.message.contains(needle), "{err}");
    }
    assert_eq!(count(&pool, "select count(*) from experiments").await, 0);
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn fused_trials_are_leased_as_groups_and_a_last_one_as_a_group_of_one(pool: PgPool) {
    let fused = SPEC
        .replace("family = \"train\"", "family = \"train\"\nfuse = 4")
        .replace("[0, 1, 2, 3, 4, 5]", "[0, 1, 2, 3, 4]");
    let (fused, _) = submit::submit(&pool, &fused, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    submit::submit(
        &pool,
        &SPEC.replace("\"queue\"", "\"plain\""),
        SpecFormat::Toml,
        &Default::default(),
    )
    .await
    .unwrap();
    let worker = WorkerId::new_random();
    // One slot at a time: each lease is one unit of work for it.
    let (mut groups, mut plain) = (Vec::new(), Vec::new());
    loop {
        let leased = ablate_coordinator::platform::lease::lease(&pool, worker, 1, 1, 0, TTL)
            .await
            .unwrap();
        let Some(head) = leased.first() else { break };
        let unit: Vec<_> = leased
            .iter()
            .map(|t| (t.experiment == head.experiment, t.fuse_group))
            .collect();
        assert!(unit.iter().all(|u| u.0), "one experiment per unit: {unit:?}");
        if head.experiment == fused {
            assert!(unit.iter().all(|u| u.1 == Some(head.trial)), "{unit:?}");
            groups.push(leased.len());
        } else {
            plain.push((leased.len(), head.fuse_group));
        }
    }
    // Five trials, groups of at most four: the last runs as a group of one.
    assert_eq!(groups, [4, 1]);
    assert_eq!(plain, vec![(1, None); 6], "a sweep without fuse runs unfused");
}

/// What a researcher's read-only query can lock never stalls a searcher's decision: the
/// searchers decide under a row lock of a table the read-only role can't see, not under
/// the advisory lock any session may take on the same key.
#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn a_readers_locks_cannot_stall_a_searchers_decision(pool: PgPool) {
    let spec = r#"
name = "tpe-lock"
family = "train"
[base]
optimizer = "adam"
steps = 10
[sweep]
searcher = "tpe"
params.log2_lr = { range = [-10, -2], step = 1 }
[sweep.tpe]
trials = 6
n_startup = 2
"#;
    let (id, _) = submit::submit(&pool, spec, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    assert_eq!(count(&pool, "select count(*) from trials").await, 2, "the random start");
    // The reader holds what it can: the advisory lock on the experiment's key.
    let reader = pool.clone();
    let key = id.0;
    let held = tokio::spawn(async move {
        db::read_only_query(
            &reader,
            &format!("select pg_advisory_xact_lock(hashtextextended('{key}'::text, 0)), pg_sleep(30)"),
            Duration::from_secs(40),
        )
        .await
    });
    // Wait until the reader's own session holds it: other tests' sessions (and the test
    // harness, which creates databases under an advisory lock) take advisory locks too.
    loop {
        let held: i64 = sqlx::query_scalar(
            "select count(*) from pg_locks l join pg_stat_activity a using (pid)
             where l.locktype = 'advisory' and l.granted and a.datname = current_database()
               and a.pid <> pg_backend_pid() and a.query like '%pg_sleep(30)%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if held > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A trial finished: the searcher owes one proposal, and makes it at once.
    sqlx::query("update trials set state = 'succeeded', finished_at = now() where experiment_id = $1 and ordinal = 0")
        .bind(id.0)
        .execute(&pool)
        .await
        .unwrap();
    let decided = tokio::time::timeout(Duration::from_secs(10), async {
        let mut conn = pool.acquire().await.unwrap();
        ablate_coordinator::platform::searchers::top_up(&mut conn, id).await
    })
    .await
    .expect("the searcher's decision waited on the reader's lock")
    .unwrap();
    assert_eq!(decided, 1);
    assert_eq!(count(&pool, "select count(*) from trials").await, 3);
    // Nor can the reader lock the searchers' rows.
    for locking in [
        "select * from searcher_locks for update",
        "select * from ablate.experiments for update",
    ] {
        assert!(
            db::read_only_query(&pool, locking, Duration::from_secs(5))
                .await
                .is_err(),
            "`{locking}` was allowed"
        );
    }
    // The reader's query ends, so nothing of this test outlives it.
    let cancelled: Vec<bool> = sqlx::query_scalar(
        "select pg_cancel_backend(pid) from pg_stat_activity
         where datname = current_database() and pid <> pg_backend_pid() and query like '%pg_sleep(30)%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(cancelled, [true], "the reader's query was found and cancelled");
    assert!(held.await.unwrap().is_err(), "the reader's query was cancelled");
}

/// `submit --into`: ASHA's new trials get their bracket and first rung, and a tpe sweep
/// given a larger budget proposes the rest at once; points already held are not added.
#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn an_extension_joins_the_rungs_and_a_larger_tpe_budget_proposes_at_once(pool: PgPool) {
    let roots = ablate_experiments::nn::locations::default_roots();
    let limits = ablate_schema::Limits::default();
    let extend = |text: String, into| {
        let (pool, roots, limits) = (pool.clone(), roots.clone(), limits);
        async move {
            submit::submit_as(
                &pool,
                &submit::Submission {
                    text: &text,
                    format: SpecFormat::Toml,
                    limits: &limits,
                    data_roots: &roots,
                    caller: None,
                    code: None,
                    objects: None,
                    into,
                },
            )
            .await
        }
    };
    let finish_all = || async {
        sqlx::query("update trials set state = 'succeeded', finished_at = now() where state = 'pending'")
            .execute(&pool)
            .await
            .unwrap();
    };
    let asha = |seeds: &str| {
        format!(
            r#"
name = "asha-wider"
family = "train"
[base]
optimizer = "adam"
lr = 0.01
steps = 90
[sweep]
searcher = "asha"
params.seed = [{seeds}]
[sweep.asha]
min_steps = 10
max_steps = 90
reduction_factor = 3
"#
        )
    };
    let first = extend(asha("0, 1, 2"), None).await.unwrap();
    finish_all().await;
    let more = extend(asha("0, 1, 2, 3, 4"), Some(first.id)).await.unwrap();
    assert_eq!((more.planned, more.already_held), (2, 3));
    let new: Vec<(i32, Option<i32>, Option<i64>)> = sqlx::query_as(
        "select ordinal, bracket, pause_at from trials where experiment_id = $1 and state = 'pending' order by ordinal",
    )
    .bind(first.id.0)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(new, [(3, Some(0), Some(10)), (4, Some(0), Some(10))]);
    // While they run, another extension is refused and adds nothing; so is a retry.
    let refused = extend(asha("0, 1, 2, 3, 4, 5"), Some(first.id)).await.unwrap_err();
    assert!(refused.to_string().contains("is running"), "{refused}");
    assert_eq!(count(&pool, "select count(*) from trials").await, 5);
    let outcomes = ablate_coordinator::platform::experiments::outcomes(&[]).unwrap();
    let refused = ablate_coordinator::platform::experiments::retry(&pool, None, first.id, &outcomes)
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Conflict(_)), "{refused}");
    assert_eq!(
        count(&pool, "select count(*) from trials where state = 'pending'").await,
        2
    );

    let tpe = |budget: u32| {
        format!(
            r#"
name = "tpe-more"
family = "train"
[base]
optimizer = "adam"
steps = 10
[sweep]
searcher = "tpe"
params.log2_lr = {{ range = [-10, -2], step = 1 }}
[sweep.tpe]
trials = {budget}
n_startup = 2
seed = 3
"#
        )
    };
    let search = extend(tpe(4), None).await.unwrap();
    let of_search = |pool: PgPool, id: uuid::Uuid| async move {
        sqlx::query_scalar::<_, i64>("select count(*) from trials where experiment_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // Run the budget out: each finished trial makes the searcher propose the next.
    while of_search(pool.clone(), search.id.0).await < 4 {
        finish_all().await;
        let mut conn = pool.acquire().await.unwrap();
        ablate_coordinator::platform::searchers::top_up(&mut conn, search.id)
            .await
            .unwrap();
    }
    finish_all().await;
    // A smaller budget is refused, naming the field; a larger one proposes at once.
    let smaller = extend(tpe(3), Some(search.id)).await.unwrap_err();
    assert!(smaller.to_string().contains("sweep.tpe.trials"), "{smaller}");
    // The search keeps its startup's number in flight: two now, the last as one ends.
    let larger = extend(tpe(7), Some(search.id)).await.unwrap();
    assert_eq!((larger.planned, larger.already_held), (2, 2), "{larger:?}");
    assert_eq!(of_search(pool.clone(), search.id.0).await, 6);
    finish_all().await;
    let mut conn = pool.acquire().await.unwrap();
    ablate_coordinator::platform::searchers::top_up(&mut conn, search.id)
        .await
        .unwrap();
    assert_eq!(of_search(pool.clone(), search.id.0).await, 7);
}

async fn worker(pool: &PgPool, pool_name: Option<&str>) -> WorkerId {
    let id = WorkerId::new_random();
    db::register_worker(
        pool,
        &db::NewWorker {
            id,
            hostname: "test",
            devices: &["cpu:0".to_string()],
            pool: pool_name,
            labels: serde_json::json!({}),
            allow_commands: false,
        },
    )
    .await
    .unwrap();
    id
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn one_statement_deals_trials_to_several_workers_in_the_order_asked(pool: PgPool) {
    submit::submit(&pool, SPEC, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let (a, b, c) = (
        worker(&pool, None).await,
        worker(&pool, None).await,
        worker(&pool, None).await,
    );
    sqlx::query("update workers set draining_since = now() where id = $1")
        .bind(b.0)
        .execute(&pool)
        .await
        .unwrap();
    let dealt = db::lease_heads_many(&pool, &[(a, 2), (b, 2), (c, 3)], TTL)
        .await
        .unwrap();
    let counts: Vec<usize> = dealt.iter().map(|(_, heads)| heads.len()).collect();
    assert_eq!(counts, vec![2, 0, 3], "a draining worker gets none; the rest in order");
    let ordinals: Vec<i32> = sqlx::query_scalar("select ordinal from trials where state = 'running' order by ordinal")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ordinals, vec![0, 1, 2, 3, 4], "the trials in the experiment's order");
    for (worker, heads) in &dealt {
        for head in heads {
            let owner: uuid::Uuid = sqlx::query_scalar("select lease_owner from trials where id = $1")
                .bind(head.trial.0)
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(owner, worker.0, "each trial is held by the worker it was dealt to");
        }
    }
    let first: Vec<i32> = {
        let ids: Vec<uuid::Uuid> = dealt[0].1.iter().map(|h| h.trial.0).collect();
        sqlx::query_scalar("select ordinal from trials where id = any($1) order by ordinal")
            .bind(&ids)
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    assert_eq!(first, vec![0, 1], "the first worker asked is dealt first");
}

#[sqlx::test(migrator = "ablate_coordinator::db::MIGRATOR")]
async fn workers_asking_at_once_share_no_trial_and_a_pool_keeps_its_own(pool: PgPool) {
    let spec = SPEC.replace("params.seed = [0, 1, 2, 3, 4, 5]", "params.seed = { range = [0, 39] }");
    submit::submit(&pool, &spec, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let pooled = SPEC.replace("name = \"queue\"", "name = \"pooled\"") + "[resources]\npool = \"gpu\"\n";
    submit::submit(&pool, &pooled, SpecFormat::Toml, &Default::default())
        .await
        .unwrap();
    let lessor = ablate_coordinator::platform::lease::Lessor::spawn(pool.clone(), TTL);
    let mut workers = Vec::new();
    for i in 0..12 {
        workers.push(worker(&pool, (i % 4 == 0).then_some("gpu")).await);
    }
    let mut seen = std::collections::HashSet::new();
    let mut leased = 0;
    // Rounds of all twelve asking at once, until a round leases nothing.
    loop {
        let asks: Vec<_> = workers
            .iter()
            .map(|&w| {
                let lessor = lessor.clone();
                tokio::spawn(async move { (w, lessor.lease(w, 4, 1, 0).await.unwrap()) })
            })
            .collect();
        let before = leased;
        for ask in asks {
            let (w, trials) = ask.await.unwrap();
            assert!(trials.len() <= 4);
            for t in trials {
                assert!(seen.insert(t.trial), "trial {} leased twice", t.trial);
                let (owner, pool_of): (uuid::Uuid, Option<String>) = sqlx::query_as(
                    "select t.lease_owner, e.pool from trials t join experiments e on e.id = t.experiment_id where t.id = $1",
                )
                .bind(t.trial.0)
                .fetch_one(&pool)
                .await
                .unwrap();
                assert_eq!(owner, w.0);
                let worker_pool: Option<String> = sqlx::query_scalar("select pool from workers where id = $1")
                    .bind(w.0)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                if pool_of.is_some() {
                    assert_eq!(pool_of, worker_pool, "a pool's trials go to its workers only");
                }
                leased += 1;
            }
        }
        if leased == before {
            break;
        }
    }
    assert_eq!(leased, 46, "every trial of both experiments leased once");
}
