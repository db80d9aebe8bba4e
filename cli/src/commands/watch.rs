//! `ablate watch EXP`: progress bars on stderr until the experiment ends,
//! then the best trials and how to query them.

use std::collections::HashMap;

use ablate_schema::proto;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_stream::StreamExt;

use crate::client::{connect, status_error};
use crate::render::{experiment_summary, progress, sql_hint};

/// Watches until the experiment ends; returns its last snapshot.
pub async fn run(addr: &str, experiment: &str) -> anyhow::Result<proto::Experiment> {
    let mut client = connect(addr).await?;
    let mut stream = client
        .watch(proto::GetExperimentRequest {
            experiment_id: experiment.to_string(),
            best: 5,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let overall = bars.add(ProgressBar::new(0));
    overall.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:40.cyan/blue}] {pos}/{len} trials {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    overall.set_prefix("sweep");
    let trial_style = ProgressStyle::with_template("{prefix:>12} [{bar:40.green/white}] {pos}/{len} steps {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let mut running: HashMap<String, ProgressBar> = HashMap::new();
    let mut last = None;
    while let Some(snapshot) = stream.next().await {
        let e = snapshot.map_err(status_error)?;
        let c = e.counts.unwrap_or_default();
        let (finished, total) = progress(&c);
        overall.set_length(total as u64);
        overall.set_position(finished as u64);
        overall.set_message(format!("({} running, {} failed)", c.running, c.failed));
        let live: Vec<&str> = e.running.iter().map(|t| t.trial_id.as_str()).collect();
        running.retain(|id, bar| {
            let keep = live.contains(&id.as_str());
            if !keep {
                bar.finish_and_clear();
                bars.remove(bar);
            }
            keep
        });
        for t in &e.running {
            let bar = running.entry(t.trial_id.clone()).or_insert_with(|| {
                let bar = bars.add(ProgressBar::new(t.total_steps.max(1) as u64));
                bar.set_style(trial_style.clone());
                bar.set_prefix(format!("trial {}", t.ordinal));
                bar
            });
            bar.set_position(t.step.max(0) as u64);
            bar.set_message(if t.attempt > 1 {
                format!("attempt {}", t.attempt)
            } else {
                String::new()
            });
        }
        last = Some(e);
    }
    for bar in running.values() {
        bar.finish_and_clear();
    }
    overall.finish();
    let last = last.ok_or_else(|| anyhow::anyhow!("the coordinator ended the watch without a snapshot"))?;
    eprint!("{}", experiment_summary(&last));
    eprint!("{}", sql_hint(&last));
    Ok(last)
}
