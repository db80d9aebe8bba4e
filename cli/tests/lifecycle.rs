//! Sweeps that live on, on a real stack (`ablate serve`, worker daemons, PostgreSQL,
//! the object store in a folder): failed trials retried once their cause is fixed,
//! an experiment extended with new points, a re-submitted sweep that reuses what ran
//! before, tags and notes, deletion beside another user's running sweep, checkpoint
//! retention on a 100-trial sweep with `ablate gc` while a trial is SIGKILLed.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use harness::{assert_same_curves, bin, pids_of, spec_path, stderr, text, Stack};

/// A trainer in shell: its loss falls, then rises again after step `turn`, so its
/// best checkpoint is not its last; its state (step, loss) lives in its checkpoint,
/// so a resumed run continues the same curve. It fails at once while the file
/// `$FAIL_DIR/fail-<seed>` exists. Usage: train.sh SEED STEPS TURN DELAY
const TRAINER: &str = r#"set -eu
seed=$1; steps=$2; turn=$3; delay=$4
if [ -e "$FAIL_DIR/fail-$seed" ]; then echo "seed $seed: the data is missing" >&2; exit 1; fi
step=0
loss=$(awk -v s="$seed" 'BEGIN { printf "%.12g", 1 + s / 1000 }')
if [ -n "${ABLATE_RESUME_STEP:-}" ]; then read -r step loss < "$ABLATE_CHECKPOINT_DIR/state"; fi
while [ "$step" -lt "$steps" ]; do
    step=$((step + 1))
    if [ "$step" -le "$turn" ]; then f=0.9; else f=1.05; fi
    loss=$(awk -v l="$loss" -v f="$f" 'BEGIN { printf "%.12g", l * f }')
    echo "{\"step\": $step, \"metrics\": {\"train_loss\": $loss}}" >&3
    if [ $((step % 5)) -eq 0 ]; then
        echo "$step $loss" > "$ABLATE_CHECKPOINT_DIR/state"
        head -c 2000 /dev/zero > "$ABLATE_CHECKPOINT_DIR/weights"
        echo "{\"checkpoint\": $step}" >&3
        while [ "$(cat "$ABLATE_CHECKPOINT_ACK" 2>/dev/null)" != "$step" ]; do sleep 0.01; done
    fi
    if [ "$delay" != 0 ]; then sleep "$delay"; fi
done
"#;

/// A folder holding the trainer and a spec of it, `seeds` swept; returns the spec.
fn trainer_spec(stack: &Stack, name: &str, seeds: &[u32], extra: &str) -> PathBuf {
    let dir = stack.dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("train.sh"), TRAINER).unwrap();
    let fail_dir = stack.dir.join("fail");
    std::fs::create_dir_all(&fail_dir).unwrap();
    let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
    let spec = format!(
        r#"name = "{name}"
family = "train"
max_attempts = 1
{extra}
[trial]
command = ["sh", "train.sh", "{{seed}}", "{{steps}}", "{{turn}}", "{{delay}}"]
code = "."
env = {{ FAIL_DIR = "{fail}" }}
[base]
steps = 20
turn = 10
delay = 0
[sweep]
searcher = "grid"
params.seed = [{seeds}]
[objective]
metric = "train_loss"
goal = "minimize"
"#,
        fail = fail_dir.display(),
        seeds = seeds.join(", ")
    );
    std::fs::write(dir.join("sweep.toml"), spec).unwrap();
    dir.join("sweep.toml")
}

/// The CLI as the user holding `token`.
fn as_user(stack: &Stack, token: &str, args: &[&str]) -> Output {
    Command::new(bin("ablate"))
        .args(args)
        .env("ABLATE_COORDINATOR", stack.addr())
        .env("ABLATE_TOKEN", token)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// A researcher's token, made by the admin.
fn researcher(stack: &Stack, name: &str) -> String {
    let out = stack.ablate(&["token", "create", "--role", "researcher", "--name", name]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

/// A command's stdout, trimmed (an id, a token).
fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A refusal: the command failed, said `needle`, and the query's answer did not change.
async fn refused(stack: &Stack, out: Output, needle: &str, unchanged: &str, before: i64) {
    assert!(
        !out.status.success(),
        "expected a refusal naming `{needle}`: {}",
        text(&out)
    );
    assert!(
        stderr(&out).contains(needle),
        "the refusal does not say `{needle}`: {}",
        stderr(&out)
    );
    assert_eq!(
        stack.scalar_i64(unchanged).await,
        before,
        "a refused command changed `{unchanged}`"
    );
}

fn count_trials(experiment: &str, filter: &str) -> String {
    format!("select count(*) from trials where experiment_id = '{experiment}' {filter}")
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_trials_are_retried_once_fixed_and_an_extension_adds_exactly_the_new_points() {
    let mut stack = Stack::start(5.0).await;
    stack.start_worker_from(&bin("ablate-worker"), "cpu:2", &["--allow-commands"]);
    let fail = stack.dir.join("fail");
    std::fs::create_dir_all(&fail).unwrap();
    for seed in [2, 3, 5] {
        std::fs::write(fail.join(format!("fail-{seed}")), "").unwrap();
    }
    let spec = trainer_spec(&stack, "retry", &[1, 2, 3, 4, 5], "");
    let experiment = stack.submit(&spec);
    stack.wait_finished(&experiment, Duration::from_secs(90)).await;
    let all = count_trials(&experiment, "");
    let failed = count_trials(&experiment, "and state = 'failed'");
    assert_eq!(stack.scalar_i64(&failed).await, 3, "{}", stack.logs());
    let status = text(&stack.ablate(&["status", &experiment]));
    assert!(status.contains("the data is missing"), "{status}");

    // Bad input changes nothing: an unknown experiment, an unknown outcome, nothing of
    // the kind asked for.
    let unknown = uuid::Uuid::new_v4().to_string();
    let out = stack.ablate(&["retry", &unknown]);
    refused(&stack, out, "no experiment", &failed, 3).await;
    let out = stack.ablate(&["retry", &experiment, "--outcome", "exploded"]);
    refused(&stack, out, "expected failed, crashed or cancelled", &failed, 3).await;
    let out = stack.ablate(&["retry", &experiment, "--outcome", "cancelled"]);
    refused(&stack, out, "no cancelled trial to retry", &failed, 3).await;

    // The cause fixed, the retry runs them again and the experiment ends succeeded.
    for seed in [2, 3, 5] {
        std::fs::remove_file(fail.join(format!("fail-{seed}"))).unwrap();
    }
    let out = stack.ablate(&["retry", &experiment]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stderr(&out).contains("3 trial(s)"), "{}", stderr(&out));
    // Retrying it again while it runs is refused (it may have ended already: then
    // there is nothing failed to retry).
    let again = stack.ablate(&["retry", &experiment]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("is running") || stderr(&again).contains("no failed or crashed or cancelled"),
        "{}",
        stderr(&again)
    );
    stack.wait_finished(&experiment, Duration::from_secs(90)).await;
    let state: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select state from ablate.experiments where experiment_id = '{experiment}'"
    )))
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(state, "succeeded", "{}", stack.logs());
    let attempts: Vec<(i32, i32, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select ordinal, attempt, outcome from ablate.trial_attempts where experiment_id = '{experiment}'
         order by ordinal, attempt"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let expected: Vec<(i32, i32, String)> = [
        (0, 1, "succeeded"),
        (1, 1, "failed"),
        (1, 2, "succeeded"),
        (2, 1, "failed"),
        (2, 2, "succeeded"),
        (3, 1, "succeeded"),
        (4, 1, "failed"),
        (4, 2, "succeeded"),
    ]
    .into_iter()
    .map(|(o, a, s)| (o, a, s.to_string()))
    .collect();
    assert_eq!(attempts, expected);
    let points = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.metric_series where experiment_id = '{experiment}' and name = 'train_loss'"
        ))
        .await;
    assert_eq!(points, 5 * 20);

    // Extension: seeds 1..5 held, 6 and 7 new.
    let wider = trainer_spec(&stack, "retry-wider", &[1, 2, 3, 4, 5, 6, 7], "");
    // Its base must agree: a changed base.steps is refused, naming the field.
    let changed = trainer_spec(&stack, "retry-changed", &[1, 6], "");
    let changed_text = std::fs::read_to_string(&changed)
        .unwrap()
        .replace("steps = 20", "steps = 30");
    std::fs::write(&changed, changed_text).unwrap();
    let out = stack.ablate(&["submit", &changed.to_string_lossy(), "--into", &experiment]);
    refused(&stack, out, "base.steps", &all, 5).await;
    let out = stack.ablate(&["submit", &wider.to_string_lossy(), "--into", &unknown]);
    refused(&stack, out, "no experiment", &all, 5).await;
    // A retention value out of range is refused, naming the field.
    let bad_keep = trainer_spec(&stack, "bad-keep", &[1], "[checkpoints]\nkeep = 0");
    let out = stack.ablate(&["submit", &bad_keep.to_string_lossy()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("checkpoints.keep"), "{}", stderr(&out));

    let out = stack.ablate(&["submit", &wider.to_string_lossy(), "--into", &experiment]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), experiment);
    assert!(stderr(&out).contains("2 new trials"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("5 of the spec's points it held already"),
        "{}",
        stderr(&out)
    );
    // Extending it again while the new points run is refused and adds nothing.
    let out = stack.ablate(&["submit", &wider.to_string_lossy(), "--into", &experiment]);
    if !out.status.success() {
        assert!(stderr(&out).contains("is running"), "{}", stderr(&out));
    } else {
        assert!(stderr(&out).contains("0 new trials"), "{}", stderr(&out));
    }
    stack.wait_finished(&experiment, Duration::from_secs(90)).await;
    assert_eq!(stack.scalar_i64(&all).await, 7);
    let seeds: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select (params ->> 'seed')::int8 from trials where experiment_id = '{experiment}' order by ordinal"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(seeds, [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(
        stack
            .scalar_i64(&count_trials(&experiment, "and state = 'succeeded'"))
            .await,
        7
    );
    // The report covers every trial.
    let report = stack.ablate(&["report", &experiment, "--format", "json"]);
    assert!(report.status.success(), "{}", stderr(&report));
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let rows: Vec<String> = report["tables"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(rows.len(), 7, "{report}");
    for seed in 1..=7 {
        let needle = format!("seed\\\":{seed},");
        assert!(
            rows.iter().any(|r| r.contains(&needle)),
            "seed {seed} is not in the report: {report}"
        );
    }

    // Tags and a note: in status, the view, and the filter.
    let out = stack.ablate(&["tag", &experiment, "baseline", "paper:fig2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = stack.ablate(&["tag", &experiment, "bad tag"]);
    assert!(
        !out.status.success() && stderr(&out).contains("tag `bad tag`"),
        "{}",
        stderr(&out)
    );
    let out = stack.ablate(&["note", &experiment, "seeds 2, 3 and 5 lacked their data at first"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = text(&stack.ablate(&["status", &experiment]));
    assert!(status.contains("tags: baseline, paper:fig2"), "{status}");
    assert!(status.contains("note: seeds 2, 3 and 5"), "{status}");
    let other = stack.submit(&trainer_spec(&stack, "untagged", &[1], ""));
    let listed = text(&stack.ablate(&["status", "--tag", "paper:fig2"]));
    assert!(listed.contains(&experiment) && !listed.contains(&other), "{listed}");
    let tagged = stack
        .scalar_i64("select count(*) from ablate.experiments where tags @> array['baseline'] and note is not null")
        .await;
    assert_eq!(tagged, 1);
    stack.wait_finished(&other, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_researcher_deletes_only_their_own_experiment_and_loses_nothing_of_anothers_running_sweep() {
    let mut stack = Stack::start(5.0).await;
    stack.start_worker_from(&bin("ablate-worker"), "cpu:2", &["--allow-commands"]);
    let alice = researcher(&stack, "alice");
    let bob = researcher(&stack, "bob");
    let bobs = trainer_spec(&stack, "bobs", &[1, 2], "");
    let out = as_user(&stack, &bob, &["submit", &bobs.to_string_lossy(), "--wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bobs = stdout(&out);
    // Alice's sweep runs slowly while Bob deletes his.
    let alices = trainer_spec(&stack, "alices", &[1, 2, 3, 4], "");
    let slow = std::fs::read_to_string(&alices)
        .unwrap()
        .replace("delay = 0", "delay = 0.2");
    std::fs::write(&alices, slow).unwrap();
    let out = as_user(&stack, &alice, &["submit", &alices.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let alices = stdout(&out);
    stack
        .wait_for(
            &format!("select count(*) > 0 from ablate.checkpoints where experiment_id = '{alices}'"),
            Duration::from_secs(60),
        )
        .await;
    // Neither may delete the other's, nor a running one.
    let out = as_user(&stack, &alice, &["delete", &bobs]);
    refused(
        &stack,
        out,
        "only they or an admin may delete it",
        &count_trials(&bobs, ""),
        2,
    )
    .await;
    let out = as_user(&stack, &bob, &["delete", &alices]);
    refused(
        &stack,
        out,
        "only they or an admin may delete it",
        &count_trials(&alices, ""),
        4,
    )
    .await;
    let out = as_user(&stack, &alice, &["delete", &alices]);
    refused(&stack, out, "is running", &count_trials(&alices, ""), 4).await;
    let objects = stack.dir.join("objects");
    let bobs_folder = find_folder(&objects, &bobs).expect("bob's checkpoints are in the object store");
    let out = as_user(&stack, &bob, &["delete", &bobs]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("2 trial(s)"), "{}", stderr(&out));
    assert_eq!(files(&bobs_folder, "").0, 0, "bob's objects stayed");
    assert_eq!(stack.scalar_i64(&count_trials(&bobs, "")).await, 0);
    assert_eq!(
        stack
            .scalar_i64(&format!(
                "select count(*) from ablate.experiments where experiment_id = '{bobs}'"
            ))
            .await,
        0
    );
    stack.wait_finished(&alices, Duration::from_secs(120)).await;
    assert_eq!(
        stack
            .scalar_i64(&count_trials(&alices, "and state = 'succeeded'"))
            .await,
        4,
        "{}",
        stack.logs()
    );
    let points = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.metric_series where experiment_id = '{alices}'"
        ))
        .await;
    assert_eq!(points, 4 * 20);
    let checkpoints = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.checkpoints where experiment_id = '{alices}'"
        ))
        .await;
    assert_eq!(checkpoints, 4 * 4);
}

/// The folder named `name` somewhere under `root`.
fn find_folder(root: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if entry.file_name() == name {
                return Some(path);
            }
            if let Some(found) = find_folder(&path, name) {
                return Some(found);
            }
        }
    }
    None
}

/// Every file under `root` whose name ends with `suffix`: (count, bytes).
fn files(root: &Path, suffix: &str) -> (usize, u64) {
    let mut count = 0;
    let mut bytes = 0;
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                let (c, b) = files(&path, suffix);
                count += c;
                bytes += b;
            } else if entry.file_name().to_string_lossy().ends_with(suffix) {
                count += 1;
                bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    (count, bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_best_checkpoint_per_trial_and_gc_spares_a_trial_killed_meanwhile() {
    let mut stack = Stack::start(5.0).await;
    stack.start_worker_from(&bin("ablate-worker"), "cpu:2", &["--allow-commands"]);
    let objects = stack.dir.join("objects");
    let seeds: Vec<u32> = (0..100).collect();
    // The same sweep keeping every checkpoint, for the bytes before retention.
    let all = stack.submit_and_wait(&trainer_spec(&stack, "keep-all", &seeds, ""));
    let (all_count, all_bytes) = files(&objects, "");
    assert_eq!(files(&objects, ".safetensors").0, 100 * 4);

    // The unbroken curve of the trial that will be killed.
    let lone = |name: &str, delay: &str| {
        let spec = trainer_spec(&stack, name, &[500], "[checkpoints]\nkeep = \"best\"");
        // Attempts to spare: the killed one resumes by itself.
        let text = std::fs::read_to_string(&spec)
            .unwrap()
            .replace("delay = 0", &format!("delay = {delay}"))
            .replace("max_attempts = 1", "max_attempts = 3");
        std::fs::write(&spec, text).unwrap();
        spec
    };
    let unbroken = stack.submit_and_wait(&lone("unbroken", "0"));

    let best = stack.submit(&trainer_spec(
        &stack,
        "keep-best",
        &seeds,
        "[checkpoints]\nkeep = \"best\"",
    ));
    let killed = stack.submit(&lone("killed", "0.1"));
    // gc runs over and over while the sweep runs and its trials are thinned.
    let stop_gc = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (addr, token, stop) = (stack.addr(), stack.admin_token.clone(), stop_gc.clone());
        std::thread::spawn(move || {
            let mut said = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let out = Command::new(bin("ablate"))
                    .args(["gc", "--min-age", "0"])
                    .env("ABLATE_COORDINATOR", &addr)
                    .env("ABLATE_TOKEN", &token)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                said.push(String::from_utf8_lossy(&out.stdout).to_string());
                std::thread::sleep(Duration::from_millis(200));
            }
            said
        })
    };
    // Kill the slow trial's program after its first checkpoint.
    stack
        .wait_for(
            &format!("select count(*) > 0 from ablate.checkpoints where experiment_id = '{killed}'"),
            Duration::from_secs(60),
        )
        .await;
    let programs: Vec<i32> = pids_of("train.sh 500");
    assert!(!programs.is_empty(), "the slow trial's program is not running");
    for pid in &programs {
        // SAFETY: SIGKILL to the trial's program, found by its command line.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    stack.wait_finished(&best, Duration::from_secs(180)).await;
    stack.wait_finished(&killed, Duration::from_secs(120)).await;
    // Retention runs about every second: let it reach the last trials.
    stack
        .wait_for(
            "select count(*) = 0 from trials t join experiments e on e.id = t.experiment_id
             where e.keep_checkpoints <> 'all' and t.state in ('succeeded', 'pruned') and t.retained_at is null",
            Duration::from_secs(30),
        )
        .await;
    stop_gc.store(true, std::sync::atomic::Ordering::SeqCst);
    let removed_by_gc = gc.join().unwrap();
    assert!(removed_by_gc.len() >= 2, "gc ran {} times", removed_by_gc.len());
    // gc may take what retention dropped before retention does; never what a row holds.
    let paths: Vec<String> = sqlx::query_scalar("select path from checkpoints")
        .fetch_all(&stack.pool)
        .await
        .unwrap();
    for path in &paths {
        assert!(
            objects.join(path).exists(),
            "{path} has a row but no object (gc said {removed_by_gc:?})"
        );
    }

    let attempts: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select outcome from ablate.trial_attempts where experiment_id = '{killed}' order by attempt"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(attempts, ["crashed", "succeeded"], "{}", stack.logs());
    assert_same_curves(
        &harness::curve(&stack, &killed).await,
        &harness::curve(&stack, &unbroken).await,
    );

    // One checkpoint per trial of the sweep: the best (step 10, where the loss turns).
    let kept: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select step, count(*) from ablate.checkpoints where experiment_id = '{best}' group by step"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(kept, [(10, 100)]);
    let best_folder = find_folder(&objects, &best).unwrap();
    let (best_count, best_bytes) = files(&best_folder, ".safetensors");
    assert_eq!(best_count, 100, "checkpoint objects of the keep = \"best\" sweep");

    // gc: an object of no row (a checkpoint whose record never came), an experiment
    // that no longer exists; a dry run lists them and removes nothing.
    let some_trial = std::fs::read_dir(best_folder.join("trials"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let orphan = some_trial.join("step-999.safetensors");
    std::fs::write(&orphan, vec![0u8; 4096]).unwrap();
    let gone_experiment = best_folder.parent().unwrap().join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(gone_experiment.join("trials/x")).unwrap();
    std::fs::write(gone_experiment.join("trials/x/step-5.safetensors"), vec![0u8; 1000]).unwrap();
    let dry = stack.ablate(&["gc", "--dry-run", "--min-age", "0"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        text(&dry).contains("step-999.safetensors") && text(&dry).contains("no longer exists"),
        "{}",
        text(&dry)
    );
    assert!(stderr(&dry).contains("would remove 2 object(s)"), "{}", stderr(&dry));
    assert!(orphan.exists());
    // The default minimum age spares objects this young.
    let young = stack.ablate(&["gc"]);
    assert!(stderr(&young).contains("removed 0 object(s)"), "{}", stderr(&young));
    let out = stack.ablate(&["gc", "--min-age", "0"]);
    assert!(stderr(&out).contains("removed 2 object(s)"), "{}", stderr(&out));
    assert!(!orphan.exists() && !gone_experiment.join("trials/x/step-5.safetensors").exists());
    let (after_count, after_bytes) = files(&objects, "");
    // What the closing note reports: each sweep's objects (checkpoints, sidecars, logs).
    let all_folder = find_folder(&objects, &all).unwrap();
    let (all_ckpt, all_ckpt_bytes) = files(&all_folder, ".safetensors");
    let (all_objects, all_folder_bytes) = files(&all_folder, "");
    let (best_objects, best_folder_bytes) = files(&best_folder, "");
    eprintln!(
        "retention, 100 trials x 4 checkpoints: keep = \"all\": {all_objects} objects, {all_folder_bytes} bytes \
         ({all_ckpt} checkpoints, {all_ckpt_bytes} bytes of tensors); keep = \"best\" after retention and gc: \
         {best_objects} objects, {best_folder_bytes} bytes ({best_count} checkpoints, {best_bytes} bytes of tensors). \
         The whole store: {all_count} objects, {all_bytes} bytes after the first sweep; {after_count} objects, \
         {after_bytes} bytes at the end (both sweeps, the lone runs, packed code)"
    );
    assert_eq!(all_ckpt, 400);
    assert!(best_bytes * 3 < all_ckpt_bytes, "{best_bytes} against {all_ckpt_bytes}");
    // The best sweep's trials still read their results.
    let report = stack.ablate(&["status", &best]);
    assert!(text(&report).contains("succeeded"), "{}", text(&report));
}

/// The report's JSON without what names the experiment itself.
fn report_json(stack: &Stack, experiment: &str) -> serde_json::Value {
    let out = stack.ablate(&["report", experiment, "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    strip_ids(&mut value, experiment);
    value
}

fn strip_ids(value: &mut serde_json::Value, experiment: &str) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|k, _| k != "experiment_id" && k != "experiment" && k != "id");
            map.values_mut().for_each(|v| strip_ids(v, experiment));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| strip_ids(v, experiment)),
        serde_json::Value::String(s) if s.contains(experiment) => *s = s.replace(experiment, "EXP"),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resubmitted_width_sweep_with_reuse_runs_only_the_new_width_and_reports_as_a_full_run() {
    let mut stack = Stack::start(5.0).await;
    stack.start_worker("cpu:2");
    let spec = spec_path("mup-width-digits.toml");
    let spec = spec.to_string_lossy();
    let small = [
        "--set",
        "base.steps=40",
        "--set",
        "base.eval_every=40",
        "--set",
        "base.checkpoint_every=20",
        "--set",
        "sweep.params.log2_lr={ range = [-9, -5], step = 1 }",
        "--set",
        "sweep.params.seed=[0]",
    ];
    let submit = |widths: &str, reuse: bool| {
        let mut args = vec!["submit", &*spec, "--wait"];
        args.extend(small);
        let widths = format!("sweep.params.width={widths}");
        args.extend(["--set", &widths]);
        if reuse {
            args.extend(["--set", "reuse=true"]);
        }
        let out = stack.ablate(&args);
        assert!(out.status.success(), "{}\n{}", stderr(&out), stack.logs());
        (stdout(&out), stderr(&out))
    };
    let (first, _) = submit("[32, 64]", false);
    let (reusing, said) = submit("[32, 64, 128]", true);
    assert!(said.contains("20 of them reused"), "{said}");
    // Only width 128's 10 trials ran: the others have no attempt of their own.
    let ran = stack
        .scalar_i64(&format!(
            "select count(distinct a.trial_id) from ablate.trial_attempts a where a.experiment_id = '{reusing}'"
        ))
        .await;
    assert_eq!(ran, 10);
    let widths_ran = stack
        .scalar_i64(&format!(
            "select count(*) from trials where experiment_id = '{reusing}' and reused_from is null
             and (params ->> 'width')::int = 128"
        ))
        .await;
    assert_eq!(widths_ran, 10);
    let status = text(&stack.ablate(&["status", &reusing]));
    assert!(status.contains("reused: 20 trial(s)"), "{status}");
    let reused_sql = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_results where experiment_id = '{reusing}' and reused_from is not null"
        ))
        .await;
    assert_eq!(reused_sql, 20);
    // Its report equals a full run's.
    let (full, _) = submit("[32, 64, 128]", false);
    let full_report = report_json(&stack, &full);
    assert_eq!(report_json(&stack, &reusing), full_report);
    let series = |e: &str| format!("select count(*) from ablate.metric_series where experiment_id = '{e}'");
    let points = stack.scalar_i64(&series(&full)).await;
    assert_eq!(stack.scalar_i64(&series(&reusing)).await, points);
    // Deleting the experiment it reused hands the data over: nothing it shows changes.
    let out = stack.ablate(&["delete", &first]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("20 of its trials were reused"),
        "{}",
        stderr(&out)
    );
    assert_eq!(report_json(&stack, &reusing), full_report);
    assert_eq!(stack.scalar_i64(&series(&reusing)).await, points);
    let checkpoints = |e: &str| format!("select count(*) from ablate.checkpoints where experiment_id = '{e}'");
    let held = stack.scalar_i64(&checkpoints(&full)).await;
    assert!(held >= 30, "{held} checkpoints in the full run");
    assert_eq!(stack.scalar_i64(&checkpoints(&reusing)).await, held);
    // ... and the handed-over checkpoints are still in the store.
    let paths: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select path from ablate.checkpoints where experiment_id = '{reusing}'"
    )))
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let objects = stack.dir.join("objects");
    let all_there = |when: &str| {
        for path in &paths {
            let found = objects.join(path).exists() || Path::new("/").join(path).exists();
            assert!(found, "{path} is gone from the object store {when}");
        }
    };
    all_there("after the delete");
    // gc takes none of them, though they lie under the deleted experiment's folder.
    let out = stack.ablate(&["gc", "--min-age", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    all_there("after gc");
    assert_eq!(report_json(&stack, &reusing), full_report);
}
