//! Command trials run by the worker: the shell trainer of examples/ as a local sweep,
//! a pause at its rung and a resume from the checkpoint equal to an unbroken run, and
//! programs that break the protocol, each failed with what was wrong and nothing left.

use std::path::{Path, PathBuf};

use ablate_experiments::report::{Report, TrialOutcome};
use ablate_experiments::trial::{DirData, MemoryCheckpoints, MemoryMetrics, TrialContext, TrialError};
use ablate_schema::{CommandTrial, Limits, SpecFormat};
use ablate_worker::backend::Slot;
use ablate_worker::command::run::{run, Place};
use serde_json::{json, Value};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shell-trainer")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ablate-command-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a command once with `checkpoints` (a resume when it holds one), stopping at `pause_at`.
fn run_once(
    trial: &CommandTrial,
    params: &Value,
    workdir: &Path,
    checkpoints: &mut MemoryCheckpoints,
    pause_at: Option<u64>,
) -> (Result<(), TrialError>, MemoryMetrics, Option<u64>) {
    let scratch = scratch(&format!("run-{}", checkpoints.saved.len()));
    let mut metrics = MemoryMetrics::default();
    let mut data = DirData {
        root: scratch.join("store"),
        experiment: "command".into(),
    };
    let mut ctx = TrialContext {
        device: tch::Device::Cpu,
        checkpoints,
        metrics: &mut metrics,
        data: &mut data,
        pause_at,
        paused: None,
    };
    let place = Place {
        workdir,
        scratch: &scratch,
        visible_devices: "",
    };
    let result = run(trial, params, &place, &mut ctx, &Limits::default());
    let paused = ctx.paused;
    (result, metrics, paused)
}

fn shell_trainer() -> CommandTrial {
    CommandTrial {
        command: ["sh", "train.sh", "{lr}", "{steps}"].map(String::from).to_vec(),
        ..Default::default()
    }
}

/// Runs an example's `sweep.toml` as `ablate-worker sweep` does, from its folder, on `slots` CPU slots.
fn sweep_example(name: &str, slots: usize) -> (Report, Vec<TrialOutcome>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name);
    let text = std::fs::read_to_string(dir.join("sweep.toml")).unwrap();
    let slots: Vec<Slot> = (0..slots)
        .map(|i| Slot::new(format!("cpu:{i}"), "cpu".into(), 1))
        .collect();
    let options = ablate_worker::local::Options {
        workdir: Some(dir),
        every_series: true,
        ..Default::default()
    };
    ablate_worker::local::run(&text, SpecFormat::Toml, &slots, &options).unwrap()
}

/// The trial whose final eval_loss is lowest.
fn best(outcomes: &[TrialOutcome]) -> &TrialOutcome {
    outcomes
        .iter()
        .min_by(|a, b| {
            a.metric("eval_loss")
                .unwrap()
                .total_cmp(&b.metric("eval_loss").unwrap())
        })
        .unwrap()
}

#[test]
fn the_shell_trainer_sweeps_as_a_local_sweep_and_its_best_lr_wins() {
    let (report, outcomes) = sweep_example("shell-trainer", 1);
    assert_eq!(outcomes.len(), 4);
    for t in &outcomes {
        assert_eq!(t.state, "succeeded", "{t:?}");
        assert_eq!(t.series["eval_loss"].len(), 40, "a point per step");
        assert!(t.outputs.contains_key("final_train_loss"), "{:?}", t.outputs);
    }
    // loss' = loss (1 - lr) + lr^2 / 10 from 1, 40 steps: lr 0.1 ends lowest of 0.01, 0.05, 0.1, 0.3.
    assert_eq!(best(&outcomes).params["lr"], json!(0.1));
    assert_eq!(report.family, "train");
}

#[test]
fn a_paused_trial_resumes_from_its_checkpoint_on_the_unbroken_curve() {
    let trial = shell_trainer();
    let params = json!({"lr": 0.1, "steps": 40});
    let mut whole = MemoryCheckpoints::default();
    let (result, unbroken, _) = run_once(&trial, &params, &example(), &mut whole, None);
    result.unwrap();
    assert_eq!(whole.saved.len(), 4, "a checkpoint every 10 steps");

    let mut checkpoints = MemoryCheckpoints::default();
    let (result, first, paused) = run_once(&trial, &params, &example(), &mut checkpoints, Some(15));
    result.unwrap();
    assert_eq!(paused, Some(15));
    assert_eq!(checkpoints.saved.last().unwrap().step, 15);
    checkpoints.resume_at = Some(15);
    let (result, second, _) = run_once(&trial, &params, &example(), &mut checkpoints, None);
    result.unwrap();
    let curve = |m: &MemoryMetrics| -> Vec<(u64, f64)> {
        m.points
            .iter()
            .filter(|p| p.0 == "eval_loss")
            .map(|p| (p.1, p.2))
            .collect()
    };
    let mut broken = curve(&first);
    assert_eq!(broken.last().unwrap().0, 15);
    assert_eq!(curve(&second).first().unwrap().0, 16, "it resumed after step 15");
    broken.extend(curve(&second));
    assert_eq!(broken, curve(&unbroken), "the resumed curve is the unbroken one");
}

/// A program in a file of its own (sh), and what its run ends with.
fn bad(name: &str, script: &str) -> Result<(), TrialError> {
    let dir = scratch(name);
    std::fs::write(dir.join("p.sh"), script).unwrap();
    let trial = CommandTrial {
        command: vec!["sh".into(), "p.sh".into()],
        ..Default::default()
    };
    run_once(&trial, &json!({}), &dir, &mut MemoryCheckpoints::default(), None).0
}

/// Whether a process whose command line holds `marker` is still there after 3 s.
fn alive(marker: &str) -> bool {
    let running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
            std::fs::read(p.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(marker))
                .unwrap_or(false)
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while running() {
        if std::time::Instant::now() > deadline {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[test]
fn programs_that_break_the_protocol_fail_with_what_was_wrong_and_leave_nothing() {
    let cases = [
        ("json", "echo 'not json' >&3\nsleep 1031", "is not JSON"),
        ("unknown", "echo '{\"loss\": 1}' >&3", "unknown event"),
        ("empty-checkpoint", "echo '{\"checkpoint\": 5}' >&3", "holds no file"),
        (
            "nul",
            "printf '{\"step\": 1, \"metrics\": {\"a\\\\u0000b\": 1}}\\n' >&3",
            "U+0000",
        ),
        (
            "bad-value",
            "echo '{\"step\": 1, \"metrics\": {\"loss\": \"high\"}}' >&3",
            "is not a number",
        ),
        ("exit", "exit 3", "exited with status 3"),
        ("signal", "kill -9 $$", "killed by signal 9"),
        ("pause-unasked", "echo '{\"paused\": 3}' >&3", "its rung is none"),
    ];
    for (name, script, expected) in cases {
        let error = bad(name, script).unwrap_err().to_string();
        assert!(error.contains(expected), "{name}: {error}");
    }
    let missing = CommandTrial {
        command: vec!["ablate-no-such-program".into()],
        ..Default::default()
    };
    let error = run_once(
        &missing,
        &json!({}),
        &scratch("missing"),
        &mut MemoryCheckpoints::default(),
        None,
    )
    .0
    .unwrap_err()
    .to_string();
    assert!(error.contains("cannot start `ablate-no-such-program`"), "{error}");
    // A child that outlives the program ends with it; so does the program a bad line stops.
    bad(
        "orphan",
        "sleep 1007 &\necho '{\"step\": 1, \"metrics\": {\"loss\": 1}}' >&3",
    )
    .unwrap();
    assert!(!alive("sleep 1007"), "the program's child outlived the trial");
    assert!(
        !alive("sleep 1031"),
        "the program that broke the protocol outlived the trial"
    );
}

#[test]
fn a_python_trainer_on_the_ablate_package_sweeps_and_its_events_read_back() {
    let (_, outcomes) = sweep_example("python-trainer", 2);
    assert_eq!(outcomes.len(), 6);
    for t in &outcomes {
        assert_eq!(t.state, "succeeded", "{t:?}");
        assert_eq!(
            t.series["eval_loss"].len(),
            200,
            "a point per step, every one delivered"
        );
        assert_eq!(t.outputs["weights"].as_array().map(Vec::len), Some(8));
    }
    let best = best(&outcomes);
    assert_eq!(best.params["lr"], json!(0.03), "{best:?}");
}

/// Runs `ablate-worker trial` (the daemon's trial process) on `input`; its events and exit status.
fn trial_process(input: &Value) -> (Vec<ablate_worker::trial_process::Event>, std::process::Output) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ablate-worker"))
        .arg("trial")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (events, out)
}

#[test]
fn the_trial_process_runs_a_command_trial_resumes_it_and_crashes_with_its_program() {
    use ablate_worker::trial_process::Event;
    use std::os::unix::process::ExitStatusExt;
    let dir = scratch("trial-process");
    let input = |params: Value, resume_from: Option<String>| {
        json!({
            "trial_id": "0190f3d2-8c4e-7d1a-9b1e-5f0c2a9d4e11",
            "experiment_id": "0190f3d2-8c4e-7d1a-9b1e-5f0c2a9d4e12",
            "family": "train",
            "params": params,
            "device": "cpu",
            "threads": 1,
            "object_store": dir.join("objects").to_string_lossy(),
            "resume_from": resume_from,
            "spec_hash": "test",
            "scratch_dir": dir.join("scratch").to_string_lossy(),
            "command": {"command": ["sh", "train.sh", "{lr}", "{steps}"]},
            "workdir": example(),
        })
    };
    let (events, out) = trial_process(&input(json!({"lr": 0.1, "steps": 25}), None));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let points = |events: &[Event]| -> Vec<i64> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::M(name, step, _) if name == "eval_loss" => Some(*step),
                _ => None,
            })
            .collect()
    };
    assert_eq!(points(&events), (1..=25).collect::<Vec<_>>());
    let written: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Checkpoint(w) => Some(w.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(written.iter().map(|w| w.step).collect::<Vec<_>>(), [10, 20]);
    // Resumed from the checkpoint of step 20, as the daemon hands it: steps 21 to 25 again.
    let (events, out) = trial_process(&input(json!({"lr": 0.1, "steps": 25}), Some(written[1].path.clone())));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(points(&events), (21..=25).collect::<Vec<_>>());
    // A program killed by a signal crashes the trial process (the daemon's crash: a retry).
    let mut killed = input(json!({}), None);
    killed["command"] = json!({"command": ["sh", "-c", "kill -9 $$"]});
    let (_, out) = trial_process(&killed);
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stderr).contains("killed by signal 9"));
}
