//! The events a command trial (the researcher's own program) writes to its worker:
//! one JSON object per line on the pipe whose descriptor `ABLATE_EVENTS_FD` names
//! (not stdout, which stays the program's own). The README's "Command trials"
//! documents them:
//!
//! - `{"step": 120, "metrics": {"train_loss": 0.31, "eval_loss": 0.35}}`: metric
//!   points at a step; a value is a number, or `"nan"`, `"inf"` or `"-inf"`.
//! - `{"checkpoint": 120}`: the files for step 120 are complete in
//!   `ABLATE_CHECKPOINT_DIR`; the worker stores them before it records the checkpoint.
//! - `{"output": {"best_acc": 0.93}}`: named results kept with the trial.
//! - `{"paused": 120}`: it stopped at its rung (`ABLATE_PAUSE_AT`) after the
//!   checkpoint of that step, and exits 0.
//!
//! A line that is not one of these fails the trial with what was wrong.

use ablate_schema::Limits;
use serde_json::{Map, Value};

/// The longest event line taken: a longer one fails the trial.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// One event of a command trial.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandEvent {
    Metrics { step: i64, values: Vec<(String, f64)> },
    Checkpoint(u64),
    Outputs(Vec<(String, Value)>),
    Paused(u64),
}

/// The start of a line, for an error message.
fn clip(line: &str) -> String {
    let mut end = line.len().min(120);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    if end < line.len() {
        format!("{}...", &line[..end])
    } else {
        line.to_string()
    }
}

fn step(value: &Value, what: &str) -> Result<u64, String> {
    value
        .as_u64()
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| format!("`{what}` must be a step: a whole number from 0, not {value}"))
}

fn metric_value(name: &str, value: &Value) -> Result<f64, String> {
    match value {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("metric `{name}`: {n} is not a number a metric can hold")),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "nan" => Ok(f64::NAN),
            "inf" | "+inf" | "infinity" => Ok(f64::INFINITY),
            "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
            _ => Err(format!(
                "metric `{name}`: \"{}\" is not a number (write a number, or \"nan\", \"inf\" or \"-inf\")",
                clip(s)
            )),
        },
        other => Err(format!("metric `{name}`: {other} is not a number")),
    }
}

fn names<'a>(map: &'a Map<String, Value>, what: &str, limits: &Limits) -> Result<&'a Map<String, Value>, String> {
    if map.is_empty() {
        return Err(format!("`{what}` names nothing"));
    }
    for name in map.keys() {
        if name.is_empty() {
            return Err(format!("`{what}` holds an empty name"));
        }
        limits
            .check_name(&format!("{what}.{name}"), name, limits.max_name_chars)
            .map_err(|e| e.to_string())?;
    }
    Ok(map)
}

/// Reads one event line.
pub fn parse(line: &str, limits: &Limits) -> Result<CommandEvent, String> {
    if line.len() > MAX_LINE_BYTES {
        return Err(format!(
            "an event line of {} bytes, over the limit of {MAX_LINE_BYTES}",
            line.len()
        ));
    }
    let value: Value =
        serde_json::from_str(line).map_err(|e| format!("an event line is not JSON ({e}): {}", clip(line)))?;
    let Value::Object(map) = value else {
        return Err(format!("an event line must be a JSON object: {}", clip(line)));
    };
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_unstable();
    match keys.as_slice() {
        ["metrics", "step"] => {
            let step = step(&map["step"], "step")? as i64;
            let Value::Object(metrics) = &map["metrics"] else {
                return Err("`metrics` must be an object of metric name to value".into());
            };
            let values = names(metrics, "metrics", limits)?
                .iter()
                .map(|(name, v)| Ok((name.clone(), metric_value(name, v)?)))
                .collect::<Result<Vec<_>, String>>()?;
            Ok(CommandEvent::Metrics { step, values })
        }
        ["metrics"] => Err("a `metrics` event needs its `step`".into()),
        ["checkpoint"] => Ok(CommandEvent::Checkpoint(step(&map["checkpoint"], "checkpoint")?)),
        ["paused"] => Ok(CommandEvent::Paused(step(&map["paused"], "paused")?)),
        ["output"] => {
            let Value::Object(outputs) = &map["output"] else {
                return Err("`output` must be an object of output name to value".into());
            };
            let outputs = names(outputs, "output", limits)?;
            for (name, v) in outputs {
                limits.check_value(&format!("output.{name}"), v).map_err(|e| e.to_string())?;
            }
            Ok(CommandEvent::Outputs(
                outputs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ))
        }
        _ => Err(format!(
            "unknown event {}: an event is one of {{\"step\", \"metrics\"}}, {{\"checkpoint\"}}, {{\"output\"}}, {{\"paused\"}}",
            clip(line)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<CommandEvent, String> {
        super::parse(line, &Limits::default())
    }

    #[test]
    fn the_four_events_read_back() {
        match parse(r#"{"step": 3, "metrics": {"loss": 0.5, "gap": "nan", "up": "-inf"}}"#).unwrap() {
            CommandEvent::Metrics { step, values } => {
                assert_eq!(step, 3);
                assert_eq!(values[0], ("loss".to_string(), 0.5));
                assert!(values[1].1.is_nan());
                assert_eq!(values[2], ("up".to_string(), f64::NEG_INFINITY));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(r#"{"checkpoint": 40}"#).unwrap(), CommandEvent::Checkpoint(40));
        assert_eq!(parse(r#"{"paused": 40}"#).unwrap(), CommandEvent::Paused(40));
        assert_eq!(
            parse(r#"{"output": {"best": [1, 2]}}"#).unwrap(),
            CommandEvent::Outputs(vec![("best".into(), serde_json::json!([1, 2]))])
        );
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let cases = [
            ("not json", "is not JSON"),
            ("[1, 2]", "must be a JSON object"),
            (r#"{"metrics": {"loss": 1}}"#, "needs its `step`"),
            (r#"{"step": -1, "metrics": {"loss": 1}}"#, "whole number"),
            (r#"{"step": 1, "metrics": {"loss": "high"}}"#, "is not a number"),
            (r#"{"step": 1, "metrics": {}}"#, "names nothing"),
            ("{\"step\": 1, \"metrics\": {\"lo\\u0000ss\": 1}}", "U+0000"),
            (r#"{"step": 1, "metrics": {"": 1}}"#, "empty name"),
            (r#"{"hello": 1}"#, "unknown event"),
            (r#"{"checkpoint": 1, "paused": 1}"#, "unknown event"),
        ];
        for (line, expected) in cases {
            let error = parse(line).unwrap_err();
            assert!(error.contains(expected), "{line}: {error}");
        }
        let long = format!(r#"{{"output": {{"x": "{}"}}}}"#, "a".repeat(MAX_LINE_BYTES));
        assert!(parse(&long).unwrap_err().contains("over the limit"));
    }
}
