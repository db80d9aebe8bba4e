//! Telemetry seen from outside: a real Prometheus (Debian's `prometheus`,
//! started here on loopback) scrapes the coordinator's and a worker's
//! `/metrics` during a sweep, and PromQL through its HTTP API sees the sweep;
//! `ablate sql` shows what every attempt ran on, as the worker binary reports it.

mod harness;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{free_port, http_get, Guard, Stack, RESUME_SPEC};

/// The `prometheus` server: $ABLATE_PROMETHEUS_BIN, else Debian's (`cargo xtask test` installs it).
fn prometheus_bin() -> String {
    let bin = std::env::var("ABLATE_PROMETHEUS_BIN").unwrap_or_else(|_| "/usr/bin/prometheus".into());
    assert!(
        std::path::Path::new(&bin).exists(),
        "{bin} is missing: install Debian's prometheus (cargo xtask test does) or set ABLATE_PROMETHEUS_BIN"
    );
    bin
}

/// One PromQL instant query: the first result's value, if any.
fn query(prometheus: &str, promql: &str) -> Option<f64> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(prometheus, &format!("/api/v1/query?query={encoded}")).ok()?;
    assert_eq!(status, 200, "{promql}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_a_sweep_and_sql_shows_what_each_attempt_ran_on() {
    let bin = prometheus_bin();
    let mut stack = Stack::start(15.0).await;
    let http = format!("127.0.0.1:{}", free_port());
    stack.kill_coordinator();
    stack
        .coordinator_args
        .extend(["--http-listen".to_string(), http.clone()]);
    stack.start_coordinator().await;
    let worker_http = format!("127.0.0.1:{}", free_port());
    stack.start_worker_from(
        &harness::bin("ablate-worker"),
        "cpu:2",
        &["--metrics-listen", &worker_http],
    );
    until("the coordinator's /readyz", Duration::from_secs(30), || {
        http_get(&http, "/readyz").map(|(s, _)| s == 200).unwrap_or(false)
    });
    until("the worker's /healthz", Duration::from_secs(30), || {
        http_get(&worker_http, "/healthz")
            .map(|(s, _)| s == 200)
            .unwrap_or(false)
    });
    let (status, page) = http_get(&http, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        page.contains("# TYPE ablate_lease_duration_seconds histogram"),
        "{page}"
    );

    let prom = format!("127.0.0.1:{}", free_port());
    let config = stack.dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: coordinator\n    static_configs:\n      - targets: ['{http}']\n  - job_name: worker\n    static_configs:\n      - targets: ['{worker_http}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(stack.dir.join("prometheus.log")).unwrap();
    let mut command = Command::new(bin);
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            stack.dir.join("prometheus").display()
        ))
        .arg(format!("--web.listen-address={prom}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let _prometheus = Guard(Some(command.spawn().unwrap()));
    let prom_log = || std::fs::read_to_string(stack.dir.join("prometheus.log")).unwrap_or_default();
    until("Prometheus to be ready", Duration::from_secs(60), || {
        http_get(&prom, "/-/ready").map(|(s, _)| s == 200).unwrap_or(false)
    });
    until("both targets up", Duration::from_secs(30), || {
        query(&prom, "sum(up)") == Some(2.0)
    });

    let spec = RESUME_SPEC
        .replace("NAME", "scraped")
        .replace("steps = 300", "steps = 150")
        .replace("params.seed = [3]", "params.seed = [0, 1, 2, 3]");
    let experiment = stack.submit(&stack.write_spec("scraped.toml", &spec));
    stack.wait_finished(&experiment, Duration::from_secs(120)).await;
    // The last scrapes after the sweep.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let succeeded = query(&prom, "ablate_trials{state=\"succeeded\"}");
    assert_eq!(succeeded, Some(4.0), "{}", prom_log());
    let ingest = query(&prom, "rate(ablate_metric_points_total[1m])").unwrap_or(0.0);
    assert!(ingest > 0.0, "ingest rate {ingest}");
    let exits = query(&prom, "ablate_worker_trial_exits_total{outcome=\"succeeded\"}");
    assert_eq!(exits, Some(4.0));
    let leases = query(&prom, "ablate_lease_duration_seconds_count").unwrap_or(0.0);
    assert!(leases >= 1.0, "lease calls {leases}");
    let slots = query(&prom, "sum(ablate_worker_slots)");
    assert_eq!(slots, Some(2.0));
    let live = query(&prom, "ablate_workers{health=\"ok\"}");
    assert_eq!(live, Some(1.0));

    // Provenance: every attempt, in SQL, as the worker binary reports it.
    let reported = Command::new(harness::bin("ablate-worker"))
        .args(["provenance", "--devices", "cpu:2"])
        .output()
        .unwrap();
    assert!(reported.status.success(), "{}", harness::stderr(&reported));
    let reported: serde_json::Value = serde_json::from_slice(&reported.stdout).unwrap();
    let commit = reported["git_commit"].as_str().unwrap();
    assert_eq!(commit.len(), 40, "a git commit: {commit}");
    let libtorch = reported["libtorch_version"].as_str().unwrap();
    assert!(libtorch.starts_with("2.11"), "{libtorch}");
    let cpu = reported["device_names"]["cpu"].as_str().unwrap();
    let cuda = reported["cuda_version"].as_str().unwrap();
    assert!(
        cuda != "unknown",
        "the CUDA version libtorch was built for (or none): {cuda}"
    );
    let out = stack.ablate(&[
        "sql",
        "--format",
        "csv",
        "select ordinal, git_commit, libtorch_version, cuda_version, device, device_name, host, ablate_version \
         from ablate.trial_attempts where outcome = 'succeeded' order by ordinal",
    ]);
    assert!(out.status.success(), "{}", harness::text(&out));
    let csv = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<&str> = csv.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    for row in rows {
        assert!(row.contains(commit), "{row}");
        assert!(row.contains(libtorch), "{row}");
        assert!(row.contains(&format!(",{cuda},")), "{row}");
        assert!(row.contains(",cpu,"), "{row}");
        assert!(row.contains(cpu), "{row} lacks {cpu}");
        assert!(row.contains(reported["host"].as_str().unwrap()), "{row}");
        assert!(row.contains(reported["ablate_version"].as_str().unwrap()), "{row}");
    }
}
