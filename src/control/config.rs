//! Step 0 of the flow: the config file. TOML in, a validated [`Config`] out,
//! or a [`ConfigError`] that names the file, the line or key, and what is
//! expected. A config is turned into the same [`Entry`] values a registry
//! produces (see [`Config::entries`]), so static and discovered backends meet
//! in one place.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pointsman_discovery::registration::{DEFAULT_WEIGHT, MAX_WEIGHT};

use crate::engine::balance::BalanceAlgorithm;
use crate::engine::endpoint::PassiveConfig;
use crate::engine::path::PathNormalization;
use crate::engine::sticky::{is_cookie_name, CookieMode, StickyCookie, DEFAULT_COOKIE};
use crate::engine::trust::{TrustedNet, TrustedProxies};
use crate::engine::ClientLimits;
use pointsman_discovery::{Address, AdminState, CheckSpec, Entry, Registration, RouteSpec};
use serde::Deserialize;

/// The config pointsman runs when given none: one HTTP listener in front of
/// the demo upstreams that `pointsman demo` starts.
pub const EMBEDDED_DEMO: &str = include_str!("../../examples/demo.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // `reason` rather than `source`: the message says it, and an error
    // chain printed with `{:#}` would say it again.
    #[error("{path}: cannot read the config file: {reason}")]
    Read {
        path: String,
        reason: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

/// A whole, validated config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Where it was read from (`<embedded>` for the built-in demo).
    pub origin: String,
    pub global: Global,
    pub listeners: Vec<Listener>,
    pub services: BTreeMap<String, ServiceConfig>,
    pub routes: BTreeMap<String, RouteSpec>,
    pub maps: BTreeMap<String, BTreeMap<String, String>>,
}

/// Process-wide settings and the defaults every service inherits.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Global {
    /// Admin listener (API, stats page, metrics).
    pub admin: SocketAddr,
    /// How long in-flight requests get to finish on shutdown.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Client connections accepted at once, across all listeners.
    pub max_connections: usize,
    /// Largest request head (request line + headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Time a client gets to send a complete request head (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// An idle keep-alive client connection is closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The longest a client may leave a request in progress without
    /// moving a byte: between two pieces of its request body, and while
    /// it does not read the response (a send blocked on its socket).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Defaults for services that do not set their own.
    pub connect_timeout: Option<HumanDuration>,
    pub request_timeout: Option<HumanDuration>,
    /// Idle upstream keep-alive connections are closed after this long.
    #[serde(with = "humantime_serde")]
    pub upstream_idle_timeout: Duration,
    /// Peers (addresses or CIDR blocks) whose X-Forwarded-* and Forwarded
    /// headers are kept: the proxies you run in front. From anyone else
    /// they are replaced.
    pub trusted_proxies: Vec<TrustedNet>,
    /// Older spelling of `trusted_proxies = ["0.0.0.0/0", "::/0"]`.
    pub trust_forwarded_headers: bool,
    /// `"strict"`: paths are normalised before routing and forwarding
    /// (dot segments, unreserved escapes) and ambiguous ones refused;
    /// `"off"`: raw paths.
    pub path_normalization: PathNormalization,
    /// Required on admin API changes when set; required at all when the
    /// admin listener is not on loopback. Read at start.
    pub admin_token: Option<String>,
    /// Log one JSON line per request (target `access`).
    pub access_log: bool,
    /// The Unix socket of hitless restarts (`run --takeover` takes
    /// precedence); read at start only.
    pub takeover_socket: Option<std::path::PathBuf>,
    /// HAProxy-compatible runtime API on this Unix socket (mode 0600).
    /// Read at start only.
    pub runtime_socket: Option<PathBuf>,
    /// HAProxy-compatible runtime API on this TCP address; loopback only.
    /// Read at start only.
    pub runtime_api: Option<SocketAddr>,
    /// The `Name` the runtime API's `show info` gives.
    pub runtime_identity: RuntimeIdentity,
    /// The certificates of TLS listeners: `NAME.crt` + `NAME.key`, or
    /// `NAME.pem`, looked at again every 2 s.
    pub tls_dir: Option<PathBuf>,
}

/// What `show info` calls the process. HAProxy's clients (haproxyadmin,
/// haproxytool) accept a socket only when it says `HAProxy`, so that is
/// the default; `pointsman` is for tools that must tell the two apart.
/// `Version` says `pointsman-<version>` either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeIdentity {
    #[default]
    Haproxy,
    Pointsman,
}

impl std::str::FromStr for RuntimeIdentity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "haproxy" => Ok(RuntimeIdentity::Haproxy),
            "pointsman" => Ok(RuntimeIdentity::Pointsman),
            other => Err(format!(
                "unknown runtime identity {other:?}: expected haproxy or pointsman"
            )),
        }
    }
}

/// A duration written as `"3s"`, `"250ms"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct HumanDuration(#[serde(with = "humantime_serde")] pub Duration);

impl Default for Global {
    fn default() -> Self {
        Global {
            admin: SocketAddr::from(([127, 0, 0, 1], 8404)),
            drain_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            connect_timeout: None,
            request_timeout: None,
            upstream_idle_timeout: Duration::from_secs(30),
            trusted_proxies: Vec::new(),
            trust_forwarded_headers: false,
            path_normalization: PathNormalization::Strict,
            admin_token: None,
            access_log: false,
            takeover_socket: None,
            runtime_socket: None,
            runtime_api: None,
            runtime_identity: RuntimeIdentity::Haproxy,
            tls_dir: None,
        }
    }
}

/// Default time to establish an upstream connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default time from forwarding a request to its response headers.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    Http,
    Tcp,
}

/// A socket pointsman accepts clients on.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    /// `IP:PORT`, or `*:PORT` (also `:PORT`) for every IPv4 interface.
    #[serde(deserialize_with = "bind_address")]
    pub bind: SocketAddr,
    #[serde(default = "http_mode")]
    pub mode: ListenerMode,
    /// HTTP: where requests that match no route go (otherwise 404).
    /// TCP: the service every connection goes to.
    #[serde(default)]
    pub default_service: Option<String>,
    /// HTTP over TLS, with the certificates of `[global] tls_dir`.
    #[serde(default)]
    pub tls: bool,
}

/// A listener address: `IP:PORT`, or `*:PORT` / `:PORT` for every IPv4
/// interface (`0.0.0.0:PORT`), as HAProxy's `bind` writes it.
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    let any_interface = s
        .strip_prefix("*:")
        .or_else(|| s.strip_prefix(':').filter(|rest| !rest.contains(':')));
    let expected =
        "expected IP:PORT, or *:PORT for every interface, e.g. 0.0.0.0:8080, [::]:8080 or *:80";
    match any_interface {
        Some(port) => port
            .parse::<u16>()
            .map(|port| SocketAddr::from(([0, 0, 0, 0], port)))
            .map_err(|_| format!("{s:?} has an invalid port: {expected}")),
        None => s
            .parse()
            .map_err(|_| format!("{s:?} is not a listen address: {expected}")),
    }
}

fn bind_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_bind(&s).map_err(serde::de::Error::custom)
}

fn http_mode() -> ListenerMode {
    ListenerMode::Http
}

/// A service's settings and its static endpoints. Services that are only
/// known from a registry get `ServiceConfig::default()`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default)]
    pub balance: BalanceAlgorithm,
    /// `sticky = "cookie"`: a client stays with the endpoint that first
    /// served it, bound by `cookie`; `balance` picks for the others.
    #[serde(default)]
    pub sticky: Option<Sticky>,
    /// The sticky cookie (see [`CookieConfig`]).
    #[serde(default)]
    pub cookie: Option<CookieConfig>,
    #[serde(default)]
    pub connect_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub request_timeout: Option<HumanDuration>,
    /// Active check for every endpoint of the service (a registration's
    /// own `check` takes precedence).
    #[serde(default)]
    pub check: Option<CheckSpec>,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub passive: PassiveConfig,
    /// An endpoint that comes up ramps its weight over this window.
    #[serde(default)]
    pub slow_start: Option<HumanDuration>,
    /// A deregistered endpoint keeps serving its in-flight requests (and
    /// sticky sessions) for at most this long before it leaves the table.
    #[serde(default)]
    pub drain_timeout: Option<HumanDuration>,
    /// While no endpoint takes new requests, a request waits up to this
    /// long for one (a registration, a passing check, a restart on the
    /// same address) instead of getting 503 at once. Off by default.
    #[serde(default)]
    pub hold_timeout: Option<HumanDuration>,
    /// Requests in flight to each endpoint at most (HAProxy's server
    /// `maxconn`); more wait in the service's queue. Unset: no limit.
    #[serde(default)]
    pub endpoint_max_connections: Option<u32>,
    /// How long a request waits in that queue, then 503 (default: the
    /// connect timeout, as HAProxy's `timeout queue`).
    #[serde(default)]
    pub queue_timeout: Option<HumanDuration>,
    /// The body of the proxy's own 502, 503 and 504 answers for this
    /// service: an HTML file per status, read when the config is.
    #[serde(default)]
    pub error_pages: BTreeMap<String, PathBuf>,
    /// Those files' contents, by status (filled by validation).
    #[serde(skip)]
    pub error_page_bodies: BTreeMap<u16, Arc<str>>,
    /// Let `Upgrade: h2c` through to the endpoints (off: such a request
    /// is sent as plain HTTP/1.1, as a server that ignores it would see).
    #[serde(default)]
    pub h2c_upgrade: bool,
    #[serde(default)]
    pub endpoints: Vec<StaticEndpoint>,
}

/// What binds a sticky service's clients to their endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sticky {
    Cookie,
}

/// A sticky cookie as written: `cookie = "NAME"` or
/// `cookie = { name = "NAME", mode = "insert" | "prefix" | "rewrite" }`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CookieConfig {
    /// `None`: [`DEFAULT_COOKIE`] (insert mode only).
    pub name: Option<String>,
    pub mode: CookieMode,
}

impl<'de> Deserialize<'de> for CookieConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = CookieConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"a cookie name, or { name = "NAME", mode = "insert" | "prefix" | "rewrite" }"#)
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<CookieConfig, E> {
                Ok(CookieConfig {
                    name: Some(name.to_string()),
                    mode: CookieMode::Insert,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<CookieConfig, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Table {
                    #[serde(default)]
                    name: Option<String>,
                    #[serde(default)]
                    mode: CookieMode,
                }
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(CookieConfig {
                    name: t.name,
                    mode: t.mode,
                })
            }
        }
        d.deserialize_any(Either)
    }
}

impl ServiceConfig {
    /// The service's sticky cookie, if it is sticky: `sticky = "cookie"`,
    /// or `balance = "cookie"` (roundrobin with a sticky cookie).
    pub fn sticky_cookie(&self) -> Option<StickyCookie> {
        if self.sticky.is_none() && self.balance != BalanceAlgorithm::Cookie {
            return None;
        }
        let cookie = self.cookie.clone().unwrap_or_default();
        Some(StickyCookie {
            name: cookie.name.as_deref().unwrap_or(DEFAULT_COOKIE).into(),
            mode: cookie.mode,
        })
    }

    /// Why the sticky settings cannot work, and what to write instead.
    fn check_sticky(&self) -> Result<(), String> {
        let Some(cookie) = &self.cookie else {
            return Ok(());
        };
        if self.sticky_cookie().is_none() {
            return Err(r#"`cookie` is set but the service is not sticky: add sticky = "cookie" (or remove `cookie`)"#.into());
        }
        let mode = cookie.mode.as_str();
        match &cookie.name {
            Some(name) if !is_cookie_name(name) => Err(format!(
                "{name:?} cannot name a cookie: use letters, digits and !#$%&'*+-.^_`|~ only, e.g. \"SERVERID\""
            )),
            None if cookie.mode != CookieMode::Insert => Err(format!(
                r#"mode = "{mode}" binds clients through the application's own cookie, which needs naming: e.g. cookie = {{ name = "JSESSIONID", mode = "{mode}" }}"#
            )),
            _ => Ok(()),
        }
    }
}

/// When a request is tried again on another endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries in all, the first included; 1 turns retries off.
    pub attempts: u32,
    /// Limit for one try (default: the service's request_timeout).
    pub per_try_timeout: Option<HumanDuration>,
    /// Statuses that make an idempotent request try another endpoint.
    pub on_status: Vec<u16>,
    /// Retries in flight may be at most this share of the service's
    /// requests in flight (at least 3), so retries cannot snowball.
    pub budget_percent: u32,
    /// Request bodies up to this size are held so they can be sent again;
    /// larger ones stream and are not retried once bytes were sent.
    pub replay_limit: usize,
    /// Whether an idempotent request whose bytes reached the upstream may
    /// be sent again after the connection failed before an answer or the
    /// try timed out. Off: only requests that provably never reached the
    /// upstream are tried again (RFC 9110 9.2.2).
    pub idempotent_after_send: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            per_try_timeout: None,
            on_status: vec![502, 503, 504],
            budget_percent: 20,
            replay_limit: 64 * 1024,
            idempotent_after_send: false,
        }
    }
}

/// An endpoint written in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticEndpoint {
    pub id: String,
    pub address: Address,
    #[serde(default = "default_weight")]
    pub weight: u16,
    #[serde(default)]
    pub state: AdminState,
    /// Used only while no other endpoint of the service takes traffic.
    #[serde(default)]
    pub backup: bool,
}

fn default_weight() -> u16 {
    DEFAULT_WEIGHT
}

/// The file as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    global: Global,
    #[serde(default)]
    listeners: Vec<toml::Spanned<Listener>>,
    #[serde(default)]
    services: BTreeMap<String, toml::Spanned<ServiceConfig>>,
    #[serde(default)]
    routes: BTreeMap<String, toml::Spanned<RouteSpec>>,
    #[serde(default)]
    maps: BTreeMap<String, BTreeMap<String, String>>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
            path: path.display().to_string(),
            reason,
        })?;
        Config::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_string(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
            message: e.message().to_string(),
        })?;
        let invalid =
            |span: std::ops::Range<usize>, key: String, message: String| ConfigError::Invalid {
                path: origin.to_string(),
                line: line_of(text, span.start),
                key,
                message,
            };

        if let Some(addr) = raw.global.runtime_api {
            check_loopback(addr).map_err(|message| ConfigError::Invalid {
                path: origin.to_string(),
                line: line_of(text, text.find("runtime_api").unwrap_or(0)),
                key: "global.runtime_api".into(),
                message,
            })?;
        }

        if raw.global.trust_forwarded_headers && !raw.global.trusted_proxies.is_empty() {
            return Err(ConfigError::Invalid {
                path: origin.to_string(),
                line: line_of(text, text.find("trust_forwarded_headers").unwrap_or(0)),
                key: "global.trust_forwarded_headers".into(),
                message: "trust_forwarded_headers = true trusts every peer, which contradicts trusted_proxies: keep only trusted_proxies".into(),
            });
        }

        if matches!(&raw.global.admin_token, Some(t) if t.trim().is_empty()) {
            return Err(ConfigError::Invalid {
                path: origin.to_string(),
                line: line_of(text, text.find("admin_token").unwrap_or(0)),
                key: "global.admin_token".into(),
                message: AdminTokenError::Blank.to_string(),
            });
        }

        let mut listeners = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, l) in raw.listeners.into_iter().enumerate() {
            let span = l.span();
            let l = l.into_inner();
            let key = format!("listeners[{i}]");
            if l.name.is_empty() || !names.insert(l.name.clone()) {
                return Err(invalid(
                    span,
                    key,
                    format!("listener name {:?} is empty or used twice: give each listener its own name", l.name),
                ));
            }
            if l.tls && l.mode == ListenerMode::Tcp {
                return Err(invalid(
                    span,
                    key,
                    "tls = true is for http listeners: TLS is not terminated on tcp ones".into(),
                ));
            }
            if l.tls && raw.global.tls_dir.is_none() {
                return Err(invalid(
                    span,
                    key,
                    format!(
                        "listener {:?} has tls = true but there are no certificates: set [global] tls_dir (or --tls-dir) to a directory of NAME.crt + NAME.key or NAME.pem files",
                        l.name
                    ),
                ));
            }
            if l.mode == ListenerMode::Tcp && l.default_service.is_none() {
                return Err(invalid(
                    span,
                    key,
                    "a tcp listener needs `default_service`: the service its connections go to"
                        .into(),
                ));
            }
            listeners.push(l);
        }
        if let Some(dup) = duplicate_bind(&listeners) {
            return Err(ConfigError::Invalid {
                path: origin.to_string(),
                line: 1,
                key: "listeners".into(),
                message: format!("two listeners bind {dup}: each needs its own address"),
            });
        }

        let mut services = BTreeMap::new();
        for (name, svc) in raw.services {
            let span = svc.span();
            let svc = svc.into_inner();
            let key = format!("services.{name}");
            validate_name(&name).map_err(|m| invalid(span.clone(), key.clone(), m))?;
            let mut ids = std::collections::HashSet::new();
            for (i, ep) in svc.endpoints.iter().enumerate() {
                let ekey = format!("{key}.endpoints[{i}]");
                validate_name(&ep.id).map_err(|m| invalid(span.clone(), ekey.clone(), m))?;
                if !ids.insert(ep.id.as_str()) {
                    return Err(invalid(
                        span,
                        ekey,
                        format!("endpoint id {:?} is used twice in this service", ep.id),
                    ));
                }
                if ep.weight > MAX_WEIGHT {
                    return Err(invalid(
                        span,
                        ekey,
                        format!(
                            "weight {} is out of range: expected 0 to {MAX_WEIGHT}",
                            ep.weight
                        ),
                    ));
                }
            }
            if svc.retry.attempts == 0 {
                return Err(invalid(
                    span,
                    format!("{key}.retry.attempts"),
                    "must be at least 1 (1 means no retries)".into(),
                ));
            }
            if svc.passive.max_ejected_percent > 100 || svc.retry.budget_percent > 100 {
                return Err(invalid(
                    span,
                    key,
                    "percentages must be from 0 to 100".into(),
                ));
            }
            if let Some(bad) = svc
                .retry
                .on_status
                .iter()
                .find(|s| !(100..=599).contains(*s))
            {
                return Err(invalid(
                    span,
                    format!("{key}.retry.on_status"),
                    format!("{bad} is not an HTTP status"),
                ));
            }
            svc.check_sticky()
                .map_err(|m| invalid(span.clone(), format!("{key}.cookie"), m))?;
            let mut svc = svc;
            for (status, file) in &svc.error_pages {
                let key = format!("{key}.error_pages.{status}");
                let (status, body) = read_error_page(origin, status, file)
                    .map_err(|m| invalid(span.clone(), key, m))?;
                svc.error_page_bodies.insert(status, body);
            }
            services.insert(name, svc);
        }

        let mut routes = BTreeMap::new();
        for (name, route) in raw.routes {
            let span = route.span();
            let route = route.into_inner();
            route
                .target()
                .map_err(|m| invalid(span, format!("routes.{name}"), m))?;
            routes.insert(name, route);
        }

        Ok(Config {
            origin: origin.to_string(),
            global: raw.global,
            listeners,
            services,
            routes,
            maps: raw.maps,
        })
    }

    /// The built-in demo config used by `make run`.
    pub fn embedded_demo() -> Config {
        // The embedded file is checked by a unit test, so this cannot fail
        // in a released binary.
        Config::parse("<embedded demo.toml>", EMBEDDED_DEMO)
            .unwrap_or_else(|e| panic!("embedded demo config is invalid: {e}"))
    }

    /// The config's endpoints, routes and maps as registry entries.
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for (service, svc) in &self.services {
            for ep in &svc.endpoints {
                let mut reg = Registration::new(service.clone(), ep.id.clone(), ep.address.clone());
                reg.weight = ep.weight;
                reg.state = ep.state;
                reg.backup = ep.backup;
                out.push(Entry::Instance(reg));
            }
        }
        for (name, spec) in &self.routes {
            out.push(Entry::Route {
                name: name.clone(),
                spec: spec.clone(),
            });
        }
        for (map, entries) in &self.maps {
            for (key, value) in entries {
                out.push(Entry::MapEntry {
                    map: map.clone(),
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        out
    }

    /// The file the config came from, if it came from one.
    pub fn file(&self) -> Option<PathBuf> {
        (!self.origin.starts_with('<')).then(|| PathBuf::from(&self.origin))
    }
}

fn duplicate_bind(listeners: &[Listener]) -> Option<SocketAddr> {
    let mut seen = std::collections::HashSet::new();
    listeners
        .iter()
        .find(|l| !seen.insert(l.bind))
        .map(|l| l.bind)
}

/// The statuses a service's error page may replace: the answers the
/// proxy makes itself for it.
pub const ERROR_PAGE_STATUSES: [u16; 3] = [502, 503, 504];

/// Reads an error page; a relative path is relative to the config file.
fn read_error_page(origin: &str, status: &str, file: &Path) -> Result<(u16, Arc<str>), String> {
    let Some(status) = status
        .parse::<u16>()
        .ok()
        .filter(|s| ERROR_PAGE_STATUSES.contains(s))
    else {
        return Err(format!(
            "{status} is not a status the proxy answers for a service: expected 502, 503 or 504"
        ));
    };
    let path = match Path::new(origin).parent() {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file.to_path_buf(),
    };
    std::fs::read_to_string(&path)
        .map(|page| (status, Arc::from(page)))
        .map_err(|e| format!("cannot read the page {}: {e}", path.display()))
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(format!(
            "name {name:?} is not usable: expected a non-empty name without '/' or spaces"
        ));
    }
    Ok(())
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|t| t.bytes().filter(|b| *b == b'\n').count() + 1)
        .unwrap_or(1)
}

impl From<&Global> for ClientLimits {
    fn from(g: &Global) -> Self {
        ClientLimits {
            header_read_timeout: g.header_read_timeout,
            idle_timeout: g.idle_timeout,
            body_timeout: g.body_timeout,
            // hyper refuses read buffers below 8 KiB.
            max_header_bytes: g.max_header_bytes.max(8192),
            trusted_proxies: if g.trust_forwarded_headers {
                TrustedProxies::everyone()
            } else {
                TrustedProxies::new(g.trusted_proxies.iter().copied())
            },
            path_normalization: g.path_normalization,
            access_log: g.access_log,
        }
    }
}

/// Why the admin token does not protect the admin listener.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminTokenError {
    #[error("the admin token is blank: set a secret (--admin-token, POINTSMAN_ADMIN_TOKEN or [global] admin_token), or none at all and keep the admin listener on loopback")]
    Blank,
    #[error("the admin listener {0} is not on loopback: set --admin-token (or [global] admin_token) so that changes need it, or bind the admin listener to 127.0.0.1")]
    NeedsToken(SocketAddr),
}

/// A token, when there is one, must not be blank; an admin listener off
/// loopback (`admin`, bound at start) must have one.
pub fn check_admin_token(global: &Global, admin: SocketAddr) -> Result<(), AdminTokenError> {
    match global.admin_token.as_deref() {
        Some(t) if t.trim().is_empty() => Err(AdminTokenError::Blank),
        None if !admin.ip().is_loopback() => Err(AdminTokenError::NeedsToken(admin)),
        _ => Ok(()),
    }
}

/// Whether `given` is the configured admin token; false when none is
/// configured. Compares without stopping at the first difference.
pub fn admin_token_matches(global: &Global, given: &[u8]) -> bool {
    let Some(token) = global.admin_token.as_deref() else {
        return false;
    };
    let a = token.as_bytes();
    a.len() == given.len() && a.iter().zip(given).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses a TCP address that is not loopback: the runtime API's TCP
/// listener is read-only without the admin token, and even with it only
/// local processes may reach it.
pub fn check_loopback(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "runtime API address {addr} is not a loopback address: the runtime API listens on \
         loopback only (from another host, use an SSH tunnel; for access by file \
         permissions, --runtime-socket)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_token_may_not_be_blank_nor_missing_off_loopback() {
        let mut g = Config::embedded_demo().global;
        let (local, any): (SocketAddr, SocketAddr) = (
            "127.0.0.1:8404".parse().expect("addr"),
            "0.0.0.0:8404".parse().expect("addr"),
        );
        g.admin_token = None;
        assert_eq!(check_admin_token(&g, local), Ok(()));
        assert_eq!(
            check_admin_token(&g, any),
            Err(AdminTokenError::NeedsToken(any))
        );
        g.admin_token = Some(" \t".into());
        assert_eq!(check_admin_token(&g, local), Err(AdminTokenError::Blank));
        g.admin_token = Some("s3cret".into());
        assert_eq!(check_admin_token(&g, any), Ok(()));
    }

    #[test]
    fn embedded_demo_is_valid() {
        let c = Config::embedded_demo();
        assert!(!c.listeners.is_empty());
        assert!(!c.entries().is_empty());
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = Config::parse("a.toml", "[global]\nadmin = \n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("a.toml:2:"), "{msg}");
    }

    #[test]
    fn bad_address_names_the_key_and_line() {
        let text = "[services.web]\nendpoints = [{ id = \"a\", address = \"127.0.0.1\" }]\n";
        let msg = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(msg.contains("c.toml:2"), "{msg}");
        assert!(msg.contains("has no port"), "{msg}");
    }

    #[test]
    fn trusted_proxies_are_addresses_or_blocks() {
        let ok = "[global]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\n";
        let c = Config::parse("c.toml", ok).expect("valid");
        let limits = ClientLimits::from(&c.global);
        assert!(limits
            .trusted_proxies
            .contains("10.1.2.3".parse().expect("ip")));
        assert!(!limits
            .trusted_proxies
            .contains("127.0.0.1".parse().expect("ip")));
        let bad = "[global]\ntrusted_proxies = [\"lb.internal\"]\n";
        let msg = Config::parse("c.toml", bad).unwrap_err().to_string();
        assert!(msg.contains("c.toml:2"), "{msg}");
        assert!(msg.contains("10.0.0.0/8"), "{msg}");
        let both = "[global]\ntrust_forwarded_headers = true\ntrusted_proxies = [\"10.0.0.1\"]\n";
        let msg = Config::parse("c.toml", both).unwrap_err().to_string();
        assert!(msg.contains("keep only trusted_proxies"), "{msg}");
        let old = "[global]\ntrust_forwarded_headers = true\n";
        let c = Config::parse("c.toml", old).expect("valid");
        assert!(ClientLimits::from(&c.global)
            .trusted_proxies
            .contains("203.0.113.9".parse().expect("ip")));
        let mode = "[global]\npath_normalization = \"loose\"\n";
        let msg = Config::parse("c.toml", mode).unwrap_err().to_string();
        assert!(msg.contains("strict"), "{msg}");
    }

    #[test]
    fn route_without_target_is_refused() {
        let text = "[routes.blog]\npath_prefix = \"/blog\"\n";
        let msg = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(msg.contains("c.toml:1: routes.blog"), "{msg}");
        assert!(msg.contains("exactly one target"), "{msg}");
    }

    #[test]
    fn route_with_an_unknown_map_fetch_is_refused() {
        let text = "[routes.app]\nmap = \"release\"\nmap_key = \"req.nope\"\n";
        let msg = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(msg.contains("c.toml:1: routes.app"), "{msg}");
        assert!(msg.contains("req.nope"), "{msg}");
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let text = "[services.web]\nbalance = \"roundrobin\"\ntimeout = \"1s\"\n";
        let msg = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(msg.contains("unknown field `timeout`"), "{msg}");
        assert!(msg.contains("c.toml:"), "{msg}");
    }

    #[test]
    fn sticky_cookies_parse_in_both_forms_with_their_defaults() {
        let sticky = |svc: &str| {
            let text = format!("[services.web]\n{svc}\n");
            let c = Config::parse("c.toml", &text).expect("valid");
            c.services["web"].sticky_cookie()
        };
        let cookie = |name: &str, mode| {
            Some(StickyCookie {
                name: name.into(),
                mode,
            })
        };
        assert_eq!(sticky("balance = \"leastconn\""), None);
        assert_eq!(
            sticky("balance = \"leastconn\"\nsticky = \"cookie\""),
            cookie("SERVERID", CookieMode::Insert)
        );
        assert_eq!(
            sticky("balance = \"cookie\"\ncookie = \"S\""),
            cookie("S", CookieMode::Insert),
            "balance = cookie is still sticky"
        );
        assert_eq!(
            sticky("sticky = \"cookie\"\ncookie = { name = \"JSESSIONID\", mode = \"prefix\" }"),
            cookie("JSESSIONID", CookieMode::Prefix)
        );
        assert_eq!(
            sticky("sticky = \"cookie\"\ncookie = { mode = \"insert\" }"),
            cookie("SERVERID", CookieMode::Insert)
        );
    }

    #[test]
    fn unusable_sticky_cookies_say_what_to_write() {
        let refused = |svc: &str| {
            let text = format!("[services.web]\n{svc}\n");
            Config::parse("c.toml", &text).unwrap_err().to_string()
        };
        let msg = refused("sticky = \"cookie\"\ncookie = { name = \"S\", mode = \"sticky\" }");
        assert!(msg.contains("c.toml:3"), "{msg}");
        assert!(msg.contains("`insert`, `prefix`, `rewrite`"), "{msg}");
        let msg = refused("sticky = \"cookie\"\ncookie = { name = \"S\", path = \"/\" }");
        assert!(msg.contains("unknown field `path`"), "{msg}");
        let msg = refused("sticky = \"session\"");
        assert!(msg.contains("`cookie`"), "{msg}");
        let msg = refused("balance = \"leastconn\"\ncookie = \"S\"");
        assert!(msg.contains("services.web.cookie"), "{msg}");
        assert!(msg.contains("add sticky = \"cookie\""), "{msg}");
        let msg = refused("sticky = \"cookie\"\ncookie = \"a b\"");
        assert!(msg.contains("\"a b\" cannot name a cookie"), "{msg}");
        let msg = refused("sticky = \"cookie\"\ncookie = \"\"");
        assert!(msg.contains("cannot name a cookie"), "{msg}");
        let msg = refused("sticky = \"cookie\"\ncookie = { mode = \"prefix\" }");
        assert!(
            msg.contains("name = \"JSESSIONID\", mode = \"prefix\""),
            "{msg}"
        );
        let msg = refused("sticky = \"cookie\"\ncookie = 3");
        assert!(msg.contains("a cookie name, or"), "{msg}");
    }

    #[test]
    fn weight_out_of_range_is_refused() {
        let text = "[services.web]\nendpoints = [{ id = \"a\", address = \"127.0.0.1:1\", weight = 300 }]\n";
        let msg = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(msg.contains("weight 300 is out of range"), "{msg}");
    }

    #[test]
    fn runtime_api_keys_parse_and_the_address_must_be_loopback() {
        let text = "[global]\nruntime_socket = \"/run/pointsman.sock\"\nruntime_api = \"127.0.0.1:9999\"\n";
        let c = Config::parse("c.toml", text).expect("valid");
        assert_eq!(
            c.global.runtime_socket.as_deref(),
            Some(Path::new("/run/pointsman.sock"))
        );
        assert_eq!(c.global.runtime_api, Some(([127, 0, 0, 1], 9999).into()));
        let text = "[global]\nadmin = \"127.0.0.1:8404\"\nruntime_api = \"0.0.0.0:9999\"\n";
        let msg = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(msg.starts_with("c.toml:3: global.runtime_api:"), "{msg}");
        assert!(msg.contains("not a loopback address"), "{msg}");
    }

    #[test]
    fn a_bind_may_say_every_interface_as_haproxy_does() {
        for (bind, want) in [
            ("*:80", "0.0.0.0:80"),
            (":8080", "0.0.0.0:8080"),
            ("0.0.0.0:80", "0.0.0.0:80"),
            ("[::]:80", "[::]:80"),
        ] {
            let text = format!("[[listeners]]\nname = \"web\"\nbind = \"{bind}\"\n");
            let c = Config::parse("c.toml", &text).unwrap_or_else(|e| panic!("{bind}: {e}"));
            assert_eq!(c.listeners[0].bind.to_string(), want);
        }
        let text = "[[listeners]]\nname = \"web\"\nbind = \"web:80\"\n";
        let msg = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(msg.starts_with("c.toml:3:"), "{msg}");
        assert!(
            msg.contains("\"web:80\" is not a listen address") && msg.contains("*:80"),
            "{msg}"
        );
        let text = "[[listeners]]\nname = \"web\"\nbind = \"*:http\"\n";
        let msg = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(msg.contains("invalid port"), "{msg}");
    }

    #[test]
    fn a_missing_file_says_why_once() {
        let err = Config::load(Path::new("/nonexistent/pointsman.toml")).unwrap_err();
        let shown = format!("{:#}", anyhow::anyhow!(err));
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        assert!(
            shown.starts_with("/nonexistent/pointsman.toml: cannot read"),
            "{shown}"
        );
    }

    #[test]
    fn tcp_listener_needs_a_service() {
        let text = "[[listeners]]\nname = \"db\"\nbind = \"127.0.0.1:5433\"\nmode = \"tcp\"\n";
        let msg = Config::parse("c.toml", text).unwrap_err().to_string();
        assert!(msg.contains("listeners[0]"), "{msg}");
        assert!(msg.contains("default_service"), "{msg}");
    }
}
