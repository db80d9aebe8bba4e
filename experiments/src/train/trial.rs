//! The `train` trial loop, shared by every model: a task gives the loss of a
//! step's batch and its evaluations; the loop owns the optimizer, the
//! schedule, metrics, divergence handling and checkpoint/resume.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::{DatasetName, Divergence, ModelKind, TrainParams};
use crate::data::{self, CharCorpus, Classification, DataOrder};
use crate::family::ParamError;
use crate::model::{Mlp, Param};
use crate::optim::{Optimizer, OptimizerConfig};
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
}

struct Classifier {
    model: Mlp,
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
        &self.model.params
    }
    fn params_mut(&mut self) -> &mut [Param] {
        &mut self.model.params
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
}

fn task(p: &TrainParams, device: Device) -> Result<Box<dyn Task>, TrialError> {
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
        let corpus =
            data::text_dir(&dir, p.context as i64, device, super::SHAKESPEARE_HELP).map_err(TrialError::Data)?;
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
        other => {
            return Err(TrialError::Params(ParamError::new(
                "dataset",
                format!("{other:?} is text: it needs model = \"gpt\""),
            )))
        }
    };
    let residual = p.model == ModelKind::Resmlp;
    let model = Mlp::new(
        data.features,
        p.width as i64,
        p.depth,
        data.classes,
        residual,
        p.scaling(),
        p.seed,
        device,
    );
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
    let config = OptimizerConfig {
        kind: p.optimizer,
        lr: p.learning_rate()?,
        momentum: p.momentum,
        beta1: p.beta1,
        beta2: p.beta2,
        eps: 1e-8,
        weight_decay: p.weight_decay,
    };
    let mut optimizer = Optimizer::new(config, task.params());
    let tail_len = (p.steps / 10).max(1) as usize;
    let mut tail: VecDeque<f64> = VecDeque::with_capacity(tail_len);
    let mut start = 0u64;

    if let Some(snapshot) = ctx.checkpoints.latest()? {
        restore(task.params_mut(), &mut optimizer, &snapshot.tensors, &snapshot.sidecar)?;
        tail = snapshot.sidecar["loss_tail"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        start = snapshot.step;
    }

    let peak_lr = optimizer.config.lr;
    for step in start..p.steps {
        optimizer.config.lr = peak_lr * p.lr_factor(step);
        optimizer.zero_grad(task.params_mut());
        let mut activations = Vec::new();
        let loss = task.batch_loss(step, p.coord_check.then_some(&mut activations));
        loss.backward();
        optimizer.step(task.params());
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
        if done % p.eval_every == 0 || done == p.steps {
            for (name, value) in task.evaluate() {
                ctx.metrics.log(name, done, value);
            }
        }
        if done % p.checkpoint_every == 0 && done < p.steps {
            let mut tensors: Vec<(String, Tensor)> = task
                .params()
                .iter()
                .map(|p| (p.name.clone(), p.tensor.detach()))
                .collect();
            tensors.extend(optimizer.state_tensors(task.params()));
            let sidecar = json!({
                "step": done,
                "optimizer_updates": optimizer.updates,
                "data_cursor": done * p.batch_size as u64,
                "seed": p.seed,
                "loss_tail": tail,
            });
            ctx.checkpoints.save(done, &tensors, &sidecar)?;
        }
        if p.step_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(p.step_delay_ms));
        }
    }
    let tail_mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    ctx.metrics.log("train_loss_tail", p.steps, tail_mean);
    ctx.metrics.log("train_loss_final", p.steps, task.train_loss());
    Ok(())
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

    use crate::trial::{MemoryCheckpoints, MemoryMetrics, TrialContext};

    fn train(params: &serde_json::Value, store: &mut MemoryCheckpoints) -> MemoryMetrics {
        tch::set_num_threads(1);
        let mut metrics = MemoryMetrics::default();
        let mut ctx = TrialContext {
            device: tch::Device::Cpu,
            checkpoints: store,
            metrics: &mut metrics,
        };
        super::run(params, &mut ctx).unwrap();
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
