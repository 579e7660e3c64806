//! Warnings that repeat, said once per interval with a count.
//!
//! A failing endpoint under load can trip the same warning on every
//! request: thousands of identical lines a second bury everything else in
//! the log. A [`Quiet`] gate sits beside the state the warning is about (a
//! service, an endpoint) and lets one occurrence through per interval,
//! telling how many it held back since. Two atomics, no lock, no clock
//! read beyond the one the caller already has.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How often a repeated warning is said at most.
pub const QUIET_EVERY: Duration = Duration::from_secs(10);

/// One warning's gate; see the module documentation.
#[derive(Debug, Default)]
pub struct Quiet {
    /// When the last occurrence was let through, in ms on the process
    /// clock (`conn::now_ms`), plus one (0: never).
    said_at: AtomicU64,
    held: AtomicU64,
}

impl Quiet {
    /// A gate that has said nothing yet (for a `static`).
    pub const fn new() -> Self {
        Quiet {
            said_at: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(held)` when this occurrence, at `now_ms`, should be logged,
    /// `held` being how many were held back since the last one logged;
    /// `None` to stay quiet.
    pub fn allow(&self, now_ms: u64, every: Duration) -> Option<u64> {
        let last = self.said_at.load(Relaxed);
        let every = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now_ms.saturating_add(1).saturating_sub(last) >= every;
        if due
            && self
                .said_at
                .compare_exchange(last, now_ms.saturating_add(1), Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Relaxed));
        }
        self.held.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let q = Quiet::default();
        let every = Duration::from_secs(10);
        assert_eq!(q.allow(0, every), Some(0), "the first is said");
        for t in 1..=500 {
            assert_eq!(q.allow(t, every), None);
        }
        assert_eq!(q.allow(9_999, every), None);
        assert_eq!(
            q.allow(10_000, every),
            Some(501),
            "then once, with the count"
        );
        assert_eq!(q.allow(10_001, every), None);
        assert_eq!(q.allow(30_000, every), Some(1));
    }
}
