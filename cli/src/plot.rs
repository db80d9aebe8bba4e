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

/// A value on a logarithmic axis is drawn at its log10; ticks show the value itself.
fn axis_value(log: bool, v: f64) -> Option<f64> {
    match log {
        false => Some(v),
        true if v > 0.0 => Some(v.log10()),
        true => None,
    }
}

fn tick_label(log: bool, v: f64) -> String {
    if !log {
        return format!("{v}");
    }
    let value = 10f64.powf(v);
    if (0.01..100_000.0).contains(&value) {
        format!("{}", (value * 100.0).round() / 100.0)
    } else {
        format!("{value:.0e}")
    }
}

fn draw_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> Result<(), String> {
    // Points a logarithmic axis can't show (zero or negative) are left out.
    let series: Vec<Vec<(f64, f64)>> = panel
        .series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter_map(|&(x, y)| Some((axis_value(panel.log_x, x)?, axis_value(panel.log_y, y)?)))
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
    let (log_x, log_y) = (panel.log_x, panel.log_y);
    chart
        .configure_mesh()
        .x_label_formatter(&|v| tick_label(log_x, *v))
        .y_label_formatter(&|v| tick_label(log_y, *v))
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
}
