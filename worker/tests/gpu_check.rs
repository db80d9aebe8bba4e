//! The GPU check can fail: `xtask/scripts/gpu-check.sh` (its dry run, on the CPU)
//! exits non-zero when a trial fails or, asked for the verdict, when a criterion
//! does not hold, and names it; `ablate-worker sweep --require` under it says by
//! how much a criterion misses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The GPU check's dry run of the intrinsic-dimension family (seconds on the CPU).
fn dry_run(args: &[&str]) -> Output {
    let out = std::env::temp_dir().join(format!("ablate-gpu-check-{}", uuid::Uuid::new_v4().simple()));
    let result = Command::new("bash")
        .arg("xtask/scripts/gpu-check.sh")
        .arg("--dry-run")
        .args(args)
        .arg("intrinsic")
        .current_dir(root())
        .env("ABLATE_GPU_BIN", env!("CARGO_BIN_EXE_ablate-worker"))
        .env("ABLATE_DATA", ablate_experiments::nn::locations::data_root())
        .env("OUT", &out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&out).ok();
    result
}

#[test]
fn the_dry_run_passes_only_when_every_trial_succeeds_and_names_what_fell_short() {
    let out = dry_run(&[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("verdict:"), "{}", text(&out));
    // Half its trials read a folder that does not exist: they fail, and so does the check.
    let out = dry_run(&["--set", r#"sweep.params.data_dir=["mnist", "no-such-folder"]"#]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("FAILED: 4 of 8 trials did not succeed (ordinals 4, 5, 6, 7)"),
        "{}",
        text(&out)
    );
    // Asked for the verdict, a dry run's few steps fall short, criterion by criterion.
    let out = dry_run(&["--require", "verdict"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out)
            .contains("FAILED: criterion not met: MNIST FC d_int90 (paper: 750): not measured, needs in 375..1500"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_sweep_required_to_hold_its_verdict_exits_3_naming_the_criterion_and_its_miss() {
    let sweep = |require: &str| {
        Command::new(env!("CARGO_BIN_EXE_ablate-worker"))
            .args(["sweep", "experiments/specs/mup-width-digits.toml", "--devices", "cpu:2"])
            .args(["--set", "base.steps=5", "--set", "sweep.params.width=[32,64]"])
            .args([
                "--set",
                "sweep.params.log2_lr=[-8,-6]",
                "--set",
                "sweep.params.seed=[0]",
            ])
            .args(["--require", require])
            .current_dir(root())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    // Five steps can't separate SP's best learning rates across widths.
    let out = sweep("verdict");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains(
            "FAILED: criterion not met: SP spread of best log2 lr across widths (steps): measured 0, needs >= 2, misses by 2"
        ),
        "{}",
        text(&out)
    );
    // Every trial succeeded and the report has a verdict: that is all `succeeded` asks.
    let out = sweep("succeeded");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("FAILED"), "{}", text(&out));
}
