//! The names a trial's parameters pick substrate parts by: plain serde
//! enums, available without the `torch` feature for parameter checks.

use serde::{Deserialize, Serialize};

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
