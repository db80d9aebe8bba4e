//! The `train` trial loop, shared by every model: a task gives the loss of a
//! step's batch and its evaluations; the loop owns the optimizer, the
//! schedule, metrics, divergence handling and checkpoint/resume.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{DatasetName, Divergence, ModelKind, NoiseScale, TrainParams};
use crate::data::{self, CharCorpus, Classification, DataOrder};
use crate::family::ParamError;
use crate::model::{Lenet, Mlp, Network, Param, Role};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::subspace::{self, Projection, Subspace};
use crate::transformer::{Gpt, GptShape};
use crate::trial::{TrialContext, TrialError};

/// A model with its data: what the loop trains.
trait Task {
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
        let mut rng = noise_rng(self.order.seed(), draw);
        let n = self.data.train_len() as i64;
        let idx: Vec<i64> = (0..size).map(|_| rng.gen_range(0..n)).collect();
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
struct PowerLaw {
    params: Vec<Param>,
    /// lambda, the variance of each input.
    spectrum: Tensor,
    teacher: Tensor,
    noise: f64,
    seed: u64,
    batch: usize,
}

/// The teacher is part of the problem, the same for every trial.
const POWER_LAW_TEACHER_SEED: u64 = 0x7eac_4e20_0000_0001;

impl PowerLaw {
    fn new(dim: i64, exponent: f64, noise: f64, seed: u64, batch: usize, device: Device) -> PowerLaw {
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

/// One measurement of the gradient noise: the unbiased estimates of |G|^2 and
/// tr(Sigma) averaged over `repeats` draws (numerators and denominators apart).
#[derive(Debug, Clone, Copy)]
struct NoiseEstimate {
    grad_sq: f64,
    trace: f64,
}

#[cfg(test)]
impl NoiseEstimate {
    fn b_simple(&self) -> f64 {
        self.trace / self.grad_sq
    }
}

/// Measures the gradient noise at the current weights (McCandlish et al. 2018, appendix A):
/// each draw takes `big / small` independent batches of `small`; their gradients give
/// |G_small|^2 (averaged) and, through their mean, |G_big|^2. `first_draw` names the draws so
/// a measurement is reproducible. Leaves the parameters' gradients zeroed.
fn measure_noise(task: &mut dyn Task, noise: NoiseScale, first_draw: u64) -> NoiseEstimate {
    let chunks = u64::from(noise.big / noise.small);
    let (small, big) = (f64::from(noise.small), f64::from(noise.big));
    let (mut grad_sq, mut trace) = (0.0, 0.0);
    for repeat in 0..u64::from(noise.repeats) {
        let mut sum: Option<Tensor> = None;
        let mut small_sq = 0.0;
        for chunk in 0..chunks {
            zero_grads(task.params_mut());
            let loss = task.sample_loss(first_draw + repeat * chunks + chunk, noise.small as usize);
            loss.backward();
            let g = tch::no_grad(|| {
                Tensor::cat(
                    &task
                        .params()
                        .iter()
                        .map(|p| p.tensor.grad().to_kind(Kind::Double).view([-1]))
                        .collect::<Vec<_>>(),
                    0,
                )
            });
            small_sq += g.square().sum(Kind::Double).double_value(&[]);
            sum = Some(match sum {
                Some(s) => s + g,
                None => g,
            });
        }
        small_sq /= chunks as f64;
        let big_sq = (sum.expect("at least one chunk") / chunks as f64)
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
        grad_sq += (big * big_sq - small * small_sq) / (big - small);
        trace += (small_sq - big_sq) / (1.0 / small - 1.0 / big);
    }
    zero_grads(task.params_mut());
    let repeats = f64::from(noise.repeats);
    NoiseEstimate {
        grad_sq: grad_sq / repeats,
        trace: trace / repeats,
    }
}

fn zero_grads(params: &mut [Param]) {
    for p in params {
        let mut grad = p.tensor.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
}

/// An exponential moving average of the weights, debiased as Adam's moments are:
/// after t updates it is a weighted mean of the t iterates.
struct WeightAverage {
    decay: f64,
    sums: Vec<Tensor>,
}

impl WeightAverage {
    fn new(decay: f64, params: &[Param]) -> WeightAverage {
        WeightAverage {
            decay,
            sums: params.iter().map(|p| p.tensor.detach().zeros_like()).collect(),
        }
    }

    fn update(&mut self, params: &[Param]) {
        tch::no_grad(|| {
            for (sum, p) in self.sums.iter_mut().zip(params) {
                let _ = sum.g_mul_scalar_(self.decay);
                let _ = sum.g_add_(&(p.tensor.detach() * (1.0 - self.decay)));
            }
        });
    }

    /// Evaluates `task` with the averaged weights after `updates` updates, then puts its own back.
    fn evaluate(&self, task: &mut dyn Task, updates: u64) -> Vec<(&'static str, f64)> {
        let debias = 1.0 - self.decay.powf(updates as f64);
        let saved: Vec<Tensor> = task.params().iter().map(|p| p.tensor.detach().copy()).collect();
        tch::no_grad(|| {
            for (p, sum) in task.params_mut().iter_mut().zip(&self.sums) {
                p.tensor.copy_(&(sum / debias));
            }
        });
        let metrics = task.evaluate();
        tch::no_grad(|| {
            for (p, s) in task.params_mut().iter_mut().zip(&saved) {
                p.tensor.copy_(s);
            }
        });
        metrics
    }

    fn state(&self, params: &[Param]) -> Vec<(String, Tensor)> {
        params
            .iter()
            .zip(&self.sums)
            .map(|(p, s)| (format!("ema.{}", p.name), s.detach()))
            .collect()
    }

    fn load(&mut self, params: &[Param], tensors: &HashMap<String, Tensor>) -> Result<(), TrialError> {
        tch::no_grad(|| {
            for (p, sum) in params.iter().zip(self.sums.iter_mut()) {
                let saved = tensors
                    .get(&format!("ema.{}", p.name))
                    .ok_or_else(|| TrialError::Checkpoint(format!("checkpoint lacks `ema.{}`", p.name)))?;
                sum.copy_(saved);
            }
            Ok(())
        })
    }
}

fn task(p: &TrainParams, device: Device) -> Result<Box<dyn Task>, TrialError> {
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
            DatasetName::Shakespeare => p.data_dir.clone().unwrap_or_else(super::shakespeare_dir),
            DatasetName::Text => p.data_dir.clone().ok_or_else(|| {
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
        let corpus = match &p.eval_dir {
            Some(eval) => data::text_dirs(&dir, eval, p.context as i64, device, super::SHAKESPEARE_HELP),
            None => data::text_dir(&dir, p.context as i64, device, super::SHAKESPEARE_HELP),
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
    let data = match p.dataset {
        DatasetName::Digits => data::digits(device),
        DatasetName::FashionMnist => data::idx_images(
            p.data_dir.as_deref().unwrap_or(super::FASHION_MNIST_DIR),
            device,
            "install them with `apt-get install dataset-fashion-mnist`, or set data_dir to a directory holding them",
        )
        .map_err(TrialError::Data)?,
        DatasetName::Mnist => data::idx_images(
            &p.data_dir.clone().unwrap_or_else(super::mnist_dir),
            device,
            super::MNIST_HELP,
        )
        .map_err(TrialError::Data)?,
        other => {
            return Err(TrialError::Params(ParamError::new(
                "dataset",
                format!("{other:?} is text: it needs model = \"gpt\""),
            )))
        }
    };
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

/// Trains for `steps` updates, resuming from the newest checkpoint.
///
/// Metrics: `train_loss` at every update (step = updates done); the task's
/// eval metrics every `eval_every` updates and at the end; at the end
/// `train_loss_tail` (mean train loss over the last 10% of updates) and
/// `train_loss_final` (loss over the training set, or a fixed sample of it).
pub fn run(params: &Value, ctx: &mut TrialContext<'_>) -> Result<(), TrialError> {
    let p: TrainParams = ParamError::deserialize(params)?;
    p.check()?;
    let mut task = task(&p, ctx.device)?;
    let full: i64 = task.params().iter().map(|p| p.tensor.numel() as i64).sum();
    let mut subspace = match p.subspace_dim {
        0 => None,
        dim => Some(subspace_for(&p, task.params(), full, dim as i64, ctx.device)?),
    };
    let config = OptimizerConfig {
        kind: p.optimizer,
        lr: p.learning_rate()?,
        momentum: p.momentum,
        beta1: p.beta1,
        beta2: p.beta2,
        eps: 1e-8,
        weight_decay: p.weight_decay,
    };
    let mut optimizer = Optimizer::new(config, trainable(task.as_ref(), &subspace));
    let steps = p.total_steps();
    let mut average = p.ema_decay.map(|decay| WeightAverage::new(decay, task.params()));
    // Running sums of the |G|^2 and tr(Sigma) estimates and of their weights.
    let mut noise_average = [0.0f64; 3];
    let tail_len = (steps / 10).max(1) as usize;
    let mut tail: VecDeque<f64> = VecDeque::with_capacity(tail_len);
    let mut start = 0u64;

    if let Some(snapshot) = ctx.checkpoints.latest()? {
        match subspace.as_mut() {
            Some(s) => restore(&mut s.z, &mut optimizer, &snapshot.tensors, &snapshot.sidecar)?,
            None => restore(task.params_mut(), &mut optimizer, &snapshot.tensors, &snapshot.sidecar)?,
        }
        if let Some(average) = average.as_mut() {
            average.load(task.params(), &snapshot.tensors)?;
        }
        if let Some(saved) = snapshot.sidecar["noise_average"].as_array() {
            for (slot, v) in noise_average.iter_mut().zip(saved) {
                *slot = v.as_f64().unwrap_or(0.0);
            }
        }
        tail = snapshot.sidecar["loss_tail"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        start = snapshot.step;
    }

    if start == 0 {
        ctx.metrics.log("num_params", 0, full as f64);
    }
    let peak_lr = optimizer.config.lr;
    let mut next_eval = p.next_eval(0);
    while next_eval <= start {
        next_eval = p.next_eval(next_eval);
    }
    for step in start..steps {
        optimizer.config.lr = peak_lr * p.lr_factor(step);
        match subspace.as_mut() {
            Some(s) => {
                optimizer.zero_grad(&mut s.z);
                s.materialize(task.params_mut());
            }
            None => optimizer.zero_grad(task.params_mut()),
        }
        let mut activations = Vec::new();
        let loss = task.batch_loss(step, p.coord_check.then_some(&mut activations));
        loss.backward();
        optimizer.step(trainable(task.as_ref(), &subspace));
        if let Some(average) = average.as_mut() {
            average.update(task.params());
        }
        let done = step + 1;
        let loss_value = loss.double_value(&[]);
        for (layer, value) in activations.iter().enumerate() {
            ctx.metrics.log(&format!("act.{layer}"), done, *value);
        }
        if !loss_value.is_finite() {
            if p.divergence == Divergence::Record {
                ctx.metrics.log("diverged", done, 1.0);
                return Ok(());
            }
            return Err(TrialError::Diverged {
                step: done,
                metric: "train_loss",
                value: loss_value,
            });
        }
        ctx.metrics.log("train_loss", done, loss_value);
        if tail.len() == tail_len {
            tail.pop_front();
        }
        tail.push_back(loss_value);
        if done == next_eval || done == steps {
            next_eval = p.next_eval(done);
            if let Some(s) = &subspace {
                tch::no_grad(|| s.materialize(task.params_mut()));
            }
            for (name, value) in task.evaluate() {
                ctx.metrics.log(name, done, value);
            }
            if let Some(average) = &average {
                for (name, value) in average.evaluate(task.as_mut(), done) {
                    if name == "eval_loss" {
                        ctx.metrics.log("eval_loss_ema", done, value);
                    }
                }
            }
            if let Some(noise) = p.noise_scale {
                let draws = u64::from(noise.repeats) * u64::from(noise.big / noise.small);
                let estimate = measure_noise(task.as_mut(), noise, done * draws);
                for (slot, v) in noise_average.iter_mut().zip([estimate.grad_sq, estimate.trace, 1.0]) {
                    *slot = noise.smoothing * *slot + v;
                }
                let [grad_sq, trace, weight] = noise_average;
                ctx.metrics.log("grad_sq_norm", done, grad_sq / weight);
                ctx.metrics.log("grad_noise_trace", done, trace / weight);
                ctx.metrics.log("b_simple", done, trace / grad_sq);
            }
        }
        if done % p.checkpoint_every == 0 && done < steps {
            let mut tensors: Vec<(String, Tensor)> = trainable(task.as_ref(), &subspace)
                .iter()
                .map(|p| (p.name.clone(), p.tensor.detach()))
                .collect();
            tensors.extend(optimizer.state_tensors(trainable(task.as_ref(), &subspace)));
            if let Some(average) = &average {
                tensors.extend(average.state(task.params()));
            }
            let sidecar = json!({
                "step": done,
                "optimizer_updates": optimizer.updates,
                "data_cursor": done * p.batch_size as u64,
                "seed": p.seed,
                "loss_tail": tail,
                "noise_average": noise_average,
            });
            ctx.checkpoints.save(done, &tensors, &sidecar)?;
        }
        if p.step_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(p.step_delay_ms));
        }
    }
    if let Some(s) = &subspace {
        tch::no_grad(|| s.materialize(task.params_mut()));
    }
    let tail_mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    ctx.metrics.log("train_loss_tail", steps, tail_mean);
    ctx.metrics.log("train_loss_final", steps, task.train_loss());
    Ok(())
}

/// What the optimizer trains: the subspace coordinates, or every parameter.
fn trainable<'a>(task: &'a dyn Task, subspace: &'a Option<Subspace>) -> &'a [Param] {
    match subspace {
        Some(s) => &s.z,
        None => task.params(),
    }
}

/// Draws the trial's projection after checking that it fits the device.
fn subspace_for(
    p: &TrainParams,
    params: &[Param],
    full: i64,
    dim: i64,
    device: Device,
) -> Result<Subspace, TrialError> {
    let needs = Projection::bytes(p.projection, full, dim);
    if let Some(free) = subspace::free_memory(device) {
        if needs as f64 > 0.8 * free as f64 {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let hint = if p.projection == super::ProjectionKind::Fastfood {
                "lower subspace_dim".to_string()
            } else {
                format!(
                    "use projection = \"fastfood\", which needs {:.3} GiB",
                    gib(Projection::bytes(super::ProjectionKind::Fastfood, full, dim))
                )
            };
            return Err(TrialError::Params(ParamError::new(
                "subspace_dim",
                format!(
                    "a {:?} projection of {full} parameters onto {dim} dimensions needs {:.2} GiB, more than the \
                     {:.2} GiB free on {device:?}; {hint}",
                    p.projection,
                    gib(needs),
                    gib(free)
                ),
            )));
        }
    }
    Ok(Subspace::new(params, p.projection, dim, p.seed, device))
}

fn restore(
    params: &mut [Param],
    optimizer: &mut Optimizer,
    tensors: &HashMap<String, Tensor>,
    sidecar: &Value,
) -> Result<(), TrialError> {
    tch::no_grad(|| {
        for param in params.iter_mut() {
            let saved = tensors
                .get(&param.name)
                .ok_or_else(|| TrialError::Checkpoint(format!("checkpoint lacks `{}`", param.name)))?;
            if saved.size() != param.tensor.size() {
                return Err(TrialError::Checkpoint(format!(
                    "`{}` has shape {:?} in the checkpoint but {:?} in the model",
                    param.name,
                    saved.size(),
                    param.tensor.size()
                )));
            }
            param.tensor.copy_(saved);
        }
        Ok(())
    })?;
    let updates = sidecar["optimizer_updates"]
        .as_u64()
        .ok_or_else(|| TrialError::Checkpoint("sidecar lacks optimizer_updates".into()))?;
    optimizer
        .load_state(params, tensors, updates)
        .map_err(TrialError::Checkpoint)
}

#[cfg(test)]
mod tests {
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
        tch::set_num_threads(1);
        let mut metrics = MemoryMetrics::default();
        let mut ctx = TrialContext {
            device: tch::Device::Cpu,
            checkpoints: store,
            metrics: &mut metrics,
            data: &mut no_data(),
        };
        let result = super::run(params, &mut ctx);
        (result, metrics)
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
        let mut task = super::PowerLaw::new(dim, exponent, noise, 3, 8, tch::Device::Cpu);
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
        let config = super::NoiseScale {
            small: 4,
            big: 64,
            repeats: 400,
            smoothing: 0.0,
        };
        let estimate = super::measure_noise(&mut task, config, 0);
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
        let digits = json!({"model": "lenet", "dataset": "digits", "optimizer": "adam", "lr": 0.002, "steps": 5});
        let err = try_train(&digits, &mut MemoryCheckpoints::default())
            .0
            .unwrap_err()
            .to_string();
        assert!(err.contains("28x28"), "{err}");
    }

    #[test]
    fn a_head_count_that_does_not_divide_the_width_is_refused() {
        let err = crate::Family::Train
            .check_params(&json!({"model": "gpt", "optimizer": "adam", "lr": 0.1, "steps": 5, "width": 30, "heads": 4}))
            .unwrap_err();
        assert_eq!(err.path, "heads");
    }

    #[test]
    fn the_provisioned_shakespeare_texts_load() {
        let dir = crate::train::shakespeare_dir();
        let corpus = crate::data::text_dir(&dir, 64, tch::Device::Cpu, crate::train::SHAKESPEARE_HELP)
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
}
