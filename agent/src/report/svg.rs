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
