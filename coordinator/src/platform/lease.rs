//! A worker's lease: the heads `db::lease_heads` picks, fused into groups by the
//! queue's rules (`ablate_experiments::queue`, which `ablate-worker sweep` runs by):
//! heads that share a fusion key join the first group of it with room, then each
//! group fills from the pending trials of its key (`db::fuse_with`).

use std::time::Duration;

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
