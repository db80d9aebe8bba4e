//! `ablate serve`: a coordinator against DATABASE_URL.

use std::time::Duration;

use ablate_coordinator::{Coordinator, Options};

use crate::ServeArgs;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut options = Options::new(args.database_url, args.listen);
    if args.lease_ttl.is_nan() || args.lease_ttl <= 0.0 {
        anyhow::bail!("--lease-ttl must be a positive number of seconds");
    }
    options.lease_ttl = Duration::from_secs_f64(args.lease_ttl);
    if let Some(grace) = args.reap_grace {
        if grace.is_nan() || grace < 0.0 {
            anyhow::bail!("--reap-grace must be a number of seconds, 0 or more");
        }
        options.reap_grace = Some(Duration::from_secs_f64(grace));
    }
    args.limits.apply(&mut options);
    options.auth = args.auth;
    options.admin_token_file = args.admin_token_file.clone();
    if args.admin_token_file.is_some() && !args.auth {
        anyhow::bail!("--admin-token-file needs --auth");
    }
    let tls = args.tls_cert.is_some();
    let guarded = tls && args.auth;
    if !(args.listen.ip().is_loopback() || guarded || args.insecure) {
        anyhow::bail!(
            "refusing to listen on {} without TLS and tokens: anyone who reaches it could submit, run SQL and \
             act as a worker. Give --tls-cert FILE --tls-key FILE and --auth, or --insecure to listen anyway",
            args.listen
        );
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
        options.tls = Some((read(cert)?, read(key)?));
    }
    options.http_listen = args.http_listen;
    options.object_store = args.object_store.clone();
    options.reader_database_url = args.reader_database_url.clone();
    options.chunk_running_after = args.chunk_running_after;
    let coordinator = Coordinator::build(options).await?;
    eprintln!("coordinator listening on {}", coordinator.local_addr());
    if let Some(http) = coordinator.http_addr() {
        eprintln!("metrics at http://{http}/metrics");
    }
    coordinator.run(shutdown_signal()).await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `ablate db migrate`.
pub async fn migrate(database_url: &str, register: &[String]) -> anyhow::Result<()> {
    use ablate_coordinator::auth::Role;
    let mut tokens = Vec::new();
    for arg in register {
        let parts: Vec<&str> = arg.splitn(3, ':').collect();
        let [role, name, file] = parts.as_slice() else {
            anyhow::bail!(
                "--register-token `{arg}`: expected ROLE:NAME:FILE, such as worker:gpu-workers:/tokens/worker"
            );
        };
        let role = Role::parse(role)
            .ok_or_else(|| anyhow::anyhow!("--register-token `{arg}`: the role must be researcher, worker or admin"))?;
        if name.is_empty() {
            anyhow::bail!("--register-token `{arg}`: the token needs a name");
        }
        let secret = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("--register-token `{arg}`: cannot read {file}: {e}"))?;
        tokens.push((role, name.to_string(), secret));
    }
    for line in ablate_coordinator::migrate(database_url, &tokens).await? {
        eprintln!("{line}");
    }
    eprintln!("migrations applied");
    Ok(())
}
