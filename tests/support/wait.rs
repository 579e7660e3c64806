//! Waiting with a deadline: every wait in the tests polls a condition and,
//! when the deadline passes, panics naming what was awaited, so a slow
//! machine makes a test slower, not wrong.

use std::future::Future;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Waits until `cond` holds, polling, or panics after `deadline` naming
/// `what` was awaited.
pub async fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] with an async condition.
pub async fn wait_for<F, Fut>(deadline: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        let remaining = end.saturating_duration_since(Instant::now());
        if let Ok(true) =
            tokio::time::timeout(remaining.max(Duration::from_millis(50)), cond()).await
        {
            return;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a child to exit, or panics after `deadline`.
pub async fn wait_exit(child: &mut Child, deadline: Duration, what: &str) -> ExitStatus {
    let end = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < end => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(None) => panic!("{what} did not exit within {deadline:?}"),
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}
