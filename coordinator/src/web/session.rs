//! Who a request is: its token (`Authorization: Bearer`, else the session cookie
//! `/login` sets), checked against the access policy for the route it matched.

use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, Web};
use crate::auth::Tokens;
use crate::policy;

/// The session cookie.
const COOKIE: &str = "ablate_session";

/// The token of an `Authorization: Bearer` header.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
}

/// The token a request carries: `Authorization: Bearer`, else the session cookie.
fn request_token(headers: &HeaderMap) -> Option<String> {
    bearer_token(headers).or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v.to_string())
    })
}

/// The HTTP listener's guard: each route's rule in the access policy, checked against the
/// request's token (`Authorization: Bearer`, else the session cookie). Layered over every
/// route of the listener (`Router::route_layer`), so that it sees the matched route.
pub(crate) async fn authorize(
    State(tokens): State<Option<Tokens>>,
    matched: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(tokens) = &tokens else {
        return next.run(request).await;
    };
    let route = matched.as_ref().map_or("", |m| m.as_str());
    // A write (any method but GET and HEAD) takes its token from the Authorization
    // header alone: a browser sends the session cookie with a request another site
    // makes it send, never a header, so no other site can write with the session.
    let write = !matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    if write && bearer_token(request.headers()).is_none() {
        return ApiError(
            StatusCode::FORBIDDEN,
            "a write needs its token in an Authorization: Bearer header (the session cookie is for reading)".into(),
        )
        .into_response();
    }
    let Some(access) = policy::http(route) else {
        return ApiError(
            StatusCode::FORBIDDEN,
            format!("{route} is not in the coordinator's access policy, so no token may call it"),
        )
        .into_response();
    };
    if access == policy::Access::Anyone {
        return next.run(request).await;
    }
    let Some(token) = request_token(request.headers()).filter(|t| !t.is_empty()) else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "no token: open the link `ablate dashboard` prints, or send Authorization: Bearer <token>".into(),
        )
        .into_response();
    };
    let Some(caller) = tokens.caller(&token) else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "the token is unknown, expired or revoked; ask an admin for a new one".into(),
        )
        .into_response();
    };
    match policy::check(access, caller.role) {
        Ok(()) => {
            // Who calls, for the writes that record it or depend on it.
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(roles) => ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{route} needs a {} token; `{}` is a {} token",
                policy::names(roles),
                caller.name,
                caller.role.as_str()
            ),
        )
        .into_response(),
    }
}

#[derive(Deserialize)]
pub(super) struct LoginQuery {
    token: Option<String>,
    /// Where to go once logged in: a path on this server, such as `/#/workers`.
    next: Option<String>,
}

/// `/login?token=T[&next=/#/...]`: a valid researcher or admin token becomes
/// the session cookie (HttpOnly, SameSite=Strict), and the page opens without
/// it in the address.
pub(super) async fn login(State(web): State<Web>, Query(q): Query<LoginQuery>) -> Response {
    let token = q.token.unwrap_or_default();
    let valid = match &web.tokens {
        None => true,
        Some(tokens) => tokens
            .caller(&token)
            .is_some_and(|c| policy::check(policy::DASHBOARD_SESSION, c.role).is_ok()),
    };
    if !valid || token.chars().any(|c| !c.is_ascii_graphic() || c == ';') {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "this login link's token is unknown, expired, revoked or a worker's; run `ablate dashboard` for a new link\n",
        )
            .into_response();
    }
    let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age=2592000");
    // Only a path on this server: never another site.
    let next = q
        .next
        .filter(|n| n.starts_with('/') && !n.starts_with("//") && !n.contains(['\\', '\r', '\n']))
        .unwrap_or_else(|| "/".into());
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, next), (header::SET_COOKIE, cookie)],
    )
        .into_response()
}

pub(super) async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_string()),
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
            ),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn tokens_come_from_the_header_or_the_session_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=b; ablate_session=abl_x"));
        assert_eq!(request_token(&headers).as_deref(), Some("abl_x"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer abl_y"));
        assert_eq!(request_token(&headers).as_deref(), Some("abl_y"));
        assert_eq!(request_token(&HeaderMap::new()), None);
    }
}
