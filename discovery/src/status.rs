//! How healthy one watcher is: connected or not, which revision it has
//! delivered, how long ago it last made progress (delivered a view or a
//! change, or confirmed its view is current), and what went wrong. The watcher writes it; the admin API, metrics and readiness
//! read it. Everything is an atomic except the last error text, which only
//! errors and the admin API touch, never the request path.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::Source;

/// Live status of one registry source, shared through an `Arc` between the
/// watcher (writer) and everyone who reports on it (readers).
#[derive(Debug)]
pub struct SourceStatus {
    source: Source,
    /// Monotonic origin for `last_sync_ms`.
    origin: Instant,
    connected: AtomicBool,
    /// Highest revision the watcher has delivered; -1 for none.
    seen_revision: AtomicI64,
    /// Highest revision the consumer says it has applied; -1 for none.
    applied_revision: AtomicI64,
    /// Milliseconds after `origin` of the last progress, plus one; 0 means
    /// never.
    last_sync_ms: AtomicU64,
    malformed: AtomicU64,
    reconnects: AtomicU64,
    resets: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl SourceStatus {
    /// A status for `source` that has never synced.
    pub fn new(source: Source) -> Self {
        SourceStatus {
            source,
            origin: Instant::now(),
            connected: AtomicBool::new(false),
            seen_revision: AtomicI64::new(-1),
            applied_revision: AtomicI64::new(-1),
            last_sync_ms: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// Whether the watcher currently holds a working stream to its source.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    /// Records progress just now: the watcher delivered a full view or a
    /// whole revision's changes, or its source proved the view is current.
    /// An answer that only shows the source is there (a created watch, a
    /// probe answered while changes are still on their way, an answer that
    /// could not be read or applied) is not progress, so that a watcher
    /// stuck on such answers shows growing staleness.
    pub fn mark_synced(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_sync_ms.store(ms + 1, Ordering::Release);
    }

    /// Whether the source has ever delivered a full view: a readiness latch.
    pub fn has_synced(&self) -> bool {
        self.last_sync_ms.load(Ordering::Acquire) != 0
    }

    /// Time since the last progress; `None` if there was none yet.
    pub fn staleness(&self) -> Option<Duration> {
        let last = self.last_sync_ms.load(Ordering::Acquire);
        if last == 0 {
            return None;
        }
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        Some(Duration::from_millis(now.saturating_sub(last - 1)))
    }

    /// Time since the last progress, or since the watcher started if it has
    /// made none: how long what is served may have been behind the source.
    /// Unlike [`staleness`](Self::staleness) it is there before the first
    /// sync, so a watcher that never syncs shows a growing number instead of
    /// none.
    pub fn progress_age(&self) -> Duration {
        self.staleness().unwrap_or_else(|| self.origin.elapsed())
    }

    /// Highest registry revision the watcher has delivered (sent as part of
    /// an `Update`, or confirmed by a listing).
    pub fn seen_revision(&self) -> Option<i64> {
        revision(self.seen_revision.load(Ordering::Acquire))
    }

    /// Raises the seen revision; never lowers it except through a reset.
    pub fn set_seen_revision(&self, rev: i64) {
        self.seen_revision.fetch_max(rev, Ordering::AcqRel);
    }

    /// Highest revision the consumer (the proxy's writer task) has applied.
    pub fn applied_revision(&self) -> Option<i64> {
        revision(self.applied_revision.load(Ordering::Acquire))
    }

    /// Called by the consumer once it has applied an update with `rev`.
    pub fn set_applied_revision(&self, rev: i64) {
        self.applied_revision.fetch_max(rev, Ordering::AcqRel);
    }

    /// A value that did not parse, as every watcher reports it: logged
    /// with what happens to its key (`kept`: its last good value stays),
    /// counted, and kept as the last error.
    pub fn malformed_value(&self, e: &crate::ParseError, kept: bool) {
        let action = if kept {
            "keeping its last good value"
        } else {
            "skipping it"
        };
        tracing::warn!(key = e.key(), reason = %e, "{}: malformed registry value; {action}", self.source());
        self.record_malformed();
        self.set_error(e.to_string());
    }

    /// Counts one value that did not parse.
    pub fn record_malformed(&self) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Counts one lost (or failed) stream that the watcher is about to
    /// retry.
    pub fn record_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Counts one full listing sent as `UpdateKind::Reset`.
    pub fn record_reset(&self, revision: Option<i64>) {
        self.resets.fetch_add(1, Ordering::Relaxed);
        if let Some(rev) = revision {
            // A re-list after a compaction or a restored etcd may start
            // lower than before; the listing is the truth.
            self.seen_revision.store(rev, Ordering::Release);
        }
    }

    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// Remembers the latest error for the admin API.
    pub fn set_error(&self, message: impl Into<String>) {
        let mut slot = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(message.into());
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A consistent-enough copy for the admin API and metrics.
    pub fn snapshot(&self) -> SourceStatusSnapshot {
        let staleness = self.staleness();
        let last_sync_unix_ms = staleness.and_then(|age| {
            SystemTime::now()
                .checked_sub(age)?
                .duration_since(UNIX_EPOCH)
                .ok()
                .and_then(|d| u64::try_from(d.as_millis()).ok())
        });
        SourceStatusSnapshot {
            source: self.source,
            connected: self.is_connected(),
            seen_revision: self.seen_revision(),
            applied_revision: self.applied_revision(),
            last_sync_unix_ms,
            staleness_secs: Some(self.progress_age().as_secs_f64()),
            malformed: self.malformed(),
            reconnects: self.reconnects(),
            resets: self.resets(),
            last_error: self.last_error(),
        }
    }
}

fn revision(raw: i64) -> Option<i64> {
    (raw >= 0).then_some(raw)
}

/// A point-in-time copy of a [`SourceStatus`], as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceStatusSnapshot {
    pub source: Source,
    pub connected: bool,
    /// Highest revision the watcher delivered.
    pub seen_revision: Option<i64>,
    /// Highest revision the proxy applied. Required when read: the fleet
    /// confirms changes by it.
    #[serde(deserialize_with = "crate::admin_api::required")]
    pub applied_revision: Option<i64>,
    /// Wall-clock time of the last progress (see
    /// [`SourceStatus::mark_synced`]), in ms since the epoch; `None` before
    /// the first sync.
    pub last_sync_unix_ms: Option<u64>,
    /// Seconds since the last progress, or since the watcher started if it
    /// never synced ([`SourceStatus::progress_age`]). Older proxies wrote
    /// `None` before the first sync.
    pub staleness_secs: Option<f64>,
    /// Values skipped because they did not parse.
    pub malformed: u64,
    /// Times the stream was lost (or could not be set up) and a retry was
    /// scheduled.
    pub reconnects: u64,
    /// Full listings sent.
    pub resets: u64,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_unsynced_and_tracks_progress() {
        let s = SourceStatus::new(Source::Etcd);
        assert!(!s.has_synced());
        assert_eq!(s.staleness(), None);
        assert_eq!(s.seen_revision(), None);
        // Never synced: the age counts from the start, and is shown.
        std::thread::sleep(Duration::from_millis(20));
        assert!(s.progress_age() >= Duration::from_millis(20));
        let before = s.snapshot();
        assert!(
            before.staleness_secs.is_some_and(|age| age >= 0.02),
            "{before:?}"
        );
        assert_eq!(before.last_sync_unix_ms, None);
        s.mark_synced();
        assert!(s.has_synced());
        assert!(s.staleness().is_some_and(|d| d < Duration::from_secs(1)));
        s.set_seen_revision(10);
        s.set_seen_revision(5);
        assert_eq!(s.seen_revision(), Some(10));
        s.record_reset(Some(3));
        assert_eq!(s.seen_revision(), Some(3));
        s.set_applied_revision(3);
        s.record_malformed();
        s.record_reconnect();
        s.set_connected(true);
        s.set_error("boom");
        let snap = s.snapshot();
        assert_eq!(snap.applied_revision, Some(3));
        assert_eq!(snap.malformed, 1);
        assert_eq!(snap.reconnects, 1);
        assert_eq!(snap.resets, 1);
        assert!(snap.connected);
        assert!(snap.last_sync_unix_ms.is_some());
        assert_eq!(snap.last_error.as_deref(), Some("boom"));
        let json = serde_json::to_value(&snap).expect("snapshot serializes");
        assert_eq!(json["source"], "etcd");
    }

    #[test]
    fn staleness_counts_from_the_last_progress_only() {
        let s = SourceStatus::new(Source::Etcd);
        s.mark_synced();
        std::thread::sleep(Duration::from_millis(30));
        // Being connected, erring or seeing a revision is not progress.
        s.set_connected(true);
        s.set_error("a watch answer was over the cap");
        s.set_seen_revision(9);
        s.record_reconnect();
        let age = s.staleness().expect("synced once");
        assert!(age >= Duration::from_millis(30), "{age:?}");
        assert!(s.progress_age() >= age);
        s.mark_synced();
        assert!(s.staleness().is_some_and(|d| d < Duration::from_millis(30)));
    }
}
