//! The embedded PostgreSQL of `ablate up`: a private cluster under
//! `<state>/pg`, started with initdb and pg_ctl. As root, the server runs as
//! the `postgres` user, since PostgreSQL refuses to run as root.

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

impl EmbeddedPg {
    /// Initializes the cluster if needed and starts it; returns it with its connection URL.
    pub fn start(state_dir: &Path, port: u16) -> anyhow::Result<(EmbeddedPg, String)> {
        let bindir = find_bindir()?;
        let root = std::path::absolute(state_dir.join("pg"))?;
        let data = root.join("data");
        let run = root.join("run");
        std::fs::create_dir_all(&run)?;
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
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
        let pg = EmbeddedPg {
            bindir: find_bindir()?,
            data: std::path::absolute(state_dir.join("pg").join("data"))?,
            // SAFETY: geteuid has no preconditions.
            as_postgres: unsafe { libc::geteuid() } == 0,
        };
        pg.stop();
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
