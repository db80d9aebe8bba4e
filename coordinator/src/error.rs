//! The coordinator's one error type, mapped onto a small set of gRPC codes.

use ablate_schema::SpecError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] SpecError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// A worker wrote with a lease token that is no longer current.
    #[error("stale lease for trial {trial}: the trial was re-leased, cancelled or finished; stop it")]
    StaleLease { trial: String },
    /// A researcher's SQL query failed or was refused.
    #[error("{0}")]
    Query(String),
    /// The reader pool, or the caller's share of it, is full: retry later.
    #[error("{0}")]
    Busy(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The caller may not do this (another's experiment).
    #[error("{0}")]
    Forbidden(String),
    /// The reader database (a replica) failed; the message names it.
    #[error("{0}")]
    Replica(String),
    /// The experiment is not in a state that allows this (it still runs).
    #[error("{0}")]
    Conflict(String),
    /// The object store (packed code, logs) failed.
    #[error("object store: {0}")]
    Objects(String),
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let code = match &error {
            Error::InvalidSpec(_) | Error::InvalidArgument(_) | Error::Query(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::Forbidden(_) => Code::PermissionDenied,
            Error::StaleLease { .. } | Error::Conflict(_) => Code::FailedPrecondition,
            Error::Busy(_) => Code::ResourceExhausted,
            Error::Db(_) | Error::Migrate(_) | Error::Objects(_) | Error::Replica(_) => Code::Unavailable,
        };
        if code == Code::Unavailable {
            tracing::warn!(%error, "request failed");
        }
        Status::new(code, error.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
