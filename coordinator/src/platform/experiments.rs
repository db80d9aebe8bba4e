//! What a researcher may do to an experiment, for the gRPC and HTTP edges alike.

use ablate_schema::ExperimentId;
use sqlx::PgPool;

use crate::auth::{Caller, Role};
use crate::db;
use crate::error::{Error, Result};

/// Cancels an experiment's pending and running trials; returns how many. Only its
/// submitter or an admin may (anyone, when the coordinator runs without tokens).
pub async fn cancel(pool: &PgPool, caller: Option<&Caller>, id: ExperimentId) -> Result<u64> {
    if let Some(caller) = caller.filter(|c| c.role != Role::Admin) {
        let owner = db::submitter(pool, id).await?;
        if owner.as_deref() != Some(caller.name.as_str()) {
            return Err(Error::Forbidden(format!(
                "experiment {id} was submitted by {}; only they or an admin may cancel it",
                owner.as_deref().unwrap_or("no one with a token")
            )));
        }
    }
    let n = db::cancel(pool, id).await?;
    tracing::info!(experiment = %id, trials = n, "experiment cancelled");
    Ok(n)
}
