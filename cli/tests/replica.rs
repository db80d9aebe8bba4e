//! Researchers' reads on a real streaming replica: a primary PostgreSQL and a replica
//! made from it by `pg_basebackup`, both started by the test. `ablate sql`, reports
//! and the dashboard are answered from the replica while the primary takes leases and
//! metrics; with the replica stopped, leasing and ingest go on and the reader calls
//! fail with a message that names the replica.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use harness::{free_port, http_request, spec_path, stderr, text, Stack};

/// The newest PostgreSQL server binaries installed (Debian's layout).
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries under /usr/lib/postgresql; `cargo xtask test` installs them")
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_basebackup").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().expect("initdb and pg_basebackup").1
}

/// Runs a PostgreSQL program: as the `postgres` user when this test runs as root
/// (the server refuses root), else as this user.
fn pg(program: &str, args: &[&str]) -> Output {
    let exe = pg_bin().join(program);
    // SAFETY: geteuid has no preconditions.
    let out = if unsafe { libc::geteuid() } == 0 {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&exe)
            .args(args)
            .output()
    } else {
        Command::new(&exe).args(args).output()
    }
    .unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
    out
}

/// A PostgreSQL server in a folder of its own, stopped when dropped.
struct Server {
    dir: PathBuf,
    port: u16,
}

impl Server {
    fn start(&self) {
        let log = self.dir.with_extension("log");
        pg(
            "pg_ctl",
            &[
                "-D",
                &self.dir.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    fn stop(&self) {
        pg(
            "pg_ctl",
            &["-D", &self.dir.to_string_lossy(), "-m", "immediate", "-w", "stop"],
        );
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn settings(&self, lines: &str) {
        let conf = self.dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(lines);
        std::fs::write(conf, text).unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join("pg_ctl"))
            .args(["-D", &self.dir.to_string_lossy(), "-m", "immediate", "stop"])
            .output();
        let _ = Command::new(pg_bin().join("pg_ctl"))
            .args(["-D", &self.dir.to_string_lossy(), "-m", "immediate", "stop"])
            .output();
    }
}

/// A primary with replication open to loopback, and a streaming replica of it.
fn primary_and_replica(root: &Path) -> (Server, Server) {
    std::fs::create_dir_all(root).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let owned = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(root)
            .status()
            .unwrap();
        assert!(owned.success());
    }
    let primary = Server {
        dir: root.join("primary"),
        port: free_port(),
    };
    pg(
        "initdb",
        &[
            "-D",
            &primary.dir.to_string_lossy(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ],
    );
    primary.settings(&format!(
        "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = replica\n\
         max_wal_senders = 4\nfsync = off\n",
        primary.port,
        root.display()
    ));
    let hba = primary.dir.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).unwrap();
    rules.push_str("\nhost replication all 127.0.0.1/32 trust\n");
    std::fs::write(&hba, rules).unwrap();
    primary.start();
    let replica = Server {
        dir: root.join("replica"),
        port: free_port(),
    };
    pg(
        "pg_basebackup",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
            &replica.dir.to_string_lossy(),
            "-R",
            "-X",
            "stream",
        ],
    );
    replica.settings(&format!("\nport = {}\nhot_standby = on\n", replica.port));
    replica.start();
    (primary, replica)
}

/// `ablate sql QUERY --format csv`'s lines, or its error.
fn sql(stack: &Stack, query: &str) -> Result<Vec<String>, String> {
    let out = stack.ablate(&["sql", query, "--format", "csv"]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect())
    } else {
        Err(stderr(&out))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readers_are_answered_by_the_replica_and_its_loss_stops_no_lease_or_metric() {
    let root = std::env::temp_dir().join(format!("ablate-replica-{}", uuid::Uuid::new_v4().simple()));
    let (primary, replica) = primary_and_replica(&root);
    let mut stack = Stack::start_on(&primary.url("postgres"), 5.0).await;
    // The stack's database, as the replica serves it.
    let database = stack.db_url.rsplit('/').next().unwrap().to_string();
    let reader_url = replica.url(&database);
    stack
        .coordinator_args
        .extend(["--reader-database-url".to_string(), reader_url.clone()]);
    let http = stack.serve_http().await;
    stack.start_worker("cpu:2");

    // A sweep that runs for a while: the primary leases and ingests while readers read.
    let experiment = stack.ablate(&[
        "submit",
        &spec_path("quickstart.toml").to_string_lossy(),
        "--set",
        "base.steps=400",
        "--set",
        "base.step_delay_ms=10",
    ]);
    assert!(experiment.status.success(), "{}", text(&experiment));
    let experiment = String::from_utf8_lossy(&experiment.stdout).trim().to_string();
    stack
        .wait_for(
            &format!("select count(*) > 0 from ablate.metric_series where experiment_id = '{experiment}'"),
            Duration::from_secs(60),
        )
        .await;
    // `ablate sql` runs on the replica: it is in recovery, and it sees the sweep.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = sql(
            &stack,
            &format!(
                "select pg_is_in_recovery(), count(*) from ablate.trial_results where experiment_id = '{experiment}'"
            ),
        )
        .unwrap();
        if answer == ["true,12"] {
            break;
        }
        assert!(Instant::now() < deadline, "the replica's answer: {answer:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The reader login the coordinator hands out reaches the replica too.
    let out = stack.ablate(&["db", "reader-url"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(":{}/", replica.port)),
        "{}",
        text(&out)
    );
    // The dashboard's reads: answered while the replica is up.
    let token = format!("Bearer {}", stack.admin_token);
    let auth = [("Authorization", token.as_str())];
    let (status, _, body) = http_request(&http, &format!("/api/v1/experiments/{experiment}"), &auth).unwrap();
    assert_eq!(status, 200, "{body}");

    // The replica stops mid-sweep: reads fail naming it; leases and metrics go on.
    let before: i64 = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.metric_series where experiment_id = '{experiment}'"
        ))
        .await;
    replica.stop();
    let failed = sql(&stack, "select 1").unwrap_err();
    assert!(
        failed.contains(&format!("the replica at 127.0.0.1:{}", replica.port)),
        "{failed}"
    );
    let report = stack.ablate(&["report", &experiment]);
    assert!(
        !report.status.success() && stderr(&report).contains("replica"),
        "{}",
        text(&report)
    );
    let (status, _, body) = http_request(&http, &format!("/api/v1/experiments/{experiment}/trials"), &auth).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("the replica at 127.0.0.1:{}", replica.port)),
        "{body}"
    );
    stack.wait_finished(&experiment, Duration::from_secs(180)).await;
    let (succeeded, points): (i64, i64) = (
        stack
            .scalar_i64(&format!(
                "select count(*) from trials where experiment_id = '{experiment}' and state = 'succeeded'"
            ))
            .await,
        stack
            .scalar_i64(&format!(
                "select count(*) from ablate.metric_series where experiment_id = '{experiment}'"
            ))
            .await,
    );
    assert_eq!(succeeded, 12, "{}", stack.logs());
    assert!(
        points > before,
        "ingest went on: {points} points, {before} before the replica stopped"
    );
    // Status reads the primary: it answers with the replica down.
    let status = stack.ablate(&["status", &experiment]);
    assert!(
        status.status.success() && text(&status).contains("succeeded"),
        "{}",
        text(&status)
    );
    drop(stack);
    drop(replica);
    drop(primary);
    let _ = std::fs::remove_dir_all(&root);
}
