//! The trial process: its trial's input as JSON on stdin, its metrics and
//! events as JSON lines on stdout, its logs on stderr.
//!
//! Cold (`ablate-worker trial`): one trial, its input up to the end of stdin;
//! it exits 0, or 1 after an `error: ` line on stderr.
//! Warm (`ablate-worker trial --warm`): one input per line, run one after
//! another in this process (libtorch loaded once, data sets read once); each
//! trial ends with a [`Event::Done`] event on stdout and a [`DONE_MARK`] line
//! on stderr, after which its stderr is complete. It exits at the end of stdin.

use std::io::{BufWriter, Read, Write};
use std::time::{Duration, Instant};

use ablate_experiments::trial::{MetricSink, TrialContext};
use ablate_experiments::Family;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::storage::{self, ObjectCheckpoints};

/// What the daemon hands a trial process on stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialInput {
    pub trial_id: String,
    pub experiment_id: String,
    pub family: String,
    pub params: Value,
    pub device: String,
    pub threads: usize,
    pub object_store: String,
    pub resume_from: Option<String>,
    pub spec_hash: String,
    pub scratch_dir: String,
    /// Where the trial may read local data; empty for the default roots.
    #[serde(default)]
    pub data_roots: Vec<std::path::PathBuf>,
    /// The daemon's span for this trial (W3C `traceparent`), when traces are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The rung to stop at (ASHA, Hyperband), checkpointed there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_at: Option<u64>,
    /// A fused group's members, trained as one model (this input's own trial
    /// fields name the group); empty: this input is one trial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fused: Vec<TrialInput>,
    /// A command trial: the program it runs (`[trial]`), instead of the family's model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<ablate_schema::CommandTrial>,
    /// Where a command trial's program runs; by default its code's (`code`), else
    /// the command's `workdir`, else its scratch directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<std::path::PathBuf>,
    /// A command trial's `CUDA_VISIBLE_DEVICES`: the GPUs its slot was granted
    /// (`command::run::visible_devices`); empty on a CPU slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visible_devices: Option<String>,
    /// A command trial's packed code: the hash that names it in the object store
    /// (`ablate_schema::objects::code_path`); unpacked once per worker into a cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// One line a trial process writes on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A metric point: (name, step, value).
    M(String, i64, f64),
    /// A checkpoint that is durable in object storage.
    Checkpoint(storage::Written),
    /// A named result kept with the trial: (name, value).
    Output(String, Value),
    /// The trial stopped at its rung, checkpointed at this step (comes before its end).
    Paused(u64),
    /// Warm processes: the trial ended, with its error if it failed.
    Done(Option<String>),
    /// One member's event in a fused group (its position in `fused`); each member
    /// ends with its own `Done`, before the group's.
    Member(usize, Box<Event>),
}

/// The stderr line a warm process writes after each trial, followed by the trial's id.
pub const DONE_MARK: &str = "ablate-trial-done ";

/// Writes events to stdout, flushing at least every 100 ms.
struct StdoutEvents {
    out: BufWriter<std::io::Stdout>,
    last_flush: Instant,
}

impl StdoutEvents {
    fn emit(&mut self, event: &Event) {
        serde_json::to_writer(&mut self.out, event).expect("events serialize");
        self.out.write_all(b"\n").expect("stdout closed: the daemon is gone");
        if self.last_flush.elapsed() > Duration::from_millis(100) {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.out.flush().expect("stdout closed: the daemon is gone");
        self.last_flush = Instant::now();
    }
}

/// A trial's events on stdout; a fused member's wrapped with its position.
struct Sink<'a>(&'a std::cell::RefCell<StdoutEvents>, Option<usize>);

impl Sink<'_> {
    fn emit(&self, event: Event) {
        self.0.borrow_mut().emit(&wrap(self.1, event));
    }
}

/// `event` as member `member`'s, when it is one.
fn wrap(member: Option<usize>, event: Event) -> Event {
    match member {
        Some(i) => Event::Member(i, Box::new(event)),
        None => event,
    }
}

impl MetricSink for Sink<'_> {
    fn log(&mut self, name: &str, step: u64, value: f64) {
        self.emit(Event::M(name.to_string(), step as i64, value));
    }
    fn output(&mut self, name: &str, value: Value) {
        self.emit(Event::Output(name.to_string(), value));
    }
    fn flush(&mut self) {
        self.0.borrow_mut().flush();
    }
}

pub fn run() -> anyhow::Result<()> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let input: TrialInput = serde_json::from_str(&text)?;
    let events = stdout_events();
    let result = run_one(&input, &events);
    events.borrow_mut().flush();
    result
}

/// Runs every trial of stdin, one input per line, until stdin ends.
pub fn run_warm() -> anyhow::Result<()> {
    let events = stdout_events();
    for line in std::io::stdin().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let input: TrialInput = serde_json::from_str(&line)?;
        let result = run_one(&input, &events);
        let error = result.err().map(|e| format!("{e:#}"));
        if let Some(error) = &error {
            eprintln!("error: {error}");
        }
        let mut e = events.borrow_mut();
        e.emit(&Event::Done(error));
        e.flush();
        eprintln!("{DONE_MARK}{}", input.trial_id);
    }
    Ok(())
}

type Events = std::rc::Rc<std::cell::RefCell<StdoutEvents>>;

fn stdout_events() -> Events {
    std::rc::Rc::new(std::cell::RefCell::new(StdoutEvents {
        out: BufWriter::with_capacity(1 << 16, std::io::stdout()),
        last_flush: Instant::now(),
    }))
}

/// Runs one trial in a span that continues the daemon's, then exports the
/// trial's spans (a warm process may wait long for its next trial).
fn run_one(input: &TrialInput, events: &Events) -> anyhow::Result<()> {
    let span = tracing::info_span!("train",
        experiment_id = %input.experiment_id,
        trial_id = %input.trial_id,
        family = %input.family,
        device = %input.device);
    if let Some(parent) = &input.traceparent {
        ablate_schema::trace::set_parent(&span, parent);
    }
    let result = span.in_scope(|| {
        // The first line of every trial's log: what it is and where it runs.
        tracing::info!(params = %input.params, resume_from = ?input.resume_from, "trial starting");
        train(input, events)
    });
    drop(span);
    ablate_schema::trace::flush();
    result
}

fn train(input: &TrialInput, events: &Events) -> anyhow::Result<()> {
    let family = Family::parse(&input.family).map_err(|e| anyhow::anyhow!(e))?;
    tch::set_num_threads(input.threads as i32);
    let device = crate::backend::device(&input.device)?;
    if let tch::Device::Cuda(index) = device {
        let visible = tch::Cuda::device_count();
        if index as i64 >= visible {
            anyhow::bail!(
                "this trial was given {} but this host's libtorch sees {visible} CUDA device(s); \
                 check the worker's --devices and that libtorch_cuda loads (see the daemon's backend log line)",
                input.device
            );
        }
    }
    std::fs::create_dir_all(&input.scratch_dir)?;
    let roots = if input.data_roots.is_empty() {
        ablate_experiments::nn::locations::default_roots()
    } else {
        input.data_roots.clone()
    };
    if !input.fused.is_empty() {
        return train_fused(input, family, device, &roots, events);
    }
    let mut host = Host::open(input, None, events)?;
    // A command trial's packed code, unpacked once per worker.
    let code = match &input.code {
        Some(hash) => Some(host.code(hash, &input.scratch_dir).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let mut sink = Sink(events, None);
    let mut ctx = host.context(device, &mut sink);
    // Again on the host that reads the data, following links this time.
    ablate_experiments::nn::locations::confine_params(&input.params, &roots, true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let result = match &input.command {
        Some(command) => {
            // The trial's own folder (its checkpoint's files, its parameters), fresh for
            // each attempt and removed after it: slots run trials side by side.
            let scratch = std::path::Path::new(&input.scratch_dir)
                .join("command")
                .join(&input.trial_id);
            let _ = std::fs::remove_dir_all(&scratch);
            let workdir = code
                .as_deref()
                .or(input.workdir.as_deref())
                .or(command.workdir.as_deref())
                .unwrap_or(std::path::Path::new(&input.scratch_dir));
            let place = crate::command::run::Place {
                workdir,
                scratch: &scratch,
                visible_devices: input.visible_devices.as_deref().unwrap_or_default(),
            };
            let result = crate::command::run::run(command, &input.params, &place, &mut ctx, &Default::default());
            let _ = std::fs::remove_dir_all(&scratch);
            if let Err(ablate_experiments::trial::TrialError::Killed(why)) = &result {
                // A program killed by a signal is a crash: so is this process, and the
                // daemon retries the trial from its newest checkpoint.
                events.borrow_mut().flush();
                eprintln!("error: {why}");
                std::process::abort();
            }
            result
        }
        None => family.run(&input.params, &mut ctx),
    };
    if let (Ok(()), Some(step)) = (&result, ctx.paused) {
        events.borrow_mut().emit(&Event::Paused(step));
    }
    events.borrow_mut().flush();
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

/// A fused group: every member's own checkpoints, data and events, one model.
/// Each member's end is its own `Done` event (a member that fails is reported
/// on stderr too); the group itself fails only when it can't start.
fn train_fused(
    input: &TrialInput,
    family: Family,
    device: tch::Device,
    roots: &[std::path::PathBuf],
    events: &Events,
) -> anyhow::Result<()> {
    let mut hosts = Vec::new();
    let mut runs = Vec::new();
    for (i, member) in input.fused.iter().enumerate() {
        // A member whose data lies outside the roots fails alone.
        if let Err(e) = ablate_experiments::nn::locations::confine_params(&member.params, roots, true) {
            end_member(events, i, &member.trial_id, Some(e.to_string()));
            continue;
        }
        hosts.push(Host::open(member, Some(i), events)?);
        runs.push(i);
    }
    let mut sinks: Vec<Sink<'_>> = runs.iter().map(|&i| Sink(events, Some(i))).collect();
    let mut ctxs: Vec<TrialContext<'_>> = hosts
        .iter_mut()
        .zip(sinks.iter_mut())
        .map(|(host, sink)| host.context(device, sink))
        .collect();
    let params: Vec<Value> = runs.iter().map(|&i| input.fused[i].params.clone()).collect();
    tracing::info!(members = runs.len(), "fused group starting");
    let results = family.run_fused(&params, &mut ctxs);
    let paused: Vec<Option<u64>> = ctxs.iter().map(|c| c.paused).collect();
    drop(ctxs);
    for ((&i, result), paused) in runs.iter().zip(results).zip(paused) {
        if let (Ok(()), Some(step)) = (&result, paused) {
            events.borrow_mut().emit(&wrap(Some(i), Event::Paused(step)));
        }
        end_member(events, i, &input.fused[i].trial_id, result.err().map(|e| e.to_string()));
    }
    events.borrow_mut().flush();
    Ok(())
}

/// Ends member `i` of a fused group: its `Done` event, and its error on stderr.
fn end_member(events: &Events, i: usize, trial: &str, error: Option<String>) {
    if let Some(error) = &error {
        eprintln!("error: trial {trial}: {error}");
    }
    let mut e = events.borrow_mut();
    e.emit(&Event::Member(i, Box::new(Event::Done(error))));
    e.flush();
}

/// What a trial's context borrows from its host: its checkpoint store and its data store.
struct Host {
    checkpoints: ObjectCheckpoints,
    data: storage::ObjectData,
    pause_at: Option<u64>,
}

impl Host {
    /// Opens `input`'s stores; its checkpoints are announced as member `member`'s when it is one.
    fn open(input: &TrialInput, member: Option<usize>, events: &Events) -> anyhow::Result<Host> {
        let (store, prefix) = storage::open(&input.object_store)?;
        let on_written = {
            let events = events.clone();
            Box::new(move |w: storage::Written| {
                let mut e = events.borrow_mut();
                e.emit(&wrap(member, Event::Checkpoint(w)));
                e.flush();
            })
        };
        Ok(Host {
            data: storage::ObjectData {
                store: store.clone(),
                prefix: prefix.clone(),
                experiment: input.experiment_id.clone(),
                runtime: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
            },
            checkpoints: ObjectCheckpoints {
                store,
                prefix,
                experiment: input.experiment_id.clone(),
                trial: input.trial_id.clone(),
                spec_hash: input.spec_hash.clone(),
                resume_from: input.resume_from.clone(),
                runtime: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
                scratch: input.scratch_dir.clone().into(),
                on_written,
            },
            pause_at: input.pause_at,
        })
    }

    /// The directory holding the packed code named `hash`: `<scratch>/code/<hash>`,
    /// fetched from the object store and unpacked the first time a trial needs it.
    fn code(&self, hash: &str, scratch: &str) -> Result<std::path::PathBuf, String> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{hash}` does not name packed code (a SHA-256 in hex)"));
        }
        let dir = std::path::Path::new(scratch).join("code").join(hash);
        if dir.is_dir() {
            return Ok(dir);
        }
        let path = ablate_schema::objects::code_path(&self.data.prefix, hash);
        let archive = self
            .data
            .runtime
            .block_on(async { self.data.store.get(&path).await?.bytes().await })
            .map_err(|e| format!("cannot fetch the trial's code {path} from the object store: {e}"))?;
        ablate_schema::code::unpack(&archive, hash, &dir)?;
        tracing::info!(%hash, dir = %dir.display(), "unpacked the trial's code");
        Ok(dir)
    }

    fn context<'a>(&'a mut self, device: tch::Device, sink: &'a mut Sink<'_>) -> TrialContext<'a> {
        TrialContext {
            device,
            checkpoints: &mut self.checkpoints,
            metrics: sink,
            data: &mut self.data,
            pause_at: self.pause_at,
            paused: None,
        }
    }
}
