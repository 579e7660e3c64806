//! Step 3 of the flow: live per-endpoint state. Counters, in-flight requests,
//! administrative state and effective weight are atomics in an
//! `Arc<EndpointState>` keyed by (service, instance id). Rebuilt routing
//! tables reuse the same `Arc`, so a rebuild never resets them.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::engine::conn::now_ms;
use crate::engine::latency::RecentAverage;
use crate::engine::pool::{Pool, Traffic};
use crate::engine::quiet::Quiet;
use crate::engine::rate::{raise_max, EventRate};
use tokio::sync::Notify;

/// `max_conn_local` when no local limit is set.
const NO_LIMIT_SET: u32 = u32::MAX;

use pointsman_discovery::admin_api::CheckView;
use pointsman_discovery::AdminState;
use serde::Serialize;

/// Live state of one endpoint, shared by every table that contains it.
/// Passive checks: ejecting endpoints that fail real requests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveConfig {
    /// Consecutive failures (connect errors, resets, timeouts, 5xx) that
    /// eject an endpoint; 0 turns passive checks off.
    pub consecutive_failures: u32,
    /// First ejection; each further one doubles it, up to `max_ejection`.
    #[serde(with = "humantime_serde")]
    pub ejection: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Never eject more than this share of a service's endpoints.
    pub max_ejected_percent: u32,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            consecutive_failures: 5,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

#[derive(Debug)]
pub struct EndpointState {
    admin: AtomicU8,
    weight: AtomicU32,
    healthy: AtomicBool,
    in_flight: AtomicU32,
    requests: AtomicU64,
    /// Responses by status class: 1xx..5xx.
    responses: [AtomicU64; 5],
    /// Requests that got no response from the endpoint (connect failure,
    /// reset, timeout).
    failures: AtomicU64,
    /// Of those, the ones whose connection could not be opened (`econ`).
    connect_failures: AtomicU64,
    /// Response bodies the endpoint cut short (`srv_abrt`), and the ones
    /// the client went away from before their end (`cli_abrt`).
    server_aborts: AtomicU64,
    client_aborts: AtomicU64,
    /// Unix seconds of the last state or weight change.
    last_change: AtomicU64,
    /// Idle keep-alive connections to this endpoint.
    pub pool: Pool,
    /// Failures in a row (passive checks).
    consecutive_failures: AtomicU32,
    /// Ejected until this time (ms on the process clock); 0 if never.
    ejected_until: AtomicU64,
    /// Ejections so far; each one doubles the next one's length.
    ejections: AtomicU32,
    /// The last active check: 0 none yet, 1 passed, 2 failed.
    check_result: AtomicU8,
    /// What the last check saw: the HTTP status, or 0.
    check_status: AtomicU32,
    /// Unix seconds of the last active check.
    check_time: AtomicU64,
    /// Active checks that failed, since start.
    check_failures: AtomicU64,
    /// Checks stopped by `disable health`: none run, and the endpoint
    /// counts as up, until `enable health`.
    checks_paused: AtomicBool,
    /// Requests in flight at most (HAProxy's server `maxconn`; 0: no
    /// limit): the service's `endpoint_max_connections`, unless `set
    /// maxconn server` set one here (`NO_LIMIT_SET`: it did not).
    max_conn_config: AtomicU32,
    max_conn_local: AtomicU32,
    /// How long the last active check took, in milliseconds.
    check_millis: AtomicU64,
    /// The most requests in flight at once (`smax`).
    max_in_flight: AtomicU32,
    /// Requests started per second (`rate`).
    request_rate: EventRate,
    /// Unix seconds of the last request started; 0 if none.
    last_request: AtomicU64,
    /// Bytes of requests sent to it and of responses read from it.
    pub traffic: Arc<Traffic>,
    /// From a request's pick to its response head, and to the end of its
    /// response body (`rtime`, `ttime`).
    response_time: RecentAverage,
    /// Time to connect, per request: 0 on a reused connection, as
    /// HAProxy's `ctime` counts it.
    connect_time: RecentAverage,
    total_time: RecentAverage,
    /// Times an active check took it from up to down (`chkdown`).
    went_down: AtomicU64,
    /// Seconds it was down before its current state began (`downtime`),
    /// and since when (unix seconds) it is down; 0 while up.
    down_secs: AtomicU64,
    down_since: AtomicU64,
    /// A failing endpoint fails every request (or TCP connection) sent to
    /// it: their warnings are said once per interval.
    pub failure_warning: Quiet,
}

impl Default for EndpointState {
    fn default() -> Self {
        EndpointState {
            admin: AtomicU8::new(encode(AdminState::Ready)),
            weight: AtomicU32::new(1),
            healthy: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            responses: Default::default(),
            failures: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            server_aborts: AtomicU64::new(0),
            client_aborts: AtomicU64::new(0),
            last_change: AtomicU64::new(unix_now()),
            pool: Pool::default(),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            check_result: AtomicU8::new(0),
            check_status: AtomicU32::new(0),
            check_time: AtomicU64::new(0),
            check_failures: AtomicU64::new(0),
            checks_paused: AtomicBool::new(false),
            max_conn_config: AtomicU32::new(0),
            max_conn_local: AtomicU32::new(NO_LIMIT_SET),
            check_millis: AtomicU64::new(0),
            max_in_flight: AtomicU32::new(0),
            request_rate: EventRate::default(),
            last_request: AtomicU64::new(0),
            traffic: Arc::default(),
            response_time: RecentAverage::default(),
            connect_time: RecentAverage::default(),
            total_time: RecentAverage::default(),
            went_down: AtomicU64::new(0),
            down_secs: AtomicU64::new(0),
            down_since: AtomicU64::new(0),
            failure_warning: Quiet::new(),
        }
    }
}

fn encode(s: AdminState) -> u8 {
    match s {
        AdminState::Ready => 0,
        AdminState::Drain => 1,
        AdminState::Maint => 2,
    }
}

fn decode(v: u8) -> AdminState {
    match v {
        0 => AdminState::Ready,
        1 => AdminState::Drain,
        _ => AdminState::Maint,
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl EndpointState {
    pub fn admin_state(&self) -> AdminState {
        decode(self.admin.load(Relaxed))
    }

    /// Sets the administrative state of the latest published table; only the
    /// control task calls it, after publishing.
    pub fn set_admin_state(&self, s: AdminState) {
        if self.admin.swap(encode(s), Relaxed) != encode(s) {
            self.last_change.store(unix_now(), Relaxed);
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    /// Sets the weight of the latest published table; only the control task
    /// calls it, after publishing.
    pub fn set_weight(&self, w: u32) {
        if self.weight.swap(w, Relaxed) != w {
            self.last_change.store(unix_now(), Relaxed);
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// Sets what the active checks say; a change from up to down counts
    /// in `chkdown`, and the time down in `downtime`.
    pub fn set_healthy(&self, up: bool) {
        if self.healthy.swap(up, Relaxed) != up {
            let now = unix_now();
            self.last_change.store(now, Relaxed);
            if up {
                let since = self.down_since.swap(0, Relaxed);
                if since != 0 {
                    self.down_secs.fetch_add(now.saturating_sub(since), Relaxed);
                }
            } else {
                self.went_down.fetch_add(1, Relaxed);
                self.down_since.store(now.max(1), Relaxed);
            }
        }
    }

    /// Healthy and not ejected: what checks say, whatever the table says.
    #[inline]
    pub fn usable(&self) -> bool {
        self.healthy.load(Relaxed) && !self.ejected()
    }

    /// Would the latest published table send it new requests? For
    /// decisions outside a request's table (pooling, metrics); balancers
    /// use `routing::Endpoint::accepts_new`, which reads the request's own
    /// table.
    pub fn accepts_new(&self) -> bool {
        self.admin.load(Relaxed) == 0 && self.weight.load(Relaxed) > 0 && self.usable()
    }

    /// Is it ejected by passive checks right now?
    #[inline]
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Relaxed);
        until != 0 && until > now_ms()
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Relaxed)
    }

    /// Counts a failed request; returns true when the failures in a row
    /// reach `threshold` (the caller decides whether to eject).
    pub fn failed_once(&self, threshold: u32) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        threshold > 0 && n >= threshold
    }

    /// Counts a successful request.
    #[inline]
    pub fn succeeded(&self) {
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
    }

    /// Ejects it for `base` doubled per earlier ejection, at most `max`.
    pub fn eject(&self, base: Duration, max: Duration) -> Duration {
        let n = self.ejections.fetch_add(1, Relaxed).min(16);
        let length = base.saturating_mul(1 << n).min(max);
        self.ejected_until
            .store(now_ms() + length.as_millis() as u64, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        self.last_change.store(unix_now(), Relaxed);
        length
    }

    /// Ends an ejection early: its active check saw it come back up (a
    /// restart that failed requests while it stopped is over). The next
    /// ejection still lasts longer, as if this one had run out.
    pub fn uneject(&self) {
        if self.ejected_until.swap(0, Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
    }

    /// Has an active check run on it yet?
    pub fn has_check_result(&self) -> bool {
        self.check_result.load(Relaxed) != 0
    }

    /// Records an active check's result and how long it took.
    pub fn record_check(&self, passed: bool, status: u16, took: Duration) {
        self.check_result.store(if passed { 1 } else { 2 }, Relaxed);
        self.check_status.store(u32::from(status), Relaxed);
        self.check_time.store(unix_now(), Relaxed);
        self.check_millis
            .store(u64::try_from(took.as_millis()).unwrap_or(u64::MAX), Relaxed);
        if !passed {
            self.check_failures.fetch_add(1, Relaxed);
        }
    }

    /// Stops the active checks (`disable health`): the last result is
    /// ignored and the endpoint counts as up, as in HAProxy.
    pub fn pause_checks(&self) {
        self.checks_paused.store(true, Relaxed);
        self.set_healthy(true);
    }

    /// Starts the checks again (`enable health`): they judge from the
    /// next one on, with rise and fall as before.
    pub fn resume_checks(&self) {
        self.checks_paused.store(false, Relaxed);
    }

    pub fn checks_paused(&self) -> bool {
        self.checks_paused.load(Relaxed)
    }

    /// A try's connection: opened in `took`, or reused (`Duration::ZERO`).
    pub fn record_connect(&self, took: Duration) {
        self.connect_time.add(took);
    }

    /// Active checks that failed, since start (HAProxy's `chkfail`).
    pub fn check_failures(&self) -> u64 {
        self.check_failures.load(Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// The most requests it takes at once; 0: no limit.
    pub fn max_conn(&self) -> u32 {
        match self.max_conn_local.load(Relaxed) {
            NO_LIMIT_SET => self.max_conn_config.load(Relaxed),
            local => local,
        }
    }

    /// The service's limit, set at every table build.
    pub fn set_max_conn_config(&self, limit: u32) {
        self.max_conn_config.store(limit, Relaxed);
    }

    /// `set maxconn server`: a limit on this proxy, over the service's.
    pub fn set_max_conn_local(&self, limit: u32) {
        self.max_conn_local
            .store(limit.min(NO_LIMIT_SET - 1), Relaxed);
    }

    /// Whether another request fits under its limit now.
    #[inline]
    pub fn has_room(&self) -> bool {
        let max = self.max_conn();
        max == 0 || self.in_flight.load(Relaxed) < max
    }

    /// Counts a request as started if it fits under the endpoint's limit
    /// (checked and counted at once, so two requests cannot both take the
    /// last slot); `freed` is woken when it ends, for a request queued
    /// for a slot.
    pub fn try_start_request(self: &Arc<Self>, freed: &Arc<Notify>) -> Option<InFlight> {
        let max = self.max_conn();
        if max == 0 {
            return Some(self.start_request());
        }
        let before = self
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()?;
        let mut guard = self.started(before + 1);
        guard.freed = Some(freed.clone());
        Some(guard)
    }

    /// Counts a request as started; the guard ends it when dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.started(now)
    }

    /// The counts every started request adds to; `now` is in flight.
    fn started(self: &Arc<Self>, now: u32) -> InFlight {
        raise_max(&self.max_in_flight, now);
        self.requests.fetch_add(1, Relaxed);
        self.request_rate.add();
        let second = unix_now();
        if self.last_request.load(Relaxed) != second {
            self.last_request.store(second, Relaxed);
        }
        InFlight {
            live: self.clone(),
            started: Instant::now(),
            freed: None,
        }
    }

    pub fn record_status(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Relaxed);
    }

    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Relaxed);
    }

    /// A failure (counted with [`EndpointState::record_failure`]) was a
    /// connection that could not be opened.
    pub fn connect_failed(&self) {
        self.connect_failures.fetch_add(1, Relaxed);
    }

    /// The endpoint's response body ended before its end.
    pub fn server_aborted(&self) {
        self.server_aborts.fetch_add(1, Relaxed);
    }

    /// The client went away before the response body's end.
    pub fn client_aborted(&self) {
        self.client_aborts.fetch_add(1, Relaxed);
    }

    /// The `show stat` figures the admin API does not show.
    pub fn stat_counters(&self) -> EndpointStats {
        let down_since = self.down_since.load(Relaxed);
        let down_now = if down_since == 0 {
            0
        } else {
            unix_now().saturating_sub(down_since)
        };
        EndpointStats {
            max_in_flight: self.max_in_flight.load(Relaxed),
            request_rate: self.request_rate.per_second(),
            max_request_rate: self.request_rate.max(),
            last_request: Some(self.last_request.load(Relaxed)).filter(|t| *t != 0),
            bytes_in: self.traffic.sent(),
            bytes_out: self.traffic.received(),
            response_time: self.response_time.millis(),
            total_time: self.total_time.millis(),
            connect_time: self.connect_time.millis(),
            went_down: self.went_down.load(Relaxed),
            down_secs: self.down_secs.load(Relaxed) + down_now,
            check_millis: self.check_millis.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            server_aborts: self.server_aborts.load(Relaxed),
            client_aborts: self.client_aborts.load(Relaxed),
        }
    }

    /// `clear counters`: the maxima start again from now.
    pub fn clear_max(&self) {
        self.max_in_flight
            .store(self.in_flight.load(Relaxed), Relaxed);
        self.request_rate.clear_max();
    }

    /// `clear counters all`: every counter starts from zero, as after a
    /// restart; gauges (in flight, state, health) and the ejection count
    /// that lengthens the next ejection stay.
    pub fn clear(&self) {
        self.clear_max();
        self.requests.store(0, Relaxed);
        for r in &self.responses {
            r.store(0, Relaxed);
        }
        self.failures.store(0, Relaxed);
        self.connect_failures.store(0, Relaxed);
        self.server_aborts.store(0, Relaxed);
        self.client_aborts.store(0, Relaxed);
        self.check_failures.store(0, Relaxed);
        self.request_rate.clear();
        self.last_request.store(0, Relaxed);
        self.traffic.clear();
        self.response_time.clear();
        self.total_time.clear();
        self.connect_time.clear();
        self.went_down.store(0, Relaxed);
        self.down_secs.store(0, Relaxed);
        if self.down_since.load(Relaxed) != 0 {
            self.down_since.store(unix_now().max(1), Relaxed);
        }
    }

    pub fn snapshot(&self) -> EndpointCounters {
        EndpointCounters {
            state: self.admin_state(),
            weight: self.weight(),
            healthy: self.healthy(),
            in_flight: self.in_flight(),
            requests: self.requests.load(Relaxed),
            responses: std::array::from_fn(|i| self.responses[i].load(Relaxed)),
            failures: self.failures.load(Relaxed),
            last_change: self.last_change.load(Relaxed),
            ejected: self.ejected(),
            ejections: self.ejections(),
            checks_paused: self.checks_paused(),
            // Paused checks say nothing: shown as no check at all.
            check: match self.check_result.load(Relaxed) {
                _ if self.checks_paused() => None,
                0 => None,
                r => Some(CheckView {
                    passed: r == 1,
                    status: self.check_status.load(Relaxed) as u16,
                    at: self.check_time.load(Relaxed),
                }),
            },
            idle_connections: self.pool.idle(),
        }
    }
}

/// A request in flight to an endpoint; dropping it ends the request (and
/// counts its time in `ttime`).
#[derive(Debug)]
pub struct InFlight {
    live: Arc<EndpointState>,
    started: Instant,
    /// Woken (one waiter) when the request ends: a slot is free.
    freed: Option<Arc<Notify>>,
}

impl InFlight {
    pub fn endpoint(&self) -> &EndpointState {
        &self.live
    }

    /// The endpoint's response head arrived: its time counts in `rtime`.
    pub fn answered(&self) {
        self.live.response_time.add(self.started.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.live.total_time.add(self.started.elapsed());
        self.live.in_flight.fetch_sub(1, Relaxed);
        if let Some(freed) = &self.freed {
            freed.notify_one();
        }
    }
}

/// What `show stat` shows of an endpoint beyond [`EndpointCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    pub max_in_flight: u32,
    pub request_rate: u64,
    pub max_request_rate: u32,
    /// Unix seconds of the last request started.
    pub last_request: Option<u64>,
    /// Request bytes sent to it, response bytes read from it.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Average milliseconds and the requests averaged (at most 1024).
    pub response_time: Option<(u64, u64)>,
    pub total_time: Option<(u64, u64)>,
    pub connect_time: Option<(u64, u64)>,
    pub went_down: u64,
    pub down_secs: u64,
    pub check_millis: u64,
    /// Failures to open a connection to it (part of the admin API's
    /// `failures`).
    pub connect_failures: u64,
    pub server_aborts: u64,
    pub client_aborts: u64,
}

/// A point-in-time copy of an endpoint's state, for the admin API.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct EndpointCounters {
    pub state: AdminState,
    pub weight: u32,
    pub healthy: bool,
    pub in_flight: u32,
    pub requests: u64,
    /// Responses by status class, 1xx to 5xx.
    pub responses: [u64; 5],
    pub failures: u64,
    pub last_change: u64,
    /// Ejected by passive checks right now.
    pub ejected: bool,
    pub ejections: u32,
    /// The last active check, if the endpoint has checks (the admin API's
    /// own type: the engine fills it, the admin API sends it as it is).
    pub check: Option<CheckView>,
    /// Its checks are stopped (`disable health`). Not in `/api/services`,
    /// whose shape deploy tools read: there a paused check is no check.
    #[serde(skip)]
    pub checks_paused: bool,
    /// Idle upstream keep-alive connections.
    pub idle_connections: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ejection_ends_early_when_unejected_and_the_next_one_is_longer() {
        let e = EndpointState::default();
        let first = e.eject(Duration::from_secs(10), Duration::from_secs(60));
        assert!(e.ejected());
        e.uneject();
        assert!(!e.ejected() && e.usable());
        e.uneject(); // not ejected: nothing to do
        let second = e.eject(Duration::from_secs(10), Duration::from_secs(60));
        assert_eq!(
            (first, second),
            (Duration::from_secs(10), Duration::from_secs(20))
        );
    }

    #[test]
    fn show_stat_figures_count_and_clear() {
        let e = Arc::new(EndpointState::default());
        let a = e.start_request();
        let b = e.start_request();
        a.answered();
        drop((a, b));
        drop(e.start_request());
        let s = e.stat_counters();
        assert_eq!(s.max_in_flight, 2);
        // Three in one second, unless a second began between them.
        assert!((1..=3).contains(&s.max_request_rate), "{s:?}");
        assert!(s.last_request.is_some());
        assert_eq!(
            s.response_time.map(|(_, n)| n),
            Some(1),
            "one head came back"
        );
        assert_eq!(s.total_time.map(|(_, n)| n), Some(3));

        // Up to down twice, with a check's time.
        e.set_healthy(false);
        e.set_healthy(false);
        e.set_healthy(true);
        e.set_healthy(false);
        e.record_check(false, 0, Duration::from_millis(42));
        let s = e.stat_counters();
        assert_eq!((s.went_down, s.check_millis), (2, 42));

        e.clear_max();
        assert_eq!(e.stat_counters().max_in_flight, 0, "none in flight now");
        assert_eq!(e.snapshot().requests, 3, "clear_max keeps the totals");
        e.clear();
        let s = e.stat_counters();
        assert_eq!((s.went_down, s.down_secs, s.last_request), (0, 0, None));
        assert_eq!((s.response_time, s.total_time), (None, None));
        assert_eq!(e.snapshot().requests, 0);
        assert!(!e.healthy(), "clearing counters changes no state");
    }
}
