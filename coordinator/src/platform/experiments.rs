//! What a researcher may do to an experiment, for the gRPC and HTTP edges alike:
//! cancel, retry, tag, annotate and delete it (its submitter or an admin).

use ablate_schema::ExperimentId;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use sqlx::PgPool;

use crate::auth::{Caller, Role};
use crate::db::{self, Outcome};
use crate::error::{Error, Result};
use crate::Objects;

/// Lets through an experiment's submitter and admins (anyone, when the coordinator
/// runs without tokens); `verb` says what was refused. An unknown experiment is
/// refused as such, whoever asks.
pub async fn authorize(pool: &PgPool, caller: Option<&Caller>, id: ExperimentId, verb: &str) -> Result<()> {
    let owner = db::submitter(pool, id).await?;
    if let Some(caller) = caller.filter(|c| c.role != Role::Admin) {
        if owner.as_deref() != Some(caller.name.as_str()) {
            return Err(Error::Forbidden(format!(
                "experiment {id} was submitted by {}; only they or an admin may {verb} it",
                owner.as_deref().unwrap_or("no one with a token")
            )));
        }
    }
    Ok(())
}

/// Cancels an experiment's pending and running trials; returns how many.
pub async fn cancel(pool: &PgPool, caller: Option<&Caller>, id: ExperimentId) -> Result<u64> {
    authorize(pool, caller, id, "cancel").await?;
    let n = db::cancel(pool, id).await?;
    tracing::info!(experiment = %id, trials = n, "experiment cancelled");
    Ok(n)
}

/// Parses `ablate retry --outcome`'s values; none means all three.
pub fn outcomes(names: &[String]) -> Result<Vec<Outcome>> {
    if names.is_empty() {
        return Ok(Outcome::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            Outcome::parse(n.trim()).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "outcome: `{n}` is not one; expected failed, crashed or cancelled (or several, comma-separated)"
                ))
            })
        })
        .collect()
}

/// Puts a finished experiment's trials of these outcomes back to pending, their
/// attempts kept; returns how many. A running experiment, or one with no such
/// trial, is refused and left as it was.
pub async fn retry(pool: &PgPool, caller: Option<&Caller>, id: ExperimentId, outcomes: &[Outcome]) -> Result<u64> {
    authorize(pool, caller, id, "retry").await?;
    let mut tx = pool.begin().await?;
    let held = db::hold(&mut tx, id).await?;
    held.refuse_running(id, "retry")?;
    let n = db::retry(&mut tx, id, outcomes).await?;
    if n == 0 {
        let names: Vec<&str> = outcomes.iter().map(|o| o.as_str()).collect();
        return Err(Error::Conflict(format!(
            "experiment {id} ({}) has no {} trial to retry; `ablate status {id}` shows its trials",
            held.name,
            names.join(" or ")
        )));
    }
    tx.commit().await?;
    tracing::info!(experiment = %id, trials = n, "experiment retried");
    Ok(n)
}

/// The longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;
/// The longest note, in characters.
pub const MAX_NOTE_CHARS: usize = 4096;

fn check_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.chars().count() <= MAX_TAG_CHARS
        && tag.chars().all(|c| c.is_alphanumeric() || "-_.:/=+@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "tag `{tag}`: expected 1 to {MAX_TAG_CHARS} letters, digits or - _ . : / = + @ (such as `baseline` or `paper:fig2`)"
        )))
    }
}

/// Adds and removes tags; returns the experiment's tags now.
pub async fn tag(
    pool: &PgPool,
    caller: Option<&Caller>,
    id: ExperimentId,
    add: &[String],
    remove: &[String],
) -> Result<Vec<String>> {
    for t in add.iter().chain(remove) {
        check_tag(t)?;
    }
    authorize(pool, caller, id, "tag").await?;
    db::tag(pool, id, add, remove).await
}

/// Sets an experiment's note (empty clears it).
pub async fn note(pool: &PgPool, caller: Option<&Caller>, id: ExperimentId, note: &str) -> Result<()> {
    if note.chars().count() > MAX_NOTE_CHARS || note.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "note: expected text of at most {MAX_NOTE_CHARS} characters, without NUL"
        )));
    }
    authorize(pool, caller, id, "annotate").await?;
    db::set_note(pool, id, note).await
}

/// What `ablate delete` removed.
#[derive(Debug, Default)]
pub struct Deletion {
    pub trials: u64,
    pub objects: u64,
    pub bytes: u64,
    pub handed_over: u64,
}

/// Deletes a finished experiment: its rows in one transaction, then its objects
/// (checkpoints, logs, its code when no other experiment runs it), all but those
/// another experiment's reused trials still reference. An object left behind by
/// a failure here is one no row references: `ablate gc` removes it.
pub async fn delete(
    pool: &PgPool,
    objects: Option<&Objects>,
    caller: Option<&Caller>,
    id: ExperimentId,
) -> Result<Deletion> {
    authorize(pool, caller, id, "delete").await?;
    let mut tx = pool.begin().await?;
    db::lock_experiment(&mut tx, id.0).await?;
    let held = db::hold(&mut tx, id).await?;
    held.refuse_running(id, "delete")?;
    let deleted = db::delete(&mut tx, id).await?;
    tx.commit().await?;
    let mut done = Deletion {
        trials: deleted.trials,
        handed_over: deleted.handed_over,
        ..Default::default()
    };
    if let Some(objects) = objects {
        let prefix = ablate_schema::objects::under(&objects.prefix, &["experiments", &id.to_string()]);
        let kept: std::collections::HashSet<String> = deleted
            .kept_paths
            .iter()
            .flat_map(|p| [p.clone(), ablate_schema::objects::sidecar_of(p)])
            .collect();
        let listed: Vec<object_store::ObjectMeta> = objects
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::Objects(format!("listing {prefix}: {e}")))?;
        for meta in listed.iter().filter(|m| !kept.contains(m.location.as_ref())) {
            remove(objects, &meta.location).await?;
            done.objects += 1;
            done.bytes += meta.size;
        }
        if let Some(hash) = &deleted.unused_code {
            let path = ablate_schema::objects::code_path(&objects.prefix, hash);
            if let Ok(meta) = objects.store.head(&path).await {
                remove(objects, &path).await?;
                done.objects += 1;
                done.bytes += meta.size;
            }
        }
    }
    tracing::info!(experiment = %id, trials = done.trials, objects = done.objects, bytes = done.bytes,
                   handed_over = done.handed_over, "experiment deleted");
    Ok(done)
}

/// Deletes one object; one already gone is no error.
pub async fn remove(objects: &Objects, path: &object_store::path::Path) -> Result<()> {
    match objects.store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(Error::Objects(format!("deleting {path}: {e}"))),
    }
}
