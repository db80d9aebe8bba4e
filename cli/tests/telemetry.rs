//! Telemetry seen from outside: a real Prometheus (Debian's `prometheus`,
//! started here on loopback) scrapes the coordinator's and a worker's
//! `/metrics` during a sweep, and PromQL through its HTTP API sees the sweep;
//! `ablate sql` shows what every attempt ran on, as the worker binary reports it;
//! every query of the Grafana dashboards in `dashboards/` runs against that
//! sweep as the read-only role, and every PromQL one against that Prometheus.

mod harness;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{free_port, http_get, Guard, Stack};

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
    let http = stack.serve_http().await;
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

    let spec = harness::resume_spec("scraped", 0..4).replace("steps = 300", "steps = 150");
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

    // The dashboards, against this finished sweep and this Prometheus.
    let pages = [&http, &worker_http]
        .iter()
        .map(|addr| http_get(addr, "/metrics").unwrap().1)
        .collect::<Vec<_>>()
        .join("\n");
    check_dashboards(&stack.pool, &experiment, &prom, &pages).await;
}

/// Grafana's SQL macros, expanded as its PostgreSQL data source does.
fn expand_macros(sql: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(at) = rest.find("$__") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 3..];
        let name_len = tail.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(tail.len());
        let name = &tail[..name_len];
        let after = &tail[name_len..];
        assert!(after.starts_with('('), "macro $__{name} without arguments in {sql}");
        let mut depth = 0;
        let close = after
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map(|(i, _)| i)
            .expect("balanced parentheses");
        let args: Vec<&str> = after[1..close].split(',').map(str::trim).collect();
        let seconds = |interval: &str| -> u64 {
            let i = interval.trim_matches('\'');
            let (n, unit) = i.split_at(i.len() - 1);
            n.parse::<u64>().expect("an interval such as '1h'")
                * match unit {
                    "s" => 1,
                    "m" => 60,
                    "h" => 3600,
                    "d" => 86400,
                    _ => panic!("interval {i}"),
                }
        };
        out.push_str(&match name {
            "timeFilter" => format!("{} BETWEEN '{from}' AND '{to}'", args[0]),
            "timeFrom" => format!("'{from}'"),
            "timeTo" => format!("'{to}'"),
            "time" => format!("{} AS \"time\"", args[0]),
            "timeGroup" | "timeGroupAlias" => {
                let n = seconds(args[1]);
                let group = format!("floor(extract(epoch from {})/{n})*{n}", args[0]);
                if name == "timeGroupAlias" {
                    format!("{group} AS \"time\"")
                } else {
                    group
                }
            }
            other => panic!("Grafana macro $__{other} is not handled by this check"),
        });
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The dashboards' variables, `$name` and `${name}`.
fn expand_variables(text: &str, variables: &[(String, String)]) -> String {
    let mut text = text.to_string();
    // Longest names first, so $param never eats $parameter.
    let mut sorted: Vec<&(String, String)> = variables.iter().collect();
    sorted.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    for (name, value) in sorted {
        text = text
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    text
}

/// Runs one query as the read-only role; returns its column names and row count.
async fn run_as_reader(pool: &sqlx::PgPool, sql: &str) -> Result<(Vec<String>, usize), String> {
    use sqlx::{Column, Executor, Row};
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    conn.execute("set role ablate_reader")
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        let described = (&mut *conn)
            .describe(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql.to_string())))
            .await?;
        let columns: Vec<String> = described.columns().iter().map(|c| c.name().to_string()).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_all(&mut *conn)
            .await?;
        let _ = rows.first().map(|r| r.len());
        Ok::<_, sqlx::Error>((columns, rows.len()))
    }
    .await
    .map_err(|e| e.to_string());
    conn.execute("reset role").await.map_err(|e| e.to_string())?;
    result
}

/// The first column's values of a variable's query (Grafana's `__value` when it has one).
async fn variable_values(pool: &sqlx::PgPool, sql: &str) -> Result<Vec<String>, String> {
    use sqlx::{Column, Executor, Row};
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    conn.execute("set role ablate_reader")
        .await
        .map_err(|e| e.to_string())?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| e.to_string());
    conn.execute("reset role").await.map_err(|e| e.to_string())?;
    Ok(rows?
        .iter()
        .map(|row| {
            let index = row.columns().iter().position(|c| c.name() == "__value").unwrap_or(0);
            row.try_get::<String, _>(index).unwrap_or_default()
        })
        .collect())
}

/// Every SQL query of every dashboard runs as the read-only role and returns
/// what its panel needs; every PromQL expression is accepted by Prometheus
/// and names only metrics the coordinator or a worker serves.
async fn check_dashboards(pool: &sqlx::PgPool, experiment: &str, prom: &str, pages: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/grafana");
    let (from, to) = time_range();
    let (from, to) = (from.as_str(), to.as_str());
    let mut checked_sql = 0;
    let mut checked_promql = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "json")) {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            dashboard["uid"].as_str().is_some_and(|u| u.starts_with("ablate-")),
            "{name}: uid"
        );
        let mut variables: Vec<(String, String)> = Vec::new();
        for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
            let var_name = var["name"].as_str().unwrap().to_string();
            assert_eq!(var["datasource"]["uid"], "ablate-postgres", "{name}: ${var_name}");
            let sql = expand_macros(&expand_variables(var["query"].as_str().unwrap(), &variables), from, to);
            assert!(
                !sql.contains('$'),
                "{name}: ${var_name} left a variable unexpanded: {sql}"
            );
            let values = variable_values(pool, &sql)
                .await
                .unwrap_or_else(|e| panic!("{name}: variable ${var_name}: {e}\n{sql}"));
            checked_sql += 1;
            let value = if var_name == "experiment" {
                assert!(
                    values.iter().any(|v| v == experiment),
                    "{name}: $experiment offers {values:?}"
                );
                experiment.to_string()
            } else {
                values
                    .first()
                    .cloned()
                    .unwrap_or_else(|| panic!("{name}: ${var_name} offers nothing for a finished sweep\n{sql}"))
            };
            variables.push((var_name, value));
        }
        for panel in dashboard["panels"].as_array().unwrap() {
            let title = expand_variables(panel["title"].as_str().unwrap(), &variables);
            let kind = panel["type"].as_str().unwrap();
            for target in panel["targets"].as_array().unwrap() {
                let uid = target["datasource"]["uid"].as_str().unwrap();
                if let Some(raw) = target["rawSql"].as_str() {
                    assert_eq!(uid, "ablate-postgres", "{name}: {title}");
                    let sql = expand_macros(&expand_variables(raw, &variables), from, to);
                    assert!(!sql.contains('$'), "{name}: {title}: unexpanded: {sql}");
                    let (columns, rows) = run_as_reader(pool, &sql)
                        .await
                        .unwrap_or_else(|e| panic!("{name}: {title}: {e}\n{sql}"));
                    checked_sql += 1;
                    let has = |c: &str| columns.iter().any(|x| x == c);
                    let needed: Vec<String> = match kind {
                        "timeseries" => vec!["time".into()],
                        "trend" => vec![panel["options"]["xField"].as_str().unwrap().into()],
                        "xychart" => panel["options"]["series"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .flat_map(|s| [&s["x"]["matcher"]["options"], &s["y"]["matcher"]["options"]])
                            .map(|v| expand_variables(v.as_str().unwrap(), &variables))
                            .collect(),
                        "stat" if panel["options"]["reduceOptions"]["fields"] == "/^value$/" => vec!["value".into()],
                        _ => vec![],
                    };
                    for column in &needed {
                        assert!(has(column), "{name}: {title} needs column `{column}`, has {columns:?}");
                    }
                    assert!(!columns.is_empty(), "{name}: {title}: no columns");
                    if target["format"] == "time_series" {
                        assert!(has("time"), "{name}: {title}: a time series needs `time`: {columns:?}");
                    }
                    // Every panel shows something for a finished sweep, but the
                    // failures of a sweep that had none.
                    if !title.starts_with("Failures") {
                        assert!(rows > 0, "{name}: {title}: no rows for a finished sweep\n{sql}");
                    }
                }
                if let Some(expr) = target["expr"].as_str() {
                    assert_eq!(uid, "ablate-prometheus", "{name}: {title}");
                    let promql = expr
                        .replace("$__rate_interval", "1m")
                        .replace("$__interval", "15s")
                        .replace("$__range", "1h");
                    assert!(!promql.contains('$'), "{name}: {title}: unexpanded: {promql}");
                    let encoded: String = promql.bytes().map(|b| format!("%{b:02X}")).collect();
                    let (status, body) = http_get(prom, &format!("/api/v1/query?query={encoded}")).unwrap();
                    assert_eq!(status, 200, "{name}: {title}: Prometheus refused `{promql}`: {body}");
                    checked_promql += 1;
                    for metric in metric_names(&promql) {
                        let family = ["_bucket", "_count", "_sum"]
                            .iter()
                            .find_map(|s| metric.strip_suffix(s))
                            .unwrap_or(&metric);
                        let served = pages.contains(&format!("# TYPE {family} "))
                            // Served only where nvidia-smi answers; named in the worker's source.
                            || (family.starts_with("ablate_worker_gpu_") && include_str!("../../worker/src/telemetry.rs").contains(&format!("\"{family}\"")));
                        assert!(served, "{name}: {title}: `{metric}` is not a metric ablate serves");
                    }
                }
            }
        }
    }
    assert!(
        checked_sql >= 15 && checked_promql >= 15,
        "{checked_sql} SQL, {checked_promql} PromQL"
    );
}

fn metric_names(promql: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = promql;
    while let Some(at) = rest.find("ablate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The dashboards' time range for the check: the last day, as Grafana writes it.
fn time_range() -> (String, String) {
    let now = chrono::Utc::now();
    let stamp = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    (
        stamp(now - chrono::Duration::days(1)),
        stamp(now + chrono::Duration::minutes(1)),
    )
}
