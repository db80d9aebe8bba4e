//! A trial's logs: each attempt's process output (stdout and stderr, bounded), which
//! its worker keeps in the object store while it runs and when it ends; read here
//! for `ablate logs` and the dashboard's trial page.

use ablate_schema::TrialId;
use object_store::ObjectStoreExt;
use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::Objects;

/// One attempt's log as the worker last kept it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Logs {
    pub attempt: u32,
    /// Attempts the trial has had so far.
    pub attempts: u32,
    pub text: String,
    /// Whether this attempt still runs (its log grows).
    pub running: bool,
}

/// Attempt `attempt` of `trial` (0: its newest).
pub async fn read(pool: &PgPool, objects: Option<&Objects>, trial: TrialId, attempt: u32) -> Result<Logs> {
    let row: Option<(uuid::Uuid, i32, String)> =
        sqlx::query_as("select experiment_id, attempt, state from trials where id = $1")
            .bind(trial.0)
            .fetch_optional(pool)
            .await?;
    let (experiment, attempts, state) = row.ok_or_else(|| Error::NotFound(format!("no trial {trial}")))?;
    let attempts = attempts.max(0) as u32;
    if attempts == 0 {
        return Err(Error::NotFound(format!(
            "trial {trial} has not started yet ({state}): it has no log"
        )));
    }
    let attempt = if attempt == 0 { attempts } else { attempt };
    if attempt > attempts {
        return Err(Error::NotFound(format!(
            "trial {trial} has had {attempts} attempt(s); there is no attempt {attempt}"
        )));
    }
    let objects = objects.ok_or_else(|| {
        Error::NotFound(
            "this coordinator reads no object store, so it has no trial logs: start it with \
             `ablate serve --object-store URL` (the workers' store)"
                .into(),
        )
    })?;
    let path = ablate_schema::objects::log_path(&objects.prefix, &experiment.to_string(), &trial.to_string(), attempt);
    let text = match objects.store.get(&path).await {
        Ok(got) => {
            let bytes = got.bytes().await.map_err(|e| Error::Objects(e.to_string()))?;
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(object_store::Error::NotFound { .. }) => String::new(),
        Err(e) => return Err(Error::Objects(e.to_string())),
    };
    Ok(Logs {
        attempt,
        attempts,
        text,
        running: attempt == attempts && state == "running",
    })
}
