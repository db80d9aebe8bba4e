//! The shape every family's report takes: tables, a verdict made of named
//! criteria, and figures as data (the CLI draws them). `ablate report --format
//! json` prints this structure as it is.

use std::collections::BTreeMap;

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
    /// Every (step, value) of the metrics the family's report reads as curves
    /// ([`crate::Family::series_metrics`]), in step order.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
    /// What the trial produced beyond metrics (`ablate.outputs`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub outputs: Map<String, Value>,
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

    /// The curve of a series metric; empty when the trial logged none.
    pub fn curve(&self, name: &str) -> &[(u64, f64)] {
        self.series.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Marks the succeeded trials that miss one of `constraints` (or lack its value) as
/// `infeasible`, so no report ranks them among the succeeded; returns how many.
pub fn mark_infeasible(outcomes: &mut [TrialOutcome], constraints: &[ablate_schema::Constraint]) -> usize {
    let mut marked = 0;
    for t in outcomes.iter_mut().filter(|t| t.state == "succeeded") {
        let meets = |c: &ablate_schema::Constraint| {
            let value = t
                .metric(&c.name)
                .or_else(|| t.outputs.get(&c.name).and_then(Value::as_f64));
            value.is_some_and(|v| c.holds(v))
        };
        if !constraints.iter().all(meets) {
            t.state = "infeasible".into();
            marked += 1;
        }
    }
    marked
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
    /// Which swept parameters mattered to the objective (`crate::importance`), largest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub importance: Vec<Importance>,
    /// With several objectives (`crate::pareto`): the ordinals of the trials on the Pareto front.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pareto: Vec<i64>,
}

/// One swept parameter's share of the objective's variance (`crate::importance`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Importance {
    pub param: String,
    /// 0 to 1: the share of the objective's variance its main effect explains.
    pub share: f64,
    /// The groups its values fell into (items of a list, bins of a number).
    pub groups: usize,
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
    /// How far the measurement falls outside the condition: 0 when it holds,
    /// `null` when it was not measured.
    #[serde(default)]
    pub miss: Option<f64>,
}

impl Criterion {
    /// A criterion from how far a measurement misses it (0: it holds; NaN misses).
    fn new(name: impl Into<String>, measured: Option<f64>, threshold: String, miss: impl Fn(f64) -> f64) -> Criterion {
        let miss = measured.map(|m| if m.is_nan() { f64::INFINITY } else { miss(m) });
        Criterion {
            name: name.into(),
            measured,
            threshold,
            holds: miss == Some(0.0),
            miss,
        }
    }

    /// One line for a criterion that does not hold: its name, what was measured, what
    /// it needs and by how much it misses.
    pub fn failure(&self) -> String {
        match (self.measured, self.miss) {
            (Some(m), Some(miss)) => format!(
                "{}: measured {m}, needs {}, misses by {miss}",
                self.name, self.threshold
            ),
            _ => format!("{}: not measured, needs {}", self.name, self.threshold),
        }
    }

    /// `measured <= limit`.
    pub fn at_most(name: impl Into<String>, measured: Option<f64>, limit: f64) -> Criterion {
        Criterion::new(name, measured, format!("<= {limit}"), |m| (m - limit).max(0.0))
    }

    /// `lo <= measured <= hi`.
    pub fn between(name: impl Into<String>, measured: Option<f64>, lo: f64, hi: f64) -> Criterion {
        Criterion::new(name, measured, format!("in {lo}..{hi}"), |m| {
            (lo - m).max(m - hi).max(0.0)
        })
    }

    /// `measured >= limit`.
    pub fn at_least(name: impl Into<String>, measured: Option<f64>, limit: f64) -> Criterion {
        Criterion::new(name, measured, format!(">= {limit}"), |m| (limit - m).max(0.0))
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
    /// Logarithmic axes (every value must then be positive).
    #[serde(default, skip_serializing_if = "is_false")]
    pub log_x: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub log_y: bool,
}

fn is_false(b: &bool) -> bool {
    !b
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
    let header: Vec<String> = header.iter().map(|c| clip(c, MAX_CELL_CHARS)).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| clip(c, MAX_CELL_CHARS)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(c);
            let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(c.chars().count());
            out.extend(std::iter::repeat_n(' ', pad));
        }
        out.trim_end().to_string()
    };
    let mut out = line(&header);
    out.push('\n');
    out.push_str(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// The most characters a table cell shows; longer text is cut with an ellipsis.
pub const MAX_CELL_CHARS: usize = 120;

/// `text` on one line, control characters shown as U+FFFD, cut to `max`
/// characters with an ellipsis: safe to print whatever a user typed.
pub fn clip(text: &str, max: usize) -> String {
    let count = text.chars().count();
    let keep = if count > max { max.saturating_sub(1) } else { count };
    let mut out: String = text
        .chars()
        .take(keep)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if count > max {
        out.push('…');
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

/// Least-squares line y = a + b x with its coefficient of determination R^2.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LineFit {
    pub intercept: f64,
    pub slope: f64,
    pub r_squared: f64,
}

/// Fits y = a + b x; `None` with fewer than two distinct x. R^2 is 1 when y does not vary.
pub fn fit_line(points: &[(f64, f64)]) -> Option<LineFit> {
    let weighted: Vec<(f64, f64, f64)> = points.iter().map(|&(x, y)| (x, y, 1.0)).collect();
    fit_line_weighted(&weighted)
}

/// Weighted least squares for y = a + b x over (x, y, weight), and the weighted R^2.
/// Weights 1/y^2 fit relative errors, so points of very different size count alike.
pub fn fit_line_weighted(points: &[(f64, f64, f64)]) -> Option<LineFit> {
    let w: f64 = points.iter().map(|p| p.2).sum();
    if points.len() < 2 || w <= 0.0 {
        return None;
    }
    let mx = points.iter().map(|p| p.2 * p.0).sum::<f64>() / w;
    let my = points.iter().map(|p| p.2 * p.1).sum::<f64>() / w;
    let sxx: f64 = points.iter().map(|p| p.2 * (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| p.2 * (p.0 - mx) * (p.1 - my)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    let ss_tot: f64 = points.iter().map(|p| p.2 * (p.1 - my).powi(2)).sum();
    let ss_res: f64 = points.iter().map(|p| p.2 * (p.1 - a - b * p.0).powi(2)).sum();
    let r_squared = if ss_tot > 0.0 { 1.0 - ss_res / ss_tot } else { 1.0 };
    Some(LineFit {
        intercept: a,
        slope: b,
        r_squared,
    })
}

/// The mean, `None` for no values.
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.into_iter().fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The ratio furthest from 1 (so 0.4 and 2.5 both count as off by 2.5x); `None` when there
/// are none or one could not be measured.
pub fn furthest_from_one(ratios: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    ratios
        .into_iter()
        .collect::<Option<Vec<f64>>>()?
        .into_iter()
        .max_by(|a, b| a.ln().abs().total_cmp(&b.ln().abs()))
}

/// Ranks from 1, ties sharing their mean rank.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's rank correlation of the pairs; `None` with fewer than three or when a side is constant.
pub fn spearman(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let rx = ranks(&points.iter().map(|p| p.0).collect::<Vec<_>>());
    let ry = ranks(&points.iter().map(|p| p.1).collect::<Vec<_>>());
    let n = points.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

/// A number for a table cell: four significant figures, `-` when absent.
pub fn cell(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(0.0) => "0".into(),
        Some(v) if (1e-3..1e5).contains(&v.abs()) => {
            let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
            format!("{v:.digits$}")
        }
        Some(v) => format!("{v:.3e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_and_tables_take_any_number_and_any_text() {
        let numbers = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            1e-300,
            -1e300,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::MIN,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.001,
            99_999.9,
        ];
        for v in numbers {
            let c = cell(Some(v));
            assert!(!c.is_empty() && c.len() < 16, "{v}: {c}");
        }
        assert_eq!(cell(Some(0.0)), "0");
        assert_eq!(cell(Some(0.5)), "0.5000");
        assert_eq!(cell(Some(f64::NAN)), "NaN");
        assert_eq!(cell(None), "-");
        let long = "n".repeat(200_000);
        let table = text_table(
            &["name".to_string(), "value".to_string()],
            &[
                vec![long.clone(), cell(Some(f64::INFINITY))],
                vec!["nul\0 and\nbreak\u{1b}[31m".to_string(), cell(Some(0.0))],
                vec![String::new()],
            ],
        );
        let widest = table.lines().map(|l| l.chars().count()).max().unwrap();
        assert!(widest <= MAX_CELL_CHARS + 2 + 5, "{widest}");
        assert!(table.contains('…'));
        assert!(!table.contains('\0') && !table.contains('\u{1b}'));
        assert_eq!(table.lines().count(), 5, "one line per row: {table}");
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 4), "abc…");
    }

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
        assert!(Criterion::between("c", Some(0.5), 0.5, 2.0).holds);
        assert!(!Criterion::between("c", Some(2.1), 0.5, 2.0).holds);
    }

    #[test]
    fn line_fit_and_rank_correlation() {
        let fit = fit_line(&[(1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]).unwrap();
        assert!((fit.intercept - 1.0).abs() < 1e-12 && (fit.slope - 2.0).abs() < 1e-12);
        assert!((fit.r_squared - 1.0).abs() < 1e-12);
        let noisy = fit_line(&[(0.0, 0.0), (1.0, 1.0), (2.0, 0.0), (3.0, 1.0)]).unwrap();
        assert!((noisy.r_squared - 0.2).abs() < 1e-12, "{noisy:?}");
        // Equal weights give the plain fit; a heavy point pulls the line through itself.
        let plain = fit_line_weighted(&[(0.0, 0.0, 2.0), (1.0, 1.0, 2.0), (2.0, 0.0, 2.0), (3.0, 1.0, 2.0)]).unwrap();
        assert_eq!(plain, noisy);
        let heavy = fit_line_weighted(&[(0.0, 0.0, 1.0), (1.0, 5.0, 1e9), (2.0, 0.0, 1.0)]).unwrap();
        assert!((heavy.intercept + heavy.slope - 5.0).abs() < 1e-6, "{heavy:?}");
        // Monotone but not linear: Spearman is exactly 1 (or -1).
        let up: Vec<(f64, f64)> = (1..6).map(|i| (i as f64, (i as f64).powi(3))).collect();
        assert_eq!(spearman(&up), Some(1.0));
        let down: Vec<(f64, f64)> = up.iter().map(|&(x, y)| (x, -y)).collect();
        assert_eq!(spearman(&down), Some(-1.0));
        assert_eq!(spearman(&[(1.0, 2.0), (2.0, 2.0), (3.0, 2.0)]), None);
        let tied = spearman(&[(1.0, 1.0), (2.0, 1.0), (3.0, 2.0), (4.0, 3.0)]).unwrap();
        assert!(tied > 0.9 && tied < 1.0, "{tied}");
        assert_eq!(cell(Some(1234.5678)), "1235");
        assert_eq!(cell(Some(0.012345)), "0.01235");
        assert_eq!(cell(None), "-");
        assert_eq!(mean([1.0, 2.0, 6.0]), Some(3.0));
        assert_eq!(mean([]), None);
        assert_eq!(furthest_from_one([Some(1.5), Some(0.4), Some(2.0)]), Some(0.4));
        assert_eq!(furthest_from_one([Some(1.5), None]), None);
    }
}
