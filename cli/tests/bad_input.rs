//! One user's bad input or heavy queries stay theirs: limits refuse at once,
//! nothing panics on what users type, and researchers' SQL never takes the
//! workers' connections. Real coordinator, worker and PostgreSQL.

mod harness;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{bin, stderr, Stack};

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

const BASE: &str = r#"
name = "NAME"
family = "train"
[base]
optimizer = "adam"
log2_lr = -7
width = 32
steps = STEPS
step_delay_ms = DELAY
[sweep]
searcher = "grid"
SWEEP
"#;

fn spec(name: &str, steps: u32, delay: u32, sweep: &str) -> String {
    BASE.replace("NAME", name)
        .replace("STEPS", &steps.to_string())
        .replace("DELAY", &delay.to_string())
        .replace("SWEEP", sweep)
}

#[tokio::test(flavor = "multi_thread")]
async fn specs_over_the_limits_are_refused_at_once_and_everyone_keeps_being_served() {
    let stack = Stack::start(15.0).await;
    let pid = stack.coordinator_pid().unwrap();
    let cases = [
        (
            spec("huge", 10, 0, "params.width = { range = [1, 100000000], step = 1 }"),
            "sweep.params.width",
        ),
        (spec(&"n".repeat(200_000), 10, 0, "params.seed = [0]"), "name"),
        (spec("nul\\u0000name", 10, 0, "params.seed = [0]"), "name"),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let path = stack.write_spec(&format!("bad-{i}.toml"), text);
        let started = Instant::now();
        let out = stack.ablate(&["submit", &path.to_string_lossy()]);
        assert!(!out.status.success(), "case {i} was accepted");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "case {i} took {:?}",
            started.elapsed()
        );
        assert!(
            stderr(&out).contains(&format!("{field}:")),
            "case {i}: the refusal names {field}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    let resident = rss(pid);
    assert!(resident < 300 << 20, "coordinator resident memory {resident} bytes");
    assert_eq!(stack.scalar_i64("select count(*) from experiments").await, 0);

    // A long name that fits, and a table that must print it.
    let long_name = "l".repeat(200);
    let path = stack.write_spec("long.toml", &spec(&long_name, 5, 0, "params.seed = [0, 1]"));
    stack.submit(&path);
    let out = stack.ablate(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains('…'), "the name is cut with an ellipsis:\n{text}");
    assert!(stack.logs().find("panicked").is_none(), "{}", stack.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_long_sql_queries_starve_neither_leases_nor_status() {
    let mut stack = Stack::start(4.0).await;
    stack.start_worker("cpu:2");
    let path = stack.write_spec("steady.toml", &spec("steady", 150, 40, "params.seed = [0, 1, 2, 3]"));
    let experiment = stack.submit(&path);
    stack
        .wait_for(
            "select count(*) >= 2 from trials where state = 'running'",
            Duration::from_secs(60),
        )
        .await;
    let queries: Vec<_> = (0..50)
        .map(|_| {
            Command::new(bin("ablate"))
                .args(["sql", "select pg_sleep(6)"])
                .env("ABLATE_COORDINATOR", stack.addr())
                .env("ABLATE_TOKEN", &stack.admin_token)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..3 {
        let started = Instant::now();
        let out = stack.ablate(&["status", &experiment]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "status took {:?} while queries ran",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (mut ran, mut busy) = (0, 0);
    for child in queries {
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            ran += 1;
        } else if stderr(&out).contains("busy") {
            busy += 1;
        } else {
            panic!("a query failed otherwise: {}", stderr(&out));
        }
    }
    assert!(ran >= 1 && busy >= 1, "{ran} ran, {busy} were told to retry");
    stack.wait_finished(&experiment, Duration::from_secs(120)).await;
    let attempts = stack
        .scalar_i64(&format!(
            "select max(attempt)::bigint from ablate.trial_results where experiment_id = '{experiment}'"
        ))
        .await;
    assert_eq!(attempts, 1, "no trial lost its lease:\n{}", stack.logs());
    let succeeded = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_results where experiment_id = '{experiment}' and state = 'succeeded'"
        ))
        .await;
    assert_eq!(succeeded, 4);

    let out = stack.ablate(&["sql", "select pg_advisory_lock(42)"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stack
            .scalar_i64(
                "select count(*) from pg_locks where locktype = 'advisory' and objid = 42 \
                 and database = (select oid from pg_database where datname = current_database())"
            )
            .await,
        0,
        "the lock went with the query"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn data_outside_the_roots_is_refused_at_submit_and_on_the_worker() {
    let mut stack = Stack::start(15.0).await;
    let root = stack.dir.join("data");
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
    std::fs::create_dir_all(root.join("later")).unwrap();
    let root_arg = root.to_string_lossy().into_owned();
    stack.kill_coordinator();
    stack.coordinator_args = vec!["--data-root".into(), root_arg.clone()];
    stack.start_coordinator().await;
    let text_spec = |name: &str, dir: &str| {
        format!(
            "name = \"{name}\"\nfamily = \"train\"\n[base]\nmodel = \"gpt\"\ndataset = \"text\"\ndata_dir = \"{dir}\"\n\
             optimizer = \"adam\"\nlr = 0.01\nsteps = 5\nwidth = 16\nheads = 2\ncontext = 16\n\
             [sweep]\nsearcher = \"grid\"\nparams.seed = [0]\n"
        )
    };
    let escape = root.join("escape").to_string_lossy().into_owned();
    for (i, dir) in ["/etc", "../../etc", &format!("{root_arg}/../elsewhere"), &escape]
        .iter()
        .enumerate()
    {
        let path = stack.write_spec(&format!("outside-{i}.toml"), &text_spec("outside", dir));
        let out = stack.ablate(&["submit", &path.to_string_lossy()]);
        assert!(!out.status.success(), "{dir} was accepted");
        let said = stderr(&out);
        assert!(said.contains("base.data_dir:") && said.contains(&root_arg), "{said}");
    }
    assert_eq!(stack.scalar_i64("select count(*) from experiments").await, 0);
    // A folder that becomes a link out of the root after the submit: the worker follows it and refuses.
    let later = root.join("later");
    let path = stack.write_spec("link.toml", &text_spec("link", &later.to_string_lossy()));
    let experiment = stack.submit(&path);
    std::fs::remove_dir(&later).unwrap();
    std::os::unix::fs::symlink("/etc", &later).unwrap();
    stack.start_worker_from(&bin("ablate-worker"), "cpu:1", &["--data-root", &root_arg]);
    stack.wait_finished(&experiment, Duration::from_secs(60)).await;
    let error: String = sqlx::query_scalar("select error from trials")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(
        error.contains("through a link") && error.contains("data_dir"),
        "{error}"
    );
}
