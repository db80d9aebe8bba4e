//! The `dsir` family's trials: featurize a pool shard, select, or train the
//! downstream language model (see [`crate::families::dsir`]).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::ParamError;
use crate::families::dsir::method::{self as dsir, Document, Featurizer};
use crate::families::dsir::{self as family, DsirParams, Selection, Stage};
use crate::trial::{every_file, LocatedFile, TrialContext, TrialError};

/// Keeps the random baseline's draws apart from the Gumbel noise.
const RANDOM_SALT: u64 = 0x7a4d_0b5e_1ec7_0001;

pub fn run(params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
    let p = DsirParams::parse(params)?;
    match p.stage {
        Some(Stage::Features) => features(&p, ctx),
        Some(Stage::Select) => select(&p, ctx),
        Some(Stage::Train) => train(&p, ctx),
        None => Err(ParamError::new(
            "stage",
            "set when a dsir spec is expanded: submit the spec, not a single trial",
        )
        .into()),
    }
}

/// The shard pool file `index` belongs to.
fn shard_of_file(p: &DsirParams, index: usize) -> u32 {
    (index % p.shards as usize) as u32
}

/// Reads the pool's files that `pick` accepts (by position), checking there are enough for every shard.
fn pool_files(
    p: &DsirParams,
    ctx: &mut TrialContext<'_>,
    pick: &dyn Fn(usize) -> bool,
) -> Result<Vec<LocatedFile>, TrialError> {
    let listing = ctx.data.read_location(&p.pool, ".jsonl", pick)?;
    if listing.total < p.shards as usize {
        return Err(TrialError::Data(format!(
            "the pool {} holds {} .jsonl files, fewer than shards = {}; lower shards or split the pool",
            p.pool, listing.total, p.shards
        )));
    }
    Ok(listing.files)
}

fn parse(bytes: &[u8], field: &str, name: &str) -> Result<Vec<Document>, TrialError> {
    dsir::parse_jsonl(bytes, field, name).map_err(TrialError::Data)
}

/// Every document of the target text.
fn target_documents(p: &DsirParams, ctx: &mut TrialContext<'_>) -> Result<Vec<Document>, TrialError> {
    let mut docs = Vec::new();
    for f in ctx.data.read_location(&p.target, ".jsonl", &every_file)?.files {
        docs.extend(parse(&f.bytes, &p.text_field, &f.name)?);
    }
    Ok(docs)
}

fn encode(features: &[Vec<u32>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in features {
        out.extend((f.len() as u32).to_le_bytes());
        for &b in f {
            out.extend((b as u16).to_le_bytes());
        }
    }
    out
}

fn decode(bytes: &[u8], name: &str) -> Result<Vec<Vec<u32>>, TrialError> {
    let bad = || TrialError::Data(format!("{name}: truncated features"));
    let mut docs = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = u32::from_le_bytes(bytes.get(at..at + 4).ok_or_else(bad)?.try_into().expect("4 bytes")) as usize;
        at += 4;
        let body = bytes.get(at..at + 2 * n).ok_or_else(bad)?;
        docs.push(
            body.chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        );
        at += 2 * n;
    }
    Ok(docs)
}

/// Featurizes this trial's share of the pool; the counts file, written last, marks it done.
fn features(p: &DsirParams, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
    let files = pool_files(p, ctx, &|i| shard_of_file(p, i) == p.shard)?;
    let start = Instant::now();
    let mut featurizer = Featurizer::new(p.buckets);
    let mut counts = vec![0u64; p.buckets as usize];
    let mut all = Vec::new();
    let mut per_file = Vec::new();
    for f in &files {
        let docs = parse(&f.bytes, &p.text_field, &f.name)?;
        per_file.push(json!({"file": f.name, "documents": docs.len()}));
        for d in docs {
            let f = featurizer.features(&d.text);
            dsir::count(&mut counts, &f);
            all.push(f);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    ctx.data.put(&family::features_key(p.shard), encode(&all))?;
    let sidecar = json!({"files": per_file, "documents": all.len(), "seconds": seconds, "counts": counts});
    ctx.data
        .put(&family::counts_key(p.shard), sidecar.to_string().into_bytes())?;
    ctx.metrics.log("documents", 1, all.len() as f64);
    ctx.metrics.log("docs_per_s", 1, all.len() as f64 / seconds.max(1e-9));
    Ok(())
}

/// Polls the experiment's prefix until `key` exists.
fn wait_for(ctx: &mut TrialContext<'_>, key: &str, wait_s: u64, what: &str) -> Result<Vec<u8>, TrialError> {
    let deadline = Instant::now() + Duration::from_secs(wait_s);
    loop {
        if let Some(bytes) = ctx.data.get(key)? {
            return Ok(bytes);
        }
        if Instant::now() >= deadline {
            return Err(TrialError::Data(format!(
                "waited {wait_s} s for {what} ({key}); did that trial fail? `ablate status EXP` shows it"
            )));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn select(p: &DsirParams, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
    // The raw model from every shard's counts.
    let mut raw = vec![0u64; p.buckets as usize];
    for shard in 0..p.shards {
        let bytes = wait_for(
            ctx,
            &family::counts_key(shard),
            p.wait_s,
            &format!("the features of shard {shard}"),
        )?;
        let sidecar: Value = serde_json::from_slice(&bytes).map_err(|e| TrialError::Data(e.to_string()))?;
        for (slot, c) in raw.iter_mut().zip(sidecar["counts"].as_array().into_iter().flatten()) {
            *slot += c.as_u64().unwrap_or(0);
        }
    }
    // The target model.
    let mut featurizer = Featurizer::new(p.buckets);
    let mut target = vec![0u64; p.buckets as usize];
    let target_docs = target_documents(p, ctx)?;
    for d in &target_docs {
        dsir::count(&mut target, &featurizer.features(&d.text));
    }
    if target.iter().all(|&c| c == 0) {
        return Err(TrialError::Data(format!(
            "the target {} holds no text ({} documents): give JSONL lines with a `{}` field",
            p.target,
            target_docs.len(),
            p.text_field
        )));
    }
    let ratio = dsir::log_ratio(&target, &raw);

    // Weights of every document, kept per shard before anything can fail.
    let mut features: Vec<Vec<u32>> = Vec::new();
    let mut weights: Vec<f64> = Vec::new();
    let mut shard_of: Vec<u32> = Vec::new();
    for shard in 0..p.shards {
        let key = family::features_key(shard);
        let bytes = ctx
            .data
            .get(&key)?
            .ok_or_else(|| TrialError::Data(format!("{key} is missing though its counts are there")))?;
        let docs = decode(&bytes, &key)?;
        let w: Vec<f64> = docs.iter().map(|f| dsir::log_weight(&ratio, f)).collect();
        ctx.data.put(
            &family::weights_key(shard),
            w.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )?;
        shard_of.extend(std::iter::repeat_n(shard, docs.len()));
        weights.extend(w);
        features.extend(docs);
    }
    let eligible: Vec<bool> = features.iter().map(|f| dsir::words(f) >= p.min_words).collect();
    let k = p.k as usize;
    let pick = |r: Result<Vec<usize>, String>| {
        r.map_err(|e| {
            TrialError::Params(ParamError::new(
                "k",
                format!("{e} (the weights are kept under dsir/weights/ in the experiment's storage)"),
            ))
        })
    };
    let chosen = if p.top_k {
        pick(dsir::top_k(&weights, &eligible, k))?
    } else {
        pick(dsir::gumbel_top_k(&weights, &eligible, k, p.seed))?
    };
    let random = pick(dsir::uniform_k(&eligible, k, p.seed ^ RANDOM_SALT))?;

    let target_p = dsir::probabilities(&target);
    let kl_of = |idx: &[usize]| {
        let mut c = vec![0u64; p.buckets as usize];
        for &i in idx {
            dsir::count(&mut c, &features[i]);
        }
        dsir::kl(&target_p, &dsir::probabilities(&c))
    };
    let kl_raw = dsir::kl(&target_p, &dsir::probabilities(&raw));
    let (kl_dsir, kl_random) = (kl_of(&chosen), kl_of(&random));

    // Write both selections back as JSONL shards with a manifest, and measure the genre share.
    // The pool is read once, in the order the shards featurized it.
    let pool = pool_files(p, ctx, &every_file)?;
    let mut docs: Vec<Document> = Vec::with_capacity(features.len());
    for shard in 0..p.shards {
        for f in pool.iter().filter(|f| shard_of_file(p, f.index) == shard) {
            docs.extend(parse(&f.bytes, &p.text_field, &f.name)?);
        }
    }
    if docs.len() != features.len() {
        return Err(TrialError::Data(format!(
            "the pool changed under the experiment: {} documents now, {} when featurized",
            docs.len(),
            features.len()
        )));
    }
    let on_target = |i: &usize| p.target_genre.is_some() && docs[*i].genre == p.target_genre;
    let eligible_idx: Vec<usize> = (0..docs.len()).filter(|&i| eligible[i]).collect();
    let share = |idx: &[usize]| idx.iter().filter(|i| on_target(i)).count() as f64 / idx.len().max(1) as f64;
    let method = if p.top_k { "top_k" } else { "gumbel_top_k" };
    for (selection, idx, method, kl) in [
        (Selection::Dsir, &chosen, method, kl_dsir),
        (Selection::Random, &random, "uniform", kl_random),
    ] {
        let mut by_shard = vec![String::new(); p.shards as usize];
        let mut sorted = idx.clone();
        sorted.sort_unstable();
        for i in sorted {
            let part = &mut by_shard[shard_of[i] as usize];
            part.push_str(&docs[i].line);
            part.push('\n');
        }
        let mut parts = Vec::new();
        for (shard, text) in by_shard.into_iter().enumerate() {
            parts.push(
                ctx.data
                    .put(&family::part_key(selection, shard as u32), text.into_bytes())?,
            );
        }
        let manifest = json!({
            "selection": selection.name(), "method": method, "k": k, "seed": p.seed,
            "documents": idx.len(), "parts": parts, "pool": p.pool, "target": p.target,
            "kl_target_selected": kl, "kl_reduction": kl_raw - kl,
        });
        let key = ctx.data.put(
            &family::manifest_key(selection),
            serde_json::to_vec_pretty(&manifest).expect("json"),
        )?;
        let output = if selection == Selection::Dsir {
            "selection"
        } else {
            "random_selection"
        };
        ctx.metrics.output(
            output,
            json!({"manifest": key, "documents": idx.len(), "method": method}),
        );
    }
    for (name, value) in [
        ("pool_documents", docs.len() as f64),
        ("selected", k as f64),
        ("kl_raw", kl_raw),
        ("kl_dsir", kl_dsir),
        ("kl_random", kl_random),
        ("kl_reduction_dsir", kl_raw - kl_dsir),
        ("kl_reduction_random", kl_raw - kl_random),
        ("target_share_dsir", share(&chosen)),
        ("target_share_random", share(&random)),
        ("target_base_rate", share(&eligible_idx)),
    ] {
        ctx.metrics.log(name, 1, value);
    }
    Ok(())
}

/// Trains the downstream model on one selection and evaluates it on the target text.
fn train(p: &DsirParams, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
    let selection = p.selection.expect("checked with the stage");
    let lm = p.train.as_ref().expect("checked with the stage");
    let manifest = wait_for(ctx, &family::manifest_key(selection), p.wait_s, "the selection")?;
    let manifest: Value = serde_json::from_slice(&manifest).map_err(|e| TrialError::Data(e.to_string()))?;
    let scratch = std::env::temp_dir().join(format!(
        "ablate-dsir-{}-{}-{}",
        std::process::id(),
        selection.name(),
        p.train_seed
    ));
    let (train_dir, eval_dir) = (scratch.join("train"), scratch.join("eval"));
    let io = |e: std::io::Error| TrialError::Data(format!("{}: {e}", scratch.display()));
    std::fs::create_dir_all(&train_dir).map_err(io)?;
    std::fs::create_dir_all(&eval_dir).map_err(io)?;
    let mut text = String::new();
    let parts = manifest["parts"].as_array().map_or(0, Vec::len) as u32;
    for shard in 0..parts {
        let part = family::part_key(selection, shard);
        let bytes = ctx
            .data
            .get(&part)?
            .ok_or_else(|| TrialError::Data(format!("{part} is named in the manifest but missing")))?;
        for d in parse(&bytes, &p.text_field, &part)? {
            text.push_str(&d.text);
            text.push('\n');
        }
    }
    std::fs::write(train_dir.join("selected.txt"), &text).map_err(io)?;
    let mut target = String::new();
    for d in target_documents(p, ctx)? {
        target.push_str(&d.text);
        target.push('\n');
    }
    std::fs::write(eval_dir.join("target.txt"), &target).map_err(io)?;
    let params = p.lm_params(lm, &train_dir.to_string_lossy(), &eval_dir.to_string_lossy())?;
    let result = crate::families::train::run(&params, ctx);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::trial::{DirData, MemoryCheckpoints, MemoryMetrics};

    struct Bench {
        dir: std::path::PathBuf,
    }

    impl Bench {
        fn new(tag: &str) -> Bench {
            let dir = std::env::temp_dir().join(format!("ablate-dsir-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("pool")).unwrap();
            let words = |topic: &str, i: usize| {
                (0..120)
                    .map(|w| format!("{topic}{} word{}", w % 7, (w * i) % 13))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            for shard in 0..2 {
                let lines: String = (0..20)
                    .map(|i| {
                        let topic = if i % 4 == 0 { "court" } else { "bread" };
                        format!(
                            "{}\n",
                            json!({"id": format!("{shard}-{i}"), "text": words(topic, i), "genre": topic})
                        )
                    })
                    .collect();
                std::fs::write(dir.join(format!("pool/shard-{shard}.jsonl")), lines).unwrap();
            }
            let target: String = (0..5)
                .map(|i| format!("{}\n", json!({"text": words("court", i)})))
                .collect();
            std::fs::write(dir.join("target.jsonl"), target).unwrap();
            Bench { dir }
        }

        fn params(&self, stage: &str, extra: Value) -> Value {
            let mut p = json!({"stage": stage, "pool": self.dir.join("pool"), "target": self.dir.join("target.jsonl"),
                "shards": 2, "k": 5, "target_genre": "court", "wait_s": 2});
            for (k, v) in extra.as_object().unwrap() {
                p[k] = v.clone();
            }
            p
        }

        fn run(&self, params: &Value) -> (Result<(), TrialError>, MemoryMetrics) {
            let mut metrics = MemoryMetrics::default();
            let mut data = DirData {
                root: self.dir.join("store"),
                experiment: "e".into(),
            };
            let mut ctx = TrialContext {
                device: tch::Device::Cpu,
                checkpoints: &mut MemoryCheckpoints::default(),
                metrics: &mut metrics,
                data: &mut data,
                pause_at: None,
                paused: None,
            };
            (run(params, &mut ctx), metrics)
        }
    }

    #[test]
    fn shards_then_selection_pick_the_target_topic_and_write_a_manifest() {
        let b = Bench::new("ok");
        for shard in 0..2 {
            b.run(&b.params("features", json!({"shard": shard}))).0.unwrap();
        }
        let (result, metrics) = b.run(&b.params("select", json!({"top_k": true})));
        result.unwrap();
        assert_eq!(
            metrics.last("target_share_dsir"),
            Some(1.0),
            "every court document first"
        );
        assert_eq!(metrics.last("target_base_rate"), Some(0.25));
        assert!(metrics.last("kl_reduction_dsir").unwrap() > metrics.last("kl_reduction_random").unwrap());
        let manifest = b.dir.join("store/experiments/e/dsir/selection/dsir/manifest.json");
        let manifest: Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
        assert_eq!(manifest["documents"], 5);
        assert_eq!(metrics.outputs["selection"]["documents"], 5);
    }

    #[test]
    fn bad_input_is_refused_clearly_and_computed_weights_are_kept() {
        let b = Bench::new("bad");
        for shard in 0..2 {
            b.run(&b.params("features", json!({"shard": shard}))).0.unwrap();
        }
        // k above the pool: refused after the weights are stored.
        let err = b.run(&b.params("select", json!({"k": 41}))).0.unwrap_err().to_string();
        assert!(err.contains("lower k") && err.contains("weights are kept"), "{err}");
        assert!(b.dir.join("store/experiments/e/dsir/weights/shard-1.bin").exists());
        // An empty target.
        std::fs::write(b.dir.join("empty.jsonl"), "").unwrap();
        let err = b
            .run(&b.params("select", json!({"target": b.dir.join("empty.jsonl")})))
            .0
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no text"), "{err}");
        // A shard that is not JSONL names its file and line.
        std::fs::write(
            b.dir.join("pool/shard-1.jsonl"),
            "{\"text\": \"fine\"}\nnot json at all\n",
        )
        .unwrap();
        let err = b
            .run(&b.params("features", json!({"shard": 1})))
            .0
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shard-1.jsonl line 2") && err.contains("not JSON"),
            "{err}"
        );
        // The earlier shard's features are still there.
        assert!(b.dir.join("store/experiments/e/dsir/features/shard-0.json").exists());
        // A selection whose shards never finish says what it waited for.
        let lonely = Bench::new("wait");
        let err = lonely
            .run(&lonely.params("select", json!({})))
            .0
            .unwrap_err()
            .to_string();
        assert!(err.contains("the features of shard 0"), "{err}");
    }
}
