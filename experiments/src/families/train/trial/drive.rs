//! The training loop, once for every trial: a member-indexed schedule that a single
//! trial (one member, [`super::single::Single`]) and a fused group (N members,
//! [`super::fused::Fused`]) both run. It owns what a run decides step by step: the
//! evaluation schedule, the loss tail, divergence, checkpoints and resume, pauses at a
//! rung and the stop rule. An [`Engine`] owns the model: it makes the updates, the
//! evaluations and each member's checkpoint.
//!
//! Members may start at different steps (one resumed from a checkpoint, one new): a
//! member takes part from its own step on and stops taking part when it ends
//! (finished, paused, stopped, diverged or failed); an engine leaves its slice as it was.

use std::collections::VecDeque;

use super::state::Progress;
use super::StopRule;
use crate::families::train::{Divergence, TrainParams};
use crate::trial::{TrialContext, TrialError};

/// What the loop trains, member by member.
pub(super) trait Engine {
    /// The parameters of one member's model (logged as `num_params`).
    fn num_params(&self) -> i64;
    /// Makes update `step` (0-based) of the members marked active; returns every member's
    /// loss on its batch (an inactive member's is not read). `record`: member 0's mean
    /// |output| per layer (the coordinate check).
    fn step(&mut self, step: u64, active: &[bool], record: Option<&mut Vec<f64>>) -> Result<Vec<f64>, TrialError>;
    /// The evaluations after update `done` of the members marked due, each member's in the
    /// order they are logged (an undue member's list is empty). `noise` holds each member's
    /// running gradient-noise sums, updated for the due ones.
    fn evaluate(
        &mut self,
        done: u64,
        due: &[bool],
        noise: &mut [[f64; 3]],
    ) -> Result<Vec<Vec<(&'static str, f64)>>, TrialError>;
    /// The loss over (a fixed sample of) the training set of each of `members`, at their
    /// current weights.
    fn final_losses(&mut self, members: &[usize]) -> Result<Vec<f64>, TrialError>;
    /// Writes member `i`'s checkpoint at `progress.step`.
    fn save(&self, i: usize, ctx: &mut TrialContext<'_>, progress: &Progress) -> Result<(), TrialError>;
    /// Puts member `i`'s newest checkpoint back; `None` when it has none.
    fn resume(&mut self, i: usize, ctx: &mut TrialContext<'_>) -> Result<Option<Progress>, TrialError>;
}

/// Where one member stands.
struct Member<'r> {
    p: TrainParams,
    steps: u64,
    /// The first update it makes here (its checkpoint's step, or 0).
    start: u64,
    /// A rung inside its run (ASHA, Hyperband, PBT): evaluate and checkpoint there, then stop.
    pause_at: Option<u64>,
    tail: VecDeque<f64>,
    tail_len: usize,
    noise: [f64; 3],
    rule: Option<StopRule<'r>>,
    /// Every evaluation of its stop rule's metric so far.
    history: Vec<(u64, f64)>,
    /// Set once it ended: it makes no more updates.
    result: Option<Result<(), TrialError>>,
}

/// How a member ended, and the evaluations its stop rule saw.
pub(super) type Ended = (Result<(), TrialError>, Vec<(u64, f64)>);

/// Runs every member of `engine` (member `i` with `params[i]`, `ctxs[i]` and `rules[i]`) to
/// its end; returns each member's result and the evaluations its stop rule saw.
pub(super) fn drive<'r>(
    engine: &mut dyn Engine,
    params: &[TrainParams],
    ctxs: &mut [&mut TrialContext<'_>],
    rules: Vec<Option<StopRule<'r>>>,
) -> Vec<Ended> {
    let n = params.len();
    let mut members: Vec<Member<'r>> = Vec::with_capacity(n);
    for ((i, p), rule) in params.iter().enumerate().zip(rules) {
        let steps = p.total_steps();
        let tail_len = (steps / 10).max(1) as usize;
        let mut member = Member {
            p: p.clone(),
            steps,
            start: 0,
            pause_at: None,
            tail: VecDeque::with_capacity(tail_len),
            tail_len,
            noise: [0.0; 3],
            rule,
            history: Vec::new(),
            result: None,
        };
        match engine.resume(i, ctxs[i]) {
            Ok(Some(resumed)) => {
                (member.start, member.tail, member.noise, member.history) =
                    (resumed.step, resumed.loss_tail, resumed.noise_average, resumed.history);
            }
            Ok(None) => ctxs[i].metrics.log("num_params", 0, engine.num_params() as f64),
            // A checkpoint it can't read fails that member alone.
            Err(e) => member.result = Some(Err(e)),
        }
        member.pause_at = ctxs[i].pause_at.filter(|&at| at > member.start && at < steps);
        members.push(member);
    }
    let first = members.iter().map(|m| m.start).min().unwrap_or(0);
    let last = members.iter().map(|m| m.steps).max().unwrap_or(0);
    // Members share a shape, so they share the evaluation schedule.
    let schedule = &params[0];
    let mut next_eval = schedule.next_eval(0);
    while next_eval <= first {
        next_eval = schedule.next_eval(next_eval);
    }
    let coord_check = n == 1 && params[0].coord_check;
    for step in first..last {
        let active: Vec<bool> = members
            .iter()
            .map(|m| m.result.is_none() && m.start <= step && step < m.steps)
            .collect();
        if !active.iter().any(|&a| a) {
            if members.iter().all(|m| m.result.is_some()) {
                break;
            }
            continue;
        }
        let mut activations = Vec::new();
        let losses = match engine.step(step, &active, coord_check.then_some(&mut activations)) {
            Ok(losses) => losses,
            Err(error) => {
                fail_rest(&mut members, &error);
                break;
            }
        };
        let done = step + 1;
        for (i, m) in members.iter_mut().enumerate() {
            if !active[i] {
                continue;
            }
            if i == 0 {
                for (layer, value) in activations.iter().enumerate() {
                    ctxs[i].metrics.log(&format!("act.{layer}"), done, *value);
                }
            }
            let value = losses[i];
            if !value.is_finite() {
                // It ends here; in a group its slice is frozen and the others go on.
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
            if m.tail.len() == m.tail_len {
                m.tail.pop_front();
            }
            m.tail.push_back(value);
        }
        let live: Vec<bool> = (0..n).map(|i| active[i] && members[i].result.is_none()).collect();
        let scheduled = done == next_eval;
        if scheduled {
            next_eval = schedule.next_eval(done);
        }
        let due: Vec<bool> = (0..n)
            .map(|i| live[i] && (scheduled || done == members[i].steps || members[i].pause_at == Some(done)))
            .collect();
        let mut stopped = vec![false; n];
        if due.iter().any(|&d| d) {
            let mut noise: Vec<[f64; 3]> = members.iter().map(|m| m.noise).collect();
            let logged = match engine.evaluate(done, &due, &mut noise) {
                Ok(logged) => logged,
                Err(error) => {
                    fail_rest(&mut members, &error);
                    break;
                }
            };
            for (i, m) in members.iter_mut().enumerate() {
                if !due[i] {
                    continue;
                }
                m.noise = noise[i];
                for (name, value) in &logged[i] {
                    ctxs[i].metrics.log(name, done, *value);
                }
                ctxs[i]
                    .metrics
                    .log("train_flops", done, m.p.train_flops(engine.num_params(), done));
                if let Some(rule) = m.rule.as_mut() {
                    if let Some(&(_, value)) = logged[i].iter().find(|(name, _)| *name == rule.metric) {
                        m.history.push((done, value));
                        if done < m.steps {
                            if let Some(why) = (rule.stop)(&m.history) {
                                ctxs[i]
                                    .metrics
                                    .output("stopped_early", serde_json::json!({"step": done, "why": why}));
                                stopped[i] = true;
                            }
                        }
                    }
                }
            }
        }
        // A member the rule stopped ends at this step with its tail and final losses.
        let ending: Vec<usize> = (0..n).filter(|&i| stopped[i]).collect();
        if !ending.is_empty() {
            finish(engine, &mut members, ctxs, &ending, done);
        }
        for i in 0..n {
            let m = &members[i];
            if !live[i] || m.result.is_some() {
                continue;
            }
            let pausing = m.pause_at == Some(done);
            if !((done % m.p.checkpoint_every == 0 && done < m.steps) || pausing) {
                continue;
            }
            let progress = Progress {
                step: done,
                loss_tail: m.tail.clone(),
                noise_average: m.noise,
                history: m.history.clone(),
            };
            // A checkpoint that can't be written (the store stayed away through every
            // retry) costs only the progress it would have saved: training goes on, and
            // the next checkpoint tries again. At a rung the member resumes from it when
            // promoted, so there it must be written.
            match engine.save(i, ctxs[i], &progress) {
                Err(error) if pausing => members[i].result = Some(Err(error)),
                Err(error) => eprintln!("checkpoint at step {done} not written ({error}); training goes on"),
                Ok(()) if pausing => {
                    ctxs[i].paused = Some(done);
                    members[i].result = Some(Ok(()));
                }
                Ok(()) => {}
            }
        }
        if schedule.step_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(schedule.step_delay_ms));
        }
    }
    let finished: Vec<usize> = (0..n).filter(|&i| members[i].result.is_none()).collect();
    if !finished.is_empty() {
        finish(engine, &mut members, ctxs, &finished, last);
    }
    members
        .into_iter()
        .map(|m| (m.result.expect("every member ended"), m.history))
        .collect()
}

/// Ends `which` members at step `at` with their `train_loss_tail` and `train_loss_final`.
fn finish(
    engine: &mut dyn Engine,
    members: &mut [Member<'_>],
    ctxs: &mut [&mut TrialContext<'_>],
    which: &[usize],
    at: u64,
) {
    match engine.final_losses(which) {
        Ok(losses) => {
            for (&i, loss) in which.iter().zip(losses) {
                let m = &mut members[i];
                let end = at.min(m.steps);
                let tail_mean = m.tail.iter().sum::<f64>() / m.tail.len().max(1) as f64;
                ctxs[i].metrics.log("train_loss_tail", end, tail_mean);
                ctxs[i].metrics.log("train_loss_final", end, loss);
                m.result = Some(Ok(()));
            }
        }
        Err(error) => {
            for &i in which {
                members[i].result = Some(Err(again(&error)));
            }
        }
    }
}

/// What stops the whole engine (a data set it can't read) ends every member still going.
fn fail_rest(members: &mut [Member<'_>], error: &TrialError) {
    for m in members.iter_mut().filter(|m| m.result.is_none()) {
        m.result = Some(Err(again(error)));
    }
}

/// An error once more, for one member.
pub(super) fn again(error: &TrialError) -> TrialError {
    match error {
        TrialError::Checkpoint(t) => TrialError::Checkpoint(t.clone()),
        TrialError::Data(t) => TrialError::Data(t.clone()),
        other => TrialError::Data(other.to_string()),
    }
}
