//! The embedded default as a newcomer meets it: `ablate up` from a private
//! (mode 700) directory, twice, then `ablate down` after its process was
//! killed. Real PostgreSQL binaries, real processes.

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use harness::{bin, free_port, pids_of, text};

/// Runs `ablate` with a configuration folder of the test's own (where `ablate up` keeps its token).
fn ablate(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("ablate"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env("XDG_CONFIG_HOME", config)
        .env_remove("DATABASE_URL")
        .env_remove("ABLATE_TOKEN")
        .output()
        .unwrap()
}

/// Where the stack keeps its PostgreSQL data: `<state>/pg`, or the folder `pg-location` names.
fn cluster_root(state: &Path) -> PathBuf {
    match std::fs::read_to_string(state.join("pg-location")) {
        Ok(text) => PathBuf::from(text.lines().next().unwrap()),
        Err(_) => state.join("pg"),
    }
}

#[test]
fn the_embedded_stack_starts_in_a_private_directory_once_and_stops_entirely() {
    let home = std::env::temp_dir().join(format!("ablate-private-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let state = home.join(".ablate");
    let config = home.join("config");
    let state_arg = state.to_string_lossy().into_owned();
    let (pg_port, port) = (free_port().to_string(), free_port());
    let listen = format!("127.0.0.1:{port}");
    let addr = format!("http://{listen}");
    let http = format!("127.0.0.1:{}", free_port());
    let up = [
        "up",
        "--detach",
        "--state-dir",
        &state_arg,
        "--pg-port",
        &pg_port,
        "--listen",
        &listen,
        "--http-listen",
        &http,
        "--devices",
        "cpu:1",
    ];
    let out = ablate(&config, &up);
    assert!(out.status.success(), "{}", text(&out));
    let first: i32 = std::fs::read_to_string(state.join("up.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let out = ablate(&config, &up);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("already up"), "{}", text(&out));
    let second: i32 = std::fs::read_to_string(state.join("up.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(first, second, "the second `ablate up` started nothing");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ablate(&config, &["--coordinator", &addr, "workers"]);
        let workers = text(&out).lines().filter(|l| l.contains("cpu:0")).count();
        if workers == 1 {
            break;
        }
        assert!(workers <= 1, "one worker expected:\n{}", text(&out));
        assert!(Instant::now() < deadline, "no worker registered:\n{}", text(&out));
        std::thread::sleep(Duration::from_millis(250));
    }

    // Tokens are on: without the credentials `ablate up` kept, the coordinator refuses.
    let out = ablate(&home.join("elsewhere"), &["--coordinator", &addr, "workers"]);
    assert!(!out.status.success(), "a call without a token was served");
    assert!(text(&out).contains("no token"), "{}", text(&out));

    // The worker dies: `ablate up` starts another.
    let worker_dir = state.join("worker");
    let workers = pids_of(&worker_dir.to_string_lossy());
    assert_eq!(workers.len(), 1, "one worker daemon: {workers:?}");
    // SAFETY: signalling the worker daemon our `ablate up` started.
    unsafe { libc::kill(workers[0], libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ablate(&config, &["--coordinator", &addr, "workers"]);
        let registered = text(&out).lines().filter(|l| l.contains("cpu:0")).count();
        let restarted = pids_of(&worker_dir.to_string_lossy());
        if registered == 2 && restarted.len() == 1 && restarted[0] != workers[0] {
            break;
        }
        assert!(Instant::now() < deadline, "no worker started again:\n{}", text(&out));
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = std::fs::read_to_string(state.join("up.log")).unwrap();
    assert!(log.contains("starting it again"), "{log}");

    // The stack's process dies hard (as under the OOM killer); `ablate down` still stops everything.
    // SAFETY: signalling the pid our `ablate up` wrote.
    unsafe { libc::kill(first, libc::SIGKILL) };
    let out = ablate(&config, &["down", "--state-dir", &state_arg]);
    assert!(out.status.success(), "{}", text(&out));
    let cluster = cluster_root(&state);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<i32> = [state.as_path(), cluster.as_path()]
            .iter()
            .flat_map(|p| pids_of(&p.to_string_lossy()))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes of the stack left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    if cluster.starts_with("/var/lib/ablate") {
        std::fs::remove_dir_all(&cluster).ok();
    }
    // Tokens were on: the CLI found the admin token `ablate up` kept for it.
    let credentials = std::fs::read_to_string(config.join("ablate/credentials.toml")).unwrap();
    assert!(credentials.contains(&addr), "{credentials}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(config.join("ablate/credentials.toml"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    std::fs::remove_dir_all(&home).ok();
}

/// A free port whose successor is free too (a stack's gRPC and, by default, HTTP ports).
fn free_pair() -> u16 {
    loop {
        let port = free_port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// The stack's processes (under its state directory or its PostgreSQL cluster) still running.
fn stack_processes(state: &Path) -> Vec<i32> {
    [state.to_path_buf(), cluster_root(state)]
        .iter()
        .flat_map(|p| pids_of(&p.to_string_lossy()))
        .collect()
}

#[test]
fn two_stacks_share_a_host_and_a_failed_start_says_why_at_once_and_leaves_nothing_running() {
    let home = std::env::temp_dir().join(format!("ablate-two-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&home).unwrap();
    let config = home.join("config");
    let up = |state: &Path, listen: &str, pg_port: &str, extra: &[&str]| {
        let state = state.to_string_lossy().into_owned();
        let mut args = vec![
            "up",
            "--detach",
            "--state-dir",
            &state,
            "--listen",
            listen,
            "--pg-port",
            pg_port,
            "--devices",
            "cpu:1",
        ];
        args.extend_from_slice(extra);
        ablate(&config, &args)
    };
    let (a, b) = (home.join("a"), home.join("b"));
    let (listen_a, listen_b) = (
        format!("127.0.0.1:{}", free_pair()),
        format!("127.0.0.1:{}", free_pair()),
    );
    let (pg_a, pg_b) = (free_port().to_string(), free_port().to_string());
    // Two stacks, each given only --listen and --pg-port: their HTTP ports follow their own.
    let out = up(&a, &listen_a, &pg_a, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let out = up(&b, &listen_b, &pg_b, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let port_b: u16 = listen_b.rsplit(':').next().unwrap().parse().unwrap();
    let (status, _) = harness::http_get(&format!("127.0.0.1:{}", port_b + 1), "/healthz").unwrap();
    assert_eq!(status, 200, "stack b's HTTP listener is the port after its --listen");

    // A third on a's address is refused before anything starts, naming the flag.
    let c = home.join("c");
    let out = up(&c, &listen_a, &free_port().to_string(), &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is taken") && text(&out).contains("--listen"),
        "{}",
        text(&out)
    );
    assert!(!c.join("up.pid").exists() && stack_processes(&c).is_empty());

    // b's database comes from a newer ablate (a migration this one lacks): its coordinator
    // exits at once, `up` says so in its words, and stops the PostgreSQL it started.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:{pg_b}/ablate"))
            .await
            .unwrap();
        sqlx::query(
            "insert into _sqlx_migrations (version, description, success, checksum, execution_time)
             values (99999999999999, 'from a newer ablate', true, '\\x00', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
    });
    let out = ablate(&config, &["down", "--state-dir", &b.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out));
    let started = Instant::now();
    let out = up(&b, &listen_b, &pg_b, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("before it came up") && text(&out).contains("99999999999999"),
        "{}",
        text(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "it waited {:?} for a stack that had exited",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stack_processes(&b).is_empty() {
        assert!(Instant::now() < deadline, "left running: {:?}", stack_processes(&b));
        std::thread::sleep(Duration::from_millis(250));
    }

    let out = ablate(&config, &["down", "--state-dir", &a.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out));
    for state in [&a, &b] {
        let cluster = cluster_root(state);
        if cluster.starts_with("/var/lib/ablate") {
            std::fs::remove_dir_all(&cluster).ok();
        }
    }
    std::fs::remove_dir_all(&home).ok();
}
