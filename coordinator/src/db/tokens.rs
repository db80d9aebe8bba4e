//! Access tokens: names, roles, hashes of their secrets, expiry and revocation.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;

use crate::error::{Error, Result};

/// A token as listed: never its secret, which is not kept.
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub name: String,
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Stores a new token's hash; refuses a name in use.
pub async fn create_token(
    pool: &PgPool,
    name: &str,
    role: &str,
    hash: &str,
    expires_at: Option<DateTime<Utc>>,
) -> Result<()> {
    let done = sqlx::query(
        "insert into tokens (name, role, hash, expires_at) values ($1, $2, $3, $4) on conflict (name) do nothing",
    )
    .bind(name)
    .bind(role)
    .bind(hash)
    .bind(expires_at)
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(Error::InvalidArgument(format!(
            "a token named `{name}` exists; revoke it or pick another name"
        )));
    }
    Ok(())
}

type Listed = (
    String,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

pub async fn list_tokens(pool: &PgPool) -> Result<Vec<TokenRow>> {
    let rows: Vec<Listed> =
        sqlx::query_as("select name, role, created_at, expires_at, revoked_at from tokens order by created_at")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(name, role, created_at, expires_at, revoked_at)| TokenRow {
            name,
            role,
            created_at,
            expires_at,
            revoked_at,
        })
        .collect())
}

/// Revokes a token by name; false when no live token has that name.
pub async fn revoke_token(pool: &PgPool, name: &str) -> Result<bool> {
    let done = sqlx::query("update tokens set revoked_at = now() where name = $1 and revoked_at is null")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Every token that is neither revoked nor expired: (hash, name, role, expiry).
pub async fn valid_tokens(pool: &PgPool) -> Result<Vec<(String, String, String, Option<DateTime<Utc>>)>> {
    Ok(sqlx::query_as(
        "select hash, name, role, expires_at from tokens
         where revoked_at is null and (expires_at is null or expires_at > now())",
    )
    .fetch_all(pool)
    .await?)
}

/// How registering a token of known secret went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    New,
    /// The name held this very token already.
    Kept,
    /// The name held another (or a revoked) token, which no longer works.
    Replaced,
}

/// Registers a token whose secret the operator made (a Kubernetes Secret):
/// stores its hash under `name` with `role`, replacing what the name held.
pub async fn register_token(pool: &PgPool, name: &str, role: &str, hash: &str) -> Result<Registered> {
    let existing: Option<(String, String, bool)> =
        sqlx::query_as("select hash, role, revoked_at is not null from tokens where name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    if let Some((h, r, revoked)) = &existing {
        if h == hash && r == role && !revoked {
            return Ok(Registered::Kept);
        }
    }
    let taken: Option<String> = sqlx::query_scalar("select name from tokens where hash = $1 and name <> $2")
        .bind(hash)
        .bind(name)
        .fetch_optional(pool)
        .await?;
    if let Some(other) = taken {
        return Err(Error::InvalidArgument(format!(
            "this token is registered already, as `{other}`; give each name its own token"
        )));
    }
    sqlx::query(
        "insert into tokens (name, role, hash) values ($1, $2, $3)
         on conflict (name) do update set role = excluded.role, hash = excluded.hash,
             created_at = now(), expires_at = null, revoked_at = null",
    )
    .bind(name)
    .bind(role)
    .bind(hash)
    .execute(pool)
    .await?;
    Ok(if existing.is_some() {
        Registered::Replaced
    } else {
        Registered::New
    })
}

/// Sets the fair-share weight of the user a token names; false when no token has that name.
pub async fn set_token_weight(pool: &PgPool, name: &str, weight: f64) -> Result<bool> {
    let done = sqlx::query("update tokens set weight = $2 where name = $1")
        .bind(name)
        .bind(weight)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}
