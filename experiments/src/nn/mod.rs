//! The libtorch substrate: models, the transformer, parametrizations,
//! optimizers on tensors, random-subspace projections and data sets.
//!
//! Families use it; it never imports a family. Without the `torch` feature
//! only what parameter checks need is here: the parametrization rules, the
//! names trials choose parts by, and where data sets live.

use serde::{Deserialize, Serialize};

pub mod locations;
pub mod parametrization;

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

/// The optimizers written on tensors (`optim`, with the `torch` feature).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    Sgd,
    Adam,
    Adamw,
}

/// How a subspace's coordinates map to the full parameter vector (`subspace_dim` > 0).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionKind {
    /// Gaussian columns of unit norm: D x d floats.
    #[default]
    Dense,
    /// sqrt(D) entries of +-1/D^(1/4) per column (density 1/sqrt(D)), unit-norm columns.
    Sparse,
    /// Fastfood, H G Pi H B: O(D) memory and O(D log D) time.
    Fastfood,
}
