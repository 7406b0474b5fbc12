//! A cumulative distribution chart of start latencies as a standalone SVG: one step line per
//! group, latency on x (logarithmic when the values span more than two decades), share of
//! containers on y, with axes, grid, ticks and a legend.

use std::fmt::Write as _;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One line of the chart: a name and its latencies in seconds.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn label(seconds: f64) -> String {
    if seconds >= 1.0 {
        format!("{seconds:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + " s"
    } else {
        format!("{:.3}", seconds * 1e3)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + " ms"
    }
}

/// Renders the chart; `title` names the measure.
pub fn cdf(title: &str, series: &[Series]) -> String {
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        escape(title)
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    if all.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">no measurements</text></svg>"#,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
        return out;
    }
    let log = lo > 0.0 && hi / lo > 100.0;
    let (x0, x1) = if log {
        (lo.log10().floor(), hi.log10().ceil())
    } else {
        (0.0, if hi > 0.0 { hi * 1.05 } else { 1.0 })
    };
    let x = |v: f64| {
        let t = if log { v.max(lo).log10() } else { v };
        LEFT + (t - x0) / (x1 - x0) * plot_w
    };
    let y = |share: f64| TOP + (1.0 - share) * plot_h;
    // Grid and y ticks.
    for i in 0..=4 {
        let share = f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}%</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y(share) + 4.0,
            i * 25,
            y = y(share),
        );
    }
    // X ticks.
    let ticks: Vec<f64> = if log {
        (x0 as i32..=x1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=5).map(|i| x1 * f64::from(i) / 5.0).collect()
    };
    for t in ticks {
        let _ = writeln!(
            out,
            r##"<line x1="{xt}" x2="{xt}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{xt}" y="{}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 18.0,
            label(t),
            xt = x(t),
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>
<text x="{}" y="{}" text-anchor="middle">latency{}</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">containers</text>"##,
        LEFT + plot_w / 2.0,
        HEIGHT - 18.0,
        if log { " (log scale)" } else { "" },
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut values: Vec<f64> = s
            .values
            .iter()
            .copied()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .collect();
        values.sort_by(f64::total_cmp);
        if !values.is_empty() {
            let n = values.len() as f64;
            let mut points = format!("{:.1},{:.1}", x(values[0]), y(0.0));
            for (k, v) in values.iter().enumerate() {
                let (px, before, after) = (x(*v), y(k as f64 / n), y((k + 1) as f64 / n));
                let _ = write!(points, " {px:.1},{before:.1} {px:.1},{after:.1}");
            }
            let _ = write!(points, " {:.1},{:.1}", LEFT + plot_w, y(1.0));
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>"#
            );
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let _ = writeln!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{} (n={})</text>"#,
            LEFT + plot_w + 12.0,
            LEFT + plot_w + 32.0,
            LEFT + plot_w + 38.0,
            ly + 4.0,
            escape(&s.name),
            values.len()
        );
    }
    out.push_str("</svg>\n");
    out
}

/// One bar of a waterfall: a label and its segments (phase, start and end in seconds since
/// the pod's start).
#[derive(Clone, Debug)]
pub struct Bar {
    pub label: String,
    pub segments: Vec<(&'static str, f64, f64)>,
}

/// Colours of the waterfall's phases.
const PHASE_COLORS: [(&str, &str); 6] = [
    ("sandbox", "#9467bd"),
    ("pull", "#d62728"),
    ("gap", "#bbbbbb"),
    ("create", "#ff7f0e"),
    ("start", "#2ca02c"),
    ("first_log", "#1f77b4"),
];

/// Renders a waterfall: one bar per row, time since the pod's start on x, then `below` (a
/// whole chart, [`cdf`]'s) under it.
pub fn waterfall(title: &str, bars: &[Bar], below: Option<&str>) -> String {
    let row = 18.0;
    let plot_h = (bars.len().max(1) as f64) * row;
    let left = 260.0;
    let plot_w = WIDTH - left - 40.0;
    let height = TOP + plot_h + 70.0;
    let end = bars
        .iter()
        .flat_map(|b| b.segments.iter().map(|s| s.2))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    let x = |v: f64| left + v.max(0.0) / end * plot_w;
    let total_h = height + if below.is_some() { HEIGHT } else { 0.0 };
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{total_h}" viewBox="0 0 {WIDTH} {total_h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let t = end * f64::from(i) / 5.0;
        let _ = writeln!(
            out,
            r##"<line x1="{xt}" x2="{xt}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{xt}" y="{}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            label(t),
            xt = x(t),
        );
    }
    for (i, bar) in bars.iter().enumerate() {
        let y = TOP + i as f64 * row;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y + row * 0.7,
            escape(&bar.label)
        );
        for (phase, from, to) in &bar.segments {
            let color = PHASE_COLORS
                .iter()
                .find(|(p, _)| p == phase)
                .map_or("#333", |(_, c)| c);
            let _ = writeln!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{phase} {}</title></rect>"#,
                x(*from),
                y + 2.0,
                (x(*to) - x(*from)).max(1.0),
                row - 4.0,
                label(to - from)
            );
        }
    }
    for (i, (phase, color)) in PHASE_COLORS.iter().enumerate() {
        let lx = left + i as f64 * 80.0;
        let ly = TOP + plot_h + 40.0;
        let _ = writeln!(
            out,
            r#"<rect x="{lx}" y="{}" width="14" height="10" fill="{color}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 9.0,
            lx + 18.0,
            phase.replace('_', " ")
        );
    }
    if let Some(chart) = below {
        let _ = writeln!(out, r#"<g transform="translate(0 {height})">{chart}</g>"#);
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_a_step_and_names_are_escaped() {
        let svg = cdf(
            "start -> first log",
            &[
                Series {
                    name: "a<b".into(),
                    values: vec![0.1, 0.2, 0.3],
                },
                Series {
                    name: "slow".into(),
                    values: vec![50.0],
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b (n=3)"));
        assert!(
            svg.contains("(log scale)"),
            "0.1 s to 50 s spans more than two decades"
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        let empty = cdf("nothing", &[]);
        assert!(empty.contains("no measurements"));
    }
}
