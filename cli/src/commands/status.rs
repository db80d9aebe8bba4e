//! `ablate status [EXP]`.

use ablate_schema::proto;

use crate::client::{connect, status_error};
use crate::render::{experiment_summary, progress, table};

pub async fn run(addr: &str, experiment: Option<&str>) -> anyhow::Result<()> {
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
                .list_experiments(proto::ListExperimentsRequest { limit: 50 })
                .await
                .map_err(status_error)?
                .into_inner()
                .experiments;
            let header: Vec<String> = ["experiment", "name", "family", "state", "done", "created"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let rows: Vec<Vec<String>> = list
                .into_iter()
                .map(|e| {
                    let c = e.counts.unwrap_or_default();
                    let (done, total) = progress(&c);
                    vec![e.id, e.name, e.family, e.state, format!("{done}/{total}"), e.created_at]
                })
                .collect();
            print!("{}", table(&header, &rows));
        }
    }
    Ok(())
}
