//! SVG line charts (plotters, SVG backend only: no system fonts, no bitmaps), for the papers'
//! figures and per-run plots. The SVG text is the same on every machine for the same data.

use std::ops::Range;
use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Width and height of a chart, in pixels.
pub const WIDTH_PX: u32 = 900;
pub const HEIGHT_PX: u32 = 600;
/// Most series and points one chart takes.
pub const SERIES_MAX: usize = 64;
pub const POINTS_MAX: usize = 100_000;

/// Why a chart cannot be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("nothing to plot: no series has a point")]
    Empty,
    #[error("{count} {what} is more than the limit of {max}")]
    TooMany { what: &'static str, count: usize, max: usize },
    #[error("series {series:?} has a non-finite point ({x}, {y})")]
    NotFinite { series: String, x: f64, y: f64 },
    #[error("series {series:?} has x = {x}, which a log-scale axis cannot show")]
    NonPositiveLogX { series: String, x: f64 },
    #[error("drawing the chart: {0}")]
    Draw(String),
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// How a series is drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stroke {
    /// A solid line with a dot at every point (measurements).
    #[default]
    Points,
    /// A dashed line without dots (theory, bounds).
    Dashed,
    /// A thin solid line without dots (many series, step curves).
    Line,
}

/// Series colours in order (Tableau 10: distinct, readable on white).
pub const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// One named line.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub stroke: Stroke,
    /// RGB; `None` takes the palette's colour for the series' position.
    pub color: Option<(u8, u8, u8)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, stroke: Stroke::Points, color: None }
    }

    pub fn dashed(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, stroke: Stroke::Dashed, color: None }
    }

    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, stroke: Stroke::Line, color: None }
    }

    /// The same series in colour `rgb` (pair a measurement with its bound, say).
    pub fn with_color(mut self, rgb: (u8, u8, u8)) -> Self {
        self.color = Some(rgb);
        self
    }
}

/// A line chart's labels and axes.
#[derive(Clone, Copy, Debug)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Log-scale x axis (every x must then be positive).
    pub log_x: bool,
    /// The y range; `None` fits the data (from 0 when every y is non-negative).
    pub y_range: Option<(f64, f64)>,
}

/// Writes a line chart as SVG to `path` (parent folders are created).
pub fn line_chart_svg(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> Result<(), PlotError> {
    let chart = Chart { title, x_label, y_label, log_x, y_range: None };
    write_svg(path, &chart, series)
}

/// Writes `chart` as SVG to `path` (parent folders are created).
pub fn write_svg(path: &Path, chart: &Chart<'_>, series: &[Series]) -> Result<(), PlotError> {
    let svg = render_svg(chart, series)?;
    let io = |source| PlotError::Write { path: path.display().to_string(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(path, svg).map_err(io)
}

/// The chart as an SVG document.
pub fn render_svg(chart: &Chart<'_>, series: &[Series]) -> Result<String, PlotError> {
    if series.len() > SERIES_MAX {
        return Err(PlotError::TooMany { what: "series", count: series.len(), max: SERIES_MAX });
    }
    let points: usize = series.iter().map(|s| s.points.len()).sum();
    if points > POINTS_MAX {
        return Err(PlotError::TooMany { what: "points", count: points, max: POINTS_MAX });
    }
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    // A log axis over powers of two gets its ticks at powers of two.
    let mut powers_of_two = true;
    for s in series {
        for &(x, y) in &s.points {
            if !x.is_finite() || !y.is_finite() {
                return Err(PlotError::NotFinite { series: s.name.clone(), x, y });
            }
            if chart.log_x && x <= 0.0 {
                return Err(PlotError::NonPositiveLogX { series: s.name.clone(), x });
            }
            powers_of_two &= x > 0.0 && libm::log2(x).fract() == 0.0;
            x_lo = x_lo.min(x);
            x_hi = x_hi.max(x);
            y_lo = y_lo.min(y);
            y_hi = y_hi.max(y);
        }
    }
    if x_lo > x_hi {
        return Err(PlotError::Empty);
    }
    // Room around the data so no point sits on the frame.
    let x_range = if chart.log_x {
        x_lo / 1.15..x_hi * 1.15
    } else {
        let pad = ((x_hi - x_lo) * 0.03).max(1e-9);
        x_lo - pad..x_hi + pad
    };
    let y_range = match chart.y_range {
        Some((lo, hi)) => lo..hi,
        None => {
            let lo = if y_lo >= 0.0 { 0.0 } else { y_lo };
            let pad = ((y_hi - lo) * 0.05).max(1e-9);
            lo..y_hi + pad
        }
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
        let drawn = if chart.log_x {
            let base = if powers_of_two { 2.0 } else { 10.0 };
            draw(&root, chart, series, x_range.log_scale().base(base), y_range)
        } else {
            draw(&root, chart, series, x_range, y_range)
        };
        drawn.map_err(PlotError::Draw)?;
        root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    Ok(svg)
}

/// A number for an axis label: integers plainly, others with up to 3 significant digits.
fn label(v: f64) -> String {
    if v == v.round() && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else if v.abs() >= 0.01 {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

fn draw<X>(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    chart: &Chart<'_>,
    series: &[Series],
    x_range: X,
    y_range: Range<f64>,
) -> Result<(), String>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut ctx = ChartBuilder::on(root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| err(&e))?;
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .x_label_formatter(&|v| label(*v))
        .y_label_formatter(&|v| label(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let (r, g, b) = s.color.unwrap_or(PALETTE[i % PALETTE.len()]);
        let color = RGBColor(r, g, b).to_rgba();
        let style = ShapeStyle { color, filled: false, stroke_width: 2 };
        let points = s.points.iter().copied();
        let anno = match s.stroke {
            Stroke::Points => {
                ctx.draw_series(points.clone().map(|p| Circle::new(p, 3, style.filled())))
                    .map_err(|e| err(&e))?;
                ctx.draw_series(LineSeries::new(points, style)).map_err(|e| err(&e))?
            }
            Stroke::Dashed => {
                ctx.draw_series(DashedLineSeries::new(points, 8, 5, style)).map_err(|e| err(&e))?
            }
            Stroke::Line => {
                let thin = ShapeStyle { stroke_width: 1, ..style };
                ctx.draw_series(LineSeries::new(points, thin)).map_err(|e| err(&e))?
            }
        };
        // Unnamed series (one of many alike) stay out of the legend.
        if s.name.is_empty() {
            continue;
        }
        let anno = anno.label(s.name.as_str());
        match s.stroke {
            Stroke::Points | Stroke::Line => {
                anno.legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style))
            }
            Stroke::Dashed => anno.legend(move |(x, y)| {
                plotters::element::DashedPathElement::new([(x, y), (x + 20, y)], 6, 3, style)
            }),
        };
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(log_x: bool) -> Chart<'static> {
        Chart { title: "spread", x_label: "N", y_label: "rounds", log_x, y_range: None }
    }

    #[test]
    fn draws_series_names_and_labels_as_svg_text() {
        let series = [
            Series::new("push-pull", vec![(16.0, 3.5), (256.0, 6.0), (4096.0, 9.1)]),
            Series::dashed("log3 N + ln ln N + 1", vec![(16.0, 4.5), (4096.0, 10.7)]),
        ];
        let svg = render_svg(&chart(true), &series).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        for text in ["push-pull", "log3 N + ln ln N + 1", "spread", "rounds", "4096", ">\n256\n<"] {
            assert!(svg.contains(text), "missing {text:?}");
        }
        assert!(svg.contains("<circle"), "points are drawn");
        assert_eq!(svg, render_svg(&chart(true), &series).unwrap(), "deterministic");
    }

    #[test]
    fn rejects_what_it_cannot_show() {
        assert!(matches!(render_svg(&chart(false), &[]), Err(PlotError::Empty)));
        let zero = [Series::new("a", vec![(0.0, 1.0)])];
        assert!(matches!(render_svg(&chart(true), &zero), Err(PlotError::NonPositiveLogX { .. })));
        assert!(render_svg(&chart(false), &zero).is_ok());
        let nan = [Series::new("a", vec![(1.0, f64::NAN)])];
        assert!(matches!(render_svg(&chart(false), &nan), Err(PlotError::NotFinite { .. })));
    }

    #[test]
    fn writes_the_file() {
        let dir = std::env::temp_dir().join(format!("feedmesh-plot-{}", std::process::id()));
        let path = dir.join("sub").join("chart.svg");
        line_chart_svg(&path, "t", "x", "y", &[Series::new("a", vec![(1.0, 2.0), (2.0, 3.0)])], false)
            .unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("</svg>"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
