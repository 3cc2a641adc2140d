//! Self-contained HTML reports (tables + inline SVG plots drawn with plotters): one file that
//! opens offline in any browser. `diff`, `eval` and `compile` write them with `--report`.

use std::fmt::Write;
use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

pub struct Report {
    title: String,
    body: String,
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

impl Report {
    pub fn new(title: &str) -> Report {
        Report { title: title.to_string(), body: String::new() }
    }

    pub fn heading(&mut self, text: &str) -> &mut Self {
        let _ = writeln!(self.body, "<h2>{}</h2>", escape(text));
        self
    }

    pub fn para(&mut self, text: &str) -> &mut Self {
        let _ = writeln!(self.body, "<p>{}</p>", escape(text));
        self
    }

    /// A table; cells are text (escaped).
    pub fn table<S: AsRef<str>>(&mut self, headers: &[&str], rows: &[Vec<S>]) -> &mut Self {
        self.body.push_str("<table>\n<tr>");
        for h in headers {
            let _ = write!(self.body, "<th>{}</th>", escape(h));
        }
        self.body.push_str("</tr>\n");
        for r in rows {
            self.body.push_str("<tr>");
            for c in r {
                let _ = write!(self.body, "<td>{}</td>", escape(c.as_ref()));
            }
            self.body.push_str("</tr>\n");
        }
        self.body.push_str("</table>\n");
        self
    }

    /// An SVG drawn by one of the plot functions below.
    pub fn svg(&mut self, svg: &str) -> &mut Self {
        let _ = writeln!(self.body, "<div class=\"plot\">{svg}</div>");
        self
    }

    pub fn html(&self) -> String {
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
             body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
             table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;\
             vertical-align:top;font-size:0.9em}}th{{background:#f3f3f3}}.plot{{margin:1em 0}}</style></head>\
             <body><h1>{t}</h1>\n<p>mechc {v}</p>\n{b}</body></html>\n",
            t = escape(&self.title),
            v = env!("CARGO_PKG_VERSION"),
            b = self.body
        )
    }

    /// Written atomically (never a half-written report).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::io::atomic::write_file(path, self.html().as_bytes())
    }
}

/// `s` on one line (newlines shown as ⏎, other control characters as spaces), cut to `n`
/// characters.
pub fn one_line(s: &str, n: usize) -> String {
    let flat: String = s.trim().replace('\n', " ⏎ ").chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() > n {
        flat.chars().take(n).collect::<String>() + "…"
    } else {
        flat
    }
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("plot: {e}"))
}

/// Histogram of `values` in `bins` equal bins from 0 (or the minimum, if negative) to the maximum.
pub fn histogram_svg(values: &[f64], bins: usize, title: &str, x_label: &str) -> Result<String> {
    let mut s = String::new();
    let lo = values.iter().copied().fold(0f64, f64::min);
    let hi = values.iter().copied().fold(f64::MIN, f64::max).max(lo + 1e-12);
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for &v in values {
        counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.05;
    {
        let root = SVGBackend::with_string(&mut s, (640, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(lo..hi, 0f64..top)
            .map_err(plot_err)?;
        c.configure_mesh().x_desc(x_label).y_desc("count").disable_x_mesh().draw().map_err(plot_err)?;
        c.draw_series(counts.iter().enumerate().map(|(i, &n)| {
            let x0 = lo + i as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width, n as f64)], BLUE.mix(0.6).filled())
        }))
        .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(s)
}

/// Lines through (x, y) points, one per named series, with a legend.
pub fn lines_svg(series: &[(String, Vec<(f64, f64)>)], title: &str, x_label: &str, y_label: &str) -> Result<String> {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return Err(Error::invalid("plot: no points"));
    }
    let pad = |a: f64, b: f64| if b - a < 1e-12 { (a - 0.5, b + 0.5) } else { (a - 0.05 * (b - a), b + 0.05 * (b - a)) };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (640, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        c.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(plot_err)?;
        for (i, (name, p)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            c.draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            c.draw_series(p.iter().map(|&xy| Circle::new(xy, 3, color.filled()))).map_err(plot_err)?;
        }
        if series.len() > 1 {
            c.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(s)
}

/// One panel of [`heatmaps_svg`]: `values[row][col]`, rows labelled top to bottom, columns
/// numbered from 0.
pub struct Heatmap {
    pub title: String,
    pub rows: Vec<String>,
    pub values: Vec<Vec<f64>>,
    /// The colour of the panel's highest value; its lowest is white. NaN cells are grey.
    pub color: RGBColor,
    pub x_label: String,
}

/// Heatmaps side by side (e.g. ROME's causal-trace figure: tokens × layers per kind). Each
/// panel's title carries its value range.
pub fn heatmaps_svg(panels: &[Heatmap], title: &str) -> Result<String> {
    use plotters::coord::ranged1d::SegmentValue;
    let rows = panels.iter().map(|p| p.rows.len()).max().unwrap_or(0);
    let cols = panels.iter().flat_map(|p| p.values.iter().map(Vec::len)).max().unwrap_or(0);
    if panels.is_empty() || rows == 0 || cols == 0 {
        return Err(Error::invalid("plot: no cells"));
    }
    let label_w = panels.iter().flat_map(|p| p.rows.iter()).map(|r| r.chars().count()).max().unwrap_or(4) as u32 * 7 + 12;
    let (pw, h) = (label_w + 24 + 9 * cols as u32, 110 + 18 * rows as u32);
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (pw * panels.len() as u32, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root.titled(title, ("sans-serif", 16)).map_err(plot_err)?;
        for (area, p) in root.split_evenly((1, panels.len())).iter().zip(panels) {
            let finite = p.values.iter().flatten().copied().filter(|v| v.is_finite());
            let (lo, hi) = finite.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
            let span = if hi > lo { hi - lo } else { 1.0 };
            let n = p.rows.len() as i32;
            let mut c = ChartBuilder::on(area)
                .caption(format!("{} ({:.3} – {:.3})", p.title, lo, hi), ("sans-serif", 13))
                .margin(6)
                .x_label_area_size(34)
                .y_label_area_size(label_w)
                .build_cartesian_2d((0..cols as i32).into_segmented(), (0..n).into_segmented())
                .map_err(plot_err)?;
            let labels = &p.rows;
            c.configure_mesh()
                .disable_mesh()
                .x_desc(p.x_label.as_str())
                .x_labels(cols)
                .y_labels(labels.len())
                .x_label_formatter(&|x| match x {
                    SegmentValue::CenterOf(v) if v % 5 == 0 => v.to_string(),
                    _ => String::new(),
                })
                .y_label_formatter(&|y| match y {
                    SegmentValue::CenterOf(v) if *v >= 0 && *v < n => one_line(&labels[(n - 1 - v) as usize], 24),
                    _ => String::new(),
                })
                .label_style(("sans-serif", 11))
                .draw()
                .map_err(plot_err)?;
            let cells = p.values.iter().enumerate().flat_map(|(r, row)| row.iter().enumerate().map(move |(col, &v)| (r, col, v)));
            c.draw_series(cells.map(|(r, col, v)| {
                let y = n - 1 - r as i32;
                let fill = if v.is_finite() {
                    let a = ((v - lo) / span).clamp(0.0, 1.0);
                    let mix = |w: u8| (255.0 - a * (255.0 - w as f64)).round() as u8;
                    RGBColor(mix(p.color.0), mix(p.color.1), mix(p.color.2))
                } else {
                    RGBColor(200, 200, 200)
                };
                Rectangle::new(
                    [(SegmentValue::Exact(col as i32), SegmentValue::Exact(y)), (SegmentValue::Exact(col as i32 + 1), SegmentValue::Exact(y + 1))],
                    fill.filled(),
                )
            }))
            .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_escaped_and_plots_are_svg() {
        let mut r = Report::new("t<1>");
        r.table(&["a"], &[vec!["<script>"]]);
        r.svg(&histogram_svg(&[0.0, 0.1, 0.1, 0.5], 5, "h", "x").unwrap());
        r.svg(&lines_svg(&[("s".into(), vec![(0.0, 1.0), (1.0, 2.0)])], "l", "x", "y").unwrap());
        let hm = Heatmap {
            title: "h".into(),
            rows: vec!["a*".into(), "<b>".into()],
            values: vec![vec![0.0, 1.0, f64::NAN], vec![0.5, 0.5, 0.5]],
            color: RGBColor(0, 100, 0),
            x_label: "layer".into(),
        };
        let svg = heatmaps_svg(&[hm], "t").unwrap();
        assert!(svg.contains("a*") && !svg.contains("<b>") && svg.matches("<rect").count() >= 6, "{svg}");
        r.svg(&svg);
        let html = r.html();
        assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"));
        assert_eq!(html.matches("<svg").count(), 3);
        // A constant value still gets a drawable range.
        assert!(histogram_svg(&[0.0, 0.0], 3, "h", "x").unwrap().contains("<rect"));
    }
}
