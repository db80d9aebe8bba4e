//! Making a token: a new secret, of which the database keeps only the hash.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::auth::{self, Role};
use crate::db;
use crate::error::Error;

/// Stores a new token named `name` for `role` (expiring at `expires`, if given);
/// returns its secret, which is shown once and kept nowhere.
pub async fn create(pool: &PgPool, name: &str, role: Role, expires: Option<DateTime<Utc>>) -> Result<String, Error> {
    let secret = auth::new_secret();
    db::create_token(pool, name, role.as_str(), &auth::hash(&secret), expires).await?;
    Ok(secret)
}
