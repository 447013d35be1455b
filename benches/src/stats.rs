//! Summaries of latency samples (nanoseconds in, microseconds out) and the
//! overhead of one mode over a baseline.

use serde::Serialize;

/// Exact statistics of a set of samples, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub mean_us: f64,
    pub stddev_us: f64,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Nearest-rank percentile (`q` in 0..=1) of sorted samples.
pub fn percentile_sorted(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarizes samples given in nanoseconds.
pub fn summarize(samples_ns: &[u64]) -> Summary {
    if samples_ns.is_empty() {
        return Summary::default();
    }
    let mut sorted = samples_ns.to_vec();
    sorted.sort_unstable();
    let n = sorted.len() as f64;
    let mean = sorted.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = sorted
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0).max(1.0);
    let us = |ns: u64| ns as f64 / 1000.0;
    Summary {
        n: sorted.len(),
        mean_us: mean / 1000.0,
        stddev_us: var.sqrt() / 1000.0,
        min_us: us(sorted[0]),
        p50_us: us(percentile_sorted(&sorted, 0.50)),
        p90_us: us(percentile_sorted(&sorted, 0.90)),
        p99_us: us(percentile_sorted(&sorted, 0.99)),
        p999_us: us(percentile_sorted(&sorted, 0.999)),
        max_us: us(sorted[sorted.len() - 1]),
    }
}

/// How much slower `x` is than `base`, in percent.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Overhead {
    /// (mean(x) - mean(base)) / mean(base).
    pub mean_pct: f64,
    /// Half-width of the 95% confidence interval of `mean_pct` (normal
    /// approximation from both standard errors): a difference smaller than
    /// this is within the noise of the run.
    pub mean_ci95_pct: f64,
    /// (p50(x) - p50(base)) / p50(base): insensitive to the odd slow request.
    pub p50_pct: f64,
    /// (p99(x) - p99(base)) / p99(base).
    pub p99_pct: f64,
}

pub fn overhead(base: &Summary, x: &Summary) -> Overhead {
    if base.n == 0 || x.n == 0 || base.mean_us == 0.0 {
        return Overhead::default();
    }
    let se = (base.stddev_us.powi(2) / base.n as f64 + x.stddev_us.powi(2) / x.n as f64).sqrt();
    Overhead {
        mean_pct: (x.mean_us - base.mean_us) / base.mean_us * 100.0,
        mean_ci95_pct: 1.96 * se / base.mean_us * 100.0,
        p50_pct: (x.p50_us - base.p50_us) / base.p50_us * 100.0,
        p99_pct: (x.p99_us - base.p99_us) / base.p99_us * 100.0,
    }
}

/// Median and a nearest-rank percentile of durations in milliseconds.
pub fn median_and(samples_ms: &[f64], q: f64) -> (f64, f64) {
    if samples_ms.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut s = samples_ms.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = (q * s.len() as f64).ceil() as usize;
        s[rank.clamp(1, s.len()) - 1]
    };
    (at(0.5), at(q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_sorted(&v, 0.5), 50);
        assert_eq!(percentile_sorted(&v, 0.99), 99);
        assert_eq!(percentile_sorted(&v, 1.0), 100);
        assert_eq!(percentile_sorted(&v, 0.0), 1);
    }

    #[test]
    fn summary_and_overhead() {
        let base = summarize(&[1000, 1000, 1000, 1000]);
        let x = summarize(&[1100, 1100, 1100, 1100]);
        assert_eq!(base.mean_us, 1.0);
        let o = overhead(&base, &x);
        assert!((o.mean_pct - 10.0).abs() < 1e-9, "{o:?}");
        assert_eq!(o.mean_ci95_pct, 0.0);
    }
}
