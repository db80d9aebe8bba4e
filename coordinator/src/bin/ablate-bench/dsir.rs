//! The DSIR rows: our importance weights beside data-selection 1.0.3 on the same corpus.

use super::*;

/// The DSIR corpus `cargo xtask provision` builds: the pool's shards and the news target.
pub(super) fn dsir_corpus() -> Result<(Vec<std::path::PathBuf>, std::path::PathBuf)> {
    let root = std::path::PathBuf::from(ablate_experiments::nn::locations::data_root()).join("dsir");
    let mut pool: Vec<_> = std::fs::read_dir(root.join("pool"))
        .map_err(|e| format!("{}: {e}; run `cargo xtask provision`", root.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    pool.sort();
    Ok((pool, root.join("target/news.jsonl")))
}

/// Our importance weights end to end, as the reference's timed call does them: each
/// shard's JSONL read and parsed, its documents featurized and weighed, the weights
/// written to a file, on `threads` threads (a featurizer each, cold): documents/s.
pub(super) fn dsir_ours(pool: &[std::path::PathBuf], ratio: &[f64], threads: usize) -> Result<f64> {
    use ablate_experiments::families::dsir::method::{self as dsir, log_weight, Featurizer, BUCKETS};
    let work = std::env::temp_dir().join(format!("ablate-bench-dsir-ours-{}-{threads}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let start = Instant::now();
    let counts: Vec<std::result::Result<usize, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pool
            .chunks(pool.len().div_ceil(threads))
            .map(|shards| {
                let work = &work;
                scope.spawn(move || {
                    let mut f = Featurizer::new(BUCKETS);
                    let mut n = 0;
                    for path in shards {
                        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
                        let docs = dsir::parse_jsonl(&bytes, "text", &path.display().to_string())?;
                        let weights: Vec<u8> = docs
                            .iter()
                            .flat_map(|d| log_weight(ratio, &f.features(&d.text)).to_le_bytes())
                            .collect();
                        let name = path.file_name().unwrap_or_default();
                        std::fs::write(work.join(name).with_extension("weights"), weights)
                            .map_err(|e| e.to_string())?;
                        n += docs.len();
                    }
                    Ok(n)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a DSIR thread")).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&work);
    let docs: usize = counts
        .into_iter()
        .collect::<std::result::Result<Vec<_>, _>>()?
        .into_iter()
        .sum();
    Ok(docs as f64 / seconds)
}

/// The reference's importance weights (`compute_importance_weights`) on `procs` processes: documents/s.
pub(super) fn dsir_reference(
    python: &str,
    pool: &[std::path::PathBuf],
    target: &std::path::Path,
    procs: usize,
) -> Result<f64> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/tests/support/dsir_reference.py");
    let work = std::env::temp_dir().join(format!("ablate-bench-dsir-{}-{procs}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let out = std::process::Command::new(python)
        .arg(script)
        .args(pool)
        .arg("--target")
        .arg(target)
        .args(["--k", "1000", "--num-proc", &procs.to_string(), "--work"])
        .arg(&work)
        .output()?;
    let _ = std::fs::remove_dir_all(&work);
    if !out.status.success() {
        return Err(format!("reference DSIR failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["documents"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(f64::INFINITY))
}

pub(super) fn dsir_rows() -> Result<Vec<Row>> {
    use ablate_experiments::families::dsir::method::{self as dsir, Featurizer, BUCKETS};
    let (pool, target) = dsir_corpus()?;
    let mut docs = Vec::new();
    for path in &pool {
        let bytes = std::fs::read(path)?;
        docs.extend(
            dsir::parse_jsonl(&bytes, "text", &path.display().to_string())?
                .into_iter()
                .map(|d| d.text),
        );
    }
    let mut f = Featurizer::new(BUCKETS);
    let (mut raw, mut tgt) = (vec![0u64; BUCKETS as usize], vec![0u64; BUCKETS as usize]);
    for d in &docs {
        dsir::count(&mut raw, &f.features(d));
    }
    for d in dsir::parse_jsonl(&std::fs::read(&target)?, "text", "target")? {
        dsir::count(&mut tgt, &f.features(&d.text));
    }
    let ratio = dsir::log_ratio(&tgt, &raw);
    let python = std::env::var("ABLATE_DSIR_PYTHON").ok();
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let ours = dsir_ours(&pool, &ratio, threads)?;
        let row = Row::new(
            format!(
                "DSIR importance weights, {} 128-word docs in {} JSONL shards, {threads} core(s)",
                docs.len(),
                pool.len()
            ),
            ours,
            "docs/s",
        )
        .note(
            "timed end to end on both sides: JSONL files read and parsed, documents featurized and \
             weighed, weights written to files (the reference's compute_importance_weights, its process \
             pool included)",
        );
        rows.push(match &python {
            Some(py) => row.peer(
                "data-selection 1.0.3",
                dsir_reference(py, &pool, &target, threads).map_err(|e| e.to_string()),
            ),
            None => row.note("reference not run: set ABLATE_DSIR_PYTHON (cargo xtask bench does)"),
        });
    }
    Ok(rows)
}
