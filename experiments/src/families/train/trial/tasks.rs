//! The tasks the loop trains: a classifier, a language model, and linear
//! regression with a power-law spectrum; `task` builds one from a trial's parameters.

use tch::{Device, Kind, Tensor};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::ParamError;
use crate::families::train::{DatasetName, ModelKind, TrainParams};
use crate::nn::data::{self, CharCorpus, Classification, DataOrder};
use crate::nn::locations;
use crate::nn::model::{Lenet, Mlp, Network, Param, Role};
use crate::nn::transformer::{Gpt, GptShape};
use crate::trial::TrialError;

/// A model with its data: what the loop trains.
pub(super) trait Task {
    fn params(&self) -> &[Param];
    fn params_mut(&mut self) -> &mut [Param];
    /// The loss on the batch of update `step` (0-based); with `record`, each layer's mean |output|.
    fn batch_loss(&mut self, step: u64, record: Option<&mut Vec<f64>>) -> Tensor;
    /// Held-out metrics, logged every `eval_every` updates.
    fn evaluate(&self) -> Vec<(&'static str, f64)>;
    /// The loss over (a fixed sample of) the training set.
    fn train_loss(&self) -> f64;
    /// The loss on `size` training examples drawn with replacement from draw
    /// `draw` of a stream of the trial's own, apart from the training order.
    fn sample_loss(&mut self, draw: u64, size: usize) -> Tensor;
}

/// Keeps the gradient-noise draws apart from every other use of a trial's seed.
const NOISE_SALT: u64 = 0x6e01_5e5c_a1e0_0001;

/// A generator for draw `draw` of the noise stream of `seed`.
fn noise_rng(seed: u64, draw: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ NOISE_SALT);
    rng.set_stream(draw);
    rng
}

/// The training examples of draw `draw` of the noise stream of `seed`: `size`, with replacement.
pub(super) fn sample_indices(seed: u64, draw: u64, size: usize, len: usize) -> Vec<i64> {
    let mut rng = noise_rng(seed, draw);
    (0..size).map(|_| rng.gen_range(0..len as i64)).collect()
}

struct Classifier {
    model: Box<dyn Network>,
    data: Classification,
    order: DataOrder,
}

fn loss_and_accuracy(logits: &Tensor, ys: &Tensor) -> (f64, f64) {
    let loss = logits.cross_entropy_for_logits(ys).double_value(&[]);
    let accuracy = logits
        .argmax(-1, false)
        .eq_tensor(ys)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    (loss, accuracy)
}

impl Task for Classifier {
    fn params(&self) -> &[Param] {
        self.model.params()
    }
    fn params_mut(&mut self) -> &mut [Param] {
        self.model.params_mut()
    }
    fn batch_loss(&mut self, step: u64, record: Option<&mut Vec<f64>>) -> Tensor {
        let idx = Tensor::from_slice(&self.order.batch_indices(step)).to_device(self.data.train_x.device());
        let xs = self.data.train_x.index_select(0, &idx);
        let ys = self.data.train_y.index_select(0, &idx);
        self.model.forward_recording(&xs, record).cross_entropy_for_logits(&ys)
    }
    fn evaluate(&self) -> Vec<(&'static str, f64)> {
        let (loss, accuracy) =
            tch::no_grad(|| loss_and_accuracy(&self.model.forward(&self.data.eval_x), &self.data.eval_y));
        vec![("eval_loss", loss), ("eval_accuracy", accuracy)]
    }
    fn train_loss(&self) -> f64 {
        tch::no_grad(|| loss_and_accuracy(&self.model.forward(&self.data.train_x), &self.data.train_y).0)
    }
    fn sample_loss(&mut self, draw: u64, size: usize) -> Tensor {
        let idx = sample_indices(self.order.seed(), draw, size, self.data.train_len());
        let idx = Tensor::from_slice(&idx).to_device(self.data.train_x.device());
        let xs = self.data.train_x.index_select(0, &idx);
        let ys = self.data.train_y.index_select(0, &idx);
        self.model.forward(&xs).cross_entropy_for_logits(&ys)
    }
}

/// Windows used for evaluation and the final train loss: fixed, so every trial sees the same.
const LM_EVAL_BATCHES: u64 = 8;
/// The seed of those fixed windows; training batches use the trial's own seed.
const LM_EVAL_SEED: u64 = u64::MAX - 7;

struct LanguageModel {
    model: Gpt,
    corpus: CharCorpus,
    seed: u64,
    batch: i64,
}

impl LanguageModel {
    fn loss_on(&self, text: &Tensor, seed: u64, step: u64) -> Tensor {
        let (x, y) = data::windows(text, seed, step, self.batch, self.corpus.context);
        let logits = self.model.forward(&x);
        logits
            .view([-1, self.corpus.vocab])
            .cross_entropy_for_logits(&y.view([-1]))
    }

    fn mean_loss(&self, text: &Tensor) -> f64 {
        tch::no_grad(|| {
            (0..LM_EVAL_BATCHES)
                .map(|i| self.loss_on(text, LM_EVAL_SEED, i).double_value(&[]))
                .sum::<f64>()
                / LM_EVAL_BATCHES as f64
        })
    }
}

impl Task for LanguageModel {
    fn params(&self) -> &[Param] {
        &self.model.params
    }
    fn params_mut(&mut self) -> &mut [Param] {
        &mut self.model.params
    }
    fn batch_loss(&mut self, step: u64, _record: Option<&mut Vec<f64>>) -> Tensor {
        self.loss_on(&self.corpus.train, self.seed, step)
    }
    fn evaluate(&self) -> Vec<(&'static str, f64)> {
        vec![("eval_loss", self.mean_loss(&self.corpus.eval))]
    }
    fn train_loss(&self) -> f64 {
        self.mean_loss(&self.corpus.train)
    }
    fn sample_loss(&mut self, draw: u64, size: usize) -> Tensor {
        let (x, y) = data::windows(
            &self.corpus.train,
            self.seed ^ NOISE_SALT,
            draw,
            size as i64,
            self.corpus.context,
        );
        self.model
            .forward(&x)
            .view([-1, self.corpus.vocab])
            .cross_entropy_for_logits(&y.view([-1]))
    }
}

/// Linear regression with a power-law spectrum: x ~ N(0, diag(lambda)), lambda_i = i^-exponent,
/// y = x.w* + noise * N(0, 1), loss 0.5 (x.w - y)^2. Fresh samples every step; the eval loss
/// is the exact expectation 0.5 (sum_i lambda_i (w_i - w*_i)^2 + noise^2).
pub(super) struct PowerLaw {
    pub(super) params: Vec<Param>,
    /// lambda, the variance of each input.
    spectrum: Tensor,
    pub(super) teacher: Tensor,
    noise: f64,
    seed: u64,
    batch: usize,
}

/// The teacher is part of the problem, the same for every trial.
const POWER_LAW_TEACHER_SEED: u64 = 0x7eac_4e20_0000_0001;

impl PowerLaw {
    pub(super) fn new(dim: i64, exponent: f64, noise: f64, seed: u64, batch: usize, device: Device) -> PowerLaw {
        let spectrum: Vec<f64> = (1..=dim).map(|i| (i as f64).powf(-exponent)).collect();
        let teacher = data::normals(&mut ChaCha8Rng::seed_from_u64(POWER_LAW_TEACHER_SEED), dim as usize);
        PowerLaw {
            params: vec![Param {
                name: "w".into(),
                tensor: Tensor::zeros([dim], (Kind::Float, device)).set_requires_grad(true),
                role: Role::InputWeight,
                lr_mult: 1.0,
            }],
            spectrum: Tensor::from_slice(&spectrum).to_kind(Kind::Float).to_device(device),
            teacher: Tensor::from_slice(&teacher).to_device(device),
            noise,
            seed,
            batch,
        }
    }

    fn loss_on(&self, rng: &mut ChaCha8Rng, size: usize) -> Tensor {
        let dim = self.spectrum.size()[0];
        let device = self.spectrum.device();
        let z = Tensor::from_slice(&data::normals(rng, size * dim as usize))
            .view([size as i64, dim])
            .to_device(device);
        let x = z * self.spectrum.sqrt();
        let eps = Tensor::from_slice(&data::normals(rng, size)).to_device(device);
        let y = x.mv(&self.teacher) + eps * self.noise;
        (x.mv(&self.params[0].tensor) - y).square().mean(Kind::Float) * 0.5
    }

    fn expected_loss(&self) -> f64 {
        tch::no_grad(|| {
            let e = &self.params[0].tensor - &self.teacher;
            0.5 * ((e.square() * &self.spectrum).sum(Kind::Double).double_value(&[]) + self.noise * self.noise)
        })
    }
}

impl Task for PowerLaw {
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }
    fn batch_loss(&mut self, step: u64, _record: Option<&mut Vec<f64>>) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(step);
        self.loss_on(&mut rng, self.batch)
    }
    fn evaluate(&self) -> Vec<(&'static str, f64)> {
        vec![("eval_loss", self.expected_loss())]
    }
    fn train_loss(&self) -> f64 {
        self.expected_loss()
    }
    fn sample_loss(&mut self, draw: u64, size: usize) -> Tensor {
        self.loss_on(&mut noise_rng(self.seed, draw), size)
    }
}

pub(super) fn task(p: &TrainParams, device: Device) -> Result<Box<dyn Task>, TrialError> {
    if p.model == ModelKind::Linear {
        return Ok(Box::new(PowerLaw::new(
            p.width as i64,
            p.spectrum_exponent,
            p.label_noise,
            p.seed,
            p.batch_size as usize,
            device,
        )));
    }
    if p.model == ModelKind::Gpt {
        let dir = match p.dataset {
            DatasetName::Shakespeare => p
                .data_dir
                .as_deref()
                .map_or_else(locations::shakespeare_dir, locations::local_path),
            DatasetName::Text => p.data_dir.as_deref().map(locations::local_path).ok_or_else(|| {
                TrialError::Params(ParamError::new(
                    "data_dir",
                    "dataset = \"text\" needs data_dir, a directory of .txt files",
                ))
            })?,
            other => {
                return Err(TrialError::Params(ParamError::new(
                    "dataset",
                    format!("model = \"gpt\" trains on text: dataset = \"shakespeare\" or \"text\", not {other:?}"),
                )))
            }
        };
        let corpus = match p.eval_dir.as_deref().map(locations::local_path) {
            Some(eval) => data::text_dirs(&dir, &eval, p.context as i64, device, locations::SHAKESPEARE_HELP),
            None => data::text_dir(&dir, p.context as i64, device, locations::SHAKESPEARE_HELP),
        }
        .map_err(TrialError::Data)?;
        let shape = GptShape {
            vocab: corpus.vocab,
            context: p.context as i64,
            d_model: p.width as i64,
            layers: p.depth,
            heads: p.heads as i64,
            base_head_dim: (p.base_width.unwrap_or(p.width) / p.heads) as i64,
        };
        return Ok(Box::new(LanguageModel {
            model: Gpt::new(shape, p.scaling(), p.seed, device),
            corpus,
            seed: p.seed,
            batch: p.batch_size as i64,
        }));
    }
    let data = classification_data(p, device)?;
    let model: Box<dyn Network> = if p.model == ModelKind::Lenet {
        if data.features != Lenet::SIDE * Lenet::SIDE {
            return Err(TrialError::Params(ParamError::new(
                "model",
                format!(
                    "lenet takes 28x28 images (dataset mnist or fashion_mnist); this data set has {} features",
                    data.features
                ),
            )));
        }
        Box::new(Lenet::new(data.classes, p.seed, device))
    } else {
        Box::new(Mlp::new(
            data.features,
            p.width as i64,
            p.depth,
            data.classes,
            p.model == ModelKind::Resmlp,
            p.scaling(),
            p.seed,
            device,
        ))
    };
    let order = DataOrder::new(p.seed, data.train_len(), p.batch_size as usize);
    Ok(Box::new(Classifier { model, data, order }))
}

/// The data set of a classifier trial (an MLP, residual MLP or LeNet).
pub(super) fn classification_data(p: &TrainParams, device: Device) -> Result<Classification, TrialError> {
    Ok(match p.dataset {
        DatasetName::Digits => data::digits(device),
        DatasetName::FashionMnist => data::idx_images(
            &p.data_dir
                .as_deref()
                .map_or_else(|| locations::FASHION_MNIST_DIR.to_string(), locations::local_path),
            device,
            "install them with `apt-get install dataset-fashion-mnist`, or set data_dir to a directory holding them",
        )
        .map_err(TrialError::Data)?,
        DatasetName::Mnist => data::idx_images(
            &p.data_dir
                .as_deref()
                .map_or_else(locations::mnist_dir, locations::local_path),
            device,
            locations::MNIST_HELP,
        )
        .map_err(TrialError::Data)?,
        other => {
            return Err(TrialError::Params(ParamError::new(
                "dataset",
                format!("{other:?} is text: it needs model = \"gpt\""),
            )))
        }
    })
}
