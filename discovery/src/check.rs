//! How an active check judges what it sees, shared by the proxy's health
//! checks and `pointsman register`'s check of its app: one TCP connect
//! probe, one pass rule for an HTTP answer, and one rise/fall counter with
//! HAProxy's meaning. Each side keeps its own HTTP transport (the proxy's
//! goes through its upstream connector, so a check reaches an endpoint the
//! way requests do) and its own wording in logs.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::Address;

/// The statuses an HTTP check accepts unless told otherwise: 2xx and 3xx.
pub const DEFAULT_EXPECT_STATUS: (u16, u16) = (200, 399);

/// Whether an HTTP check's answer passes: its status lies in `expect`
/// (inclusive). [`CheckSpec::expect_status`](crate::CheckSpec) says which.
pub fn status_passes(status: u16, expect: (u16, u16)) -> bool {
    let (lo, hi) = expect;
    (lo..=hi).contains(&status)
}

/// Why a TCP connect check failed.
#[derive(Debug)]
pub enum ConnectFailure {
    /// The connect was refused or could not be made.
    Failed(std::io::Error),
    /// No connection within the limit.
    TimedOut,
}

/// A TCP connect check: passes once `address` accepts a connection within
/// `limit`; the connection is closed at once.
pub async fn tcp_connect(address: &Address, limit: Duration) -> Result<(), ConnectFailure> {
    let connect = TcpStream::connect((address.host(), address.port()));
    match tokio::time::timeout(limit, connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ConnectFailure::Failed(e)),
        Err(_) => Err(ConnectFailure::TimedOut),
    }
}

/// HAProxy's `rise` and `fall`: a target that is up goes down after `fall`
/// failed checks in a row, and one that is down comes back after `rise`
/// passes in a row. Before any result was judged, the first one decides
/// at once (a new endpoint is neither up nor down yet).
#[derive(Clone, Debug)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    passes: u32,
    fails: u32,
    judged: bool,
}

impl RiseFall {
    /// `judged`: an earlier result already decided the target's state (a
    /// check restarted with new settings, or an app that passed its check
    /// before it was registered), so thresholds apply from the start.
    pub fn new(rise: u32, fall: u32, judged: bool) -> Self {
        RiseFall {
            rise: rise.max(1),
            fall: fall.max(1),
            passes: 0,
            fails: 0,
            judged,
        }
    }

    /// Counts one result for a target that is `up` now; the new state when
    /// it flips.
    pub fn record(&mut self, passed: bool, up: bool) -> Option<bool> {
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.fails = 0;
        } else {
            self.fails = self.fails.saturating_add(1);
            self.passes = 0;
        }
        let first = !self.judged;
        self.judged = true;
        if !up && passed && (first || self.passes >= self.rise) {
            Some(true)
        } else if up && !passed && (first || self.fails >= self.fall) {
            Some(false)
        } else {
            None
        }
    }

    /// Failed checks in a row so far.
    pub fn fails(&self) -> u32 {
        self.fails
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_down_after_fall_failures_and_up_after_rise_passes() {
        let mut rf = RiseFall::new(2, 3, true);
        assert_eq!(rf.record(false, true), None);
        assert_eq!(rf.record(false, true), None);
        assert_eq!(rf.record(true, true), None, "a pass resets the failures");
        assert_eq!(rf.record(false, true), None);
        assert_eq!(rf.record(false, true), None);
        assert_eq!(rf.record(false, true), Some(false));
        assert_eq!(rf.fails(), 3);
        assert_eq!(rf.record(true, false), None);
        assert_eq!(rf.record(false, false), None, "a failure resets the passes");
        assert_eq!(rf.record(true, false), None);
        assert_eq!(rf.record(true, false), Some(true));
    }

    #[test]
    fn the_first_result_decides_at_once_unless_judged_before() {
        assert_eq!(RiseFall::new(2, 3, false).record(true, false), Some(true));
        assert_eq!(RiseFall::new(2, 3, false).record(false, true), Some(false));
        assert_eq!(RiseFall::new(2, 3, true).record(true, false), None);
        assert_eq!(RiseFall::new(2, 3, true).record(false, true), None);
        // Agreeing with the current state is no flip.
        assert_eq!(RiseFall::new(2, 3, false).record(true, true), None);
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let mut rf = RiseFall::new(0, 0, true);
        assert_eq!(rf.record(false, true), Some(false));
        assert_eq!(rf.record(true, false), Some(true));
    }

    #[test]
    fn the_pass_rule_is_an_inclusive_status_range() {
        assert!(status_passes(200, DEFAULT_EXPECT_STATUS));
        assert!(status_passes(399, DEFAULT_EXPECT_STATUS));
        assert!(!status_passes(400, DEFAULT_EXPECT_STATUS));
        assert!(!status_passes(199, DEFAULT_EXPECT_STATUS));
        assert!(status_passes(503, (500, 503)));
    }
}
