//! Fused training: a group of MLP or residual-MLP trials whose shapes agree
//! (see [`crate::families::train::fuse_key`]) trained as one stacked model, the
//! engine of the loop's N members (`drive`). Each member keeps its own seed (init
//! and data order), learning rate, optimizer settings and state, metrics,
//! checkpoints, rung and result; the loop makes for each the updates, evaluations
//! and checkpoints [`super::run`] would, on the same curve.

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::averaging::{swap_back, WeightAverage};
use super::drive::{again, drive, Engine};
use super::noise::{draw_estimates, smooth, NoiseEstimate};
use super::state::{progress, sidecar, Progress};
use super::tasks::classification_data;
use super::StopRule;
use crate::error::ParamError;
use crate::families::train::{NoiseScale, TrainParams};
use crate::nn::data::{Classification, DataOrder};
use crate::nn::fused::{member_accuracy, member_losses, FusedMlp, FusedOptimizer, MemberHyper};
use crate::nn::model::Mlp;
use crate::trial::{TrialContext, TrialError};

/// Runs `params[i]` with `ctxs[i]` for every member, as one fused model; returns each
/// member's result. Members whose parameters don't fit the group (the caller groups
/// by fusion key, so only a bad parameter set) fail alone.
pub fn run_fused(params: &[Value], ctxs: &mut [TrialContext<'_>]) -> Vec<Result<(), TrialError>> {
    let rules = params.iter().map(|_| None).collect();
    let mut ctxs: Vec<&mut TrialContext<'_>> = ctxs.iter_mut().collect();
    run_fused_until(params, &mut ctxs, rules)
        .into_iter()
        .map(|r| r.map(|_| ()))
        .collect()
}

/// A member's result: the evaluations its stop rule saw, or its error.
type Curve = Result<Vec<(u64, f64)>, TrialError>;

/// [`run_fused`] with each member's stop rule (see [`super::run_until`]); returns each
/// member's result and the evaluations its rule saw.
pub fn run_fused_until(
    params: &[Value],
    ctxs: &mut [&mut TrialContext<'_>],
    rules: Vec<Option<StopRule<'_>>>,
) -> Vec<Curve> {
    let mut rules: Vec<Option<StopRule<'_>>> = rules;
    let mut results: Vec<Option<Curve>> = (0..params.len()).map(|_| None).collect();
    let mut group: Vec<usize> = Vec::new();
    let mut parsed: Vec<Option<TrainParams>> = Vec::new();
    for (i, value) in params.iter().enumerate() {
        let p = ParamError::deserialize::<TrainParams>(value).and_then(|p| p.check().map(|()| p));
        match p {
            Err(e) => {
                results[i] = Some(Err(e.into()));
                parsed.push(None);
            }
            Ok(p) => {
                let key = |v: &Value| super::super::fuse_key(v).map(|f| f.key);
                let fits = match (key(value), group.first()) {
                    (Err(why), _) => Err(why),
                    (Ok(_), None) => Ok(()),
                    (Ok(k), Some(&head)) if Ok(&k) == key(&params[head]).as_ref() => Ok(()),
                    (Ok(_), Some(_)) => Err("its shape differs from the group's first member's".to_string()),
                };
                match fits {
                    // A member that cannot join runs alone, after the group.
                    Err(why) => eprintln!("trial {i} of the group runs unfused: {why}"),
                    Ok(()) => group.push(i),
                }
                parsed.push(Some(p));
            }
        }
    }
    if !group.is_empty() {
        let members: Vec<TrainParams> = group.iter().map(|&i| parsed[i].clone().expect("parsed")).collect();
        // The group's contexts, apart from the rest.
        let mut member_ctxs: Vec<&mut TrialContext<'_>> = ctxs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| group.contains(i))
            .map(|(_, c)| &mut **c)
            .collect();
        let member_rules = group.iter().map(|&i| rules[i].take()).collect();
        let outcome = train_group(members, &mut member_ctxs, member_rules);
        for (slot, result) in group.iter().zip(outcome) {
            results[*slot] = Some(result);
        }
    }
    // Whoever did not join the group runs alone, as an unfused trial.
    for (i, result) in results.iter_mut().enumerate() {
        if result.is_none() {
            *result = Some(super::run_until(&params[i], ctxs[i], rules[i].take()));
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every member has a result"))
        .collect()
}

fn train_group(
    params: Vec<TrainParams>,
    ctxs: &mut [&mut TrialContext<'_>],
    rules: Vec<Option<StopRule<'_>>>,
) -> Vec<Result<Vec<(u64, f64)>, TrialError>> {
    match Fused::new(&params, ctxs[0].device) {
        Ok(mut engine) => drive(&mut engine, &params, ctxs, rules)
            .into_iter()
            .map(|(result, history)| result.map(|()| history))
            .collect(),
        // What stops the whole group (the data set can't be read) stops each member.
        Err(error) => params.iter().map(|_| Err(again(&error))).collect(),
    }
}

/// A fused group as the loop's engine.
struct Fused {
    params: Vec<TrainParams>,
    data: Classification,
    model: FusedMlp,
    optimizer: FusedOptimizer,
    average: Option<WeightAverage>,
    orders: Vec<DataOrder>,
    num_params: i64,
    device: Device,
}

impl Fused {
    fn new(params: &[TrainParams], device: Device) -> Result<Fused, TrialError> {
        let shape = &params[0];
        let data = classification_data(shape, device)?;
        let models: Vec<Mlp> = params
            .iter()
            .map(|p| {
                Mlp::new(
                    data.features,
                    p.width as i64,
                    p.depth,
                    data.classes,
                    p.model == crate::families::train::ModelKind::Resmlp,
                    p.scaling(),
                    p.seed,
                    device,
                )
            })
            .collect();
        let num_params: i64 = models[0].params.iter().map(|p| p.tensor.numel() as i64).sum();
        let model = FusedMlp::stack(&models);
        drop(models);
        let hyper = params
            .iter()
            .map(|p| {
                Ok(MemberHyper {
                    lr: p.learning_rate()?,
                    momentum: p.momentum,
                    beta1: p.beta1,
                    beta2: p.beta2,
                    weight_decay: p.weight_decay,
                })
            })
            .collect::<Result<Vec<_>, ParamError>>()?;
        let optimizer = FusedOptimizer::new(shape.optimizer, 1e-8, hyper, &model.params);
        let average = shape.ema_decay.map(|decay| WeightAverage::new(decay, &model.params));
        let orders = params
            .iter()
            .map(|p| DataOrder::new(p.seed, data.train_len(), p.batch_size as usize))
            .collect();
        Ok(Fused {
            params: params.to_vec(),
            data,
            model,
            optimizer,
            average,
            orders,
            num_params,
            device,
        })
    }

    fn n(&self) -> i64 {
        self.params.len() as i64
    }
}

impl Engine for Fused {
    fn num_params(&self) -> i64 {
        self.num_params
    }

    fn step(&mut self, step: u64, active: &[bool], _record: Option<&mut Vec<f64>>) -> Result<Vec<f64>, TrialError> {
        let (n, device, data) = (self.n(), self.device, &self.data);
        let shape = &self.params[0];
        for p in &mut self.model.params {
            p.tensor.zero_grad();
        }
        let idx: Vec<i64> = self.orders.iter_mut().flat_map(|o| o.batch_indices(step)).collect();
        let idx = Tensor::from_slice(&idx).to_device(device);
        let batch = shape.batch_size as i64;
        let xs = data.train_x.index_select(0, &idx).view([n, batch, data.features]);
        let ys = data.train_y.index_select(0, &idx).view([n, batch]);
        let losses = member_losses(&self.model.forward(&xs), &ys);
        let total = if active.iter().all(|&a| a) {
            losses.sum(Kind::Float)
        } else {
            let mask: Vec<f32> = active.iter().map(|&a| f32::from(u8::from(a))).collect();
            (&losses * Tensor::from_slice(&mask).to_device(device)).sum(Kind::Float)
        };
        total.backward();
        self.optimizer.step(&self.model.params, shape.lr_factor(step), active);
        if let Some(average) = self.average.as_mut() {
            average.update_members(&self.model.params, active);
        }
        Ok(Vec::<f64>::try_from(losses.detach().to_kind(Kind::Double))?)
    }

    fn evaluate(
        &mut self,
        done: u64,
        due: &[bool],
        noise_sums: &mut [[f64; 3]],
    ) -> Result<Vec<Vec<(&'static str, f64)>>, TrialError> {
        let n = self.n();
        let mut logged: Vec<Vec<(&'static str, f64)>> = vec![Vec::new(); due.len()];
        let (loss, accuracy) = evaluate(&self.model, &self.data.eval_x, &self.data.eval_y, n)?;
        for (i, out) in logged.iter_mut().enumerate().filter(|(i, _)| due[*i]) {
            out.push(("eval_loss", loss[i]));
            out.push(("eval_accuracy", accuracy[i]));
        }
        if let Some(average) = &self.average {
            let saved = average.swap_in(&mut self.model.params, done);
            let averaged = evaluate(&self.model, &self.data.eval_x, &self.data.eval_y, n);
            swap_back(&mut self.model.params, &saved);
            let (loss, _) = averaged?;
            for (i, out) in logged.iter_mut().enumerate().filter(|(i, _)| due[*i]) {
                out.push(("eval_loss_ema", loss[i]));
            }
        }
        if let Some(noise) = self.params[0].noise_scale {
            let draws = u64::from(noise.repeats) * u64::from(noise.big / noise.small);
            let seeds: Vec<u64> = self.params.iter().map(|p| p.seed).collect();
            let estimates = measure_noise(&mut self.model, &self.data, &seeds, noise, done * draws)?;
            for (i, out) in logged.iter_mut().enumerate().filter(|(i, _)| due[*i]) {
                out.extend(smooth(noise, &mut noise_sums[i], estimates[i]));
            }
        }
        Ok(logged)
    }

    fn final_losses(&mut self, members: &[usize]) -> Result<Vec<f64>, TrialError> {
        let (loss, _) = evaluate(&self.model, &self.data.train_x, &self.data.train_y, self.n())?;
        Ok(members.iter().map(|&i| loss[i]).collect())
    }

    fn save(&self, i: usize, ctx: &mut TrialContext<'_>, progress: &Progress) -> Result<(), TrialError> {
        let i64 = i as i64;
        let mut tensors = self.model.member(i64);
        tensors.extend(self.optimizer.member_state(i64, &self.model.params));
        if let Some(average) = &self.average {
            tensors.extend(average.member_state(i64, &self.model.params));
        }
        ctx.checkpoints.save(
            progress.step,
            &tensors,
            &sidecar(&self.params[i], self.optimizer.updates[i], progress),
        )
    }

    /// Puts member `i`'s newest checkpoint (its own, or a single run's) into its slice.
    fn resume(&mut self, i: usize, ctx: &mut TrialContext<'_>) -> Result<Option<Progress>, TrialError> {
        let Some(snapshot) = ctx.checkpoints.latest()? else {
            return Ok(None);
        };
        let i64 = i as i64;
        self.model
            .load_member(i64, &snapshot.tensors)
            .map_err(TrialError::Checkpoint)?;
        let updates = snapshot.sidecar["optimizer_updates"]
            .as_u64()
            .ok_or_else(|| TrialError::Checkpoint("sidecar lacks optimizer_updates".into()))?;
        self.optimizer
            .load_member(i64, &self.model.params, &snapshot.tensors, updates)
            .map_err(TrialError::Checkpoint)?;
        if let Some(average) = self.average.as_mut() {
            average.load_member(i64, &self.model.params, &snapshot.tensors)?;
        }
        Ok(Some(progress(&snapshot)))
    }
}

/// Every member's loss and accuracy on one data set (each sees all of it).
fn evaluate(model: &FusedMlp, xs: &Tensor, ys: &Tensor, n: i64) -> Result<(Vec<f64>, Vec<f64>), TrialError> {
    tch::no_grad(|| {
        let size = xs.size();
        let logits = model.forward(&xs.unsqueeze(0).expand([n, size[0], size[1]], false));
        let labels = ys.unsqueeze(0).expand([n, size[0]], false);
        let loss = member_losses(&logits, &labels).to_kind(Kind::Double);
        let accuracy = member_accuracy(&logits, &labels).to_kind(Kind::Double);
        Ok((Vec::<f64>::try_from(loss)?, Vec::<f64>::try_from(accuracy)?))
    })
}

/// The gradient-noise measurement of every member at once, as
/// [`super::noise::measure_noise`] makes it for one: each member's batches drawn from
/// its own noise stream (`seeds`), its gradients from its own slice. Returns each
/// member's estimates and leaves the gradients zeroed.
fn measure_noise(
    model: &mut FusedMlp,
    data: &Classification,
    seeds: &[u64],
    noise: NoiseScale,
    first_draw: u64,
) -> Result<Vec<NoiseEstimate>, TrialError> {
    let n = seeds.len() as i64;
    let chunks = u64::from(noise.big / noise.small);
    let mut grad_sq = vec![0.0; seeds.len()];
    let mut trace = vec![0.0; seeds.len()];
    let zero = |model: &mut FusedMlp| {
        for p in &mut model.params {
            p.tensor.zero_grad();
        }
    };
    for repeat in 0..u64::from(noise.repeats) {
        let mut sum: Option<Tensor> = None;
        let mut small_sq = Tensor::zeros([n], (Kind::Double, tch::Device::Cpu));
        for chunk in 0..chunks {
            zero(model);
            let draw = first_draw + repeat * chunks + chunk;
            let idx: Vec<i64> = seeds
                .iter()
                .flat_map(|&seed| super::tasks::sample_indices(seed, draw, noise.small as usize, data.train_len()))
                .collect();
            let idx = Tensor::from_slice(&idx).to_device(data.train_x.device());
            let xs = data
                .train_x
                .index_select(0, &idx)
                .view([n, noise.small as i64, data.features]);
            let ys = data.train_y.index_select(0, &idx).view([n, noise.small as i64]);
            member_losses(&model.forward(&xs), &ys).sum(Kind::Float).backward();
            let g = tch::no_grad(|| {
                Tensor::cat(
                    &model
                        .params
                        .iter()
                        .map(|p| p.tensor.grad().to_kind(Kind::Double).reshape([n, -1]))
                        .collect::<Vec<_>>(),
                    1,
                )
            });
            small_sq += g
                .square()
                .sum_dim_intlist(1, false, Kind::Double)
                .to_device(tch::Device::Cpu);
            sum = Some(match sum {
                Some(s) => s + g,
                None => g,
            });
        }
        let small_sq = Vec::<f64>::try_from(small_sq / chunks as f64)?;
        let big_sq = (sum.expect("at least one chunk") / chunks as f64)
            .square()
            .sum_dim_intlist(1, false, Kind::Double);
        let big_sq = Vec::<f64>::try_from(big_sq.to_device(tch::Device::Cpu))?;
        for i in 0..seeds.len() {
            let (g, t) = draw_estimates(noise, small_sq[i], big_sq[i]);
            grad_sq[i] += g;
            trace[i] += t;
        }
    }
    zero(model);
    let repeats = f64::from(noise.repeats);
    Ok(grad_sq
        .into_iter()
        .zip(trace)
        .map(|(g, t)| NoiseEstimate {
            grad_sq: g / repeats,
            trace: t / repeats,
        })
        .collect())
}
