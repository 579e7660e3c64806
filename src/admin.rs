//! The admin listener: `/healthz`, `/readyz`, the JSON view of the routing
//! table (`/api/services`) and a stats page a person reads at a glance
//! (`/stats`). Loopback by default.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::SharedTable;
use crate::endpoint::EndpointCounters;
use crate::registry::Followed;
use crate::reload::ReloadStats;
use crate::routing::RoutingTable;

/// What the admin endpoints read.
pub struct Admin {
    pub table: SharedTable,
    /// Released once the first table is published.
    pub ready: Arc<AtomicBool>,
    /// The registries followed; `/readyz` also waits for each one's data.
    pub followed: Vec<Followed>,
    pub reloads: Arc<ReloadStats>,
}

#[derive(Serialize)]
pub struct ServiceView {
    pub name: String,
    pub balance: &'static str,
    /// Retries made for the service's requests, since start.
    pub retries: u64,
    /// Passive-check ejections of its endpoints, since start.
    pub ejections: u64,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Serialize)]
pub struct EndpointView {
    pub id: String,
    pub address: String,
    #[serde(flatten)]
    pub counters: EndpointCounters,
}

/// Every service and endpoint with its live counters, sorted by name.
pub fn services_view(table: &RoutingTable) -> Vec<ServiceView> {
    let mut out: Vec<ServiceView> = table
        .services
        .values()
        .map(|s| ServiceView {
            name: s.name.to_string(),
            balance: s.settings.algorithm.as_str(),
            retries: s.settings.live.retries.load(Ordering::Relaxed),
            ejections: s.settings.live.ejections.load(Ordering::Relaxed),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    id: e.id.to_string(),
                    address: e.address.to_string(),
                    counters: e.live.snapshot(),
                })
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
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
                    async move { Ok::<_, Infallible>(admin.handle(req)) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET here\n".into(),
            );
        }
        match req.uri().path() {
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => match self.not_ready() {
                None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
                Some(why) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n"),
                ),
            },
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::metrics::render(&self.table.load(), &self.followed, &self.reloads),
            ),
            "/api/services" => json(&services_view(&self.table.load())),
            "/api/discovery" => {
                let view: Vec<_> = self.followed.iter().map(Followed::view).collect();
                json(&view)
            }
            "/stats" | "/" => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                stats_page(&self.table.load()),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /stats, /api/services, /api/discovery, /metrics, /healthz or /readyz\n".into(),
            ),
        }
    }
}

impl Admin {
    /// Why the proxy is not ready yet, or `None` when it is.
    fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("starting".into());
        }
        self.followed
            .iter()
            .find(|f| !f.has_data.load(Ordering::Acquire))
            .map(|f| {
                format!(
                    "waiting for the first sync from {}",
                    f.status.source().as_str()
                )
            })
    }
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

fn stats_page(table: &RoutingTable) -> String {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2>\
         <title>pointsman stats</title><style>body{font:14px sans-serif;margin:1em}\
         table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}\
         td:first-child,th:first-child{text-align:left}.ready{background:#dfd}.drain{background:#ffd}\
         .maint,.down{background:#fdd}</style></head><body><h1>pointsman</h1>",
    );
    let _ = write!(html, "<p>table version {}</p>", table.version);
    for s in services_view(table) {
        let _ = write!(
            html,
            "<h2>{} <small>({})</small></h2><table><tr><th>endpoint</th><th>address</th><th>state</th>\
             <th>weight</th><th>in flight</th><th>requests</th><th>2xx</th><th>3xx</th><th>4xx</th><th>5xx</th>\
             <th>failures</th></tr>",
            esc(&s.name),
            s.balance
        );
        for e in &s.endpoints {
            let c = &e.counters;
            let class = if !c.healthy { "down" } else { c.state.as_str() };
            let _ = write!(
                html,
                "<tr class={class}><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&e.id),
                esc(&e.address),
                c.state,
                if c.healthy { "" } else { " (down)" },
                c.weight,
                c.in_flight,
                c.requests,
                c.responses[1],
                c.responses[2],
                c.responses[3],
                c.responses[4],
                c.failures
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
