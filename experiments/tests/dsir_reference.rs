//! ablate's DSIR against the reference package (PyPI data-selection 1.0.3, run
//! from the venv `cargo xtask test` provisions, named by ABLATE_DSIR_PYTHON) on
//! the same corpus: two pool shards of Brown and Shakespeare documents and the
//! held-out news target. Bucket counts must be equal, log importance weights
//! within a relative 1e-9, and the deterministic top-k the same documents.
#![cfg(not(feature = "torch"))]

use std::path::PathBuf;
use std::process::Command;

use ablate_experiments::families::dsir::method::{self as dsir, Featurizer, BUCKETS};
use serde_json::Value;

fn corpus() -> (Vec<PathBuf>, PathBuf) {
    let root = PathBuf::from(ablate_experiments::nn::locations::data_root()).join("dsir");
    let pool: Vec<PathBuf> = (0..2).map(|i| root.join(format!("pool/shard-{i}.jsonl"))).collect();
    let target = root.join("target/news.jsonl");
    for f in pool.iter().chain([&target]) {
        assert!(f.exists(), "{} is missing: run `cargo xtask provision`", f.display());
    }
    (pool, target)
}

fn documents(path: &PathBuf) -> Vec<(String, String)> {
    let bytes = std::fs::read(path).unwrap();
    dsir::parse_jsonl(&bytes, "text", &path.display().to_string())
        .unwrap()
        .into_iter()
        .map(|d| (d.id.unwrap(), d.text))
        .collect()
}

#[test]
fn counts_weights_and_top_k_match_the_reference_package() {
    let python = std::env::var("ABLATE_DSIR_PYTHON").expect(
        "ABLATE_DSIR_PYTHON names the python of a venv with data-selection==1.0.3; `cargo xtask test` provisions it",
    );
    let (pool, target) = corpus();
    let k = 500;
    let work = std::env::temp_dir().join(format!("ablate-dsir-ref-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/dsir_reference.py");
    let out = Command::new(&python)
        .arg(script)
        .args(&pool)
        .arg("--target")
        .arg(&target)
        .args(["--k", &k.to_string(), "--num-proc", "1", "--work"])
        .arg(&work)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference: Value = serde_json::from_slice(&out.stdout).unwrap();

    let mut featurizer = Featurizer::new(BUCKETS);
    let mut raw = vec![0u64; BUCKETS as usize];
    let mut features = Vec::new();
    let mut ids = Vec::new();
    for path in &pool {
        for (id, text) in documents(path) {
            let f = featurizer.features(&text);
            dsir::count(&mut raw, &f);
            features.push(f);
            ids.push(id);
        }
    }
    let mut target_counts = vec![0u64; BUCKETS as usize];
    for (_, text) in documents(&target) {
        dsir::count(&mut target_counts, &featurizer.features(&text));
    }
    let floats = |v: &Value| -> Vec<f64> { v.as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect() };
    let as_counts = |v: &Value| -> Vec<u64> { v.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect() };
    assert_eq!(raw, as_counts(&reference["raw_counts"]), "raw bucket counts");
    assert_eq!(
        target_counts,
        as_counts(&reference["target_counts"]),
        "target bucket counts"
    );

    let ratio = dsir::log_ratio(&target_counts, &raw);
    let ours: Vec<f64> = features.iter().map(|f| dsir::log_weight(&ratio, f)).collect();
    let theirs = floats(&reference["log_weights"]);
    assert_eq!(ours.len(), theirs.len());
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0f64, f64::max);
    assert!(worst <= 1e-9, "largest relative difference of log weights: {worst:e}");
    let lengths = floats(&reference["lengths"]);
    for (f, l) in features.iter().zip(&lengths) {
        assert_eq!(dsir::words(f) as f64, *l, "per-document length");
    }

    let eligible: Vec<bool> = features.iter().map(|f| dsir::words(f) >= dsir::MIN_WORDS).collect();
    let mut chosen: Vec<String> = dsir::top_k(&ours, &eligible, k)
        .unwrap()
        .into_iter()
        .map(|i| ids[i].clone())
        .collect();
    let mut expected: Vec<String> = reference["top_k_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    chosen.sort();
    expected.sort();
    assert_eq!(chosen, expected, "deterministic top-{k}");
    eprintln!(
        "{} documents; largest relative difference of log weights {worst:e}; reference weights in {:.2} s",
        ours.len(),
        reference["seconds"]
    );
    let _ = std::fs::remove_dir_all(&work);
}
