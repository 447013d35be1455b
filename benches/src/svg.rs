//! Line charts written as SVG by hand: a figure of panels side by side,
//! each with categorical x positions (policy counts, percentiles), a linear
//! or logarithmic y axis, one line per series and optional horizontal guide
//! lines (a 0% baseline, a 2% bar). Colours follow series names across
//! panels, with one legend for the figure.

use std::{fmt::Write as _, path::Path};

/// A figure: a title, a subtitle (machine, method) and panels in a grid.
#[derive(Debug, Clone, Default)]
pub struct Figure {
    pub title: String,
    pub subtitle: String,
    pub panels: Vec<Panel>,
    pub columns: usize,
}

/// One chart.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// One label per x position.
    pub x_ticks: Vec<String>,
    pub series: Vec<Series>,
    pub y_log: bool,
    /// Horizontal lines: (y, label).
    pub guides: Vec<(f64, String)>,
}

/// A line: one value (or a gap) per x position.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];
const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 48.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" step (1, 2 or 5 times a power of ten) near `range / target`.
fn nice_step(range: f64, target: f64) -> f64 {
    let raw = (range / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let frac = raw / mag;
    let nice = if frac <= 1.0 {
        1.0
    } else if frac <= 2.0 {
        2.0
    } else if frac <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if a >= 100.0 || (a >= 1.0 && (v - v.round()).abs() < 1e-9) {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

impl Figure {
    pub fn render(&self) -> String {
        let columns = self.columns.clamp(1, self.panels.len().max(1));
        let rows = self.panels.len().div_ceil(columns).max(1);
        // Series names in order of first appearance, for colours and the legend.
        let mut names: Vec<&str> = Vec::new();
        for p in &self.panels {
            for s in &p.series {
                if !names.contains(&s.name.as_str()) {
                    names.push(&s.name);
                }
            }
        }
        let colour = |name: &str| {
            let i = names.iter().position(|n| *n == name).unwrap_or(0);
            PALETTE[i % PALETTE.len()]
        };
        let header = 58.0;
        // Panels stretch so that the figure is at least 880 px wide (room
        // for the title and the legend).
        let panel_w = PANEL_W.max(880.0 / columns as f64);
        let width = columns as f64 * panel_w;
        // The legend wraps onto as many rows as it needs.
        let mut legend: Vec<(f64, f64, &str)> = Vec::new();
        let (mut lx, mut row) = (16.0, 0.0);
        for name in &names {
            let w = 40.0 + name.len() as f64 * 7.0;
            if lx + w > width && lx > 16.0 {
                lx = 16.0;
                row += 1.0;
            }
            legend.push((lx, header + 12.0 + row * 20.0, name));
            lx += w;
        }
        let legend_h = 26.0 + row * 20.0;
        let height = header + legend_h + rows as f64 * PANEL_H;
        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            o,
            r##"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="16" font-weight="bold">{}</text><text x="{}" y="42" text-anchor="middle" fill="#555">{}</text>"##,
            width / 2.0,
            esc(&self.title),
            width / 2.0,
            esc(&self.subtitle)
        );
        for (lx, ly, name) in legend {
            let _ = writeln!(
                o,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2.5"/><circle cx="{}" cy="{ly}" r="3" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                lx + 22.0,
                colour(name),
                lx + 11.0,
                colour(name),
                lx + 28.0,
                ly + 4.0,
                esc(name)
            );
        }
        for (i, p) in self.panels.iter().enumerate() {
            let ox = (i % columns) as f64 * panel_w;
            let oy = header + legend_h + (i / columns) as f64 * PANEL_H;
            p.render(&mut o, ox, oy, panel_w, &colour);
        }
        o.push_str("</svg>\n");
        o
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.render())
    }
}

impl Panel {
    fn render(
        &self,
        o: &mut String,
        ox: f64,
        oy: f64,
        panel_w: f64,
        colour: &dyn Fn(&str) -> &'static str,
    ) {
        let (x0, x1) = (ox + LEFT, ox + panel_w - RIGHT);
        let (y0, y1) = (oy + PANEL_H - BOTTOM, oy + TOP);
        let mut values: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten().copied())
            .filter(|v| v.is_finite() && (!self.y_log || *v > 0.0))
            .collect();
        values.extend(self.guides.iter().map(|g| g.0));
        let (mut lo, mut hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if !lo.is_finite() {
            (lo, hi) = if self.y_log { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        let ticks: Vec<f64>;
        let map: Box<dyn Fn(f64) -> f64>;
        if self.y_log {
            let (a, b) = (
                lo.log10().floor(),
                hi.log10().ceil().max(lo.log10().floor() + 1.0),
            );
            // 1, 2 and 5 per decade when there are few decades.
            let steps: &[f64] = if b - a <= 3.0 {
                &[1.0, 2.0, 5.0]
            } else {
                &[1.0]
            };
            ticks = (a as i32..=b as i32)
                .flat_map(|e| steps.iter().map(move |m| m * 10f64.powi(e)))
                .filter(|v| *v <= 10f64.powf(b) * 1.0001)
                .collect();
            map = Box::new(move |v: f64| y0 - (v.max(1e-12).log10() - a) / (b - a) * (y0 - y1));
        } else {
            if hi - lo < 1e-9 {
                hi = lo + 1.0;
            }
            let pad = (hi - lo) * 0.08;
            let step = nice_step(hi - lo + 2.0 * pad, 6.0);
            let a = ((lo - pad) / step).floor() * step;
            let b = ((hi + pad) / step).ceil() * step;
            ticks = (0..=((b - a) / step).round() as i64)
                .map(|k| a + k as f64 * step)
                .collect();
            map = Box::new(move |v: f64| y0 - (v - a) / (b - a) * (y0 - y1));
        }
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{}</text>"#,
            (x0 + x1) / 2.0,
            oy + 16.0,
            esc(&self.title)
        );
        for t in &ticks {
            let y = map(*t);
            let _ = writeln!(
                o,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#333">{}</text>"##,
                x0 - 5.0,
                y + 4.0,
                fmt_tick(*t)
            );
        }
        let _ = writeln!(
            o,
            r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#333"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#333"/>"##
        );
        let n = self.x_ticks.len().max(1);
        let xpos = |i: usize| x0 + (i as f64 + 0.5) * (x1 - x0) / n as f64;
        for (i, label) in self.x_ticks.iter().enumerate() {
            let _ = writeln!(
                o,
                r##"<text x="{:.1}" y="{}" text-anchor="middle" fill="#333">{}</text>"##,
                xpos(i),
                y0 + 16.0,
                esc(label)
            );
        }
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            y0 + 36.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            o,
            r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            ox + 16.0,
            (y0 + y1) / 2.0,
            esc(&self.y_label)
        );
        for (v, label) in &self.guides {
            let y = map(*v);
            let _ = writeln!(
                o,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#888" stroke-dasharray="5,4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#666" font-size="11">{}</text>"##,
                x1 - 2.0,
                y - 4.0,
                esc(label)
            );
        }
        for s in &self.series {
            let c = colour(&s.name);
            let mut segment: Vec<String> = Vec::new();
            let flush = |o: &mut String, seg: &mut Vec<String>| {
                if seg.len() > 1 {
                    let _ = writeln!(
                        o,
                        r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                        seg.join(" ")
                    );
                }
                seg.clear();
            };
            for (i, v) in s.values.iter().enumerate() {
                match v {
                    Some(v) if v.is_finite() && (!self.y_log || *v > 0.0) => {
                        let (x, y) = (xpos(i), map(*v));
                        segment.push(format!("{x:.1},{y:.1}"));
                        let _ = writeln!(
                            o,
                            r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{c}"><title>{}: {}</title></circle>"#,
                            esc(&s.name),
                            fmt_tick(*v)
                        );
                    }
                    _ => flush(o, &mut segment),
                }
            }
            flush(o, &mut segment);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_figure() {
        let f = Figure {
            title: "t <1>".into(),
            subtitle: "s".into(),
            columns: 2,
            panels: vec![
                Panel {
                    title: "a".into(),
                    x_ticks: vec!["0".into(), "10".into(), "100".into()],
                    series: vec![Series {
                        name: "netpol".into(),
                        values: vec![Some(0.5), None, Some(1.5)],
                    }],
                    guides: vec![(2.0, "2% bar".into())],
                    ..Panel::default()
                },
                Panel {
                    title: "b".into(),
                    x_ticks: vec!["p50".into(), "p99".into()],
                    series: vec![Series {
                        name: "iptables".into(),
                        values: vec![Some(100.0), Some(2000.0)],
                    }],
                    y_log: true,
                    ..Panel::default()
                },
            ],
        };
        let svg = f.render();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.contains("polyline"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(7.0, 6.0), 2.0);
        assert_eq!(nice_step(0.9, 6.0), 0.2);
    }
}
