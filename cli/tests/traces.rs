//! Traces seen from outside: an OTLP/gRPC receiver in this process (the
//! `opentelemetry-proto` trace service) gets the spans of one quickstart sweep
//! from the CLI, the coordinator, the worker daemon and its trial processes,
//! and each trial's spans form one trace that begins at `ablate submit`.

mod harness;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ablate_schema::trace::receiver::{Receiver, Span};
use harness::{spec_path, Stack};

/// The spans of one trial's trace, checked link by link.
fn check_trial(spans: &[Span], trial: &str, submit: &Span) -> Result<(), String> {
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| {
                s.service == service
                    && s.name == name
                    && s.attributes.get("trial_id").map(String::as_str) == Some(trial)
            })
            .ok_or_else(|| format!("no `{name}` span from {service} for trial {trial}"))
    };
    let train = find("ablate-trial", "train")?;
    let run = find("ablate-worker", "worker trial")?;
    let lease = find("ablate-coordinator", "lease")?;
    let complete = find("ablate-coordinator", "coordinator Complete")?;
    let parent = |span: &Span| by_id.get(span.parent_span_id.as_str()).copied();
    // submit (CLI) -> Submit (coordinator) -> lease -> worker trial -> train.
    let submit_rpc = parent(lease).ok_or("the lease span has no parent")?;
    if submit_rpc.name != "coordinator Submit"
        || parent(submit_rpc).map(|s| s.span_id.as_str()) != Some(&submit.span_id)
    {
        return Err(format!(
            "the lease's parent is {submit_rpc:?}, not the coordinator's Submit under the CLI's"
        ));
    }
    if run.parent_span_id != lease.span_id || train.parent_span_id != run.span_id {
        return Err("worker trial -> lease or train -> worker trial broken".into());
    }
    // The completion and the checkpoint reports are the worker's calls, in the trial's span.
    if complete.parent_span_id != run.span_id {
        return Err("the coordinator's Complete is not a child of the worker's trial span".into());
    }
    let writes = spans
        .iter()
        .filter(|s| s.name == "checkpoint write" && s.parent_span_id == train.span_id)
        .count();
    if writes == 0 {
        return Err("no checkpoint write under the train span".into());
    }
    let traces: HashSet<&str> = [submit, submit_rpc, lease, run, train, complete]
        .iter()
        .map(|s| s.trace_id.as_str())
        .collect();
    if traces.len() != 1 {
        return Err(format!("trial {trial}'s spans are in {} traces", traces.len()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_trial_of_a_sweep_is_one_trace_from_submit_to_completion() {
    let (receiver, endpoint) = Receiver::start().await.unwrap();
    let mut stack = Stack::start(15.0).await;
    stack.kill_coordinator();
    stack.env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    stack.start_coordinator().await;
    stack.start_worker("cpu:2");
    let experiment = stack.submit_and_wait(&spec_path("quickstart.toml"));
    let trials: Vec<String> = sqlx::query_scalar("select id::text from trials where experiment_id = $1::uuid")
        .bind(&experiment)
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    assert_eq!(trials.len(), 12);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = receiver.spans();
        let submit = spans.iter().find(|s| {
            s.service == "ablate" && s.name == "ablate submit" && s.attributes.get("experiment_id") == Some(&experiment)
        });
        let checked = match submit {
            None => Err("no `ablate submit` span from the CLI".to_string()),
            Some(submit) => trials.iter().try_for_each(|t| check_trial(&spans, t, submit)),
        };
        match checked {
            Ok(()) => break,
            Err(why) if Instant::now() > deadline => {
                let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
                panic!("{why}\n{} spans from {services:?}\n{}", spans.len(), stack.logs());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
