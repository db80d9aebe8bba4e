//! The shape every family's report takes: tables, a verdict made of named
//! criteria, and figures as data (the CLI draws them). `ablate report --format
//! json` prints this structure as it is.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One finished trial as a report sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialOutcome {
    pub ordinal: i64,
    pub state: String,
    pub params: Value,
    /// The last value of every metric the trial logged.
    pub metrics: Map<String, Value>,
}

impl TrialOutcome {
    pub fn param_f64(&self, name: &str) -> Option<f64> {
        self.params.get(name).and_then(Value::as_f64)
    }

    pub fn param_str(&self, name: &str) -> Option<&str> {
        self.params.get(name).and_then(Value::as_str)
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).and_then(Value::as_f64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub family: String,
    pub title: String,
    /// One line: the headline result.
    pub summary: String,
    pub tables: Vec<Table>,
    pub verdict: Verdict,
    pub figures: Vec<Figure>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub criteria: Vec<Criterion>,
    /// Every criterion holds.
    pub holds: bool,
}

impl Verdict {
    pub fn new(criteria: Vec<Criterion>) -> Verdict {
        let holds = !criteria.is_empty() && criteria.iter().all(|c| c.holds);
        Verdict { criteria, holds }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Criterion {
    pub name: String,
    /// `null` when it could not be measured (the criterion then does not hold).
    pub measured: Option<f64>,
    /// The condition, such as `<= 1`.
    pub threshold: String,
    pub holds: bool,
}

impl Criterion {
    /// `measured <= limit`.
    pub fn at_most(name: impl Into<String>, measured: Option<f64>, limit: f64) -> Criterion {
        Criterion {
            name: name.into(),
            measured,
            threshold: format!("<= {limit}"),
            holds: measured.is_some_and(|m| m <= limit),
        }
    }

    /// `measured >= limit`.
    pub fn at_least(name: impl Into<String>, measured: Option<f64>, limit: f64) -> Criterion {
        Criterion {
            name: name.into(),
            measured,
            threshold: format!(">= {limit}"),
            holds: measured.is_some_and(|m| m >= limit),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Figure {
    /// File stem: the CLI writes `<name>.svg` and `<name>.png`.
    pub name: String,
    pub title: String,
    /// Drawn side by side.
    pub panels: Vec<Panel>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

impl Report {
    /// The report as plain text: headline, tables, verdict (figures are drawn elsewhere).
    pub fn to_text(&self) -> String {
        let mut out = format!("{} ({})\n{}\n\n", self.title, self.family, self.summary);
        for t in &self.tables {
            out.push_str(&format!("{}:\n{}\n", t.title, text_table(&t.columns, &t.rows)));
        }
        if !self.verdict.criteria.is_empty() {
            let holds = if self.verdict.holds {
                "every criterion holds"
            } else {
                "NOT every criterion holds"
            };
            out.push_str(&format!("verdict: {holds}\n"));
            for c in &self.verdict.criteria {
                let measured = c.measured.map_or("not measured".to_string(), |m| format!("{m}"));
                let mark = if c.holds { "ok" } else { "no" };
                out.push_str(&format!("  [{mark}] {}: {measured} (needs {})\n", c.name, c.threshold));
            }
        }
        out
    }
}

/// Renders rows under a header, columns padded to their widest cell.
pub fn text_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header);
    out.push('\n');
    out.push_str(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// Why a report can't be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ReportError(pub String);

/// Least-squares slope of y on x; `None` with fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_fits_a_line_and_a_verdict_needs_every_criterion() {
        assert_eq!(slope(&[(1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]), Some(2.0));
        assert_eq!(slope(&[(1.0, 3.0)]), None);
        let yes = Criterion::at_most("a", Some(1.0), 1.0);
        let no = Criterion::at_least("b", None, 2.0);
        assert!(yes.holds && !no.holds);
        assert!(!Verdict::new(vec![yes.clone(), no]).holds);
        assert!(Verdict::new(vec![yes]).holds);
        assert!(!Verdict::new(vec![]).holds, "an empty verdict proves nothing");
    }
}
