//! The limits a shared coordinator puts on what one user may send, in one place.
//!
//! Every limit has a default that a researcher never meets by accident and a
//! flag of the same name on `ablate serve` and `ablate up` (`--max-trials`,
//! ...). Specs are checked against them before anything is expanded or
//! stored; workers' writes (metric batches, outputs) when they arrive.

use serde_json::Value;

use crate::error::SpecError;

/// What one spec, trial or batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Trials one experiment may expand into.
    pub max_trials: u64,
    /// Bytes of a spec's text.
    pub max_spec_bytes: usize,
    /// Characters of an experiment's name.
    pub max_name_chars: usize,
    /// Characters of any other string: a description, a parameter value or name, a metric name.
    pub max_string_chars: usize,
    /// Parameters of one trial (base and swept together).
    pub max_params: usize,
    /// Distinct metric names one trial may log.
    pub max_metric_names: usize,
    /// Points in one metric batch a worker sends.
    pub max_batch_points: usize,
    /// Bytes of a trial's named outputs, as JSON.
    pub max_output_bytes: usize,
    /// Training steps of one trial (its `steps`, or `examples` over its batch size).
    pub max_steps: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_trials: 100_000,
            max_spec_bytes: 1 << 20,
            max_name_chars: 200,
            max_string_chars: 4096,
            max_params: 256,
            max_metric_names: 1000,
            max_batch_points: 100_000,
            max_output_bytes: 1 << 20,
            max_steps: 100_000_000,
        }
    }
}

/// How deep a parameter value may nest (lists and tables inside each other).
pub const MAX_DEPTH: usize = 32;

impl Limits {
    /// Refuses a string with a control character (NUL included) or over `max` characters.
    pub fn check_string(&self, path: &str, text: &str, max: usize) -> Result<(), SpecError> {
        if let Some(c) = text.chars().find(|c| c.is_control() && *c != '\n' && *c != '\t') {
            return Err(SpecError::new(
                path,
                format!("holds the control character U+{:04X}; remove it", c as u32),
            ));
        }
        let chars = text.chars().count();
        if chars > max {
            return Err(SpecError::new(
                path,
                format!("{chars} characters, over the limit of {max}; shorten it"),
            ));
        }
        Ok(())
    }

    /// Refuses a name (an experiment's, a metric's, a parameter's): no line breaks either.
    pub fn check_name(&self, path: &str, name: &str, max: usize) -> Result<(), SpecError> {
        if name.contains(['\n', '\t']) {
            return Err(SpecError::new(path, "holds a line break or tab; use one line"));
        }
        self.check_string(path, name, max)
    }

    /// Refuses a trial that would train more than `max_steps` steps.
    pub fn check_steps(&self, path: &str, steps: u64) -> Result<(), SpecError> {
        if steps > self.max_steps {
            return Err(SpecError::new(
                path,
                format!(
                    "{steps} training steps, over the limit of {}; lower steps (or examples)",
                    self.max_steps
                ),
            ));
        }
        Ok(())
    }

    /// Walks a parameter value: every string and key checked, nesting at most [`MAX_DEPTH`].
    pub fn check_value(&self, path: &str, value: &Value) -> Result<(), SpecError> {
        self.walk(path, value, 0)
    }

    fn walk(&self, path: &str, value: &Value, depth: usize) -> Result<(), SpecError> {
        if depth > MAX_DEPTH {
            return Err(SpecError::new(
                path,
                format!("nested more than {MAX_DEPTH} levels deep; flatten it"),
            ));
        }
        match value {
            Value::String(s) => self.check_string(path, s, self.max_string_chars),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| self.walk(&format!("{path}[{i}]"), v, depth + 1)),
            Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                let inner = format!("{path}.{k}");
                self.check_name(&inner, k, self.max_string_chars)?;
                self.walk(&inner, v, depth + 1)
            }),
            Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn control_characters_long_strings_and_deep_nesting_are_named() {
        let l = Limits::default();
        let err = l.check_string("name", "a\0b", 10).unwrap_err();
        assert_eq!(err.path, "name");
        assert!(err.message.contains("U+0000"), "{err}");
        let err = l.check_string("description", &"x".repeat(11), 10).unwrap_err();
        assert!(err.message.contains("11 characters, over the limit of 10"), "{err}");
        assert!(l.check_string("description", "two\nlines\tok", 20).is_ok());
        assert!(l.check_name("name", "two\nlines", 20).is_err());
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        let err = l.check_value("base.x", &deep).unwrap_err();
        assert!(err.path.starts_with("base.x[0][0]"), "{err}");
        let err = l
            .check_value("base.m", &json!({"ok": ["fine", "bad\u{1b}"]}))
            .unwrap_err();
        assert_eq!(err.path, "base.m.ok[1]");
    }
}
