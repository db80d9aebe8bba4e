//! Checkpoint retention (the spec's `[checkpoints] keep`, applied as trials finish)
//! and `ablate gc` (objects no row references).
//!
//! Both remove a row before its object, so a failure between the two leaves an
//! object no row references (which `gc` removes), never a row without its object.
//! Neither touches a trial that may still write or resume: retention looks only at
//! succeeded and pruned trials, `gc` only at objects of trials in a final state and
//! older than its minimum age, and a checkpoint that a PBT member took or another
//! row references stays.

use std::collections::HashSet;
use std::time::Duration;

use ablate_schema::objects::{sidecar_of, tensors_of};
use ablate_schema::Keep;
use futures::TryStreamExt;
use sqlx::PgPool;

use super::experiments::remove;
use crate::db;
use crate::error::{Error, Result};
use crate::Objects;

/// Which of a trial's checkpoints (newest first: step, objective's value there, taken
/// by a PBT member) `keep` drops: their steps.
pub fn to_drop(keep: Keep, checkpoints: &[(i64, Option<f64>, bool)], maximize: bool) -> Vec<i64> {
    let kept: HashSet<i64> = match keep {
        Keep::All => return Vec::new(),
        Keep::Last => checkpoints.iter().take(1).map(|c| c.0).collect(),
        Keep::Newest(n) => checkpoints.iter().take(n as usize).map(|c| c.0).collect(),
        Keep::Best => {
            // The best value, the newest of equals; the newest when none has a value.
            let better = |a: f64, b: f64| if maximize { a > b } else { a < b };
            let mut best: Option<(i64, f64)> = None;
            for &(step, value, _) in checkpoints {
                if let Some(v) = value.filter(|v| v.is_finite()) {
                    if best.is_none_or(|(_, b)| better(v, b)) {
                        best = Some((step, v));
                    }
                }
            }
            best.map(|b| b.0)
                .or_else(|| checkpoints.first().map(|c| c.0))
                .into_iter()
                .collect()
        }
    };
    checkpoints
        .iter()
        .filter(|(step, _, taken)| !kept.contains(step) && !taken)
        .map(|c| c.0)
        .collect()
}

/// One pass: up to `limit` finished trials' checkpoints thinned as their experiments
/// keep them. Returns (trials looked at, objects removed).
pub async fn retain(pool: &PgPool, objects: &Objects, limit: i64) -> Result<(usize, usize)> {
    let mut tx = pool.begin().await?;
    let work = db::to_retain(&mut tx, limit).await?;
    let mut gone = Vec::new();
    for t in &work {
        let keep = Keep::from_column(&t.keep).unwrap_or(Keep::All);
        let rows = db::checkpoints_for_retention(&mut tx, t.trial, t.objective.as_deref()).await?;
        let shape: Vec<(i64, Option<f64>, bool)> = rows.iter().map(|r| (r.0, r.2, r.3)).collect();
        let steps = to_drop(keep, &shape, t.maximize);
        gone.extend(db::drop_checkpoints(&mut tx, t.trial, &steps).await?);
    }
    tx.commit().await?;
    let mut removed = 0;
    for path in &gone {
        for p in [path.clone(), sidecar_of(path)] {
            remove(objects, &object_store::path::Path::from(p)).await?;
            removed += 1;
        }
    }
    Ok((work.len(), removed))
}

/// Retention every `every`, while the coordinator runs.
pub async fn retain_forever(pool: PgPool, objects: Objects, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        loop {
            match retain(&pool, &objects, 200).await {
                Ok((trials, removed)) => {
                    if removed > 0 {
                        tracing::info!(
                            trials,
                            objects = removed,
                            "checkpoints thinned as the experiments keep them"
                        );
                    }
                    if trials < 200 {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "checkpoint retention pass failed");
                    break;
                }
            }
        }
    }
}

/// An object `gc` removes (or would), and why.
#[derive(Debug, Clone)]
pub struct Garbage {
    pub path: String,
    pub bytes: u64,
    pub reason: String,
}

/// Finds the objects under the store's prefix that no row references and removes
/// them (not with `dry_run`). Objects younger than `min_age`, those of trials that
/// may still write (pending, running) and anything not ablate's stay.
pub async fn collect_garbage(
    pool: &PgPool,
    objects: &Objects,
    dry_run: bool,
    min_age: Duration,
) -> Result<(Vec<Garbage>, u64)> {
    // Listed first, then the references read: an object written after the list is
    // not looked at, and one whose row came after it is kept by its age.
    let listed: Vec<object_store::ObjectMeta> = objects
        .store
        .list(Some(&objects.prefix))
        .try_collect()
        .await
        .map_err(|e| Error::Objects(format!("listing {}: {e}", objects.prefix)))?;
    let refs = db::references(pool).await?;
    let cutoff = chrono::Utc::now() - chrono::Duration::from_std(min_age).unwrap_or(chrono::Duration::MAX);
    let skip = objects.prefix.parts().count();
    let mut garbage = Vec::new();
    for meta in &listed {
        if meta.last_modified > cutoff {
            continue;
        }
        // A checkpoint a row references stays wherever it lies (a reused trial's, handed
        // to another experiment when its own was deleted, lies under the deleted one's folder).
        let tensors = tensors_of(meta.location.as_ref());
        if refs.checkpoint_paths.contains(&tensors) {
            continue;
        }
        let parts: Vec<String> = meta
            .location
            .parts()
            .skip(skip)
            .map(|p| p.as_ref().to_string())
            .collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let reason = match parts.as_slice() {
            ["code", file] => file
                .strip_suffix(".tar.gz")
                .filter(|hash| !refs.code_hashes.contains(*hash))
                .map(|_| "code no experiment runs".to_string()),
            ["experiments", experiment, rest @ ..] => {
                match uuid::Uuid::parse_str(experiment)
                    .ok()
                    .and_then(|e| refs.experiments.get(&e))
                {
                    None => Some(format!("experiment {experiment} no longer exists")),
                    Some(trials) => match rest {
                        ["trials", trial, tail @ ..] => {
                            match uuid::Uuid::parse_str(trial).ok().and_then(|t| trials.get(&t)) {
                                None => Some(format!("trial {trial} no longer exists")),
                                Some(_) if tail.first() == Some(&"logs") => None,
                                Some(finished) => {
                                    let is_checkpoint = tail.len() == 1 && tail[0].starts_with("step-");
                                    (*finished && is_checkpoint).then(|| "a checkpoint no row references".to_string())
                                }
                            }
                        }
                        _ => None,
                    },
                }
            }
            _ => None,
        };
        if let Some(reason) = reason {
            garbage.push(Garbage {
                path: meta.location.to_string(),
                bytes: meta.size,
                reason,
            });
        }
    }
    if !dry_run {
        for g in &garbage {
            remove(objects, &object_store::path::Path::from(g.path.as_str())).await?;
        }
        let bytes: u64 = garbage.iter().map(|g| g.bytes).sum();
        tracing::info!(objects = garbage.len(), bytes, "garbage collected");
    }
    Ok((garbage, listed.len() as u64))
}
