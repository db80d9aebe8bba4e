//! The metric relay: one gRPC stream to the coordinator carrying every
//! trial's metric batches. A batch is written to the on-disk spool before it
//! is sent and deleted only when the coordinator acks it durable; after a
//! broken stream (a coordinator restart, say) the unacked batches are resent.
//! The spool is bounded: when it is full, new batches wait.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ablate_schema::proto;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// What became of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Ack {
    Durable,
    /// The lease is no longer current: stop the trial.
    Stale,
    Invalid(String),
}

struct Submission {
    batch: proto::MetricBatch,
    ack: oneshot::Sender<Ack>,
}

#[derive(Clone)]
pub struct Relay {
    tx: mpsc::Sender<Submission>,
}

impl Relay {
    /// Starts the relay task; batches left in `spool_dir` by an earlier run are resent first.
    pub fn start(client: crate::Client, spool_dir: PathBuf, max_spool_bytes: u64) -> anyhow::Result<Relay> {
        std::fs::create_dir_all(&spool_dir)
            .map_err(|e| anyhow::anyhow!("spool directory {}: {e}", spool_dir.display()))?;
        let (tx, rx) = mpsc::channel(64);
        let state = Spool::load(spool_dir, max_spool_bytes)?;
        tokio::spawn(relay_forever(client, rx, state));
        Ok(Relay { tx })
    }

    /// Queues a batch; the receiver resolves once it is durable or refused.
    pub async fn send(&self, batch: proto::MetricBatch) -> oneshot::Receiver<Ack> {
        let (ack, rx) = oneshot::channel();
        if self.tx.send(Submission { batch, ack }).await.is_err() {
            tracing::error!("metric relay stopped");
        }
        rx
    }
}

struct Pending {
    batch: proto::MetricBatch,
    waiter: Option<oneshot::Sender<Ack>>,
    file: PathBuf,
    bytes: u64,
}

struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    bytes: u64,
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
}

impl Spool {
    fn load(dir: PathBuf, max_bytes: u64) -> anyhow::Result<Spool> {
        let mut spool = Spool {
            dir,
            max_bytes,
            bytes: 0,
            next_seq: 1,
            pending: BTreeMap::new(),
        };
        let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(&spool.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let seq = name.strip_suffix(".batch")?.parse().ok()?;
                Some((seq, e.path()))
            })
            .collect();
        files.sort();
        for (seq, file) in files {
            let data = std::fs::read(&file)?;
            match proto::MetricBatch::decode(data.as_slice()) {
                Ok(batch) => {
                    spool.bytes += data.len() as u64;
                    spool.next_seq = seq + 1;
                    spool.pending.insert(
                        seq,
                        Pending {
                            batch,
                            waiter: None,
                            file,
                            bytes: data.len() as u64,
                        },
                    );
                }
                Err(error) => {
                    tracing::warn!(file = %file.display(), %error, "dropping an unreadable spooled batch");
                    let _ = std::fs::remove_file(&file);
                }
            }
        }
        if !spool.pending.is_empty() {
            tracing::info!(batches = spool.pending.len(), "resending spooled metric batches");
        }
        Ok(spool)
    }

    fn full(&self) -> bool {
        self.bytes >= self.max_bytes
    }

    fn admit(&mut self, mut submission: Submission) -> proto::MetricBatch {
        let seq = self.next_seq;
        self.next_seq += 1;
        submission.batch.seq = seq;
        let data = submission.batch.encode_to_vec();
        let file = self.dir.join(format!("{seq:020}.batch"));
        if let Err(error) = std::fs::write(&file, &data) {
            tracing::warn!(file = %file.display(), %error, "cannot spool a metric batch; it is held in memory only");
        }
        self.bytes += data.len() as u64;
        let batch = submission.batch.clone();
        self.pending.insert(
            seq,
            Pending {
                batch: submission.batch,
                waiter: Some(submission.ack),
                file,
                bytes: data.len() as u64,
            },
        );
        batch
    }

    fn settle(&mut self, seq: u64, ack: Ack) {
        if let Some(p) = self.pending.remove(&seq) {
            let _ = std::fs::remove_file(&p.file);
            self.bytes -= p.bytes;
            if let Some(w) = p.waiter {
                let _ = w.send(ack);
            }
        }
    }
}

async fn relay_forever(mut client: crate::Client, mut submissions: mpsc::Receiver<Submission>, mut spool: Spool) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (out, out_rx) = mpsc::channel::<proto::MetricBatch>(1024);
        for p in spool.pending.values() {
            let _ = out.try_send(p.batch.clone());
        }
        let mut inbound = match client.stream_metrics(ReceiverStream::new(out_rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::debug!(%status, "metric stream not open; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        // Batches beyond the channel's room at reconnect are sent as acks free it.
        let mut unsent: Vec<u64> = spool.pending.keys().copied().skip(1024).collect();
        loop {
            tokio::select! {
                ack = inbound.next() => match ack {
                    Some(Ok(ack)) => {
                        backoff = Duration::from_millis(100);
                        let result = match ack.status.as_str() {
                            "durable" => Ack::Durable,
                            "stale_lease" => Ack::Stale,
                            _ => Ack::Invalid(ack.error),
                        };
                        if let Ack::Invalid(why) = &result {
                            tracing::warn!(seq = ack.seq, %why, "coordinator refused a metric batch");
                        }
                        spool.settle(ack.seq, result);
                        while let Some(seq) = unsent.first().copied() {
                            match spool.pending.get(&seq) {
                                Some(p) if out.try_send(p.batch.clone()).is_err() => break,
                                _ => { unsent.remove(0); }
                            }
                        }
                    }
                    Some(Err(status)) => {
                        tracing::warn!(%status, unacked = spool.pending.len(), "metric stream broke; resending unacked batches");
                        break;
                    }
                    None => {
                        tracing::warn!(unacked = spool.pending.len(), "metric stream closed; resending unacked batches");
                        break;
                    }
                },
                submission = submissions.recv(), if !spool.full() => match submission {
                    Some(s) => {
                        let batch = spool.admit(s);
                        if out.send(batch).await.is_err() {
                            break;
                        }
                    }
                    None => return,
                },
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(trial: &str) -> proto::MetricBatch {
        proto::MetricBatch {
            seq: 0,
            trial_id: trial.into(),
            lease_token: "t".into(),
            names: vec!["loss".into()],
            name_index: vec![0],
            steps: vec![1],
            values: vec![0.5],
        }
    }

    #[test]
    fn the_spool_keeps_unacked_batches_across_restarts_in_order() {
        let dir = std::env::temp_dir().join(format!("ablate-spool-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut spool = Spool::load(dir.clone(), 1 << 20).unwrap();
        let mut waiters = Vec::new();
        for trial in ["a", "b", "c"] {
            let (ack, rx) = oneshot::channel();
            waiters.push(rx);
            spool.admit(Submission {
                batch: batch(trial),
                ack,
            });
        }
        spool.settle(2, Ack::Durable);
        assert_eq!(waiters[1].try_recv().unwrap(), Ack::Durable);
        std::fs::write(dir.join("00000000000000000099.batch"), b"\xff\xff not a batch").unwrap();
        // A new daemon finds the two unacked batches, in order, and drops the corrupt file.
        let reloaded = Spool::load(dir.clone(), 1 << 20).unwrap();
        let trials: Vec<&str> = reloaded.pending.values().map(|p| p.batch.trial_id.as_str()).collect();
        assert_eq!(trials, ["a", "c"]);
        assert!(
            reloaded.next_seq > 3,
            "new batches never reuse a spooled sequence number"
        );
        assert!(!dir.join("00000000000000000099.batch").exists());
        let tiny = Spool::load(dir.clone(), 1).unwrap();
        assert!(tiny.full(), "a spool over its bound takes no new batches");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
