//! Step 4a of the flow: the routing table. One immutable [`RoutingTable`] is
//! published through `ArcSwap`; requests load it without a lock, match a
//! route (most specific host, then longest path prefix), resolve the route's
//! target to a service, and ask the service's balancer for an endpoint.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::uri::Authority;
use http::HeaderMap;
use pointsman_discovery::{Address, AdminState, RouteSpec, RouteTarget};

use crate::engine::balance::BalanceAlgorithm;
use crate::engine::balance::{cookie_value, pick_split, Balancer};
use crate::engine::endpoint::EndpointState;
use crate::engine::endpoint::PassiveConfig;
use crate::engine::path::within_prefix;
use crate::engine::quiet::QUIET_EVERY;
use crate::engine::sticky::{find_cookie, StickyCookie};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};

/// The table readers load; swapped whole by the one writer.
pub type SharedTable = Arc<arc_swap::ArcSwap<RoutingTable>>;

/// Everything a request needs to find its endpoint, as of one moment.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Increases with every published table.
    pub version: u64,
    /// A persistent map: publishing a table that changes one service
    /// copies O(log n), not the whole map.
    pub services: imbl::HashMap<Arc<str>, Arc<Service>>,
    pub routes: Arc<RouteIndex>,
    /// map name -> key -> service name.
    pub maps: HashMap<Arc<str>, Arc<HashMap<String, Arc<str>>>>,
    /// Per listener: where requests that match no route go.
    pub defaults: HashMap<Arc<str>, Arc<str>>,
}

/// A service: its endpoints, how to balance them, and its timeouts.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    pub endpoints: Vec<Endpoint>,
    pub balancer: Balancer,
    pub settings: ServiceSettings,
}

#[derive(Clone, Debug)]
pub struct ServiceSettings {
    pub algorithm: BalanceAlgorithm,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// The cookie that binds clients to endpoints, for a sticky service
    /// (`sticky = "cookie"`, or `balance = "cookie"`).
    pub sticky: Option<StickyCookie>,
    pub retry: RetryPolicy,
    pub passive: PassiveConfig,
    /// Idle pooled upstream connections older than this are not reused.
    pub upstream_idle_timeout: Duration,
    /// Whether `Upgrade: h2c` reaches the endpoints (a 101 then tunnels
    /// the connection to them past routing).
    pub h2c_upgrade: bool,
    /// How long a request waits for an endpoint while none takes new
    /// requests; `None`: 503 at once.
    pub hold_timeout: Option<Duration>,
    /// The bodies of the proxy's own 502, 503 and 504 answers, by status
    /// (`error_pages`); the default plain text where none is set. `None`
    /// when the service has none, so a request carries nothing for them.
    pub error_pages: Option<Arc<std::collections::BTreeMap<u16, bytes::Bytes>>>,
    /// In maintenance on every proxy (`<pointsman>/maintenance/<service>`):
    /// every request gets 503 with this page (empty: the 503 page).
    pub maintenance: Option<bytes::Bytes>,
    /// Requests in flight per endpoint at most (0: no limit), and how
    /// long a request queues for a slot.
    pub endpoint_max_connections: u32,
    pub queue_timeout: Duration,
    /// Paused (fleet-wide, `<pointsman>/pauses/<service>`): new requests
    /// wait up to this long for the resume, whatever the endpoints.
    pub paused: Option<Duration>,
    /// Live counters shared by every table's copy of this service.
    pub live: Arc<ServiceState>,
}

/// Retries as the request path uses them.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Duration,
    /// Statuses on which an idempotent request is tried elsewhere.
    pub on_status: Arc<[u16]>,
    pub budget_percent: u32,
    pub replay_limit: usize,
    /// An idempotent request that reached the upstream may be repeated
    /// after a failure without an answer (a reset, a timeout).
    pub idempotent_after_send: bool,
}

/// Service-wide live counters (carried across rebuilds).
#[derive(Debug, Default)]
pub struct ServiceState {
    /// Requests in flight to the service, the most at once (`smax`), and
    /// how many start per second (`rate`).
    pub active: AtomicU32,
    pub max_active: AtomicU32,
    pub request_rate: crate::engine::rate::EventRate,
    /// Retries in flight.
    pub retrying: AtomicU32,
    /// Retries done, for the admin API and metrics.
    pub retries: AtomicU64,
    /// Requests waiting now for an endpoint (`hold_timeout`), and all
    /// that ever waited.
    pub held: AtomicU32,
    pub held_total: AtomicU64,
    /// The queue for a slot while every endpoint is at its limit
    /// (`endpoint_max_connections`): requests in it now (`qcur`), the
    /// most at once (`qmax`), all that queued, their recent wait
    /// (`qtime`); and the wake-up an ending request gives the first.
    pub queued: AtomicU32,
    pub max_queued: AtomicU32,
    pub queued_total: AtomicU64,
    pub queue_time: crate::engine::latency::RecentAverage,
    pub freed: Arc<tokio::sync::Notify>,
    /// Ejections done.
    pub ejections: AtomicU64,
    /// Time from a request's arrival to its response head.
    pub latency: crate::engine::latency::LatencyHistogram,
    /// Held while one request decides an ejection, so two failures at once
    /// cannot both pass the cap.
    ejecting: AtomicBool,
    /// "not ejected: at the cap" repeats on every failure under load.
    at_cap: crate::engine::quiet::Quiet,
    /// "the application sets the sticky cookie itself" repeats on every
    /// response of a misconfigured service.
    pub cookie_clash: crate::engine::quiet::Quiet,
    /// "no endpoint accepts traffic" repeats on every TCP connection.
    pub no_endpoint_warning: crate::engine::quiet::Quiet,
}

impl ServiceState {
    /// `clear counters`: the maxima start again from now.
    pub fn clear_max(&self) {
        self.max_active.store(self.active.load(Relaxed), Relaxed);
        self.max_queued.store(self.queued.load(Relaxed), Relaxed);
        self.request_rate.clear_max();
    }

    /// `clear counters all`: every counter starts from zero; the ejection
    /// and latency figures `/metrics` reads stay, as do the gauges.
    pub fn clear(&self) {
        self.clear_max();
        self.request_rate.clear();
        self.retries.store(0, Relaxed);
        self.queued_total.store(0, Relaxed);
        self.queue_time.clear();
    }

    /// Starts a retry if the budget allows one.
    pub fn try_retry(self: &Arc<Self>, budget_percent: u32) -> Option<RetryGuard> {
        let active = self.active.load(Relaxed);
        let allowed = (active * budget_percent / 100).max(3);
        if self.retrying.fetch_add(1, Relaxed) >= allowed {
            self.retrying.fetch_sub(1, Relaxed);
            return None;
        }
        Some(RetryGuard(self.clone()))
    }
}

/// A retry in flight.
pub struct RetryGuard(Arc<ServiceState>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Relaxed);
    }
}

impl Service {
    /// Counts a failed request (no answer, or a 5xx) of endpoint `i` for
    /// passive checks; a run of them ejects it.
    pub fn count_failure(&self, i: usize) {
        if self.endpoints[i]
            .live
            .failed_once(self.settings.passive.consecutive_failures)
        {
            self.maybe_eject(i);
        }
    }

    /// Ejects endpoint `i` after a run of failures, unless that would
    /// eject more than the allowed share of the service.
    fn maybe_eject(&self, i: usize) {
        let live = &self.settings.live;
        if live
            .ejecting
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
        {
            // Another request is deciding; this failure counts again next time.
            return;
        }
        self.eject_within_cap(i);
        live.ejecting.store(false, Release);
    }

    fn eject_within_cap(&self, i: usize) {
        let p = &self.settings.passive;
        if self.endpoints[i].live.ejected() {
            return;
        }
        let ejected = self.endpoints.iter().filter(|e| e.live.ejected()).count();
        let cap = self.endpoints.len() * p.max_ejected_percent as usize / 100;
        if ejected + 1 > cap {
            let now = crate::engine::conn::now_ms();
            if let Some(held) = self.settings.live.at_cap.allow(now, QUIET_EVERY) {
                tracing::warn!(service = %self.name, endpoint = %self.endpoints[i].id, ejected, repeats = held, "failing endpoint not ejected: the service is at its ejection cap (said at most every {QUIET_EVERY:?}; repeats: times held back since)");
            }
            return;
        }
        let length = self.endpoints[i].live.eject(p.ejection, p.max_ejection);
        self.settings.live.ejections.fetch_add(1, Relaxed);
        tracing::warn!(service = %self.name, endpoint = %self.endpoints[i].id, ?length, "endpoint ejected after consecutive failures");
    }
}

/// One endpoint of a service in one table.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub id: Arc<str>,
    pub address: Address,
    /// `host:port`, ready to put in an upstream request's URI.
    pub authority: Authority,
    /// The sticky cookie value that selects this endpoint.
    pub cookie: Arc<str>,
    /// Administrative state and effective weight as of this table: part of
    /// the snapshot, so a request sees one registry revision's routes and
    /// endpoint states together. (Health and ejection are live atomics.)
    pub state: AdminState,
    pub weight: u32,
    /// The weight its registry gives it, before local changes (HAProxy's
    /// "initial weight"; `set server ... weight 50%` is a share of it).
    pub initial_weight: u32,
    /// Whether an active health check watches it.
    pub checked: bool,
    /// The weight the balancer uses in this table: `weight` times
    /// [`WEIGHT_SCALE`], lowered while the endpoint slow-starts.
    pub balance_weight: u32,
    pub live: Arc<EndpointState>,
    /// Held in drain on a tool's notice until the proxy applies this etcd
    /// revision (see `control::local`); shown by the admin API.
    pub drain_notice: Option<i64>,
    /// Its state, its weight, set on this proxy (runtime or admin API).
    pub local_state: bool,
    pub local_weight: bool,
    /// Takes requests only while no other endpoint of the service does.
    pub backup: bool,
}

/// Balancers work on weights times this, so even a weight-1 endpoint can
/// ramp up in steps (HAProxy scales its weights the same way).
pub const WEIGHT_SCALE: u32 = 16;

impl Endpoint {
    pub fn new(
        id: Arc<str>,
        address: Address,
        live: Arc<EndpointState>,
        state: AdminState,
        weight: u32,
    ) -> Result<Self, String> {
        let authority = Authority::try_from(address.to_string())
            .map_err(|e| format!("address {address} cannot be used in a URI: {e}"))?;
        Ok(Endpoint {
            cookie: cookie_value(&id).into(),
            id,
            address,
            authority,
            state,
            weight,
            initial_weight: weight,
            checked: false,
            balance_weight: weight * WEIGHT_SCALE,
            live,
            drain_notice: None,
            local_state: false,
            local_weight: false,
            backup: false,
        })
    }

    /// May the balancer send it a new request?
    #[inline]
    pub fn accepts_new(&self) -> bool {
        self.state == AdminState::Ready && self.weight > 0 && self.live.usable()
    }

    /// May it serve a sticky session already bound to it? Draining
    /// endpoints still do, as in HAProxy.
    #[inline]
    pub fn accepts_sticky(&self) -> bool {
        self.state != AdminState::Maint && self.live.usable()
    }
}

/// A validated route.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub path_prefix: String,
    pub strip_prefix: bool,
    pub target: Target,
    /// Plain-HTTP requests are sent to https (`Some(port)`, or `Some(None)`
    /// for the default port).
    pub https_redirect: Option<Option<u16>>,
    /// `Strict-Transport-Security` for responses over TLS.
    pub hsts: Option<http::HeaderValue>,
}

/// Where a route sends a request.
#[derive(Debug)]
pub enum Target {
    Service(Arc<str>),
    Map {
        map: Arc<str>,
        key: MapKey,
        default: Option<Arc<str>>,
    },
    Split {
        arms: Vec<(Arc<str>, u32)>,
        total: u32,
    },
}

/// How a map route computes its key from a request (HAProxy fetch names).
#[derive(Debug, PartialEq, Eq)]
pub enum MapKey {
    Literal(String),
    Host,
    Path,
    Header(HeaderName),
    Cookie(String),
}

impl MapKey {
    /// Parses a `map_key` (the syntax is the registry contract's,
    /// [`pointsman_discovery::MapKey`]) with header names ready to look up.
    pub fn parse(s: &str) -> Result<MapKey, String> {
        use pointsman_discovery::MapKey as Spec;
        Ok(match Spec::parse(s)? {
            Spec::Literal(l) => MapKey::Literal(l),
            Spec::Host => MapKey::Host,
            Spec::Path => MapKey::Path,
            Spec::Header(name) => MapKey::Header(
                HeaderName::try_from(name.as_str())
                    .map_err(|_| format!("map_key {s:?}: {name:?} is not a header name"))?,
            ),
            Spec::Cookie(c) => MapKey::Cookie(c),
        })
    }
}

impl Route {
    pub fn build(name: &str, spec: &RouteSpec) -> Result<Route, String> {
        let target = match spec.target()? {
            RouteTarget::Service(s) => Target::Service(s.into()),
            RouteTarget::Map { map, key, default } => Target::Map {
                map: map.into(),
                key: MapKey::parse(&key)?,
                default: default.map(Into::into),
            },
            RouteTarget::Split(arms) => {
                let arms: Vec<(Arc<str>, u32)> = arms
                    .into_iter()
                    .map(|a| (a.service.into(), a.weight))
                    .collect();
                let total = arms.iter().try_fold(0u32, |t, (_, w)| t.checked_add(*w));
                let total = total.ok_or("split weights add up to more than 2^32")?;
                Target::Split { arms, total }
            }
        };
        if spec.https_port.is_some() && !spec.https_redirect {
            return Err(
                "https_port is the port of https_redirect: set https_redirect = true".into(),
            );
        }
        let hsts = spec
            .hsts_max_age
            .map(http::HeaderValue::from)
            .map(|age| {
                let mut v = b"max-age=".to_vec();
                v.extend_from_slice(age.as_bytes());
                http::HeaderValue::from_bytes(&v)
            })
            .transpose()
            .map_err(|e| format!("hsts_max_age: {e}"))?;
        Ok(Route {
            name: name.into(),
            path_prefix: spec.path_prefix.clone(),
            strip_prefix: spec.strip_prefix,
            target,
            https_redirect: spec.https_redirect.then_some(spec.https_port),
            hsts,
        })
    }
}

/// Routes indexed by host: exact hosts, `*.suffix` wildcards, then routes
/// for any host. Each list is sorted by path prefix length, longest first.
#[derive(Debug, Default)]
pub struct RouteIndex {
    exact: HashMap<String, Vec<Arc<Route>>>,
    /// Keyed by the suffix with its leading dot: `.example.com`.
    wildcard: HashMap<String, Vec<Arc<Route>>>,
    any: Vec<Arc<Route>>,
    pub len: usize,
}

impl RouteIndex {
    /// Every route with the host it answers (`None`: any host), exact hosts
    /// first, then wildcards, then any host; for the admin API.
    pub fn iter(&self) -> impl Iterator<Item = (Option<String>, &Arc<Route>)> {
        let exact = self
            .exact
            .iter()
            .flat_map(|(h, rs)| rs.iter().map(move |r| (Some(h.clone()), r)));
        let wildcard = self
            .wildcard
            .iter()
            .flat_map(|(h, rs)| rs.iter().map(move |r| (Some(format!("*{h}")), r)));
        exact
            .chain(wildcard)
            .chain(self.any.iter().map(|r| (None, r)))
    }

    /// Builds the index; routes that fail validation are returned with why.
    pub fn build<'a>(
        specs: impl IntoIterator<Item = (&'a str, &'a RouteSpec)>,
    ) -> (RouteIndex, Vec<(String, String)>) {
        let mut index = RouteIndex::default();
        let mut rejected = Vec::new();
        for (name, spec) in specs {
            let route = match Route::build(name, spec) {
                Ok(r) => Arc::new(r),
                Err(why) => {
                    rejected.push((name.to_string(), why));
                    continue;
                }
            };
            index.len += 1;
            match spec.host.as_deref().map(str::to_ascii_lowercase) {
                None => index.any.push(route),
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => index
                        .wildcard
                        .entry(suffix.to_string())
                        .or_default()
                        .push(route),
                    None => index.exact.entry(h).or_default().push(route),
                },
            }
        }
        let sort = |v: &mut Vec<Arc<Route>>| {
            // Longest prefix first; equal prefixes by name, so the choice is
            // the same on every replica.
            v.sort_by(|a, b| {
                b.path_prefix
                    .len()
                    .cmp(&a.path_prefix.len())
                    .then_with(|| a.name.cmp(&b.name))
            })
        };
        index.exact.values_mut().for_each(sort);
        index.wildcard.values_mut().for_each(sort);
        sort(&mut index.any);
        (index, rejected)
    }

    /// The route for a request: the most specific host group that has a
    /// route whose prefix matches, and in it the longest prefix.
    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        fn longest<'r>(routes: &'r [Arc<Route>], path: &str) -> Option<&'r Arc<Route>> {
            // A route that strips its prefix covers whole segments only:
            // `/static` stripped from `/staticadmin` would leave `admin`.
            routes.iter().find(|r| {
                if r.strip_prefix {
                    within_prefix(path, &r.path_prefix)
                } else {
                    path.starts_with(r.path_prefix.as_str())
                }
            })
        }
        let host = normalize_host(host);
        if let Some(r) = self
            .exact
            .get(host.as_ref())
            .and_then(|rs| longest(rs, path))
        {
            return Some(r);
        }
        if !self.wildcard.is_empty() {
            let mut rest: &str = host.as_ref();
            while let Some(dot) = rest.find('.') {
                let suffix = &rest[dot..];
                if let Some(r) = self.wildcard.get(suffix).and_then(|rs| longest(rs, path)) {
                    return Some(r);
                }
                rest = &rest[dot + 1..];
            }
        }
        longest(&self.any, path)
    }
}

/// Lower-cases a host and drops its port and trailing dot, allocating only
/// when the host is not already in that form.
fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = match host.rfind(':') {
        // Keep IPv6 literals (`[::1]`) whole.
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// What a route resolved to for one request.
#[derive(Debug)]
pub enum Resolved {
    Service(Arc<Service>),
    /// The target names a service nobody registered (yet).
    UnknownService(Arc<str>),
    /// A map route whose map has no entry for the key and no default.
    NoMapEntry {
        map: Arc<str>,
        key: String,
    },
}

impl RoutingTable {
    /// Resolves a route's target for a request.
    pub fn resolve(
        &self,
        target: &Target,
        host: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Resolved {
        let name: Arc<str> = match target {
            Target::Service(s) => s.clone(),
            Target::Split { arms, total } => match pick_split(arms, *total) {
                Some(s) => s.clone(),
                None => return Resolved::UnknownService("".into()),
            },
            Target::Map { map, key, default } => {
                let key = map_key(key, host, path, headers);
                let found = self
                    .maps
                    .get(map)
                    .and_then(|m| m.get(key.as_ref()))
                    .or(default.as_ref());
                match found {
                    Some(s) => s.clone(),
                    None => {
                        return Resolved::NoMapEntry {
                            map: map.clone(),
                            key: key.into_owned(),
                        }
                    }
                }
            }
        };
        match self.services.get(&name) {
            Some(s) => Resolved::Service(s.clone()),
            None => Resolved::UnknownService(name),
        }
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }
}

fn map_key<'a>(
    key: &'a MapKey,
    host: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
) -> Cow<'a, str> {
    match key {
        MapKey::Literal(s) => Cow::Borrowed(s),
        MapKey::Host => normalize_host(host),
        MapKey::Path => Cow::Borrowed(path),
        MapKey::Header(name) => Cow::Borrowed(
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        ),
        MapKey::Cookie(name) => Cow::Borrowed(find_cookie(headers, name).unwrap_or("")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(host: Option<&str>, prefix: &str, service: &str) -> RouteSpec {
        RouteSpec {
            host: host.map(String::from),
            path_prefix: prefix.into(),
            service: Some(service.into()),
            ..Default::default()
        }
    }

    fn target_of(r: Option<&Arc<Route>>) -> Option<&str> {
        match &r?.target {
            Target::Service(s) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn most_specific_host_then_longest_prefix() {
        let specs = [
            ("any", spec(None, "/", "default")),
            ("any-blog", spec(None, "/blog", "blog")),
            ("wild", spec(Some("*.example.com"), "/", "wild")),
            ("exact", spec(Some("www.example.com"), "/", "www")),
            ("exact-api", spec(Some("www.example.com"), "/api", "api")),
        ];
        let (idx, rejected) = RouteIndex::build(specs.iter().map(|(n, s)| (*n, s)));
        assert!(rejected.is_empty());
        assert_eq!(
            target_of(idx.find("www.example.com", "/api/x")),
            Some("api")
        );
        assert_eq!(
            target_of(idx.find("WWW.Example.com:8080", "/")),
            Some("www")
        );
        assert_eq!(
            target_of(idx.find("a.b.example.com", "/blog")),
            Some("wild")
        );
        assert_eq!(target_of(idx.find("example.com", "/blog/1")), Some("blog"));
        assert_eq!(target_of(idx.find("other", "/x")), Some("default"));
    }

    #[test]
    fn no_match_is_none() {
        let s = spec(Some("a.com"), "/x", "s");
        let (idx, _) = RouteIndex::build([("r", &s)]);
        assert!(idx.find("a.com", "/y").is_none());
        assert!(idx.find("b.com", "/x").is_none());
    }

    #[test]
    fn map_keys_parse_haproxy_fetches() {
        assert_eq!(
            MapKey::parse("STATIC"),
            Ok(MapKey::Literal("STATIC".into()))
        );
        assert_eq!(MapKey::parse("req.host"), Ok(MapKey::Host));
        assert!(matches!(
            MapKey::parse("req.hdr(x-user)"),
            Ok(MapKey::Header(_))
        ));
        assert_eq!(
            MapKey::parse("req.cookie(v)"),
            Ok(MapKey::Cookie("v".into()))
        );
        assert!(MapKey::parse("req.nope").is_err());
        assert!(MapKey::parse("req.hdr()").is_err());
    }
}
