//! The one retry delay of every reconnecting loop: the watchers (etcd,
//! Consul) reconnecting to their registry, and `pointsman register`
//! re-registering with a Consul agent that went away.

use std::time::Duration;

/// Exponential backoff with "equal jitter": each delay is between half and
/// all of the current step, so a fleet of proxies does not reconnect in
/// lockstep after an etcd restart.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Delays from `min` (at least 1 ms), doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// The next delay: between half and all of the current step. (Not an
    /// `Iterator`: `next` is called by name in every reconnecting loop.)
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(fastrand::u64(0..=jitter_ms))
    }

    /// Back to `min`, after a success.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut steps = Vec::new();
        for _ in 0..10 {
            steps.push(b.next());
        }
        assert!(steps[0] >= Duration::from_millis(50) && steps[0] <= Duration::from_millis(100));
        assert!(steps[1] >= Duration::from_millis(100) && steps[1] <= Duration::from_millis(200));
        for s in &steps {
            assert!(*s <= Duration::from_secs(5));
        }
        assert!(steps[9] >= Duration::from_millis(2500));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
