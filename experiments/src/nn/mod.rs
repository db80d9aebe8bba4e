//! The libtorch substrate: models, the transformer, parametrizations,
//! optimizers on tensors, fused (stacked) models, random-subspace projections and data sets.
//!
//! Families use it; it never imports a family. Without the `torch` feature
//! only what parameter checks need is here: the parametrization rules, the
//! names trials choose parts by, and where data sets live.

pub mod kinds;
pub mod locations;
pub mod parametrization;

#[cfg(feature = "torch")]
pub mod data;
#[cfg(feature = "torch")]
pub mod fused;
#[cfg(feature = "torch")]
pub mod model;
#[cfg(feature = "torch")]
pub mod optim;
#[cfg(feature = "torch")]
pub mod subspace;
#[cfg(feature = "torch")]
pub mod transformer;

pub use kinds::{OptimizerName, ProjectionKind};
