//! The HTTP engine. One request, in named phases:
//!
//! 1. **route**: load the table, match host + longest path prefix, or the
//!    listener's default service; no match is a 404.
//! 2. **resolve**: the route's target (service, map lookup, weighted split)
//!    to a service; a service with no usable endpoint is a 503.
//! 3. **pick**: the service's balancer chooses an endpoint.
//! 4. **forward**: rewrite headers and URI, send on a pooled upstream
//!    connection, bounded by the service's request timeout.
//! 5. **respond**: strip hop-by-hop headers, add the sticky cookie, stream
//!    the body back; a 101 becomes a tunnel between the two upgraded streams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::body::UpstreamBody;
use super::conn::{ActivityIo, ConnActive, ConnActivity, Expired, CLIENT_CONNS, PARK_AFTER};
use super::forward::{add_forwarded, strip_hop_by_hop, strip_path, wants_upgrade};
use super::pool;
use super::{ClientLimits, ProxyBody, ProxyError, RequestGuard, ServiceActive, SharedLimits};
use crate::engine::balance::PickContext;
use crate::engine::table::SharedTable;
use crate::engine::table::{find_cookie, Endpoint, Resolved, RoutingTable, Service};

/// What every HTTP listener shares.
pub struct HttpProxy {
    pub table: SharedTable,
    pub limits: SharedLimits,
}

/// What one client connection's requests share.
struct ConnContext {
    proxy: Arc<HttpProxy>,
    listener: Arc<str>,
    peer: SocketAddr,
    activity: Arc<ConnActivity>,
    trust_forwarded: bool,
    access_log: bool,
}

/// Which service and endpoint answered, for the access log.
#[derive(Clone)]
struct Served {
    service: Arc<str>,
    endpoint: Arc<str>,
}

impl HttpProxy {
    /// Serves one client connection until it closes, goes idle, or
    /// `shutdown` asks it to finish. HTTP/2 with prior knowledge is told
    /// from HTTP/1 by its first bytes. An HTTP/1 connection that idles for
    /// [`PARK_AFTER`] drops hyper's state (its buffers) and waits for its
    /// next request holding none; hyper takes over again when it sends.
    pub async fn serve_connection(
        self: Arc<Self>,
        listener: Arc<str>,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        let _open = CLIENT_CONNS.opened();
        let limits = self.limits.load_full();
        let activity = ConnActivity::new();
        let ctx = Arc::new(ConnContext {
            proxy: self,
            listener,
            peer,
            activity: activity.clone(),
            trust_forwarded: limits.trust_forwarded_headers,
            access_log: limits.access_log,
        });
        let svc = service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(ctx.handle(req).await) }
        });
        let mut io = ActivityIo::new(stream, activity.clone());
        let mut client = ClientConn {
            activity,
            limits,
            shutdown,
            peer,
        };
        match client.detect(&mut io).await {
            Some(Protocol::Http2) => client.serve_h2(io, svc).await,
            Some(Protocol::Http1) => {
                let mut parked = Some((io, svc));
                while let Some((io, svc)) = parked.take() {
                    parked = client.serve_h1(io, svc).await;
                    if let Some((io, _)) = &parked {
                        let _parked = CLIENT_CONNS.parked();
                        if !client.wait_readable(io).await {
                            break;
                        }
                    }
                }
            }
            None => {}
        }
        drop(permit);
    }
}

/// The protocol a client connection speaks.
enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// The first bytes of an HTTP/2 connection with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first read of a new connection: most request heads fit.
const FIRST_READ: usize = 1024;

type ClientIo = ActivityIo<TcpStream>;

/// One client connection's timers and drain state, across the phases of
/// its life: detection, hyper serving it, parked.
struct ClientConn {
    activity: Arc<ConnActivity>,
    limits: Arc<ClientLimits>,
    shutdown: CancellationToken,
    peer: SocketAddr,
}

/// Why a connection's wait ended.
enum Woke {
    /// Keep serving: bytes arrived, or a timer found nothing expired.
    Serve,
    /// The drain began.
    Drain,
    /// A timer expired.
    Expired(Expired),
}

impl ClientConn {
    /// The idle timeout in force (shorter while draining) and the header
    /// read timeout.
    fn timers(&self) -> (Duration, Duration) {
        let idle = self.activity.idle_timeout(self.limits.idle_timeout);
        (idle, self.limits.header_read_timeout)
    }

    /// Reads the connection's first bytes, as long as they may still be
    /// HTTP/2's preface. `None`: the client closed or timed out first.
    async fn detect(&mut self, io: &mut ClientIo) -> Option<Protocol> {
        let mut first = BytesMut::with_capacity(FIRST_READ);
        // A client sends its request right behind the handshake, so it is
        // usually there already: read before asking the event loop (as
        // HAProxy does), which saves a trip through epoll per connection.
        let mut read = io.read_now(&mut first);
        let protocol = loop {
            match read {
                Ok(0) => return None,
                Ok(_) => {
                    let n = first.len().min(H2_PREFACE.len());
                    if first[..n] != H2_PREFACE[..n] {
                        break Protocol::Http1;
                    }
                    if n == H2_PREFACE.len() {
                        break Protocol::Http2;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "client connection failed");
                    return None;
                }
            }
            if !self.wait_readable(io).await {
                return None;
            }
            read = io.try_read_buf(&mut first);
        };
        io.unread(first.freeze());
        Some(protocol)
    }

    /// Waits, holding no buffer, until the client sends (or closes).
    /// False: close the connection now (a timer expired, or the drain's
    /// idle grace is over).
    async fn wait_readable(&mut self, io: &ClientIo) -> bool {
        if io.has_unread() {
            return true;
        }
        loop {
            let (idle, head) = self.timers();
            let Ok(wait) = self.activity.check(idle, head) else {
                return false;
            };
            let woke = tokio::select! {
                biased;
                ready = io.get_ref().readable() => return ready.is_ok(),
                woke = self.until(wait) => woke,
            };
            if let Woke::Expired(_) = woke {
                return false;
            }
        }
    }

    /// Sleeps for `wait` (or until the drain begins) and says what is due.
    async fn until(&self, wait: Duration) -> Woke {
        let draining = self.activity.draining();
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled(), if !draining => {
                self.activity.begin_drain();
                Woke::Drain
            }
            _ = tokio::time::sleep(wait) => {
                let (idle, head) = self.timers();
                match self.activity.check(idle, head) {
                    Err(expired) => Woke::Expired(expired),
                    Ok(_) => Woke::Serve,
                }
            }
        }
    }

    /// Serves HTTP/1 requests with hyper until the connection ends
    /// (`None`) or idles long enough to park: then its stream and service
    /// come back, with any bytes hyper had read but not used.
    async fn serve_h1<S>(&mut self, io: ClientIo, svc: S) -> Option<(ClientIo, S)>
    where
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<ProxyBody>,
                Error = Infallible,
            > + Unpin,
    {
        let mut http = http1::Builder::new();
        http
            // Timed by `ConnActivity::check`: hyper's timer would also cut
            // idle keep-alive connections at this limit.
            .header_read_timeout(None)
            .max_buf_size(self.limits.max_header_bytes)
            .keep_alive(true);
        // Boxed: a parked connection's task keeps none of it.
        let mut conn = Box::new(http.serve_connection(TokioIo::new(io), svc).with_upgrades());
        let mut closing = false;
        loop {
            let (idle, head) = self.timers();
            let mut wait = self.activity.check(idle, head).unwrap_or_default();
            if !closing {
                // Not parkable now (a request is being answered): look
                // again after `PARK_AFTER`, so a busy connection's timer
                // fires at most that often.
                wait = wait.min(self.activity.park_in(PARK_AFTER).unwrap_or(PARK_AFTER));
            }
            let woke = tokio::select! {
                biased;
                result = &mut *conn => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %self.peer, error = %e, "client connection ended with an error");
                    }
                    return None;
                }
                // Once closing, only the connection itself is waited for.
                woke = self.until(wait), if !closing => woke,
            };
            match woke {
                // HTTP/1 is not closed at once (hyper would close an idle
                // connection then, racing a client that is sending on
                // it): it closes after its next answer, or after the idle
                // grace. See `ConnActivity::begin_drain`.
                Woke::Drain => {}
                Woke::Expired(Expired::Head) => {
                    // No request is in progress to protect, and hyper's
                    // graceful close would wait for the head: drop it.
                    tracing::debug!(peer = %self.peer, "request head not complete within header_read_timeout; closing");
                    return None;
                }
                Woke::Expired(Expired::Idle) => {
                    Pin::new(&mut *conn).graceful_shutdown();
                    closing = true;
                }
                Woke::Serve => {
                    if self.activity.park_in(PARK_AFTER) == Some(Duration::ZERO) {
                        let parts = conn.into_parts()?;
                        let mut io = parts.io.into_inner();
                        io.unread(parts.read_buf);
                        return Some((io, parts.service));
                    }
                }
            }
        }
    }

    /// Serves an HTTP/2 connection until it ends; the drain sends GOAWAY.
    async fn serve_h2<S>(&mut self, io: ClientIo, svc: S)
    where
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<ProxyBody>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let mut http = http2::Builder::new(TokioExecutor::new());
        http.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.limits.max_header_bytes).unwrap_or(u32::MAX));
        let mut conn = Box::pin(http.serve_connection(TokioIo::new(io), svc));
        let mut closing = false;
        loop {
            let (idle, head) = self.timers();
            let wait = self.activity.check(idle, head).unwrap_or_default();
            let woke = tokio::select! {
                biased;
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %self.peer, error = %e, "client connection ended with an error");
                    }
                    return;
                }
                woke = self.until(wait), if !closing => woke,
            };
            match woke {
                Woke::Drain | Woke::Expired(Expired::Idle) => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                Woke::Expired(Expired::Head) => return,
                Woke::Serve => {}
            }
        }
    }
}

impl ConnContext {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        if !self.access_log {
            return self.respond(req).await;
        }
        let started = Instant::now();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let host = target_host(req.uri(), req.headers()).to_owned();
        let version = req.version();
        let resp = self.respond(req).await;
        let served = resp.extensions().get::<Served>();
        tracing::info!(
            target: "access",
            peer = %self.peer,
            listener = %self.listener,
            method = %method,
            host = %host,
            uri = %uri,
            version = ?version,
            status = resp.status().as_u16(),
            service = served.map(|s| &*s.service),
            endpoint = served.map(|s| &*s.endpoint),
            ms = started.elapsed().as_secs_f64() * 1000.0,
        );
        resp
    }

    async fn respond(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let version = req.version();
        // The head is complete: the connection is busy until the response
        // body ends, whatever the request body and the upstream take.
        let conn_active = self.activity.start();
        let mut resp = match self.forward(req, conn_active).await {
            Ok(resp) => resp,
            Err(e) => {
                match &e {
                    ProxyError::Connect { .. }
                    | ProxyError::Timeout { .. }
                    | ProxyError::Upstream { .. } => {
                        tracing::warn!(peer = %self.peer, error = %e, "request failed")
                    }
                    _ => tracing::debug!(peer = %self.peer, error = %e, "request refused"),
                }
                e.response()
            }
        };
        self.activity.mark_response(version, &mut resp);
        resp
    }

    /// Phases 1 to 3 in `table`: the service and the route's path rewrite.
    fn route(
        &self,
        table: &RoutingTable,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Routed, ProxyError> {
        let host = target_host(uri, headers);
        let path = uri.path();
        let (resolved, rewrite) = match table.routes.find(host, path) {
            Some(route) => {
                let resolved = table.resolve(&route.target, host, path, headers);
                let rewrite = route.strip_prefix.then(|| {
                    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                    strip_path(pq, &route.path_prefix)
                });
                (resolved, rewrite)
            }
            None => match table.defaults.get(&self.listener) {
                Some(name) => match table.service(name) {
                    Some(s) => (Resolved::Service(s.clone()), None),
                    None => (Resolved::UnknownService(name.clone()), None),
                },
                None => return Err(ProxyError::NoRoute),
            },
        };
        match resolved {
            Resolved::Service(s) => Ok((s, rewrite)),
            Resolved::UnknownService(name) => Err(ProxyError::UnknownService(name)),
            Resolved::NoMapEntry { map, key } => Err(ProxyError::NoMapEntry { map, key }),
        }
    }

    /// The service (and path rewrite) a retry goes to when a table newer
    /// than `routed_in` routes the request to another one than `current`.
    fn reroute(
        &self,
        routed_in: &mut u64,
        current: &Arc<Service>,
        uri: &Uri,
        headers: Option<&HeaderMap>,
    ) -> Result<Option<Routed>, ProxyError> {
        let table = self.proxy.table.load();
        if table.version == *routed_in {
            return Ok(None);
        }
        *routed_in = table.version;
        let Some(headers) = headers else {
            return Ok(None);
        };
        let (now, rewrite) = self.route(&table, uri, headers)?;
        Ok((!Arc::ptr_eq(&now, current)).then_some((now, rewrite)))
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn_active: ConnActive,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let started = Instant::now();
        let (mut service, rewrite, mut routed_in) = {
            let table = self.proxy.table.load();
            let (service, rewrite) = self.route(&table, req.uri(), req.headers())?;
            (service, rewrite, table.version)
        };
        let mut sticky = sticky_of(&service, req.headers());

        // Phase 4: the upstream request's head, once for every try.
        let upgrade = req.version() == Version::HTTP_11 && wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let host = match parts.headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => {
                // h2 and absolute-form requests carry the host in the URI.
                let h = parts
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                if let Some(h) = &h {
                    parts.headers.insert(header::HOST, h.clone());
                }
                h
            }
        };
        strip_hop_by_hop(&mut parts.headers, upgrade);
        // We answer `Expect: 100-continue` ourselves: hyper sends the 100
        // when the body is first read.
        parts.headers.remove(header::EXPECT);
        add_forwarded(
            &mut parts.headers,
            self.peer.ip(),
            host.as_ref(),
            self.trust_forwarded,
        );
        let mut path_and_query = forwarded_path(&parts.uri, rewrite)?;
        // The first service's retry policy holds for the whole request,
        // even when a retry goes to another service after a switch.
        let first = service.clone();
        let retry = &first.settings.retry;
        let body = UpstreamBody::read(body, retry.replay_limit)
            .await
            .map_err(|_| ProxyError::BadRequest("the request body could not be read"))?;
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );

        let mut service_active = ServiceActive::start(&service.settings.live);
        let mut body = Some(body);
        let mut headers = Some(std::mem::take(&mut parts.headers));
        let mut avoid = None;
        let mut tries_left = retry.attempts;
        // Pooled connections the upstream closed under us; bounded so an
        // upstream that closes every connection cannot hold us in a loop.
        let mut unsent_left = 3u32;
        let mut _retry_guard = None;
        let mut first_try = true;
        loop {
            // A retry goes where the route points now: after a switch the
            // old service must not get it (a deploy may already have
            // confirmed that it is drained).
            let rerouted = if std::mem::take(&mut first_try) {
                None
            } else {
                self.reroute(&mut routed_in, &service, &parts.uri, headers.as_ref())?
            };
            if let Some((now, rewrite)) = rerouted {
                avoid = avoid
                    .and_then(|i| service.endpoints.get(i))
                    .and_then(|e: &Endpoint| now.endpoints.iter().position(|n| n.id == e.id));
                if now.name != service.name {
                    service_active = ServiceActive::start(&now.settings.live);
                }
                if let Some(h) = &headers {
                    sticky = sticky_of(&now, h);
                }
                path_and_query = forwarded_path(&parts.uri, rewrite)?;
                service = now;
            }
            let settings = &service.settings;
            tries_left -= 1;
            let pick = service
                .balancer
                .pick(
                    &service.endpoints,
                    &PickContext {
                        client_ip: Some(self.peer.ip()),
                        sticky: sticky.as_deref(),
                        avoid,
                    },
                )
                .ok_or_else(|| ProxyError::NoEndpoint(service.name.clone()))?;
            let endpoint = &service.endpoints[pick.index];
            let live = &endpoint.live;
            // In flight from the pick on, connecting included: a proxy that
            // reports no request in flight to an endpoint has none on the
            // way to it either (drain confirmations rely on this).
            let in_flight = live.start_request();
            // Another try elsewhere, if tries are left. Retries that add load
            // to upstreams (after a status or a timeout) also need a slot of
            // the retry budget; a request keeps the slot it already holds.
            // Retries after a refused connect or a reset before any answer
            // go to another endpoint and are bounded by `attempts` alone.
            let mut may_retry = |avoid_now: &mut Option<usize>, adds_load: bool| {
                if tries_left == 0 {
                    return false;
                }
                if adds_load && _retry_guard.is_none() {
                    match settings.live.try_retry(retry.budget_percent) {
                        Some(g) => _retry_guard = Some(g),
                        None => return false,
                    }
                }
                settings
                    .live
                    .retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *avoid_now = Some(pick.index);
                true
            };

            // Connect before giving the body away, so a failed connect can
            // try another endpoint with any body.
            let mut sender = match live
                .pool
                .take(&endpoint.authority, settings.upstream_idle_timeout)
                .await
            {
                Some(s) => s,
                None => match pool::connect(&endpoint.address, settings.connect_timeout).await {
                    Ok(s) => s,
                    Err(e) => {
                        self.failed(&service, pick.index);
                        if may_retry(&mut avoid, false) {
                            tracing::debug!(endpoint = %endpoint.address, error = %e, "connect failed; retrying on another endpoint");
                            continue;
                        }
                        return Err(ProxyError::Connect {
                            endpoint: endpoint.address.to_string(),
                            reason: e.to_string(),
                        });
                    }
                },
            };

            // The body for this try: a copy while more tries may follow.
            let Some(this_body) = (if tries_left > 0 {
                body.as_ref().and_then(UpstreamBody::replay)
            } else {
                None
            })
            .or_else(|| body.take()) else {
                return Err(ProxyError::Upstream {
                    endpoint: endpoint.address.to_string(),
                    reason: "the request body was already sent".into(),
                });
            };
            let replayable = body.is_some();
            let these_headers = match (&headers, replayable) {
                (Some(h), true) => h.clone(),
                _ => headers.take().unwrap_or_default(),
            };
            let mut upstream_req = Request::new(this_body);
            *upstream_req.method_mut() = parts.method.clone();
            // Origin form (`GET /path HTTP/1.1`), as servers expect from a
            // client that is not a forward proxy's.
            *upstream_req.uri_mut() = Uri::from(path_and_query.clone());
            *upstream_req.headers_mut() = these_headers;
            if host.is_none() {
                // HTTP/1.1 needs a Host: a client without one (HTTP/1.0)
                // reaches the endpoint by its address.
                if let Ok(h) = HeaderValue::from_str(endpoint.authority.as_str()) {
                    upstream_req.headers_mut().insert(header::HOST, h);
                }
            }

            let sent =
                tokio::time::timeout(retry.per_try_timeout, sender.try_send_request(upstream_req))
                    .await;
            let mut resp = match sent {
                Ok(Ok(resp)) => resp,
                Ok(Err(mut e)) => {
                    drop(in_flight);
                    // Never written: the upstream closed a pooled connection
                    // just then. The request (and its body) come back whole.
                    if let Some(unsent) = e.take_message() {
                        if unsent_left > 0 {
                            unsent_left -= 1;
                            let (p, b) = unsent.into_parts();
                            headers = Some(p.headers);
                            body = Some(b);
                            tries_left += 1;
                            avoid = None;
                            continue;
                        }
                    }
                    self.failed(&service, pick.index);
                    let reason = error_chain(&e.into_error());
                    // Reset before any response byte: safe to try elsewhere
                    // when the body can be sent again.
                    if replayable && may_retry(&mut avoid, false) {
                        tracing::debug!(endpoint = %endpoint.address, %reason, "upstream failed before answering; retrying");
                        continue;
                    }
                    return Err(ProxyError::Upstream {
                        endpoint: endpoint.address.to_string(),
                        reason,
                    });
                }
                Err(_) => {
                    drop(in_flight);
                    self.failed(&service, pick.index);
                    if idempotent && replayable && may_retry(&mut avoid, true) {
                        continue;
                    }
                    return Err(ProxyError::Timeout {
                        endpoint: endpoint.address.to_string(),
                        timeout: retry.per_try_timeout,
                    });
                }
            };

            // Phase 5: the response.
            let status = resp.status();
            live.record_status(status.as_u16());
            if status.is_server_error() {
                service.count_failure(pick.index);
            } else {
                live.succeeded();
            }
            if idempotent
                && replayable
                && retry.on_status.contains(&status.as_u16())
                && may_retry(&mut avoid, true)
            {
                tracing::debug!(endpoint = %endpoint.address, %status, "retrying on another endpoint");
                continue;
            }
            let switching = status == StatusCode::SWITCHING_PROTOCOLS;
            let mut guard = RequestGuard {
                endpoint: in_flight,
                conn: conn_active,
                service: service_active,
                upstream: (!switching).then(|| (sender, endpoint.authority.clone())),
            };
            let guard = match (switching, client_upgrade) {
                (true, Some(client_side)) => {
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    guard.upstream = None;
                    tokio::spawn(tunnel(client_side, upstream_side, guard));
                    None
                }
                _ => Some(guard),
            };
            strip_hop_by_hop(resp.headers_mut(), switching);
            if pick.set_cookie {
                if let Some(name) = &settings.cookie {
                    let cookie = format!("{name}={}; Path=/", endpoint.cookie);
                    if let Ok(v) = HeaderValue::try_from(cookie) {
                        resp.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
            }
            settings.live.latency.observe(started.elapsed());
            if self.access_log {
                resp.extensions_mut().insert(Served {
                    service: service.name.clone(),
                    endpoint: endpoint.id.clone(),
                });
            }
            let (parts, body) = resp.into_parts();
            return Ok(Response::from_parts(
                parts,
                ProxyBody::upstream(body, guard),
            ));
        }
    }

    /// A request to endpoint `i` got no answer at all (refused, reset,
    /// timed out).
    fn failed(&self, service: &Service, i: usize) {
        service.endpoints[i].live.record_failure();
        service.count_failure(i);
    }
}

/// Where a route sends a request: the service, and the path when the
/// route strips its prefix.
type Routed = (Arc<Service>, Option<String>);

/// The value of `service`'s sticky cookie in `headers`, if it has one.
fn sticky_of(service: &Service, headers: &HeaderMap) -> Option<String> {
    service
        .settings
        .cookie
        .as_deref()
        .and_then(|name| find_cookie(headers, name))
        .map(str::to_owned)
}

/// The path and query sent upstream: the route's rewrite, or as received.
fn forwarded_path(uri: &Uri, rewrite: Option<String>) -> Result<PathAndQuery, ProxyError> {
    match rewrite {
        Some(p) => PathAndQuery::try_from(p).map_err(|_| ProxyError::BadRequest("unusable path")),
        None => Ok(uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))),
    }
}

/// The host a request is for: the URI's authority (h2, absolute form) or
/// the Host header.
fn target_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> &'a str {
    uri.host()
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("")
}

/// Joins both upgraded halves and copies until either side closes.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    guard: RequestGuard,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "tunnel closed with an error");
    }
    drop(guard);
}

/// An error and its causes on one line, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
