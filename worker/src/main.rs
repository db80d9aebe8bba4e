//! `ablate-worker`: the worker daemon and the trial process it spawns.
//!
//! **Architecture invariant:** the worker never talks to PostgreSQL; all it
//! knows of the platform is the coordinator's `Workers` gRPC service. It is
//! the only binary that links libtorch.

mod backend;
mod daemon;
mod relay;
mod runner;
mod storage;
mod trial_process;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ablate-worker", version, about = "runs ablate trials on this host's devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Registers with the coordinator and runs leased trials, one process per device slot.
    Daemon(daemon::Options),
    /// Runs one trial: its spec as JSON on stdin, metrics and events as JSON lines on stdout.
    Trial,
    /// Prints the devices this host offers and which libtorch backend is live.
    Devices,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon(options) => {
            let backend = backend::init();
            tokio::runtime::Runtime::new()?.block_on(daemon::run(options, backend))
        }
        Command::Trial => {
            backend::init_quiet();
            if let Err(error) = trial_process::run() {
                // The daemon keeps this line as the trial's error.
                eprintln!("error: {error:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Devices => {
            let backend = backend::init();
            for d in backend::discover("auto", &backend)? {
                println!("{}", d.name);
            }
            Ok(())
        }
    }
}

/// Where the worker keeps its spool by default.
fn default_state_dir() -> PathBuf {
    PathBuf::from(".ablate")
}
