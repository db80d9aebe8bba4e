//! The science of ablate: the experiment families, their parameters and trials.
//!
//! **Architecture invariant:** this crate knows nothing of gRPC or SQL. A trial
//! is a function of (params, data, checkpoint store, metric sink) to an outcome;
//! the worker supplies the store and the sink.
//!
//! Without the `torch` feature the crate gives the coordinator and CLI the
//! family definitions and parameter checks; with it (the worker only) it brings
//! tch, the models and the trial loops.

pub mod cbs;
pub mod dsir;
pub mod dsir_family;
#[cfg(feature = "torch")]
pub mod dsir_trial;
pub mod family;
pub mod intrinsic;
pub mod mup;
pub mod parametrization;
pub mod report;
pub mod searcher;
pub mod sweep;
pub mod train;

#[cfg(feature = "torch")]
pub mod data;
#[cfg(feature = "torch")]
pub mod model;
#[cfg(feature = "torch")]
pub mod optim;
#[cfg(feature = "torch")]
pub mod subspace;
#[cfg(feature = "torch")]
pub mod transformer;
#[cfg(feature = "torch")]
pub mod trial;

pub use family::{Family, ParamError};
