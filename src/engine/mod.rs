//! The data plane: everything a request or a TCP connection touches on its
//! way to an upstream. It reads the published [`table::RoutingTable`] and
//! the per-endpoint atomics and never takes a lock; it imports nothing from
//! `control`, `ops` or `process`.
//!
//! In the order of the flow: [`table`] (step 4a: match a route, resolve the
//! service), [`balance`] (step 4b: pick an endpoint), [`sticky`] (step 4c:
//! the cookie that binds a client to an endpoint), [`endpoint`] (step 3:
//! live per-endpoint state), [`http`] and [`conn`] (serving client
//! connections), [`forward`] (the request's phases), [`pool`] (upstream
//! connections), [`tcp`] (whole connections); [`frontend`] counts each
//! listener's traffic for `show stat`. This file holds the vocabulary
//! they share: [`ProxyError`], [`ProxyBody`], [`ClientLimits`].

pub mod balance;
pub mod body;
pub mod conn;
pub mod endpoint;
pub mod forward;
pub mod frontend;
pub mod http;
pub mod latency;
pub mod path;
pub mod pool;
pub mod quiet;
pub mod rate;
pub mod spread;
pub mod sticky;
pub mod table;
pub mod tcp;
pub mod tls;
pub mod trust;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::http::{header, HeaderValue};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Response, StatusCode};

use crate::engine::endpoint::InFlight;
use crate::engine::table::ServiceState;
use conn::ConnActive;

/// Limits and timeouts for client connections, replaced on config reload.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// A request in progress whose client moves no byte for this long
    /// (request body, or reading the response) is cut.
    pub body_timeout: Duration,
    pub max_header_bytes: usize,
    /// Peers whose X-Forwarded-* and Forwarded headers are kept.
    pub trusted_proxies: trust::TrustedProxies,
    /// How paths are read before routing.
    pub path_normalization: path::PathNormalization,
    pub access_log: bool,
}

pub type SharedLimits = Arc<ArcSwap<ClientLimits>>;

/// Why a request got no upstream response. Mapped to a status in one place:
/// [`ProxyError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request and the listener has no default service")]
    NoRoute,
    #[error("service {0:?} has no endpoint that accepts traffic")]
    NoEndpoint(Arc<str>),
    #[error("service {0:?} is paused; try again shortly")]
    Paused(Arc<str>),
    #[error("service {0:?} is down for maintenance")]
    Maintenance(Arc<str>),
    #[error("this address is served over https: {0}")]
    HttpsRedirect(String),
    #[error(
        "every endpoint of service {0:?} is at its connection limit and the queue_timeout passed"
    )]
    QueueTimeout(Arc<str>),
    #[error("service {0:?} is not registered")]
    UnknownService(Arc<str>),
    #[error("map {map:?} has no entry for key {key:?} and the route has no map_default")]
    NoMapEntry { map: Arc<str>, key: String },
    #[error("upstream {endpoint} could not be reached: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("upstream {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("upstream {endpoint} failed: {reason}")]
    Upstream { endpoint: String, reason: String },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("the client sent no byte of its request body for {0:?} (body_timeout)")]
    ClientTimeout(Duration),
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::HttpsRedirect(_) => StatusCode::PERMANENT_REDIRECT,
            ProxyError::NoEndpoint(_)
            | ProxyError::Paused(_)
            | ProxyError::Maintenance(_)
            | ProxyError::QueueTimeout(_)
            | ProxyError::UnknownService(_)
            | ProxyError::NoMapEntry { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The response a client sees, with the service's own page for its
    /// status if it has one (`error_pages`, a maintenance page).
    pub fn response_with(&self, page: Option<&Bytes>) -> Response<ProxyBody> {
        let Some(page) = page.filter(|p| !p.is_empty()) else {
            return self.response();
        };
        let mut resp = self.response();
        *resp.body_mut() = ProxyBody::text(page.clone());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        resp
    }

    /// The response a client sees. Upstream addresses stay in the log.
    pub fn response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let text = match self {
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Timeout { .. } => {
                status.canonical_reason().unwrap_or("error").to_string()
            }
            other => other.to_string(),
        };
        let mut resp = Response::new(ProxyBody::text(format!("{text}\n")));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ProxyError::HttpsRedirect(location) = self {
            if let Ok(v) = HeaderValue::try_from(location.as_str()) {
                headers.insert(header::LOCATION, v);
            }
        }
        resp
    }
}

/// Keeps a request counted (on its endpoint, its service and its client
/// connection) until the response body is finished or dropped, and then
/// gives the upstream connection back to the endpoint's pool.
pub struct RequestGuard {
    pub endpoint: InFlight,
    pub conn: ConnActive,
    pub service: ServiceActive,
    /// The upstream connection, reusable once the body is finished.
    pub upstream: Option<(pool::Conn, ::http::uri::Authority)>,
}

impl RequestGuard {
    /// The response body was read to its end: the upstream connection can
    /// serve another request, unless the endpoint takes no new ones.
    fn finish(mut self) {
        if let Some((conn, authority)) = self.upstream.take() {
            let live = self.endpoint.endpoint();
            if live.accepts_new() {
                live.pool.put(conn, authority);
            }
        }
    }
}

/// Counts a request in flight to a service (for the retry budget).
pub struct ServiceActive(Arc<ServiceState>);

impl ServiceActive {
    pub fn start(state: &Arc<ServiceState>) -> Self {
        let now = state
            .active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        rate::raise_max(&state.max_active, now);
        state.request_rate.add();
        ServiceActive(state.clone())
    }
}

impl Drop for ServiceActive {
    fn drop(&mut self) {
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A response body: streamed from an upstream, or made here.
impl ProxyBody {
    /// A streamed upstream body; an already-finished one gives its
    /// connection back at once (HEAD, 204, 304 are never polled).
    pub fn upstream(body: Incoming, guard: Option<RequestGuard>) -> ProxyBody {
        if body.is_end_stream() {
            if let Some(g) = guard {
                g.finish();
            }
            return ProxyBody::Upstream { body, guard: None };
        }
        ProxyBody::Upstream { body, guard }
    }
}

pub enum ProxyBody {
    Upstream {
        body: Incoming,
        guard: Option<RequestGuard>,
    },
    Local(Full<Bytes>),
}

impl ProxyBody {
    pub fn text(s: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Local(Full::new(s.into()))
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::Local(Full::new(Bytes::new()))
    }
}

/// A streamed body dropped before its end, its request still counted: the
/// client went away (or stopped reading for `body_timeout`), HAProxy's
/// `cli_abrt`. A finished, failed or tunnelled body has no guard left.
impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let ProxyBody::Upstream { guard: Some(g), .. } = self {
            g.endpoint.endpoint().client_aborted();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, guard } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    // Finished: the request is no longer in flight. A body
                    // of known length ends with its last frame; hyper does
                    // not poll it again after that.
                    Poll::Ready(None) => {
                        if let Some(g) = guard.take() {
                            g.finish();
                        }
                    }
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        if let Some(g) = guard.take() {
                            g.finish();
                        }
                    }
                    // The upstream's body ended early (closed before its
                    // length or its last chunk): the client's response
                    // must not look complete. hyper then ends it without
                    // a last chunk (HTTP/1.1), with RST_STREAM (h2); the
                    // connection is reset rather than closed, which also
                    // tells an HTTP/1.0 client, whose body ends at close.
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(g) = guard.take() {
                            let live = g.endpoint.endpoint();
                            live.record_failure();
                            live.server_aborted();
                            g.conn.abort();
                        }
                    }
                    _ => {}
                }
                polled
            }
            ProxyBody::Local(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local(full) => full.size_hint(),
        }
    }
}
