//! `ablate up` and `ablate down`: the embedded stack on one machine.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ablate_coordinator::{Coordinator, Options};

use crate::commands::serve::shutdown_signal;
use crate::embedded::EmbeddedPg;
use crate::{StateArgs, UpArgs};

fn pid_file(state: &Path) -> PathBuf {
    state.join("up.pid")
}

/// The `ablate-worker` binary installed beside this one.
fn worker_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let worker = me.with_file_name("ablate-worker");
    if !worker.exists() {
        anyhow::bail!(
            "{} not found; build it with `cargo xtask build` (it needs libtorch)",
            worker.display()
        );
    }
    Ok(worker)
}

/// The pid of the stack running from `state`, if one runs (other than this process).
fn running_stack(state: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(state)).ok()?.trim().parse().ok()?;
    // SAFETY: kill(pid, 0) only checks that the process exists.
    let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
    (alive && pid as u32 != std::process::id()).then_some(pid)
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state.state_dir)?;
    if let Some(pid) = running_stack(&args.state.state_dir) {
        eprintln!(
            "ablate is already up from {} (pid {pid}); nothing started. `ablate down` stops it",
            args.state.state_dir.display()
        );
        return Ok(());
    }
    // The coordinator's addresses are free, or nothing starts (the embedded PostgreSQL
    // of this state directory may already run: it is reused).
    let http = http_listen(&args)?;
    let mut wanted = vec![("--listen", args.listen)];
    wanted.extend(http.map(|h| ("--http-listen", h)));
    for (flag, addr) in wanted {
        if let Err(error) = std::net::TcpListener::bind(addr) {
            anyhow::bail!("{addr} is taken ({error}); nothing started. Give `ablate up` another {flag}");
        }
    }
    if args.detach {
        return detach(&args, http).await;
    }
    std::fs::write(pid_file(&args.state.state_dir), std::process::id().to_string())?;
    let worker = worker_binary()?;
    let (pg, database_url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            let (pg, url) = EmbeddedPg::start(&args.state.state_dir, args.pg_port)?;
            (Some(pg), url)
        }
    };
    let result = serve(&args, worker, database_url, http).await;
    // Whether it stopped or never came up, nothing it started is left running.
    if let Some(pg) = pg {
        pg.stop();
    }
    let _ = std::fs::remove_file(pid_file(&args.state.state_dir));
    result
}

/// The coordinator and the supervised local worker, until a shutdown signal.
async fn serve(
    args: &UpArgs,
    worker: PathBuf,
    database_url: String,
    http: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let mut options = Options::new(database_url, args.listen);
    args.limits.apply(&mut options);
    options.http_listen = http;
    // The coordinator keeps command trials' code where the local worker reads objects.
    options.object_store = Some(
        std::path::absolute(&args.state.state_dir)?
            .join("objects")
            .display()
            .to_string(),
    );
    // Tokens on, set up for the local user: an admin token kept in the
    // credentials file under this coordinator's address, a worker token for
    // the local worker under the state directory (both mode 0600).
    let state = std::path::absolute(&args.state.state_dir)?;
    options.auth = true;
    options.admin_token_file = Some(state.join("admin.token"));
    let coordinator = Coordinator::build(options).await?;
    let addr = coordinator.local_addr();
    let coordinator_url = format!("http://{addr}");
    let worker_token = state.join("worker.token");
    coordinator
        .ensure_token_file(&worker_token, ablate_coordinator::auth::Role::Worker)
        .await?;
    let admin = std::fs::read_to_string(state.join("admin.token"))?;
    let api = coordinator.http_addr().map(|a| format!("http://{a}"));
    let kept = crate::client::store_token(&coordinator_url, admin.trim(), api.as_deref())?;
    eprintln!("your admin token for {coordinator_url} is kept in {}", kept.display());
    if let Some(http) = coordinator.http_addr() {
        eprintln!("metrics at http://{http}/metrics");
        eprintln!(
            "dashboard: {}  (opening it logs the browser in; `ablate dashboard` prints it again)",
            crate::commands::dashboard::login_url(&format!("http://{http}"), Some(admin.trim()))
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coordinator.run(async {
        let _ = stop_rx.await;
    }));
    let mut command = tokio::process::Command::new(worker);
    command
        .args(["daemon", "--coordinator", &coordinator_url, "--devices", &args.devices])
        .arg("--token-file")
        .arg(&worker_token)
        .args(
            args.limits
                .data_root
                .iter()
                .flat_map(|r| ["--data-root".as_ref(), r.as_os_str()]),
        )
        .arg("--object-store")
        .arg(state.join("objects"))
        .arg("--state-dir")
        .arg(state.join("worker"))
        // Its user's own programs (command trials) run as that user, as `ablate` does.
        .arg("--allow-commands")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; the worker gets SIGTERM if this process dies
    // (killed, OOM), so no worker outlives its stack.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    eprintln!(
        "ablate is up: coordinator {coordinator_url}, objects in {}; Ctrl-C stops it",
        state.join("objects").display()
    );
    // Supervise the worker: one that dies is started again (after a pause that
    // grows while it keeps dying young), with a line in the log.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut pause = Duration::from_secs(1);
    loop {
        let started = std::time::Instant::now();
        tokio::select! {
            _ = &mut shutdown => break,
            status = child.wait() => {
                if started.elapsed() > Duration::from_secs(60) {
                    pause = Duration::from_secs(1);
                }
                eprintln!("the local worker exited ({status:?}); starting it again in {} s", pause.as_secs());
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(60));
                child = command.spawn()?;
            }
        }
    }
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    eprintln!("ablate is down");
    Ok(())
}

/// Starts `ablate up` in the background and waits until its coordinator answers.
async fn detach(args: &UpArgs, http: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let state = &args.state.state_dir;
    let log_path = state.join("up.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    let http = http.map_or("off".to_string(), |a| a.to_string());
    command
        .args(["up", "--listen", &args.listen.to_string(), "--devices", &args.devices])
        .args(["--http-listen", &http])
        .args(["--pg-port", &args.pg_port.to_string()])
        .args(args.limits.to_args())
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn()?;
    std::fs::write(pid_file(state), child.id().to_string())?;
    let addr = format!("http://{}", args.listen);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if answers(&addr).await {
            eprintln!(
                "ablate is up in the background: coordinator {addr}; log {}; `ablate down` stops it",
                log_path.display()
            );
            return Ok(());
        }
        // A stack that gave up says why at once, in its own words.
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let said: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let said = said[said.len().saturating_sub(5)..].join("\n");
            stop_everything(state).await;
            anyhow::bail!("the stack exited ({status}) before it came up; nothing is left running. It said:\n{said}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop_everything(state).await;
    anyhow::bail!(
        "the stack did not come up within 60 s, so it was stopped; see {}",
        log_path.display()
    )
}

/// Whether the coordinator at `addr` serves calls: any answer but `unavailable`
/// (a refusal of another token in ABLATE_TOKEN is an answer). It serves only after
/// it has kept its token for this user, so a client started next finds it.
async fn answers(addr: &str) -> bool {
    let call = async {
        let mut client = crate::client::connect(addr).await.ok()?;
        let answer = client
            .list_workers(ablate_schema::proto::ListWorkersRequest::default())
            .await;
        Some(answer.map_or_else(|s| s.code() != tonic::Code::Unavailable, |_| true))
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), call).await, Ok(Some(true)))
}

/// Stops whatever a stack started from `state`, quietly (as `ablate down`).
async fn stop_everything(state: &Path) {
    let _ = down(StateArgs {
        state_dir: state.to_path_buf(),
    })
    .await;
}

/// Stops the stack running from a state directory: its `ablate up` process
/// (SIGTERM, then SIGKILL after 30 s), then its PostgreSQL, whatever state the
/// process was in (a killed `up` leaves its server behind; this stops it too).
pub async fn down(args: StateArgs) -> anyhow::Result<()> {
    let file = pid_file(&args.state_dir);
    let pid: Option<i32> = std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse().ok());
    let has_pg = args.state_dir.join("pg").exists() || args.state_dir.join("pg-location").exists();
    if pid.is_none() && !has_pg {
        anyhow::bail!(
            "no stack is running from {} (no {})",
            args.state_dir.display(),
            file.display()
        );
    }
    if let Some(pid) = pid.filter(|&p| p > 0) {
        // SAFETY: signalling the pid our `ablate up` wrote; kill(pid, 0) only checks it exists.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let mut stopped = false;
        for _ in 0..120 {
            if unsafe { libc::kill(pid, 0) } != 0 {
                stopped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if !stopped {
            eprintln!("the stack (pid {pid}) did not stop within 30 s; killing it");
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if has_pg {
        EmbeddedPg::stop_dir(&args.state_dir).ok();
    }
    let _ = std::fs::remove_file(&file);
    eprintln!("ablate is down");
    Ok(())
}

/// `--http-listen`: an address, `off`, or by default the port after `--listen`'s on its host.
fn http_listen(args: &UpArgs) -> anyhow::Result<Option<std::net::SocketAddr>> {
    match args.http_listen.as_deref() {
        Some("off") => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("--http-listen {text}: expected an address such as 127.0.0.1:7078, or off")),
        None => match args.listen.port().checked_add(1) {
            Some(port) => Ok(Some(std::net::SocketAddr::new(args.listen.ip(), port))),
            None => anyhow::bail!(
                "--listen {}: no port follows it for HTTP; give --http-listen",
                args.listen
            ),
        },
    }
}
