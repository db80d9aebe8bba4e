//! The embedded default as a newcomer meets it: `ablate up` from a private
//! (mode 700) directory, twice, then `ablate down` after its process was
//! killed. Real PostgreSQL binaries, real processes.

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use harness::{bin, free_port, text};

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

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&needle))
                .unwrap_or(false)
        })
        .collect()
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
    let workers = processes_mentioning(&worker_dir);
    assert_eq!(workers.len(), 1, "one worker daemon: {workers:?}");
    // SAFETY: signalling the worker daemon our `ablate up` started.
    unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ablate(&config, &["--coordinator", &addr, "workers"]);
        let registered = text(&out).lines().filter(|l| l.contains("cpu:0")).count();
        let restarted = processes_mentioning(&worker_dir);
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
        let left: Vec<u32> = [state.as_path(), cluster.as_path()]
            .iter()
            .flat_map(|p| processes_mentioning(p))
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
