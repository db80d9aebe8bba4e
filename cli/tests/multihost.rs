//! Several worker "hosts" on one machine, each reaching the coordinator
//! through a fault-injecting TCP proxy of its own (pass, delay, blackhole,
//! reset, in the manner of toxiproxy): a worker cut off mid-trial loses its
//! lease, another finishes the trial on the unbroken curve, and when the link
//! comes back the cut-off worker's late metrics and completion are refused by
//! the fence, nothing is counted twice, and it takes new trials again.
//! Everything stays on loopback; the proxies end with the test.

mod harness;

use std::time::Duration;

use harness::{assert_same_curves, curve, Stack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What a proxy does to the bytes crossing it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Link {
    Pass,
    /// Each chunk waits this long before it goes on.
    Delay(Duration),
    /// Nothing goes through, and nothing is lost: bytes wait, as TCP's do
    /// behind a partition, and flow again when the link is back.
    Blackhole,
    /// Every connection is reset (RST), and new ones are reset at once.
    Reset,
}

/// A TCP proxy on loopback in front of `upstream`.
struct Proxy {
    addr: String,
    link: watch::Sender<Link>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_string();
        let (link, rx) = watch::channel(Link::Pass);
        let task = tokio::spawn(async move {
            // The connections' tasks end with this one (the set aborts them when dropped).
            let mut connections = JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let (rx, upstream) = (rx.clone(), upstream.clone());
                connections.spawn(async move {
                    // Zero linger: dropping a socket resets it.
                    let _ = down.set_zero_linger();
                    if *rx.borrow() == Link::Reset {
                        return;
                    }
                    let Ok(up) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = up.set_zero_linger();
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let (down_read, down_write) = down.into_split();
                    let (up_read, up_write) = up.into_split();
                    tokio::select! {
                        _ = pump(down_read, up_write, rx.clone()) => {}
                        _ = pump(up_read, down_write, rx) => {}
                    }
                });
            }
        });
        Proxy { addr, link, task }
    }

    fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction of a connection as the link allows; returns when
/// either side closes or the link resets.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut link: watch::Receiver<Link>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = link.wait_for(|l| *l == Link::Reset) => return,
        };
        loop {
            let now = *link.borrow_and_update();
            match now {
                Link::Pass => break,
                Link::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Link::Blackhole => {
                    if link.changed().await.is_err() {
                        return;
                    }
                }
                Link::Reset => return,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Starts a one-slot worker reaching the coordinator through `proxy`; returns its index and id.
async fn start_host(stack: &mut Stack, proxy: &Proxy) -> (usize, String) {
    let before = stack.scalar_i64("select count(*) from workers").await;
    stack.worker_coordinator = Some(proxy.addr.clone());
    let index = stack.start_worker("cpu:1");
    stack
        .wait_for(
            &format!("select count(*) > {before} from workers"),
            Duration::from_secs(30),
        )
        .await;
    let id: uuid::Uuid = sqlx::query_scalar("select id from workers order by registered_at desc limit 1")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    (index, id.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_cut_off_mid_trial_loses_it_cleanly_and_comes_back() {
    let mut stack = Stack::start(3.0).await;
    let (a, b, c) = (
        Proxy::start(&stack.addr()).await,
        Proxy::start(&stack.addr()).await,
        Proxy::start(&stack.addr()).await,
    );
    // Host C is far away all along.
    c.set(Link::Delay(Duration::from_millis(20)));
    let (_, host_a) = start_host(&mut stack, &a).await;
    let (index_b, _) = start_host(&mut stack, &b).await;
    let (index_c, _) = start_host(&mut stack, &c).await;
    // One trial per host.
    let cut = stack.submit(&stack.write_spec("cut.toml", &harness::resume_spec("cut", 0..3)));
    stack
        .wait_for(
            &format!(
                "select count(*) = 1 from trials t where t.lease_owner = '{host_a}' and t.state = 'running'
                   and exists (select 1 from checkpoints k where k.trial_id = t.id)"
            ),
            Duration::from_secs(60),
        )
        .await;
    // Cut A off mid-trial, once its trial has a checkpoint. Until its lease
    // expires, A still owns the trial.
    a.set(Link::Blackhole);
    let held: uuid::Uuid = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select id from trials where lease_owner = '{host_a}' and state = 'running'"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    // B's connections are reset once meanwhile; it reconnects.
    b.set(Link::Reset);
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.set(Link::Pass);
    // The trial's lease expires and another host finishes it.
    stack
        .wait_for(
            &format!("select state = 'succeeded' from trials where id = '{held}'"),
            Duration::from_secs(120),
        )
        .await;
    stack.wait_finished(&cut, Duration::from_secs(120)).await;
    // A's own run of the trial waits behind the blackhole (its metrics can't
    // leave), with whatever it has left to report.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut_off_at: f64 = sqlx::query_scalar("select extract(epoch from now())::float8")
        .fetch_one(&stack.pool)
        .await
        .unwrap();

    // The link comes back: A's late writes arrive and are refused by the fence.
    a.set(Link::Pass);
    stack
        .wait_for(
            &format!("select extract(epoch from last_seen_at) > {cut_off_at} from workers where id = '{host_a}'"),
            Duration::from_secs(30),
        )
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !late_refusal_logged(&stack, &held.to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "A's late writes were not refused:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The trial's attempts: A's lease expired, another host's succeeded; nothing more.
    let attempts: Vec<(i32, String, uuid::Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select attempt, outcome, worker_id from trial_attempts where trial_id = '{held}' order by attempt"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(attempts.len(), 2, "{attempts:?}\n{}", stack.logs());
    assert_eq!(
        (attempts[0].1.as_str(), attempts[0].2.to_string()),
        ("lease_expired", host_a.clone())
    );
    assert_eq!(attempts[1].1, "succeeded");
    assert_ne!(attempts[1].2.to_string(), host_a);
    // Every step's point once, of three trials, each succeeded once.
    let broken = curve(&stack, &cut).await;
    assert_eq!(broken.len(), 3 * 300, "{}", stack.logs());
    assert_eq!(
        stack
            .scalar_i64(&format!(
                "select count(*) from ablate.trial_attempts where experiment_id = '{cut}' and outcome = 'succeeded'"
            ))
            .await,
        3
    );

    // A alone takes new trials again: the same sweep, unbroken, on the same curves.
    stack.kill_worker(index_b);
    stack.kill_worker(index_c);
    let unbroken = stack.submit(&stack.write_spec("unbroken.toml", &harness::resume_spec("unbroken", 0..3)));
    stack.wait_finished(&unbroken, Duration::from_secs(120)).await;
    assert_eq!(
        stack
            .scalar_i64(&format!(
                "select count(*) from ablate.trial_attempts where experiment_id = '{unbroken}'
                   and outcome = 'succeeded' and worker_id = '{host_a}'"
            ))
            .await,
        3,
        "{}",
        stack.logs()
    );
    assert_same_curves(&broken, &curve(&stack, &unbroken).await);
}

/// Whether the workers' log says trial `id`'s late writes were refused: its
/// metrics (the trial, held up behind the link, is stopped: "lease lost") or,
/// when it ended before the link came back, its last metrics or completion
/// ("its lease is gone").
fn late_refusal_logged(stack: &Stack, id: &str) -> bool {
    stack.logs().lines().any(|line| {
        line.contains(id) && (line.contains("trial finished but its lease is gone") || line.contains("lease lost"))
    })
}
