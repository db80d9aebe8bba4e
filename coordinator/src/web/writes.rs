//! The API's writes and its SQL, for clients such as the Python package's
//! `ablate.Client`: submit a spec (or extend an experiment with one), cancel, retry,
//! tag, annotate and delete an experiment, run a read-only query.
//! Their token comes in the `Authorization` header only (`session::authorize`),
//! and each does what its gRPC twin does, through the same code.

use std::time::Duration;

use ablate_schema::SpecFormat;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{experiment_id, ApiError, Web};
use crate::auth::Caller;
use crate::platform::experiments;
use crate::{db, submit, Error};

#[derive(Deserialize)]
pub(super) struct SubmitBody {
    /// The spec: its TOML or YAML text, or the spec itself as a JSON object.
    spec: Value,
    /// `toml` or `yaml`, for a text; TOML when left out.
    format: Option<String>,
    /// An experiment to add the spec's new points to (`ablate submit --into`).
    into: Option<String>,
}

/// `POST /api/v1/experiments`: `{"spec": TEXT or OBJECT, "format": "toml" | "yaml",
/// "into": EXP?}`; 201 with `{"experiment_id", "trial_count", "reused", "already_held"}`,
/// or 400 naming the field to fix.
pub(super) async fn submit(
    State(web): State<Web>,
    caller: Option<Extension<Caller>>,
    Json(body): Json<SubmitBody>,
) -> Result<Response, ApiError> {
    let (text, format) = match body.spec {
        Value::String(text) => {
            let format = match body.format.as_deref() {
                None => SpecFormat::Toml,
                Some(f) => SpecFormat::parse(f).ok_or_else(|| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        format!("unknown spec format `{f}`, expected toml or yaml"),
                    )
                })?,
            };
            (text, format)
        }
        // A JSON object is YAML.
        spec @ Value::Object(_) => (spec.to_string(), SpecFormat::Yaml),
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "`spec` is the spec's TOML or YAML text, or the spec as an object".into(),
            ))
        }
    };
    let into = body.into.as_deref().map(experiment_id).transpose()?;
    let submission = submit::Submission {
        text: &text,
        format,
        limits: &web.limits,
        data_roots: &web.data_roots,
        caller: caller.as_deref(),
        code: None,
        objects: web.objects.as_ref(),
        into,
    };
    match submit::submit_as(&web.pool, &submission).await {
        Ok(done) => Ok((
            StatusCode::CREATED,
            Json(json!({
                "experiment_id": done.id.to_string(),
                "trial_count": done.planned,
                "reused": done.reused,
                "already_held": done.already_held,
            })),
        )
            .into_response()),
        // The field to fix, apart, as the CLI prints it.
        Err(Error::InvalidSpec(e)) => Ok((
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": format!("invalid spec: {e}"), "path": e.path, "message": e.message })),
        )
            .into_response()),
        Err(e) => Err(e.into()),
    }
}

/// `POST /api/v1/experiments/{id}/cancel`: `{"cancelled": N}`; only its submitter or an admin.
pub(super) async fn cancel(
    State(web): State<Web>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = experiment_id(&id)?;
    let n = experiments::cancel(&web.pool, caller.as_deref(), id).await?;
    Ok(Json(json!({ "cancelled": n })).into_response())
}

#[derive(Deserialize)]
pub(super) struct RetryBody {
    /// failed, crashed, cancelled; all three when left out.
    #[serde(default)]
    outcomes: Vec<String>,
}

/// `POST /api/v1/experiments/{id}/retry`: `{"retried": N}`, as `ablate retry`.
pub(super) async fn retry(
    State(web): State<Web>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    Json(body): Json<RetryBody>,
) -> Result<Response, ApiError> {
    let id = experiment_id(&id)?;
    let outcomes = experiments::outcomes(&body.outcomes)?;
    let n = experiments::retry(&web.pool, caller.as_deref(), id, &outcomes).await?;
    Ok(Json(json!({ "retried": n })).into_response())
}

#[derive(Deserialize)]
pub(super) struct TagsBody {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// `POST /api/v1/experiments/{id}/tags`: `{"add": [...], "remove": [...]}`; `{"tags": [...]}`.
pub(super) async fn tags(
    State(web): State<Web>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    Json(body): Json<TagsBody>,
) -> Result<Response, ApiError> {
    let id = experiment_id(&id)?;
    let tags = experiments::tag(&web.pool, caller.as_deref(), id, &body.add, &body.remove).await?;
    Ok(Json(json!({ "tags": tags })).into_response())
}

#[derive(Deserialize)]
pub(super) struct NoteBody {
    note: String,
}

/// `POST /api/v1/experiments/{id}/note`: `{"note": TEXT}` (empty clears it).
pub(super) async fn note(
    State(web): State<Web>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    Json(body): Json<NoteBody>,
) -> Result<Response, ApiError> {
    let id = experiment_id(&id)?;
    experiments::note(&web.pool, caller.as_deref(), id, &body.note).await?;
    Ok(Json(json!({ "note": body.note })).into_response())
}

/// `DELETE /api/v1/experiments/{id}`: as `ablate delete`;
/// `{"trials", "objects", "bytes", "handed_over"}`.
pub(super) async fn delete(
    State(web): State<Web>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = experiment_id(&id)?;
    let done = experiments::delete(&web.pool, web.objects.as_ref(), caller.as_deref(), id).await?;
    Ok(Json(json!({
        "trials": done.trials, "objects": done.objects, "bytes": done.bytes, "handed_over": done.handed_over,
    }))
    .into_response())
}

#[derive(Deserialize)]
pub(super) struct SqlBody {
    query: String,
    /// Statement timeout in milliseconds; 30 s when left out.
    timeout_ms: Option<u64>,
}

/// `POST /api/v1/sql`: `{"query": "select ..."}` on the researchers' read-only
/// connection (the views in schema `ablate`), as `ablate sql`; `{"columns", "rows"}`.
pub(super) async fn sql(
    State(web): State<Web>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Json(body): Json<SqlBody>,
) -> Result<Response, ApiError> {
    let _admission = web.reader.admit(Some(peer.ip()))?;
    let timeout = Duration::from_millis(body.timeout_ms.unwrap_or(30_000));
    let result = db::read_only_query(&web.reader.pool, &body.query, timeout).await?;
    Ok(Json(json!({ "columns": result.columns, "rows": result.rows })).into_response())
}
