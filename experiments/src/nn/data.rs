//! Built-in data sets and the seeded data order.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// A classification data set split into train and eval tensors on one device.
pub struct Classification {
    pub train_x: Tensor,
    pub train_y: Tensor,
    pub eval_x: Tensor,
    pub eval_y: Tensor,
    pub features: i64,
    pub classes: i64,
}

impl Classification {
    pub fn train_len(&self) -> usize {
        self.train_y.size()[0] as usize
    }
}

/// The 1797 8x8 digits, pixels scaled to [0, 1]; a fixed 80/20 split.
pub fn digits(device: Device) -> Classification {
    let ds = smartcore::dataset::digits::load_dataset();
    let n = ds.num_samples;
    let f = ds.num_features;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(0x5eed_d161));
    let n_train = n * 4 / 5;
    let pick = |idx: &[usize]| {
        let mut xs = Vec::with_capacity(idx.len() * f);
        let mut ys = Vec::with_capacity(idx.len());
        for &i in idx {
            xs.extend(ds.data[i * f..(i + 1) * f].iter().map(|v| v / 16.0));
            ys.push(ds.target[i] as i64);
        }
        let x = Tensor::from_slice(&xs)
            .view([idx.len() as i64, f as i64])
            .to_device(device);
        let y = Tensor::from_slice(&ys).to_kind(Kind::Int64).to_device(device);
        (x, y)
    };
    let (train_x, train_y) = pick(&order[..n_train]);
    let (eval_x, eval_y) = pick(&order[n_train..]);
    Classification {
        train_x,
        train_y,
        eval_x,
        eval_y,
        features: f as i64,
        classes: 10,
    }
}

/// Data files read by earlier trials of this process (a warm slot's runs trial
/// after trial), decoded, keyed by what was read and the files' sizes and
/// modification times, so a changed file is read again.
mod cache {
    use std::any::Any;
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::SystemTime;

    /// Above this many bytes held, the cache starts over.
    const MAX_BYTES: usize = 4 << 30;

    type Stamp = Vec<(u64, Option<SystemTime>)>;

    #[derive(Default)]
    struct Cache {
        bytes: usize,
        entries: HashMap<String, (Stamp, Arc<dyn Any + Send + Sync>)>,
    }

    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

    fn stamp(files: &[&Path]) -> Stamp {
        files
            .iter()
            .map(|f| match std::fs::metadata(f) {
                Ok(m) => (m.len(), m.modified().ok()),
                Err(_) => (u64::MAX, None),
            })
            .collect()
    }

    /// `load()`'s value for `key` over `files`, from memory when the files are unchanged.
    pub fn get<T: Any + Send + Sync>(
        key: &str,
        files: &[&Path],
        size: impl Fn(&T) -> usize,
        load: impl FnOnce() -> Result<T, String>,
    ) -> Result<Arc<T>, String> {
        let stamp = stamp(files);
        if let Some(cache) = CACHE.lock().expect("data cache lock").as_ref() {
            if let Some((s, value)) = cache.entries.get(key) {
                if *s == stamp {
                    if let Ok(value) = value.clone().downcast::<T>() {
                        return Ok(value);
                    }
                }
            }
        }
        let value = Arc::new(load()?);
        let mut guard = CACHE.lock().expect("data cache lock");
        let cache = guard.get_or_insert_with(Cache::default);
        let bytes = size(&value);
        if cache.bytes + bytes > MAX_BYTES {
            *cache = Cache::default();
        }
        cache.bytes += bytes;
        cache.entries.insert(key.to_string(), (stamp, value.clone()));
        Ok(value)
    }
}

/// An IDX file's dimensions and data bytes.
type Idx = (Vec<usize>, Vec<u8>);

/// An IDX file, read once per process while it is unchanged.
fn read_idx(path: &std::path::Path, magic: u32) -> Result<std::sync::Arc<Idx>, String> {
    cache::get(
        &format!("idx {magic:#x} {}", path.display()),
        &[path],
        |(_, bytes): &Idx| bytes.len(),
        || read_idx_file(path, magic),
    )
}

fn read_idx_file(path: &std::path::Path, magic: u32) -> Result<Idx, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: not a gzipped IDX file ({e})", path.display()))?;
    let word = |i: usize| -> Result<usize, String> {
        bytes
            .get(4 * i..4 * i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| format!("{}: truncated IDX header", path.display()))
    };
    if word(0)? as u32 != magic {
        return Err(format!(
            "{}: IDX magic {:#x}, expected {magic:#x}",
            path.display(),
            word(0)?
        ));
    }
    let dims: Vec<usize> = (1..=(magic & 0xff) as usize).map(word).collect::<Result<_, _>>()?;
    let header = 4 * (1 + dims.len());
    let expected: usize = dims.iter().product();
    if bytes.len() != header + expected {
        return Err(format!(
            "{}: {} data bytes, expected {expected}",
            path.display(),
            bytes.len() - header
        ));
    }
    Ok((dims, bytes.split_off(header)))
}

/// An IDX image-classification set (MNIST's format): `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` in `dir`.
pub fn idx_images(dir: &str, device: Device, how_to_get: &str) -> Result<Classification, String> {
    let dir = std::path::Path::new(dir);
    let load = |split: &str| -> Result<(Tensor, Tensor, i64), String> {
        let images = dir.join(format!("{split}-images-idx3-ubyte.gz"));
        let labels = dir.join(format!("{split}-labels-idx1-ubyte.gz"));
        if !images.exists() || !labels.exists() {
            return Err(format!(
                "{} and {} are missing; {how_to_get}",
                images.display(),
                labels.display()
            ));
        }
        let image_file = read_idx(&images, 0x0803)?;
        let label_file = read_idx(&labels, 0x0801)?;
        let ((dims, pixels), (label_dims, label_bytes)) = (&*image_file, &*label_file);
        if dims[0] != label_dims[0] {
            return Err(format!("{split}: {} images but {} labels", dims[0], label_dims[0]));
        }
        let features = (dims[1] * dims[2]) as i64;
        let x = Tensor::from_slice(pixels)
            .to_kind(Kind::Float)
            .view([dims[0] as i64, features])
            / 255.0;
        let y = Tensor::from_slice(label_bytes).to_kind(Kind::Int64);
        Ok((x.to_device(device), y.to_device(device), features))
    };
    let (train_x, train_y, features) = load("train")?;
    let (eval_x, eval_y, _) = load("t10k")?;
    Ok(Classification {
        train_x,
        train_y,
        eval_x,
        eval_y,
        features,
        classes: 10,
    })
}

/// Text as byte ids, split 90/10 into train and eval.
pub struct CharCorpus {
    pub train: Tensor,
    pub eval: Tensor,
    pub vocab: i64,
    pub context: i64,
}

/// Every `.txt` file of `dir` (in name order) as one byte stream, split 90/10.
pub fn text_dir(dir: &str, context: i64, device: Device, how_to_get: &str) -> Result<CharCorpus, String> {
    let bytes = text_bytes(dir, how_to_get)?;
    let split = bytes.len() * 9 / 10;
    corpus(&bytes[..split], &bytes[split..], dir, context, device)
}

/// Trains on every `.txt` file of `train_dir` and evaluates on every one of `eval_dir`.
pub fn text_dirs(
    train_dir: &str,
    eval_dir: &str,
    context: i64,
    device: Device,
    how_to_get: &str,
) -> Result<CharCorpus, String> {
    let train = text_bytes(train_dir, how_to_get)?;
    let eval = text_bytes(eval_dir, how_to_get)?;
    if (train.len() as i64) <= context + 1 {
        return Err(format!(
            "{train_dir} holds {} bytes: too little text for a context of {context}",
            train.len()
        ));
    }
    corpus(&train, &eval, eval_dir, context, device)
}

fn corpus(train: &[u8], eval: &[u8], dir: &str, context: i64, device: Device) -> Result<CharCorpus, String> {
    if eval.len() as i64 <= context + 1 {
        return Err(format!(
            "{dir} holds {} bytes of evaluation text: too little for a context of {context}",
            eval.len()
        ));
    }
    let ids = |b: &[u8]| Tensor::from_slice(b).to_kind(Kind::Int64).to_device(device);
    Ok(CharCorpus {
        train: ids(train),
        eval: ids(eval),
        vocab: 256,
        context,
    })
}

/// Every `.txt` file of `dir` in name order, each followed by a newline; read once per process while they are unchanged.
fn text_bytes(dir: &str, how_to_get: &str) -> Result<std::sync::Arc<Vec<u8>>, String> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("text directory {dir}: {e}; {how_to_get}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no .txt files in {dir}; {how_to_get}"));
    }
    let paths: Vec<&std::path::Path> = files.iter().map(|f| f.as_path()).collect();
    cache::get(&format!("text {dir}"), &paths, Vec::len, || {
        let mut bytes = Vec::new();
        for f in &files {
            bytes.extend(std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?);
            bytes.push(b'\n');
        }
        Ok(bytes)
    })
}

/// `n` standard normal draws (Box-Muller on `rng`), the same on every device.
pub fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rand::Rng::gen::<f64>(rng);
        let u2: f64 = rand::Rng::gen::<f64>(rng);
        let r = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        out.push((r * angle.cos()) as f32);
        out.push((r * angle.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// The batch of update `step`: `batch` windows of `context` ids at offsets drawn
/// from (seed, step), and the same windows shifted by one as targets.
pub fn windows(text: &Tensor, seed: u64, step: u64, batch: i64, context: i64) -> (Tensor, Tensor) {
    let len = text.size()[0];
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ step);
    let starts: Vec<i64> = (0..batch)
        .map(|_| rand::Rng::gen_range(&mut rng, 0..len - context - 1))
        .collect();
    let device = text.device();
    let offsets = Tensor::arange(context, (Kind::Int64, device)).unsqueeze(0);
    let index = Tensor::from_slice(&starts).to_device(device).unsqueeze(1) + offsets;
    let flat = index.view([-1]);
    let x = text.index_select(0, &flat).view([batch, context]);
    let y = text.index_select(0, &(flat + 1)).view([batch, context]);
    (x, y)
}

/// The order in which training examples are visited: a fresh permutation per
/// epoch, drawn from (seed, epoch). The batch of a step depends only on the
/// seed and the step, so a resumed trial sees the same data as an unbroken one.
pub struct DataOrder {
    seed: u64,
    len: usize,
    batch: usize,
    epoch: Option<(u64, Vec<i64>)>,
}

impl DataOrder {
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn new(seed: u64, len: usize, batch: usize) -> Self {
        DataOrder {
            seed,
            len,
            batch,
            epoch: None,
        }
    }

    fn permutation(&mut self, epoch: u64) -> &[i64] {
        if self.epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut perm: Vec<i64> = (0..self.len as i64).collect();
            let stream = self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch;
            perm.shuffle(&mut ChaCha8Rng::seed_from_u64(stream));
            self.epoch = Some((epoch, perm));
        }
        &self.epoch.as_ref().expect("set above").1
    }

    /// Indices of the examples of the batch used by update `step` (0-based).
    pub fn batch_indices(&mut self, step: u64) -> Vec<i64> {
        let start = step * self.batch as u64;
        let len = self.len as u64;
        (start..start + self.batch as u64)
            .map(|pos| self.permutation(pos / len)[(pos % len) as usize])
            .collect()
    }
}
