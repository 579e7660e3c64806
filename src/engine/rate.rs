//! Events per second for `show stat`'s `rate`, `req_rate` and their
//! maxima, counted on the request path with one compare-and-swap and read
//! as HAProxy reads its `freq_ctr`: the events of the current second plus
//! the previous second's, weighted by the share of that second still in
//! the one-second window. A second that saw no event reads as 0.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::engine::conn::now_ms;

/// Events in the current and the previous second, and the most seen in
/// one second.
#[derive(Debug, Default)]
pub struct EventRate {
    /// The second (on the process clock) in the high half, its events in
    /// the low half: one word, so a new second starts with one CAS.
    current: AtomicU64,
    /// Events of the second before `current`'s.
    previous: AtomicU32,
    /// The most events counted in one second (HAProxy's `*_max`).
    max: AtomicU32,
}

fn split(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

fn join(second: u32, events: u32) -> u64 {
    (u64::from(second) << 32) | u64::from(events)
}

impl EventRate {
    /// Counts one event now.
    #[inline]
    pub fn add(&self) {
        self.add_at(now_ms());
    }

    fn add_at(&self, ms: u64) {
        let now = (ms / 1000) as u32;
        let mut seen = self.current.load(Relaxed);
        loop {
            let (second, events) = split(seen);
            let next = if second == now {
                join(now, events.saturating_add(1))
            } else {
                join(now, 1)
            };
            match self
                .current
                .compare_exchange_weak(seen, next, Relaxed, Relaxed)
            {
                Ok(_) => {
                    if second != now {
                        // A new second: the one before it becomes the
                        // previous one (or nothing, after a silent second).
                        let before = if second.wrapping_add(1) == now {
                            events
                        } else {
                            0
                        };
                        self.previous.store(before, Relaxed);
                    }
                    let counted = split(next).1;
                    if counted > self.max.load(Relaxed) {
                        self.max.fetch_max(counted, Relaxed);
                    }
                    return;
                }
                Err(actual) => seen = actual,
            }
        }
    }

    /// Events over the last second.
    pub fn per_second(&self) -> u64 {
        self.per_second_at(now_ms())
    }

    fn per_second_at(&self, ms: u64) -> u64 {
        let now = (ms / 1000) as u32;
        let left = 1000 - ms % 1000;
        let (second, events) = split(self.current.load(Relaxed));
        let weighted = |n: u32| (u64::from(n) * left).div_ceil(1000);
        if second == now {
            u64::from(events) + weighted(self.previous.load(Relaxed))
        } else if second.wrapping_add(1) == now {
            weighted(events)
        } else {
            0
        }
    }

    /// The most events counted in one second.
    pub fn max(&self) -> u32 {
        self.max.load(Relaxed)
    }

    /// `clear counters`: the maximum starts again from the current rate.
    pub fn clear_max(&self) {
        self.max.store(0, Relaxed);
    }

    /// `clear counters all`: nothing was counted.
    pub fn clear(&self) {
        self.current.store(0, Relaxed);
        self.previous.store(0, Relaxed);
        self.max.store(0, Relaxed);
    }
}

/// Raises `max` to `value` if it is higher, with a plain load first: the
/// common case (not a new maximum) writes nothing.
#[inline]
pub fn raise_max(max: &AtomicU32, value: u32) {
    if value > max.load(Relaxed) {
        max.fetch_max(value, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_weighs_the_previous_second_by_what_is_left_of_it() {
        let r = EventRate::default();
        // 10 events in second 5.
        for _ in 0..10 {
            r.add_at(5_100);
        }
        assert_eq!(r.per_second_at(5_900), 10);
        // A quarter into second 6, with no event yet: 3/4 of second 5.
        assert_eq!(r.per_second_at(6_250), 8);
        // Two events in second 6, half way: 2 + 10/2.
        r.add_at(6_500);
        r.add_at(6_500);
        assert_eq!(r.per_second_at(6_500), 7);
        assert_eq!(r.max(), 10);
        // After a silent second, nothing.
        assert_eq!(r.per_second_at(8_000), 0);
        r.add_at(9_000);
        assert_eq!(r.per_second_at(9_000), 1, "second 7 was silent");
        r.clear_max();
        assert_eq!(r.max(), 0);
        r.add_at(9_001);
        assert_eq!(r.max(), 2);
        r.clear();
        assert_eq!((r.per_second_at(9_002), r.max()), (0, 0));
    }
}
