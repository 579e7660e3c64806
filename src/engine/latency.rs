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

/// How many of the latest requests [`RecentAverage`] averages over.
pub const RECENT: u64 = 1024;

/// The average of the last [`RECENT`] durations, for `show stat`'s `rtime`
/// and `ttime`: the exact mean until that many were added, then HAProxy's
/// sliding average (each new one replaces 1/1024 of the sum). Two relaxed
/// atomics and no lock; two requests ending at once may skew it by one
/// sample, which an average shrugs off.
#[derive(Debug, Default)]
pub struct RecentAverage {
    /// Durations added, since start or the last clear.
    count: AtomicU64,
    /// Sum of the last `min(count, RECENT)` durations, in microseconds.
    sum_micros: AtomicU64,
}

impl RecentAverage {
    pub fn add(&self, d: Duration) {
        let v = u64::try_from(d.as_micros()).unwrap_or(u64::MAX / RECENT);
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= RECENT {
            self.sum_micros.fetch_add(v, Ordering::Relaxed);
            return;
        }
        let _ = self
            .sum_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sum| {
                Some(sum - sum / RECENT + v)
            });
    }

    /// The average in milliseconds and how many durations it is made of
    /// (at most [`RECENT`]); `None` before the first.
    pub fn millis(&self) -> Option<(u64, u64)> {
        let n = self.count.load(Ordering::Relaxed).min(RECENT);
        (n > 0).then(|| (self.sum_micros.load(Ordering::Relaxed) / n / 1000, n))
    }

    /// `clear counters all`.
    pub fn clear(&self) {
        self.count.store(0, Ordering::Relaxed);
        self.sum_micros.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recent_average_is_exact_then_slides() {
        let a = RecentAverage::default();
        assert_eq!(a.millis(), None);
        a.add(Duration::from_millis(10));
        a.add(Duration::from_millis(30));
        assert_eq!(a.millis(), Some((20, 2)));
        for _ in 0..RECENT * 20 {
            a.add(Duration::from_millis(100));
        }
        let (ms, n) = a.millis().expect("samples");
        assert_eq!(n, RECENT);
        assert!((99..=100).contains(&ms), "slid to the new durations: {ms}");
        a.clear();
        assert_eq!(a.millis(), None);
    }
}
