//! A worker's lease: the heads `db::lease_heads` picks, fused into groups by the
//! queue's rules (`ablate_experiments::queue`, which `ablate-worker sweep` runs by):
//! heads that share a fusion key join the first group of it with room, then each
//! group fills from the pending trials of its key (`db::fuse_with`).
//!
//! The [`Lessor`] serves the leases of workers that ask at about the same time
//! with one statement (`db::lease_heads_many`) per group of alike workers, so
//! many workers cost the database about what one does.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use ablate_experiments::fusion;
use ablate_schema::WorkerId;
use sqlx::PgPool;

use crate::db::{self, LeasedTrial};
use crate::error::Result;

/// Leases up to `slots` groups' heads to `worker` (see `db::lease_heads` for the fair
/// share, GPUs, pools and labels) and fuses them; the members of a group come one after
/// another, sharing `fuse_group`. `slot_memory` (bytes; 0: unknown) sizes `fuse = "auto"`.
pub async fn lease(
    pool: &PgPool,
    worker: WorkerId,
    slots: u32,
    free_gpus: u32,
    slot_memory: u64,
    ttl: Duration,
) -> Result<Vec<LeasedTrial>> {
    let heads = db::lease_heads(pool, worker, slots, free_gpus, ttl).await?;
    fuse(pool, worker, heads, slot_memory, ttl).await
}

/// Fuses a worker's heads into groups (see the module's comment).
async fn fuse(
    pool: &PgPool,
    worker: WorkerId,
    heads: Vec<LeasedTrial>,
    slot_memory: u64,
    ttl: Duration,
) -> Result<Vec<LeasedTrial>> {
    let mut groups: Vec<(u32, Vec<LeasedTrial>)> = Vec::new();
    for mut head in heads {
        if head.fuses() {
            let room = groups.iter_mut().find(|(size, g)| {
                g[0].experiment == head.experiment && g[0].fuse_key == head.fuse_key && (g.len() as u32) < *size
            });
            if let Some((_, group)) = room {
                head.fuse_group = Some(group[0].trial);
                group.push(head);
                continue;
            }
            // A trial that fuses runs through the fused code even alone (a group of one),
            // so its numbers don't depend on whether others were pending beside it.
            head.fuse_group = Some(head.trial);
        }
        let size = group_size(&head, slot_memory);
        groups.push((size, vec![head]));
    }
    let mut leased = Vec::new();
    for (size, mut group) in groups {
        let room = size.saturating_sub(group.len() as u32);
        if group[0].fuses() && room > 0 {
            // The heads are leased already: a group that can't grow runs as it is.
            match db::fuse_with(pool, worker, &group[0], room, ttl).await {
                Ok(members) => group.extend(members),
                Err(error) => {
                    tracing::warn!(trial = %group[0].trial, %error, "could not lease more trials fused with this one")
                }
            }
        }
        leased.extend(group);
    }
    Ok(leased)
}

/// The most members a group led by `head` may hold on a slot of `slot_memory` bytes (`fusion::group`).
fn group_size(head: &LeasedTrial, slot_memory: u64) -> u32 {
    let Ok(family) = ablate_experiments::Family::parse(&head.family) else {
        return 1;
    };
    fusion::group(head.fuse, head.fuse_key.as_deref(), family, &head.params, slot_memory).map_or(1, |g| g.size)
}

/// The most workers' leases one statement serves.
const MOST_AT_ONCE: usize = 128;

/// One worker's lease, waiting to be served.
struct Ask {
    worker: WorkerId,
    slots: u32,
    free_gpus: u32,
    slot_memory: u64,
    answer: oneshot::Sender<Result<Vec<LeasedTrial>>>,
}

/// Serves leases in batches: while one batch's statement runs, the workers that
/// ask meanwhile wait and are served together by the next. A worker asking alone
/// is served at once, by the statement it would have had to itself.
#[derive(Clone)]
pub struct Lessor {
    asks: mpsc::UnboundedSender<Ask>,
}

impl Lessor {
    /// Starts the lessor's task (it ends when the last `Lessor` is dropped).
    pub fn spawn(pool: PgPool, ttl: Duration) -> Lessor {
        let (asks, mut waiting) = mpsc::unbounded_channel::<Ask>();
        tokio::spawn(async move {
            while let Some(first) = waiting.recv().await {
                let mut batch = vec![first];
                while batch.len() < MOST_AT_ONCE {
                    match waiting.try_recv() {
                        Ok(ask) => batch.push(ask),
                        Err(_) => break,
                    }
                }
                serve(&pool, ttl, batch).await;
            }
        });
        Lessor { asks }
    }

    /// `lease` for one worker, served with the others asking now.
    pub async fn lease(
        &self,
        worker: WorkerId,
        slots: u32,
        free_gpus: u32,
        slot_memory: u64,
    ) -> Result<Vec<LeasedTrial>> {
        let (answer, answered) = oneshot::channel();
        self.asks
            .send(Ask {
                worker,
                slots,
                free_gpus,
                slot_memory,
                answer,
            })
            .map_err(|_| crate::error::Error::Busy("the coordinator is shutting down; retry".into()))?;
        answered
            .await
            .map_err(|_| crate::error::Error::Busy("the lease was dropped; retry".into()))?
    }
}

/// Serves one batch: alike workers (one pool, the same labels and permission to
/// run commands, at most one free GPU each) by one statement per kind; the others,
/// and any batch the shared statement fails for, one by one.
async fn serve(pool: &PgPool, ttl: Duration, batch: Vec<Ask>) {
    let alone = |ask: Ask| async move {
        let leased = lease(pool, ask.worker, ask.slots, ask.free_gpus, ask.slot_memory, ttl).await;
        let _ = ask.answer.send(leased);
    };
    if batch.len() == 1 {
        for ask in batch {
            alone(ask).await;
        }
        return;
    }
    let ids: Vec<uuid::Uuid> = batch.iter().map(|a| a.worker.0).collect();
    let kinds = db::worker_kinds(pool, &ids).await.unwrap_or_default();
    let mut groups: HashMap<&str, Vec<Ask>> = HashMap::new();
    let mut singles = Vec::new();
    for ask in batch {
        match kinds.get(&ask.worker.0) {
            Some(kind) if ask.free_gpus <= 1 && ask.slots > 0 => groups.entry(kind.as_str()).or_default().push(ask),
            _ => singles.push(ask),
        }
    }
    for (_, group) in groups {
        if group.len() == 1 {
            singles.extend(group);
            continue;
        }
        let wanted: Vec<(WorkerId, u32)> = group.iter().map(|a| (a.worker, a.slots)).collect();
        match db::lease_heads_many(pool, &wanted, ttl).await {
            Ok(dealt) => {
                for (ask, (_, heads)) in group.into_iter().zip(dealt) {
                    let leased = fuse(pool, ask.worker, heads, ask.slot_memory, ttl).await;
                    let _ = ask.answer.send(leased);
                }
            }
            Err(error) => {
                tracing::warn!(%error, workers = group.len(), "a shared lease failed; leasing one by one");
                singles.extend(group);
            }
        }
    }
    futures::future::join_all(singles.into_iter().map(alone)).await;
}
