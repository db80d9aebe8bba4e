//! Data selection with importance resampling (Xie et al. 2023), with features
//! identical to the reference package `data-selection` 1.0.3: the text is
//! lowercased and tokenized with `\w+|[^\w\s]+` (nltk's WordPunctTokenizer),
//! each unigram and each space-joined bigram goes to bucket
//! int(sha256(s)) mod `buckets`, and a document is its bag of buckets.
//! log w(x) = sum_j count_j(x) (log(p_target_j + 1e-8) - log(p_raw_j + 1e-8)).

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// The reference package's default number of buckets.
pub const BUCKETS: u32 = 10_000;
/// Smoothing added to every bucket probability before the log, as the reference does.
pub const SMOOTHING: f64 = 1e-8;

/// int(sha256(text).hexdigest(), 16) % buckets, without big integers.
pub fn bucket(text: &str, buckets: u32) -> u32 {
    let digest = Sha256::digest(text.as_bytes());
    let m = u64::from(buckets);
    // Four bytes at a time: r < m <= 2^32, so r * 2^32 + word stays within u64.
    digest.chunks_exact(4).fold(0u64, |r, w| {
        ((r << 32) | u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]))) % m
    }) as u32
}

/// SHA-256's initial state.
const SHA256_H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// The bucket of the concatenation of `parts`: the same as [`bucket`], but a message of at
/// most 55 bytes (one padded block) is compressed directly, without building a string.
pub fn bucket_of_parts(parts: &[&[u8]], buckets: u32) -> u32 {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > 55 {
        return bucket(&String::from_utf8_lossy(&parts.concat()), buckets);
    }
    let mut block = [0u8; 64];
    let mut at = 0;
    for p in parts {
        block[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    block[len] = 0x80;
    block[56..].copy_from_slice(&(len as u64 * 8).to_be_bytes());
    let mut state = SHA256_H0;
    sha2::compress256(&mut state, &[block.into()]);
    digest_mod(&state, buckets)
}

/// The 256-bit big-endian number in `words` modulo `m`, a 32-bit word at a time.
fn digest_mod(words: &[u32; 8], m: u32) -> u32 {
    let m = u64::from(m);
    words.iter().fold(0u64, |r, &w| ((r << 32) | u64::from(w)) % m) as u32
}

/// A fast non-cryptographic hasher for the word cache (FxHash's multiply-rotate).
#[derive(Default, Clone, Copy)]
struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type WordCache = HashMap<Box<str>, u32, std::hash::BuildHasherDefault<WordHasher>>;

/// Turns documents into buckets of unigrams and bigrams. Keeps a cache of the
/// buckets of the words it has hashed, so frequent words are hashed once
/// (bigrams repeat too rarely for a cache to pay for its inserts).
pub struct Featurizer {
    tokens: regex::Regex,
    buckets: u32,
    cache: WordCache,
}

/// Strings hashed at most once each up to this many entries; beyond it, hashed every time.
const CACHE_LIMIT: usize = 1 << 20;

impl Featurizer {
    pub fn new(buckets: u32) -> Featurizer {
        Featurizer {
            tokens: regex::Regex::new(r"\w+|[^\w\s]+").expect("the token pattern compiles"),
            buckets,
            cache: WordCache::default(),
        }
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    fn hashed(&mut self, s: &str) -> u32 {
        if let Some(&b) = self.cache.get(s) {
            return b;
        }
        let b = bucket_of_parts(&[s.as_bytes()], self.buckets);
        if self.cache.len() < CACHE_LIMIT {
            self.cache.insert(s.into(), b);
        }
        b
    }

    /// The buckets of a document's unigrams, then of its bigrams (one entry per occurrence).
    pub fn features(&mut self, text: &str) -> Vec<u32> {
        let lower = text.to_lowercase();
        let words: Vec<&str> = self.tokens.find_iter(&lower).map(|m| m.as_str()).collect();
        let mut out = Vec::with_capacity(2 * words.len());
        for w in &words {
            out.push(self.hashed(w));
        }
        for w in words.windows(2) {
            out.push(bucket_of_parts(&[w[0].as_bytes(), b" ", w[1].as_bytes()], self.buckets));
        }
        out
    }
}

/// Documents shorter than this many words are never selected (the reference's `min_example_length`).
pub const MIN_WORDS: usize = 100;

/// One line of a JSONL data set.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub id: Option<String>,
    pub text: String,
    /// The whole JSON object, written back unchanged when the document is selected.
    pub line: String,
    /// The `genre` field, when there is one (used to measure how much of a label is selected).
    pub genre: Option<String>,
}

/// Parses JSONL bytes, each line an object with a string `field`. `name` goes into errors,
/// which name the line and what is wrong with it.
pub fn parse_jsonl(bytes: &[u8], field: &str, name: &str) -> Result<Vec<Document>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("{name}: not UTF-8 text ({e}); expected JSONL"))?;
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            format!(
                "{name} line {}: not JSON ({e}); expected one JSON object per line",
                i + 1
            )
        })?;
        let text = value
            .get(field)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| format!("{name} line {}: no string field `{field}`", i + 1))?;
        docs.push(Document {
            id: value.get("id").and_then(|v| v.as_str()).map(String::from),
            text: text.to_string(),
            line: line.to_string(),
            genre: value.get("genre").and_then(|v| v.as_str()).map(String::from),
        });
    }
    Ok(docs)
}

/// The number of words behind a feature list (n words give n unigrams and n - 1 bigrams),
/// as the reference's per-example length.
pub fn words(features: &[u32]) -> usize {
    features.len().div_ceil(2)
}

/// Adds a document's features to bucket counts.
pub fn count(counts: &mut [u64], features: &[u32]) {
    for &b in features {
        counts[b as usize] += 1;
    }
}

/// Normalized bucket counts.
pub fn probabilities(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts.iter().map(|&c| c as f64 / total.max(1) as f64).collect()
}

/// log(p_target + 1e-8) - log(p_raw + 1e-8) per bucket.
pub fn log_ratio(target: &[u64], raw: &[u64]) -> Vec<f64> {
    probabilities(target)
        .iter()
        .zip(probabilities(raw))
        .map(|(t, r)| (t + SMOOTHING).ln() - (r + SMOOTHING).ln())
        .collect()
}

/// A document's log importance weight.
pub fn log_weight(log_ratio: &[f64], features: &[u32]) -> f64 {
    features.iter().map(|&b| log_ratio[b as usize]).sum()
}

/// The indices of the `k` largest weights, largest first (ties by index). `None` where
/// `eligible` is false. Errors when fewer than `k` are eligible.
pub fn top_k(weights: &[f64], eligible: &[bool], k: usize) -> Result<Vec<usize>, String> {
    let mut idx: Vec<usize> = (0..weights.len()).filter(|&i| eligible[i]).collect();
    if k > idx.len() {
        return Err(format!(
            "k = {k} is more than the {} documents that pass the length filter; lower k",
            idx.len()
        ));
    }
    idx.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    idx.truncate(k);
    Ok(idx)
}

/// Sampling k without replacement with probabilities proportional to exp(log w):
/// the top k of log w + Gumbel noise drawn from `seed`.
pub fn gumbel_top_k(log_weights: &[f64], eligible: &[bool], k: usize, seed: u64) -> Result<Vec<usize>, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noisy: Vec<f64> = log_weights
        .iter()
        .map(|w| {
            let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
            w - (-u.ln()).ln()
        })
        .collect();
    top_k(&noisy, eligible, k)
}

/// k documents drawn uniformly without replacement among the eligible: the baseline.
pub fn uniform_k(eligible: &[bool], k: usize, seed: u64) -> Result<Vec<usize>, String> {
    gumbel_top_k(&vec![0.0; eligible.len()], eligible, k, seed)
}

/// KL(p || q) over buckets, with the same smoothing as the weights.
pub fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(p, _)| **p > 0.0)
        .map(|(p, q)| p * ((p + SMOOTHING).ln() - (q + SMOOTHING).ln()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_sha256_mod_n_as_big_integers() {
        // int(hashlib.sha256(b"hello").hexdigest(), 16) % 10000 == 7620 and % 7 == 2.
        assert_eq!(bucket("hello", 10_000), 7620);
        assert_eq!(bucket("hello", 7), 2);
        // The one-block path agrees with the plain digest at every length around its limit.
        for len in [0usize, 1, 31, 54, 55, 56, 64, 100] {
            let s: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let (a, b) = s.split_at(len / 2);
            for m in [1u32, 2, 7, 10_000, 65_535, 65_536, 65_537, 1 << 31] {
                assert_eq!(
                    bucket_of_parts(&[a.as_bytes(), b.as_bytes()], m),
                    bucket(&s, m),
                    "{len} mod {m}"
                );
            }
        }
    }

    #[test]
    fn tokens_follow_the_wordpunct_pattern_and_bigrams_join_with_a_space() {
        let mut f = Featurizer::new(BUCKETS);
        let text = "Don't STOP -- it's 3.5 miles!";
        let feats = f.features(text);
        // don ' t stop -- it ' s 3 . 5 miles ! : 13 tokens, 12 bigrams.
        assert_eq!(feats.len(), 25);
        assert_eq!(words(&feats), 13);
        assert_eq!(feats[0], bucket("don", BUCKETS));
        assert_eq!(feats[1], bucket("'", BUCKETS));
        assert_eq!(feats[4], bucket("--", BUCKETS));
        assert_eq!(feats[13], bucket("don '", BUCKETS));
        // The cache gives the same answers a second time.
        assert_eq!(f.features(text), feats);
    }

    #[test]
    fn weights_favour_target_like_documents_and_selections_respect_k() {
        let mut f = Featurizer::new(BUCKETS);
        let target = [
            "the court ruled on the appeal",
            "the judge and the jury heard the appeal",
        ];
        let raw = [
            "the court heard the appeal today",
            "bake the bread at two hundred degrees",
            "stir the soup",
        ];
        let mut t = vec![0u64; BUCKETS as usize];
        let mut r = vec![0u64; BUCKETS as usize];
        for d in target {
            count(&mut t, &f.features(d));
        }
        let raw_feats: Vec<Vec<u32>> = raw.iter().map(|d| f.features(d)).collect();
        for feats in &raw_feats {
            count(&mut r, feats);
        }
        let ratio = log_ratio(&t, &r);
        let w: Vec<f64> = raw_feats.iter().map(|x| log_weight(&ratio, x)).collect();
        assert!(w[0] > w[1] && w[0] > w[2], "{w:?}");
        let all = vec![true; 3];
        assert_eq!(top_k(&w, &all, 1).unwrap(), vec![0]);
        assert!(top_k(&w, &all, 4).unwrap_err().contains("lower k"));
        let mut seen = gumbel_top_k(&w, &all, 2, 7).unwrap();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 2, "without replacement");
        assert_eq!(
            gumbel_top_k(&w, &all, 2, 7).unwrap(),
            gumbel_top_k(&w, &all, 2, 7).unwrap()
        );
        let p = probabilities(&t);
        assert!(kl(&p, &p).abs() < 1e-12);
        assert!(kl(&p, &probabilities(&r)) > 0.0);
    }
}
