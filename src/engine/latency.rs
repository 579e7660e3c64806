//! Latency histograms the request path fills with three relaxed atomic
//! adds; `/metrics` reads them at scrape time. Prometheus's own histogram
//! would put a label lookup on every request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram the request path fills with three relaxed atomic
/// adds and `/metrics` reads; Prometheus's own histogram would put a label
/// lookup on every request.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Requests observed and their total time in seconds.
    pub fn totals(&self) -> (u64, f64) {
        let count = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        (count, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }

    /// Per-bucket counts (not cumulative; the last is +Inf) and the sum in
    /// seconds.
    pub fn snapshot(&self) -> ([u64; BUCKETS.len() + 1], f64) {
        let counts = std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed));
        (counts, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }
}
