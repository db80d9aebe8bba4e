//! The embedded PostgreSQL of `ablate up`: a private cluster under
//! `<state>/pg`, started with initdb and pg_ctl. As root, the server runs as
//! the `postgres` user, since PostgreSQL refuses to run as root; when that
//! user can't reach the state directory (a clone in root's mode-700 home or
//! in a `mktemp -d`), the cluster lives under `/var/lib/ablate/` instead, in
//! a folder named after the state directory, which `<state>/pg-location` names.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

pub struct EmbeddedPg {
    bindir: PathBuf,
    data: PathBuf,
    as_postgres: bool,
}

/// Finds the PostgreSQL server binaries: `ABLATE_PG_BINDIR`, the newest
/// `/usr/lib/postgresql/*/bin`, or `pg_config --bindir`.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("ABLATE_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    anyhow::bail!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them (`apt-get install postgresql`, \
         or `cargo xtask demo` does it), set ABLATE_PG_BINDIR, or set DATABASE_URL to use your own server"
    )
}

/// Where the cluster of `state_dir` lives: `<state>/pg`, unless the server
/// runs as `postgres` and that user can't reach it; then a folder of
/// `/var/lib/ablate` named after the state directory's absolute path.
fn cluster_root(state_dir: &Path, as_postgres: bool) -> anyhow::Result<PathBuf> {
    let state = std::path::absolute(state_dir)?;
    std::fs::create_dir_all(&state)?;
    let local = state.join("pg");
    if !as_postgres || postgres_can_reach(&state) {
        return Ok(local);
    }
    let digest = state.to_string_lossy().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    // The clone's name when the state folder is the usual hidden `.ablate`.
    let named = if state.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
        state.parent().unwrap_or(&state)
    } else {
        &state
    };
    let name = named
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let root = PathBuf::from("/var/lib/ablate").join(format!("pg-{name}-{digest:016x}"));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    std::fs::write(
        state.join("pg-location"),
        format!(
            "{}\n(the postgres user can't reach {}, so the embedded PostgreSQL keeps its data there)\n",
            root.display(),
            state.display()
        ),
    )?;
    Ok(root)
}

/// Whether the `postgres` user can enter `dir` (every folder above it included).
fn postgres_can_reach(dir: &Path) -> bool {
    Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(dir)
        .current_dir("/")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl EmbeddedPg {
    /// Initializes the cluster if needed and starts it; returns it with its connection URL.
    pub fn start(state_dir: &Path, port: u16) -> anyhow::Result<(EmbeddedPg, String)> {
        let bindir = find_bindir()?;
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let root = cluster_root(state_dir, as_postgres)?;
        let data = root.join("data");
        let run = root.join("run");
        std::fs::create_dir_all(&run)?;
        let pg = EmbeddedPg {
            bindir,
            data: data.clone(),
            as_postgres,
        };
        if as_postgres {
            pg.run_plain("chown", &["-R", "postgres:postgres", &root.to_string_lossy()])?;
        }
        if !data.join("PG_VERSION").exists() {
            eprintln!("initializing PostgreSQL in {}", data.display());
            pg.tool(
                "initdb",
                &[
                    "-D",
                    &data.to_string_lossy(),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ],
            )?;
        }
        let running = pg.tool("pg_ctl", &["status", "-D", &data.to_string_lossy()]).is_ok();
        if !running {
            let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", run.display());
            let log = root.join("postgres.log");
            pg.tool(
                "pg_ctl",
                &[
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    &data.to_string_lossy(),
                    "-l",
                    &log.to_string_lossy(),
                    "-o",
                    &options,
                ],
            )
            .with_context(|| format!("starting PostgreSQL; its log is {}", log.display()))?;
        }
        let exists = pg.tool(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-tAc",
                "select 1 from pg_database where datname = 'ablate'",
            ],
        )?;
        if exists.trim() != "1" {
            pg.tool(
                "createdb",
                &["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "ablate"],
            )?;
        }
        Ok((pg, format!("postgres://postgres@127.0.0.1:{port}/ablate")))
    }

    /// Stops the cluster kept under `state_dir`, if it runs.
    pub fn stop_dir(state_dir: &Path) -> anyhow::Result<()> {
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let pg = EmbeddedPg {
            bindir: find_bindir()?,
            data: cluster_root(state_dir, as_postgres)?.join("data"),
            as_postgres,
        };
        if pg.tool("pg_ctl", &["status", "-D", &pg.data.to_string_lossy()]).is_ok() {
            pg.stop();
        }
        Ok(())
    }

    pub fn stop(&self) {
        if let Err(e) = self.tool(
            "pg_ctl",
            &["stop", "-m", "fast", "-w", "-D", &self.data.to_string_lossy()],
        ) {
            eprintln!("stopping PostgreSQL: {e:#}");
        }
    }

    fn tool(&self, name: &str, args: &[&str]) -> anyhow::Result<String> {
        let program = self.bindir.join(name);
        let program = program.to_string_lossy();
        if self.as_postgres {
            let mut all = vec!["-u", "postgres", "--", program.as_ref()];
            all.extend_from_slice(args);
            self.run_plain("runuser", &all)
        } else {
            self.run_plain(&program, args)
        }
    }

    fn run_plain(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(program)
            .args(args)
            .current_dir("/")
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            anyhow::bail!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
