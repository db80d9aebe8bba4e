//! A trial process as the runner sees it: its pipes, the tail of its stderr,
//! and whether it stays for the slot's next trial (a warm process) or runs one
//! trial and exits (a fresh one).

use std::collections::VecDeque;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::Slot;
use crate::trial_process::{TrialInput, DONE_MARK};

/// Lines of a failed trial's stderr kept with the failure.
const STDERR_LINES: usize = 40;
/// Time between SIGTERM and SIGKILL when a built-in trial is stopped (a command
/// trial's is its spec's `grace_seconds`, and a little more for its process).
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a warm process's stderr may lag behind its stdout at the end of a trial.
const STDERR_LAG: Duration = Duration::from_secs(2);

/// The most bytes of one stderr line kept; the rest of a longer line is left out.
const LINE_BYTES: usize = 16 << 10;
/// The first bytes of a trial's log kept whole.
const LOG_HEAD_BYTES: usize = 256 << 10;
/// The newest bytes of a trial's log kept after its head.
const LOG_TAIL_BYTES: usize = 1 << 20;

/// The stderr lines of the trial running now, and its id for the log.
#[derive(Default)]
struct Tail {
    trial: String,
    lines: VecDeque<String>,
    log: Log,
}

/// A trial's log (its process's stderr, which holds a command trial's program's
/// stdout and stderr), bounded: its head, then its newest lines; what lies
/// between is counted and left out, so a trial that writes without end costs
/// the worker at most `LOG_HEAD_BYTES + LOG_TAIL_BYTES`.
#[derive(Default)]
pub struct Log {
    head: String,
    tail: VecDeque<String>,
    tail_bytes: usize,
    left_out: u64,
    /// Bumped by every line: whether the kept copy is behind.
    pub version: u64,
}

impl Log {
    fn push(&mut self, line: &str) {
        self.version += 1;
        if self.tail.is_empty() && self.head.len() + line.len() < LOG_HEAD_BYTES {
            self.head.push_str(line);
            self.head.push('\n');
            return;
        }
        self.tail_bytes += line.len() + 1;
        self.tail.push_back(format!("{line}\n"));
        while self.tail_bytes > LOG_TAIL_BYTES {
            let dropped = self.tail.pop_front().expect("over the bound: not empty");
            self.tail_bytes -= dropped.len();
            self.left_out += dropped.len() as u64;
        }
    }

    /// The log as kept: its head, a line saying how much was left out, its newest lines.
    pub fn text(&self) -> String {
        let mut text = String::with_capacity(self.head.len() + self.tail_bytes + 64);
        text.push_str(&self.head);
        if self.left_out > 0 {
            text.push_str(&format!("[... {} bytes left out ...]\n", self.left_out));
        }
        text.extend(self.tail.iter().map(String::as_str));
        text
    }
}

/// Reads one line of at most `LINE_BYTES` (the rest of a longer one is skipped);
/// `None` at the end of the stream.
async fn bounded_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut skipped = 0usize;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            if line.is_empty() && skipped == 0 {
                return Ok(None);
            }
            break;
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = LINE_BYTES.saturating_sub(line.len());
        let content = if done { take - 1 } else { take };
        line.extend_from_slice(&buf[..content.min(room)]);
        skipped += content.saturating_sub(room);
        reader.consume(take);
        if done {
            break;
        }
    }
    let mut text = String::from_utf8_lossy(&line).into_owned();
    if skipped > 0 {
        text.push_str(&format!(" [... {skipped} more bytes of this line left out]"));
    }
    Ok(Some(text))
}

pub struct TrialProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    pub stdout: Lines<BufReader<ChildStdout>>,
    tail: Arc<Mutex<Tail>>,
    /// The id of the last trial whose end the process marked on stderr.
    done: watch::Receiver<String>,
    stderr_task: Option<JoinHandle<()>>,
    /// Whether it runs trial after trial (`trial --warm`).
    pub warm: bool,
    /// The device its trials run on, and the GPUs it sees when not the daemon's
    /// (`CUDA_VISIBLE_DEVICES`); a slot's next trial on others gets a new process.
    pub device: String,
    pub visible_devices: Option<String>,
    /// Trials handed to it so far.
    pub trials: u32,
}

impl TrialProcess {
    /// Starts `<exe> trial` (or `trial --warm`) for `slot`'s device; the kernel
    /// kills it if the daemon dies.
    pub fn spawn(exe: &Path, warm: bool, slot: &Slot) -> anyhow::Result<TrialProcess> {
        let mut command = Command::new(exe);
        command.arg("trial");
        if warm {
            command.arg("--warm");
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // A trial of several GPUs sees just those, as CUDA numbers them from 0.
        if let Some(visible) = &slot.visible_devices {
            command.env("CUDA_VISIBLE_DEVICES", visible);
        }
        // A trial process names itself after its daemon in traces.
        if let Ok(service) = std::env::var("OTEL_SERVICE_NAME") {
            command.env("OTEL_SERVICE_NAME", format!("{service}-trial"));
        }
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the
        // trial if the daemon dies, so no trial outlives its daemon.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let tail: Arc<Mutex<Tail>> = Arc::default();
        let (done_tx, done) = watch::channel(String::new());
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr_task = {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr);
                while let Ok(Some(line)) = bounded_line(&mut reader).await {
                    if let Some(id) = line.strip_prefix(DONE_MARK) {
                        let _ = done_tx.send(id.to_string());
                        continue;
                    }
                    let mut t = tail.lock().expect("stderr tail lock");
                    tracing::debug!(trial = %t.trial, "{line}");
                    t.log.push(&line);
                    if t.lines.len() == STDERR_LINES {
                        t.lines.pop_front();
                    }
                    t.lines.push_back(line);
                }
            })
        };
        Ok(TrialProcess {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("stdout is piped")).lines(),
            child,
            tail,
            done,
            stderr_task: Some(stderr_task),
            warm,
            device: slot.device.clone(),
            visible_devices: slot.visible_devices.clone(),
            trials: 0,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process has exited (a warm process may die between trials).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Hands it a trial: one line to a warm process; the whole of stdin, then its end, to a fresh one.
    pub async fn send(&mut self, input: &TrialInput) -> std::io::Result<()> {
        {
            let mut t = self.tail.lock().expect("stderr tail lock");
            t.trial = input.trial_id.clone();
            t.lines.clear();
            t.log = Log::default();
        }
        self.trials += 1;
        let mut text = serde_json::to_vec(input)?;
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin closed"));
        };
        if self.warm {
            text.push(b'\n');
            stdin.write_all(&text).await?;
            stdin.flush().await
        } else {
            let written = stdin.write_all(&text).await;
            self.stdin = None;
            written
        }
    }

    /// Waits until a warm process has marked `trial`'s end on stderr, so its tail is complete.
    pub async fn wait_done_mark(&mut self, trial: &str) {
        let _ = tokio::time::timeout(STDERR_LAG, self.done.wait_for(|id| id == trial)).await;
    }

    /// Waits for the process to exit, and for the rest of its stderr.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(STDERR_LAG, task).await;
        }
        Ok(status)
    }

    /// The current trial's stderr lines, oldest first.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .expect("stderr tail lock")
            .lines
            .iter()
            .cloned()
            .collect()
    }

    /// The current trial's log, when it changed since `version`: its text and new version.
    pub fn log_since(&self, version: u64) -> Option<(String, u64)> {
        let t = self.tail.lock().expect("stderr tail lock");
        (t.log.version != version).then(|| (t.log.text(), t.log.version))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}
