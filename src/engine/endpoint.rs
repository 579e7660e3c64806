//! Step 3 of the flow: live per-endpoint state. Counters, in-flight requests,
//! administrative state and effective weight are atomics in an
//! `Arc<EndpointState>` keyed by (service, instance id). Rebuilt routing
//! tables reuse the same `Arc`, so a rebuild never resets them.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::conn::now_ms;
use crate::engine::pool::Pool;

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
            last_change: AtomicU64::new(unix_now()),
            pool: Pool::default(),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            check_result: AtomicU8::new(0),
            check_status: AtomicU32::new(0),
            check_time: AtomicU64::new(0),
            check_failures: AtomicU64::new(0),
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

    pub fn set_healthy(&self, up: bool) {
        if self.healthy.swap(up, Relaxed) != up {
            self.last_change.store(unix_now(), Relaxed);
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

    /// Has an active check run on it yet?
    pub fn has_check_result(&self) -> bool {
        self.check_result.load(Relaxed) != 0
    }

    /// Records an active check's result.
    pub fn record_check(&self, passed: bool, status: u16) {
        self.check_result.store(if passed { 1 } else { 2 }, Relaxed);
        self.check_status.store(u32::from(status), Relaxed);
        self.check_time.store(unix_now(), Relaxed);
        if !passed {
            self.check_failures.fetch_add(1, Relaxed);
        }
    }

    /// Active checks that failed, since start (HAProxy's `chkfail`).
    pub fn check_failures(&self) -> u64 {
        self.check_failures.load(Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// Counts a request as started; the guard ends it when dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    pub fn record_status(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Relaxed);
    }

    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Relaxed);
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
            check: match self.check_result.load(Relaxed) {
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

/// A request in flight to an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub fn endpoint(&self) -> &EndpointState {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
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
    /// Idle upstream keep-alive connections.
    pub idle_connections: usize,
}
