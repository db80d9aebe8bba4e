//! The science of ablate: the experiment families, their parameters and trials.
//!
//! **Architecture invariant:** this crate knows nothing of gRPC or SQL. A trial
//! is a function of (params, data, checkpoint store, metric sink) to an outcome;
//! the worker supplies the store and the sink.
//!
//! Layout, by dependency (each imports only those above it):
//! - `error`: `ParamError`, a leaf.
//! - `report`: the report shape every family fills, and its helpers.
//! - `nn`: the libtorch substrate (models, optimizers, projections, data sets).
//! - `trial` (with `torch`): the host interface a trial runs against.
//! - `families`: one folder per family, and the registry.
//! - `searcher`, `sweep`: a spec's text to checked trials.
//!
//! Without the `torch` feature the crate gives the coordinator and CLI the
//! family definitions and parameter checks; with it (the worker only) it brings
//! tch, the models and the trial loops.

pub mod bohb;
pub mod draw;
pub mod error;
pub mod families;
pub mod fusion;
pub mod importance;
pub mod nn;
pub mod pareto;
pub mod pbt;
pub mod queue;
pub mod report;
pub mod searcher;
pub mod sweep;
pub mod tpe;
#[cfg(feature = "torch")]
pub mod trial;

pub use error::ParamError;
pub use families::Family;
