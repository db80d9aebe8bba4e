//! The stop rule (`cbs.stop_at_targets`): a run ends once it has what the
//! report reads of it. The target of budget D is the loss the reference batch
//! B0 reaches after D examples (at its best lr), so a reference run is done
//! once its curve covers the largest budget, and any other run once its curve
//! has reached the lowest target (the largest budget's): the first crossing of
//! every higher target came before. Steps-to-target are read off the same
//! curves, so the report's table of S(B) is the one a full run gives.
//!
//! The expansion puts the reference runs first and names where each leaves
//! its curve; every other run waits in the queue for the reference runs of
//! its model and reads their curves to set its targets.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::CbsSettings;
use crate::error::ParamError;

/// The model a run trains, as the report groups runs.
fn model_key(p: &Map<String, Value>) -> String {
    ["model", "width", "depth"]
        .map(|k| p.get(k).map_or_else(|| "-".to_string(), Value::to_string))
        .join("/")
}

fn settings(p: &Map<String, Value>) -> Option<CbsSettings> {
    serde_json::from_value(p.get("cbs")?.clone()).ok()
}

/// Reference runs first; each names where it leaves its curve, the others which curves they read.
pub fn expand(points: Vec<Map<String, Value>>) -> Result<Vec<Map<String, Value>>, ParamError> {
    let stopping = points.iter().filter_map(settings).any(|s| s.stop_at_targets);
    if !stopping {
        return Ok(points);
    }
    let is_reference = |p: &Map<String, Value>| {
        settings(p).is_some_and(|s| p.get("batch_size").and_then(Value::as_u64) == Some(u64::from(s.reference_batch)))
    };
    let (mut references, mut others): (Vec<_>, Vec<_>) = points.into_iter().partition(|p| is_reference(p));
    if references.is_empty() {
        return Err(ParamError::new(
            "cbs.stop_at_targets",
            "no run has the reference batch size, so no run sets the targets; sweep batch_size over cbs.reference_batch",
        ));
    }
    // Seeds per (model, lr): a run that is its lr's only seed may stop once it covers the budgets.
    let lr_key = |p: &Map<String, Value>| {
        format!(
            "{}|{}|{}",
            model_key(p),
            p.get("lr").map(Value::to_string).unwrap_or_default(),
            p.get("log2_lr").map(Value::to_string).unwrap_or_default()
        )
    };
    let mut seeds: BTreeMap<String, usize> = BTreeMap::new();
    for p in &references {
        *seeds.entry(lr_key(p)).or_default() += 1;
    }
    let mut published: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, p) in references.iter_mut().enumerate() {
        let key = format!("cbs/reference/{i}.json");
        published.entry(model_key(p)).or_default().push(key.clone());
        let alone = seeds[&lr_key(p)] == 1;
        if let Some(Value::Object(cbs)) = p.get_mut("cbs") {
            let largest = cbs
                .get("budgets")
                .and_then(Value::as_array)
                .and_then(|b| b.last()?.as_u64());
            let b0 = cbs.get("reference_batch").and_then(Value::as_u64).filter(|&b| b > 0);
            cbs.insert("publish".into(), json!(key));
            if let (true, Some(largest), Some(b0)) = (alone, largest, b0) {
                cbs.insert("cover_steps".into(), json!(largest.div_ceil(b0)));
            }
        }
    }
    for p in &mut others {
        let keys = published.get(&model_key(p)).cloned().unwrap_or_default();
        if keys.is_empty() {
            return Err(ParamError::new(
                "cbs.stop_at_targets",
                format!(
                    "no reference run (batch {}) trains the model {}; its targets would be unknown",
                    settings(p).map_or(0, |s| s.reference_batch),
                    model_key(p)
                ),
            ));
        }
        if let Some(Value::Object(cbs)) = p.get_mut("cbs") {
            cbs.insert("references".into(), json!(keys));
        }
    }
    references.extend(others);
    Ok(references)
}

/// Each run that reads reference curves waits for the runs that leave them.
pub fn dependencies(trials: &[Map<String, Value>]) -> Vec<Vec<usize>> {
    let published: BTreeMap<String, usize> = trials
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some((settings(t)?.publish?, i)))
        .collect();
    trials
        .iter()
        .map(|t| {
            settings(t)
                .map(|s| s.references.iter().filter_map(|k| published.get(k).copied()).collect())
                .unwrap_or_default()
        })
        .collect()
}

/// The lowest target over the budgets, from the reference curves: per budget D, the
/// loss at D/B0 examples, averaged over seeds, at the best lr.
#[cfg_attr(not(feature = "torch"), allow(dead_code))]
pub fn lowest_target(settings: &CbsSettings, curves: &[(f64, Vec<(u64, f64)>)]) -> Option<f64> {
    let mut by_lr: BTreeMap<u64, Vec<&Vec<(u64, f64)>>> = BTreeMap::new();
    for (lr, curve) in curves {
        by_lr.entry(lr.to_bits()).or_default().push(curve);
    }
    settings
        .budgets
        .iter()
        .filter_map(|&d| {
            let at = d as f64 / f64::from(settings.reference_batch);
            by_lr
                .values()
                .filter_map(|seeds| {
                    let losses: Option<Vec<f64>> = seeds.iter().map(|c| super::loss_at(c, at)).collect();
                    crate::report::mean(losses?)
                })
                .min_by(f64::total_cmp)
        })
        .min_by(f64::total_cmp)
}

/// A stop rule's test, owned: every evaluation so far to the reason to stop.
#[cfg(feature = "torch")]
pub type Stop = Box<dyn FnMut(&[(u64, f64)]) -> Option<String>>;

/// The test that ends a run under the stop rule: a reference run once its curve covers
/// the largest budget (when it is its lr's one seed), another once it reaches the lowest
/// target of its model's reference curves (read from the experiment's objects).
#[cfg(feature = "torch")]
pub fn stop_for(
    settings: &CbsSettings,
    ctx: &mut crate::trial::TrialContext<'_>,
) -> Result<Stop, crate::trial::TrialError> {
    use crate::trial::TrialError;

    if settings.publish.is_some() {
        let cover = settings.cover_steps;
        return Ok(Box::new(move |history: &[(u64, f64)]| {
            let last = history.last()?.0;
            cover
                .filter(|&c| last >= c)
                .map(|_| "its curve covers the largest budget".to_string())
        }));
    }
    let mut curves = Vec::new();
    for key in &settings.references {
        let bytes = ctx.data.get(key)?.ok_or_else(|| {
            TrialError::Data(format!(
                "the reference curve {key} is missing, though the reference runs succeeded"
            ))
        })?;
        let record: Value = serde_json::from_slice(&bytes).map_err(|e| TrialError::Data(format!("{key}: {e}")))?;
        let curve: Vec<(u64, f64)> =
            serde_json::from_value(record["curve"].clone()).map_err(|e| TrialError::Data(format!("{key}: {e}")))?;
        curves.push((record["lr"].as_f64().unwrap_or(0.0), curve));
    }
    let target = lowest_target(settings, &curves);
    Ok(Box::new(move |history: &[(u64, f64)]| {
        let (_, loss) = *history.last()?;
        target
            .filter(|&t| loss <= t)
            .map(|t| format!("reached the target of every budget (the lowest, {t:.6})"))
    }))
}

/// What a run under the stop rule leaves when it ends: a reference run, its curve (the
/// evaluations its rule saw), for the runs of its model to read.
#[cfg(feature = "torch")]
pub fn publish(
    p: &crate::families::train::TrainParams,
    settings: &CbsSettings,
    curve: &[(u64, f64)],
    ctx: &mut crate::trial::TrialContext<'_>,
) -> Result<(), crate::trial::TrialError> {
    if let Some(key) = &settings.publish {
        let record = json!({"lr": p.learning_rate()?, "seed": p.seed, "curve": curve});
        ctx.data.put(key, record.to_string().into_bytes())?;
    }
    Ok(())
}

#[cfg(feature = "torch")]
pub fn run(
    p: &crate::families::train::TrainParams,
    settings: &CbsSettings,
    train_params: &Value,
    ctx: &mut crate::trial::TrialContext<'_>,
) -> Result<(), crate::trial::TrialError> {
    use crate::families::train::{self, StopRule};

    let mut stop = stop_for(settings, ctx)?;
    let rule = StopRule {
        metric: super::LOSS,
        stop: stop.as_mut(),
    };
    let curve = train::run_until(train_params, ctx, Some(rule))?;
    publish(p, settings, &curve, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(batch: u64, lr: f64, width: u64) -> Map<String, Value> {
        json!({"model": "mlp", "width": width, "batch_size": batch, "lr": lr,
            "cbs": {"reference_batch": 4, "budgets": [40, 160], "stop_at_targets": true}})
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn reference_runs_come_first_and_the_others_wait_for_their_models_references() {
        let points = vec![
            point(8, 0.1, 16),
            point(4, 0.1, 16),
            point(4, 0.2, 16),
            point(8, 0.1, 32),
            point(4, 0.1, 32),
        ];
        let trials = expand(points).unwrap();
        let batches: Vec<u64> = trials.iter().map(|t| t["batch_size"].as_u64().unwrap()).collect();
        assert_eq!(batches, vec![4, 4, 4, 8, 8]);
        assert_eq!(trials[0]["cbs"]["cover_steps"], 40);
        let deps = dependencies(&trials);
        assert!(deps[..3].iter().all(Vec::is_empty), "{deps:?}");
        // Width 16 waits for the two width-16 references, width 32 for its one.
        assert_eq!(deps[3], vec![0, 1]);
        assert_eq!(deps[4], vec![2]);
        let without = vec![point(8, 0.1, 16)];
        assert_eq!(expand(without).unwrap_err().path, "cbs.stop_at_targets");
    }

    #[test]
    fn the_lowest_target_is_the_largest_budgets_at_the_best_lr() {
        let settings: CbsSettings =
            serde_json::from_value(json!({"reference_batch": 4, "budgets": [40, 160]})).unwrap();
        // Budgets at steps 10 and 40.
        let good = vec![(0, 4.0), (10, 2.0), (40, 1.0)];
        let bad = vec![(0, 4.0), (10, 3.0), (40, 2.0)];
        assert_eq!(lowest_target(&settings, &[(0.1, good), (0.2, bad)]), Some(1.0));
    }
}
