//! From spec text to the trials it stands for: parse, check the family and
//! the objective, expand the sweep with its searcher, and check every trial's
//! parameters, naming the spec field at fault. Nothing is stored here.

use ablate_schema::{Limits, Objective, SpecError, SpecFormat, SweepSpec};
use serde_json::Value;

use crate::{searcher, Family};

/// One trial a spec expands into.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTrial {
    pub params: Value,
    pub total_steps: u64,
    /// The positions of the trials it waits for (all before it).
    pub depends_on: Vec<usize>,
    /// With `fuse` in the spec: the key trials fuse under (equal keys train as one
    /// stacked model); `None` for a trial that can't fuse, or without `fuse`.
    pub fuse_key: Option<String>,
}

/// A spec that passed every check, ready to store.
pub struct Checked {
    pub spec: SweepSpec,
    pub objective: Objective,
    pub trials: Vec<PlannedTrial>,
}

/// The families a command trial (`[trial]`, the researcher's own program) may be a
/// member of: their reports read only what the program logs (the README's
/// "Command trials" lists the metrics and parameters each needs).
pub const COMMAND_FAMILIES: [&str; 3] = ["train", "mup_transfer", "critical_batch"];

/// Runs every check a spec must pass within the default limits and data roots; stores nothing.
pub fn check(text: &str, format: SpecFormat) -> Result<Checked, SpecError> {
    check_confined(text, format, &Limits::default(), &crate::nn::locations::default_roots())
}

/// Runs every check a spec must pass within `limits`, with local data
/// locations confined to `data_roots` (links that exist on this host are
/// followed; the worker checks again on its own); stores nothing. The trial
/// count is known from the domains before any trial is listed.
pub fn check_confined(
    text: &str,
    format: SpecFormat,
    limits: &Limits,
    data_roots: &[std::path::PathBuf],
) -> Result<Checked, SpecError> {
    let spec = SweepSpec::parse_within(text, format, limits)?;
    let family = Family::parse(&spec.family).map_err(|m| SpecError::new("family", m))?;
    // A command trial's program may use several GPUs (torchrun ...); a built-in family's can't.
    if let Some(gpus) = spec.resources.gpus_per_trial.filter(|&g| g > 1 && spec.trial.is_none()) {
        // A trial of a built-in family trains on its first device: the others would idle.
        return Err(SpecError::new(
            "resources.gpus_per_trial",
            format!(
                "family {}'s trials train on one device (they are not data-parallel), so {gpus} GPUs \
                 per trial would hold {} idle; drop it (or set 1)",
                family.name(),
                gpus - 1
            ),
        ));
    }
    let objective = match &spec.objective {
        // A command trial's program names its own metrics.
        Some(o) if spec.trial.is_none() && !family.metrics().contains(&o.metric.as_str()) => {
            return Err(SpecError::new(
                "objective.metric",
                format!(
                    "`{}` is not a metric of family {}; expected one of: {}",
                    o.metric,
                    family.name(),
                    family.metrics().join(", ")
                ),
            ))
        }
        Some(o) => {
            for (i, more) in o.also.iter().enumerate() {
                if spec.trial.is_none() && !family.metrics().contains(&more.metric.as_str()) {
                    return Err(SpecError::new(
                        format!("objective.also[{i}].metric"),
                        format!(
                            "`{}` is not a metric of family {}; expected one of: {}",
                            more.metric,
                            family.name(),
                            family.metrics().join(", ")
                        ),
                    ));
                }
            }
            // A built-in family's constraint must name a metric it logs.
            for (i, c) in o.parsed_constraints().iter().enumerate() {
                if spec.trial.is_none() && !family.metrics().contains(&c.name.as_str()) {
                    return Err(SpecError::new(
                        format!("objective.constraints[{i}]"),
                        format!(
                            "`{}` is not a metric of family {}; expected one of: {}",
                            c.name,
                            family.name(),
                            family.metrics().join(", ")
                        ),
                    ));
                }
            }
            o.clone()
        }
        None => {
            let (metric, goal) = family.default_objective();
            Objective {
                metric: metric.to_string(),
                goal,
                constraints: Vec::new(),
                also: Vec::new(),
            }
        }
    };
    let points: Vec<serde_json::Map<String, Value>> = searcher::expand(&spec, limits.max_trials)?
        .into_iter()
        .map(|swept| {
            let mut params: serde_json::Map<String, Value> = spec.base.clone().into_iter().collect();
            params.extend(swept);
            params
        })
        .collect();
    if let Some(command) = &spec.trial {
        if !COMMAND_FAMILIES.contains(&family.name()) {
            return Err(SpecError::new(
                "family",
                format!(
                    "family {}'s trials are ablate's own; a [trial] program can be a member of {}",
                    family.name(),
                    COMMAND_FAMILIES.join(", ")
                ),
            ));
        }
        if let Some(dir) = &command.workdir {
            crate::nn::locations::confine("trial.workdir", &dir.to_string_lossy(), data_roots, false)
                .map_err(|e| SpecError::new("trial.workdir", e.message))?;
        }
        let trials = points
            .into_iter()
            .enumerate()
            .map(|(ordinal, params)| command_trial(&spec, Value::Object(params), limits, ordinal))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Checked {
            spec,
            objective,
            trials,
        });
    }
    if spec.sweep.pauses() && !family.pauses_at_rungs() {
        let pausing: Vec<&str> = crate::Family::all()
            .filter(|f| f.pauses_at_rungs())
            .map(|f| f.name())
            .collect();
        return Err(SpecError::new(
            "sweep.searcher",
            format!(
                "the {} searcher stops trials at rungs, which family {}'s trials can't do; use it with {}",
                spec.sweep.searcher.as_str(),
                family.name(),
                pausing.join(", ")
            ),
        ));
    }
    if spec.sweep.tpe.is_some() {
        if let Some(first) = points.first() {
            // Proposals come one point at a time: the family must make one trial of each.
            plan_point(&spec, spec.swept(&Value::Object(first.clone())))?;
        }
    }
    let points = family.expand(points).map_err(|e| {
        let (path, message) = locate(&spec, &e.path, &e.message);
        SpecError::new(path, message)
    })?;
    let dependencies = family.dependencies(&points);
    if dependencies.len() != points.len() || dependencies.iter().enumerate().any(|(i, d)| d.iter().any(|&j| j >= i)) {
        return Err(SpecError::new(
            "family",
            format!(
                "family {} listed dependencies that are not of earlier trials",
                family.name()
            ),
        ));
    }
    let mut trials = Vec::new();
    for ((ordinal, params), depends_on) in points.into_iter().enumerate().zip(dependencies) {
        let params = Value::Object(params);
        let plan = family
            .check_params(&params)
            .and_then(|plan| crate::nn::locations::confine_params(&params, data_roots, true).map(|_| plan))
            .map_err(|e| {
                let (path, message) = locate(&spec, &e.path, &e.message);
                SpecError::new(path, format!("{message} (in trial {ordinal}: {params})"))
            })?;
        let steps_field = if params.get("examples").is_some() && params.get("steps").is_none() {
            "examples"
        } else {
            "steps"
        };
        limits
            .check_steps(&locate(&spec, steps_field, "").0, plan.total_steps)
            .map_err(|e| SpecError::new(e.path, format!("{} (in trial {ordinal})", e.message)))?;
        trials.push(PlannedTrial {
            fuse_key: fuse_key(&spec, family, &params),
            params,
            total_steps: plan.total_steps,
            depends_on,
        });
    }
    if spec.fuse.is_some() && !trials.is_empty() && trials.iter().all(|t| t.fuse_key.is_none()) {
        let why = family
            .fuse_key(&trials[0].params)
            .err()
            .unwrap_or_else(|| "no trial can fuse".into());
        return Err(SpecError::new(
            "fuse",
            format!("{why}; drop fuse to run these trials one by one"),
        ));
    }
    Ok(Checked {
        spec,
        objective,
        trials,
    })
}

/// A command trial of a point: its parameters as they are (the program checks them),
/// its steps from `steps` when it has one (a searcher that pauses at rungs needs it).
fn command_trial(spec: &SweepSpec, params: Value, limits: &Limits, ordinal: usize) -> Result<PlannedTrial, SpecError> {
    let total_steps = match params.get("steps") {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            let (path, _) = locate(spec, "steps", "");
            SpecError::new(
                path,
                format!("{v}: the steps of a command trial are a whole number (in trial {ordinal})"),
            )
        })?,
    };
    if spec.sweep.pauses() && total_steps == 0 {
        return Err(SpecError::new(
            "base.steps",
            format!(
                "the {} searcher stops trials at rungs of their steps: give the command trials `steps` \
                 (the program reads it from its parameters)",
                spec.sweep.searcher.as_str()
            ),
        ));
    }
    limits
        .check_steps(&locate(spec, "steps", "").0, total_steps)
        .map_err(|e| SpecError::new(e.path, format!("{} (in trial {ordinal})", e.message)))?;
    Ok(PlannedTrial {
        params,
        total_steps,
        depends_on: Vec::new(),
        fuse_key: None,
    })
}

/// A trial's fusion key when the spec asks to fuse and the trial can.
fn fuse_key(spec: &SweepSpec, family: Family, params: &Value) -> Option<String> {
    spec.fuse.and_then(|_| family.fuse_key(params).ok().map(|f| f.key))
}

/// A sweep's report from its trials' outcomes, as the coordinator and local sweeps
/// give it: the succeeded trials that miss one of the objective's constraints marked
/// `infeasible` (so no family ranks them among the succeeded), then the family's
/// report, with the swept parameters' importance and, with several objectives, the
/// Pareto front.
pub fn report(
    family: Family,
    spec: &SweepSpec,
    outcomes: &mut [crate::report::TrialOutcome],
) -> Result<crate::report::Report, crate::report::ReportError> {
    if let Some(objective) = &spec.objective {
        crate::report::mark_infeasible(outcomes, &objective.parsed_constraints());
    }
    let mut report = family.report(outcomes)?;
    crate::importance::add_to(&mut report, spec, outcomes);
    crate::pareto::add_to(&mut report, spec, outcomes);
    Ok(report)
}

/// The trial one more point of a checked spec's sweep stands for (the tpe and bohb
/// searchers' proposals): base merged with the swept values (and, where rungs stop
/// the trials, `steps` set to the whole run), checked as at submission.
pub fn plan_point(spec: &SweepSpec, swept: serde_json::Map<String, Value>) -> Result<PlannedTrial, SpecError> {
    let family = Family::parse(&spec.family).map_err(|m| SpecError::new("family", m))?;
    let mut params: serde_json::Map<String, Value> = spec.base.clone().into_iter().collect();
    params.extend(swept);
    if let Some(ladder) = spec.sweep.ladder() {
        params.insert("steps".to_string(), Value::from(ladder.max_steps));
    }
    if spec.trial.is_some() {
        return command_trial(spec, Value::Object(params), &Limits::default(), 0);
    }
    let mut points = family.expand(vec![params]).map_err(|e| {
        let (path, message) = locate(spec, &e.path, &e.message);
        SpecError::new(path, message)
    })?;
    if points.len() != 1 {
        return Err(SpecError::new(
            "sweep.searcher",
            format!(
                "the {} searcher proposes one trial at a time, but family {} makes {} trials of a point",
                spec.sweep.searcher.as_str(),
                family.name(),
                points.len()
            ),
        ));
    }
    let params = Value::Object(points.remove(0));
    let plan = family.check_params(&params).map_err(|e| {
        let (path, message) = locate(spec, &e.path, &e.message);
        SpecError::new(path, format!("{message} (in the proposed trial {params})"))
    })?;
    Ok(PlannedTrial {
        fuse_key: fuse_key(spec, family, &params),
        params,
        total_steps: plan.total_steps,
        depends_on: Vec::new(),
    })
}

/// Maps a path inside a trial's parameters to the spec field it came from.
fn locate(spec: &SweepSpec, param_path: &str, message: &str) -> (String, String) {
    let field = if param_path.is_empty() {
        // An unknown field: serde names it in the message.
        message.split('`').nth(1).unwrap_or("").to_string()
    } else {
        param_path.to_string()
    };
    if field.is_empty() {
        return ("base".to_string(), message.to_string());
    }
    let (head, rest) = match field.find(['.', '[']) {
        Some(i) => (&field[..i], &field[i..]),
        None => (field.as_str(), ""),
    };
    (format!("{}{rest}", spec.param_path(head)), message.to_string())
}

#[cfg(test)]
mod tests {
    use ablate_schema::SpecFormat;

    use super::check;

    const SPEC: &str = r#"
name = "t"
family = "train"
[base]
optimizer = "adam"
steps = 10
[sweep]
searcher = "grid"
params.log2_lr = [-8, -6]
params.width = [16, 32]
"#;

    fn err(text: &str) -> ablate_schema::SpecError {
        match check(text, SpecFormat::Toml) {
            Ok(_) => panic!("spec was accepted:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn good_spec_expands_to_the_grid() {
        let checked = check(SPEC, SpecFormat::Toml).unwrap();
        assert_eq!(checked.trials.len(), 4);
        assert_eq!(checked.trials[0].total_steps, 10);
        assert_eq!(checked.objective.metric, "eval_loss");
    }

    #[test]
    fn bad_trial_params_name_the_spec_field() {
        let e = err(&SPEC.replace("steps = 10", "steps = 10\nstepz = 3"));
        assert_eq!(e.path, "base.stepz", "{e}");
        let e = err(&SPEC.replace("params.width = [16, 32]", "params.width = [16, \"wide\"]"));
        assert_eq!(e.path, "sweep.params.width", "{e}");
        let e = err(&SPEC.replace("family = \"train\"", "family = \"alchemy\""));
        assert_eq!(e.path, "family", "{e}");
        assert!(e.message.contains("train"), "{e}");
        let e = err(&format!(
            "{SPEC}\n[objective]\nmetric = \"loss\"\ngoal = \"minimize\"\n"
        ));
        assert_eq!(e.path, "objective.metric", "{e}");
    }

    #[test]
    fn fused_trials_share_a_key_by_shape_and_unfusable_specs_are_refused() {
        let fused = SPEC.replace("family = \"train\"", "family = \"train\"\nfuse = 4");
        let checked = check(&fused, SpecFormat::Toml).unwrap();
        // Trials of one width share a key (their learning rates differ); widths don't.
        let mut by_width = std::collections::BTreeMap::<u64, Vec<&str>>::new();
        for t in &checked.trials {
            let width = t.params["width"].as_u64().unwrap();
            by_width.entry(width).or_default().push(t.fuse_key.as_deref().unwrap());
        }
        let keys: Vec<Vec<&str>> = by_width.into_values().collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().all(|k| k.len() == 2 && k[0] == k[1]), "{keys:?}");
        assert_ne!(keys[0][0], keys[1][0], "widths 16 and 32 do not fuse");
        assert!(check(SPEC, SpecFormat::Toml)
            .unwrap()
            .trials
            .iter()
            .all(|t| t.fuse_key.is_none()));
        let gpt = fused.replace("steps = 10", "steps = 10\nmodel = \"gpt\"\ndataset = \"shakespeare\"");
        let e = err(&gpt);
        assert_eq!(e.path, "fuse", "{e}");
        assert!(e.message.contains("\"gpt\" trials do not fuse yet"), "{e}");
        let e = err(&fused.replace("steps = 10", "steps = 10\nsubspace_dim = 100"));
        assert_eq!(e.path, "fuse", "{e}");
        assert!(e.message.contains("subspace_dim"), "{e}");
    }
}

#[cfg(test)]
mod shipped_specs {
    use ablate_schema::SpecFormat;

    #[test]
    fn every_spec_in_experiments_specs_passes_its_checks() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
        let mut checked = 0;
        // The specs and those of the GPU check in specs/gpu.
        let mut paths: Vec<std::path::PathBuf> = Vec::new();
        for folder in [dir.clone(), dir.join("gpu")] {
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                if path.is_file() {
                    paths.push(path);
                }
            }
        }
        assert!(paths.iter().filter(|p| p.starts_with(dir.join("gpu"))).count() >= 5);
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap();
            let spec = super::check(&text, SpecFormat::from_path(&path.to_string_lossy()))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!spec.trials.is_empty());
            checked += 1;
        }
        assert!(checked >= 6, "found only {checked} specs in {}", dir.display());
    }
}
