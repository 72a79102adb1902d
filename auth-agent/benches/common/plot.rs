//! Latency distributions as an SVG picture: one curve per run, latency
//! against percentile.

use std::fmt::Write as _;
use std::time::Duration;

const W: f64 = 860.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 330.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// How far right percentile `q` sits: -log10(1 - q), capped at 99.9 %.
fn tail(q: f64) -> f64 {
    (-(1.0 - q).max(1e-3).log10()).min(3.0)
}

/// The SVG of `series` (name, latencies) titled `title`: percentile on the
/// x axis spread as HdrHistogram does (0 %, 90 %, 99 %, 99.9 % equally
/// apart), latency on a logarithmic y axis.
pub fn cdf_svg(title: &str, series: &[(String, Vec<Duration>)]) -> String {
    let us = |d: &Duration| d.as_secs_f64() * 1e6;
    let all = series.iter().flat_map(|(_, l)| l.iter().map(us));
    let (lo, hi) = all.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lo_dec = lo.max(1.0).log10().floor();
    let hi_dec = hi.max(10.0).log10().ceil().max(lo_dec + 1.0);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |q: f64| LEFT + tail(q) / 3.0 * pw;
    let y = |v: f64| TOP + ph - (v.max(1.0).log10() - lo_dec) / (hi_dec - lo_dec) * ph;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" font-size="14" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        escape(title)
    );
    // Latency grid: decades and their 2× and 5×.
    let mut dec = lo_dec;
    while dec <= hi_dec {
        for m in [1.0, 2.0, 5.0] {
            let v = 10f64.powf(dec) * m;
            if v.log10() > hi_dec + 1e-9 {
                break;
            }
            let gy = y(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="{}" stroke-width="1"/>"##,
                LEFT + pw,
                if m == 1.0 { "#bbb" } else { "#e5e5e5" }
            );
            let label = if v >= 1000.0 {
                format!("{} ms", v / 1000.0)
            } else {
                format!("{v} µs")
            };
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
                LEFT - 6.0,
                gy + 4.0
            );
        }
        dec += 1.0;
    }
    for (q, label) in [
        (0.0, "0 %"),
        (0.5, "50 %"),
        (0.9, "90 %"),
        (0.99, "99 %"),
        (0.999, "99.9 %"),
    ] {
        let gx = x(q);
        let _ = writeln!(
            svg,
            r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            svg,
            r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + ph + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile of pairs (latency on a log scale)</text>"#,
        LEFT + pw / 2.0,
        H - 10.0
    );
    for (i, (name, lat)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut sorted: Vec<f64> = lat.iter().map(us).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len().max(1) as f64;
        let mut points = String::new();
        let mut last_x = f64::MIN;
        for (k, v) in sorted.iter().enumerate() {
            let q = k as f64 / n;
            let px = x(q);
            // One point per pixel column, and always the last.
            if px - last_x >= 1.0 || k + 1 == sorted.len() {
                let _ = write!(points, "{px:.1},{:.1} ", y(*v));
                last_x = px;
            }
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>"#
        );
        let ly = TOP + 10.0 + i as f64 * 22.0;
        let lx = LEFT + pw + 16.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/>"#,
            lx + 22.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 28.0,
            ly + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}
