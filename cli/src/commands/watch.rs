//! `ablate watch EXP`: progress bars on stderr until the experiment ends,
//! then the best trials and how to query them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ablate_schema::proto;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_stream::StreamExt;

use crate::client::{connect, status_error};
use crate::render::{experiment_summary, progress, sql_hint};

/// How long `watch` and `submit --wait` keep trying to reach a coordinator that went away.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a watch stopped before the experiment ended.
enum Interrupted {
    /// The coordinator went away (restart, upgrade, network): reconnect.
    Lost(String),
    /// Something that reconnecting won't fix (an unknown experiment, say).
    Fatal(anyhow::Error),
}

fn classify(status: tonic::Status) -> Interrupted {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::PermissionDenied => {
            Interrupted::Fatal(status_error(status))
        }
        _ => Interrupted::Lost(status.message().to_string()),
    }
}

/// Watches until the experiment ends; returns its last snapshot. Rides out a
/// coordinator restart: reconnects with backoff, for up to ten minutes.
pub async fn run(addr: &str, experiment: &str) -> anyhow::Result<proto::Experiment> {
    let mut ui = Bars::new();
    let mut last: Option<proto::Experiment> = None;
    let mut lost_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(250);
    loop {
        match follow(addr, experiment, &mut ui, &mut last, &mut lost_since).await {
            Ok(()) if last.as_ref().is_some_and(|e| e.state != "running") => break,
            Ok(()) => {}
            Err(Interrupted::Fatal(error)) => return Err(error),
            Err(Interrupted::Lost(why)) => {
                if lost_since.is_none() {
                    ui.println(&format!("lost the coordinator at {addr} ({why}); reconnecting"));
                    lost_since = Some(Instant::now());
                }
            }
        }
        let since = *lost_since.get_or_insert_with(Instant::now);
        if since.elapsed() > RECONNECT_TIMEOUT {
            anyhow::bail!(
                "the coordinator at {addr} has been unreachable for {} s; the sweep goes on without this watch \
                 (`ablate watch {experiment}` picks it up again)",
                RECONNECT_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    ui.finish();
    let last = last.ok_or_else(|| anyhow::anyhow!("the coordinator ended the watch without a snapshot"))?;
    eprint!("{}", experiment_summary(&last));
    eprint!("{}", sql_hint(&last));
    Ok(last)
}

/// One connection's worth of watching: returns when the stream ends.
async fn follow(
    addr: &str,
    experiment: &str,
    ui: &mut Bars,
    last: &mut Option<proto::Experiment>,
    lost_since: &mut Option<Instant>,
) -> Result<(), Interrupted> {
    let mut client = match connect(addr).await {
        Ok(client) => client,
        // A first connection that fails is the user's to fix; a later one is an outage.
        Err(error) if last.is_none() && lost_since.is_none() => return Err(Interrupted::Fatal(error)),
        Err(error) => return Err(Interrupted::Lost(format!("{error:#}"))),
    };
    let mut stream = client
        .watch(proto::GetExperimentRequest {
            experiment_id: experiment.to_string(),
            best: 5,
        })
        .await
        .map_err(classify)?
        .into_inner();
    while let Some(snapshot) = stream.next().await {
        let e = snapshot.map_err(classify)?;
        if lost_since.take().is_some() {
            ui.println("the coordinator is back; watching again");
        }
        ui.show(&e);
        *last = Some(e);
    }
    Ok(())
}

/// The progress bars: the sweep, and one per running trial.
struct Bars {
    bars: MultiProgress,
    overall: ProgressBar,
    trial_style: ProgressStyle,
    running: HashMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Bars {
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
        Bars {
            bars,
            overall,
            trial_style,
            running: HashMap::new(),
        }
    }

    /// A line above the bars (printed also when stderr is not a terminal and the bars are hidden).
    fn println(&self, line: &str) {
        self.bars.suspend(|| eprintln!("{line}"));
    }

    fn show(&mut self, e: &proto::Experiment) {
        let c = e.counts.unwrap_or_default();
        let (finished, total) = progress(&c);
        self.overall.set_length(total as u64);
        self.overall.set_position(finished as u64);
        self.overall
            .set_message(format!("({} running, {} failed)", c.running, c.failed));
        let live: Vec<&str> = e.running.iter().map(|t| t.trial_id.as_str()).collect();
        let bars = &self.bars;
        self.running.retain(|id, bar| {
            let keep = live.contains(&id.as_str());
            if !keep {
                bar.finish_and_clear();
                bars.remove(bar);
            }
            keep
        });
        for t in &e.running {
            let bar = self.running.entry(t.trial_id.clone()).or_insert_with(|| {
                let bar = self.bars.add(ProgressBar::new(t.total_steps.max(1) as u64));
                bar.set_style(self.trial_style.clone());
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
    }

    fn finish(&self) {
        for bar in self.running.values() {
            bar.finish_and_clear();
        }
        self.overall.finish();
    }
}
