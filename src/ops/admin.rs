//! The admin listener: `/healthz`, `/readyz`, the JSON API (services,
//! routes, maps, discovery, and local changes to endpoint state, weight and
//! maps), `/metrics` and a stats page a person reads at a glance
//! (`/stats`). Loopback by default; bound anywhere else it needs a token,
//! and when a token is set every change must carry it.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use pointsman_discovery::admin_api::{EndpointView, ServiceView, SourceView};
use pointsman_discovery::registration::MAX_WEIGHT;
use pointsman_discovery::AdminState;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::config::{admin_token_matches, Config};
use crate::control::local::{LocalChange, LocalError};
use crate::control::registry::Followed;
use crate::control::reload::ReloadStats;
use crate::control::ControlHandle;
use crate::engine::endpoint::{unix_now, EndpointCounters};
use crate::engine::table::SharedTable;
use crate::engine::table::{MapKey, RoutingTable, Target};

/// Largest request body the admin API reads.
const BODY_LIMIT: usize = 64 * 1024;

/// What the admin endpoints read.
pub struct Admin {
    pub table: SharedTable,
    /// Released once the first table is published.
    pub ready: Arc<AtomicBool>,
    /// The registries followed; `/readyz` also waits for each one's data.
    pub followed: Vec<Followed>,
    pub reloads: Arc<ReloadStats>,
    /// Where local changes go.
    pub control: ControlHandle,
    /// The config last applied: its `admin_token`, when set, is required
    /// (as `Authorization: Bearer <token>`) on every change, so a reload
    /// that changes the token applies at once.
    pub applied: Arc<ArcSwap<Config>>,
    /// Unix seconds the proxy started at.
    pub started: u64,
}

/// Every service and endpoint with its live counters, sorted by name.
pub fn services_view(table: &RoutingTable) -> Vec<ServiceView> {
    let mut out: Vec<ServiceView> = table
        .services
        .values()
        .map(|s| {
            let (latency_count, latency_sum_seconds) = s.settings.live.latency.totals();
            ServiceView {
                name: s.name.to_string(),
                latency_count,
                latency_sum_seconds,
                balance: s.settings.algorithm.as_str().to_string(),
                retries: s.settings.live.retries.load(Ordering::Relaxed),
                ejections: s.settings.live.ejections.load(Ordering::Relaxed),
                endpoints: s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let mut view = endpoint_view(
                            e.id.to_string(),
                            e.address.to_string(),
                            e.initial_weight,
                            e.accepts_new(),
                            e.live.snapshot(),
                        );
                        view.drain_notice = e.drain_notice;
                        view.local_state = e.local_state;
                        view.local_weight = e.local_weight;
                        view
                    })
                    .collect(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// An endpoint as the admin API shows it: what the table holds and a
/// snapshot of its live state.
fn endpoint_view(
    id: String,
    address: String,
    initial_weight: u32,
    accepting: bool,
    c: EndpointCounters,
) -> EndpointView {
    EndpointView {
        id,
        address,
        initial_weight,
        accepting,
        state: c.state,
        weight: c.weight,
        healthy: c.healthy,
        in_flight: u64::from(c.in_flight),
        requests: c.requests,
        responses: c.responses,
        failures: c.failures,
        last_change: c.last_change,
        ejected: c.ejected,
        ejections: c.ejections,
        check: c.check,
        idle_connections: c.idle_connections as u64,
        drain_notice: None,
        local_state: false,
        local_weight: false,
    }
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let method = req.method().clone();
        let stats = stats_export(req.uri());
        if method == Method::GET || method == Method::HEAD {
            if let Some(export) = stats {
                return self.stats_export(export).await;
            }
            return self.read(&path, &segs);
        }
        if method == Method::POST {
            if let Some(export) = stats {
                return self.stats_form(req, export).await;
            }
        }
        if !matches!(segs.first(), Some(&"api")) {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET here\n");
        }
        if let Some(denied) = check_origin(&req).or_else(|| self.check_token(&req)) {
            return denied;
        }
        let body = match read_body(req, "the request body").await {
            Ok(b) => b,
            Err(refused) => return refused,
        };
        match self.change(&method, &segs, &body) {
            Ok(change) => match self.control.change(change).await {
                Ok(()) => json(&serde_json::json!({
                    "ok": true,
                    "table_version": self.table.load().version,
                })),
                Err(e) => error(local_status(&e), &e.to_string()),
            },
            Err((status, why)) => error(status, &why),
        }
    }

    fn read(&self, path: &str, segs: &[&str]) -> Response<Full<Bytes>> {
        let table = self.table.load();
        match segs {
            ["healthz"] => text(StatusCode::OK, "ok\n"),
            ["readyz"] => match self.not_ready() {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: {why}\n"),
                ),
            },
            ["metrics"] => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::ops::metrics::render(&table, &self.followed, &self.reloads),
            ),
            // HAProxy's own exporter's names, from the `show stat` rows.
            ["metrics", "haproxy"] => {
                let snapshot =
                    crate::ops::runtime::stat_snapshot(&self.table, &self.applied.load());
                match snapshot.stat_lines(&crate::ops::runtime::StatFilter::default()) {
                    Ok(lines) => reply(
                        StatusCode::OK,
                        "text/plain; version=0.0.4",
                        crate::ops::haproxy_metrics::render(&lines),
                    ),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
                }
            }
            ["api", "services"] => json(&services_view(&table)),
            ["api", "services", name] => match services_view(&table)
                .into_iter()
                .find(|s| s.name == *name)
            {
                Some(s) => json(&s),
                None => error(StatusCode::NOT_FOUND, &format!("no such service: {name}")),
            },
            ["api", "routes"] => json(&routes_view(&table)),
            ["api", "maps"] => json(&maps_view(&table)),
            ["api", "maps", name] => match maps_view(&table).remove(*name) {
                Some(m) => json(&m),
                None => error(StatusCode::NOT_FOUND, &format!("no such map: {name}")),
            },
            ["api", "discovery"] => {
                let view: Vec<SourceView> = self.followed.iter().map(Followed::view).collect();
                json(&view)
            }
            ["stats"] | [""] => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                stats_page(&table, &self.followed, self.started),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                &format!("not found: {path}: try /stats, /api/services, /api/routes, /api/maps, /api/discovery, /metrics, /metrics/haproxy, /healthz or /readyz\n"),
            ),
        }
    }

    /// The change a write request asks for, or why it cannot be made.
    fn change(
        &self,
        method: &Method,
        segs: &[&str],
        body: &[u8],
    ) -> Result<LocalChange, (StatusCode, String)> {
        let bad = |why: String| (StatusCode::BAD_REQUEST, why);
        match (method.as_str(), segs) {
            ("POST" | "PUT" | "PATCH", ["api", "services", service, "endpoints", id]) => {
                let ask: EndpointChange = serde_json::from_slice(body).map_err(|e| {
                    bad(format!(
                        "body must be JSON such as {{\"state\":\"drain\"}} or {{\"weight\":10}}: {e}"
                    ))
                })?;
                match (ask.state, ask.weight) {
                    (Some(state), None) => Ok(LocalChange::ServerState {
                        service: service.to_string(),
                        id: id.to_string(),
                        state,
                    }),
                    (None, Some(weight)) if weight <= MAX_WEIGHT => Ok(LocalChange::ServerWeight {
                        service: service.to_string(),
                        id: id.to_string(),
                        weight,
                    }),
                    (None, Some(weight)) => Err(bad(format!(
                        "weight {weight} is out of range: expected 0 to {MAX_WEIGHT}"
                    ))),
                    _ => Err(bad(
                        "give exactly one of \"state\" (ready, drain, maint) or \"weight\" (0 to 256)".into(),
                    )),
                }
            }
            ("PUT", ["api", "maps", map, key @ ..]) if !key.is_empty() => {
                let key = key.join("/");
                let value = std::str::from_utf8(body)
                    .map_err(|_| bad("the value must be UTF-8 text".into()))?
                    .trim()
                    .to_string();
                if value.is_empty() || key.is_empty() {
                    return Err(bad(
                        "PUT /api/maps/<map>/<key> with the value (a service name) as the body"
                            .into(),
                    ));
                }
                let exists = self
                    .table
                    .load()
                    .maps
                    .get(*map)
                    .is_some_and(|m| m.contains_key(&key));
                let map = map.to_string();
                Ok(if exists {
                    LocalChange::MapSet { map, key, value }
                } else {
                    LocalChange::MapAdd { map, key, value }
                })
            }
            ("DELETE", ["api", "maps", map]) => Ok(LocalChange::MapClear {
                map: map.to_string(),
            }),
            ("DELETE", ["api", "maps", map, key @ ..]) if !key.is_empty() => {
                Ok(LocalChange::MapDel {
                    map: map.to_string(),
                    key: key.join("/"),
                })
            }
            ("POST", ["api", "drains"]) => {
                let ask: DrainNoticeBody = serde_json::from_slice(body).map_err(|e| {
                    bad(format!(
                        "body must be JSON such as {{\"service\":\"web\",\"id\":\"a1\",\"until_revision\":42}}: {e}"
                    ))
                })?;
                if ask.service.is_empty() || ask.id.is_empty() || ask.until_revision < 1 {
                    return Err(bad(
                        "a drain notice names a service, an instance id and the etcd revision (1 or more) that drained it".into(),
                    ));
                }
                Ok(LocalChange::DrainNotice {
                    service: ask.service,
                    id: ask.id,
                    revision: ask.until_revision,
                })
            }
            ("POST", ["api", "services", service, "pause"]) => {
                let ask: PauseBody = if body.iter().all(u8::is_ascii_whitespace) {
                    PauseBody::default()
                } else {
                    serde_json::from_slice(body).map_err(|e| {
                        bad(format!(
                            "body must be empty or JSON such as {{\"timeout\":\"30s\"}}: {e}"
                        ))
                    })?
                };
                let timeout = match ask.timeout.as_deref() {
                    None => std::time::Duration::from_secs(30),
                    Some(t) => humantime::parse_duration(t)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            bad(format!(
                                "timeout {t:?} is not a duration above 0, e.g. \"30s\""
                            ))
                        })?,
                };
                Ok(LocalChange::Pause {
                    service: service.to_string(),
                    timeout: Some(timeout),
                })
            }
            ("DELETE", ["api", "services", service, "pause"]) => Ok(LocalChange::Pause {
                service: service.to_string(),
                timeout: None,
            }),
            ("DELETE", ["api", "local"]) => Ok(LocalChange::Reset),
            ("DELETE", ["api", "services", service, "endpoints", id]) => {
                Ok(LocalChange::ServerReset {
                    service: service.to_string(),
                    id: id.to_string(),
                })
            }
            _ => Err((
                StatusCode::NOT_FOUND,
                "changes: POST /api/services/<service>/endpoints/<id> {\"state\"|\"weight\"}, \
                 POST /api/drains {\"service\",\"id\",\"until_revision\"}, \
                 POST or DELETE /api/services/<service>/pause [{\"timeout\"}], \
                 DELETE /api/services/<service>/endpoints/<id> (drop its local changes), \
                 PUT or DELETE /api/maps/<map>/<key>, DELETE /api/maps/<map>, DELETE /api/local"
                    .into(),
            )),
        }
    }

    /// `None` when the request may change things.
    fn check_token(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let applied = self.applied.load();
        // No token: changes are open (on loopback only, see `check_loopback`).
        applied.global.admin_token.as_deref()?;
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if admin_token_matches(&applied.global, g.as_bytes()) => None,
            _ => {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "changes need the admin token: send `Authorization: Bearer <token>` (the proxy's --admin-token)",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                Some(r)
            }
        }
    }
}

/// The body of a pause on this proxy: each request's longest wait.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    timeout: Option<String>,
}

/// The body of a drain notice.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainNoticeBody {
    service: String,
    id: String,
    until_revision: i64,
}

/// The body of an endpoint change.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointChange {
    state: Option<AdminState>,
    weight: Option<u16>,
}

/// Refuses a change a web page could have sent. A page on another site can
/// make the browser POST to a loopback admin API, but only with a "simple"
/// content type and with its own `Origin`: a change must say it is JSON
/// (which a browser will not send cross-site without asking first, and
/// this API never says yes) and, when it names an origin, come from this
/// API's own.
fn check_origin(req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let header_str = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(origin) = header_str(header::ORIGIN) {
        let own = header_str(header::HOST).map(|host| format!("http://{host}"));
        if own.as_deref() != Some(origin) {
            return Some(error(
                StatusCode::FORBIDDEN,
                &format!(
                    "a change from the web page at {origin:?} is refused: the admin API takes \
                     changes from tools (curl, pointsman ctl), not from other sites' pages"
                ),
            ));
        }
    }
    let json = header_str(header::CONTENT_TYPE).is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json {
        return Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "changes must be sent with `Content-Type: application/json` \
             (e.g. curl -H 'Content-Type: application/json'), so that no web page can send them",
        ));
    }
    None
}

/// A change's body, at most `BODY_LIMIT` bytes; or the 413 that says so.
async fn read_body(req: Request<Incoming>, what: &str) -> Result<Bytes, Response<Full<Bytes>>> {
    match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("cannot read {what} (at most {BODY_LIMIT} bytes): {e}\n"),
        )),
    }
}

fn local_status(e: &LocalError) -> StatusCode {
    match e {
        LocalError::NoSuchService(_)
        | LocalError::NoSuchServer { .. }
        | LocalError::NoSuchMap(_)
        | LocalError::NoSuchKey { .. } => StatusCode::NOT_FOUND,
        LocalError::KeyExists { .. } => StatusCode::CONFLICT,
        LocalError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Decodes `%XX` escapes in a path segment; a malformed escape stays as is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Serialize)]
pub struct RouteView {
    pub name: String,
    /// Exact host, `*.suffix`, or absent for any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub strip_prefix: bool,
    /// `service`, `map` or `split`.
    pub target: serde_json::Value,
}

/// Every route as the table holds it.
pub fn routes_view(table: &RoutingTable) -> Vec<RouteView> {
    let mut out: Vec<RouteView> = table
        .routes
        .iter()
        .map(|(host, r)| RouteView {
            name: r.name.to_string(),
            host,
            path_prefix: r.path_prefix.clone(),
            strip_prefix: r.strip_prefix,
            target: match &r.target {
                Target::Service(s) => serde_json::json!({ "service": &**s }),
                Target::Map { map, key, default } => serde_json::json!({
                    "map": &**map,
                    "map_key": map_key_str(key),
                    "map_default": default.as_deref(),
                }),
                Target::Split { arms, .. } => serde_json::json!({
                    "split": arms.iter().map(|(s, w)| serde_json::json!({"service": &**s, "weight": w})).collect::<Vec<_>>(),
                }),
            },
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn map_key_str(k: &MapKey) -> String {
    match k {
        MapKey::Literal(l) => l.clone(),
        MapKey::Host => "req.host".into(),
        MapKey::Path => "req.path".into(),
        MapKey::Header(h) => format!("req.hdr({h})"),
        MapKey::Cookie(c) => format!("req.cookie({c})"),
    }
}

/// Every map with its entries, sorted.
pub fn maps_view(
    table: &RoutingTable,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> {
    table
        .maps
        .iter()
        .map(|(name, m)| {
            (
                name.to_string(),
                m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
            )
        })
        .collect()
}

/// What a stats URL asks for, HAProxy's way: `/stats;csv`,
/// `/stats;csv;norefresh`, `/;json`, `/?stats;csv`, `/stats?stats;csv`,
/// `/haproxy?stats;csv` (`;up` drops servers that are down). `None` for
/// every other URL.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StatsUrl {
    /// The stats page's own URL without options (`/stats`, `/?stats`).
    base: String,
    /// `None`: the page itself (a form post to it).
    format: Option<crate::ops::runtime::Format>,
    up: bool,
}

fn stats_export(uri: &http::Uri) -> Option<StatsUrl> {
    let path = uri.path();
    let (page, path_opts) = path.split_once(';').unwrap_or((path, ""));
    if !matches!(page, "/" | "/stats" | "/haproxy") {
        return None;
    }
    let (base, opts) = match uri.query() {
        Some(q) if path_opts.is_empty() => {
            let rest = q.strip_prefix("stats")?;
            if !rest.is_empty() && !rest.starts_with(';') {
                return None;
            }
            (format!("{page}?stats"), rest.trim_start_matches(';'))
        }
        _ if path_opts.is_empty() && page == "/haproxy" => return None,
        _ => (page.to_string(), path_opts),
    };
    let mut url = StatsUrl {
        base,
        format: None,
        up: false,
    };
    for opt in opts.split(';').filter(|o| !o.is_empty()) {
        match opt {
            "csv" => url.format = Some(crate::ops::runtime::Format::Plain),
            "json" => url.format = Some(crate::ops::runtime::Format::Json),
            "up" => url.up = true,
            // `norefresh`, `st=...` and the like change nothing here.
            _ => {}
        }
    }
    Some(url)
}

/// An `application/x-www-form-urlencoded` body as pairs.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| percent_decode(&s.replace('+', " "));
            (dec(k), dec(v))
        })
        .collect()
}

/// Standard base64, for a Basic `Authorization` header.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

impl Admin {
    /// `/stats;csv` and `/stats;json`: `show stat` and `show stat json` of
    /// the runtime API, with its ids.
    async fn stats_export(&self, url: StatsUrl) -> Response<Full<Bytes>> {
        let Some(format) = url.format else {
            let table = self.table.load();
            return reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                stats_page(&table, &self.followed, self.started),
            );
        };
        let snapshot = crate::ops::runtime::stat_snapshot(&self.table, &self.applied.load());
        let filter = crate::ops::runtime::StatFilter {
            format,
            up: url.up,
            ..Default::default()
        };
        let body = tokio::task::spawn_blocking(move || snapshot.show_stat(&filter))
            .await
            .unwrap_or_else(|e| Err(format!("internal error: {e}\n")));
        match (body, format) {
            (Ok(b), crate::ops::runtime::Format::Json) => {
                reply(StatusCode::OK, "application/json", b)
            }
            (Ok(b), _) => reply(StatusCode::OK, "text/plain", b),
            (Err(e), _) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
        }
    }

    /// HAProxy's stats admin form (`stats admin`): `b=<backend>`, one
    /// `s=<server>` per server and `action=ready|drain|maint|dhlth|ehlth|
    /// shutdown`, applied as the runtime API's commands. Answered, as
    /// HAProxy does, with a 303 to the page and `;st=DONE|PART|NONE|ERRP`.
    /// A browser cannot add a Bearer token to a form, so the token may come
    /// as the password of Basic auth; and the post must name this
    /// listener as its Origin or Referer (see ADMIN.md).
    async fn stats_form(&self, req: Request<Incoming>, url: StatsUrl) -> Response<Full<Bytes>> {
        if let Some(denied) = self
            .check_form_origin(&req)
            .or_else(|| self.check_form_token(&req))
        {
            return denied;
        }
        let body = match read_body(req, "the form").await {
            Ok(b) => b,
            Err(refused) => return refused,
        };
        let pairs = form_pairs(&body);
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let servers: Vec<&str> = pairs
            .iter()
            .filter(|(n, _)| n == "s")
            .map(|(_, v)| v.as_str())
            .collect();
        let status = match (get("b"), get("action")) {
            (Some(b), Some(action)) if !b.is_empty() => {
                let verb = match action {
                    "ready" | "drain" | "maint" => Some(format!("set server {{}} state {action}")),
                    "dhlth" => Some("disable health {}".to_string()),
                    "ehlth" => Some("enable health {}".to_string()),
                    "shutdown" => Some("shutdown sessions server {}".to_string()),
                    _ => None,
                };
                match verb {
                    None => "ERRP",
                    Some(_) if servers.is_empty() => "NONE",
                    Some(verb) => {
                        let runtime = crate::ops::runtime::Runtime::new(
                            self.control.clone(),
                            self.applied.clone(),
                            1,
                            CancellationToken::new(),
                        );
                        let mut done = 0;
                        for s in &servers {
                            let target = format!(
                                "{}/{}",
                                b.replace(['\\', ';', ' '], ""),
                                s.replace(['\\', ';', ' '], "")
                            );
                            let line = verb.replace("{}", &target);
                            let mut session = crate::ops::runtime::Session::unix();
                            let (answer, _) = runtime.run_line(&line, &mut session).await;
                            if answer.trim().is_empty() {
                                done += 1;
                            } else {
                                tracing::info!(command = %line, answer = %answer.trim(), "stats form change refused");
                            }
                        }
                        match done {
                            0 => "NONE",
                            n if n == servers.len() => "DONE",
                            _ => "PART",
                        }
                    }
                }
            }
            _ => "ERRP",
        };
        let location = format!("{};st={status}", url.base);
        let mut r = text(StatusCode::SEE_OTHER, &format!("{status}\n"));
        if let Ok(v) = header::HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }

    /// A form post must come from this listener's own page: its `Origin`
    /// (or, without one, its `Referer`) must be `http://<Host>`. With no
    /// admin token, the Host must also be a loopback address or
    /// `localhost`, so a page whose name was re-pointed at 127.0.0.1 (DNS
    /// rebinding, which makes its own origin look like this one) cannot
    /// post either.
    fn check_form_origin(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let header_str = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let host = header_str(header::HOST).unwrap_or("");
        let own = format!("http://{host}");
        let from = header_str(header::ORIGIN).or_else(|| header_str(header::REFERER));
        let same = from.is_some_and(|f| {
            f == own
                || f.strip_prefix(own.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        if !same || host.is_empty() {
            return Some(error(
                StatusCode::FORBIDDEN,
                &format!(
                    "a stats form post must come from this listener's own page: send                      `Origin: {own}` (or a Referer on it); got {from:?}"
                ),
            ));
        }
        let token_set = self.applied.load().global.admin_token.is_some();
        let hostname = host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = hostname == "localhost"
            || hostname
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !token_set && !loopback {
            return Some(error(
                StatusCode::FORBIDDEN,
                &format!(
                    "with no admin token, a stats form post must be sent to a loopback address                      or localhost, not {hostname:?}: set --admin-token or use 127.0.0.1"
                ),
            ));
        }
        None
    }

    /// The token of a form post: `Authorization: Bearer <token>`, or Basic
    /// with the token as the password (any user name), which a browser
    /// asks for and then sends by itself.
    fn check_form_token(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let applied = self.applied.load();
        // No token: changes are open (on loopback only, see `check_loopback`).
        applied.global.admin_token.as_deref()?;
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let given = if let Some(b) = auth.strip_prefix("Bearer ") {
            Some(b.as_bytes().to_vec())
        } else {
            auth.strip_prefix("Basic ")
                .and_then(|b| base64_decode(b.trim()))
                .and_then(|d| {
                    let i = d.iter().position(|c| *c == b':')?;
                    Some(d[i + 1..].to_vec())
                })
        };
        match given {
            Some(g) if admin_token_matches(&applied.global, &g) => None,
            _ => {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "stats form changes need the admin token: as the password of Basic auth \
                     (any user name), or `Authorization: Bearer <token>`",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Basic realm=\"pointsman admin\""),
                );
                Some(r)
            }
        }
    }

    /// Why the proxy is not ready yet, or `None` when it is.
    fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("starting".into());
        }
        self.followed
            .iter()
            .find(|f| !f.has_data.load(Ordering::Acquire))
            .map(|f| {
                // Say why it has not synced, so a watcher that cannot make
                // progress is told apart from one that just started.
                let why = f
                    .status
                    .last_error()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                format!(
                    "waiting for the first sync from {} for {:.0}s{why}",
                    f.status.source().as_str(),
                    f.status.progress_age().as_secs_f64()
                )
            })
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    reply(status, "text/plain", body.to_string())
}

/// A JSON error: `{"error": "..."}`.
fn error(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": why }).to_string() + "\n";
    reply(status, "application/json", body)
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(json) => reply(StatusCode::OK, "application/json", json),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// "12s ago", "3m ago", ... for a Unix time; "never" for 0.
fn ago(now: u64, at: u64) -> String {
    if at == 0 {
        return "never".into();
    }
    let d = now.saturating_sub(at);
    match d {
        0..=119 => format!("{d}s ago"),
        120..=7199 => format!("{}m ago", d / 60),
        7200..=172_799 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// What the health column says: the check result, or the passive state.
fn health(c: &EndpointView, now: u64) -> (String, &'static str) {
    if c.ejected {
        return ("ejected (passive)".into(), "down");
    }
    match &c.check {
        Some(check) => {
            let what = if check.status > 0 {
                format!("{}", check.status)
            } else if check.passed {
                "connect ok".into()
            } else {
                "no answer".into()
            };
            let verdict = if c.healthy { "up" } else { "down" };
            (
                format!("{verdict}: {what}, {}", ago(now, check.at)),
                verdict,
            )
        }
        None if c.healthy => ("no check".into(), "up"),
        None => ("down (first check pending)".into(), "down"),
    }
}

fn stats_page(table: &RoutingTable, followed: &[Followed], started: u64) -> String {
    let now = unix_now();
    let mut html = String::from(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=2>\
         <meta name=viewport content=\"width=device-width\"><title>pointsman stats</title><style>\
         body{font:14px system-ui,sans-serif;margin:1em;color:#222}\
         table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}\
         th{background:#eee}td:first-child,th:first-child,td.l{text-align:left}\
         tr.ready td{background:#e6f6e6}tr.drain td{background:#fff6d5}tr.maint td,tr.down td{background:#fbe0e0}\
         .sum{color:#555}.local{font-size:85%;color:#a40;border-bottom:1px dotted}</style></head><body><h1>pointsman</h1>",
    );
    let _ = write!(
        html,
        "<p class=sum>up {} &middot; table version <b id=version>{}</b> &middot; {} services &middot; {} routes &middot; refreshes every 2 s</p>",
        ago(now, started).trim_end_matches(" ago"),
        table.version,
        table.services.len(),
        table.routes.len
    );
    if !followed.is_empty() {
        html.push_str("<table id=discovery><tr><th>registry</th><th>connected</th><th>applied revision</th><th>staleness</th><th>malformed</th><th>last error</th></tr>");
        for f in followed {
            let s = f.status.snapshot();
            let _ = write!(
                html,
                "<tr class={}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=l>{}</td></tr>",
                if s.connected { "ready" } else { "down" },
                f.status.source().as_str(),
                if s.connected { "yes" } else { "no" },
                f.status
                    .applied_revision()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "-".into()),
                s.staleness_secs
                    .map(|s| format!("{s:.1}s"))
                    .unwrap_or_else(|| "-".into()),
                s.malformed,
                esc(s.last_error.as_deref().unwrap_or("")),
            );
        }
        html.push_str("</table>");
    }
    for s in services_view(table) {
        // Requests waiting: in the queue for a slot, or held for an
        // endpoint (or a resume).
        let waiting = table.service(&s.name).map_or(String::new(), |svc| {
            let live = &svc.settings.live;
            let (queued, held) = (live.queued.load(Ordering::Relaxed), live.held.load(Ordering::Relaxed));
            let paused = if svc.settings.paused.is_some() { ", paused" } else { "" };
            let maint = if svc.settings.maintenance.is_some() { ", in maintenance" } else { "" };
            format!(", <span class=queued>{queued}</span> queued, <span class=held>{held}</span> held{paused}{maint}")
        });
        let _ = write!(
            html,
            "<h2>{} <small>({}, {} retries, {} ejections{waiting})</small></h2><table class=service data-service=\"{}\">\
             <tr><th>endpoint</th><th>address</th><th>state</th><th>weight</th><th>health</th>\
             <th>in flight</th><th>requests</th><th>2xx</th><th>3xx</th><th>4xx</th><th>5xx</th>\
             <th>errors</th><th>last change</th></tr>",
            esc(&s.name),
            s.balance,
            s.retries,
            s.ejections,
            esc(&s.name),
        );
        for e in &s.endpoints {
            let c = e;
            let (health, verdict) = health(c, now);
            let class = if verdict == "down" {
                "down"
            } else {
                c.state.as_str()
            };
            let mut weight = if e.initial_weight == c.weight {
                c.weight.to_string()
            } else {
                format!("{} (of {})", c.weight, e.initial_weight)
            };
            // A change made on this proxy wins over the fleet's until it
            // is cleared: say so, and how.
            let mut state = c.state.to_string();
            let here = format!(
                " <span class=local title=\"set on this proxy; DELETE /api/services/{0}/endpoints/{1} \
                 (or pointsman ctl --admin ... reset {0}/{1}) gives it back to the registry\">set here</span>",
                esc(&s.name),
                esc(&e.id)
            );
            if e.local_state {
                state.push_str(&here);
            }
            if e.local_weight {
                weight.push_str(&here);
            }
            let _ = write!(
                html,
                "<tr class={class} data-endpoint=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=l>{}</td>\
                 <td class=in-flight>{}</td><td class=requests>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td class=errors>{}</td><td>{}</td></tr>",
                esc(&e.id),
                esc(&e.id),
                esc(&e.address),
                state,
                weight,
                esc(&health),
                c.in_flight,
                c.requests,
                c.responses[1],
                c.responses[2],
                c.responses[3],
                c.responses[4],
                c.failures,
                ago(now, c.last_change),
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>");
    html
}

/// Binds the admin listener; a failure says which address and why.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!("admin listener: cannot bind {addr}: {e} (set --admin or [global] admin)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pointsman_discovery::admin_api::CheckView;
    use pointsman_discovery::AdminState;

    fn counters(check: Option<CheckView>) -> EndpointCounters {
        EndpointCounters {
            state: AdminState::Drain,
            weight: 10,
            healthy: true,
            in_flight: 3,
            requests: 42,
            responses: [0, 30, 1, 2, 4],
            failures: 5,
            last_change: 1_700_000_000,
            ejected: false,
            ejections: 1,
            check,
            checks_paused: false,
            idle_connections: 2,
        }
    }

    /// The shape `/api/services` had before its types moved to
    /// `pointsman_discovery::admin_api`: the bytes must not change, but
    /// for fields added since at the end (`drain_notice`).
    #[derive(Serialize)]
    struct EndpointBefore {
        id: String,
        address: String,
        initial_weight: u32,
        accepting: bool,
        #[serde(flatten)]
        counters: EndpointCounters,
        drain_notice: Option<i64>,
        local_state: bool,
        local_weight: bool,
    }

    #[test]
    fn endpoints_are_written_as_before_and_read_back_equal() {
        for check in [
            None,
            Some(CheckView {
                passed: true,
                status: 200,
                at: 1_700_000_001,
            }),
        ] {
            let c = counters(check);
            let view = endpoint_view("a".into(), "127.0.0.1:8081".into(), 100, false, c.clone());
            let before = EndpointBefore {
                id: "a".into(),
                address: "127.0.0.1:8081".into(),
                initial_weight: 100,
                accepting: false,
                counters: c,
                drain_notice: None,
                local_state: false,
                local_weight: false,
            };
            let written = serde_json::to_string_pretty(&view).unwrap();
            assert_eq!(written, serde_json::to_string_pretty(&before).unwrap());
            let service = ServiceView {
                name: "web".into(),
                balance: "roundrobin".into(),
                retries: 1,
                ejections: 1,
                latency_count: 3,
                latency_sum_seconds: 0.25,
                endpoints: vec![view],
            };
            let body = serde_json::to_string_pretty(&vec![service.clone()]).unwrap();
            let read: Vec<ServiceView> = serde_json::from_str(&body).unwrap();
            assert_eq!(read, vec![service]);
        }
    }

    #[test]
    fn stats_urls_read_like_haproxys() {
        use crate::ops::runtime::Format;
        let url = |u: &str| stats_export(&u.parse::<http::Uri>().expect("a URI"));
        let csv = |base: &str| {
            Some(StatsUrl {
                base: base.into(),
                format: Some(Format::Plain),
                up: false,
            })
        };
        assert_eq!(url("/stats;csv"), csv("/stats"));
        assert_eq!(url("/stats;csv;norefresh"), csv("/stats"));
        assert_eq!(url("/;csv"), csv("/"));
        assert_eq!(url("/?stats;csv"), csv("/?stats"));
        assert_eq!(url("/stats?stats;csv"), csv("/stats?stats"));
        assert_eq!(url("/haproxy?stats;csv"), csv("/haproxy?stats"));
        assert_eq!(
            url("/stats;json").and_then(|u| u.format),
            Some(Format::Json)
        );
        assert!(url("/stats;csv;up").is_some_and(|u| u.up));
        assert_eq!(url("/stats").map(|u| u.format), Some(None), "the page");
        assert_eq!(url("/haproxy"), None);
        assert_eq!(url("/?statsx"), None);
        assert_eq!(url("/api/services;csv"), None);
        assert_eq!(url("/metrics"), None);
    }

    #[test]
    fn forms_and_basic_auth_decode() {
        assert_eq!(
            form_pairs(b"s=web%2F1&s=a+b&action=drain&b=blue"),
            vec![
                ("s".to_string(), "web/1".to_string()),
                ("s".into(), "a b".into()),
                ("action".into(), "drain".into()),
                ("b".into(), "blue".into()),
            ]
        );
        assert_eq!(
            base64_decode("YWRtaW46czNjcmV0").as_deref(),
            Some(&b"admin:s3cret"[..])
        );
        assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("!!"), None);
    }
}
