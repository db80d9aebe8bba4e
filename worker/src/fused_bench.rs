//! `ablate-worker bench-fused`: trials per hour of the muP width sweep's MLPs
//! (experiments/specs/mup-width-digits.toml: 64 -> w x 2 -> 10, muP, Adam,
//! batch 64) trained one by one and as fused groups, through the same training
//! code trials run (`train::run`, `train::run_fused`), on one device.
//! `cargo xtask bench fused` prints the table; the GPU check runs it on a GPU.

use std::time::Instant;

use ablate_experiments::families::train;
use ablate_experiments::trial::{DirData, MemoryCheckpoints, MemoryMetrics, TrialContext};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// The widths to time, comma-separated.
    #[arg(long, default_value = "32,64,128,256,512", value_delimiter = ',')]
    pub widths: Vec<u32>,
    /// Trials per fused group (and trials timed one by one).
    #[arg(long, default_value_t = 8)]
    pub members: usize,
    /// Steps per trial.
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 1)]
    pub threads: i32,
}

/// The sweep's trial at `width` with learning rate 2^`log2_lr` and `seed`.
fn trial(o: &Options, width: u32, log2_lr: f64, seed: u64) -> Value {
    json!({"dataset": "digits", "model": "mlp", "depth": 2, "optimizer": "adam", "steps": o.steps,
        "batch_size": 64, "base_width": 32, "eval_every": o.steps, "checkpoint_every": o.steps,
        "divergence": "record", "readout_init": "zero", "schedule": "linear", "parametrization": "mup",
        "width": width, "log2_lr": log2_lr, "seed": seed})
}

/// Each trial's stores, in memory: what a run needs besides its parameters.
struct Stores {
    checkpoints: MemoryCheckpoints,
    metrics: MemoryMetrics,
    data: DirData,
}

impl Stores {
    fn new(scratch: &std::path::Path) -> Stores {
        Stores {
            checkpoints: MemoryCheckpoints::default(),
            metrics: MemoryMetrics::default(),
            data: DirData {
                root: scratch.to_path_buf(),
                experiment: "bench".into(),
            },
        }
    }

    fn context(&mut self, device: tch::Device) -> TrialContext<'_> {
        TrialContext {
            device,
            checkpoints: &mut self.checkpoints,
            metrics: &mut self.metrics,
            data: &mut self.data,
            pause_at: None,
            paused: None,
        }
    }
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    tch::set_num_threads(o.threads);
    let device = crate::backend::device(&o.device)?;
    let scratch = std::env::temp_dir().join(format!("ablate-bench-fused-{}", std::process::id()));
    for &width in &o.widths {
        let group: Vec<Value> = (0..o.members)
            .map(|i| trial(o, width, -10.0 + (i / 2) as f64, (i % 2) as u64))
            .collect();
        // Warm up: the data set read, libtorch's kernels chosen.
        train::run(&trial(o, width, -10.0, 9), &mut Stores::new(&scratch).context(device))?;
        let start = Instant::now();
        for params in &group {
            train::run(params, &mut Stores::new(&scratch).context(device))?;
        }
        let unfused = start.elapsed().as_secs_f64();
        let mut stores: Vec<Stores> = group.iter().map(|_| Stores::new(&scratch)).collect();
        let mut ctxs: Vec<TrialContext<'_>> = stores.iter_mut().map(|s| s.context(device)).collect();
        let start = Instant::now();
        for result in train::run_fused(&group, &mut ctxs) {
            result?;
        }
        let fused = start.elapsed().as_secs_f64();
        let per_hour = |wall: f64| o.members as f64 * 3600.0 / wall;
        println!(
            "{}",
            json!({"width": width, "members": o.members, "steps": o.steps, "device": o.device,
                "unfused_s": unfused, "fused_s": fused,
                "unfused_trials_per_hour": per_hour(unfused), "fused_trials_per_hour": per_hour(fused)})
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
