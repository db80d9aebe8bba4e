//! The API's writes and its SQL, for clients such as the Python package's
//! `ablate.Client`: submit a spec, cancel an experiment, run a read-only query.
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
use crate::{db, submit, Error};

#[derive(Deserialize)]
pub(super) struct SubmitBody {
    /// The spec: its TOML or YAML text, or the spec itself as a JSON object.
    spec: Value,
    /// `toml` or `yaml`, for a text; TOML when left out.
    format: Option<String>,
}

/// `POST /api/v1/experiments`: `{"spec": TEXT or OBJECT, "format": "toml" | "yaml"}`;
/// 201 with `{"experiment_id", "trial_count"}`, or 400 naming the field to fix.
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
    let by = caller.as_ref().map(|c| c.name.as_str());
    let result = submit::submit_as(&web.pool, &text, format, &web.limits, &web.data_roots, by, None).await;
    match result {
        Ok((id, count)) => Ok((
            StatusCode::CREATED,
            Json(json!({ "experiment_id": id.to_string(), "trial_count": count })),
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
    let n = crate::platform::experiments::cancel(&web.pool, caller.as_deref(), id).await?;
    Ok(Json(json!({ "cancelled": n })).into_response())
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
