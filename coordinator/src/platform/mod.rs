//! What the coordinator decides, between its edges (the gRPC services in `service`, the
//! HTTP API in `web`) and its SQL (`db`): a worker's completion checked and recorded with
//! what it makes the searchers decide (`completion`), a worker's lease fused into
//! groups by the queue's rules (`lease`), metric batches checked and written
//! (`ingest`), the searchers' decisions (`searchers`: rung promotions, PBT generations,
//! tpe proposals), a family's report of an experiment (`reports`), a new token
//! (`tokens`), what a researcher does to an experiment after it ran (`experiments`:
//! cancel, retry, tag, note, delete), checkpoint retention and `gc` (`retention`). The edges convert messages into the domain types here and back.

pub mod compaction;
pub mod completion;
pub mod experiments;
pub mod ingest;
pub mod lease;
pub mod logs;
pub mod reports;
pub mod retention;
pub mod searchers;
pub mod tokens;

use ablate_schema::{LeaseToken, TrialId};

use crate::error::Error;

pub(crate) fn parse_id<T>(
    parse: impl Fn(&str) -> Result<T, ablate_schema::ids::BadId>,
    text: &str,
) -> Result<T, Error> {
    parse(text).map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// A call's trial and lease token; the trial's id goes on the call's span.
pub(crate) fn lease_of(trial: &str, token: &str) -> Result<(TrialId, LeaseToken), Error> {
    let ids = (parse_id(TrialId::parse, trial)?, parse_id(LeaseToken::parse, token)?);
    tracing::Span::current().record("trial_id", trial);
    Ok(ids)
}

/// A worker's reason as PostgreSQL can keep it: no NUL, at most `max` characters.
pub(crate) fn clip_reason(reason: &str, max: usize) -> String {
    pg_text(reason).chars().take(max).collect()
}

/// Text PostgreSQL can keep: NUL, which it can't, shown as U+FFFD.
pub(crate) fn pg_text(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}
