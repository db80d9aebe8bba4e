//! `ablate-worker`: the worker daemon, the trial process it spawns, and the
//! in-process `sweep` runner.

use std::path::PathBuf;

use ablate_worker::{backend, daemon, fused_bench, local, step_bench, trial_process};
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
    Trial {
        /// Runs one trial per stdin line, one after another, until stdin ends (a warm slot's process).
        #[arg(long)]
        warm: bool,
    },
    /// Prints the devices this host offers and which libtorch backend is live.
    Devices,
    /// Prints what this worker reports with every trial attempt (version, commit,
    /// libtorch and CUDA versions, device names, host) as JSON.
    Provenance {
        /// Device slots: auto, cpu:K or cuda:0,cuda:1.
        #[arg(long, default_value = "auto")]
        devices: String,
    },
    /// Times one training step of a built-in model (for `cargo xtask bench`).
    #[command(hide = true)]
    BenchStep(step_bench::Options),
    /// Times trials of the muP width sweep one by one and fused (for `cargo xtask bench fused`).
    #[command(hide = true)]
    BenchFused(fused_bench::Options),
    /// Runs every trial of a spec in this process, one per device slot, and prints the family's report.
    /// No coordinator, database or object store: for a machine with devices and nothing else.
    Sweep {
        spec: PathBuf,
        /// Device slots: auto, cpu:K or cuda:0,cuda:1.
        #[arg(long, default_value = "auto")]
        devices: String,
        /// Writes the trials' outcomes and the report here as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Appends each trial's outcome here as a JSON line the moment it finishes.
        #[arg(long)]
        trial_log: Option<PathBuf>,
        /// Directory for the objects trials write (data selections, ...); default: a new ablate-sweep-<pid>-<time> in the temp dir.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Overrides a field of the spec: PATH=VALUE, such as base.steps=10 or
        /// sweep.params.width=[64,128] (VALUE is read as TOML); repeat it for more.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        sets: Vec<String>,
        /// A folder trials may read local data under (repeat it for more); by default the
        /// provisioned data folder and /usr/share/datasets.
        #[arg(long)]
        data_root: Vec<PathBuf>,
        /// What the sweep must show for the command to exit 0 (else it exits 3 and says what fell
        /// short): nothing; succeeded (every trial succeeded and the report has a verdict);
        /// verdict (that, and every criterion of the verdict holds).
        #[arg(long, value_enum, default_value = "nothing")]
        require: local::Require,
    },
    /// Prints the report of a spec's family over a trial log that `sweep --trial-log` wrote
    /// (all of it, or what a cut-short run finished).
    Report {
        /// The family, such as critical_batch.
        #[arg(long)]
        family: String,
        trial_log: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let service = match cli.command {
        Command::Trial { .. } => "ablate-trial",
        _ => "ablate-worker",
    };
    let _traces = ablate_schema::trace::init(service).map_err(|e| anyhow::anyhow!(e))?;
    match cli.command {
        Command::Daemon(options) => {
            let backend = backend::init();
            tokio::runtime::Runtime::new()?.block_on(daemon::run(options, backend))
        }
        Command::Trial { warm } => {
            obey_only_the_daemons_sigterm();
            backend::init_quiet();
            let result = if warm {
                trial_process::run_warm()
            } else {
                trial_process::run()
            };
            if let Err(error) = result {
                // The daemon keeps this line as the trial's error.
                eprintln!("error: {error:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Sweep {
            spec,
            devices,
            out,
            trial_log,
            store,
            sets,
            data_root,
            require,
        } => {
            let backend = backend::init();
            let slots = backend::discover(&devices, &backend)?;
            let text = std::fs::read_to_string(&spec)
                .map_err(|e| anyhow::anyhow!("cannot read spec {}: {e}", spec.display()))?;
            let mut format = ablate_schema::SpecFormat::from_path(&spec.to_string_lossy());
            let text = if sets.is_empty() {
                text
            } else {
                let changed = ablate_schema::spec::apply_overrides(&text, format, &sets)
                    .map_err(|e| anyhow::anyhow!("--set: {e}"))?;
                format = ablate_schema::SpecFormat::Yaml;
                changed
            };
            // A command trial's program runs from the spec's folder.
            let workdir = spec
                .canonicalize()
                .ok()
                .and_then(|p| p.parent().map(std::path::Path::to_path_buf));
            let options = local::Options {
                log: trial_log,
                store,
                data_roots: data_root,
                every_series: false,
                workdir,
            };
            let (report, outcomes) = match local::run(&text, format, &slots, &options) {
                Ok(done) => done,
                Err(error) if require != local::Require::Nothing => {
                    eprintln!("error: {error:#}");
                    std::process::exit(3);
                }
                Err(error) => return Err(error),
            };
            print!("{}", report.to_text());
            if let Some(out) = out {
                std::fs::write(
                    &out,
                    serde_json::to_vec_pretty(&serde_json::json!({"report": report, "trials": outcomes}))?,
                )?;
                eprintln!("wrote {}", out.display());
            }
            let short = local::shortfalls(require, &report, &outcomes);
            if !short.is_empty() {
                for line in &short {
                    println!("FAILED: {line}");
                }
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Report { family, trial_log } => {
            let family = ablate_experiments::Family::parse(&family).map_err(|e| anyhow::anyhow!(e))?;
            let text = std::fs::read_to_string(&trial_log)
                .map_err(|e| anyhow::anyhow!("cannot read trial log {}: {e}", trial_log.display()))?;
            let outcomes = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    serde_json::from_str(l).map_err(|e| {
                        anyhow::anyhow!("{} line {}: not a trial outcome ({e})", trial_log.display(), i + 1)
                    })
                })
                .collect::<anyhow::Result<Vec<ablate_experiments::report::TrialOutcome>>>()?;
            let report = family.report(&outcomes).map_err(|e| anyhow::anyhow!("report: {e}"))?;
            print!("{}", report.to_text());
            Ok(())
        }
        Command::BenchStep(options) => step_bench::run(&options),
        Command::BenchFused(options) => fused_bench::run(&options),
        Command::Provenance { devices } => {
            let backend = backend::init_quiet();
            let slots = backend::discover(&devices, &backend)?;
            let provenance = ablate_worker::provenance::Provenance::gather(&slots);
            println!("{}", serde_json::to_string_pretty(&provenance)?);
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

/// A trial process ends on SIGTERM only when its daemon sends it (a stop
/// order). Slurm's `scancel` and systemd signal every process of the job: the
/// daemon then stops the trial itself and gives it back, so the trial must not
/// die first and be counted as a crash.
fn obey_only_the_daemons_sigterm() {
    extern "C" fn on_sigterm(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO; getppid and
        // _exit are async-signal-safe.
        unsafe {
            if (*info).si_pid() == libc::getppid() {
                libc::_exit(128 + libc::SIGTERM);
            }
        }
    }
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigterm as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}
