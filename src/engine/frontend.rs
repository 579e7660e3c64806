//! Per-listener traffic counters, for `show stat`'s `FRONTEND` rows: one
//! [`FrontendCounters`] of relaxed atomics per listener name, handed to
//! every client connection the listener accepts. A connection counts its
//! session when it opens, its bytes as its socket moves them, and each
//! request when its answer is chosen (the proxy's own answers too: 404 no
//! route, 503, 400, ...). Nothing here locks or allocates per request;
//! the registry's lock is taken when a listener starts and when the
//! counters are listed.
//!
//! The counters are kept by listener name for as long as the process
//! runs, so a reload that restarts a listener keeps them; only `clear
//! counters all` zeroes them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::engine::rate::{raise_max, EventRate};
use crate::engine::table::SharedTable;

/// One listener's counters.
#[derive(Debug, Default)]
pub struct FrontendCounters {
    /// Client connections open now (HAProxy's `scur`) and the most at once.
    sessions: AtomicU32,
    max_sessions: AtomicU32,
    /// Client connections accepted.
    total_sessions: AtomicU64,
    session_rate: EventRate,
    /// Requests answered, by the proxy or an upstream.
    requests: AtomicU64,
    request_rate: EventRate,
    /// Answers by status class 1xx..5xx, then any other status.
    responses: [AtomicU64; 6],
    /// Requests refused as malformed (`ereq`).
    bad_requests: AtomicU64,
    /// Bytes read from and written to client sockets.
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// A point-in-time copy of a listener's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendSnapshot {
    pub sessions: u32,
    pub max_sessions: u32,
    pub total_sessions: u64,
    pub session_rate: u64,
    pub max_session_rate: u32,
    pub requests: u64,
    pub request_rate: u64,
    pub max_request_rate: u32,
    /// 1xx..5xx, then other.
    pub responses: [u64; 6],
    pub bad_requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl FrontendCounters {
    /// A client connection was accepted; it counts as open until the
    /// session is dropped.
    pub fn open_session(self: &Arc<Self>) -> Session {
        let open = self.sessions.fetch_add(1, Relaxed) + 1;
        raise_max(&self.max_sessions, open);
        self.total_sessions.fetch_add(1, Relaxed);
        self.session_rate.add();
        Session(self.clone())
    }

    /// A request was answered with `status` (by an upstream or by the
    /// proxy itself).
    #[inline]
    pub fn answered(&self, status: u16) {
        self.requests.fetch_add(1, Relaxed);
        self.request_rate.add();
        let class = match status {
            100..=599 => usize::from(status / 100) - 1,
            _ => 5,
        };
        self.responses[class].fetch_add(1, Relaxed);
    }

    /// A request was refused as malformed (it is answered too: count
    /// that with [`FrontendCounters::answered`]).
    pub fn bad_request(&self) {
        self.bad_requests.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn received(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Relaxed);
    }

    #[inline]
    pub fn sent(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Relaxed);
    }

    pub fn snapshot(&self) -> FrontendSnapshot {
        FrontendSnapshot {
            sessions: self.sessions.load(Relaxed),
            max_sessions: self.max_sessions.load(Relaxed),
            total_sessions: self.total_sessions.load(Relaxed),
            session_rate: self.session_rate.per_second(),
            max_session_rate: self.session_rate.max(),
            requests: self.requests.load(Relaxed),
            request_rate: self.request_rate.per_second(),
            max_request_rate: self.request_rate.max(),
            responses: std::array::from_fn(|i| self.responses[i].load(Relaxed)),
            bad_requests: self.bad_requests.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
        }
    }

    /// `clear counters`: the maxima start again from what is open now.
    pub fn clear_max(&self) {
        self.max_sessions
            .store(self.sessions.load(Relaxed), Relaxed);
        self.session_rate.clear_max();
        self.request_rate.clear_max();
    }

    /// `clear counters all`: every counter but the open sessions (a
    /// gauge) starts from zero.
    pub fn clear(&self) {
        self.clear_max();
        self.total_sessions.store(0, Relaxed);
        self.session_rate.clear();
        self.requests.store(0, Relaxed);
        self.request_rate.clear();
        for r in &self.responses {
            r.store(0, Relaxed);
        }
        self.bad_requests.store(0, Relaxed);
        self.bytes_in.store(0, Relaxed);
        self.bytes_out.store(0, Relaxed);
    }
}

/// A client connection, counted open until dropped.
#[derive(Debug)]
pub struct Session(Arc<FrontendCounters>);

impl Session {
    pub fn counters(&self) -> &Arc<FrontendCounters> {
        &self.0
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Relaxed);
    }
}

/// Every listener's counters, by name.
#[derive(Debug, Default)]
pub struct Frontends(Mutex<HashMap<Arc<str>, Arc<FrontendCounters>>>);

impl Frontends {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<FrontendCounters>>> {
        // The map only grows: a panic while it was held leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters of listener `name`, made on first use.
    pub fn get(&self, name: &str) -> Arc<FrontendCounters> {
        let mut all = self.lock();
        match all.get(name) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(FrontendCounters::default());
                all.insert(name.into(), c.clone());
                c
            }
        }
    }

    /// A copy of listener `name`'s counters (zeros if it never ran).
    pub fn snapshot(&self, name: &str) -> FrontendSnapshot {
        self.lock()
            .get(name)
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }

    /// Applies `f` to every listener's counters.
    pub fn for_each(&self, f: impl Fn(&FrontendCounters)) {
        for c in self.lock().values() {
            f(c);
        }
    }
}

type Registries = Vec<(
    Weak<arc_swap::ArcSwap<crate::engine::table::RoutingTable>>,
    Arc<Frontends>,
)>;

/// The listeners' counters of the proxy that serves `table`: the
/// listeners, the runtime API and the admin listener each hold the table,
/// so it names one proxy (as it does for the runtime API's ids).
pub fn frontends_for(table: &SharedTable) -> Arc<Frontends> {
    static ALL: OnceLock<Mutex<Registries>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    all.retain(|(t, _)| t.strong_count() > 0);
    let weak = Arc::downgrade(table);
    if let Some((_, f)) = all.iter().find(|(t, _)| t.ptr_eq(&weak)) {
        return f.clone();
    }
    let f = Arc::new(Frontends::default());
    all.push((weak, f.clone()));
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_requests_and_clears() {
        let f = Frontends::default();
        let c = f.get("web");
        let one = c.open_session();
        let two = c.open_session();
        drop(two);
        c.answered(200);
        c.answered(404);
        c.answered(404);
        c.answered(700);
        c.bad_request();
        c.received(10);
        c.sent(20);
        let s = f.snapshot("web");
        assert_eq!((s.sessions, s.max_sessions, s.total_sessions), (1, 2, 2));
        assert_eq!(s.requests, 4);
        assert_eq!(s.responses, [0, 1, 0, 2, 0, 1]);
        assert_eq!((s.bad_requests, s.bytes_in, s.bytes_out), (1, 10, 20));
        // Four in one second, unless a second began between them.
        assert!((1..=4).contains(&s.max_request_rate), "{s:?}");
        c.clear_max();
        let s = f.snapshot("web");
        assert_eq!((s.max_sessions, s.max_request_rate, s.requests), (1, 0, 4));
        f.for_each(FrontendCounters::clear);
        let s = f.snapshot("web");
        assert_eq!(
            s,
            FrontendSnapshot {
                sessions: 1,
                max_sessions: 1,
                ..Default::default()
            }
        );
        drop(one);
        assert_eq!(f.snapshot("web").sessions, 0);
        assert_eq!(f.snapshot("nope"), FrontendSnapshot::default());
    }
}
