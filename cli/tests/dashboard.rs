//! The web dashboard, as a researcher sees it: headless Chromium (Debian's,
//! with --no-sandbox) loads every page of a running stack after a quickstart
//! sweep (its Pareto front of eval_loss and num_params drawn) and a muP report, through the login link `ablate dashboard` prints;
//! the DOM holds the experiments, all their trials and the verdict line, and
//! a screenshot of each page is kept. The JSON API answers 401 without a
//! token and 403 to a worker's, reduces long curves to at most 2,000 points,
//! exports CSV, and answers an unchanged poll with an empty 304.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{http_request, spec_path, text, Stack};

/// Debian's Chromium (`cargo xtask test` installs it and sets ABLATE_CHROMIUM).
fn chromium() -> PathBuf {
    std::env::var_os("ABLATE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Loads `url` in headless Chromium, lets its scripts run for a few seconds
/// of virtual time, writes a screenshot to `png`, and returns the DOM.
fn browse(url: &str, png: &Path, profile: &Path) -> String {
    let run = |extra: &[String]| {
        let out = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1400,3600",
                "--virtual-time-budget=8000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .output()
            .expect("Chromium runs (cargo xtask test installs it)");
        assert!(out.status.success(), "chromium: {}", text(&out));
        out
    };
    let dom = String::from_utf8_lossy(&run(&["--dump-dom".to_string()]).stdout).to_string();
    run(&[format!("--screenshot={}", png.display())]);
    assert!(
        std::fs::metadata(png).map(|m| m.len() > 10_000).unwrap_or(false),
        "no screenshot at {}",
        png.display()
    );
    dom
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Every scatter of the experiment page `dom` draws a point for every trial with an
/// objective (`scored` of them), also where several trials share a parameter's value
/// (its largest included): per parameter and per value, as many points as trials.
fn assert_every_trial_is_drawn(dom: &str, trials: &serde_json::Value, params: &[&str], scored: usize) {
    let trials: Vec<&serde_json::Value> = trials["trials"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["objective"].as_f64().is_some_and(f64::is_finite))
        .collect();
    assert_eq!(trials.len(), scored, "{trials:?}");
    for param in params {
        let point = format!("class=\"scatter-point\" data-param=\"{param}\"");
        assert_eq!(count(dom, &point), trials.len(), "{param}: {dom}");
        let mut by_value = std::collections::BTreeMap::<String, usize>::new();
        for t in &trials {
            let value = match &t["params"][param] {
                serde_json::Value::String(s) => s.clone(),
                other => other.as_i64().expect("an integer or a string").to_string(),
            };
            *by_value.entry(value).or_default() += 1;
        }
        assert!(by_value.len() > 1, "{param} is swept");
        for (value, n) in by_value {
            assert_eq!(
                count(dom, &format!("{point} data-x=\"{value}\"")),
                n,
                "{param} = {value}: {dom}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_page_loads_in_chromium_with_its_data_behind_the_tokens() {
    let mut stack = Stack::start(15.0).await;
    let http = stack.serve_http().await;
    stack.start_worker("cpu:2");
    let quickstart = stack.submit_and_wait(&spec_path("quickstart.toml"));
    let mup = stack.submit_and_wait(&spec_path("coord-check.toml"));

    // The login link, as `ablate dashboard` prints it.
    let out = stack.ablate(&["dashboard"]);
    assert!(out.status.success(), "{}", text(&out));
    let link = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        link,
        format!("http://{http}/login?token={}", stack.admin_token),
        "{}",
        text(&out)
    );

    // The API: tokens first.
    let api = |path: &str, token: Option<&str>| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        http_request(&http, path, &headers).unwrap()
    };
    let admin = stack.admin_token.clone();
    let worker = std::fs::read_to_string(stack.dir.join("worker.token")).unwrap();
    assert_eq!(api("/api/v1/experiments", None).0, 401);
    assert_eq!(api("/api/v1/experiments", Some("abl_not_a_token")).0, 401);
    let (status, _, body) = api("/api/v1/experiments", Some(worker.trim()));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("researcher or admin"), "{body}");
    let created = stack.ablate(&["token", "create", "--role", "researcher", "--name", "ada"]);
    assert!(created.status.success(), "{}", text(&created));
    let researcher = String::from_utf8_lossy(&created.stdout).trim().to_string();
    let (status, headers, body) = api("/api/v1/experiments", Some(&researcher));
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["experiments"].as_array().unwrap().len(), 2, "{list:#}");
    // An unchanged answer is an empty 304 to a poll that has it.
    let etag = headers.iter().find(|(k, _)| k == "etag").unwrap().1.clone();
    let (status, _, body) = http_request(
        &http,
        "/api/v1/experiments",
        &[
            ("Authorization", &format!("Bearer {researcher}")),
            ("If-None-Match", &etag),
        ],
    )
    .unwrap();
    assert_eq!((status, body.as_str()), (304, ""));
    // Filters.
    let (_, _, body) = api("/api/v1/experiments?family=mup_transfer", Some(&admin));
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["experiments"][0]["id"], mup.as_str(), "{list:#}");
    assert_eq!(list["experiments"].as_array().unwrap().len(), 1);

    // CSV export: a header with every swept parameter, one line per trial.
    let (status, _, csv) = api(
        &format!("/api/v1/experiments/{quickstart}/trials?format=csv"),
        Some(&admin),
    );
    assert_eq!(status, 200);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 13, "{csv}");
    assert!(
        lines[0].starts_with("ordinal,trial_id,state,objective,attempts,param."),
        "{}",
        lines[0]
    );
    assert!(lines[1..].iter().all(|l| l.contains(",succeeded,")), "{csv}");

    // A long curve comes back reduced, ends kept, never over 2,000 points.
    sqlx::query("insert into metric_names (name) values ('long_curve') on conflict do nothing;")
        .execute(&stack.pool)
        .await
        .unwrap();
    let trial: uuid::Uuid = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select id from trials where experiment_id = '{quickstart}' order by ordinal limit 1"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into metrics (trial_id, name_id, step, value)
         select $1, (select id from metric_names where name = 'long_curve'), s, sin(s / 100.0)
         from generate_series(0, 9999) s",
    )
    .bind(trial)
    .execute(&stack.pool)
    .await
    .unwrap();
    for (asked, most) in [(100_000usize, 2000usize), (300, 300)] {
        let (status, _, body) = api(
            &format!("/api/v1/experiments/{quickstart}/curves?metric=long_curve&trials={trial}&points={asked}"),
            Some(&admin),
        );
        assert_eq!(status, 200, "{body}");
        let curves: serde_json::Value = serde_json::from_str(&body).unwrap();
        let series = &curves["series"][0];
        let steps = series["steps"].as_array().unwrap();
        assert_eq!(series["total_points"], 10_000);
        assert_eq!(steps.len(), most, "asked for {asked}");
        assert!(
            steps.windows(2).all(|w| w[0].as_i64() < w[1].as_i64()),
            "steps in order"
        );
        assert_eq!(
            (steps[0].as_i64(), steps.last().unwrap().as_i64()),
            (Some(0), Some(9999))
        );
        // The extremes survive the reduction.
        let values: Vec<f64> = series["values"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_f64())
            .collect();
        let (low, high) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(*v), h.max(*v)));
        assert!(low < -0.99 && high > 0.99, "{low} {high}");
    }
    let (status, _, body) = api(&format!("/api/v1/trials/{trial}/curves?points=5000"), Some(&admin));
    assert_eq!(status, 200);
    let curves: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        curves["series"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["steps"].as_array().unwrap().len() <= 2000),
        "{body}"
    );
    // Its log: what its process wrote, kept by the worker.
    let (status, _, body) = api(&format!("/api/v1/trials/{trial}/logs"), Some(&admin));
    assert_eq!(status, 200, "{body}");
    let logs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(logs["logs"]["attempt"], 1, "{body}");
    assert!(
        logs["logs"]["text"].as_str().unwrap().contains("trial starting"),
        "{body}"
    );
    assert_eq!(api("/api/v1/experiments/not-an-id", Some(&admin)).0, 400);
    assert_eq!(
        api(&format!("/api/v1/trials/{}", uuid::Uuid::new_v4()), Some(&admin)).0,
        404
    );

    // A tag and a note on the quickstart, and the quickstart again with reuse: every
    // trial takes the first run's results.
    assert!(stack.ablate(&["tag", &quickstart, "baseline"]).status.success());
    assert!(stack
        .ablate(&["note", &quickstart, "the reference run"])
        .status
        .success());
    let again = stack.ablate(&[
        "submit",
        &spec_path("quickstart.toml").to_string_lossy(),
        "--set",
        "reuse=true",
        "--set",
        "name=quickstart-again",
        "--wait",
    ]);
    assert!(again.status.success(), "{}", text(&again));
    let again = String::from_utf8_lossy(&again.stdout).trim().to_string();
    let (_, _, body) = api("/api/v1/experiments?tag=baseline", Some(&admin));
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["experiments"].as_array().unwrap().len(), 1, "{list:#}");
    assert_eq!(list["experiments"][0]["note"], "the reference run");

    // The pages, in Chromium, logged in through the link.
    let shots = stack.dir.join("screenshots");
    let keep = std::env::var_os("ABLATE_SCREENSHOTS").map(PathBuf::from);
    std::fs::create_dir_all(&shots).unwrap();
    let profile = stack.dir.join("chromium-profile");
    let page = |next: &str, name: &str| {
        let url = format!("{link}&next={}", next.replace('#', "%23").replace('/', "%2F"));
        let png = shots.join(format!("{name}.png"));
        let dom = browse(&url, &png, &profile);
        if let Some(dir) = &keep {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::copy(&png, dir.join(format!("{name}.png"))).unwrap();
        }
        dom
    };
    let home = page("/#/", "experiments");
    assert!(home.contains("id=\"experiments-table\""), "{home}");
    assert!(
        home.contains(">quickstart<") && home.contains(">coord-check<"),
        "{home}"
    );

    let tagged = page("/#/experiments?tag=baseline", "experiments-tagged");
    assert!(
        tagged.contains(">quickstart<") && tagged.contains(">baseline<"),
        "{tagged}"
    );
    assert!(
        !tagged.contains(">coord-check<") && !tagged.contains(">quickstart-again<"),
        "{tagged}"
    );
    let dom = page(&format!("/#/experiments/{again}"), "experiment-reused");
    assert_eq!(count(&dom, "class=\"tag reused\""), 12, "{dom}");
    assert!(dom.contains("12 trials took the results"), "{dom}");

    let dom = page(&format!("/#/experiments/{quickstart}"), "experiment-quickstart");
    assert!(
        dom.contains("id=\"experiment-note\"") && dom.contains("the reference run"),
        "{dom}"
    );
    assert!(dom.contains("id=\"experiment-name\">quickstart<"), "{dom}");
    assert_eq!(count(&dom, "class=\"trial-row\""), 12, "{dom}");
    assert!(dom.contains("class=\"uplot"), "the curves are drawn: {dom}");
    let trials_of = |experiment: &str| {
        let (_, _, body) = api(&format!("/api/v1/experiments/{experiment}/trials"), Some(&admin));
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert_every_trial_is_drawn(&dom, &trials_of(&quickstart), &["width", "log2_lr"], 12);
    // Its two objectives, eval_loss and num_params: the front the report names is the one
    // drawn, each of its trials marked, the other trials beside them.
    let (_, _, body) = api(&format!("/api/v1/experiments/{quickstart}/report"), Some(&admin));
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let front: Vec<i64> = report["report"]["pareto"]
        .as_array()
        .unwrap_or_else(|| panic!("the report names its front: {body}"))
        .iter()
        .map(|o| o.as_i64().unwrap())
        .collect();
    assert!(
        report["report"]["tables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["title"].as_str().unwrap().starts_with("Pareto front")),
        "{body}"
    );
    // Trials of one width have the same num_params: at most one of each is on the front.
    assert!((1..=3).contains(&front.len()), "{front:?}");
    // The report's front (worked out in Rust) is the one ablate.pareto holds (in SQL).
    let (_, _, body) = api(&format!("/api/v1/experiments/{quickstart}"), Some(&admin));
    let experiment: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut sorted = front.clone();
    sorted.sort();
    assert_eq!(experiment["experiment"]["pareto"], serde_json::json!(sorted), "{body}");
    assert!(
        dom.contains(&format!("data-front=\"{}\" data-points=\"12\"", front.len())),
        "{dom}"
    );
    assert_eq!(count(&dom, "class=\"front-point\""), front.len(), "{dom}");
    assert_eq!(count(&dom, "class=\"pareto-point\""), 12 - front.len(), "{dom}");
    for ordinal in &front {
        assert!(
            dom.contains(&format!("class=\"front-point\" data-ordinal=\"{ordinal}\"")),
            "trial {ordinal} of the front: {dom}"
        );
    }
    assert!(dom.contains("class=\"front-line\" d=\"M"), "{dom}");

    let dom = page(&format!("/#/experiments/{mup}"), "experiment-coord-check");
    assert_eq!(count(&dom, "class=\"trial-row\""), 36, "{dom}");
    let figures = stack.dir.join("report");
    let verdict = text(&stack.ablate(&["report", &mup, "--out", &figures.to_string_lossy()]));
    let line = verdict
        .lines()
        .find(|l| l.starts_with("verdict:"))
        .expect("the CLI's verdict line");
    assert!(dom.contains(&format!("id=\"verdict\">{line}<")), "{line}\n{dom}");
    assert!(
        count(&dom, "class=\"uplot") > 2,
        "curves and the report's figures: {dom}"
    );
    assert_every_trial_is_drawn(&dom, &trials_of(&mup), &["width", "parametrization", "seed"], 36);
    // A report cut to its first rows says how many there are.
    let report_of = |query: &str| {
        let (_, _, body) = api(&format!("/api/v1/experiments/{mup}/report{query}"), Some(&admin));
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let (whole, cut) = (report_of(""), report_of("?rows=2&text=false"));
    assert!(whole["text"].is_string() && cut.get("text").is_none(), "{cut}");
    let tables = |r: &serde_json::Value| r["report"]["tables"].as_array().unwrap().clone();
    assert!(!tables(&whole).is_empty());
    for (w, c) in tables(&whole).iter().zip(tables(&cut)) {
        let rows = w["rows"].as_array().unwrap();
        assert_eq!(c["total_rows"].as_u64(), Some(rows.len() as u64), "{c}");
        assert_eq!(c["rows"].as_array().unwrap()[..], rows[..rows.len().min(2)], "{c}");
    }
    // Its objective is a final value and eval_loss has one point a trial (eval_every =
    // steps): the curve panel draws train_loss, which has a curve.
    assert!(
        dom.contains("<h3>train_loss</h3>") && !dom.contains("<h3>eval_loss</h3>"),
        "{dom}"
    );

    let dom = page(&format!("/#/trials/{trial}"), "trial");
    assert!(dom.contains("Checkpoints") && dom.contains("<code>"), "{dom}");
    assert!(dom.contains("long_curve (10000 points)"), "{dom}");
    assert!(
        dom.contains("<b>attempt 1</b>") && dom.contains("trial starting"),
        "{dom}"
    );

    let dom = page("/#/workers", "workers");
    assert!(dom.contains("id=\"workers-table\""), "{dom}");
    assert!(dom.contains("state-live"), "{dom}");

    // Without the session, the page says how to log in.
    let dom = browse(
        &format!("http://{http}/#/"),
        &shots.join("logged-out.png"),
        &stack.dir.join("chromium-fresh"),
    );
    assert!(
        dom.contains("Not logged in") && dom.contains("ablate dashboard"),
        "{dom}"
    );
}
