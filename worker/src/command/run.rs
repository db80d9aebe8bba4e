//! A command trial's run: the researcher's program started with its parameters,
//! its newest checkpoint's files put back first, its events (`protocol`) taken as
//! a built-in trial's: metrics and outputs to the trial's sink, the files of
//! `ABLATE_CHECKPOINT_DIR` stored as a checkpoint (each file one `u8` tensor, so
//! checkpoints take the same path, records and fencing as a built-in trial's), a
//! pause at its rung. It runs in a process group of its own, which ends with it.

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use ablate_experiments::trial::{TrialContext, TrialError};
use ablate_schema::{CommandTrial, Limits};
use serde_json::Value;
use tch::Tensor;

use super::protocol::{self, CommandEvent, MAX_LINE_BYTES};

/// The descriptor the program writes its events to.
pub const EVENTS_FD: i32 = 3;
/// The most bytes a checkpoint's files may hold together.
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 30;
/// The most files a checkpoint may hold.
pub const MAX_CHECKPOINT_FILES: usize = 10_000;
/// The sidecar key that lists a command checkpoint's files.
const FILES: &str = "command_files";

/// Where a command trial runs: the program's working directory (relative paths in
/// its command resolve there) and a scratch directory of its own for this attempt.
pub struct Place<'a> {
    pub workdir: &'a Path,
    pub scratch: &'a Path,
    /// `CUDA_VISIBLE_DEVICES` for the program: the GPUs it was granted (`visible_devices`).
    pub visible_devices: &'a str,
}

/// `CUDA_VISIBLE_DEVICES` for a program on a slot of `device` (`cpu`, `cuda:N`): a
/// trial of several GPUs gets its slot's list (`slot_visible`); one GPU, the host's
/// number of the daemon's `cuda:N` (the daemon sees `daemon_visible`, or all).
pub fn visible_devices(device: &str, slot_visible: Option<&str>, daemon_visible: Option<&str>) -> String {
    if let Some(list) = slot_visible {
        return list.to_string();
    }
    let Some(index) = device.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) else {
        // A CPU slot's program sees no GPU, so it takes none from the trials beside it.
        return String::new();
    };
    daemon_visible
        .filter(|v| !v.trim().is_empty())
        .and_then(|list| list.split(',').nth(index))
        .map_or_else(|| index.to_string(), |d| d.trim().to_string())
}

/// A program's end, as the trial sees it.
fn ended(status: std::process::ExitStatus) -> Result<(), TrialError> {
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        (Some(code), _) => Err(TrialError::Program(format!(
            "the program exited with status {code} (its stderr is the trial's)"
        ))),
        (None, Some(signal)) => Err(TrialError::Killed(format!("the program was killed by signal {signal}"))),
        (None, None) => Err(TrialError::Program("the program ended without a status".into())),
    }
}

/// Every file under `dir`, by path relative to it, in name order.
fn files_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path().strip_prefix(dir).expect("under dir").to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The files of the checkpoint directory as a checkpoint: one `u8` tensor per file,
/// named by its path, and the list of paths in the sidecar.
fn save_checkpoint(dir: &Path, step: u64, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
    let bad = |e: std::io::Error| TrialError::Checkpoint(format!("{}: {e}", dir.display()));
    let files = files_under(dir).map_err(bad)?;
    if files.is_empty() {
        return Err(TrialError::Checkpoint(format!(
            "the program announced a checkpoint at step {step}, but ABLATE_CHECKPOINT_DIR holds no file"
        )));
    }
    if files.len() > MAX_CHECKPOINT_FILES {
        return Err(TrialError::Checkpoint(format!(
            "a checkpoint of {} files, over the limit of {MAX_CHECKPOINT_FILES}",
            files.len()
        )));
    }
    let mut total = 0u64;
    let mut tensors = Vec::with_capacity(files.len());
    let mut names = Vec::with_capacity(files.len());
    for file in &files {
        let name = file.to_string_lossy().into_owned();
        let bytes = std::fs::read(dir.join(file)).map_err(bad)?;
        total += bytes.len() as u64;
        if total > MAX_CHECKPOINT_BYTES {
            return Err(TrialError::Checkpoint(format!(
                "a checkpoint over {MAX_CHECKPOINT_BYTES} bytes; keep less in ABLATE_CHECKPOINT_DIR"
            )));
        }
        tensors.push((format!("file:{name}"), Tensor::from_slice(&bytes)));
        names.push(Value::String(name));
    }
    ctx.checkpoints
        .save(step, &tensors, &serde_json::json!({ "step": step, FILES: names }))
}

/// Puts the newest checkpoint's files back into `dir`; returns its step.
fn restore_checkpoint(dir: &Path, ctx: &mut TrialContext<'_>) -> Result<Option<u64>, TrialError> {
    let Some(snapshot) = ctx.checkpoints.latest()? else {
        return Ok(None);
    };
    let names = snapshot.sidecar[FILES].as_array().ok_or_else(|| {
        TrialError::Checkpoint("the trial's checkpoint is not a command trial's (it lists no files)".into())
    })?;
    for name in names {
        let name = name.as_str().unwrap_or_default();
        let relative = Path::new(name);
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(TrialError::Checkpoint(format!(
                "the checkpoint names a file outside its folder: {name}"
            )));
        }
        let tensor = snapshot
            .tensors
            .get(&format!("file:{name}"))
            .ok_or_else(|| TrialError::Checkpoint(format!("the checkpoint lacks the file {name}")))?;
        let bytes = Vec::<u8>::try_from(tensor.to_device(tch::Device::Cpu).view([-1]))?;
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| TrialError::Checkpoint(e.to_string()))?;
        }
        std::fs::write(&path, bytes).map_err(|e| TrialError::Checkpoint(format!("{}: {e}", path.display())))?;
    }
    Ok(Some(snapshot.step))
}

/// What the run hears from the program: an event line (or why it is unreadable), or its end.
enum Heard {
    Line(Result<String, String>),
    Exited(std::io::Result<std::process::ExitStatus>),
}

/// Reads one line of at most `max` bytes; `Ok(None)` at the end of the stream.
fn bounded_line(reader: &mut impl BufRead, max: usize) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    loop {
        let buf = reader
            .fill_buf()
            .map_err(|e| format!("reading the program's events: {e}"))?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if line.len() > max + 1 {
            return Err(format!("an event line over the limit of {max} bytes"));
        }
        if done {
            line.pop();
            return Ok(Some(line));
        }
    }
}

/// Set by SIGTERM while a program runs: the worker stops the trial (cancel, prune,
/// lost lease, its own shutdown).
static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

/// How a stop reaches the program: its stop file (which it may poll), SIGTERM to its
/// group, then SIGKILL once its grace period is over.
struct Stopping {
    since: Option<std::time::Instant>,
    grace: std::time::Duration,
    stop_file: PathBuf,
}

impl Stopping {
    /// Passes a SIGTERM this process got on to the program; kills it after the grace period.
    fn check(&mut self, pgid: i32) {
        if !TERMINATED.load(Ordering::SeqCst) {
            return;
        }
        match self.since {
            None => {
                let _ = std::fs::write(&self.stop_file, "stop\n");
                signal_group(pgid, libc::SIGTERM);
                self.since = Some(std::time::Instant::now());
            }
            Some(since) if since.elapsed() > self.grace => signal_group(pgid, libc::SIGKILL),
            Some(_) => {}
        }
    }
}

/// Sends `signal` to the program's whole process group.
fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) on a process group this process made; no memory is touched.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Runs the program of `trial` for a trial with `params`; its events go to `ctx`.
pub fn run(
    trial: &CommandTrial,
    params: &Value,
    place: &Place<'_>,
    ctx: &mut TrialContext<'_>,
    limits: &Limits,
) -> Result<(), TrialError> {
    let io = |what: &str, e: std::io::Error| TrialError::Program(format!("{what}: {e}"));
    let checkpoint_dir = place.scratch.join("checkpoint");
    std::fs::create_dir_all(&checkpoint_dir).map_err(|e| io("the trial's scratch directory", e))?;
    let resumed = restore_checkpoint(&checkpoint_dir, ctx)?;
    let stop_file = place.scratch.join("stop");
    let ack_file = place.scratch.join("checkpoint-stored");
    let _ = std::fs::remove_file(&stop_file);
    let _ = std::fs::remove_file(&ack_file);
    let params_file = place.scratch.join("params.json");
    std::fs::write(&params_file, params.to_string()).map_err(|e| io("params.json", e))?;
    let empty = serde_json::Map::new();
    let argv = trial
        .argv(params.as_object().unwrap_or(&empty))
        .map_err(TrialError::Program)?;

    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors it creates; both close on exec.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io("a pipe for the program's events", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just made these descriptors; each is owned once.
    let (events_read, events_write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = fds[1];
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .current_dir(place.workdir)
        .envs(&trial.env)
        .env("ABLATE_PARAMS", params.to_string())
        .env("ABLATE_PARAMS_FILE", &params_file)
        .env("ABLATE_CHECKPOINT_DIR", &checkpoint_dir)
        .env("ABLATE_EVENTS_FD", EVENTS_FD.to_string())
        // For the program's own children, which may not inherit descriptor 3
        // (`torchrun`'s workers): the same pipe by path, open while the program runs.
        .env(
            "ABLATE_EVENTS_PATH",
            format!("/proc/{}/fd/{write_fd}", std::process::id()),
        )
        .env("CUDA_VISIBLE_DEVICES", place.visible_devices)
        .env("ABLATE_STOP_FILE", &stop_file)
        .env("ABLATE_CHECKPOINT_ACK", &ack_file)
        .stdin(Stdio::null())
        // Its stdout and stderr are the trial's stderr (kept as for a built-in trial).
        .stdout(std::io::stderr())
        .stderr(std::io::stderr());
    if let Some(step) = resumed {
        command.env("ABLATE_RESUME_STEP", step.to_string());
    }
    if let Some(step) = ctx.pause_at {
        command.env("ABLATE_PAUSE_AT", step.to_string());
    }
    // SAFETY: between fork and exec only async-signal-safe calls: a process group of
    // its own, death with this process, the events pipe as descriptor 3.
    unsafe {
        command.pre_exec(move || {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::dup2(write_fd, EVENTS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| {
        TrialError::Program(format!(
            "cannot start `{}` (in {}): {e}",
            argv[0],
            place.workdir.display()
        ))
    })?;
    // The write end stays open here while the program runs (its children reach the
    // pipe through ABLATE_EVENTS_PATH); it closes once the program has ended.
    let mut events_write = Some(events_write);
    let pgid = child.id() as i32;
    // A SIGTERM from here on reaches the program as its stop (`Stopping`).
    TERMINATED.store(false, Ordering::SeqCst);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
    }
    let mut stopping = Stopping {
        since: None,
        grace: trial.grace(),
        stop_file: stop_file.clone(),
    };

    // A thread reads the pipe (a child the program left behind may hold it open);
    // this one takes the events and watches the program.
    let (lines, events) = std::sync::mpsc::sync_channel::<Heard>(256);
    let waiter = lines.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(std::fs::File::from(events_read));
        loop {
            let line = match bounded_line(&mut reader, MAX_LINE_BYTES) {
                Ok(Some(line)) => String::from_utf8(line).map_err(|_| "an event line is not UTF-8".to_string()),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let stop = line.is_err();
            if lines.send(Heard::Line(line)).is_err() || stop {
                return;
            }
        }
    });
    // A thread waits for the program, so its end is heard at once.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = waiter.send(Heard::Exited(child.wait()));
    });
    let mut taker = Taker {
        checkpoint_dir: &checkpoint_dir,
        ack_file: &ack_file,
        last_checkpoint: None,
        limits,
    };
    let mut exited: Option<(std::io::Result<std::process::ExitStatus>, std::time::Instant)> = None;
    // Whether the events taken so far are handed on.
    let mut flushed = true;
    let taken: Result<(), TrialError> = loop {
        stopping.check(pgid);
        match events.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(Heard::Line(Ok(line))) => {
                flushed = false;
                if let Err(e) = taker.take(&line, ctx) {
                    break Err(e);
                }
            }
            Ok(Heard::Line(Err(e))) => break Err(TrialError::Program(e)),
            Ok(Heard::Exited(status)) => {
                // What it left behind ends with it, and the pipe closes.
                signal_group(pgid, libc::SIGKILL);
                drop(events_write.take());
                exited = Some((status, std::time::Instant::now()));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => match &exited {
                None if !flushed => {
                    // Quiet for a moment: what it logged goes on now.
                    ctx.metrics.flush();
                    flushed = true;
                }
                // A process out of its group still holds the pipe: its events are not the trial's.
                Some((_, since)) if since.elapsed() > std::time::Duration::from_secs(5) => break Ok(()),
                _ => {}
            },
        }
    };
    if taken.is_err() {
        signal_group(pgid, libc::SIGKILL);
    }
    drop(events_write);
    // The program's end, heard after what is left of its events.
    let status = match exited {
        Some((status, _)) => status,
        None => loop {
            match events.recv() {
                Ok(Heard::Exited(status)) => break status,
                Ok(Heard::Line(_)) => {}
                Err(_) => break Err(std::io::Error::other("the program's waiter ended without its status")),
            }
        },
    }
    .map_err(|e| io("waiting for the program", e))?;
    // Whatever it started ends with it.
    signal_group(pgid, libc::SIGKILL);
    // SAFETY: restoring the default action; a stop this process got ends it now,
    // as it would have without the program.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        if TERMINATED.load(Ordering::SeqCst) {
            libc::raise(libc::SIGTERM);
        }
    }
    taken?;
    ended(status)?;
    if let (Some(rung), None) = (ctx.pause_at, ctx.paused) {
        return Err(TrialError::Program(format!(
            "the program was to stop at its rung, step {rung} (ABLATE_PAUSE_AT), with a checkpoint there, and \
             ended without saying {{\"paused\": {rung}}}"
        )));
    }
    Ok(())
}

/// What the events of one run have told so far.
struct Taker<'a> {
    checkpoint_dir: &'a Path,
    /// Where the step of the newest checkpoint stored is written (`ABLATE_CHECKPOINT_ACK`).
    ack_file: &'a Path,
    last_checkpoint: Option<u64>,
    limits: &'a Limits,
}

impl Taker<'_> {
    /// Takes one event line into the trial.
    fn take(&mut self, line: &str, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
        if line.trim().is_empty() {
            return Ok(());
        }
        match protocol::parse(line, self.limits).map_err(TrialError::Program)? {
            CommandEvent::Metrics { step, values } => {
                for (name, value) in values {
                    ctx.metrics.log(&name, step as u64, value);
                }
            }
            CommandEvent::Checkpoint(step) => {
                save_checkpoint(self.checkpoint_dir, step, ctx)?;
                self.last_checkpoint = Some(step);
                // The program may change its checkpoint's files once this says the step.
                let staged = self.ack_file.with_extension("new");
                std::fs::write(&staged, format!("{step}\n"))
                    .and_then(|()| std::fs::rename(&staged, self.ack_file))
                    .map_err(|e| TrialError::Checkpoint(format!("{}: {e}", self.ack_file.display())))?;
            }
            CommandEvent::Outputs(outputs) => {
                for (name, value) in outputs {
                    ctx.metrics.output(&name, value);
                }
            }
            CommandEvent::Paused(step) => {
                if ctx.pause_at != Some(step) {
                    return Err(TrialError::Program(format!(
                        "the program paused at step {step}, but its rung is {}",
                        ctx.pause_at
                            .map_or("none (it runs to its end)".to_string(), |s| format!("step {s}"))
                    )));
                }
                if self.last_checkpoint != Some(step) {
                    return Err(TrialError::Program(format!(
                        "the program paused at step {step} without a checkpoint there (write one, then {{\"checkpoint\": {step}}})"
                    )));
                }
                ctx.paused = Some(step);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::visible_devices;

    #[test]
    fn a_program_sees_the_gpus_it_was_granted_and_none_on_a_cpu_slot() {
        assert_eq!(visible_devices("cpu", None, Some("0,1")), "");
        assert_eq!(visible_devices("cuda:1", None, None), "1");
        // The daemon sees 2 and 3: its cuda:1 is the host's 3.
        assert_eq!(visible_devices("cuda:1", None, Some("2,3")), "3");
        assert_eq!(visible_devices("cuda:0", None, Some("2,3")), "2");
        // A trial of several GPUs: its slot's list.
        assert_eq!(visible_devices("cuda:0", Some("4,5"), Some("4,5,6,7")), "4,5");
    }
}
