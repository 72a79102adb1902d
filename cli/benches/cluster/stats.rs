//! Percentiles and table cells.

use std::time::Duration;

/// Summary of latency samples in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub mean: f64,
}

/// The `q` quantile (nearest rank) of sorted samples.
fn rank(sorted: &[u64], q: f64) -> f64 {
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// Summary of `samples` (ns), in µs.
pub fn summarize(samples: &[u64]) -> Summary {
    assert!(!samples.is_empty(), "no samples");
    let mut s = samples.to_vec();
    s.sort_unstable();
    Summary {
        n: s.len(),
        p50: rank(&s, 0.50) / 1e3,
        p99: rank(&s, 0.99) / 1e3,
        p999: rank(&s, 0.999) / 1e3,
        mean: s.iter().sum::<u64>() as f64 / s.len() as f64 / 1e3,
    }
}

/// The median of durations.
pub fn median(d: &[Duration]) -> Duration {
    let mut v = d.to_vec();
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// "min–max" of values with one decimal.
pub fn range(v: impl IntoIterator<Item = f64>) -> String {
    let v: Vec<f64> = v.into_iter().collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.1}–{hi:.1}")
}
