//! Metric batches: checked against the limits, names interned (cached), written
//! as one chunk per metric, fenced by the lease (`db::insert_metrics`).

use std::collections::HashMap;
use std::sync::Mutex;

use ablate_schema::Limits;
use sqlx::PgPool;

use super::lease_of;
use crate::db;
use crate::error::Error;

/// One metric batch as a worker sent it: point i is (`names[name_index[i]]`, `steps[i]`,
/// `values[i]`).
pub struct Batch<'a> {
    pub seq: u64,
    pub trial_id: &'a str,
    pub lease_token: &'a str,
    pub names: &'a [String],
    pub name_index: &'a [u32],
    pub steps: &'a [i64],
    pub values: &'a [f64],
}

/// Writes one metric batch; returns the number of points stored.
pub async fn ingest(
    pool: &PgPool,
    names: &Mutex<HashMap<String, i32>>,
    limits: &Limits,
    batch: &Batch<'_>,
) -> Result<u64, Error> {
    let (trial, token) = lease_of(batch.trial_id, batch.lease_token)?;
    let n = batch.steps.len();
    if n > limits.max_batch_points {
        return Err(Error::InvalidArgument(format!(
            "metric batch {} has {n} points, over the limit of {}; send smaller batches",
            batch.seq, limits.max_batch_points
        )));
    }
    if batch.names.len() > limits.max_metric_names {
        return Err(Error::InvalidArgument(format!(
            "metric batch {} names {} metrics, over the limit of {} per trial",
            batch.seq,
            batch.names.len(),
            limits.max_metric_names
        )));
    }
    for (i, name) in batch.names.iter().enumerate() {
        limits
            .check_name(&format!("metric name {i}"), name, limits.max_string_chars)
            .map_err(|e| Error::InvalidArgument(format!("metric batch {}: {e}", batch.seq)))?;
    }
    if batch.values.len() != n || batch.name_index.len() != n {
        return Err(Error::InvalidArgument(format!(
            "metric batch {} has {} steps, {} values and {} name indexes; they must match",
            batch.seq,
            n,
            batch.values.len(),
            batch.name_index.len()
        )));
    }
    if let Some(bad) = batch.name_index.iter().find(|&&i| i as usize >= batch.names.len()) {
        return Err(Error::InvalidArgument(format!(
            "metric batch {} refers to name {bad} of {}",
            batch.seq,
            batch.names.len()
        )));
    }
    let missing: Vec<String> = {
        let cache = names.lock().expect("name cache lock");
        batch
            .names
            .iter()
            .filter(|n| !cache.contains_key(*n))
            .cloned()
            .collect()
    };
    if !missing.is_empty() {
        let interned = db::intern_metric_names(pool, &missing).await?;
        names.lock().expect("name cache lock").extend(interned);
    }
    let ids: Vec<i32> = {
        let cache = names.lock().expect("name cache lock");
        batch.names.iter().map(|n| cache[n]).collect()
    };
    // One name id per point; the same (name, step) twice, the later wins (`db::insert_metrics`).
    let name_ids: Vec<i32> = batch.name_index.iter().map(|&i| ids[i as usize]).collect();
    db::insert_metrics(pool, trial, token, &name_ids, batch.steps, batch.values).await
}
