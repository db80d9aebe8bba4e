//! The dashboard on a large experiment: 1,000 trials with 10,000 steps of two
//! metrics each (20 million points), written straight into PostgreSQL. Each
//! of the experiment page's data requests is timed over HTTP (median of 3),
//! with the most points any series carried; then headless Chromium opens the
//! page and the time until it has drawn the table and the curves is read
//! over the DevTools protocol (`--remote-debugging-pipe`).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use ablate_schema::proto::{self, experiments_client::ExperimentsClient};
use sqlx::PgPool;

use super::{Result, Row};

const TRIALS: usize = 1000;
const STEPS: usize = 10_000;

/// A 10 x 10 x 10 grid: width, learning rate, seed.
const SPEC: &str = r#"
name = "dashboard-bench"
family = "train"
[base]
optimizer = "adam"
steps = 10000
[sweep]
searcher = "grid"
params.width = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
params.log2_lr = { range = [-14, -5] }
params.seed = { range = [0, 9] }
"#;

/// Submits the sweep and fills in its curves and results as if it had run.
async fn populate(addr: &str, pool: &PgPool) -> Result<String> {
    let mut client = ExperimentsClient::connect(addr.to_string()).await?;
    let id = client
        .submit(proto::SubmitRequest {
            spec_text: SPEC.into(),
            format: "toml".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .experiment_id;
    let uuid: uuid::Uuid = id.parse()?;
    sqlx::query("insert into metric_names (name) values ('train_loss'), ('eval_loss') on conflict do nothing")
        .execute(pool)
        .await?;
    for first in (0..TRIALS).step_by(100) {
        sqlx::query(
            "insert into metrics (trial_id, name_id, step, value)
             select t.id, n.id, s,
                    (1 + t.ordinal / 1000.0) * exp(-s / 3000.0) + 0.02 * sin(s + t.ordinal) + 0.05
             from trials t cross join metric_names n cross join generate_series(0, $4 - 1) s
             where t.experiment_id = $1 and t.ordinal >= $2 and t.ordinal < $3
               and n.name in ('train_loss', 'eval_loss')",
        )
        .bind(uuid)
        .bind(first as i32)
        .bind((first + 100) as i32)
        .bind(STEPS as i64)
        .execute(pool)
        .await?;
    }
    sqlx::query(
        "update trials set state = 'succeeded', attempt = 1, started_at = now(), finished_at = now()
         where experiment_id = $1",
    )
    .bind(uuid)
    .execute(pool)
    .await?;
    // The finished trials' rows are merged into chunks by the coordinator's compactor.
    loop {
        let due: i64 = sqlx::query_scalar("select count(*) from trials where metrics_due")
            .fetch_one(pool)
            .await?;
        if due == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sqlx::query("vacuum analyze metrics").execute(pool).await?;
    sqlx::query("analyze metric_chunks").execute(pool).await?;
    sqlx::query("analyze trials").execute(pool).await?;
    Ok(id)
}

/// GET `path` on `addr`: the time to the whole answer, its status and its body.
pub(super) fn get(addr: &str, path: &str) -> Result<(Duration, u16, String)> {
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let elapsed = started.elapsed();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((elapsed, status, body))
}

/// The most points of any series in a curves answer.
fn most_points(body: &str) -> usize {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v["series"].as_array().map(|s| {
                s.iter()
                    .filter_map(|s| s["steps"].as_array().map(Vec::len))
                    .max()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

pub async fn rows(addr: &str, http: &str, pool: &PgPool) -> Result<Vec<Row>> {
    let started = Instant::now();
    let id = populate(addr, pool).await?;
    let filled = started.elapsed();
    let some: Vec<uuid::Uuid> =
        sqlx::query_scalar("select id from trials where experiment_id = $1::uuid order by ordinal desc limit 100")
            .bind(&id)
            .fetch_all(pool)
            .await?;
    let hundred = some.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let requests = [
        ("experiments list".to_string(), "/api/v1/experiments".to_string()),
        ("experiment".to_string(), format!("/api/v1/experiments/{id}")),
        (
            "trial table (1,000 trials, JSON)".to_string(),
            format!("/api/v1/experiments/{id}/trials"),
        ),
        (
            "curves, best 10 trials, 1,000 px".to_string(),
            format!("/api/v1/experiments/{id}/curves?metric=eval_loss&points=1000"),
        ),
        (
            "curves, 100 chosen trials, 1,000 px".to_string(),
            format!("/api/v1/experiments/{id}/curves?metric=train_loss&points=1000&trials={hundred}"),
        ),
        (
            "curves asking 100,000 points (capped)".to_string(),
            format!("/api/v1/experiments/{id}/curves?metric=train_loss&points=100000"),
        ),
        ("report".to_string(), format!("/api/v1/experiments/{id}/report")),
        ("one trial".to_string(), format!("/api/v1/trials/{}", some[0])),
        (
            "one trial's curves".to_string(),
            format!("/api/v1/trials/{}/curves?points=1000", some[0]),
        ),
    ];
    let mut rows = Vec::new();
    for (name, path) in &requests {
        let (_, status, body) = get(http, path)?;
        if status != 200 {
            return Err(format!("{path}: HTTP {status}: {}", body.chars().take(300).collect::<String>()).into());
        }
        let mut times = Vec::new();
        for _ in 0..3 {
            times.push(get(http, path)?.0);
        }
        times.sort();
        let mut row = Row::new(format!("dashboard: {name}"), super::ms(times[1]), "ms").lower_is_better();
        let points = most_points(&body);
        row = row.note(if points > 0 {
            format!(
                "{} KB, at most {points} points a series (target: < 300 ms, <= 2,000 points)",
                body.len() / 1024
            )
        } else {
            format!("{} KB (target: < 300 ms)", body.len() / 1024)
        });
        rows.push(row);
    }
    let url = format!("http://{http}/#/experiments/{id}");
    rows.push(match page_ready(&url) {
        Ok((wall, page)) => Row::new("dashboard: experiment page drawn in Chromium", wall, "ms")
            .lower_is_better()
            .note(format!(
                "from navigation to the table and curves drawn; the page's own clock says {page:.0} ms (target: < 2,000 ms)"
            )),
        Err(why) => Row::new("dashboard: experiment page drawn in Chromium", f64::NAN, "ms")
            .note(format!("not measured: {why}")),
    });
    rows.push(
        Row::new("dashboard: writing the 20 M points (setup)", filled.as_secs_f64(), "s")
            .lower_is_better()
            .note("INSERT ... SELECT generate_series, 100 trials per statement, then merged into chunks"),
    );
    Ok(rows)
}

/// Chromium driven over the DevTools protocol on two pipes (fds 3 and 4).
struct Browser {
    child: std::process::Child,
    to: std::fs::File,
    from: std::io::BufReader<std::fs::File>,
    next_id: u64,
}

impl Browser {
    fn start() -> Result<Browser> {
        use std::os::unix::io::FromRawFd;
        use std::os::unix::process::CommandExt;
        let chromium = std::env::var("ABLATE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut to_chrome = [0i32; 2];
        let mut from_chrome = [0i32; 2];
        // SAFETY: pipe2 fills the arrays with new descriptors; both ends are ours.
        unsafe {
            if libc::pipe2(to_chrome.as_mut_ptr(), libc::O_CLOEXEC) != 0
                || libc::pipe2(from_chrome.as_mut_ptr(), libc::O_CLOEXEC) != 0
            {
                return Err("pipe2 failed".into());
            }
        }
        let (child_reads, child_writes) = (to_chrome[0], from_chrome[1]);
        let profile = std::env::temp_dir().join(format!("ablate-bench-chromium-{}", std::process::id()));
        let mut command = std::process::Command::new(&chromium);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1400,1000",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec: the
        // child's ends move to fds 3 and 4 (copied high first, so neither
        // overwrites the other), without close-on-exec.
        unsafe {
            command.pre_exec(move || {
                let r = libc::fcntl(child_reads, libc::F_DUPFD, 10);
                let w = libc::fcntl(child_writes, libc::F_DUPFD, 10);
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("{chromium}: {e} (cargo xtask bench installs Chromium)"))?;
        // SAFETY: the descriptors are ours; the child's ends close here, ours become files.
        let (to, from) = unsafe {
            libc::close(child_reads);
            libc::close(child_writes);
            (
                std::fs::File::from_raw_fd(to_chrome[1]),
                std::fs::File::from_raw_fd(from_chrome[0]),
            )
        };
        Ok(Browser {
            child,
            to,
            from: std::io::BufReader::new(from),
            next_id: 1,
        })
    }

    /// Sends one command and waits for its answer (events in between are skipped).
    fn call(&mut self, session: Option<&str>, method: &str, params: serde_json::Value) -> Result<serde_json::Value> {
        use std::io::BufRead;
        let id = self.next_id;
        self.next_id += 1;
        let mut message = serde_json::json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            message["sessionId"] = s.into();
        }
        self.to.write_all(message.to_string().as_bytes())?;
        self.to.write_all(b"\0")?;
        loop {
            let mut buf = Vec::new();
            if self.from.read_until(0, &mut buf)? == 0 {
                return Err("Chromium closed its DevTools pipe".into());
            }
            buf.pop();
            let answer: serde_json::Value = serde_json::from_slice(&buf)?;
            if answer["id"].as_u64() == Some(id) {
                if let Some(error) = answer.get("error") {
                    return Err(format!("{method}: {error}").into());
                }
                return Ok(answer["result"].clone());
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `url` in a new tab; the wall time until the page marks itself drawn
/// (`data-ready-ms` on its body), and the page's own figure.
pub(super) fn page_ready(url: &str) -> Result<(f64, f64)> {
    let mut browser = Browser::start()?;
    let target = browser.call(None, "Target.createTarget", serde_json::json!({ "url": "about:blank" }))?;
    let attached = browser.call(
        None,
        "Target.attachToTarget",
        serde_json::json!({ "targetId": target["targetId"], "flatten": true }),
    )?;
    let session = attached["sessionId"].as_str().ok_or("no DevTools session")?.to_string();
    let started = Instant::now();
    browser.call(Some(&session), "Page.navigate", serde_json::json!({ "url": url }))?;
    while started.elapsed() < Duration::from_secs(60) {
        let answer = browser.call(
            Some(&session),
            "Runtime.evaluate",
            serde_json::json!({
                "expression": "(document.body && document.body.dataset.readyMs) || ''",
                "returnByValue": true,
            }),
        )?;
        let value = answer["result"]["value"].as_str().unwrap_or_default().to_string();
        if let Ok(page) = value.parse::<f64>() {
            return Ok((super::ms(started.elapsed()), page));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("the page did not finish drawing within 60 s".into())
}
