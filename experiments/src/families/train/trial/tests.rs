//! The training trial, run for real on the CPU.

use serde_json::json;

use crate::trial::{DirData, MemoryCheckpoints, MemoryMetrics, TrialContext};

fn no_data() -> DirData {
    DirData {
        root: std::env::temp_dir().join(format!("ablate-trial-data-{}", std::process::id())),
        experiment: "test".into(),
    }
}

/// Runs a trial on the CPU; its result and what it logged.
fn try_train(
    params: &serde_json::Value,
    store: &mut MemoryCheckpoints,
) -> (Result<(), crate::trial::TrialError>, MemoryMetrics) {
    let (result, metrics, _) = train_to(params, store, None);
    (result, metrics)
}

/// Runs a trial on the CPU that stops at `pause_at` when given; its result, what it
/// logged, and the step it paused at.
fn train_to(
    params: &serde_json::Value,
    store: &mut MemoryCheckpoints,
    pause_at: Option<u64>,
) -> (Result<(), crate::trial::TrialError>, MemoryMetrics, Option<u64>) {
    tch::set_num_threads(1);
    let mut metrics = MemoryMetrics::default();
    let mut ctx = TrialContext {
        device: tch::Device::Cpu,
        checkpoints: store,
        metrics: &mut metrics,
        data: &mut no_data(),
        pause_at,
        paused: None,
    };
    let result = super::run(params, &mut ctx);
    let paused = ctx.paused;
    (result, metrics, paused)
}

#[test]
fn a_trial_paused_at_a_rung_checkpoints_there_and_resumes_to_the_same_curve() {
    let params = json!({"optimizer": "adam", "lr": 0.003, "steps": 90, "width": 32,
        "checkpoint_every": 40, "eval_every": 40, "seed": 3});
    let mut unbroken = MemoryCheckpoints::default();
    let full = train(&params, &mut unbroken);
    let mut store = MemoryCheckpoints::default();
    // Rung 30 is off the eval and checkpoint schedule: the trial evaluates and checkpoints there anyway.
    let (result, first, paused) = train_to(&params, &mut store, Some(30));
    result.unwrap();
    assert_eq!(paused, Some(30));
    assert_eq!(store.saved.iter().map(|s| s.step).collect::<Vec<_>>(), vec![30]);
    assert_eq!(
        first.points.iter().map(|p| p.1).max(),
        Some(30),
        "trained past its rung"
    );
    assert!(
        first.points.iter().any(|p| p.0 == "eval_loss" && p.1 == 30),
        "no eval at the rung"
    );
    store.resume_at = Some(30);
    let (result, rest, paused) = train_to(&params, &mut store, None);
    result.unwrap();
    assert_eq!(paused, None);
    for name in ["eval_loss", "train_loss_tail", "train_loss"] {
        let (a, b) = (full.last(name).unwrap(), rest.last(name).unwrap());
        assert!((a - b).abs() <= 1e-6, "{name}: {a} unbroken vs {b} paused and resumed");
    }
}

fn train(params: &serde_json::Value, store: &mut MemoryCheckpoints) -> MemoryMetrics {
    let (result, metrics) = try_train(params, store);
    result.unwrap();
    metrics
}

#[test]
fn adam_learns_digits_and_resume_reproduces_the_curve() {
    for optimizer in ["adam", "adamw", "sgd"] {
        let params = json!({"optimizer": optimizer, "lr": if optimizer == "sgd" { 0.1 } else { 0.003 },
            "momentum": if optimizer == "sgd" { 0.9 } else { 0.0 }, "weight_decay": 0.01,
            "steps": 120, "width": 32, "checkpoint_every": 40, "eval_every": 40, "seed": 7});
        let mut store = MemoryCheckpoints::default();
        let full = train(&params, &mut store);
        let accuracy = full.last("eval_accuracy").unwrap();
        assert!(accuracy > 0.8, "{optimizer}: eval accuracy {accuracy} after 120 steps");
        assert_eq!(store.saved.iter().map(|s| s.step).collect::<Vec<_>>(), vec![40, 80]);
        // Resume from step 80: the rest of the curve must match the unbroken run.
        store.resume_at = Some(80);
        let resumed = train(&params, &mut store);
        assert_eq!(
            resumed.points.first().unwrap().1,
            81,
            "{optimizer}: resumed run restarted at step 0"
        );
        for name in ["eval_loss", "train_loss_tail", "train_loss"] {
            let (a, b) = (full.last(name).unwrap(), resumed.last(name).unwrap());
            assert!((a - b).abs() <= 1e-6, "{optimizer} {name}: {a} unbroken vs {b} resumed");
        }
    }
}

fn corpus_dir() -> String {
    let dir = std::env::temp_dir().join(format!("ablate-text-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let line = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n";
    std::fs::write(dir.join("a.txt"), line.repeat(200)).unwrap();
    std::fs::write(dir.join("notes.md"), "ignored: not a .txt file").unwrap();
    dir.to_string_lossy().into_owned()
}

#[test]
fn mup_is_sp_at_the_base_width_and_a_zero_readout_starts_at_chance() {
    let run = |parametrization: &str, readout_init: &str| {
        let params = json!({"optimizer": "adam", "lr": 0.01, "steps": 40, "width": 32, "base_width": 32,
            "parametrization": parametrization, "readout_init": readout_init, "seed": 4});
        train(&params, &mut MemoryCheckpoints::default()).points
    };
    let sp = run("sp", "scaled");
    assert_eq!(
        sp,
        run("mup", "scaled"),
        "muP in its default form must equal SP bit for bit"
    );
    let zero = run("mup", "zero");
    assert_ne!(sp, zero);
    let first = zero.iter().find(|p| p.0 == "train_loss").unwrap().2;
    assert!(
        (first - 10f64.ln()).abs() < 1e-6,
        "zero logits give ln(10), got {first}"
    );
    assert_eq!(run("sp", "zero"), sp, "SP ignores readout_init");
}

#[test]
fn the_transformer_learns_text_in_both_forms_and_resumes_on_the_same_curve() {
    let dir = corpus_dir();
    for parametrization in ["sp", "mup"] {
        let params = json!({"model": "gpt", "dataset": "text", "data_dir": dir, "width": 32, "base_width": 16,
            "depth": 2, "heads": 2, "context": 16, "optimizer": "adamw", "lr": 0.01, "steps": 60,
            "batch_size": 16, "eval_every": 30, "checkpoint_every": 30, "parametrization": parametrization});
        let mut store = MemoryCheckpoints::default();
        let full = train(&params, &mut store);
        let first = full.points.iter().find(|p| p.0 == "train_loss").unwrap().2;
        let eval = full.last("eval_loss").unwrap();
        assert!(
            first > 4.0,
            "{parametrization}: a fresh model is near uniform over 256 bytes, got {first}"
        );
        assert!(
            eval < 2.5,
            "{parametrization}: eval loss {eval} after 60 steps on a repeated line"
        );
        store.resume_at = Some(30);
        let resumed = train(&params, &mut store);
        let (a, b) = (
            full.last("train_loss_final").unwrap(),
            resumed.last("train_loss_final").unwrap(),
        );
        assert!((a - b).abs() <= 1e-6, "{parametrization}: {a} unbroken vs {b} resumed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// B_simple on linear regression, where the gradient covariance is known in closed form.
/// With x ~ N(0, L), residual r = x.e - s*eps (e = w - w*), the per-example gradient g = x r has
/// mean G = L e and second moment 2 L e e^T L + (e^T L e + s^2) L (Isserlis), so
/// tr(Sigma) = |L e|^2 + (e^T L e + s^2) tr(L) and B_simple = tr(Sigma) / |L e|^2.
#[test]
fn b_simple_matches_the_closed_form_on_linear_regression() {
    tch::set_num_threads(1);
    let (dim, exponent, noise) = (16i64, 1.0, 0.5);
    let mut task = super::tasks::PowerLaw::new(dim, exponent, noise, 3, 8, tch::Device::Cpu);
    // At w = 0, e = -w*.
    let lambda: Vec<f64> = (1..=dim).map(|i| (i as f64).powf(-exponent)).collect();
    let teacher: Vec<f64> = Vec::<f32>::try_from(&task.teacher)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let le_sq: f64 = lambda.iter().zip(&teacher).map(|(l, w)| (l * w).powi(2)).sum();
    let ele: f64 = lambda.iter().zip(&teacher).map(|(l, w)| l * w * w).sum();
    let trace = le_sq + (ele + noise * noise) * lambda.iter().sum::<f64>();
    let exact = trace / le_sq;
    let config = crate::families::train::NoiseScale {
        small: 4,
        big: 64,
        repeats: 400,
        smoothing: 0.0,
    };
    let estimate = super::noise::measure_noise(&mut task, config, 0);
    let (rel_g, rel_tr) = (
        (estimate.grad_sq - le_sq).abs() / le_sq,
        (estimate.trace - trace).abs() / trace,
    );
    let rel_b = (estimate.b_simple() - exact).abs() / exact;
    assert!(rel_g < 0.05, "|G|^2: {} estimated, {le_sq} exact", estimate.grad_sq);
    assert!(rel_tr < 0.05, "tr(Sigma): {} estimated, {trace} exact", estimate.trace);
    assert!(
        rel_b < 0.05,
        "B_simple: {} estimated, {exact} exact",
        estimate.b_simple()
    );
    // The measurement leaves no gradient behind and does not move the weights.
    assert_eq!(
        task.params[0]
            .tensor
            .grad()
            .abs()
            .sum(tch::Kind::Float)
            .double_value(&[]),
        0.0
    );
    assert_eq!(task.params[0].tensor.abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn power_law_regression_learns_and_averaged_weights_resume_on_the_same_curve() {
    let params = json!({"model": "linear", "dataset": "power_law", "width": 32, "optimizer": "adamw",
        "beta2": 0.95, "lr": 0.02, "warmup_steps": 5, "steps": 20, "examples": 1600, "batch_size": 16,
        "eval_every": 10, "checkpoint_every": 50, "ema_decay": 0.9,
        "noise_scale": {"small": 4, "big": 32, "repeats": 2}});
    let mut store = MemoryCheckpoints::default();
    let full = train(&params, &mut store);
    let curve: Vec<f64> = full
        .points
        .iter()
        .filter(|p| p.0 == "eval_loss_ema")
        .map(|p| p.2)
        .collect();
    assert_eq!(
        curve.len(),
        10,
        "1600 examples at batch 16 are 100 updates, evaluated every 10"
    );
    let (first, last) = (curve[0], *curve.last().unwrap());
    assert!(last < 0.5 * first, "the averaged weights learn: {first} -> {last}");
    assert!(full.last("b_simple").unwrap() > 1.0, "B_simple = 1 + noise/signal > 1");
    assert_eq!(store.saved.iter().map(|s| s.step).collect::<Vec<_>>(), vec![50]);
    store.resume_at = Some(50);
    let resumed = train(&params, &mut store);
    for name in ["eval_loss_ema", "b_simple", "eval_loss"] {
        let (a, b) = (full.last(name).unwrap(), resumed.last(name).unwrap());
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "{name}: {a} unbroken vs {b} resumed"
        );
    }
}

#[test]
fn subspace_training_checkpoints_z_alone_and_resumes_on_the_same_curve() {
    for projection in ["dense", "sparse", "fastfood"] {
        let params = json!({"optimizer": "adam", "lr": 0.05, "steps": 80, "width": 32, "seed": 5,
            "subspace_dim": 40, "projection": projection, "checkpoint_every": 40, "eval_every": 40});
        let mut store = MemoryCheckpoints::default();
        let full = train(&params, &mut store);
        let accuracy = full.last("eval_accuracy").unwrap();
        assert!(
            accuracy > 0.2,
            "{projection}: 40 dimensions beat chance (0.1), got {accuracy}"
        );
        assert_eq!(
            full.last("num_params"),
            Some((64.0 * 32.0 + 32.0) + (32.0 * 32.0 + 32.0) + (32.0 * 10.0 + 10.0))
        );
        let saved = &store.saved[0].tensors;
        assert!(saved.contains_key("subspace.z"), "{projection}");
        assert!(
            saved.keys().all(|k| k.contains("subspace.z")),
            "{projection}: the model's weights follow from the seed and z: {:?}",
            saved.keys().collect::<Vec<_>>()
        );
        store.resume_at = Some(40);
        let resumed = train(&params, &mut store);
        for name in ["eval_accuracy", "eval_loss", "train_loss_final"] {
            let (a, b) = (full.last(name).unwrap(), resumed.last(name).unwrap());
            assert!(
                (a - b).abs() <= 1e-6,
                "{projection} {name}: {a} unbroken vs {b} resumed"
            );
        }
    }
}

#[test]
fn a_dense_projection_too_big_for_the_device_is_refused_with_fastfood_suggested() {
    let params = json!({"optimizer": "adam", "lr": 0.05, "steps": 10, "width": 32,
        "subspace_dim": 1_000_000_000u64, "projection": "dense"});
    let (result, metrics) = try_train(&params, &mut MemoryCheckpoints::default());
    let text = result.unwrap_err().to_string();
    assert!(
        text.contains("subspace_dim") && text.contains("fastfood") && text.contains("GiB"),
        "{text}"
    );
    assert!(metrics.last("train_loss").is_none(), "refused before the first step");
}

#[test]
fn lenet_learns_mnist_and_refuses_images_of_another_size() {
    let params = json!({"model": "lenet", "dataset": "mnist", "optimizer": "adam", "lr": 0.002,
        "steps": 60, "batch_size": 64, "eval_every": 60});
    let metrics = train(&params, &mut MemoryCheckpoints::default());
    let accuracy = metrics.last("eval_accuracy").unwrap();
    assert!(accuracy > 0.6, "LeNet after 60 steps: {accuracy}");
    assert_eq!(metrics.last("num_params"), Some(61_706.0));
    // LeNet-5's forward pass by hand: conv1's 156 weights at 28x28 positions, conv2's
    // 2,416 at 10x10, the 59,134 dense weights once; 2 operations each (about 0.42M
    // multiply-adds, as LeNet-5 is usually counted); an update is three passes.
    let forward = 2.0 * (156.0 * 784.0 + 2_416.0 * 100.0 + 59_134.0);
    assert_eq!(metrics.last("train_flops"), Some(3.0 * forward * 64.0 * 60.0));
    let digits = json!({"model": "lenet", "dataset": "digits", "optimizer": "adam", "lr": 0.002, "steps": 5});
    let err = try_train(&digits, &mut MemoryCheckpoints::default())
        .0
        .unwrap_err()
        .to_string();
    assert!(err.contains("28x28"), "{err}");
}

#[test]
fn a_head_count_that_does_not_divide_the_width_is_refused() {
    let err = crate::Family::parse("train")
        .unwrap()
        .check_params(&json!({"model": "gpt", "optimizer": "adam", "lr": 0.1, "steps": 5, "width": 30, "heads": 4}))
        .unwrap_err();
    assert_eq!(err.path, "heads");
}

#[test]
fn the_provisioned_shakespeare_texts_load() {
    let dir = crate::nn::locations::shakespeare_dir();
    let corpus = crate::nn::data::text_dir(&dir, 64, tch::Device::Cpu, crate::nn::locations::SHAKESPEARE_HELP)
        .unwrap_or_else(|e| panic!("{e}"));
    let bytes = corpus.train.size()[0] + corpus.eval.size()[0];
    assert!(
        bytes > 4_000_000,
        "the plays hold over 4 MB of text, got {bytes} bytes from {dir}"
    );
    let text: Vec<u8> = Vec::<i64>::try_from(&corpus.train.narrow(0, 0, 200_000))
        .unwrap()
        .into_iter()
        .map(|b| b as u8)
        .collect();
    assert!(
        String::from_utf8_lossy(&text).contains("Enter"),
        "stage directions are part of the plays"
    );
}

/// Runs `params` as one fused group on the CPU, each member with its own store; what each logged.
fn train_fused(
    params: &[serde_json::Value],
    stores: &mut [MemoryCheckpoints],
) -> (Vec<Result<(), crate::trial::TrialError>>, Vec<MemoryMetrics>) {
    let (results, metrics, _) = train_fused_to(params, stores, &vec![None; params.len()]);
    (results, metrics)
}

type FusedRun = (
    Vec<Result<(), crate::trial::TrialError>>,
    Vec<MemoryMetrics>,
    Vec<Option<u64>>,
);

/// [`train_fused`] with each member's rung (`pause_at`); also the step each paused at.
fn train_fused_to(params: &[serde_json::Value], stores: &mut [MemoryCheckpoints], rungs: &[Option<u64>]) -> FusedRun {
    tch::set_num_threads(1);
    let mut metrics: Vec<MemoryMetrics> = params.iter().map(|_| MemoryMetrics::default()).collect();
    let mut data: Vec<DirData> = params.iter().map(|_| no_data()).collect();
    let mut ctxs: Vec<TrialContext<'_>> = stores
        .iter_mut()
        .zip(metrics.iter_mut())
        .zip(data.iter_mut())
        .zip(rungs)
        .map(|(((store, metrics), data), &pause_at)| TrialContext {
            device: tch::Device::Cpu,
            checkpoints: store,
            metrics,
            data,
            pause_at,
            paused: None,
        })
        .collect();
    let results = super::run_fused(params, &mut ctxs);
    let paused = ctxs.iter().map(|c| c.paused).collect();
    drop(ctxs);
    (results, metrics, paused)
}

/// The largest difference between two runs' points of every metric (relative to values above
/// 1, such as the gradient-noise sums), which must log the same steps.
fn largest_gap(fused: &MemoryMetrics, single: &MemoryMetrics) -> f64 {
    let key = |m: &MemoryMetrics| {
        let mut points: Vec<(String, u64, f64)> = m.points.clone();
        points.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        points
    };
    let (a, b) = (key(fused), key(single));
    assert_eq!(
        a.iter().map(|p| (&p.0, p.1)).collect::<Vec<_>>(),
        b.iter().map(|p| (&p.0, p.1)).collect::<Vec<_>>(),
        "the fused member logged other points than its single run"
    );
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x.2 - y.2).abs() / y.2.abs().max(1.0))
        .fold(0.0, f64::max)
}

/// Eight members that differ in seed, learning rate, optimizer settings and weight decay.
fn group_of_eight(base: serde_json::Value) -> Vec<serde_json::Value> {
    (0..8u64)
        .map(|i| {
            let mut p = base.clone();
            let o = p.as_object_mut().unwrap();
            o.insert("seed".into(), json!(i * 7 + 1));
            o.insert("lr".into(), json!(0.002 * (1.0 + i as f64 / 2.0)));
            o.insert(
                "weight_decay".into(),
                json!(if i % 3 == 0 { 0.0 } else { 0.01 * i as f64 }),
            );
            o.insert("beta1".into(), json!(if i % 2 == 0 { 0.9 } else { 0.8 }));
            o.insert("momentum".into(), json!(if i % 2 == 0 { 0.0 } else { 0.9 }));
            p
        })
        .collect()
}

#[test]
fn a_fused_group_of_eight_gives_each_member_its_single_runs_curve() {
    for (optimizer, model, parametrization) in [("adam", "mlp", "mup"), ("sgd", "resmlp", "sp"), ("adamw", "mlp", "sp")]
    {
        let base = json!({"optimizer": optimizer, "model": model, "parametrization": parametrization,
            "width": 48, "base_width": 32, "depth": 2, "steps": 60, "batch_size": 32,
            "eval_every": 20, "checkpoint_every": 25, "schedule": "cosine", "warmup_steps": 5});
        let group = group_of_eight(base);
        let mut stores: Vec<MemoryCheckpoints> = group.iter().map(|_| MemoryCheckpoints::default()).collect();
        let (results, fused) = train_fused(&group, &mut stores);
        for (i, params) in group.iter().enumerate() {
            results[i].as_ref().unwrap();
            let single = train(params, &mut MemoryCheckpoints::default());
            let gap = largest_gap(&fused[i], &single);
            eprintln!("{optimizer} {model} {parametrization}: member {i} within {gap:.2e} of its single run");
            assert!(
                gap <= 1e-5,
                "{optimizer} {model}: member {i} is {gap} from its single run"
            );
            // Its checkpoints are a single run's: the same steps, names and shapes.
            let mut own = MemoryCheckpoints::default();
            train(params, &mut own);
            let steps = |s: &MemoryCheckpoints| s.saved.iter().map(|c| c.step).collect::<Vec<_>>();
            assert_eq!(steps(&stores[i]), steps(&own));
            let names = |s: &MemoryCheckpoints| {
                let mut n: Vec<(String, Vec<i64>)> =
                    s.saved[0].tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
                n.sort();
                n
            };
            assert_eq!(names(&stores[i]), names(&own));
        }
    }
}

#[test]
fn fused_members_resume_fused_or_alone_on_their_curves_and_diverge_alone() {
    let base = json!({"optimizer": "sgd", "width": 40, "depth": 2, "steps": 60, "batch_size": 32,
        "eval_every": 20, "checkpoint_every": 25, "ema_decay": 0.9,
        "noise_scale": {"small": 8, "big": 32, "repeats": 2}});
    let mut group = group_of_eight(base);
    // Member 5 diverges; it is stopped alone.
    group[5].as_object_mut().unwrap().insert("lr".into(), json!(1.0e9));
    let mut unbroken: Vec<MemoryCheckpoints> = group.iter().map(|_| MemoryCheckpoints::default()).collect();
    let (results, whole) = train_fused(&group, &mut unbroken);
    assert!(
        matches!(results[5], Err(crate::trial::TrialError::Diverged { .. })),
        "{:?}",
        results[5].as_ref().err()
    );
    for (i, r) in results.iter().enumerate() {
        if i != 5 {
            r.as_ref().unwrap();
            let single = train(&group[i], &mut MemoryCheckpoints::default());
            assert!(
                largest_gap(&whole[i], &single) <= 1e-5,
                "member {i} moved when member 5 diverged"
            );
        }
    }
    // Resumed from step 25, members 0..4 fused again; 6 and 7 each alone, unfused, from
    // the checkpoint the fused run wrote; all on the unbroken curve.
    let healthy: Vec<usize> = (0..8).filter(|&i| i != 5).collect();
    for store in unbroken.iter_mut() {
        store.resume_at = Some(25);
    }
    // Every point after the resume, of every metric.
    let tail = |m: &MemoryMetrics| MemoryMetrics {
        points: m.points.iter().filter(|p| p.1 > 25).cloned().collect(),
        ..Default::default()
    };
    let (again, resumed) = train_fused(&group[..5], &mut unbroken[..5]);
    for i in 0..5 {
        again[i].as_ref().unwrap();
        assert!(
            largest_gap(&tail(&resumed[i]), &tail(&whole[i])) <= 1e-5,
            "member {i} resumed fused off its curve"
        );
    }
    for &i in healthy.iter().filter(|&&i| i >= 6) {
        let (result, alone) = try_train(&group[i], &mut unbroken[i]);
        result.unwrap();
        assert!(
            largest_gap(&tail(&alone), &tail(&whole[i])) <= 1e-5,
            "member {i} resumed alone off its fused curve"
        );
    }
    // And a single run's checkpoint resumes inside a group: a new member joins one resumed at 25.
    let mut single = MemoryCheckpoints::default();
    let alone_full = train(&group[1], &mut single);
    single.resume_at = Some(25);
    let mut stores = vec![single, MemoryCheckpoints::default()];
    let pair = [group[1].clone(), group[2].clone()];
    let (results, mixed) = train_fused(&pair, &mut stores);
    results.iter().for_each(|r| r.as_ref().map(|_| ()).unwrap());
    assert!(
        largest_gap(&tail(&mixed[0]), &tail(&alone_full)) <= 1e-5,
        "the resumed single run moved in the group"
    );
    let fresh = train(&group[2], &mut MemoryCheckpoints::default());
    assert!(
        largest_gap(&mixed[1], &fresh) <= 1e-5,
        "the member that started at 0 moved"
    );
}

/// A member trains bit for bit alike in a group of any size and at any place in
/// it (one intra-op thread): a crash that regroups it, or `fuse = "auto"` sizing
/// by free memory, changes none of its numbers.
#[test]
fn a_members_numbers_do_not_depend_on_its_group() {
    // cbs-mnist's setup: AdamW, weight averaging, the noise measurement, growing eval gaps.
    let base = json!({"optimizer": "adamw", "model": "mlp", "dataset": "mnist", "depth": 2, "beta2": 0.95,
        "warmup_steps": 10, "schedule": "constant", "ema_decay": 0.99, "steps": 300, "width": 64,
        "batch_size": 4, "eval_every": 1000000, "eval_growth": 0.05, "checkpoint_every": 2000,
        "noise_scale": {"small": 16, "big": 256, "repeats": 4}});
    let seven: Vec<serde_json::Value> = (0..7)
        .map(|i| {
            let mut p = base.clone();
            p["log2_lr"] = json!(-10 + i);
            p
        })
        .collect();
    let run = |group: &[serde_json::Value]| {
        let mut stores: Vec<MemoryCheckpoints> = group.iter().map(|_| MemoryCheckpoints::default()).collect();
        train_fused(group, &mut stores).1
    };
    let (all, last) = (run(&seven), run(&seven[4..]));
    for (i, alone) in last.iter().enumerate() {
        let grouped = &all[i + 4];
        assert!(grouped.points.len() > 300, "{} points", grouped.points.len());
        assert_eq!(
            grouped.points,
            alone.points,
            "member {} of 7 and member {i} of 3 logged other numbers",
            i + 4
        );
    }
}

#[test]
fn fused_members_pause_at_their_own_rungs_and_resume_in_another_group_on_their_curves() {
    let base = json!({"optimizer": "adam", "width": 40, "depth": 2, "steps": 60, "batch_size": 32,
        "eval_every": 20, "checkpoint_every": 100, "ema_decay": 0.9,
        "noise_scale": {"small": 8, "big": 32, "repeats": 2}});
    let group = group_of_eight(base);
    // Rungs off the evaluation schedule, two members without one.
    let rungs: Vec<Option<u64>> = (0..8)
        .map(|i| match i % 3 {
            0 => Some(15),
            1 => Some(30),
            _ => None,
        })
        .collect();
    let mut stores: Vec<MemoryCheckpoints> = group.iter().map(|_| MemoryCheckpoints::default()).collect();
    let (results, first, paused) = train_fused_to(&group, &mut stores, &rungs);
    for i in 0..8 {
        results[i].as_ref().unwrap();
        assert_eq!(paused[i], rungs[i], "member {i} paused at its own rung");
        let saved: Vec<u64> = stores[i].saved.iter().map(|c| c.step).collect();
        assert_eq!(
            saved,
            rungs[i].into_iter().collect::<Vec<_>>(),
            "member {i} checkpointed at its rung"
        );
        // Its points are those of its single run paused at the same rung.
        let (result, single, single_paused) = train_to(&group[i], &mut MemoryCheckpoints::default(), rungs[i]);
        result.unwrap();
        assert_eq!(single_paused, rungs[i]);
        let gap = largest_gap(&first[i], &single);
        assert!(gap <= 1e-5, "member {i} is {gap} from its single run to its rung");
    }
    // Promoted: the paused members resume together, each from its own rung, to the end,
    // on the curve of their single runs paused and resumed at the same rung (the
    // evaluation at a rung feeds the gradient-noise average, so it is part of the curve).
    let promoted: Vec<usize> = (0..8).filter(|&i| rungs[i].is_some()).collect();
    let params: Vec<serde_json::Value> = promoted.iter().map(|&i| group[i].clone()).collect();
    let mut resumed_stores: Vec<MemoryCheckpoints> = promoted
        .iter()
        .map(|&i| MemoryCheckpoints {
            saved: std::mem::take(&mut stores[i].saved),
            resume_at: rungs[i],
        })
        .collect();
    let (results, rest, paused) = train_fused_to(&params, &mut resumed_stores, &vec![None; promoted.len()]);
    for (k, &i) in promoted.iter().enumerate() {
        results[k].as_ref().unwrap();
        assert_eq!(paused[k], None);
        let rung = rungs[i].unwrap();
        let after = |m: &MemoryMetrics| MemoryMetrics {
            points: m.points.iter().filter(|p| p.1 > rung).cloned().collect(),
            ..Default::default()
        };
        let mut store = MemoryCheckpoints::default();
        train_to(&group[i], &mut store, Some(rung)).0.unwrap();
        store.resume_at = Some(rung);
        let (result, single, _) = train_to(&group[i], &mut store, None);
        result.unwrap();
        let gap = largest_gap(&after(&rest[k]), &after(&single));
        assert!(
            gap <= 1e-5,
            "member {i} resumed from step {rung} is {gap} from its single run"
        );
    }
}

#[test]
fn the_gradient_noise_measurement_leaves_the_training_curve_untouched() {
    // So a sweep may measure it in some runs only (`cbs.noise_runs = "reference"`) and the
    // others train exactly as they would with it.
    let base = json!({"optimizer": "adamw", "beta2": 0.95, "lr": 0.003, "width": 32, "steps": 60,
        "batch_size": 64, "eval_every": 10, "ema_decay": 0.99, "warmup_steps": 10, "schedule": "constant"});
    let mut measured = base.clone();
    measured
        .as_object_mut()
        .unwrap()
        .insert("noise_scale".into(), json!({"small": 8, "big": 64, "repeats": 2}));
    let plain = train(&base, &mut MemoryCheckpoints::default());
    let noisy = train(&measured, &mut MemoryCheckpoints::default());
    let noise_metrics = ["grad_sq_norm", "grad_noise_trace", "b_simple"];
    assert!(noisy.points.iter().any(|p| p.0 == "b_simple"), "the noise was measured");
    let without_noise = |m: &MemoryMetrics| {
        let mut points: Vec<(String, u64, u64)> = m
            .points
            .iter()
            .filter(|p| !noise_metrics.contains(&p.0.as_str()))
            .map(|p| (p.0.clone(), p.1, p.2.to_bits()))
            .collect();
        points.sort();
        points
    };
    assert_eq!(without_noise(&plain), without_noise(&noisy), "bit for bit");
}
