//! `ablate logs TRIAL [-f] [--attempt N]`: one attempt's log (its process's stdout
//! and stderr, as the worker keeps it, bounded); with `-f`, what the running
//! attempt writes until it ends.

use std::io::Write;
use std::time::Duration;

use ablate_schema::proto;

use crate::client::{connect, status_error};

/// How often `-f` asks for more.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

pub async fn run(addr: &str, trial: &str, follow: bool, attempt: Option<u32>) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let mut printed = String::new();
    let mut out = std::io::stdout();
    loop {
        let logs = client
            .trial_logs(proto::TrialLogsRequest {
                trial_id: trial.to_string(),
                attempt: attempt.unwrap_or(0),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if printed.is_empty() && !logs.text.is_empty() || !follow {
            eprintln!("# trial {trial}, attempt {} of {}", logs.attempt, logs.attempts);
        }
        out.write_all(new_part(&printed, &logs.text).as_bytes())?;
        out.flush()?;
        printed = logs.text;
        if !follow || !logs.running {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// What `now` adds to the log already printed (`before`). A log over its bound
/// keeps its head and its newest part, so `now` may no longer start with `before`:
/// the new part then begins after the last lines printed.
fn new_part<'a>(before: &str, now: &'a str) -> &'a str {
    if let Some(rest) = now.strip_prefix(before) {
        return rest;
    }
    // The last few lines printed, found in the new text: what follows them is new.
    let tail_start = before
        .char_indices()
        .rev()
        .filter(|(_, c)| *c == '\n')
        .nth(3)
        .map_or(0, |(i, _)| i + 1);
    let tail = &before[tail_start..];
    match (!tail.is_empty()).then(|| now.rfind(tail)).flatten() {
        Some(i) => &now[i + tail.len()..],
        None => now,
    }
}

#[cfg(test)]
mod tests {
    use super::new_part;

    #[test]
    fn following_prints_each_line_once_even_when_the_log_is_cut() {
        assert_eq!(new_part("", "a\nb\n"), "a\nb\n");
        assert_eq!(new_part("a\nb\n", "a\nb\nc\n"), "c\n");
        // The worker cut the middle out: the new part follows the lines printed last.
        let before = "head\n1\n2\n3\n4\n5\n";
        let now = "head\n[... 100 bytes left out ...]\n3\n4\n5\n6\n7\n";
        assert_eq!(new_part(before, now), "6\n7\n");
    }
}
