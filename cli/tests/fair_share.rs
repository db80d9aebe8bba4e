//! Fair share, seen through the leases a worker gets: a sweep submitted after
//! a long one gets slots as they free up instead of waiting for it; two users
//! get half the slots each whatever their number of sweeps; a spec's
//! `priority` and a user's weight count; `max_concurrent` caps a sweep; a
//! sweep asking for a pool or labels runs only on matching workers, and says
//! why it waits while none is live; a trial of several GPUs goes only to a
//! worker with as many free, and gets them together in one process.

mod harness;

use std::collections::HashMap;
use std::process::Command;

use ablate_schema::proto::{self, workers_client::WorkersClient};
use harness::Stack;

type Client =
    WorkersClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ablate_schema::Bearer>>;

/// A worker registered by the test itself, leasing through gRPC.
struct Worker {
    client: Client,
    id: String,
    held: Vec<proto::LeasedTrial>,
}

impl Worker {
    async fn new(stack: &Stack) -> Worker {
        Worker::in_pool(stack, "", &[]).await
    }

    /// A worker of `pool` (empty: none) with these labels.
    async fn in_pool(stack: &Stack, pool: &str, labels: &[(&str, &str)]) -> Worker {
        Worker::registered(stack, pool, labels, &["cpu:0"]).await
    }

    /// A worker with these device slots.
    async fn registered(stack: &Stack, pool: &str, labels: &[(&str, &str)], devices: &[&str]) -> Worker {
        let mut client = WorkersClient::new(stack.channel().await);
        let id = uuid::Uuid::new_v4().to_string();
        client
            .register(proto::RegisterRequest {
                worker_id: id.clone(),
                hostname: "fair".into(),
                devices: devices.iter().map(|d| d.to_string()).collect(),
                pool: pool.into(),
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
        Worker {
            client,
            id,
            held: Vec::new(),
        }
    }

    /// Leases up to `n` trials; returns their experiments' ids in lease order.
    async fn lease(&mut self, n: u32) -> Vec<String> {
        self.lease_gpus(n, 1).await
    }

    /// Leases into `slots` free slots on `gpus` distinct free GPUs.
    async fn lease_gpus(&mut self, slots: u32, gpus: u32) -> Vec<String> {
        let leased = self
            .client
            .lease(proto::LeaseRequest {
                worker_id: self.id.clone(),
                max_trials: slots,
                free_gpus: gpus,
                slot_memory_bytes: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .trials;
        let experiments = leased.iter().map(|t| t.experiment_id.clone()).collect();
        self.held.extend(leased);
        experiments
    }

    /// Completes every trial it holds (the slots free up).
    async fn complete_all(&mut self) {
        for trial in std::mem::take(&mut self.held) {
            self.client
                .complete(proto::CompleteRequest::succeeded(trial))
                .await
                .unwrap();
        }
    }

    /// Completes the first trial it holds of experiment `of`.
    async fn complete_one(&mut self, of: &str) {
        let i = self
            .held
            .iter()
            .position(|t| t.experiment_id == of)
            .expect("a trial of it");
        let trial = self.held.remove(i);
        self.client
            .complete(proto::CompleteRequest::succeeded(trial))
            .await
            .unwrap();
    }
}

/// Asks for `gpus` GPUs per trial of a submitted experiment. Built-in families refuse
/// more than one at submission (they train on one device), so the lease and the daemon's
/// grant of several GPUs are tested on the stored experiment (the column the queue reads,
/// and the spec it shows).
async fn ask_gpus(stack: &Stack, experiment: &str, gpus: u32) {
    sqlx::query(
        "update experiments set gpus_per_trial = $2,
                spec = jsonb_set(spec, '{resources}', coalesce(spec->'resources', '{}') || jsonb_build_object('gpus_per_trial', $2::int))
         where id = $1::uuid",
    )
    .bind(experiment)
    .bind(gpus as i32)
    .execute(&stack.pool)
    .await
    .unwrap();
}

/// A sweep of `trials` trials; `extra` is TOML added to it (top-level keys or tables).
fn spec(name: &str, trials: usize, extra: &str) -> String {
    let text = harness::resume_spec(name, 0..trials as u32);
    // Top-level keys before the first table; tables after the last.
    if extra.starts_with('[') {
        format!("{text}\n{extra}\n")
    } else {
        format!("{extra}\n{text}")
    }
}

/// Submits as the user whose token is `token`; returns the experiment id.
fn submit_as(stack: &Stack, token: &str, name: &str, text: &str) -> String {
    let path = stack.write_spec(&format!("{name}.toml"), text);
    let out = Command::new(harness::bin("ablate"))
        .arg("submit")
        .arg(&path)
        .env("ABLATE_COORDINATOR", stack.addr())
        .env("ABLATE_TOKEN", token)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", harness::text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn researcher(stack: &Stack, name: &str) -> String {
    let out = stack.ablate(&["token", "create", "--role", "researcher", "--name", name]);
    assert!(out.status.success(), "{}", harness::text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn count(leased: &[String]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for e in leased {
        *counts.entry(e.as_str()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn a_later_small_sweep_gets_slots_as_they_free_instead_of_waiting() {
    let stack = Stack::start(60.0).await;
    let alice = researcher(&stack, "alice");
    let big = submit_as(&stack, &alice, "big", &spec("big", 100, ""));
    let mut worker = Worker::new(&stack).await;
    assert_eq!(
        worker.lease(4).await,
        vec![big.clone(); 4],
        "4 slots, all the long sweep's"
    );
    let small = submit_as(&stack, &alice, "small", &spec("small", 4, ""));
    // The first two slots that free up go to the small sweep (first come,
    // first served would have given it none until 100 trials had run) ...
    for _ in 0..2 {
        worker.complete_one(&big).await;
        assert_eq!(worker.lease(1).await, vec![small.clone()]);
    }
    // ... and from then on the two share the slots evenly.
    worker.complete_one(&big).await;
    assert_eq!(worker.lease(1).await, vec![big.clone()]);
    worker.complete_all().await;
    let leased = worker.lease(4).await;
    assert_eq!(count(&leased)[small.as_str()], 2, "{leased:?}");
    assert_eq!(count(&leased)[big.as_str()], 2, "{leased:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn users_share_slots_by_weight_and_sweeps_by_priority_and_cap() {
    let stack = Stack::start(60.0).await;
    let (alice, bob) = (researcher(&stack, "alice"), researcher(&stack, "bob"));
    // Alice submits three sweeps, Bob one: still half the slots each.
    let a: Vec<String> = (0..3)
        .map(|i| submit_as(&stack, &alice, &format!("a{i}"), &spec(&format!("a{i}"), 20, "")))
        .collect();
    let b = submit_as(&stack, &bob, "b", &spec("b", 20, ""));
    let mut worker = Worker::new(&stack).await;
    let leased = worker.lease(8).await;
    let counts = count(&leased);
    assert_eq!(counts[b.as_str()], 4, "{leased:?}");
    assert_eq!(
        a.iter()
            .map(|e| counts.get(e.as_str()).copied().unwrap_or(0))
            .sum::<usize>(),
        4
    );
    worker.complete_all().await;

    // An admin gives Bob weight 3: three slots of his to each of Alice's.
    let out = stack.ablate(&["token", "weight", "bob", "3"]);
    assert!(out.status.success(), "{}", harness::text(&out));
    let leased = worker.lease(8).await;
    assert_eq!(count(&leased)[b.as_str()], 6, "{leased:?}");
    worker.complete_all().await;
    for (args, says) in [(["bob", "0"], "above 0"), (["carol", "2"], "no token named `carol`")] {
        let out = stack.ablate(&["token", "weight", args[0], args[1]]);
        assert!(!out.status.success());
        assert!(harness::text(&out).contains(says), "{}", harness::text(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn within_a_user_priority_weighs_and_max_concurrent_caps() {
    let stack = Stack::start(60.0).await;
    let carol = researcher(&stack, "carol");
    let low = submit_as(&stack, &carol, "low", &spec("low", 20, ""));
    let high = submit_as(&stack, &carol, "high", &spec("high", 20, "priority = 3"));
    let capped = submit_as(
        &stack,
        &carol,
        "capped",
        &spec("capped", 20, "[resources]\nmax_concurrent = 1"),
    );
    let mut worker = Worker::new(&stack).await;
    let leased = worker.lease(9).await;
    let counts = count(&leased);
    assert_eq!(counts[capped.as_str()], 1, "max_concurrent = 1: {leased:?}");
    // Priority 3 gets three slots to priority 1's one.
    assert_eq!((counts[high.as_str()], counts[low.as_str()]), (6, 2), "{leased:?}");
    // The cap holds while its trial runs, and frees with it.
    assert!(!worker.lease(9).await.contains(&capped));
    worker.complete_one(&capped).await;
    assert!(worker.lease(9).await.contains(&capped));

    // Bad values are refused with the field's path.
    for (extra, path) in [
        ("priority = 0", "priority"),
        ("[resources]\nmax_concurrent = 0", "resources.max_concurrent"),
    ] {
        let out = stack.ablate(&[
            "submit",
            &stack.write_spec("bad.toml", &spec("bad", 2, extra)).to_string_lossy(),
        ]);
        assert!(!out.status.success());
        assert!(harness::text(&out).contains(path), "{}", harness::text(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_asking_for_a_pool_runs_only_there_and_says_why_it_waits() {
    let stack = Stack::start(60.0).await;
    let pooled = stack.submit(&stack.write_spec("pooled.toml", &spec("pooled", 4, "[resources]\npool = \"a100\"")));
    let labelled = stack.submit(&stack.write_spec(
        "labelled.toml",
        &spec("labelled", 2, "[resources]\nlabels = { zone = \"b\", disk = \"nvme\" }"),
    ));
    let status = |id: &str| harness::text(&stack.ablate(&["status", id]));
    // No worker at all, then workers of other pools and labels: nothing is leased, and status says why.
    assert!(
        status(&pooled).contains("waiting: no live worker in pool `a100`"),
        "{}",
        status(&pooled)
    );
    let mut other = Worker::in_pool(&stack, "v100", &[("zone", "b")]).await;
    assert!(other.lease(8).await.is_empty());
    assert!(status(&pooled).contains("waiting: no live worker in pool `a100`"));
    assert!(
        status(&labelled).contains("with labels disk=nvme,zone=b"),
        "{}",
        status(&labelled)
    );
    let list = harness::text(&stack.ablate(&["status"]));
    assert!(list.contains("waiting: no live worker in pool `a100`"), "{list}");
    // The pool's worker leases its trials; the waiting line goes.
    let mut a100 = Worker::in_pool(&stack, "a100", &[]).await;
    assert_eq!(a100.lease(8).await, vec![pooled.clone(); 4]);
    assert!(!status(&pooled).contains("waiting"), "{}", status(&pooled));
    // All the labels asked for, and more, match.
    let mut labels = Worker::in_pool(&stack, "", &[("zone", "b"), ("disk", "nvme"), ("rack", "7")]).await;
    assert_eq!(labels.lease(8).await, vec![labelled.clone(); 2]);
    // A sweep that asks for nothing runs anywhere, a pooled worker included.
    let open = stack.submit(&stack.write_spec("open.toml", &spec("open", 1, "")));
    assert_eq!(other.lease(8).await, vec![open]);
    let workers = harness::text(&stack.ablate(&["workers"]));
    assert!(
        workers.contains("v100 (zone=b)") && workers.contains("a100"),
        "{workers}"
    );
    // Bad input is refused with what to fix.
    let out = stack.ablate(&[
        "submit",
        &stack
            .write_spec("bad.toml", &spec("bad", 1, "[resources]\npool = \"\""))
            .to_string_lossy(),
    ]);
    assert!(
        !out.status.success() && harness::text(&out).contains("resources.pool"),
        "{}",
        harness::text(&out)
    );
    let bad = Command::new(harness::bin("ablate-worker"))
        .args(["daemon", "--label", "nokey"])
        .output()
        .unwrap();
    assert!(
        !bad.status.success() && harness::text(&bad).contains("expected KEY=VALUE"),
        "{}",
        harness::text(&bad)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trial_of_two_gpus_is_leased_only_with_two_free_and_says_why_it_waits() {
    let stack = Stack::start(60.0).await;
    let pair = stack.submit(&stack.write_spec("pair.toml", &spec("pair", 3, "")));
    ask_gpus(&stack, &pair, 2).await;
    let status = || harness::text(&stack.ablate(&["status", &pair]));
    // A worker of one GPU (however many slots share it) never gets it, and status says why.
    let mut one = Worker::registered(&stack, "", &[], &["cuda:0#0", "cuda:0#1"]).await;
    assert!(one.lease_gpus(2, 1).await.is_empty());
    assert!(
        status()
            .contains("waiting: its trials need 2 GPUs each (resources.gpus_per_trial); the largest live worker has 1"),
        "{}",
        status()
    );
    // Neither does a CPU worker.
    assert!(Worker::new(&stack).await.lease_gpus(4, 0).await.is_empty());
    // Three free slots on three GPUs hold one trial of two, not two.
    let mut three = Worker::registered(&stack, "", &[], &["cuda:0", "cuda:1", "cuda:2"]).await;
    assert_eq!(three.lease_gpus(3, 3).await, vec![pair.clone()]);
    assert!(three.held.iter().all(|t| t.gpus == 2), "{:?}", three.held);
    assert!(!status().contains("waiting"), "{}", status());
    // Four slots hold the other two.
    let mut four = Worker::registered(&stack, "", &[], &["cuda:0", "cuda:1", "cuda:2", "cuda:3"]).await;
    assert_eq!(four.lease_gpus(4, 4).await, vec![pair.clone(); 2]);
    // Out-of-range values are refused with the field's path.
    for bad in ["0", "17", "2"] {
        let out = stack.ablate(&[
            "submit",
            &stack
                .write_spec(
                    "bad.toml",
                    &spec("bad", 1, &format!("[resources]\ngpus_per_trial = {bad}")),
                )
                .to_string_lossy(),
        ]);
        assert!(
            !out.status.success() && harness::text(&out).contains("resources.gpus_per_trial"),
            "{}",
            harness::text(&out)
        );
    }
}

/// The `CUDA_VISIBLE_DEVICES` a process was started with, if any.
fn visible_devices(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("CUDA_VISIBLE_DEVICES=").map(str::to_string))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_runs_a_trial_of_two_gpus_in_one_process_that_sees_just_them() {
    let mut stack = Stack::start(60.0).await;
    // Four granted GPUs, as Slurm would name them, stood in for by the CPU.
    stack.env = vec![
        ("CUDA_VISIBLE_DEVICES".into(), "4,5,6,7".into()),
        ("ABLATE_GPU_STAND_IN".into(), "cpu".into()),
    ];
    let pair = stack.submit(&stack.write_spec("pair.toml", &spec("pair", 4, "")));
    ask_gpus(&stack, &pair, 2).await;
    let worker = stack.start_worker("slurm");
    // While trials run: at most two processes, each seeing two granted GPUs, none shared.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let mut seen = 0;
    while stack
        .scalar_i64(&format!(
            "select count(*) from trials where experiment_id = '{pair}' and state in ('pending', 'running')"
        ))
        .await
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep did not finish:\n{}",
            stack.logs()
        );
        let granted: Vec<String> = stack
            .trial_pids(worker)
            .into_iter()
            .filter_map(visible_devices)
            .collect();
        assert!(granted.len() <= 2, "{granted:?}");
        let mut gpus: Vec<&str> = granted.iter().flat_map(|g| g.split(',')).collect();
        assert!(granted.iter().all(|g| g.split(',').count() == 2), "{granted:?}");
        gpus.sort_unstable();
        let all = gpus.len();
        gpus.dedup();
        assert_eq!(gpus.len(), all, "a GPU in two trials at once: {granted:?}");
        assert!(gpus.iter().all(|g| ["4", "5", "6", "7"].contains(g)), "{granted:?}");
        seen = seen.max(granted.len());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(seen >= 1, "no trial process seen with its GPUs");
    assert_eq!(
        stack
            .scalar_i64(&format!(
                "select count(*) from trials where experiment_id = '{pair}' and state = 'succeeded'"
            ))
            .await,
        4,
        "{}",
        stack.logs()
    );
    // Each attempt says what it ran on.
    assert_eq!(
        stack
            .scalar_i64(&format!(
                "select count(*) from trial_attempts a join trials t on t.id = a.trial_id
                 where t.experiment_id = '{pair}' and a.provenance->>'gpus' ~ '^cuda:[0-3][+]cuda:[0-3]$'
                   and a.provenance->>'cuda_visible_devices' ~ '^[4-7],[4-7]$'"
            ))
            .await,
        4
    );
}
