//! The shared vocabulary of ablate: the `ablate.v1` protos (the only crate that
//! sees generated code), sweep-spec types with their parsing and validation
//! errors, and the ID newtypes every other crate uses.

pub mod bearer;
pub mod code;
pub mod error;
pub mod exposition;
pub mod ids;
pub mod limits;
pub mod objects;
pub mod spec;
pub mod trace;

/// Generated gRPC code for `ablate.v1`. Other crates use it only at the service
/// and client edges and convert to domain types right away.
pub mod proto {
    tonic::include_proto!("ablate.v1");

    /// The compiled protocol's descriptors (`prost_types::FileDescriptorSet`): every
    /// service and method, for the access policy's check and for tools.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ablate_descriptor.bin"));

    impl CompleteRequest {
        /// The completion of a trial that succeeded with nothing more to report.
        pub fn succeeded(trial: LeasedTrial) -> CompleteRequest {
            CompleteRequest {
                trial_id: trial.trial_id,
                lease_token: trial.lease_token,
                outcome: "succeeded".into(),
                error: String::new(),
                stderr_tail: String::new(),
                outputs_json: String::new(),
                provenance_json: String::new(),
                paused_at_step: 0,
            }
        }
    }
}

pub use bearer::{addresses, channel, endpoint, Bearer};
pub use error::SpecError;
pub use ids::{ExperimentId, LeaseToken, TrialId, WorkerId};
pub use limits::Limits;
pub use spec::{
    Checkpoints, CommandTrial, Constraint, Fuse, Goal, Keep, Ladder, MoreObjective, Objective, ParamDomain, Pbt, Rungs,
    Searcher, SpecFormat, Sweep, SweepSpec, Tpe, MAX_FUSE,
};

/// States a trial moves through; the strings are those stored in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrialState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Pruned,
    Cancelled,
}

impl TrialState {
    pub fn as_str(self) -> &'static str {
        match self {
            TrialState::Pending => "pending",
            TrialState::Running => "running",
            TrialState::Succeeded => "succeeded",
            TrialState::Failed => "failed",
            TrialState::Pruned => "pruned",
            TrialState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<TrialState> {
        Some(match text {
            "pending" => TrialState::Pending,
            "running" => TrialState::Running,
            "succeeded" => TrialState::Succeeded,
            "failed" => TrialState::Failed,
            "pruned" => TrialState::Pruned,
            "cancelled" => TrialState::Cancelled,
            _ => return None,
        })
    }
}
