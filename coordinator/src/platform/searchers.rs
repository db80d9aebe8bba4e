//! The searchers' decisions: a trial's pause at its rung and the promotions it allows
//! (ASHA, Hyperband, BOHB), a PBT generation (`ablate_experiments::pbt`), the tpe and
//! bohb searchers' proposals (`ablate_experiments::tpe`, `ablate_experiments::bohb`). Each decides under the experiment's searcher
//! lock (`db::lock_experiment`) inside one transaction; the reads and writes are `db`'s.

use ablate_experiments::tpe::{self, Observation};
use ablate_schema::{ExperimentId, LeaseToken, SweepSpec, TrialId};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};

use crate::db;
use crate::error::{Error, Result};

/// What a pause decided.
#[derive(Debug, Default)]
pub struct Pause {
    /// The objective at the rung, when the trial logged it.
    pub value: Option<f64>,
    /// Trials promoted to the next rung by this pause (perhaps the paused one).
    pub promoted: Vec<TrialId>,
}

/// Records a trial that stopped at its rung with a checkpoint at `step` (fenced by its
/// lease; see `db::record_rung`), then decides what the rung allows: with ASHA or
/// Hyperband, the best `1/reduction_factor` of the trials at that rung so far (by the
/// spec's objective) not yet promoted are pending again, resuming from their checkpoint,
/// stopping at the next rung; with PBT, the generation once every member is there.
/// Repeating the same report is harmless.
pub async fn pause(
    conn: &mut PgConnection,
    trial: TrialId,
    token: LeaseToken,
    step: u64,
    provenance: Option<&Value>,
) -> Result<Pause> {
    let mut tx = conn.begin().await?;
    let Some(rung) = db::record_rung(&mut tx, trial, token, step, provenance).await? else {
        return Ok(Pause::default());
    };
    if !rung.spec.sweep.pauses() {
        return Err(Error::InvalidArgument(format!(
            "trial {trial} paused, but its sweep has no rungs"
        )));
    }
    let promoted = match rung.spec.sweep.ladder() {
        Some(ladder) => {
            let next = ladder.rung_after(rung.bracket as u32, step);
            db::promote_at_rung(&mut tx, &rung, step, ladder.reduction_factor, next).await?
        }
        // Population-based training: the member decides alone and goes on (asynchronous),
        // or the generation is decided once every member is here.
        None if rung.spec.sweep.pbt.as_ref().is_some_and(|p| p.asynchronous()) => {
            on_its_own(&mut tx, trial, &rung, step).await?
        }
        None => generation(&mut tx, rung.experiment, &rung.spec, rung.maximize, step).await?,
    };
    if rung.spec.sweep.tpe.is_some() {
        // BOHB: the slot this pause freed, less the promoted, takes new proposals now.
        top_up(&mut tx, rung.experiment).await?;
    }
    tx.commit().await?;
    Ok(Pause {
        value: rung.value,
        promoted,
    })
}

/// The swept domains a PBT member may take from a donor: all but those it keeps.
fn inherited_domains(spec: &SweepSpec, pbt: &ablate_schema::Pbt) -> Vec<(String, ablate_schema::ParamDomain)> {
    spec.domains()
        .into_iter()
        .filter(|(name, _)| !pbt.keep.contains(name))
        .collect()
}

/// A member's PBT decision as the rows it writes: the action, the donor's id and the
/// parameters it goes on with (its own; exploiting, the donor's perturbed over its own).
fn applied(
    member: &db::Member,
    decision: &ablate_experiments::pbt::Step,
    members: &[db::Member],
) -> (&'static str, Option<uuid::Uuid>, Value) {
    match decision {
        ablate_experiments::pbt::Step::Continue => ("continue", None, member.params.clone()),
        ablate_experiments::pbt::Step::Exploit { donor, params } => {
            let mut next = member.params.as_object().cloned().unwrap_or_default();
            next.extend(params.clone());
            ("exploit", Some(members[*donor].id), Value::Object(next))
        }
    }
}

/// Asynchronous PBT: `trial`, stopped at `step`, is ranked against the results there of
/// the members that have reached it (`ablate_experiments::pbt::decide`); in the
/// bottom quantile it takes the checkpoint at `step` of a top member already there,
/// with that member's hyperparameters perturbed. The decision goes into
/// `pbt_lineage` and the member alone goes on, never waiting for another.
async fn on_its_own(tx: &mut PgConnection, trial: TrialId, rung: &db::RungRecord, step: u64) -> Result<Vec<TrialId>> {
    let Some(pbt) = rung.spec.sweep.pbt.clone() else {
        return Ok(Vec::new());
    };
    let members = db::pbt_members(tx, rung.experiment, step).await?;
    let Some(me) = members.iter().position(|m| m.id == trial.0) else {
        return Ok(Vec::new());
    };
    let standings: Vec<ablate_experiments::pbt::Standing> = members
        .iter()
        .map(|m| ablate_experiments::pbt::Standing {
            params: rung.spec.swept(&m.params),
            at_step: m.at_step,
            loss: m.value.map(|v| if rung.maximize { -v } else { v }),
        })
        .collect();
    let decision = ablate_experiments::pbt::decide(
        &inherited_domains(&rung.spec, &pbt),
        &standings,
        me,
        pbt.quantile(),
        &pbt.factors(),
        pbt.seed.unwrap_or(0),
        step,
    );
    let member = &members[me];
    let (mut action, mut donor, mut params) = applied(member, &decision, &members);
    if let Some(from) = donor {
        // A donor whose checkpoint there is gone (kept checkpoints pruned) is no donor:
        // the member goes on with its own.
        let mut copy = tx.begin().await?;
        match db::pbt_exploit(&mut copy, member.id, from, step, &params).await {
            Ok(()) => copy.commit().await?,
            Err(Error::InvalidArgument(why)) => {
                copy.rollback().await?;
                tracing::warn!(trial = %trial, step, %why, "PBT member goes on with its own checkpoint");
                (action, donor, params) = ("continue", None, member.params.clone());
            }
            Err(other) => return Err(other),
        }
    }
    db::pbt_lineage(tx, rung.experiment, member, step, action, donor, &params).await?;
    db::pbt_release(tx, &[member.id], step, pbt.interval).await
}

/// Decides a PBT generation at `step` once every live member of the population has
/// stopped there: the bottom members take a top member's checkpoint and its
/// hyperparameters perturbed; every decision goes into `pbt_lineage`; then all go on
/// to the next generation. Returns the members set going, none while some are missing.
async fn generation(
    tx: &mut PgConnection,
    experiment: ExperimentId,
    spec: &SweepSpec,
    maximize: bool,
    step: u64,
) -> Result<Vec<TrialId>> {
    let Some(pbt) = spec.sweep.pbt.clone() else {
        return Ok(Vec::new());
    };
    let members = db::pbt_members(tx, experiment, step).await?;
    if members.is_empty() || members.iter().any(|m| !m.waiting) {
        return Ok(Vec::new());
    }
    let population: Vec<(serde_json::Map<String, Value>, Option<f64>)> = members
        .iter()
        .map(|m| (spec.swept(&m.params), m.value.map(|v| if maximize { -v } else { v })))
        .collect();
    let decisions = ablate_experiments::pbt::generation(
        &inherited_domains(spec, &pbt),
        &population,
        pbt.quantile(),
        &pbt.factors(),
        pbt.seed.unwrap_or(0),
        step,
    );
    for (member, decision) in members.iter().zip(&decisions) {
        let (action, donor, params) = applied(member, decision, &members);
        if let Some(donor) = donor {
            db::pbt_exploit(tx, member.id, donor, step, &params).await?;
        }
        db::pbt_lineage(tx, experiment, member, step, action, donor, &params).await?;
    }
    let ids: Vec<uuid::Uuid> = members.iter().map(|m| m.id).collect();
    db::pbt_release(tx, &ids, step, pbt.interval).await
}

/// Decides the PBT generations that wait on no one any more (a member failed for good
/// while the others waited for it): the reaper's pass.
pub async fn advance_generations(pool: &PgPool) -> Result<usize> {
    let mut advanced = 0;
    for (experiment, step) in db::pbt_generations_due(pool).await? {
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        db::lock_experiment(&mut tx, experiment.0).await?;
        let Ok((spec, maximize)) = db::spec_and_goal(&mut tx, experiment).await else {
            continue;
        };
        advanced += generation(&mut tx, experiment, &spec, maximize, step).await?.len();
        tx.commit().await?;
    }
    Ok(advanced)
}

/// Adds the trials a tpe experiment is owed (it holds `n_startup` trials at submission,
/// then as many unfinished as it may have in flight, up to `[sweep.tpe] trials`), each
/// proposed from the finished ones with the unfinished ones as constant liars; returns
/// how many. Nothing for other searchers.
pub async fn top_up(conn: &mut PgConnection, experiment: ExperimentId) -> Result<usize> {
    let mut tx = conn.begin().await?;
    db::lock_experiment(&mut tx, experiment.0).await?;
    let Some(e) = db::tpe_experiment(&mut tx, experiment).await? else {
        return Ok(0);
    };
    let Some(budget) = e.spec.sweep.tpe.clone() else {
        return Ok(0);
    };
    let owed = budget.owed(e.finished, e.total, e.in_flight);
    if owed == 0 || e.cancelled {
        return Ok(0);
    }
    if let Some(ladder) = e.spec.sweep.ladder() {
        // BOHB: tpe at the highest rung with enough results, each proposal in its bracket.
        let mut configs = db::bohb_configs(&mut tx, experiment, &e.spec, e.maximize).await?;
        let domains = e.spec.domains();
        for ordinal in e.total as usize..(e.total + owed) as usize {
            let point = ablate_experiments::bohb::propose(
                &domains,
                &configs,
                budget.seed.unwrap_or(0),
                ordinal,
                budget.multivariate(),
            );
            configs.push(ablate_experiments::bohb::Config {
                params: point.clone(),
                in_flight: true,
                results: Default::default(),
            });
            let bracket = ladder.bracket_of(ordinal);
            let mut proposal = proposal(&e.spec, ordinal, point);
            proposal.bracket = Some(bracket as i32);
            proposal.pause_at = ladder.rung_after(bracket, 0).map(|s| s as i64);
            db::insert_proposal(&mut tx, experiment, &proposal).await?;
        }
        tx.commit().await?;
        return Ok(owed as usize);
    }
    let seen = db::trials_seen(&mut tx, experiment).await?;
    // Several objectives: each finished trial's loss is its Pareto rank, ties broken
    // within a front (`pareto::scalar_losses`); else the objective's final value.
    let objectives = ablate_experiments::pareto::objectives(&e.spec);
    let several: Vec<Option<f64>> = if objectives.len() > 1 {
        let points: Vec<(usize, Vec<f64>)> = seen
            .iter()
            .enumerate()
            .filter(|(_, (_, state, _, feasible))| state == "succeeded" && *feasible)
            .filter_map(|(i, (_, _, last, _))| {
                Some((
                    i,
                    ablate_experiments::pareto::point(last.as_ref()?.as_object()?, &objectives)?,
                ))
            })
            .collect();
        let losses =
            ablate_experiments::pareto::scalar_losses(&points.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>());
        let mut by_trial = vec![None; seen.len()];
        for ((i, _), loss) in points.iter().zip(losses) {
            by_trial[*i] = Some(loss);
        }
        by_trial
    } else {
        Vec::new()
    };
    let mut history: Vec<Observation> = seen
        .into_iter()
        .enumerate()
        .filter(|(_, (_, state, _, _))| state != "cancelled")
        .map(|(i, (params, state, last, feasible))| match state.as_str() {
            // A trial in flight, and one that missed a constraint, count as the worst.
            "pending" | "running" => Observation::in_flight(e.spec.swept(&params)),
            _ if !feasible => Observation::in_flight(e.spec.swept(&params)),
            _ if !several.is_empty() => Observation::new(e.spec.swept(&params), several[i], false),
            _ => {
                let value = last
                    .as_ref()
                    .zip(e.objective_metric.as_deref())
                    .and_then(|(last, metric)| last.get(metric)?.as_f64());
                Observation::new(
                    e.spec.swept(&params),
                    value.filter(|_| state == "succeeded"),
                    e.maximize,
                )
            }
        })
        .collect();
    let domains = e.spec.domains();
    let seed = budget.seed.unwrap_or(0);
    for ordinal in e.total..e.total + owed {
        let ordinal = ordinal as usize;
        let point = tpe::propose_after_start(
            &domains,
            &history,
            seed,
            ordinal,
            budget.multivariate(),
            budget.n_startup() as usize,
        );
        history.push(Observation::in_flight(point.clone()));
        db::insert_proposal(&mut tx, experiment, &proposal(&e.spec, ordinal, point)).await?;
    }
    tx.commit().await?;
    Ok(owed as usize)
}

/// The trial a searcher's point stands for; a point the family refuses is kept as a
/// failed trial, so the search goes on.
fn proposal(spec: &SweepSpec, ordinal: usize, point: serde_json::Map<String, Value>) -> db::Proposal {
    let (params, total_steps, error, fuse_key) = match ablate_experiments::sweep::plan_point(spec, point.clone()) {
        Ok(planned) => (planned.params, planned.total_steps, None, planned.fuse_key),
        Err(error) => (Value::Object(point), 0, Some(error.to_string()), None),
    };
    db::Proposal {
        ordinal,
        params,
        total_steps,
        error,
        fuse_key,
        bracket: None,
        pause_at: None,
    }
}

/// [`top_up`] for the experiment of `trial`, when it is a tpe experiment.
pub async fn top_up_after(conn: &mut PgConnection, trial: TrialId) -> Result<usize> {
    match db::tpe_experiment_of(conn, trial).await? {
        Some(experiment) => top_up(conn, experiment).await,
        None => Ok(0),
    }
}

/// [`top_up`] for every tpe experiment still owed trials (the reaper's pass: a trial that
/// failed for good when its lease expired finished without a completion).
pub async fn top_up_all(pool: &PgPool) -> Result<usize> {
    let mut added = 0;
    for experiment in db::tpe_experiments_owed(pool).await? {
        let mut conn = pool.acquire().await?;
        added += top_up(&mut conn, experiment).await?;
    }
    Ok(added)
}
