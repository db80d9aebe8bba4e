//! `ablate workers`.

use ablate_schema::proto;

use crate::client::{connect, status_error};
use crate::render::table;

pub async fn run(addr: &str) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let workers = client
        .list_workers(proto::ListWorkersRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .workers;
    let header: Vec<String> = ["worker", "host", "devices", "pool", "running", "last seen", "health"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rows: Vec<Vec<String>> = workers
        .into_iter()
        .map(|w| {
            vec![
                w.worker_id,
                w.hostname,
                w.devices.join(","),
                {
                    let mut labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    let pool = if w.pool.is_empty() {
                        "-".to_string()
                    } else {
                        w.pool.clone()
                    };
                    if labels.is_empty() {
                        pool
                    } else {
                        format!("{pool} ({})", labels.join(","))
                    }
                },
                w.running_trials.to_string(),
                w.last_seen_at,
                if w.lost {
                    "lost".to_string()
                } else if !w.draining_since.is_empty() {
                    format!("draining since {}", w.draining_since)
                } else if w.unhealthy.is_empty() {
                    "ok".to_string()
                } else {
                    format!("unhealthy: {}", w.unhealthy)
                },
            ]
        })
        .collect();
    print!("{}", table(&header, &rows));
    Ok(())
}

/// `ablate workers drain ID`.
pub async fn drain(addr: &str, worker: &str) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let drained = client
        .drain_worker(proto::DrainWorkerRequest {
            worker_id: worker.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    eprintln!(
        "worker {} is draining: it takes no new trials and exits when its {} running trial(s) end",
        drained.worker_id, drained.running_trials
    );
    Ok(())
}
