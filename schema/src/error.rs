//! The error a spec that can't be accepted gets: the path of the field at fault and
//! what to fix.

/// A spec that can't be accepted, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    /// Dotted path of the bad field, such as `sweep.params.width[2]`; `.` for the whole spec.
    pub path: String,
    /// What was wrong and what was expected.
    pub message: String,
}

impl SpecError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        let path = path.into();
        SpecError {
            path: if path.is_empty() { ".".to_string() } else { path },
            message: message.into(),
        }
    }
}
