//! The worker: the daemon that runs leased trials, the trial process, and
//! `sweep`, which runs a whole spec in-process without a coordinator.
//!
//! **Architecture invariant:** the worker never talks to PostgreSQL; all it
//! knows of the platform is the coordinator's `Workers` gRPC service. It is
//! the only crate that links libtorch.

pub mod backend;
pub mod command;
pub mod daemon;
pub mod fused_bench;
pub mod local;
mod process;
pub mod provenance;
mod relay;
mod runner;
pub mod step_bench;
pub mod storage;
mod telemetry;
pub mod trial_process;

/// Where the worker keeps its spool by default.
pub fn default_state_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(".ablate")
}

/// The daemon's client of the coordinator: every call carries the worker's token, if it has one.
pub type Client = ablate_schema::proto::workers_client::WorkersClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ablate_schema::Bearer>,
>;
