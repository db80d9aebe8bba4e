//! The science tests (worker/tests/science.rs: every family's sweep trained to its
//! criteria, minutes of CPU) run beside the rest of `cargo xtask test`, whose tests
//! mostly wait on processes, PostgreSQL and sockets: started first (before the rest of
//! the workspace is built, when a PostgreSQL answers) at the lowest CPU priority
//! (`nice -n 19`), they take the CPU the build and the others leave idle and never
//! slow them. Their output goes to a file, printed when they end; their failure fails the run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::{cargo, describe, target_dir, workspace_root, Result};

/// The packages and features the torch tests build with (the same for every torch test,
/// so the science binary and the others share one build).
pub const TORCH_TESTS: [&str; 6] = [
    "-p",
    "ablate-worker",
    "-p",
    "ablate-experiments",
    "--features",
    "ablate-experiments/torch",
];

/// The science tests, running.
pub struct Science {
    child: Child,
    log: PathBuf,
    started: Instant,
}

/// Builds the science test binary and starts it in the background, niced.
pub fn start(envs: &[(&str, String)]) -> Result<Science> {
    let mut build = cargo(&["test"]);
    build.args(TORCH_TESTS).args(["--test", "science", "--no-run"]);
    eprintln!("xtask: {}", describe(&build));
    let out = build.output().map_err(|e| format!("{}: {e}", describe(&build)))?;
    let said = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("{} failed:\n{said}", describe(&build)));
    }
    // cargo names what it built: "Executable tests/science.rs (/path/science-<hash>)".
    let exe = said
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("Executable tests/science.rs (")?;
            Some(PathBuf::from(rest.strip_suffix(')')?))
        })
        .ok_or_else(|| format!("cargo did not name the science test binary:\n{said}"))?;
    let log = target_dir().join("science-tests.log");
    let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    // As cargo runs a test: from its package (libtorch is found through the binary's rpath).
    let mut command = Command::new("nice");
    command
        .args(["-n", "19"])
        .arg(&exe)
        .current_dir(workspace_root().join("worker"))
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err);
    eprintln!(
        "xtask: {} (in the background, its output in {})",
        describe(&command),
        log.display()
    );
    let child = command.spawn().map_err(|e| format!("{}: {e}", describe(&command)))?;
    Ok(Science {
        child,
        log,
        started: Instant::now(),
    })
}

impl Science {
    /// Waits for the science tests, prints their output, and says whether they passed.
    pub fn finish(mut self) -> Result {
        let status = self.child.wait().map_err(|e| e.to_string())?;
        let output = std::fs::read_to_string(&self.log).unwrap_or_default();
        eprintln!("xtask: the science tests' output:\n{output}");
        eprintln!(
            "xtask: the science tests ended after {:.0} s, beside the other tests",
            self.started.elapsed().as_secs_f64()
        );
        if status.success() {
            Ok(())
        } else {
            Err(format!("the science tests failed ({status}); their output is above"))
        }
    }

    /// Stops them (another step failed first).
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
