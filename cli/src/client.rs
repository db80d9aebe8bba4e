//! The CLI's connection to the coordinator, with errors that say what to do.

use ablate_schema::proto::experiments_client::ExperimentsClient;
use tonic::transport::{Channel, Endpoint};

pub async fn connect(addr: &str) -> anyhow::Result<ExperimentsClient<Channel>> {
    let endpoint = Endpoint::from_shared(addr.to_string())
        .map_err(|e| anyhow::anyhow!("coordinator address `{addr}`: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(3));
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the coordinator at {addr} ({e}); start one with `ablate up`, or point --coordinator / ABLATE_COORDINATOR at yours"
        )
    })?;
    Ok(ExperimentsClient::new(channel).max_decoding_message_size(64 << 20))
}

/// A gRPC status as a plain error message.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}
