//! `[trial]`: a trial that runs the researcher's own program (any language) instead
//! of a model ablate ships. The program gets its parameters in `ABLATE_PARAMS`
//! (JSON) and speaks to its worker in the line protocol the README's "Command
//! trials" documents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::SpecError;
use crate::limits::Limits;

/// The most arguments a command may have.
pub const MAX_ARGS: usize = 256;

/// `[trial]`: the program a trial runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CommandTrial {
    /// The program and its arguments, run without a shell; `{name}` becomes the
    /// trial's parameter `name` (a string as it is, anything else as JSON), `{{`
    /// and `}}` a brace.
    pub command: Vec<String>,
    /// Variables set for the program, beside the worker's `ABLATE_*` ones.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The program's code: a directory (relative to the spec's folder) that
    /// `ablate submit` packs and workers unpack into a cache, where the program
    /// runs. Files its `.gitignore` (and `.ablateignore`) leave out are not packed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Instead of `code`: an absolute directory on a shared file system, under the
    /// data roots, where the program runs as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<std::path::PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when a running program is stopped
    /// (cancel, prune, lost lease, worker shutdown); 10 when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_seconds: Option<u32>,
}

/// Seconds a stopped program has to end after SIGTERM, when the spec gives none.
pub const DEFAULT_GRACE_SECONDS: u32 = 10;
/// The longest grace period a spec may ask for.
pub const MAX_GRACE_SECONDS: u32 = 600;

/// One piece of a command argument: text, or a parameter's place.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Text(String),
    Param(&'a str),
}

/// Splits an argument into text and `{name}` places; `{{` and `}}` are braces.
fn pieces(arg: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = arg;
    while let Some(c) = rest.chars().next() {
        match c {
            '{' if rest.starts_with("{{") => {
                text.push('{');
                rest = &rest[2..];
            }
            '}' if rest.starts_with("}}") => {
                text.push('}');
                rest = &rest[2..];
            }
            '{' => {
                let end = rest
                    .find('}')
                    .ok_or_else(|| "a `{` without its `}` (write `{{` for a brace)".to_string())?;
                let name = &rest[1..end];
                if name.is_empty() || name.contains('{') {
                    return Err(format!(
                        "`{}` is not a parameter's place (write `{{name}}`)",
                        &rest[..=end]
                    ));
                }
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                out.push(Piece::Param(name));
                rest = &rest[end + 1..];
            }
            '}' => return Err("a `}` without its `{` (write `}}` for a brace)".to_string()),
            c => {
                text.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

/// A parameter's value as it goes into an argument.
fn as_arg(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl CommandTrial {
    /// Checks the command against the parameters the sweep gives every trial (`params`).
    pub fn check(&self, params: &[&str], limits: &Limits) -> Result<(), SpecError> {
        if self.command.is_empty() || self.command[0].trim().is_empty() {
            return Err(SpecError::new(
                "trial.command",
                "empty: name the program and its arguments, such as [\"python\", \"train.py\", \"--lr={lr}\"]",
            ));
        }
        if self.command.len() > MAX_ARGS {
            return Err(SpecError::new(
                "trial.command",
                format!("{} arguments, over the limit of {MAX_ARGS}", self.command.len()),
            ));
        }
        for (i, arg) in self.command.iter().enumerate() {
            let path = format!("trial.command[{i}]");
            limits.check_name(&path, arg, limits.max_string_chars)?;
            for piece in pieces(arg).map_err(|why| SpecError::new(&path, why))? {
                if let Piece::Param(name) = piece {
                    if !params.contains(&name) {
                        return Err(SpecError::new(
                            &path,
                            format!(
                                "`{{{name}}}` names no parameter of the sweep; its parameters are {}",
                                params.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        for (key, value) in &self.env {
            let path = format!("trial.env.{key}");
            let valid = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(SpecError::new(
                    &path,
                    "not a variable name: letters, digits and `_`, not starting with a digit",
                ));
            }
            if key.starts_with("ABLATE_") {
                return Err(SpecError::new(
                    &path,
                    "ABLATE_ variables are the worker's (ABLATE_PARAMS, ABLATE_CHECKPOINT_DIR, ...); rename it",
                ));
            }
            limits.check_name(&path, value, limits.max_string_chars)?;
        }
        if self.code.is_some() && self.workdir.is_some() {
            return Err(SpecError::new(
                "trial.workdir",
                "give `code` (a directory ablate packs) or `workdir` (a shared directory), not both",
            ));
        }
        if let Some(code) = &self.code {
            limits.check_name("trial.code", code, limits.max_string_chars)?;
            if code.trim().is_empty() || std::path::Path::new(code).is_absolute() {
                return Err(SpecError::new(
                    "trial.code",
                    "a directory relative to the spec's folder, such as \".\" (for an absolute shared directory, use `workdir`)",
                ));
            }
        }
        if let Some(dir) = &self.workdir {
            if !dir.is_absolute() {
                return Err(SpecError::new(
                    "trial.workdir",
                    "an absolute directory on a file system the workers share (for code ablate packs, use `code`)",
                ));
            }
        }
        if let Some(grace) = self.grace_seconds {
            if grace > MAX_GRACE_SECONDS {
                return Err(SpecError::new(
                    "trial.grace_seconds",
                    format!("{grace} seconds, over the limit of {MAX_GRACE_SECONDS}"),
                ));
            }
        }
        Ok(())
    }

    /// How long a stopped program has between SIGTERM and SIGKILL.
    pub fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS).into())
    }

    /// The argv for a trial with `params` (checked: every place names one of them).
    pub fn argv(&self, params: &serde_json::Map<String, Value>) -> Result<Vec<String>, String> {
        self.command
            .iter()
            .map(|arg| {
                let mut out = String::new();
                for piece in pieces(arg)? {
                    match piece {
                        Piece::Text(t) => out.push_str(&t),
                        Piece::Param(name) => out.push_str(&as_arg(
                            params
                                .get(name)
                                .ok_or_else(|| format!("the trial has no parameter `{name}`"))?,
                        )),
                    }
                }
                Ok(out)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn trial(command: &[&str]) -> CommandTrial {
        CommandTrial {
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn places_become_the_trials_parameters_and_braces_stay_braces() {
        let t = trial(&[
            "python",
            "train.py",
            "--width={width}",
            "--lr={lr}",
            "{{raw}}",
            "{name}",
        ]);
        t.check(&["width", "lr", "name"], &Limits::default()).unwrap();
        let params = json!({"width": 256, "lr": 0.001, "name": "run a"});
        assert_eq!(
            t.argv(params.as_object().unwrap()).unwrap(),
            ["python", "train.py", "--width=256", "--lr=0.001", "{raw}", "run a"]
        );
    }

    #[test]
    fn a_bad_command_is_refused_naming_the_argument() {
        let limits = Limits::default();
        let cases: [(&[&str], &str, &str); 5] = [
            (&[], "trial.command", "empty"),
            (&["python", "--w={width"], "trial.command[1]", "without its `}`"),
            (&["python", "--w={depth}"], "trial.command[1]", "names no parameter"),
            (&["python", "x}"], "trial.command[1]", "without its `{`"),
            (&["py\0thon"], "trial.command[0]", "U+0000"),
        ];
        for (command, path, message) in cases {
            let err = trial(command).check(&["width"], &limits).unwrap_err();
            assert_eq!(err.path, path, "{command:?}: {err}");
            assert!(err.message.contains(message), "{command:?}: {err}");
        }
        let mut t = trial(&["python"]);
        t.env.insert("ABLATE_PARAMS".into(), "x".into());
        assert!(t.check(&[], &limits).unwrap_err().message.contains("worker's"));
        t.env.clear();
        t.env.insert("1BAD".into(), "x".into());
        assert_eq!(t.check(&[], &limits).unwrap_err().path, "trial.env.1BAD");
    }
}
