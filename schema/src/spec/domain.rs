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
    /// Bounds a trial must meet to count (`"peak_memory_bytes <= 8e9"`): each a metric's
    /// final value (or an output's) against a number. A trial that misses one, or
    /// lacks the value, is infeasible: never reported best, and the searcher learns
    /// from it as from a bad result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// More objectives beside `metric` (`also = [{ metric = "num_params", goal =
    /// "minimize" }]`): the sweep then has a Pareto front (`ablate.pareto`), and tpe
    /// proposes against it. `metric` stays the one a single best is ranked by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<MoreObjective>,
}

/// One of `[objective] also`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MoreObjective {
    pub metric: String,
    pub goal: Goal,
}

/// One of `[objective] constraints`: `name op bound`.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub name: String,
    /// One of `<=`, `<`, `>=`, `>`.
    pub op: &'static str,
    pub bound: f64,
}

impl Constraint {
    /// Parses `text` (`"peak_memory_bytes <= 8e9"`); the error says what is wrong.
    pub fn parse(text: &str) -> Result<Constraint, String> {
        let bad = |why: &str| {
            format!("`{text}`: {why}; write a metric or output name, one of <=, <, >=, >, and a number, as \"peak_memory_bytes <= 8e9\"")
        };
        let (at, op) = ["<=", ">=", "<", ">"]
            .iter()
            .filter_map(|op| text.find(op).map(|at| (at, *op)))
            .min_by_key(|(at, op)| (*at, std::cmp::Reverse(op.len())))
            .ok_or_else(|| bad("no comparison"))?;
        let name = text[..at].trim();
        let bound = text[at + op.len()..].trim();
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || "<>=".contains(c)) {
            return Err(bad("no single name before the comparison"));
        }
        let bound: f64 = bound.parse().map_err(|_| bad("the bound is not a number"))?;
        if !bound.is_finite() {
            return Err(bad("the bound is not a finite number"));
        }
        Ok(Constraint {
            name: name.to_string(),
            op,
            bound,
        })
    }

    /// Whether `value` meets the bound.
    pub fn holds(&self, value: f64) -> bool {
        match self.op {
            "<=" => value <= self.bound,
            "<" => value < self.bound,
            ">=" => value >= self.bound,
            _ => value > self.bound,
        }
    }
}

impl Objective {
    /// The parsed constraints (checked when the spec was).
    pub fn parsed_constraints(&self) -> Vec<Constraint> {
        self.constraints
            .iter()
            .filter_map(|c| Constraint::parse(c).ok())
            .collect()
    }
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
