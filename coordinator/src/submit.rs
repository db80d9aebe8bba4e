//! Turning a submitted spec into a stored experiment: every check of
//! `ablate_experiments::sweep::check`, then one transaction that stores it all.

use std::collections::HashMap;

use ablate_experiments::sweep::{check_confined, Checked};
use ablate_schema::{ExperimentId, Limits, SpecFormat, SweepSpec, TrialId};
use object_store::ObjectStoreExt;
use sqlx::PgPool;

use crate::auth::Caller;
use crate::db::{self, NewExperiment, NewTrial, Scheduling};
use crate::error::{Error, Result};

/// Checks and stores a spec; returns the new experiment's id and trial count (a tpe
/// sweep's whole budget, though it stores only its random start at once).
pub async fn submit(pool: &PgPool, text: &str, format: SpecFormat, limits: &Limits) -> Result<(ExperimentId, usize)> {
    let roots = ablate_experiments::nn::locations::default_roots();
    let submitted = submit_as(
        pool,
        &Submission {
            text,
            format,
            limits,
            data_roots: &roots,
            caller: None,
            code: None,
            objects: None,
            into: None,
        },
    )
    .await?;
    Ok((submitted.id, submitted.planned))
}

/// A command trial's packed code as it came with its spec (`ablate_schema::code`),
/// and where the coordinator keeps it.
pub struct Code<'a> {
    pub archive: &'a [u8],
    pub hash: &'a str,
}

/// A spec as a researcher submitted it.
pub struct Submission<'a> {
    pub text: &'a str,
    pub format: SpecFormat,
    pub limits: &'a Limits,
    pub data_roots: &'a [std::path::PathBuf],
    /// Who submits it (a token); `None` without auth.
    pub caller: Option<&'a Caller>,
    /// Its program's packed code, when it has some.
    pub code: Option<Code<'a>>,
    /// The object store the coordinator shares with its workers, when it has one.
    pub objects: Option<&'a crate::Objects>,
    /// Adds its points to this finished experiment instead of making a new one.
    pub into: Option<ExperimentId>,
}

/// What a submission stored.
#[derive(Debug)]
pub struct Submitted {
    pub id: ExperimentId,
    /// Its trials (a tpe sweep's whole budget); with `into`, the trials added.
    pub planned: usize,
    /// Of those, how many took a finished trial's results instead of running.
    pub reused: usize,
    /// With `into`: the spec's points the experiment held already.
    pub already_held: usize,
}

/// Checks and stores a spec: a new experiment, or new points of an existing one.
pub async fn submit_as(pool: &PgPool, s: &Submission<'_>) -> Result<Submitted> {
    let checked = check_confined(s.text, s.format, s.limits, s.data_roots)?;
    if checked.spec.checkpoints.keep != ablate_schema::Keep::All && s.objects.is_none() {
        return Err(differs(
            "checkpoints.keep",
            "this coordinator does not reach the workers' object store, so it cannot remove checkpoints: \
             start it with `ablate serve --object-store URL`, or keep all checkpoints",
        ));
    }
    if let Some(into) = s.into {
        return extend(pool, s, checked, into).await;
    }
    let code_hash = store_code(&checked.spec, s.code.as_ref(), s.objects).await?;
    let id = ExperimentId::new_random();
    let spec_json = serde_json::to_value(&checked.spec).expect("a spec always serializes");
    let hash = checked.spec.content_hash();
    let experiment = NewExperiment {
        id,
        name: &checked.spec.name,
        family: &checked.spec.family,
        spec: spec_json,
        spec_text: s.text,
        spec_hash: &hash,
        objective_metric: Some(&checked.objective.metric),
        goal: Some(checked.objective.goal.as_str()),
        max_attempts: checked.spec.max_attempts,
        submitted_by: s.caller.map(|c| c.name.as_str()),
        traceparent: ablate_schema::trace::current(),
        scheduling: Scheduling {
            code_hash,
            ..scheduling(&checked.spec)
        },
    };
    let mut tx = pool.begin().await?;
    db::insert_experiment(&mut tx, &experiment).await?;
    let wanted: Vec<usize> = (0..checked.trials.len()).collect();
    let reused = insert_trials(&mut tx, id, &experiment.scheduling, &checked, &wanted, &[], 0).await?;
    tx.commit().await?;
    if checked.spec.sweep.tpe.is_some() {
        // More slots free than the random start holds: the rest are proposed now.
        let mut conn = pool.acquire().await?;
        crate::platform::searchers::top_up(&mut conn, id).await?;
    }
    tracing::Span::current().record("experiment_id", id.to_string());
    tracing::info!(experiment = %id, name = %checked.spec.name, trials = checked.trials.len(), reused, "experiment submitted");
    // A tpe sweep holds its random start now and the rest as trials finish: its count is its budget.
    let planned = checked
        .spec
        .sweep
        .tpe
        .as_ref()
        .map_or(checked.trials.len(), |t| t.trials as usize);
    Ok(Submitted {
        id,
        planned,
        reused,
        already_held: 0,
    })
}

/// Stores the checked spec's trials at positions `wanted` under `experiment`, from
/// ordinal `first`; `held` maps the spec's other positions to trials the experiment
/// holds already (what the new ones may wait for). With `reuse`, a trial whose
/// configuration a succeeded one of another experiment has takes its results instead
/// of running. Returns how many did.
async fn insert_trials(
    tx: &mut sqlx::PgConnection,
    experiment: ExperimentId,
    scheduling: &Scheduling,
    checked: &Checked,
    wanted: &[usize],
    held: &[(usize, TrialId)],
    first: usize,
) -> Result<usize> {
    let spec = &checked.spec;
    let mut ids: HashMap<usize, TrialId> = held.iter().copied().collect();
    for &i in wanted {
        ids.insert(i, TrialId::new_random());
    }
    let reused = if spec.reuse {
        let params: Vec<serde_json::Value> = wanted.iter().map(|&i| checked.trials[i].params.clone()).collect();
        let config = db::Configuration {
            family: &spec.family,
            command: scheduling.command.as_ref(),
            code_hash: scheduling.code_hash.as_deref(),
            ablate_version: env!("CARGO_PKG_VERSION"),
        };
        db::reusable(tx, &config, experiment, &params).await?
    } else {
        HashMap::new()
    };
    let ladder = spec.sweep.ladder();
    let trials: Vec<NewTrial> = wanted
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let t = &checked.trials[i];
            let ordinal = first + k;
            let bracket = ladder.map(|l| l.bracket_of(ordinal));
            NewTrial {
                id: ids[&i],
                ordinal: ordinal as i32,
                depends_on: t.depends_on.iter().map(|d| ids[d]).collect(),
                fuse_key: t.fuse_key.clone(),
                params: t.params.clone(),
                total_steps: t.total_steps as i64,
                bracket: bracket.map(|b| b as i32),
                pause_at: match &spec.sweep.pbt {
                    // A population stops at every generation's step.
                    Some(pbt) => (pbt.interval < t.total_steps).then_some(pbt.interval as i64),
                    None => ladder
                        .zip(bracket)
                        .and_then(|(l, b)| l.rung_after(b, 0))
                        .map(|s| s as i64),
                },
                reused_from: reused.get(&k).copied(),
            }
        })
        .collect();
    db::insert_trials(tx, experiment, &trials).await?;
    Ok(reused.len())
}

/// `ablate submit --into EXP`: the spec's points the experiment does not hold yet,
/// added to it. Its base must agree with the experiment's (the refusal names the
/// first field that does not), and the experiment must have ended.
async fn extend(pool: &PgPool, s: &Submission<'_>, checked: Checked, id: ExperimentId) -> Result<Submitted> {
    crate::platform::experiments::authorize(pool, s.caller, id, "extend").await?;
    let mut tx = pool.begin().await?;
    // Searchers take their lock first; then the row (the order every searcher keeps).
    db::lock_experiment(&mut tx, id.0).await?;
    let held = db::hold(&mut tx, id).await?;
    held.refuse_running(id, "extend")?;
    let before = db::stored_spec(held.spec.clone())?;
    agree(&before, &checked.spec)?;
    // The code is named by its hash: the same code, or a refusal.
    let code_hash = s
        .code
        .as_ref()
        .filter(|c| !c.archive.is_empty())
        .map(|c| c.hash.to_string());
    if code_hash != held.code_hash {
        return Err(differs(
            "trial.code",
            "the packed code differs from the code the experiment's trials ran; \
             submit the changed code as a new experiment",
        ));
    }
    let scheduling = Scheduling {
        code_hash,
        ..scheduling(&checked.spec)
    };
    let existing = db::trial_params(&mut tx, id).await?;
    let by_params: HashMap<String, TrialId> = existing.iter().map(|(t, p)| (canonical(p), *t)).collect();
    let mut wanted = Vec::new();
    let mut present = Vec::new();
    for (i, t) in checked.trials.iter().enumerate() {
        match by_params.get(&canonical(&t.params)) {
            Some(&trial) => present.push((i, trial)),
            None => wanted.push(i),
        }
    }
    let reused = insert_trials(
        &mut tx,
        id,
        &scheduling,
        &checked,
        &wanted,
        &present,
        held.total as usize,
    )
    .await?;
    let spec_json = serde_json::to_value(&checked.spec).expect("a spec always serializes");
    db::record_extension(&mut tx, id, &spec_json, s.text, &checked.spec.content_hash()).await?;
    tx.commit().await?;
    // A tpe sweep given a larger budget proposes its next trials now.
    let mut conn = pool.acquire().await?;
    let proposed = crate::platform::searchers::top_up(&mut conn, id).await?;
    tracing::info!(experiment = %id, added = wanted.len(), proposed, reused, held = present.len(), "experiment extended");
    Ok(Submitted {
        id,
        planned: wanted.len() + proposed,
        reused,
        already_held: present.len(),
    })
}

fn differs(field: &str, message: impl Into<String>) -> Error {
    Error::InvalidSpec(ablate_schema::SpecError::new(field, message.into()))
}

/// Refuses an extension whose base differs from the experiment's, naming the field.
fn agree(before: &SweepSpec, after: &SweepSpec) -> Result<()> {
    let show = |v: Option<&serde_json::Value>| v.map_or("nothing".to_string(), |v| v.to_string());
    let pair = |field: &str, a: String, b: String| {
        differs(
            field,
            format!("the experiment has {a} here and this spec {b}; an extension adds sweep points to the same base"),
        )
    };
    if before.family != after.family {
        return Err(pair("family", before.family.clone(), after.family.clone()));
    }
    let keys: std::collections::BTreeSet<&String> = before.base.keys().chain(after.base.keys()).collect();
    for key in keys {
        let (a, b) = (before.base.get(key), after.base.get(key));
        if a != b {
            return Err(pair(&format!("base.{key}"), show(a), show(b)));
        }
    }
    for (field, a, b) in [
        ("objective", json(&before.objective), json(&after.objective)),
        (
            "trial",
            json(&before.trial.as_ref().map(without_code)),
            json(&after.trial.as_ref().map(without_code)),
        ),
        (
            "sweep.searcher",
            json(&before.sweep.searcher.as_str()),
            json(&after.sweep.searcher.as_str()),
        ),
        ("sweep.asha", json(&before.sweep.asha), json(&after.sweep.asha)),
        (
            "sweep.hyperband",
            json(&before.sweep.hyperband),
            json(&after.sweep.hyperband),
        ),
        ("checkpoints.keep", json(&before.checkpoints), json(&after.checkpoints)),
        ("fuse", json(&before.fuse), json(&after.fuse)),
    ] {
        if a != b {
            return Err(pair(field, a.to_string(), b.to_string()));
        }
    }
    if before.sweep.pbt.is_some() || after.sweep.pbt.is_some() {
        return Err(differs(
            "sweep.pbt",
            "a PBT population is fixed when it starts; submit a new experiment for more members",
        ));
    }
    if let (Some(a), Some(b)) = (&before.sweep.tpe, &after.sweep.tpe) {
        if b.trials < a.trials {
            return Err(differs(
                "sweep.tpe.trials",
                format!(
                    "{} is below the experiment's budget of {}; an extension can only add trials",
                    b.trials, a.trials
                ),
            ));
        }
    }
    Ok(())
}

/// A command trial's table without the submitter's code folder (its hash is compared).
fn without_code(t: &ablate_schema::CommandTrial) -> ablate_schema::CommandTrial {
    ablate_schema::CommandTrial {
        code: None,
        ..t.clone()
    }
}

/// A JSON value as text with every object's keys in order, so that equal values
/// (as PostgreSQL's jsonb compares them) read the same.
fn canonical(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", serde_json::Value::from(k.as_str()), canonical(&map[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        serde_json::Value::Array(items) => format!("[{}]", items.iter().map(canonical).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// Anything that serializes, as JSON to compare.
fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
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
        keep_checkpoints: spec.checkpoints.keep.as_column(),
    }
}

/// Keeps a command trial's packed code in the object store under its hash (once for
/// every experiment that runs the same code); returns the hash. A spec whose
/// `[trial] code` came without its archive (or an archive without `code`) is refused.
async fn store_code(
    spec: &SweepSpec,
    code: Option<&Code<'_>>,
    objects: Option<&crate::Objects>,
) -> Result<Option<String>> {
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
    let Some(objects) = objects else {
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
