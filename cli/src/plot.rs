//! Draws a report's figures: each panel a line chart, panels side by side,
//! written as SVG and PNG. Text layout needs a TrueType font: `ABLATE_FONT`,
//! or the first of the usual system fonts found (DejaVu, Liberation).

use std::path::{Path, PathBuf};

use ablate_experiments::report::{Figure, Panel};
use plotters::coord::Shift;
use plotters::prelude::*;

const PANEL_WIDTH: u32 = 640;
const HEIGHT: u32 = 480;

fn font_candidates() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::env::var_os("ABLATE_FONT").map(PathBuf::from).into_iter().collect();
    paths.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ]
        .map(PathBuf::from),
    );
    paths
}

/// Registers a font for bitmap text once; false when none is found.
fn ensure_font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        for path in font_candidates() {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                // One face serves every family plotters may ask for.
                let registered = ["sans-serif", "serif", "monospace"]
                    .iter()
                    .all(|family| plotters::style::register_font(family, FontStyle::Normal, bytes).is_ok());
                if registered {
                    return true;
                }
            }
        }
        false
    })
}

/// How an axis draws values: linearly, or at their logarithm in `base` (2
/// when every value is a power of two or they span less than two decades, 10
/// otherwise), with ticks only at whole powers, labelled as round values
/// (32, 1024, 1e6, 0.001), as a paper's axes read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log(f64),
}

impl Scale {
    /// The scale for `values` on an axis asked to be logarithmic or not.
    fn choose(log: bool, values: &[f64]) -> Scale {
        let positive: Vec<f64> = values.iter().copied().filter(|v| *v > 0.0 && v.is_finite()).collect();
        if !log || positive.is_empty() {
            return Scale::Linear;
        }
        let powers_of_two = positive.iter().all(|v| (v.log2() - v.log2().round()).abs() < 1e-9);
        let (lo, hi) = positive
            .iter()
            .fold((f64::INFINITY, 0f64), |(l, h), v| (l.min(*v), h.max(*v)));
        if powers_of_two || hi / lo < 100.0 {
            Scale::Log(2.0)
        } else {
            Scale::Log(10.0)
        }
    }

    /// Where a value is drawn; `None` where a log axis can't show it.
    fn at(self, v: f64) -> Option<f64> {
        match self {
            Scale::Linear => Some(v),
            Scale::Log(base) if v > 0.0 => Some(v.log(base)),
            Scale::Log(_) => None,
        }
    }

    /// How many labels to ask for over `lo..hi` (drawn coordinates): about one per
    /// whole power on a log axis, so the ticks fall on them.
    fn labels(self, lo: f64, hi: f64) -> usize {
        match self {
            Scale::Linear => 10,
            Scale::Log(_) => ((hi.floor() - lo.ceil()) as usize + 1).clamp(2, 12),
        }
    }

    /// The label at drawn coordinate `v`: the value itself, at whole powers only.
    fn label(self, v: f64) -> String {
        let Scale::Log(base) = self else {
            return linear_label(v);
        };
        if (v - v.round()).abs() > 1e-6 {
            return String::new();
        }
        let value = base.powf(v.round());
        if (1.0..100_000.0).contains(&value) {
            format!("{}", value.round())
        } else if (0.001..1.0).contains(&value) {
            let text = format!("{value:.6}");
            text.trim_end_matches('0').to_string()
        } else if base == 2.0 {
            format!("2^{}", v.round())
        } else {
            format!("{value:.0e}")
        }
    }
}

/// A linear axis's tick: six significant digits at most, without float noise
/// (-0.9, not -0.9000000000000002).
fn linear_label(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{}", if v == 0.0 { 0.0 } else { v });
    }
    let decimals = (5 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
    let text = format!("{v:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// Whether a panel's y axis is drawn on a log scale: asked for, or a loss whose
/// positive values span a decade or more (so its minima stay visible).
fn log_y(panel: &Panel) -> bool {
    let ys: Vec<f64> = panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
    let spans_decades = !ys.is_empty()
        && ys.iter().all(|y| *y > 0.0 && y.is_finite())
        && ys.iter().copied().fold(0f64, f64::max) / ys.iter().copied().fold(f64::INFINITY, f64::min) >= 10.0;
    panel.log_y || (panel.y_label.to_lowercase().contains("loss") && spans_decades)
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> Result<(), String> {
    let xs: Vec<f64> = panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    let ys: Vec<f64> = panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
    let (sx, sy) = (Scale::choose(panel.log_x, &xs), Scale::choose(log_y(panel), &ys));
    // Points a logarithmic axis can't show (zero or negative) are left out.
    let series: Vec<Vec<(f64, f64)>> = panel
        .series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter_map(|&(x, y)| Some((sx.at(x)?, sy.at(y)?)))
                .collect()
        })
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in series.iter().flatten() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = |lo: f64, hi: f64| {
        let d = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
        (lo - d, hi + d)
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_labels(sx.labels(x0, x1))
        .y_labels(sy.labels(y0, y1))
        .x_label_formatter(&|v| sx.label(*v))
        .y_label_formatter(&|v| sy.label(*v))
        .x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (points, s)) in series.iter().zip(&panel.series).enumerate() {
        let color = Palette99::pick(i).mix(0.9);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, figure: &Figure) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((1, figure.panels.len().max(1)));
    for (area, panel) in panels.iter().zip(&figure.panels) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Writes `<name>.svg` and `<name>.png` into `dir`; returns the files written.
pub fn write(figure: &Figure, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !ensure_font() {
        anyhow::bail!(
            "no TrueType font found to lay out figure text: install fonts-dejavu-core or set ABLATE_FONT to a .ttf \
             file (`--format json` gives the figure data without drawing)"
        );
    }
    std::fs::create_dir_all(dir)?;
    let size = (PANEL_WIDTH * figure.panels.len().max(1) as u32, HEIGHT);
    let svg = dir.join(format!("{}.svg", figure.name));
    draw(SVGBackend::new(&svg, size).into_drawing_area(), figure)
        .map_err(|e| anyhow::anyhow!("{}: {e}", svg.display()))?;
    let png = dir.join(format!("{}.png", figure.name));
    draw(BitMapBackend::new(&png, size).into_drawing_area(), figure)
        .map_err(|e| anyhow::anyhow!("{}: {e}", png.display()))?;
    Ok(vec![svg, png])
}

#[cfg(test)]
mod tests {
    use ablate_experiments::report::{Figure, Panel, Series};

    #[test]
    fn figures_are_written_as_svg_and_png() {
        let figure = Figure {
            name: "f".into(),
            title: "t".into(),
            panels: vec![Panel {
                title: "p".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                series: vec![Series {
                    label: "s".into(),
                    points: vec![(1.0, 1.0), (10.0, 2.0)],
                }],
                log_x: true,
                log_y: false,
            }],
        };
        let dir = std::env::temp_dir().join(format!("ablate-plot-{}", std::process::id()));
        let written = super::write(&figure, &dir).unwrap();
        assert_eq!(written.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn log_axes_tick_at_round_values() {
        use super::Scale;
        // Batch sizes and widths: powers of two, labelled as such.
        let widths = [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];
        let scale = Scale::choose(true, &widths);
        assert_eq!(scale, Scale::Log(2.0));
        let labels: Vec<String> = (6..=11).map(|e| scale.label(e as f64)).collect();
        assert_eq!(labels, ["64", "128", "256", "512", "1024", "2048"]);
        assert_eq!(scale.label(8.5), "", "no label between whole powers");
        assert_eq!(scale.labels(5.8, 11.2), 6);
        // Data budgets over decades: decades.
        let budgets = [1e3, 3.2e3, 1e4, 3.2e4, 1e5, 1e6];
        let scale = Scale::choose(true, &budgets);
        assert_eq!(scale, Scale::Log(10.0));
        assert_eq!(scale.label(3.0), "1000");
        assert_eq!(scale.label(6.0), "1e6");
        assert_eq!(scale.label(-3.0), "0.001");
        assert_eq!(scale.label(3.5), "", "not 3162.28");
        // Within two decades, powers of two; linear axes stay linear.
        assert_eq!(Scale::choose(true, &[1000.0, 5000.0]), Scale::Log(2.0));
        assert_eq!(Scale::choose(false, &widths), Scale::Linear);
        assert_eq!(Scale::Log(2.0).label(-1.0), "0.5");
        assert_eq!(Scale::Log(2.0).label(20.0), "2^20");
        assert_eq!(Scale::Linear.label(-0.9000000000000002), "-0.9");
        assert_eq!(Scale::Linear.label(1234.5), "1234.5");
        assert_eq!(Scale::Linear.label(0.0), "0");
        assert_eq!(Scale::Linear.label(2.5e-8), "0.000000025");
    }

    #[test]
    fn a_loss_spanning_decades_is_drawn_on_a_log_axis() {
        let panel = |y_label: &str, ys: &[f64]| Panel {
            title: "p".into(),
            x_label: "step".into(),
            y_label: y_label.into(),
            series: vec![Series {
                label: "s".into(),
                points: ys.iter().enumerate().map(|(i, y)| (i as f64, *y)).collect(),
            }],
            log_x: false,
            log_y: false,
        };
        assert!(super::log_y(&panel("eval loss", &[5.0, 0.4, 0.03])));
        assert!(!super::log_y(&panel("eval loss", &[2.0, 1.5, 1.2])));
        assert!(!super::log_y(&panel("accuracy", &[0.01, 0.5, 0.99])));
        assert!(
            !super::log_y(&panel("train loss", &[5.0, 0.0, 0.03])),
            "a zero can't be drawn on it"
        );
    }
}
