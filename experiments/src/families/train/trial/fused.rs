//! Fused training: a group of MLP or residual-MLP trials whose shapes agree
//! (see [`crate::families::train::fuse_key`]) trained as one stacked model.
//! Each member keeps its own seed (init and data order), learning rate,
//! optimizer settings and state, metrics, checkpoints and result; the loop
//! makes for each the updates, evaluations and checkpoints [`super::run`]
//! would, on the same curve.
//!
//! Members may start at different steps (one resumed from a checkpoint, one
//! new): a member takes part from its own step on, and stops taking part when
//! it ends or diverges; its slice is then left as it was.

use std::collections::VecDeque;

use serde_json::Value;
use tch::{Kind, Tensor};

use super::averaging::{swap_back, WeightAverage};
use super::noise::{draw_estimates, smooth, NoiseEstimate};
use super::state::{progress, sidecar, Progress};
use super::tasks::classification_data;
use crate::error::ParamError;
use crate::families::train::{Divergence, TrainParams};
use crate::nn::data::DataOrder;
use crate::nn::fused::{member_accuracy, member_losses, FusedMlp, FusedOptimizer, MemberHyper};
use crate::nn::model::Mlp;
use crate::trial::{TrialContext, TrialError};

/// Where one member stands.
struct Member {
    p: TrainParams,
    order: DataOrder,
    /// The first update it makes here (its checkpoint's step, or 0).
    start: u64,
    tail: VecDeque<f64>,
    /// The running sums of the gradient-noise estimates (see `eval`).
    noise_average: [f64; 3],
    /// Set once it ended (finished, diverged or failed): it makes no more updates.
    result: Option<Result<(), TrialError>>,
}

/// Runs `params[i]` with `ctxs[i]` for every member, as one fused model; returns each
/// member's result. Members whose parameters don't fit the group (the caller groups
/// by fusion key, so only a bad parameter set) fail alone.
pub fn run_fused(params: &[Value], ctxs: &mut [TrialContext<'_>]) -> Vec<Result<(), TrialError>> {
    let mut results: Vec<Option<Result<(), TrialError>>> = (0..params.len()).map(|_| None).collect();
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
                    Ok(()) if ctxs[i].pause_at.is_some() => {}
                    Ok(()) => group.push(i),
                }
                parsed.push(Some(p));
            }
        }
    }
    if !group.is_empty() {
        let members: Vec<TrainParams> = group.iter().map(|&i| parsed[i].clone().expect("parsed")).collect();
        let mut member_ctxs: Vec<&mut TrialContext<'_>> = Vec::new();
        {
            // Borrow the group's contexts apart from the rest.
            let mut rest: &mut [TrialContext<'_>] = ctxs;
            let mut offset = 0;
            for &i in &group {
                let (_, tail) = rest.split_at_mut(i - offset);
                let (one, after) = tail.split_at_mut(1);
                member_ctxs.push(&mut one[0]);
                rest = after;
                offset = i + 1;
            }
        }
        let outcome = train_group(members, &mut member_ctxs);
        for (slot, result) in group.iter().zip(outcome) {
            results[*slot] = Some(result);
        }
    }
    // Whoever did not join the group runs alone, as an unfused trial.
    for (i, result) in results.iter_mut().enumerate() {
        if result.is_none() {
            *result = Some(super::run(&params[i], &mut ctxs[i]));
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every member has a result"))
        .collect()
}

fn train_group(params: Vec<TrainParams>, ctxs: &mut [&mut TrialContext<'_>]) -> Vec<Result<(), TrialError>> {
    match train_group_inner(&params, ctxs) {
        Ok(results) => results,
        // What stops the whole group (the data set can't be read) stops each member.
        Err(error) => params.iter().map(|_| Err(again(&error))).collect(),
    }
}

/// The group's error, once more for one member.
fn again(error: &TrialError) -> TrialError {
    match error {
        TrialError::Checkpoint(t) => TrialError::Checkpoint(t.clone()),
        TrialError::Data(t) => TrialError::Data(t.clone()),
        other => TrialError::Data(other.to_string()),
    }
}

fn train_group_inner(
    params: &[TrainParams],
    ctxs: &mut [&mut TrialContext<'_>],
) -> Result<Vec<Result<(), TrialError>>, TrialError> {
    let shape = &params[0];
    let device = ctxs[0].device;
    let data = classification_data(shape, device)?;
    let n = params.len();
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
    let full: i64 = models[0].params.iter().map(|p| p.tensor.numel() as i64).sum();
    let mut model = FusedMlp::stack(&models);
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
    let mut optimizer = FusedOptimizer::new(shape.optimizer, 1e-8, hyper, &model.params);
    let mut average = shape.ema_decay.map(|decay| WeightAverage::new(decay, &model.params));
    let steps = shape.total_steps();
    let tail_len = (steps / 10).max(1) as usize;
    let mut members: Vec<Member> = Vec::with_capacity(n);
    for (i, p) in params.iter().enumerate() {
        let mut member = Member {
            p: p.clone(),
            order: DataOrder::new(p.seed, data.train_len(), p.batch_size as usize),
            start: 0,
            tail: VecDeque::with_capacity(tail_len),
            noise_average: [0.0; 3],
            result: None,
        };
        match resume(ctxs[i], &mut model, &mut optimizer, average.as_mut(), i as i64) {
            Ok(Some(resumed)) => (member.start, member.tail, member.noise_average) = resumed,
            Ok(None) => ctxs[i].metrics.log("num_params", 0, full as f64),
            // A checkpoint it can't read fails that member alone.
            Err(e) => member.result = Some(Err(e)),
        }
        members.push(member);
    }
    let first = members.iter().map(|m| m.start).min().unwrap_or(0);
    let mut next_eval = shape.next_eval(0);
    while next_eval <= first {
        next_eval = shape.next_eval(next_eval);
    }
    let batch = shape.batch_size as i64;
    let train_y = data.train_y.shallow_clone();
    for step in first..steps {
        let active: Vec<bool> = members.iter().map(|m| m.result.is_none() && m.start <= step).collect();
        if !active.iter().any(|&a| a) {
            if members.iter().all(|m| m.result.is_some()) {
                break;
            }
            continue;
        }
        for p in &mut model.params {
            p.tensor.zero_grad();
        }
        let idx: Vec<i64> = members.iter_mut().flat_map(|m| m.order.batch_indices(step)).collect();
        let idx = Tensor::from_slice(&idx).to_device(device);
        let xs = data
            .train_x
            .index_select(0, &idx)
            .view([n as i64, batch, data.features]);
        let ys = train_y.index_select(0, &idx).view([n as i64, batch]);
        let losses = member_losses(&model.forward(&xs), &ys);
        let all = active.iter().all(|&a| a);
        let total = if all {
            losses.sum(Kind::Float)
        } else {
            let mask: Vec<f32> = active.iter().map(|&a| f32::from(u8::from(a))).collect();
            (&losses * Tensor::from_slice(&mask).to_device(device)).sum(Kind::Float)
        };
        total.backward();
        optimizer.step(&model.params, shape.lr_factor(step), &active);
        if let Some(average) = average.as_mut() {
            average.update_members(&model.params, &active);
        }
        let done = step + 1;
        let values = Vec::<f64>::try_from(losses.detach().to_kind(Kind::Double)).map_err(TrialError::Torch)?;
        for (i, m) in members.iter_mut().enumerate() {
            if !active[i] {
                continue;
            }
            let value = values[i];
            if !value.is_finite() {
                // Its slice is frozen from here on; the others go on.
                m.result = Some(if m.p.divergence == Divergence::Record {
                    ctxs[i].metrics.log("diverged", done, 1.0);
                    Ok(())
                } else {
                    Err(TrialError::Diverged {
                        step: done,
                        metric: "train_loss",
                        value,
                    })
                });
                continue;
            }
            ctxs[i].metrics.log("train_loss", done, value);
            if m.tail.len() == tail_len {
                m.tail.pop_front();
            }
            m.tail.push_back(value);
        }
        let still = |i: usize, members: &[Member]| active[i] && members[i].result.is_none();
        if done == next_eval || done == steps {
            if done == next_eval {
                next_eval = shape.next_eval(done);
            }
            let (loss, accuracy) = evaluate(&model, &data.eval_x, &data.eval_y, n as i64)?;
            for i in 0..n {
                if still(i, &members) {
                    ctxs[i].metrics.log("eval_loss", done, loss[i]);
                    ctxs[i].metrics.log("eval_accuracy", done, accuracy[i]);
                }
            }
            if let Some(average) = &average {
                let saved = average.swap_in(&mut model.params, done);
                let averaged = evaluate(&model, &data.eval_x, &data.eval_y, n as i64);
                swap_back(&mut model.params, &saved);
                let (loss, _) = averaged?;
                for i in (0..n).filter(|&i| still(i, &members)) {
                    ctxs[i].metrics.log("eval_loss_ema", done, loss[i]);
                }
            }
            if let Some(noise) = shape.noise_scale {
                let draws = u64::from(noise.repeats) * u64::from(noise.big / noise.small);
                let seeds: Vec<u64> = members.iter().map(|m| m.p.seed).collect();
                let estimates = measure_noise(&mut model, &data, &seeds, noise, done * draws)?;
                let live: Vec<usize> = (0..n).filter(|&i| still(i, &members)).collect();
                for i in live {
                    for (name, value) in smooth(noise, &mut members[i].noise_average, estimates[i]) {
                        ctxs[i].metrics.log(name, done, value);
                    }
                }
            }
        }
        if done % shape.checkpoint_every == 0 && done < steps {
            for i in 0..n {
                if still(i, &members) {
                    if let Err(error) = save(
                        ctxs[i],
                        &members[i],
                        &model,
                        &optimizer,
                        average.as_ref(),
                        i as i64,
                        done,
                    ) {
                        eprintln!("checkpoint at step {done} not written ({error}); training goes on");
                    }
                }
            }
        }
        if shape.step_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(shape.step_delay_ms));
        }
    }
    let finished: Vec<usize> = (0..n).filter(|&i| members[i].result.is_none()).collect();
    if !finished.is_empty() {
        let (final_loss, _) = evaluate(&model, &data.train_x, &data.train_y, n as i64)?;
        for &i in &finished {
            let tail = &members[i].tail;
            let tail_mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
            ctxs[i].metrics.log("train_loss_tail", steps, tail_mean);
            ctxs[i].metrics.log("train_loss_final", steps, final_loss[i]);
            members[i].result = Some(Ok(()));
        }
    }
    Ok(members
        .into_iter()
        .map(|m| m.result.expect("every member ended"))
        .collect())
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

/// Writes member `i`'s checkpoint: the tensors and sidecar a single run writes at this step.
fn save(
    ctx: &mut TrialContext<'_>,
    m: &Member,
    model: &FusedMlp,
    optimizer: &FusedOptimizer,
    average: Option<&WeightAverage>,
    i: i64,
    done: u64,
) -> Result<(), TrialError> {
    let mut tensors = model.member(i);
    tensors.extend(optimizer.member_state(i, &model.params));
    if let Some(average) = average {
        tensors.extend(average.member_state(i, &model.params));
    }
    let progress = Progress {
        step: done,
        loss_tail: m.tail.clone(),
        noise_average: m.noise_average,
        history: Vec::new(),
    };
    ctx.checkpoints
        .save(done, &tensors, &sidecar(&m.p, optimizer.updates[i as usize], &progress))
}

/// What a member resumes with beyond its tensors: its step, loss tail and noise sums.
type Resumed = (u64, VecDeque<f64>, [f64; 3]);

/// Puts member `i`'s newest checkpoint (its own, or a single run's) into its slice;
/// `None` when it has none.
fn resume(
    ctx: &mut TrialContext<'_>,
    model: &mut FusedMlp,
    optimizer: &mut FusedOptimizer,
    average: Option<&mut WeightAverage>,
    i: i64,
) -> Result<Option<Resumed>, TrialError> {
    let Some(snapshot) = ctx.checkpoints.latest()? else {
        return Ok(None);
    };
    model
        .load_member(i, &snapshot.tensors)
        .map_err(TrialError::Checkpoint)?;
    let updates = snapshot.sidecar["optimizer_updates"]
        .as_u64()
        .ok_or_else(|| TrialError::Checkpoint("sidecar lacks optimizer_updates".into()))?;
    optimizer
        .load_member(i, &model.params, &snapshot.tensors, updates)
        .map_err(TrialError::Checkpoint)?;
    if let Some(average) = average {
        average.load_member(i, &model.params, &snapshot.tensors)?;
    }
    let Progress {
        step,
        loss_tail,
        noise_average,
        ..
    } = progress(&snapshot);
    Ok(Some((step, loss_tail, noise_average)))
}

/// The gradient-noise measurement of every member at once, as
/// [`super::noise::measure_noise`] makes it for one: each member's batches drawn from
/// its own noise stream (`seeds`), its gradients from its own slice. Returns each
/// member's estimates and leaves the gradients zeroed.
fn measure_noise(
    model: &mut FusedMlp,
    data: &crate::nn::data::Classification,
    seeds: &[u64],
    noise: crate::families::train::NoiseScale,
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
