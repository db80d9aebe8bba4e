//! The values a swept parameter takes, and the objective a sweep optimizes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::SpecError;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    Minimize,
    Maximize,
}

impl Goal {
    pub fn as_str(self) -> &'static str {
        match self {
            Goal::Minimize => "minimize",
            Goal::Maximize => "maximize",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    pub metric: String,
    pub goal: Goal,
}

/// The values a swept parameter takes.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamDomain {
    /// `[a, b, c]`: exactly these values.
    List(Vec<Value>),
    /// `{ range = [lo, hi], step = s }`: lo, lo+s, ... up to hi inclusive.
    Range { lo: f64, hi: f64, step: f64 },
    /// `{ uniform = [lo, hi] }`: random searcher only.
    Uniform { lo: f64, hi: f64 },
    /// `{ log_uniform = [lo, hi] }`: random searcher only, lo > 0.
    LogUniform { lo: f64, hi: f64 },
}

impl ParamDomain {
    /// Reads one entry of `sweep.params`, naming `path` in any error.
    pub fn from_value(path: &str, value: &Value) -> Result<ParamDomain, SpecError> {
        const EXPECTED: &str = "expected a list of values, { range = [lo, hi], step = s }, { uniform = [lo, hi] } or { log_uniform = [lo, hi] }";
        match value {
            Value::Array(items) if items.is_empty() => Err(SpecError::new(
                path,
                "empty list: give at least one value to sweep over",
            )),
            Value::Array(items) => Ok(ParamDomain::List(items.clone())),
            Value::Object(map) => {
                let pair = |key: &str| -> Result<(f64, f64), SpecError> {
                    let field = format!("{path}.{key}");
                    let v = map.get(key).ok_or_else(|| SpecError::new(path, EXPECTED))?;
                    match v.as_array().map(|a| a.as_slice()) {
                        Some([lo, hi]) => match (lo.as_f64(), hi.as_f64()) {
                            (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
                            (Some(_), Some(_)) => Err(SpecError::new(field, "lower bound is above the upper bound")),
                            _ => Err(SpecError::new(field, "expected two numbers [lo, hi]")),
                        },
                        _ => Err(SpecError::new(field, "expected two numbers [lo, hi]")),
                    }
                };
                let allowed: &[&str] = if map.contains_key("range") {
                    &["range", "step"]
                } else if map.contains_key("uniform") {
                    &["uniform"]
                } else if map.contains_key("log_uniform") {
                    &["log_uniform"]
                } else {
                    return Err(SpecError::new(path, EXPECTED));
                };
                if let Some(extra) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
                    return Err(SpecError::new(
                        format!("{path}.{extra}"),
                        format!("unknown field, expected one of: {}", allowed.join(", ")),
                    ));
                }
                if map.contains_key("range") {
                    let (lo, hi) = pair("range")?;
                    let step = match map.get("step") {
                        None => 1.0,
                        Some(v) => v
                            .as_f64()
                            .ok_or_else(|| SpecError::new(format!("{path}.step"), "expected a number"))?,
                    };
                    if step <= 0.0 || !step.is_finite() {
                        return Err(SpecError::new(format!("{path}.step"), "expected a positive step"));
                    }
                    Ok(ParamDomain::Range { lo, hi, step })
                } else if map.contains_key("uniform") {
                    let (lo, hi) = pair("uniform")?;
                    Ok(ParamDomain::Uniform { lo, hi })
                } else {
                    let (lo, hi) = pair("log_uniform")?;
                    if lo <= 0.0 {
                        return Err(SpecError::new(
                            format!("{path}.log_uniform"),
                            "bounds of a log-uniform domain must be positive",
                        ));
                    }
                    Ok(ParamDomain::LogUniform { lo, hi })
                }
            }
            _ => Err(SpecError::new(path, EXPECTED)),
        }
    }

    /// How many values a grid domain holds, without listing them; `None` for a continuous one.
    pub fn grid_len(&self) -> Option<u64> {
        match self {
            ParamDomain::List(items) => Some(items.len() as u64),
            // Saturates for absurd ranges, which the trial limit then refuses.
            ParamDomain::Range { lo, hi, step } => {
                Some((((hi - lo) / step + 1e-9).floor().max(0.0) as u64).saturating_add(1))
            }
            ParamDomain::Uniform { .. } | ParamDomain::LogUniform { .. } => None,
        }
    }

    /// Value `i` of a grid domain (`i < grid_len`), or `None` for a continuous one.
    pub fn grid_value(&self, i: u64) -> Option<Value> {
        match self {
            ParamDomain::List(items) => items.get(i as usize).cloned(),
            ParamDomain::Range { lo, step, .. } => {
                let x = lo + step * i as f64;
                Some(if lo.fract() == 0.0 && step.fract() == 0.0 {
                    Value::from(x as i64)
                } else {
                    Value::from(x)
                })
            }
            ParamDomain::Uniform { .. } | ParamDomain::LogUniform { .. } => None,
        }
    }

    /// The finite values of a grid domain, or `None` for a continuous one.
    /// Call it only on a domain whose [`ParamDomain::grid_len`] was checked.
    pub fn grid_values(&self) -> Option<Vec<Value>> {
        let len = self.grid_len()?;
        (0..len).map(|i| self.grid_value(i)).collect()
    }
}
