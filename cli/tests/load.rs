//! Load: 64 simulated workers over gRPC against a real coordinator process and
//! PostgreSQL, 10,000 trials and 1,000,000 metric points, four workers dying
//! with leases in hand along the way. Counts in SQL must match exactly.

mod harness;

use std::time::Duration;

use ablate_schema::proto::{self, workers_client::WorkersClient};
use harness::Stack;

const TRIALS: usize = 10_000;
const POINTS: usize = 100;
const WORKERS: usize = 64;
/// Workers that die after this many trials, holding their next leases.
const DOOMED: usize = 4;
const DIE_AFTER: usize = 20;

type Failure = Box<dyn std::error::Error + Send + Sync>;
type Client =
    WorkersClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ablate_schema::Bearer>>;

/// One trial's points: `train_loss` and `grad_norm` at steps 0..50, one batch.
fn batch(trial: &proto::LeasedTrial) -> proto::MetricBatch {
    let steps: Vec<i64> = (0..POINTS).map(|i| (i / 2) as i64).collect();
    proto::MetricBatch {
        seq: 1,
        trial_id: trial.trial_id.clone(),
        lease_token: trial.lease_token.clone(),
        names: vec!["train_loss".into(), "grad_norm".into()],
        name_index: (0..POINTS).map(|i| (i % 2) as u32).collect(),
        values: steps.iter().map(|s| 1.0 / (1.0 + *s as f64)).collect(),
        steps,
    }
}

async fn send_points(client: &mut Client, trial: &proto::LeasedTrial) -> Result<(), Failure> {
    let mut acks = client
        .stream_metrics(tokio_stream::iter(vec![batch(trial)]))
        .await?
        .into_inner();
    let ack = acks.message().await?.ok_or("no ack")?;
    if ack.status != "durable" {
        return Err(format!("batch of {} not durable: {} {}", trial.trial_id, ack.status, ack.error).into());
    }
    Ok(())
}

/// Leases, streams and completes trials until none is left; a doomed worker
/// stops after `DIE_AFTER` trials with its next leases unfinished.
async fn worker(
    channel: tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ablate_schema::Bearer>,
    index: usize,
    pool: sqlx::PgPool,
) -> Result<usize, Failure> {
    let mut client = WorkersClient::new(channel);
    let id = uuid::Uuid::new_v4().to_string();
    client
        .register(proto::RegisterRequest {
            worker_id: id.clone(),
            hostname: format!("sim-{index}"),
            devices: vec!["cpu:0".into()],
            ..Default::default()
        })
        .await?;
    let mut done = 0;
    loop {
        let leased = client
            .lease(proto::LeaseRequest {
                worker_id: id.clone(),
                max_trials: 4,
                free_gpus: 1,
                slot_memory_bytes: 0,
            })
            .await?
            .into_inner()
            .trials;
        if leased.is_empty() {
            let open: i64 = sqlx::query_scalar("select count(*) from trials where state in ('pending', 'running')")
                .fetch_one(&pool)
                .await?;
            if open == 0 {
                return Ok(done);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if index < DOOMED && done >= DIE_AFTER {
            // Dies mid-trial: some points sent, nothing completed, leases left to expire.
            send_points(&mut client, &leased[0]).await?;
            return Ok(done);
        }
        for trial in leased {
            send_points(&mut client, &trial).await?;
            client.complete(proto::CompleteRequest::succeeded(trial)).await?;
            done += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_workers_ten_thousand_trials_a_million_points_counted_exactly() {
    let stack = Stack::start(2.0).await;
    let spec = format!(
        "name = \"load\"\nfamily = \"train\"\nmax_attempts = 5\n[base]\noptimizer = \"adam\"\nlr = 0.001\nsteps = 1\n\
         [sweep]\nsearcher = \"grid\"\nparams.seed = {{ range = [0, {}] }}\n",
        TRIALS - 1
    );
    let experiment = stack.submit(&stack.write_spec("load.toml", &spec));
    let mut tasks = Vec::new();
    for i in 0..WORKERS {
        tasks.push(tokio::spawn(worker(stack.channel().await, i, stack.pool.clone())));
    }
    let mut completed = 0;
    for task in tasks {
        completed += task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("a worker failed: {e}\n{}", stack.logs()));
    }
    assert_eq!(completed, TRIALS, "every trial completed exactly once by a live worker");
    let scalar = |sql: String| {
        let stack = &stack;
        async move { stack.scalar_i64(&sql).await }
    };
    let where_exp = format!("experiment_id = '{experiment}'");
    assert_eq!(
        scalar(format!(
            "select count(*) from ablate.trial_results where {where_exp} and state = 'succeeded'"
        ))
        .await,
        TRIALS as i64
    );
    assert_eq!(
        scalar(format!("select count(*) from ablate.metric_series where {where_exp}")).await,
        (TRIALS * POINTS) as i64,
        "one row per (trial, name, step), replays included"
    );
    assert_eq!(
        scalar(format!(
            "select count(*) from (select trial_id from ablate.metric_series where {where_exp} \
             group by trial_id having count(*) = {POINTS}) t"
        ))
        .await,
        TRIALS as i64
    );
    let retried = scalar(format!(
        "select count(*) from ablate.trial_results where {where_exp} and attempt > 1"
    ))
    .await;
    assert!(
        retried >= DOOMED as i64,
        "the dead workers' leases were re-leased: {retried}"
    );
    assert_eq!(
        scalar(format!(
            "select count(*) from ablate.trial_attempts where {where_exp} and outcome = 'lease_expired'"
        ))
        .await,
        retried,
        "each re-lease follows an expiry on record"
    );
}
