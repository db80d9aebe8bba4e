//! `ablate submit SPEC [--wait] [--into EXP] [--set PATH=VALUE]...`: the id alone on
//! stdout, progress on stderr, so `EXP=$(ablate submit spec.toml --wait)` works.

use std::path::Path;

use ablate_schema::code::Packed;

use ablate_schema::{proto, SpecFormat};

use tracing::Instrument;

use crate::client::connect;

pub async fn run(addr: &str, spec: &Path, wait: bool, into: Option<&str>, sets: &[String]) -> anyhow::Result<()> {
    // The trace of every trial of this sweep begins here.
    let span = tracing::info_span!("ablate submit", spec = %spec.display(), experiment_id = tracing::field::Empty);
    let id = submit(addr, spec, into, sets, &span).instrument(span.clone()).await?;
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

async fn submit(
    addr: &str,
    spec: &Path,
    into: Option<&str>,
    sets: &[String],
    span: &tracing::Span,
) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(spec).map_err(|e| anyhow::anyhow!("cannot read spec {}: {e}", spec.display()))?;
    let format = SpecFormat::from_path(&spec.to_string_lossy());
    // The changed spec goes as YAML, the form `apply_overrides` writes.
    let (text, format) = if sets.is_empty() {
        (text, format)
    } else {
        let changed = ablate_schema::spec::apply_overrides(&text, format, sets)
            .map_err(|e| anyhow::anyhow!("{}: --set: {e}", spec.display()))?;
        (changed, SpecFormat::Yaml)
    };
    let (code_archive, code_hash) = match pack_code(spec, &text, format)? {
        Some(packed) => (packed.archive, packed.hash),
        None => (Vec::new(), String::new()),
    };
    let mut client = connect(addr).await?;
    let response = client
        .submit(proto::SubmitRequest {
            spec_text: text,
            format: format.as_str().into(),
            code_archive,
            code_hash,
            into_experiment_id: into.unwrap_or_default().to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", spec.display(), s.message()))?
        .into_inner();
    span.record("experiment_id", response.experiment_id.as_str());
    println!("{}", response.experiment_id);
    let reused = if response.reused > 0 {
        format!(", {} of them reused from earlier experiments", response.reused)
    } else {
        String::new()
    };
    match into {
        Some(_) => eprintln!(
            "extended {} with {} new trials{reused} ({} of the spec's points it held already)",
            response.experiment_id, response.trial_count, response.already_held
        ),
        None => eprintln!(
            "submitted {} with {} trials{reused}",
            spec.display(),
            response.trial_count
        ),
    }
    Ok(response.experiment_id)
}

/// A command trial's `[trial] code` directory (relative to the spec's folder), packed without the spec.
/// A spec that does not parse goes as it is: the coordinator says what is wrong.
fn pack_code(spec: &Path, text: &str, format: SpecFormat) -> anyhow::Result<Option<Packed>> {
    let Ok(parsed) = ablate_schema::SweepSpec::parse(text, format) else {
        return Ok(None);
    };
    let Some(code) = parsed.trial.as_ref().and_then(|t| t.code.as_deref()) else {
        return Ok(None);
    };
    let folder = spec
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = folder.join(code);
    let packed = ablate_schema::code::pack_except(&dir, Some(spec))
        .map_err(|e| anyhow::anyhow!("{}: trial.code: {e}", spec.display()))?;
    eprintln!(
        "packed {} ({} files, {} KiB) as code {}",
        dir.display(),
        packed.files,
        packed.bytes.div_ceil(1024),
        &packed.hash[..12]
    );
    Ok(Some(packed))
}
