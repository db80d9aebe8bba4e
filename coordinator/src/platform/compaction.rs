//! The compactor: finished trials' metric chunks (and rows), and running
//! trials' chunks before their newest checkpoint, merged into chunks of up to
//! 16,384 points (`db::compact_trial`), about every second.

use std::time::Duration;

use sqlx::PgPool;

use crate::db::{self, Compaction};
use crate::error::Result;

/// One pass: up to `limit` finished trials, then every running trial with at
/// least `running_after` points in partial chunks before its newest checkpoint
/// (when given). Returns (trials looked at, points merged).
pub async fn compact(pool: &PgPool, limit: i64, running_after: Option<i64>) -> Result<(usize, u64)> {
    let mut trials = 0;
    let mut points = 0;
    for trial in db::trials_due(pool, limit).await? {
        points += db::compact_trial(pool, trial, &Compaction::Finished).await?;
        trials += 1;
    }
    if let Some(min_points) = running_after {
        for trial in db::running_with_chunks(pool).await? {
            let moved = db::compact_trial(pool, trial, &Compaction::BeforeCheckpoint { min_points }).await?;
            if moved > 0 {
                trials += 1;
                points += moved;
            }
        }
    }
    Ok((trials, points))
}

/// Compacts until the process ends, a pass every `every`.
pub async fn compact_forever(pool: PgPool, every: Duration, running_after: i64) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let mut running = Some(running_after);
        loop {
            match compact(&pool, 64, running).await {
                Ok((trials, points)) => {
                    if points > 0 {
                        tracing::debug!(trials, points, "metric points moved into chunks");
                    }
                    if trials < 64 {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "metric compaction pass failed");
                    break;
                }
            }
            running = None;
        }
    }
}
