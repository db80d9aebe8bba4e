//! The web dashboard on the coordinator's HTTP listener: the page and its
//! assets (embedded from `dashboards/web/`, served to anyone: they hold no
//! data), `/login?token=...` (sets the session cookie and redirects to the
//! page), and the read-only JSON API `/api/v1/...`, behind the gRPC services'
//! tokens: a researcher or admin token as `Authorization: Bearer` or the
//! session cookie; none or an unknown one gets 401, a worker token 403.
//! Responses carry an ETag, so a poll that finds nothing changed gets an
//! empty 304; curves are reduced here (LTTB) to at most `MAX_POINTS` per series.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ablate_schema::{ExperimentId, TrialId};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::auth::Tokens;
use crate::downsample::lttb;
use crate::{db, Error};

mod session;
mod writes;

pub(crate) use session::authorize;
use session::{login, logout};

/// The most points of one series a response carries.
pub const MAX_POINTS: usize = 2000;
/// Points per series when the page does not say.
const DEFAULT_POINTS: usize = 500;
/// Trials whose curves the experiment page draws when it names none.
const DEFAULT_TOP: u32 = 10;
/// The most trials one curves request may name.
const MAX_CURVE_TRIALS: usize = 200;

/// The page and its assets, embedded at build time.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../../dashboards/web/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../dashboards/web/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../dashboards/web/style.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../dashboards/web/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../dashboards/web/vendor/uplot/uPlot.min.css"),
    ),
];

#[derive(Clone)]
struct Web {
    pool: PgPool,
    /// `None`: the coordinator runs without tokens, and so does the API.
    tokens: Option<Tokens>,
    lease_ttl: Duration,
    /// The workers' object store, for trials' logs.
    objects: Option<crate::Objects>,
    /// Researchers' SQL: their own pool and admission.
    reader: crate::reader::Reader,
    limits: ablate_schema::Limits,
    data_roots: Vec<std::path::PathBuf>,
}

impl Web {
    /// Where the dashboard reads: the researchers' pool when it reaches a replica
    /// (`--reader-database-url`), else the primary.
    fn reads(&self) -> &PgPool {
        match self.reader.replica {
            Some(_) => &self.reader.pool,
            None => &self.pool,
        }
    }

    /// A read's error, naming the replica when it failed there.
    fn explain(&self, error: Error) -> ApiError {
        self.reader.explain(error).into()
    }
}

/// The dashboard's routes, to merge into the HTTP listener's.
pub(crate) fn router(
    pool: PgPool,
    tokens: Option<Tokens>,
    options: &crate::Options,
    objects: Option<crate::Objects>,
    reader: crate::reader::Reader,
) -> Router {
    let web = Web {
        pool,
        tokens,
        lease_ttl: options.lease_ttl,
        objects,
        reader,
        limits: options.limits,
        data_roots: options.data_roots.clone(),
    };
    let api = Router::new()
        .route("/api/v1/experiments", get(experiments).post(writes::submit))
        .route("/api/v1/experiments/{id}/cancel", post(writes::cancel))
        .route("/api/v1/experiments/{id}/retry", post(writes::retry))
        .route("/api/v1/experiments/{id}/tags", post(writes::tags))
        .route("/api/v1/experiments/{id}/note", post(writes::note))
        .route("/api/v1/sql", post(writes::sql))
        .route("/api/v1/experiments/{id}", get(experiment).delete(writes::delete))
        .route("/api/v1/experiments/{id}/trials", get(trials))
        .route("/api/v1/experiments/{id}/curves", get(experiment_curves))
        .route("/api/v1/experiments/{id}/report", get(report))
        .route("/api/v1/trials/{id}", get(trial))
        .route("/api/v1/trials/{id}/curves", get(trial_curves))
        .route("/api/v1/trials/{id}/logs", get(trial_logs))
        .route("/api/v1/workers", get(workers))
        .route(
            "/api/v1/{*rest}",
            get(|| async { ApiError::not_found("no such API path; see the README's /api/v1 list") }),
        );
    Router::new()
        .route("/", get(|| async { asset("index.html") }))
        .route(
            "/assets/{file}",
            get(|Path(file): Path<String>| async move { asset(&file) }),
        )
        .route("/login", get(login))
        .route("/logout", get(logout))
        .merge(api)
        .with_state(web)
}

fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, bytes)) => (
            [(header::CONTENT_TYPE, *kind), (header::CACHE_CONTROL, "no-cache")],
            *bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

/// An API error: a status and a JSON body saying what to do.
struct ApiError(StatusCode, String);

impl ApiError {
    fn not_found(message: &str) -> ApiError {
        ApiError(StatusCode::NOT_FOUND, message.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> ApiError {
        let status = match &error {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::InvalidArgument(_) | Error::InvalidSpec(_) | Error::Query(_) => StatusCode::BAD_REQUEST,
            Error::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Conflict(_) => StatusCode::CONFLICT,
            _ => {
                tracing::warn!(%error, "dashboard request failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        ApiError(status, error.to_string())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        Error::from(error).into()
    }
}

/// A JSON answer with an ETag; an empty 304 when the client has it already.
fn fresh(headers: &HeaderMap, body: &Value) -> Response {
    fresh_bytes(headers, serde_json::to_vec(body).expect("JSON serializes"))
}

/// As [`fresh`], for a JSON body already written.
fn fresh_bytes(headers: &HeaderMap, bytes: Vec<u8>) -> Response {
    let digest = Sha256::digest(&bytes);
    let tag = format!(
        "\"{}\"",
        digest.iter().take(12).map(|b| format!("{b:02x}")).collect::<String>()
    );
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let etag = HeaderValue::from_str(&tag).expect("hex is a header value");
    if matches {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::ETAG, etag),
        ],
        bytes,
    )
        .into_response()
}

/// A path's experiment id, or 400 with what is wrong (the one parse of the gRPC edge too).
fn experiment_id(text: &str) -> Result<ExperimentId, ApiError> {
    Ok(crate::platform::parse_id(ExperimentId::parse, text)?)
}

fn trial_id(text: &str) -> Result<TrialId, ApiError> {
    Ok(crate::platform::parse_id(TrialId::parse, text)?)
}

#[derive(Deserialize)]
struct ExperimentsQuery {
    state: Option<String>,
    family: Option<String>,
    name: Option<String>,
    tag: Option<String>,
    limit: Option<u32>,
}

async fn experiments(
    State(web): State<Web>,
    headers: HeaderMap,
    Query(q): Query<ExperimentsQuery>,
) -> Result<Response, ApiError> {
    let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let filter = db::ExperimentFilter {
        state: nonempty(q.state),
        family: nonempty(q.family),
        name: nonempty(q.name),
        tag: nonempty(q.tag),
        limit: q.limit.unwrap_or(200).clamp(1, 1000),
    };
    let list = db::dashboard_experiments(web.reads(), &filter)
        .await
        .map_err(|e| web.explain(e))?;
    Ok(fresh(&headers, &json!({ "experiments": list })))
}

async fn experiment(State(web): State<Web>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = experiment_id(&id)?;
    let mut e = db::dashboard_experiment(web.reads(), id)
        .await
        .map_err(|e| web.explain(e))?;
    if e["pending"].as_i64().unwrap_or(0) > 0 {
        e["waiting"] = db::waiting_reason(web.reads(), id, web.lease_ttl)
            .await
            .map_err(|e| web.explain(e))?
            .into();
    }
    Ok(fresh(&headers, &json!({ "experiment": e })))
}

#[derive(Deserialize)]
struct TrialsQuery {
    format: Option<String>,
}

async fn trials(
    State(web): State<Web>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TrialsQuery>,
) -> Result<Response, ApiError> {
    let id = experiment_id(&id)?;
    let trials = db::dashboard_trials(web.reads(), id)
        .await
        .map_err(|e| web.explain(e))?;
    match q.format.as_deref() {
        None | Some("json") => {
            let mut body = Vec::with_capacity(trials.len() + 12);
            body.extend_from_slice(b"{\"trials\":");
            body.extend_from_slice(trials.as_bytes());
            body.push(b'}');
            Ok(fresh_bytes(&headers, body))
        }
        Some("csv") => Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"trials-{id}.csv\""),
                ),
            ],
            trials_csv(
                &serde_json::from_str(&trials)
                    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
            ),
        )
            .into_response()),
        Some(other) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("format `{other}`: expected json or csv"),
        )),
    }
}

/// The trial table as CSV: ordinal, id, state, objective, attempts, then every
/// parameter (`param.NAME`) and final metric (`metric.NAME`), blank where a trial has none.
fn trials_csv(trials: &Value) -> String {
    let rows = trials.as_array().map(Vec::as_slice).unwrap_or_default();
    let keys = |field: &str| -> BTreeSet<String> {
        rows.iter()
            .filter_map(|t| t[field].as_object())
            .flat_map(|o| o.keys().cloned())
            .collect()
    };
    let (params, metrics) = (keys("params"), keys("metrics"));
    let cell = |v: &Value| -> String {
        let text = match v {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if text.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text
        }
    };
    let mut header: Vec<String> = ["ordinal", "trial_id", "state", "objective", "attempts"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    header.extend(params.iter().map(|p| cell(&Value::String(format!("param.{p}")))));
    header.extend(metrics.iter().map(|m| cell(&Value::String(format!("metric.{m}")))));
    let mut out = header.join(",") + "\n";
    for t in rows {
        let mut line: Vec<String> = ["ordinal", "id", "state", "objective", "attempts"]
            .iter()
            .map(|f| cell(&t[*f]))
            .collect();
        line.extend(params.iter().map(|p| cell(&t["params"][p])));
        line.extend(metrics.iter().map(|m| cell(&t["metrics"][m])));
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

#[derive(Deserialize)]
struct CurvesQuery {
    /// A metric's name; the objective (else the first recorded) when left out.
    metric: Option<String>,
    /// Trial ids separated by commas; the top trials when left out.
    trials: Option<String>,
    /// Points per series (the width drawn); at most `MAX_POINTS`.
    points: Option<usize>,
    /// With `trials` left out: how many of the best.
    top: Option<u32>,
}

fn points_wanted(points: Option<usize>) -> usize {
    points.unwrap_or(DEFAULT_POINTS).clamp(3, MAX_POINTS)
}

/// Each trial's curve of `name`, reduced to `points`.
async fn series(
    web: &Web,
    experiment: Option<ExperimentId>,
    trials: &[TrialId],
    name: &str,
    points: usize,
) -> Result<Vec<Value>, ApiError> {
    let ordinals: BTreeMap<uuid::Uuid, i32> = db::trial_ordinals(web.reads(), experiment, trials)
        .await
        .map_err(|e| web.explain(e))?
        .into_iter()
        .collect();
    let ids: Vec<uuid::Uuid> = ordinals.keys().copied().collect();
    let (rows, totals) = db::curve_points(web.reads(), &ids, name, points * 2)
        .await
        .map_err(|e| web.explain(e))?;
    let totals: BTreeMap<uuid::Uuid, i64> = totals.into_iter().collect();
    let mut by_trial: BTreeMap<uuid::Uuid, (i32, Vec<(i64, f64)>)> = BTreeMap::new();
    for (trial, step, value) in rows {
        let ordinal = ordinals.get(&trial).copied().unwrap_or_default();
        by_trial
            .entry(trial)
            .or_insert_with(|| (ordinal, Vec::new()))
            .1
            .push((step, value));
    }
    // In the order asked for.
    Ok(trials
        .iter()
        .filter_map(|t| by_trial.remove(&t.0).map(|v| (t.0, v)))
        .map(|(trial, (ordinal, all))| {
            let kept = lttb(&all, points);
            json!({
                "trial_id": trial,
                "ordinal": ordinal,
                "metric": name,
                "total_points": totals.get(&trial).copied().unwrap_or(all.len() as i64),
                "steps": kept.iter().map(|p| p.0).collect::<Vec<_>>(),
                "values": kept.iter().map(|p| p.1).collect::<Vec<_>>(),
            })
        })
        .collect())
}

async fn experiment_curves(
    State(web): State<Web>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<CurvesQuery>,
) -> Result<Response, ApiError> {
    let id = experiment_id(&id)?;
    let trials: Vec<TrialId> = match q.trials.as_deref().filter(|t| !t.trim().is_empty()) {
        Some(list) => list
            .split(',')
            .map(|t| trial_id(t.trim()))
            .take(MAX_CURVE_TRIALS + 1)
            .collect::<Result<_, _>>()?,
        None => db::top_trials(
            web.reads(),
            id,
            q.top.unwrap_or(DEFAULT_TOP).clamp(1, MAX_CURVE_TRIALS as u32),
        )
        .await
        .map_err(|e| web.explain(e))?,
    };
    if trials.len() > MAX_CURVE_TRIALS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_CURVE_TRIALS} trials per request"),
        ));
    }
    let metric = match q.metric.filter(|m| !m.is_empty()) {
        Some(m) => m,
        None => {
            let e = db::dashboard_experiment(web.reads(), id)
                .await
                .map_err(|e| web.explain(e))?;
            let first = e["metrics"].get(0).and_then(Value::as_str).map(str::to_string);
            e["objective_metric"]
                .as_str()
                .map(str::to_string)
                .or(first)
                .unwrap_or_default()
        }
    };
    let points = points_wanted(q.points);
    let series = series(&web, Some(id), &trials, &metric, points).await?;
    Ok(fresh(
        &headers,
        &json!({ "metric": metric, "points": points, "series": series }),
    ))
}

#[derive(Deserialize)]
struct ReportQuery {
    /// At most this many rows of each table (each table then says its `total_rows`);
    /// every row when left out.
    rows: Option<usize>,
    /// `false`: without the report as text.
    text: Option<bool>,
}

async fn report(
    State(web): State<Web>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, ApiError> {
    let id = experiment_id(&id)?;
    let mut report = crate::platform::reports::build(web.reads(), id)
        .await
        .map_err(|e| web.explain(e))?;
    let text = (q.text != Some(false)).then(|| report.to_text());
    let totals: Vec<usize> = report.tables.iter().map(|t| t.rows.len()).collect();
    if let Some(rows) = q.rows {
        for table in &mut report.tables {
            table.rows.truncate(rows);
        }
    }
    let mut body = json!({ "report": report });
    for (table, total) in body["report"]["tables"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .zip(totals)
    {
        table["total_rows"] = total.into();
    }
    if let Some(text) = text {
        body["text"] = text.into();
    }
    Ok(fresh(&headers, &body))
}

async fn trial(State(web): State<Web>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = trial_id(&id)?;
    Ok(fresh(
        &headers,
        &json!({ "trial": db::dashboard_trial(web.reads(), id).await.map_err(|e| web.explain(e))? }),
    ))
}

async fn trial_curves(
    State(web): State<Web>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<CurvesQuery>,
) -> Result<Response, ApiError> {
    let id = trial_id(&id)?;
    let trial = db::dashboard_trial(web.reads(), id).await.map_err(|e| web.explain(e))?;
    let names: Vec<String> = match q.metric.filter(|m| !m.is_empty()) {
        Some(m) => vec![m],
        None => serde_json::from_value(trial["metric_names"].clone()).unwrap_or_default(),
    };
    let points = points_wanted(q.points);
    let mut all = Vec::new();
    for name in &names {
        all.extend(series(&web, None, &[id], name, points).await?);
    }
    Ok(fresh(&headers, &json!({ "points": points, "series": all })))
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    /// The attempt; the newest when left out.
    attempt: Option<u32>,
}

async fn trial_logs(
    State(web): State<Web>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let id = trial_id(&id)?;
    let logs = crate::platform::logs::read(web.reads(), web.objects.as_ref(), id, q.attempt.unwrap_or(0))
        .await
        .map_err(|e| web.explain(e))?;
    Ok(fresh(&headers, &json!({ "logs": logs })))
}

async fn workers(State(web): State<Web>, headers: HeaderMap) -> Result<Response, ApiError> {
    let rows = db::list_workers(web.reads(), web.lease_ttl)
        .await
        .map_err(|e| web.explain(e))?;
    let running = db::running_by_worker(web.reads()).await.map_err(|e| web.explain(e))?;
    let workers: Vec<Value> = rows
        .iter()
        .map(|w| {
            let state = if w.lost {
                "lost"
            } else if w.draining_since.is_some() {
                "draining"
            } else if w.unhealthy.is_some() {
                "unhealthy"
            } else {
                "live"
            };
            json!({
                "id": w.id.to_string(),
                "hostname": w.hostname,
                "devices": w.devices,
                "pool": w.pool,
                "labels": w.labels,
                "state": state,
                "unhealthy": w.unhealthy,
                "registered_at": w.registered_at,
                "last_seen_at": w.last_seen_at,
                "running": running
                    .iter()
                    .filter(|r| r.0 == w.id.0)
                    .map(|r| json!({ "trial_id": r.1, "experiment_id": r.2, "experiment": r.3 }))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(fresh(&headers, &json!({ "workers": workers })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trial_table_exports_as_csv_with_every_parameter_and_metric() {
        let trials = json!([
            {"ordinal": 0, "id": "a", "state": "succeeded", "objective": 0.5, "attempts": 1,
             "params": {"width": 64, "note": "x, \"y\""}, "metrics": {"eval_loss": 0.5}},
            {"ordinal": 1, "id": "b", "state": "failed", "objective": null, "attempts": 3,
             "params": {"width": 128}, "metrics": {}}
        ]);
        let csv = trials_csv(&trials);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "ordinal,trial_id,state,objective,attempts,param.note,param.width,metric.eval_loss"
        );
        assert_eq!(lines[1], "0,a,succeeded,0.5,1,\"x, \"\"y\"\"\",64,0.5");
        assert_eq!(lines[2], "1,b,failed,,3,,128,");
    }
}
