//! Turning a submitted spec into a stored experiment: every check of
//! `ablate_experiments::sweep::check`, then one transaction that stores it all.

use ablate_experiments::sweep::check_confined;
use ablate_schema::{ExperimentId, Limits, SpecFormat, SweepSpec, TrialId};
use object_store::ObjectStoreExt;
use sqlx::PgPool;

use crate::db::{self, NewExperiment, NewTrial, Scheduling};
use crate::error::{Error, Result};

/// Checks and stores a spec; returns the new experiment's id and trial count (a tpe
/// sweep's whole budget, though it stores only its random start at once).
pub async fn submit(pool: &PgPool, text: &str, format: SpecFormat, limits: &Limits) -> Result<(ExperimentId, usize)> {
    let roots = ablate_experiments::nn::locations::default_roots();
    submit_as(pool, text, format, limits, &roots, None, None).await
}

/// A command trial's packed code as it came with its spec (`ablate_schema::code`),
/// and where the coordinator keeps it.
pub struct Code<'a> {
    pub archive: &'a [u8],
    pub hash: &'a str,
    pub objects: Option<&'a crate::Objects>,
}

/// The same, recording who submitted it (a token's name), with its program's packed
/// code when it has some.
pub async fn submit_as(
    pool: &PgPool,
    text: &str,
    format: SpecFormat,
    limits: &Limits,
    data_roots: &[std::path::PathBuf],
    submitted_by: Option<&str>,
    code: Option<Code<'_>>,
) -> Result<(ExperimentId, usize)> {
    let checked = check_confined(text, format, limits, data_roots)?;
    let code_hash = store_code(&checked.spec, code).await?;
    let id = ExperimentId::new_random();
    let spec_json = serde_json::to_value(&checked.spec).expect("a spec always serializes");
    let hash = checked.spec.content_hash();
    let experiment = NewExperiment {
        id,
        name: &checked.spec.name,
        family: &checked.spec.family,
        spec: spec_json,
        spec_text: text,
        spec_hash: &hash,
        objective_metric: Some(&checked.objective.metric),
        goal: Some(checked.objective.goal.as_str()),
        max_attempts: checked.spec.max_attempts,
        submitted_by,
        traceparent: ablate_schema::trace::current(),
        scheduling: Scheduling {
            code_hash,
            ..scheduling(&checked.spec)
        },
    };
    let ladder = checked.spec.sweep.ladder();
    let ids: Vec<TrialId> = checked.trials.iter().map(|_| TrialId::new_random()).collect();
    let trials: Vec<NewTrial> = checked
        .trials
        .iter()
        .enumerate()
        .map(|(ordinal, t)| {
            let bracket = ladder.map(|l| l.bracket_of(ordinal));
            NewTrial {
                id: ids[ordinal],
                depends_on: t.depends_on.iter().map(|&i| ids[i]).collect(),
                fuse_key: t.fuse_key.clone(),
                params: t.params.clone(),
                total_steps: t.total_steps as i64,
                bracket: bracket.map(|b| b as i32),
                pause_at: match &checked.spec.sweep.pbt {
                    // A population stops at every generation's step.
                    Some(pbt) => (pbt.interval < t.total_steps).then_some(pbt.interval as i64),
                    None => ladder
                        .zip(bracket)
                        .and_then(|(l, b)| l.rung_after(b, 0))
                        .map(|s| s as i64),
                },
            }
        })
        .collect();
    tracing::Span::current().record("experiment_id", id.to_string());
    db::insert_experiment(pool, &experiment, &trials).await?;
    tracing::info!(experiment = %id, name = %checked.spec.name, trials = checked.trials.len(), "experiment submitted");
    // A tpe sweep holds its random start now and the rest as trials finish: its count is its budget.
    let planned = checked
        .spec
        .sweep
        .tpe
        .as_ref()
        .map_or(checked.trials.len(), |t| t.trials as usize);
    Ok((id, planned))
}

/// The spec's scheduling fields, as the queue reads them.
fn scheduling(spec: &SweepSpec) -> Scheduling {
    let r = &spec.resources;
    Scheduling {
        priority: spec.priority.unwrap_or(1.0),
        max_concurrent: r.max_concurrent.map(|n| n.min(i32::MAX as u32) as i32),
        gpus_per_trial: r.gpus_per_trial.unwrap_or(1) as i32,
        pool: r.pool.clone(),
        labels: (!r.labels.is_empty()).then(|| serde_json::to_value(&r.labels).expect("labels serialize")),
        fuse: spec.fuse.map(|f| serde_json::to_value(f).expect("fuse serializes")),
        fresh_process: r.fresh_process,
        searcher: spec.sweep.searcher.as_str(),
        command: spec
            .trial
            .as_ref()
            .map(|t| serde_json::to_value(t).expect("a command serializes")),
        code_hash: None,
    }
}

/// Keeps a command trial's packed code in the object store under its hash (once for
/// every experiment that runs the same code); returns the hash. A spec whose
/// `[trial] code` came without its archive (or an archive without `code`) is refused.
async fn store_code(spec: &SweepSpec, code: Option<Code<'_>>) -> Result<Option<String>> {
    let refuse = |message: String| Error::InvalidSpec(ablate_schema::SpecError::new("trial.code", message));
    let wants = spec.trial.as_ref().and_then(|t| t.code.as_deref());
    let code = code.filter(|c| !c.archive.is_empty());
    let (dir, code) = match (wants, code) {
        (None, None) => return Ok(None),
        (None, Some(_)) => {
            return Err(refuse(
                "packed code came with a spec whose [trial] names no `code` directory".into(),
            ))
        }
        (Some(dir), None) => {
            return Err(refuse(format!(
                "`{dir}` is a directory on the submitter's host: submit the spec with `ablate submit SPEC`, \
                 which packs it (or use `workdir` for a directory the workers share)"
            )))
        }
        (Some(dir), Some(code)) => (dir, code),
    };
    let Some(objects) = code.objects else {
        return Err(refuse(format!(
            "this coordinator keeps no objects, so it cannot keep the code of `{dir}` for its workers: \
             start it with `ablate serve --object-store URL` (the workers' store), or use `workdir`"
        )));
    };
    // The hash names the code: it must be the archive's.
    ablate_schema::code::open(code.archive, code.hash).map_err(refuse)?;
    let path = ablate_schema::objects::code_path(&objects.prefix, code.hash);
    if objects.store.head(&path).await.is_err() {
        objects
            .store
            .put(&path, code.archive.to_vec().into())
            .await
            .map_err(|e| Error::Objects(format!("keeping the code: {e}")))?;
    }
    tracing::info!(hash = %code.hash, bytes = code.archive.len(), "command trial code kept");
    Ok(Some(code.hash.to_string()))
}
