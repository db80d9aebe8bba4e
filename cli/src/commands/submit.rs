//! `ablate submit SPEC [--wait]`: the id alone on stdout, progress on stderr,
//! so `EXP=$(ablate submit spec.toml --wait)` works.

use std::path::Path;

use ablate_schema::{proto, SpecFormat};

use tracing::Instrument;

use crate::client::connect;

pub async fn run(addr: &str, spec: &Path, wait: bool) -> anyhow::Result<()> {
    // The trace of every trial of this sweep begins here.
    let span = tracing::info_span!("ablate submit", spec = %spec.display(), experiment_id = tracing::field::Empty);
    let id = submit(addr, spec, &span).instrument(span.clone()).await?;
    drop(span);
    if !wait {
        return Ok(());
    }
    let last = super::watch::run(addr, &id).await?;
    match last.state.as_str() {
        "succeeded" => Ok(()),
        state => Err(anyhow::anyhow!("experiment {} ended {state}", last.id)),
    }
}

async fn submit(addr: &str, spec: &Path, span: &tracing::Span) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(spec).map_err(|e| anyhow::anyhow!("cannot read spec {}: {e}", spec.display()))?;
    let format = SpecFormat::from_path(&spec.to_string_lossy());
    let mut client = connect(addr).await?;
    let response = client
        .submit(proto::SubmitRequest {
            spec_text: text,
            format: format.as_str().into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", spec.display(), s.message()))?
        .into_inner();
    span.record("experiment_id", response.experiment_id.as_str());
    println!("{}", response.experiment_id);
    eprintln!("submitted {} with {} trials", spec.display(), response.trial_count);
    Ok(response.experiment_id)
}
