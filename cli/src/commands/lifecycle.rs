//! `ablate retry`, `ablate tag`, `ablate note`, `ablate delete` and `ablate gc`: an
//! experiment after it ran.

use ablate_schema::proto;

use crate::client::{connect, status_error};
use crate::render::table;

pub async fn retry(addr: &str, experiment: &str, outcomes: Vec<String>) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let n = client
        .retry(proto::RetryRequest {
            experiment_id: experiment.to_string(),
            outcomes,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .trials_retried;
    eprintln!("{n} trial(s) of experiment {experiment} are pending again; `ablate watch {experiment}` follows them");
    Ok(())
}

pub async fn tag(addr: &str, experiment: &str, tags: Vec<String>, remove: bool) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let (add, remove) = if remove { (Vec::new(), tags) } else { (tags, Vec::new()) };
    let now = client
        .tag(proto::TagRequest {
            experiment_id: experiment.to_string(),
            add,
            remove,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .tags;
    if now.is_empty() {
        eprintln!("experiment {experiment} has no tags");
    } else {
        eprintln!("experiment {experiment} is tagged {}", now.join(", "));
    }
    Ok(())
}

pub async fn note(addr: &str, experiment: &str, text: String) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let cleared = text.is_empty();
    client
        .note(proto::NoteRequest {
            experiment_id: experiment.to_string(),
            note: text,
        })
        .await
        .map_err(status_error)?;
    eprintln!(
        "experiment {experiment}'s note {}",
        if cleared { "is cleared" } else { "is set" }
    );
    Ok(())
}

pub async fn delete(addr: &str, experiment: &str) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let done = client
        .delete(proto::DeleteRequest {
            experiment_id: experiment.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    eprintln!(
        "deleted experiment {experiment}: {} trial(s), {} object(s), {}",
        done.trials,
        done.objects,
        bytes(done.bytes)
    );
    if done.handed_over > 0 {
        eprintln!(
            "{} of its trials were reused by other experiments: their data stays, held by those experiments' trials",
            done.handed_over
        );
    }
    Ok(())
}

pub async fn gc(addr: &str, dry_run: bool, min_age_seconds: u64) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let done = client
        .collect_garbage(proto::CollectGarbageRequest {
            dry_run,
            min_age_seconds,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if !done.objects.is_empty() {
        let header: Vec<String> = ["object", "bytes", "why"].iter().map(|s| s.to_string()).collect();
        let rows: Vec<Vec<String>> = done
            .objects
            .iter()
            .map(|o| vec![o.path.clone(), o.bytes.to_string(), o.reason.clone()])
            .collect();
        print!("{}", table(&header, &rows));
    }
    eprintln!(
        "{} {} object(s), {} (of {} looked at){}",
        if dry_run { "would remove" } else { "removed" },
        done.objects.len(),
        bytes(done.bytes),
        done.scanned,
        if dry_run { "; nothing was removed" } else { "" }
    );
    Ok(())
}

/// Bytes for people: 1.5 MiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
