//! The worker daemon: registers, leases trials up to its free device slots,
//! heartbeats the leases in hand and stops the trials it is told to stop.
//! The slot, not the process, is the daemon's unit: each free slot keeps its
//! warm trial process, if it has one, for its next trial.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ablate_schema::proto::{self, workers_client::WorkersClient};
use ablate_schema::WorkerId;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::backend::{self, Backend, Slot};
use crate::process::TrialProcess;
use crate::relay::Relay;
use crate::runner::{self, Shared};

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// The coordinator's address, or several replicas' (serving one database) separated by commas.
    #[arg(long, env = "ABLATE_COORDINATOR", default_value = "http://127.0.0.1:7077")]
    pub coordinator: String,
    /// Device slots: auto, slurm (what the Slurm job step was granted), cpu:K (K CPU slots),
    /// cuda:0,cuda:1, or cuda:0*4 (4 slots sharing one device).
    #[arg(long, default_value = "auto")]
    pub devices: String,
    /// Where checkpoints go: a directory, file:///dir or s3://bucket/prefix.
    #[arg(long, env = "ABLATE_OBJECT_STORE", default_value = ".ablate/objects")]
    pub object_store: String,
    /// Directory for the metric spool and scratch files.
    #[arg(long, default_value_os_t = crate::default_state_dir())]
    pub state_dir: PathBuf,
    /// Upper bound of the on-disk metric spool, in MiB.
    #[arg(long, default_value_t = 256)]
    pub max_spool_mib: u64,
    /// How often to ask for work when slots are free and the queue was empty, in ms.
    #[arg(long, default_value_t = 200)]
    pub poll_ms: u64,
    /// The executable trial processes run (`<it> trial`). By default this
    /// daemon's own, through /proc/self/exe, which survives the file being
    /// replaced or deleted on disk.
    #[arg(long, default_value = "/proc/self/exe")]
    pub trial_exe: PathBuf,
    /// A file holding the worker's token (a `worker` token from `ablate token create --role worker`);
    /// else ABLATE_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) an `https://` coordinator is checked against; else the system's roots.
    #[arg(long, env = "ABLATE_CA")]
    pub ca: Option<PathBuf>,
    /// A folder trials may read local data under (repeat it for more); by default the
    /// provisioned data folder and /usr/share/datasets. Trials naming other paths fail.
    #[arg(long)]
    pub data_root: Vec<PathBuf>,
    /// Runs every trial in a fresh process of its own. By default each slot keeps
    /// one warm process (libtorch loaded, data sets read) for trial after trial,
    /// and replaces it after a crash; a spec can ask for fresh processes with
    /// `[resources] fresh_process = true`.
    #[arg(long)]
    pub fresh_process_per_trial: bool,
    /// An HTTP listener for Prometheus metrics (/metrics) and a health probe (/healthz).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The pool this worker joins: specs asking `[resources] pool = "NAME"` run only on its workers.
    #[arg(long)]
    pub pool: Option<String>,
    /// A label (KEY=VALUE, repeatable): specs asking `[resources] labels` run only on workers with all of theirs.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Runs command trials: the programs researchers name in a spec's `[trial]`, as
    /// this daemon's user. Without it, this worker never leases one.
    #[arg(long)]
    pub allow_commands: bool,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("`{text}`: expected KEY=VALUE, such as gpu=a100")),
    }
}

/// Why the worker can't start trials now, if so; sent with every heartbeat.
type Health = Arc<Mutex<Option<String>>>;

/// The longest wait between tries while the worker can't start trials.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

struct Held {
    token: String,
    stop: watch::Sender<Option<String>>,
}

pub async fn run(options: Options, backend: Backend) -> anyhow::Result<()> {
    let slots = backend::discover(&options.devices, &backend)?;
    let worker_id = WorkerId::new_random();
    crate::storage::probe(&options.object_store, &worker_id.to_string())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the object store {} refuses this worker, so it takes no trials: {e:#}. \
                 Check its address and credentials (AWS_* variables for S3)",
                options.object_store
            )
        })?;
    let channel: Channel = ablate_schema::channel(&options.coordinator, options.ca.as_deref(), Duration::from_secs(2))
        .map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
    let token = match (&options.token_file, std::env::var("ABLATE_TOKEN")) {
        (Some(file), _) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", file.display()))?
                .trim()
                .to_string(),
        ),
        (None, Ok(token)) if !token.trim().is_empty() => Some(token.trim().to_string()),
        _ => None,
    };
    let bearer = ablate_schema::Bearer::new(token.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    let client = WorkersClient::with_interceptor(channel, bearer).max_decoding_message_size(64 << 20);
    let provenance = crate::provenance::Provenance::gather(&slots);
    let devices: Vec<String> = slots.iter().map(|s| s.name.clone()).collect();
    let request = proto::RegisterRequest {
        worker_id: worker_id.to_string(),
        hostname: provenance.host.clone(),
        devices: devices.clone(),
        pool: options.pool.clone().unwrap_or_default(),
        labels: options.labels.iter().cloned().collect(),
        allow_commands: options.allow_commands,
    };
    let registration = register(&client, request).await?;
    tracing::info!(worker = %worker_id, slots = ?devices, backend = %backend.note, coordinator = %options.coordinator, "worker registered");

    let relay = Relay::start(
        client.clone(),
        options.state_dir.join("spool"),
        options.max_spool_mib << 20,
    )?;
    let scratch = options.state_dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let telemetry = Arc::new(crate::telemetry::Telemetry::default());
    telemetry
        .slots
        .store(slots.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let health: Health = Arc::default();
    if let Some(addr) = options.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
        tracing::info!(addr = ?listener.local_addr().ok(), "metrics at /metrics, health at /healthz");
        tokio::spawn(crate::telemetry::serve(
            listener,
            telemetry.clone(),
            options.state_dir.join("spool"),
            health.clone(),
        ));
    }
    let shared = Arc::new(Shared {
        client: client.clone(),
        relay,
        object_store: options.object_store.clone(),
        objects: crate::storage::open(&options.object_store)?,
        scratch_dir: scratch.to_string_lossy().into_owned(),
        trial_exe: options.trial_exe.clone(),
        data_roots: options.data_root.clone(),
        worker_id: worker_id.to_string(),
        fresh_processes: options.fresh_process_per_trial,
        telemetry: telemetry.clone(),
        provenance,
    });
    let held: Arc<Mutex<HashMap<String, Held>>> = Arc::default();
    let (drain_tx, mut drain) = watch::channel(false);
    tokio::spawn(heartbeat_forever(
        client.clone(),
        worker_id,
        held.clone(),
        health.clone(),
        drain_tx,
        Duration::from_millis(registration.heartbeat_interval_ms.max(100) as u64),
    ));

    // What one slot offers a fused group (fuse = "auto"), measured once.
    let slot_memory = crate::backend::slot_memory(&slots);
    // A slot comes back with whether its trial started.
    let (freed_tx, mut freed_rx) = mpsc::unbounded_channel::<Back>();
    let mut slots = Slots {
        free: slots.into_iter().map(|slot| (slot, None)).collect(),
        failures: 0,
        health: health.clone(),
        visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
    };
    let poll = Duration::from_millis(options.poll_ms);
    // A recorded completion may make a searcher propose trials (tpe, a promotion):
    // a worker whose lease came back empty asks again then, not a poll later.
    let completed = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut lease_client = client.clone();
    let mut shutdown = shutdown_signals()?;
    let mut signalled = false;
    loop {
        if *drain.borrow() {
            break;
        }
        slots.drain(&mut freed_rx);
        if slots.failures > 0 {
            let wait = Duration::from_millis(500 << slots.failures.min(7)).min(MAX_BACKOFF);
            tracing::warn!(failures = slots.failures, ?wait, reason = ?health.lock().expect("health lock"), "cannot start trials; waiting before trying one again");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => { signalled = true; break }
                _ = drain.changed() => break,
            }
            slots.drain(&mut freed_rx);
        }
        if slots.free.is_empty() {
            tokio::select! {
                back = freed_rx.recv() => slots.back(back),
                _ = shutdown.changed() => { signalled = true; break }
                _ = drain.changed() => break,
            }
            continue;
        }
        let request = proto::LeaseRequest {
            worker_id: worker_id.to_string(),
            // A worker that can't start trials tries one at a time, and never holds more leases than free slots.
            max_trials: if slots.failures > 0 { 1 } else { slots.free.len() as u32 },
            free_gpus: if slots.failures > 0 { 1 } else { slots.free_gpus() },
            slot_memory_bytes: slot_memory,
        };
        let leased = match lease_client.lease(request).await {
            Ok(response) => response.into_inner().trials,
            Err(status) => {
                tracing::debug!(%status, "lease failed; retrying");
                Vec::new()
            }
        };
        if leased.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = completed.notified() => {}
                back = freed_rx.recv() => slots.back(back),
                _ = shutdown.changed() => { signalled = true; break }
                _ = drain.changed() => break,
            }
            continue;
        }
        for group in fuse_groups(leased) {
            let gpus = group[0].gpus.max(1) as usize;
            let Some((slot, warm)) = slots.take(gpus) else {
                // Free slots on too few distinct GPUs (where `cuda:N*K` shares one):
                // the trial goes back at once for a worker with room.
                for trial in group {
                    let (mut client, worker_id) = (client.clone(), worker_id.to_string());
                    tokio::spawn(async move {
                        let reason = format!("no {} free slots on distinct GPUs on this worker now", trial.gpus);
                        let request = proto::ReleaseRequest {
                            trial_id: trial.trial_id,
                            lease_token: trial.lease_token,
                            worker_id,
                            reason,
                        };
                        if let Err(status) = client.release(request).await {
                            tracing::warn!(%status, "could not give back a trial without room; its lease will expire");
                        }
                    });
                }
                continue;
            };
            let mut members = Vec::with_capacity(group.len());
            for trial in group {
                let (stop_tx, stop) = watch::channel(None);
                held.lock().expect("held lock").insert(
                    trial.trial_id.clone(),
                    Held {
                        token: trial.lease_token.clone(),
                        stop: stop_tx,
                    },
                );
                members.push(runner::Member { trial, stop });
            }
            let (shared, held, freed, completed) = (shared.clone(), held.clone(), freed_tx.clone(), completed.clone());
            shared.telemetry.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let ids: Vec<String> = members.iter().map(|m| m.trial.trial_id.clone()).collect();
                let (started, warm, finishes) = runner::run(shared.clone(), slot.clone(), warm, members).await;
                shared.telemetry.busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                // The slot takes its next trial while these ones' last metrics and
                // completions are sent; their leases are heartbeated until they are.
                let _ = freed.send((slot, warm, started));
                futures::future::join_all(finishes.into_iter().map(|f| {
                    let shared = shared.clone();
                    async move { f.run(&shared).await }
                }))
                .await;
                completed.notify_one();
                let mut held = held.lock().expect("held lock");
                for id in ids {
                    held.remove(&id);
                }
            });
        }
    }
    if *drain.borrow() && !signalled {
        // Drained: the running trials end as they would have; a signal meanwhile stops them.
        loop {
            let running = held.lock().expect("held lock").len();
            if running == 0 {
                tracing::info!("drained: no trial left running; exiting");
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.changed() => break,
            }
        }
    }
    give_back_running(&client, &worker_id, &held, &shared.telemetry).await;
    Ok(())
}

/// Leased trials in the units that run on one slot each: a fused group's
/// members together (they come one after another, sharing `fuse_group`), every
/// other trial alone.
fn fuse_groups(leased: Vec<proto::LeasedTrial>) -> Vec<Vec<proto::LeasedTrial>> {
    let mut groups: Vec<Vec<proto::LeasedTrial>> = Vec::new();
    for trial in leased {
        match groups.last_mut() {
            Some(last) if !trial.fuse_group.is_empty() && last[0].fuse_group == trial.fuse_group => last.push(trial),
            _ => groups.push(vec![trial]),
        }
    }
    groups
}

/// Changes once the daemon is asked to stop: SIGTERM (scancel, a pod's
/// deletion, systemd) or SIGINT.
fn shutdown_signals() -> anyhow::Result<watch::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(());
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = interrupt.recv() => tracing::info!("SIGINT"),
        }
        let _ = tx.send(());
        // Keep the sender, so the receiver never sees it closed.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

/// Shutting down: stops every running trial's process and gives the trials
/// back at once, so they are leased again (and resume from their newest
/// checkpoint) without waiting for their leases to expire. Trials whose
/// completion is already on its way keep it. Quick enough for Slurm's
/// KillWait and a pod's grace period (a few seconds at most).
async fn give_back_running(
    client: &crate::Client,
    worker_id: &WorkerId,
    held: &Arc<Mutex<HashMap<String, Held>>>,
    telemetry: &crate::telemetry::Telemetry,
) {
    let running: Vec<(String, String)> = {
        let held = held.lock().expect("held lock");
        for h in held.values() {
            let _ = h.stop.send(Some("worker shutting down".into()));
        }
        held.iter().map(|(id, h)| (id.clone(), h.token.clone())).collect()
    };
    tracing::info!(
        trials = running.len(),
        "shutting down: stopping running trials and giving them back"
    );
    // Their processes end (the runner kills them) and finished trials report.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while telemetry.busy.load(std::sync::atomic::Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let releases = running.into_iter().map(|(trial_id, lease_token)| {
        let mut client = client.clone();
        let request = proto::ReleaseRequest {
            trial_id: trial_id.clone(),
            lease_token,
            worker_id: worker_id.to_string(),
            reason: "worker shutting down".into(),
        };
        async move {
            match tokio::time::timeout(Duration::from_secs(2), client.release(request)).await {
                Ok(Ok(r)) if r.get_ref().released => tracing::info!(trial = %trial_id, "given back"),
                Ok(Ok(_)) => tracing::info!(trial = %trial_id, "already ended or re-leased; nothing to give back"),
                Ok(Err(status)) => {
                    tracing::warn!(trial = %trial_id, %status, "could not give the trial back; its lease will expire")
                }
                Err(_) => {
                    tracing::warn!(trial = %trial_id, "the coordinator did not answer; the trial's lease will expire")
                }
            }
        }
    });
    futures::future::join_all(releases).await;
}

/// A slot given back by its trial's task, with its warm process and whether the trial started.
type Back = (Slot, Option<TrialProcess>, runner::Started);

/// The free slots with their warm processes, and how many trials in a row could
/// not be started (while above zero the worker leases one at a time, after a backoff).
struct Slots {
    free: Vec<(Slot, Option<TrialProcess>)>,
    failures: u32,
    health: Health,
    /// The daemon's `CUDA_VISIBLE_DEVICES` (what Slurm granted), through which
    /// a trial of several GPUs names them to its process.
    visible_devices: Option<String>,
}

impl Slots {
    /// Distinct GPUs among the free slots.
    fn free_gpus(&self) -> u32 {
        let gpus: std::collections::HashSet<&str> = self.free.iter().filter_map(|(s, _)| s.gpu()).collect();
        gpus.len() as u32
    }

    /// A free slot for a trial of `gpus` GPUs: one slot, or for several one
    /// made of free slots on that many distinct GPUs (their warm processes
    /// end, giving the trial their GPU memory). `None` when there is no room.
    fn take(&mut self, gpus: usize) -> Option<(Slot, Option<TrialProcess>)> {
        if gpus <= 1 {
            return self.free.pop();
        }
        let mut chosen: Vec<usize> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, (slot, _)) in self.free.iter().enumerate().rev() {
            if let Some(gpu) = slot.gpu() {
                if chosen.len() < gpus && seen.insert(gpu.to_string()) {
                    chosen.push(i);
                }
            }
        }
        if chosen.len() < gpus {
            return None;
        }
        chosen.sort_unstable();
        let mut parts: Vec<Slot> = chosen.iter().rev().map(|&i| self.free.remove(i).0).collect();
        parts.sort_by(|a, b| a.name.cmp(&b.name));
        Some((Slot::group(parts, self.visible_devices.as_deref()), None))
    }

    fn back(&mut self, back: Option<Back>) {
        let Some((slot, warm, started)) = back else { return };
        if slot.parts.is_empty() {
            self.free.push((slot, warm));
        } else {
            // A trial of several GPUs ran in a process of its own; its slots come back bare.
            self.free.extend(slot.parts.into_iter().map(|part| (part, None)));
        }
        match started {
            runner::Started::Yes => {
                if self.failures > 0 {
                    tracing::info!("trials start again; the worker is healthy");
                }
                self.failures = 0;
                *self.health.lock().expect("health lock") = None;
            }
            runner::Started::No(reason) => {
                self.failures += 1;
                *self.health.lock().expect("health lock") = Some(reason);
            }
        }
    }

    /// Takes back every slot already returned.
    fn drain(&mut self, freed: &mut mpsc::UnboundedReceiver<Back>) {
        while let Ok(back) = freed.try_recv() {
            self.back(Some(back));
        }
    }
}

/// Registers, retrying while the coordinator is away; a refusal (a bad pool or label) is an error.
async fn register(client: &crate::Client, request: proto::RegisterRequest) -> anyhow::Result<proto::RegisterResponse> {
    let mut warned = false;
    loop {
        match client.clone().register(request.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                anyhow::bail!("the coordinator refused this worker: {}", status.message())
            }
            Err(status) => {
                if !warned {
                    tracing::warn!(%status, "coordinator not reachable yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

async fn heartbeat_forever(
    mut client: crate::Client,
    worker_id: WorkerId,
    held: Arc<Mutex<HashMap<String, Held>>>,
    health: Health,
    drain: watch::Sender<bool>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let leases: Vec<proto::HeldLease> = held
            .lock()
            .expect("held lock")
            .iter()
            .map(|(id, h)| proto::HeldLease {
                trial_id: id.clone(),
                lease_token: h.token.clone(),
            })
            .collect();
        let request = proto::HeartbeatRequest {
            worker_id: worker_id.to_string(),
            leases,
            unhealthy: health.lock().expect("health lock").clone().unwrap_or_default(),
        };
        match client.heartbeat(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if response.drain && !*drain.borrow() {
                    tracing::info!("drained by an admin: taking no new trials; exiting when the running ones end");
                    let _ = drain.send(true);
                }
                let held = held.lock().expect("held lock");
                for order in response.stop {
                    if let Some(h) = held.get(&order.trial_id) {
                        let _ = h.stop.send(Some(order.reason));
                    }
                }
            }
            Err(status) => tracing::debug!(%status, "heartbeat failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(names: &[&str]) -> Slots {
        Slots {
            free: names
                .iter()
                .map(|n| (Slot::new(n.to_string(), n.split('#').next().unwrap().into(), 1), None))
                .collect(),
            failures: 0,
            health: Health::default(),
            visible_devices: Some("2,3,4".into()),
        }
    }

    #[test]
    fn trials_of_several_gpus_take_slots_on_distinct_gpus_and_give_them_back() {
        let mut free = slots(&["cuda:0#0", "cuda:0#1", "cuda:1", "cuda:2"]);
        assert_eq!(free.free_gpus(), 3);
        let (group, warm) = free.take(3).expect("three distinct GPUs are free");
        assert!(warm.is_none());
        assert_eq!(group.name, "cuda:0+cuda:1+cuda:2");
        assert_eq!(group.visible_devices.as_deref(), Some("2,3,4"));
        assert_eq!(free.free.len(), 1);
        assert_eq!(free.free_gpus(), 1);
        // One slot left, on cuda:0: no room for two GPUs; one still fits.
        assert!(free.take(2).is_none());
        assert_eq!(free.free.len(), 1, "a refused take keeps the free slots");
        free.back(Some((group, None, runner::Started::Yes)));
        assert_eq!(free.free.len(), 4, "the group's slots all come back");
        assert_eq!(free.free_gpus(), 3);
        let (one, _) = free.take(1).unwrap();
        assert!(one.parts.is_empty() && one.visible_devices.is_none());
        // CPU slots count as no GPU: the coordinator leases them trials of one.
        assert_eq!(slots(&["cpu:0", "cpu:1"]).free_gpus(), 0);
        assert!(slots(&["cpu:0", "cpu:1"]).take(2).is_none());
    }
}
