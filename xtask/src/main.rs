//! `cargo xtask`: provisioning and orchestration.
//!
//! - `demo`: provision, build, start the embedded stack, run the quickstart sweep.
//! - `test`: provision, build, make sure PostgreSQL answers, run every test.
//! - `bench`: ablate beside its peers and raw PostgreSQL, in one run.
//! - `gpu`: the GPU check's bundle and command; `gpu --dry-run` runs it here on the CPU.
//! - `build`, `check` (fmt + clippy), `provision`.
//!
//! libtorch and the build directory live under `~/.cache/ablate`, outside the
//! clone, so every clone and every CI run reuses them.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod layout;
mod provision;
mod science;

use provision::*;

const TORCH_VERSION: &str = "2.11.0";
/// The peers' versions, one per peer for every bench (BENCHMARKS.md's figures).
const OPTUNA: &str = "optuna==5.0.0";
const RAY_TUNE: &str = "ray[tune]==2.60.0";
const MLFLOW: &str = "mlflow==3.17.0";
const TEST_PG_PORT: u16 = 54330;

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/ablate")
}

/// Where the data sets are provisioned (what the worker reads as its data root).
fn data_dir() -> PathBuf {
    cache_dir().join("data")
}

fn libtorch_dir() -> PathBuf {
    cache_dir().join(format!("libtorch-{TORCH_VERSION}")).join("torch")
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("target"))
}

fn bin_dir(profile: &str) -> PathBuf {
    target_dir().join(profile)
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

pub(crate) type Result<T = ()> = std::result::Result<T, String>;

fn run(command: &mut Command) -> Result {
    eprintln!("xtask: {}", describe(command));
    let status = command.status().map_err(|e| format!("{}: {e}", describe(command)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed ({status})", describe(command)))
    }
}

pub(crate) fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A cargo command with the fixed libtorch and target directories.
pub(crate) fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .args(args)
        .current_dir(workspace_root())
        .env("LIBTORCH", libtorch_dir())
        .env("CARGO_TARGET_DIR", target_dir());
    command
}

/// The GPU check. `gpu`: builds the release worker, packs it with the data sets
/// into gpu/bundle.tar.gz (well under the 64 MiB a GPU machine receives beside
/// the tracked files) and prints the command to run there. `gpu --dry-run`:
/// runs the same script here on the CPU with every spec cut to a few steps.
fn gpu(args: &[String]) -> Result {
    provision_libtorch()?;
    provision_datasets()?;
    provision_fashion_mnist()?;
    let root = workspace_root();
    let script = root.join("xtask/scripts/gpu-check.sh");
    if args.iter().any(|a| a == "--dry-run") {
        build("debug")?;
        let out = target_dir().join("gpu-dry-run");
        let _ = std::fs::remove_dir_all(&out);
        return run(Command::new("bash")
            .arg(&script)
            .arg("--dry-run")
            .current_dir(&root)
            .env("ABLATE_GPU_BIN", bin_dir("debug").join("ablate-worker"))
            .env("ABLATE_DATA", data_dir())
            .env("OUT", &out));
    }
    build("release")?;
    let stage = target_dir().join("gpu-bundle");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("bin")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(stage.join("data")).map_err(|e| e.to_string())?;
    std::fs::copy(
        bin_dir("release").join("ablate-worker"),
        stage.join("bin/ablate-worker"),
    )
    .map_err(|e| e.to_string())?;
    for set in ["mnist", "shakespeare", "dsir"] {
        std::os::unix::fs::symlink(data_dir().join(set), stage.join("data").join(set)).map_err(|e| e.to_string())?;
    }
    std::os::unix::fs::symlink(FASHION_MNIST, stage.join("data/fashion-mnist")).map_err(|e| e.to_string())?;
    let bundle_dir = root.join("gpu");
    std::fs::create_dir_all(&bundle_dir).map_err(|e| e.to_string())?;
    let bundle = bundle_dir.join("bundle.tar.gz");
    run(Command::new("tar")
        .args(["-czhf"])
        .arg(&bundle)
        .arg("-C")
        .arg(&stage)
        .args(["bin", "data"]))?;
    let bytes = std::fs::metadata(&bundle).map_err(|e| e.to_string())?.len();
    eprintln!(
        "xtask: wrote {} ({:.1} MiB; gpu/ is ignored by git, so carry it)",
        bundle.display(),
        bytes as f64 / (1 << 20) as f64
    );
    println!("On the GPU machine, from the repository root (carry: [\"gpu\"]; 9 minutes for all, the rest of 15 for a rerun):");
    println!("  timeout 560 bash xtask/scripts/gpu-check.sh");
    println!("A rerun of some families: timeout 300 bash xtask/scripts/gpu-check.sh cbs dsir");
    Ok(())
}

/// Builds the worker (with libtorch) and the rest (without) in two passes, so
/// cargo's feature unification never links libtorch into `ablate`.
fn build(profile: &str) -> Result {
    provision_libtorch()?;
    let release = profile == "release";
    let with_profile = |mut args: Vec<&'static str>| {
        if release {
            args.push("--release");
        }
        args
    };
    run(&mut cargo(&with_profile(vec!["build", "-p", "ablate-worker"])))?;
    run(&mut cargo(&with_profile(vec![
        "build",
        "--workspace",
        "--exclude",
        "ablate-worker",
        "--exclude",
        "xtask",
    ])))
}

fn ablate(profile: &str) -> Command {
    Command::new(bin_dir(profile).join("ablate"))
}

/// DATABASE_URL, or the local server on 5432 when it answers with trust auth.
fn answering_database() -> Option<String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Some(url);
    }
    let local = "postgres://postgres@127.0.0.1:5432/postgres".to_string();
    let answers = Command::new("psql")
        .args([&local, "-w", "-tAc", "select 1"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    answers.then_some(local)
}

/// A PostgreSQL URL for the tests: DATABASE_URL, the local server on 5432, or a private one.
fn test_database() -> Result<String> {
    if let Some(url) = answering_database() {
        return Ok(url);
    }
    eprintln!(
        "xtask: no PostgreSQL answers on 127.0.0.1:5432 with trust auth; starting a private one on {TEST_PG_PORT}"
    );
    provision_postgres()?;
    let state = cache_dir().join("pg-test");
    let out = ablate("debug")
        .args(["db", "start", "--pg-port", &TEST_PG_PORT.to_string(), "--state-dir"])
        .arg(&state)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("ablate db start: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn test() -> Result {
    layout::check_cycles(&workspace_root())?;
    // The embedded-stack tests start a PostgreSQL of their own.
    provision_postgres()?;
    provision_libtorch()?;
    provision_datasets()?;
    let moto = provision_moto()?;
    // The science tests need nothing else of the workspace: started before the rest is
    // built (when a PostgreSQL answers already), they fill the CPU the build leaves idle.
    let science_env = |url: &str| {
        [
            ("DATABASE_URL", url.to_string()),
            ("ABLATE_MOTO_BIN", moto.to_string_lossy().into_owned()),
        ]
    };
    let early = answering_database()
        .map(|url| science::start(&science_env(&url)))
        .transpose()?;
    let prepared = (|| {
        build("debug")?;
        let url = test_database()?;
        let dsir_python = provision_dsir_reference()?;
        let prometheus = provision_prometheus()?;
        let kubernetes_validate = provision_kubernetes_validate()?;
        provision_slurm()?;
        let chromium = provision_chromium()?;
        let pytest = provision_pytest()?;
        let torch_python = provision_torch_python()?;
        Ok::<_, String>((
            url,
            dsir_python,
            prometheus,
            kubernetes_validate,
            chromium,
            pytest,
            torch_python,
        ))
    })();
    let (url, dsir_python, prometheus, kubernetes_validate, chromium, pytest, torch_python) = match prepared {
        Ok(p) => p,
        Err(e) => {
            if let Some(science) = early {
                science.stop();
            }
            return Err(e);
        }
    };
    eprintln!("xtask: tests use {url}");
    let science = match early {
        Some(science) => science,
        None => science::start(&science_env(&url))?,
    };
    let rest = (|| {
        run(cargo(&[
            "test",
            "--workspace",
            "--exclude",
            "ablate-worker",
            "--exclude",
            "xtask",
        ])
        .env("DATABASE_URL", &url)
        .env("ABLATE_BIN_DIR", bin_dir("debug"))
        .env("ABLATE_MOTO_BIN", &moto)
        .env("ABLATE_PROMETHEUS_BIN", &prometheus)
        .env("ABLATE_K8S_VALIDATE", &kubernetes_validate)
        .env("ABLATE_CHROMIUM", &chromium)
        .env("ABLATE_DSIR_PYTHON", &dsir_python)
        .env("ABLATE_TORCH_PYTHON", &torch_python))?;
        // Every torch test but the science ones (`test = false` in worker/Cargo.toml), running above.
        run(cargo(&["test"])
            .args(science::TORCH_TESTS)
            .env("DATABASE_URL", &url)
            .env("ABLATE_MOTO_BIN", &moto))?;
        // The Python package's tests (python/).
        run(Command::new(pytest)
            .args(["-q", "-s", "-p", "no:cacheprovider"])
            .arg(workspace_root().join("python/tests"))
            .env("ABLATE_BIN_DIR", bin_dir("debug")))?;
        // The GPU check's script, on the CPU with its specs cut to a few steps.
        gpu(&["--dry-run".to_string()])
    })();
    match rest {
        Ok(()) => science.finish(),
        Err(e) => {
            science.stop();
            Err(e)
        }
    }
}

fn check() -> Result {
    layout::check_cycles(&workspace_root())?;
    provision_libtorch()?;
    run(&mut cargo(&["fmt", "--all", "--", "--check"]))?;
    run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))
}

/// Runs a spec of experiments/specs (quickstart by default) on the embedded
/// stack; for a research family it then prints the family's report.
fn demo(spec_name: Option<&str>) -> Result {
    provision_postgres()?;
    build("debug")?;
    provision_datasets()?;
    let state = workspace_root().join(".ablate");
    let addr = std::env::var("ABLATE_COORDINATOR").unwrap_or_else(|_| "http://127.0.0.1:7077".into());
    let already_up = ablate("debug")
        .args(["--coordinator", &addr, "workers"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !already_up {
        run(ablate("debug").args(["up", "--detach", "--state-dir"]).arg(&state))?;
    }
    let name = spec_name.unwrap_or("quickstart");
    let spec = workspace_root()
        .join("experiments/specs")
        .join(format!("{}.toml", name.trim_end_matches(".toml")));
    let mut submit = ablate("debug");
    submit.args(["--coordinator", &addr, "submit", "--wait"]).arg(&spec);
    eprintln!("xtask: {}", describe(&submit));
    let out = submit
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    let experiment = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        return Err(format!("the sweep of {} did not succeed", spec.display()));
    }
    if name != "quickstart" {
        run(ablate("debug").args(["--coordinator", &addr, "report", &experiment]))?;
    }
    eprintln!(
        "\nthe stack keeps running in the background (state in {}).\n  export PATH={}:$PATH   # then: ablate status, ablate sql \"...\", ablate down",
        state.display(),
        bin_dir("debug").display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(args.get(1).map(String::as_str)),
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        Some("gpu") => gpu(&args[1..]),
        Some("build") => build(if args.iter().any(|a| a == "--release") {
            "release"
        } else {
            "debug"
        }),
        Some("check") => check(),
        Some("provision") => provision_libtorch()
            .and_then(|_| provision_postgres())
            .and_then(|_| provision_datasets())
            .and_then(|_| provision_dsir_reference().map(|_| ()))
            .and_then(|_| provision_moto().map(|_| ()))
            .and_then(|_| provision_prometheus().map(|_| ()))
            .and_then(|_| provision_kubernetes_validate().map(|_| ()))
            .and_then(|_| provision_slurm())
            .and_then(|_| provision_chromium().map(|_| ())),
        _ => Err("usage: cargo xtask <demo [SPEC]|test|bench [dsir|control|dashboard|commands|search|stop-rule|fused|scale] [--json FILE]|gpu [--dry-run]|build [--release]|check|provision>".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &[String]) -> Result {
    provision_libtorch()?;
    provision_datasets()?;
    // The dashboard's rows need no peers; the search rows only Optuna.
    let only = args.first().map(String::as_str);
    let peers = !matches!(
        only,
        Some("dashboard") | Some("commands") | Some("search") | Some("stop-rule") | Some("fused") | Some("scale")
    );
    let dsir_python = if peers {
        provision_dsir_reference()?
    } else {
        PathBuf::new()
    };
    let peers_python = match only {
        Some("search") => provision_optuna()?,
        Some("scale") => provision_mlflow()?,
        _ if peers => provision_peers()?,
        _ => PathBuf::new(),
    };
    let chromium = provision_chromium()?;
    build("release")?;
    run(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "ablate-coordinator",
        "--bin",
        "ablate-bench",
    ]))?;
    let url = test_database()?;
    let mut command = Command::new(bin_dir("release").join("ablate-bench"));
    command
        .args(args)
        .env("DATABASE_URL", url)
        .env("ABLATE_DSIR_PYTHON", dsir_python)
        .env("ABLATE_PEERS_PYTHON", peers_python)
        .env("ABLATE_CHROMIUM", chromium)
        .env("ABLATE_WORKER_BIN", bin_dir("release").join("ablate-worker"));
    run(&mut command)
}
