//! `ablate status [EXP] [--tag TAG]`.

use ablate_schema::proto;

use crate::client::{connect, status_error};
use crate::render::{experiment_summary, progress, table};

pub async fn run(addr: &str, experiment: Option<&str>, tag: Option<&str>) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    match experiment {
        Some(id) => {
            let e = client
                .get_experiment(proto::GetExperimentRequest {
                    experiment_id: id.to_string(),
                    best: 5,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print!("{}", experiment_summary(&e));
        }
        None => {
            let list = client
                .list_experiments(proto::ListExperimentsRequest {
                    limit: 50,
                    tag: tag.unwrap_or_default().to_string(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .experiments;
            let header: Vec<String> = [
                "experiment",
                "name",
                "family",
                "state",
                "done",
                "running (share)",
                "tags",
                "created",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            // Each experiment's part of the slots in use: what fair share gives it now.
            let all_running: u64 = list
                .iter()
                .map(|e| e.counts.as_ref().map_or(0, |c| c.running as u64))
                .sum();
            let rows: Vec<Vec<String>> = list
                .into_iter()
                .map(|e| {
                    let c = e.counts.unwrap_or_default();
                    let (done, total) = progress(&c);
                    let share = if c.running > 0 {
                        format!("{} ({:.0}%)", c.running, 100.0 * c.running as f64 / all_running as f64)
                    } else {
                        "0".to_string()
                    };
                    let state = if e.waiting.is_empty() {
                        e.state
                    } else {
                        format!("{}, waiting: {}", e.state, e.waiting)
                    };
                    vec![
                        e.id,
                        e.name,
                        e.family,
                        state,
                        if e.reused > 0 {
                            format!("{done}/{total} ({} reused)", e.reused)
                        } else {
                            format!("{done}/{total}")
                        },
                        share,
                        e.tags.join(","),
                        e.created_at,
                    ]
                })
                .collect();
            if rows.is_empty() {
                if let Some(tag) = tag {
                    eprintln!("no experiment is tagged `{tag}`");
                }
            }
            print!("{}", table(&header, &rows));
        }
    }
    Ok(())
}
