//! The formats a spec is written in, and `--set path=value` overrides of its text.

use crate::error::SpecError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    Toml,
    Yaml,
}

impl SpecFormat {
    /// Picks the format from a file name: `.yaml`/`.yml` are YAML, anything else TOML.
    pub fn from_path(path: &str) -> SpecFormat {
        if path.ends_with(".yaml") || path.ends_with(".yml") {
            SpecFormat::Yaml
        } else {
            SpecFormat::Toml
        }
    }

    pub fn parse(text: &str) -> Option<SpecFormat> {
        match text {
            "toml" | "" => Some(SpecFormat::Toml),
            "yaml" | "yml" => Some(SpecFormat::Yaml),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SpecFormat::Toml => "toml",
            SpecFormat::Yaml => "yaml",
        }
    }
}

/// Applies `path=value` overrides (`base.steps=4`, `sweep.params.width=[64, 128]`,
/// `base.train.steps=10`) to a spec's text; returns the result as YAML. A value
/// is read as TOML (a number, a boolean, a quoted string, an array, an inline
/// table) and otherwise taken as a bare string. Missing tables on the path are
/// made; the result is checked like any spec when it is parsed.
pub fn apply_overrides(text: &str, format: SpecFormat, sets: &[String]) -> Result<String, SpecError> {
    let mut spec: serde_json::Value = match format {
        SpecFormat::Toml => toml::from_str(text).map_err(|e| SpecError::new("", toml_message(&e)))?,
        SpecFormat::Yaml => serde_norway::from_str(text).map_err(|e| SpecError::new("", e.to_string()))?,
    };
    for set in sets {
        let (path, raw) = set.split_once('=').ok_or_else(|| {
            SpecError::new(
                "",
                format!("override `{set}`: expected PATH=VALUE, such as base.steps=4"),
            )
        })?;
        let path = path.trim();
        let value: serde_json::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut table) => serde_json::to_value(table.remove("v")).unwrap_or_default(),
            Err(_) => serde_json::Value::String(raw.trim().to_string()),
        };
        let keys: Vec<&str> = path.split('.').collect();
        if path.is_empty() || keys.iter().any(|k| k.is_empty()) {
            return Err(SpecError::new(
                path,
                format!("override `{set}`: the path must be dotted names"),
            ));
        }
        let mut node = &mut spec;
        for (i, key) in keys.iter().enumerate() {
            let table = node
                .as_object_mut()
                .ok_or_else(|| SpecError::new(keys[..i].join("."), format!("override `{set}`: not a table")))?;
            if i + 1 == keys.len() {
                table.insert(key.to_string(), value.clone());
                break;
            }
            node = table
                .entry(key.to_string())
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
        }
    }
    serde_norway::to_string(&spec).map_err(|e| SpecError::new("", e.to_string()))
}

/// A TOML error's message without its source excerpt.
pub(super) fn toml_message(error: &toml::de::Error) -> String {
    // toml's Display carries a source excerpt; the message alone reads better after a path.
    error.message().trim_end_matches('.').to_string()
}
