//! The error a trial's parameters get when their family can't accept them:
//! a leaf module, imported by the families and the substrate alike.

use serde_json::Value;

/// A trial's parameters that its family can't accept.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ParamError {
    /// Dotted path inside the trial's parameters, such as `model.depth`; empty for the whole set.
    pub path: String,
    pub message: String,
}

impl ParamError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ParamError {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Reads `params` into `T`, naming the path of an unknown field or a wrong type.
    pub fn deserialize<T: serde::de::DeserializeOwned>(params: &Value) -> Result<T, ParamError> {
        serde_path_to_error::deserialize(params).map_err(|e| {
            let path = e.path().to_string();
            ParamError::new(
                if path == "." { String::new() } else { path },
                e.into_inner().to_string(),
            )
        })
    }
}
