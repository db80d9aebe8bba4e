//! Who may do what. A client sends `authorization: Bearer <token>`; the
//! coordinator keeps only SHA-256 hashes of tokens (table `tokens`), holds the
//! valid ones in memory (reloaded every second, and at once after a change
//! made here), and checks every call before it reaches a service: a missing,
//! unknown, expired or revoked token gets UNAUTHENTICATED, a token whose role
//! the access policy (`policy.rs`) does not let call the method
//! PERMISSION_DENIED naming the roles that may, and a method the policy does
//! not list is refused to every token.
//! Tokens never appear in logs or messages.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::{db, policy};

pub use crate::policy::Role;

/// The authenticated caller of a request (in its extensions when auth is on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The hex SHA-256 of a token's secret: all the database keeps.
pub fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new secret: `abl_` and 256 random bits in hex.
pub fn new_secret() -> String {
    format!("abl_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

type Valid = HashMap<String, (Caller, Option<DateTime<Utc>>)>;

/// The valid tokens, by hash, kept fresh from the database.
#[derive(Clone)]
pub struct Tokens {
    pool: PgPool,
    valid: Arc<RwLock<Valid>>,
}

impl Tokens {
    pub async fn load(pool: PgPool) -> crate::Result<Tokens> {
        let tokens = Tokens {
            pool,
            valid: Arc::default(),
        };
        tokens.reload().await?;
        Ok(tokens)
    }

    /// Reads the valid tokens again (after a create or revoke, and every second).
    pub async fn reload(&self) -> crate::Result<()> {
        let rows = db::valid_tokens(&self.pool).await?;
        let fresh: Valid = rows
            .into_iter()
            .filter_map(|(hash, name, role, expires)| {
                Some((
                    hash,
                    (
                        Caller {
                            name,
                            role: Role::parse(&role)?,
                        },
                        expires,
                    ),
                ))
            })
            .collect();
        *self.valid.write().expect("token lock") = fresh;
        Ok(())
    }

    pub fn spawn_reloads(&self) -> tokio::task::JoinHandle<()> {
        let tokens = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(error) = tokens.reload().await {
                    tracing::warn!(%error, "could not reload tokens");
                }
            }
        })
    }

    /// The caller a bearer token stands for, if it is valid now.
    pub fn caller(&self, token: &str) -> Option<Caller> {
        let valid = self.valid.read().expect("token lock");
        let (caller, expires) = valid.get(&hash(token))?;
        match expires {
            Some(at) if *at <= Utc::now() => None,
            _ => Some(caller.clone()),
        }
    }

    /// Checks one request's token against the method it calls.
    fn check(&self, path: &str, authorization: Option<&str>) -> Result<Caller, tonic::Status> {
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                tonic::Status::unauthenticated(
                    "no token: set ABLATE_TOKEN, run `ablate login URL`, or give a worker --token-file",
                )
            })?;
        let caller = self.caller(token).ok_or_else(|| {
            tonic::Status::unauthenticated("the token is unknown, expired or revoked; ask an admin for a new one")
        })?;
        let Some(access) = policy::grpc(path) else {
            return Err(tonic::Status::permission_denied(format!(
                "{path} is not in the coordinator's access policy, so no token may call it"
            )));
        };
        policy::check(access, caller.role).map_err(|roles| {
            tonic::Status::permission_denied(format!(
                "{path} needs a {} token; `{}` is a {} token",
                policy::names(roles),
                caller.name,
                caller.role.as_str()
            ))
        })?;
        Ok(caller)
    }
}

/// The tower layer that checks every call when auth is on.
#[derive(Clone)]
pub struct AuthLayer {
    pub tokens: Option<Tokens>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Tokens>,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            let authorization = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match tokens.check(request.uri().path(), authorization) {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                }
                Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
            }
        }
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        Box::pin(inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_and_only_their_hashes_kept() {
        assert_eq!(hash("abc").len(), 64);
        assert!(new_secret().starts_with("abl_") && new_secret().len() == 68);
    }
}
