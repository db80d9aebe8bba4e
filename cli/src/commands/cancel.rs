//! `ablate cancel EXP`.

use ablate_schema::proto;

use crate::client::{connect, status_error};

pub async fn run(addr: &str, experiment: &str) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let response = client
        .cancel(proto::CancelRequest {
            experiment_id: experiment.to_string(),
        })
        .await
        .map_err(status_error)?;
    eprintln!(
        "cancelled {} trial(s) of experiment {experiment}",
        response.into_inner().trials_cancelled
    );
    Ok(())
}
