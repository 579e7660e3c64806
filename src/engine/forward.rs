//! One request's way upstream, in named phases (as Pingora's `ProxyHttp`
//! names its own), each a function of this file:
//!
//! ```text
//! ConnContext::handle           the access log line around all of it
//!  └ respond                    a ProxyError becomes its status page
//!     └ forward                 route once, then try until done:
//!        ├ route                host + path prefix -> service (404, 503);
//!        │                      its sticky cookie read, and cleaned out of
//!        │                      the headers (see `sticky`)
//!        ├ upstream_head        origin-form target, Host, hop-by-hop
//!        │                      headers out, X-Forwarded-* in; once
//!        ├ RetryState::new      body read (held when small; 408 when
//!        │                      the client stalls), tries left
//!        └ each try:
//!           ├ pick              re-route if the table changed (reroute),
//!           │                   then the balancer's endpoint (503)
//!           ├ send_once         one attempt to one endpoint -> Outcome
//!           │                   (an answer whose framing cannot be
//!           │                   relayed is a failure: 502)
//!           ├ RetryState::decide  Outcome x retry state -> Next
//!           ├ record_attempt    passive checks learn how the try went
//!           └ Next::Respond  -> finish: response headers, the sticky
//!                                 cookie's Set-Cookie, latency, a
//!                                 101's tunnel
//!             Next::Fail     -> Failure::give_up: 502 or 504
//!             Next::Retry / Resend -> the next try
//! ```
//!
//! What a careful proxy changes in the headers it forwards: hop-by-hop
//! headers go (both ways, including every header named in `Connection`),
//! `X-Forwarded-*` are added, `Host` is kept.
//!
//! A request is sent again only when that cannot repeat its effect
//! (RFC 9110 9.2.2): after a refused connect, or a failure before any of
//! its bytes were written. Once bytes went out, only an idempotent method
//! may be repeated, and only when the service's retry policy says so
//! (`idempotent_after_send`), or on one of its retry statuses, or after
//! a 503 from an endpoint already known to be leaving (draining, failing
//! its check), which is retried without spending the retry budget.

use std::borrow::Cow;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::balance::{Pick, PickContext};
use super::body::{BodyError, UpstreamBody};
use super::conn::{now_ms, ConnActive};
use super::endpoint::InFlight;
use super::http::ConnContext;
use super::path::{self, PathNormalization};
use super::pool::{self, ConnectError};
use super::quiet::{Quiet, QUIET_EVERY};
use super::table::{
    Endpoint, Resolved, RetryGuard, RetryPolicy, RoutingTable, Service, ServiceState,
};
use super::{ProxyBody, ProxyError, RequestGuard, ServiceActive};

/// Which service and endpoint answered, for the access log.
#[derive(Clone)]
struct Served {
    service: Arc<str>,
    endpoint: Arc<str>,
}

/// Where a route sends a request: the service, and the path when the
/// route strips its prefix.
/// The service, the path rewrite, and the HSTS header of the route.
type Routed = (Arc<Service>, Option<String>, Option<HeaderValue>);

/// The upstream request's head, built once for every try (its headers
/// travel with the retry state, which may have to give them away).
struct UpstreamHead {
    /// The client's request head, headers taken out: its URI is routed
    /// again when a retry is re-routed.
    parts: Parts,
    /// The target sent: the current route's rewrite, or as received.
    path: PathAndQuery,
    /// Whether the client sent a Host (or an authority in the URI).
    has_host: bool,
    /// Whether the client asked to switch protocols: only then may the
    /// answer be a 101.
    upgrade: bool,
}

/// Where the request goes now: set by the first route, moved by a retry
/// that is re-routed after the table changed.
struct Routing {
    service: Arc<Service>,
    /// The table version the route was last looked up in.
    routed_in: u64,
    /// The request's value of the service's sticky cookie.
    sticky: Option<String>,
    /// Counts the request in its service, for the retry budget.
    active: ServiceActive,
}

/// What the tries of one request share.
struct RetryState {
    /// Tries left once the current one began.
    tries_left: u32,
    /// Pooled connections the upstream closed under us; bounded so an
    /// upstream that closes every connection cannot hold us in a loop.
    unsent_left: u32,
    /// Whether a try began: every later one is re-routed first.
    tried: bool,
    /// The endpoint (index in the current service) the next pick avoids:
    /// the one that just failed.
    avoid: Option<usize>,
    /// A slot of the retry budget, taken by the first retry that adds
    /// load to upstreams and kept for the rest of the request.
    budget: Option<RetryGuard>,
    /// Whether the method may be repeated once it reached an upstream.
    idempotent: bool,
    /// The headers and body for the next try; `None` once given away.
    headers: Option<HeaderMap>,
    body: Option<UpstreamBody>,
    /// Whether the current try's body was a copy (the body can be sent
    /// again).
    replayable: bool,
}

/// How one try went.
// Large for the same reason as `Failure`: its unsent request is not boxed.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// An answer, whatever its status.
    Answered(Answer),
    /// No answer.
    Failed(Failure),
}

/// An upstream's answer and what it holds until its body is finished.
struct Answer {
    resp: Response<Incoming>,
    conn: pool::Conn,
    in_flight: InFlight,
}

/// How a try failed to get an answer.
// Unsent's request is not boxed: boxing would allocate on that path, and
// hyper's own result that this comes from is as large.
#[allow(clippy::large_enum_variant)]
enum Failure {
    /// No connection to the endpoint: nothing was sent.
    Refused(ConnectError),
    /// The upstream closed a pooled connection just as the request was
    /// to go out: it comes back whole, never written.
    Unsent(Request<UpstreamBody>, hyper::Error),
    /// The connection failed before any byte of the request was written
    /// (the request was consumed, so only a held body can go again).
    NotWritten(hyper::Error),
    /// The connection failed after (part of) the request was written.
    Reset(hyper::Error),
    /// An answer that cannot be relayed (a transfer coding other than
    /// chunked, a 101 nobody asked for): the request reached the upstream.
    Malformed(String),
    /// The client stopped sending its streamed body for `body_timeout`;
    /// the upstream request was aborted.
    Stalled(Duration),
    /// No answer within the per-try timeout.
    TimedOut,
}

/// An [`Outcome`] as [`RetryState::decide`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tried {
    Answered(StatusCode),
    /// A 503 from an endpoint already known to be leaving: draining, in
    /// maintenance, failing its check, ejected or gone from the table (an
    /// app that answers 503 while it shuts down). It says nothing of the
    /// service, so it is retried without a budget slot.
    TurnedAway,
    Refused,
    Unsent,
    NotWritten,
    /// Failed after bytes went out, without an answer to relay (a reset,
    /// a close, a malformed answer).
    Reset,
    /// The client stalled: nothing to retry.
    Stalled,
    TimedOut,
}

/// What follows a try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Another try, avoiding this endpoint.
    Retry,
    /// The request came back unsent: send it again; not counted as a try.
    Resend,
    /// Answer with this try's response.
    Respond,
    /// Fail the request with this try's failure.
    Fail,
}

/// How often a request that came back unsent is sent again.
const UNSENT_RESENDS: u32 = 3;

impl ConnContext {
    pub(super) async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
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
        let mut pages = None;
        let mut resp = match self.forward(req, conn_active, &mut pages).await {
            Ok(resp) => resp,
            Err(e) => {
                if !is_upstream_failure(&e) {
                    // An upstream's failure was logged where it happened
                    // (see `ConnContext::failed_at`).
                    tracing::debug!(peer = %self.peer, error = %e, "request refused");
                }
                let mut resp = e.response_with(pages.as_ref().and_then(|p: &Pages| p.page(&e)));
                if let ProxyError::BadRequest(_) = e {
                    self.frontend.bad_request();
                }
                if matches!(
                    e,
                    ProxyError::ClientTimeout(_)
                        | ProxyError::BadRequest(_)
                        | ProxyError::NotImplemented(_)
                ) && version < Version::HTTP_2
                {
                    // The rest of the body (or a refused tunnel's bytes)
                    // may still come, or the client and the proxy
                    // disagree on what it sent: the connection cannot
                    // carry another request.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
        };
        if let Some(hsts) = pages.and_then(|p| p.hsts) {
            resp.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, hsts);
        }
        self.activity.mark_response(version, &mut resp);
        self.frontend.answered(resp.status().as_u16());
        resp
    }

    /// The phases in order (see the module doc): one route and head, then
    /// tries until one answers or the retry state gives up.
    /// Forwards one request; `pages` gets the pages of the service it
    /// was routed to, for the answer to an error.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn_active: ConnActive,
        pages: &mut Option<Pages>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let started = Instant::now();
        one_authority(&mut req)?;
        lookalike_names(req.headers_mut(), self.trust_forwarded)?;
        if self.path_normalization == PathNormalization::Strict {
            normalize_target(&mut req)?;
        }
        let (service, rewrite, routed_in, hsts) = {
            let table = self.proxy.table.load();
            let (service, rewrite, hsts) = self.route(&table, req.uri(), req.headers())?;
            (service, rewrite, table.version, hsts)
        };
        *pages = Some(Pages::of(&service, hsts.filter(|_| self.tls)));
        if service.settings.maintenance.is_some() {
            return Err(ProxyError::Maintenance(service.name.clone()));
        }
        let sticky = sticky_of(&service, req.headers());
        if let Some(cookie) = &service.settings.sticky {
            cookie.clean_request(req.headers_mut());
        }
        // `Upgrade: h2c` would open a tunnel past routing: only where the
        // service asks for it; elsewhere the request goes as plain HTTP/1.1.
        let upgrade = req.version() == Version::HTTP_11
            && wants_upgrade(req.headers())
            && (service.settings.h2c_upgrade || !offers_h2c(req.headers()));
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let (mut head, headers) = self.upstream_head(parts, rewrite, upgrade)?;
        // The first service's retry policy holds for the whole request,
        // even when a retry goes to another service after a switch.
        let first = service.clone();
        let policy = &first.settings.retry;
        let body = UpstreamBody::read(body, policy.replay_limit, self.body_timeout)
            .await
            .map_err(|e| match e {
                BodyError::Stalled(d) => ProxyError::ClientTimeout(d),
                BodyError::Client(_) => {
                    ProxyError::BadRequest("the request body could not be read")
                }
            })?;
        let mut state = RetryState::new(&head.parts.method, headers, body, policy.attempts);
        let mut routing = Routing {
            active: ServiceActive::start(&service.settings.live),
            service,
            routed_in,
            sticky,
        };
        loop {
            let (pick, in_flight) = self.pick(&mut head, &mut routing, &mut state).await?;
            let service = &*routing.service;
            let endpoint = &service.endpoints[pick.index];
            let timeout = policy.per_try_timeout;
            let outcome = match self
                .send_once(&head, service, endpoint, in_flight, &mut state, timeout)
                .await
            {
                Ok(outcome) => outcome,
                Err(e) => return Err(self.failed_at(endpoint, e)),
            };
            let tried = match outcome.tried() {
                Tried::Answered(StatusCode::SERVICE_UNAVAILABLE)
                    if self.known_leaving(service, endpoint) =>
                {
                    Tried::TurnedAway
                }
                tried => tried,
            };
            let next = state.decide(tried, policy, &service.settings.live, pick.index);
            self.record_attempt(service, pick.index, &outcome, next);
            match outcome {
                Outcome::Answered(answer) if next == Next::Respond => {
                    let resp =
                        self.finish(answer, routing, pick, conn_active, client_upgrade, started);
                    return Ok(resp);
                }
                Outcome::Answered(answer) => {
                    let status = answer.resp.status();
                    tracing::debug!(endpoint = %endpoint.address, %status, "retrying on another endpoint");
                }
                Outcome::Failed(Failure::Unsent(request, _)) if next == Next::Resend => {
                    state.put_back(request);
                }
                Outcome::Failed(failure) => {
                    if let Some(e) = failure.give_up(next == Next::Retry, endpoint, timeout) {
                        return Err(self.failed_at(endpoint, e));
                    }
                }
            }
        }
    }

    /// The service and the route's path rewrite: host + longest path
    /// prefix, or the listener's default service (see `table`).
    fn route(
        &self,
        table: &RoutingTable,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Routed, ProxyError> {
        let host = target_host(uri, headers);
        let path = uri.path();
        let mut hsts = None;
        let (resolved, rewrite) = match table.routes.find(host, path) {
            Some(route) => {
                if let (Some(port), false) = (route.https_redirect, self.tls) {
                    return Err(ProxyError::HttpsRedirect(https_location(uri, host, port)));
                }
                hsts.clone_from(&route.hsts);
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
            Resolved::Service(s) => Ok((s, rewrite, hsts)),
            Resolved::UnknownService(name) => Err(ProxyError::UnknownService(name)),
            Resolved::NoMapEntry { map, key } => Err(ProxyError::NoMapEntry { map, key }),
        }
    }

    /// Whether `endpoint` of `service` is known to be on its way out: not
    /// taking new requests in the request's table or by its live checks,
    /// or no longer so in the latest table (a drain that came after the
    /// request started).
    fn known_leaving(&self, service: &Service, endpoint: &Endpoint) -> bool {
        if !endpoint.accepts_new() {
            return true;
        }
        let table = self.proxy.table.load();
        let now = table
            .service(&service.name)
            .and_then(|s| s.endpoints.iter().find(|e| e.id == endpoint.id));
        now.is_none_or(|e| !e.accepts_new())
    }

    /// The upstream head: the client's headers made fit to forward (they
    /// come back apart, for the retry state) and the origin-form target.
    fn upstream_head(
        &self,
        mut parts: Parts,
        rewrite: Option<String>,
        upgrade: bool,
    ) -> Result<(UpstreamHead, HeaderMap), ProxyError> {
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
            self.tls,
        );
        let path = forwarded_path(&parts.uri, rewrite)?;
        let headers = std::mem::take(&mut parts.headers);
        let has_host = host.is_some();
        Ok((
            UpstreamHead {
                parts,
                path,
                has_host,
                upgrade,
            },
            headers,
        ))
    }

    /// Pick: the endpoint for this try, in the service the route points to
    /// now. It counts as in flight from here on, connecting included: a
    /// proxy that reports no request in flight to an endpoint has none on
    /// the way to it either (drain confirmations rely on this).
    async fn pick(
        &self,
        head: &mut UpstreamHead,
        routing: &mut Routing,
        state: &mut RetryState,
    ) -> Result<(Pick, InFlight), ProxyError> {
        // A retry goes where the route points now: after a switch the old
        // service must not get it (a deploy may already have confirmed
        // that it is drained).
        if std::mem::replace(&mut state.tried, true) {
            self.follow_route(head, routing, state)?;
        }
        state.tries_left -= 1;
        let mut hold: Option<Hold> = None;
        let mut queued: Option<Queued> = None;
        loop {
            let service = &routing.service;
            let live = &service.settings.live;
            let paused = service.settings.paused;
            // Requests already queue for a slot: a new one queues behind
            // them rather than take the next free slot first.
            let behind = queued.is_none() && live.queued.load(Relaxed) > 0;
            let pick = match paused {
                Some(_) => None,
                None if behind => None,
                None => service.balancer.pick(
                    &service.endpoints,
                    &PickContext {
                        client_ip: Some(self.peer.ip()),
                        sticky: routing.sticky.as_deref(),
                        avoid: state.avoid,
                    },
                ),
            };
            if let Some(pick) = pick {
                let endpoint = &service.endpoints[pick.index];
                match endpoint.live.try_start_request(&live.freed) {
                    Some(in_flight) => return Ok((pick, in_flight)),
                    // Another request took its last slot meanwhile.
                    None => continue,
                }
            }
            // Every endpoint that takes requests is at its limit: queue
            // for a slot, woken by the next request to end (or a tick,
            // for limits changed under requests in flight).
            let full = || {
                service
                    .endpoints
                    .iter()
                    .any(|e| e.accepts_new() && !e.live.has_room())
            };
            if paused.is_none() && (behind || full()) {
                let timeout = service.settings.queue_timeout;
                let q = queued.get_or_insert_with(|| Queued::start(live, timeout));
                let left = q.until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ProxyError::QueueTimeout(service.name.clone()));
                }
                let _ = tokio::time::timeout(left.min(QUEUE_TICK), live.freed.notified()).await;
                self.follow_route(head, routing, state)?;
                continue;
            }
            // Paused, or no endpoint takes the request: wait, if the
            // service says so, looking again at every tick (a resume and
            // new endpoints come in new tables, health flips are live
            // atomics).
            let give_up = || match paused {
                Some(_) => ProxyError::Paused(service.name.clone()),
                None => ProxyError::NoEndpoint(service.name.clone()),
            };
            let Some(limit) = paused.or(service.settings.hold_timeout) else {
                return Err(give_up());
            };
            let hold = hold.get_or_insert_with(|| Hold::start(&service.settings.live, limit));
            if hold.expired() {
                return Err(give_up());
            }
            tokio::time::sleep(HOLD_TICK).await;
            self.follow_route(head, routing, state)?;
        }
    }

    /// Moves the request to the service its route points to in the
    /// latest table, if that is another (or a rebuilt) one.
    fn follow_route(
        &self,
        head: &mut UpstreamHead,
        routing: &mut Routing,
        state: &mut RetryState,
    ) -> Result<(), ProxyError> {
        let current = &routing.service;
        let uri = &head.parts.uri;
        let rerouted =
            self.reroute(&mut routing.routed_in, current, uri, state.headers.as_ref())?;
        if let Some((now, rewrite, _)) = rerouted {
            state.avoid = state
                .avoid
                .and_then(|i| current.endpoints.get(i))
                .and_then(|e: &Endpoint| now.endpoints.iter().position(|n| n.id == e.id));
            if now.name != current.name {
                routing.active = ServiceActive::start(&now.settings.live);
            }
            // The headers were cleaned for the old service's cookie; one
            // with the same cookie reads the same binding.
            if now.settings.sticky != current.settings.sticky {
                if let Some(h) = &mut state.headers {
                    routing.sticky = sticky_of(&now, h);
                    if let Some(cookie) = &now.settings.sticky {
                        cookie.clean_request(h);
                    }
                }
            }
            head.path = forwarded_path(uri, rewrite)?;
            routing.service = now;
        }
        Ok(())
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
        let (now, rewrite, hsts) = self.route(&table, uri, headers)?;
        Ok((!Arc::ptr_eq(&now, current)).then_some((now, rewrite, hsts)))
    }

    /// Send once: one attempt to one endpoint, bounded by `timeout`. An
    /// `Err` ends the request at once (no body left to send).
    async fn send_once(
        &self,
        head: &UpstreamHead,
        service: &Service,
        endpoint: &Endpoint,
        in_flight: InFlight,
        state: &mut RetryState,
        timeout: Duration,
    ) -> Result<Outcome, ProxyError> {
        let settings = &service.settings;
        // Connect before giving the body away, so a failed connect can
        // try another endpoint with any body.
        let mut conn = match endpoint
            .live
            .pool
            .take(&endpoint.authority, settings.upstream_idle_timeout)
            .await
        {
            Some(s) => {
                endpoint.live.record_connect(Duration::ZERO);
                s
            }
            None => {
                let connecting = Instant::now();
                match pool::connect(
                    &endpoint.address,
                    settings.connect_timeout,
                    Some(&endpoint.live.traffic),
                )
                .await
                {
                    Ok(s) => {
                        endpoint.live.record_connect(connecting.elapsed());
                        s
                    }
                    Err(e) => return Ok(Outcome::Failed(Failure::Refused(e))),
                }
            }
        };
        let Some((body, headers)) = state.this_try() else {
            return Err(ProxyError::Upstream {
                endpoint: endpoint.address.to_string(),
                reason: "the request body was already sent".into(),
            });
        };
        let req = head.request(body, headers, endpoint);
        let written = conn.written();
        let sent = tokio::time::timeout(timeout, conn.sender.try_send_request(req)).await;
        Ok(match sent {
            // hyper reads 1xx answers other than 101 and drops them; they
            // are not relayed because hyper 1.x cannot send them: its
            // HTTP/1 server refuses a 1xx response (only its own
            // `100 Continue` is written) and its HTTP/2 server keeps h2's
            // `send_informational` to itself. A 103's hints are lost.
            Ok(Ok(resp)) => match unrelayable(&resp, head.upgrade) {
                Some(reason) => Outcome::Failed(Failure::Malformed(reason)),
                None => Outcome::Answered(Answer {
                    resp,
                    conn,
                    in_flight,
                }),
            },
            Ok(Err(mut e)) => Outcome::Failed(match e.take_message() {
                Some(unsent) => Failure::Unsent(unsent, e.into_error()),
                None => {
                    let e = e.into_error();
                    match stalled(&e) {
                        Some(idle) => Failure::Stalled(idle),
                        None if conn.written() == written => Failure::NotWritten(e),
                        None => Failure::Reset(e),
                    }
                }
            }),
            Err(_) => Outcome::Failed(Failure::TimedOut),
        })
    }

    /// Passive checks learn how a try went: a 5xx or no answer counts
    /// against the endpoint. A request that comes back unsent to be sent
    /// again says nothing about it.
    fn record_attempt(&self, service: &Service, i: usize, outcome: &Outcome, next: Next) {
        match outcome {
            Outcome::Answered(answer) => {
                answer.in_flight.answered();
                let live = &service.endpoints[i].live;
                let status = answer.resp.status();
                live.record_status(status.as_u16());
                if status.is_server_error() {
                    service.count_failure(i);
                } else {
                    live.succeeded();
                }
            }
            Outcome::Failed(Failure::Unsent(..)) if next == Next::Resend => {}
            // The client's fault, not the endpoint's.
            Outcome::Failed(Failure::Stalled(_)) => {}
            Outcome::Failed(failure) => {
                if let Failure::Refused(_) = failure {
                    service.endpoints[i].live.connect_failed();
                }
                self.failed(service, i)
            }
        }
    }

    /// A request to endpoint `i` got no answer at all (refused, reset,
    /// timed out).
    fn failed(&self, service: &Service, i: usize) {
        service.endpoints[i].live.record_failure();
        service.count_failure(i);
    }

    /// `e`, which ends a request sent to `endpoint`, once logged when the
    /// upstream failed: see [`warn_failed`].
    fn failed_at(&self, endpoint: &Endpoint, e: ProxyError) -> ProxyError {
        if is_upstream_failure(&e) {
            warn_failed(&endpoint.live.failure_warning, self.peer, &e, now_ms());
        }
        e
    }

    /// Finish: the answer as the client gets it. Its body keeps the
    /// request counted (and the upstream connection out of the pool) until
    /// it ends; a 101 becomes a tunnel between the two upgraded streams.
    fn finish(
        &self,
        answer: Answer,
        routing: Routing,
        pick: Pick,
        conn: ConnActive,
        client_upgrade: Option<OnUpgrade>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let Answer {
            mut resp,
            conn: upstream,
            in_flight,
        } = answer;
        let service = &*routing.service;
        let settings = &service.settings;
        let endpoint = &service.endpoints[pick.index];
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let mut guard = RequestGuard {
            endpoint: in_flight,
            conn,
            service: routing.active,
            upstream: (!switching).then(|| (upstream, endpoint.authority.clone())),
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
        // Chunked framing wins over a Content-Length sent with it (RFC
        // 9112 6.3): the length would frame the client's copy wrongly.
        if resp.headers().contains_key(header::TRANSFER_ENCODING) {
            resp.headers_mut().remove(header::CONTENT_LENGTH);
        }
        strip_hop_by_hop(resp.headers_mut(), switching);
        if let Some(cookie) = &settings.sticky {
            let clash = cookie.on_response(resp.headers_mut(), &endpoint.cookie, pick.set_cookie);
            let now = || super::conn::now_ms();
            if let Some(held) = clash
                .then(|| settings.live.cookie_clash.allow(now(), QUIET_EVERY))
                .flatten()
            {
                tracing::warn!(service = %service.name, cookie = %cookie.name, repeats = held, "the application sets the sticky cookie itself, which would undo the binding: its Set-Cookie was dropped. Give the proxy's cookie another name (cookie = {{ name = \"...\" }}) or let the application's cookie carry the binding with mode = \"rewrite\" (said at most every {QUIET_EVERY:?}; repeats: times held back since)");
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
        Response::from_parts(parts, ProxyBody::upstream(body, guard))
    }
}

/// Did the upstream fail the request (no connection, no answer in time,
/// no usable answer), rather than the client or the config?
fn is_upstream_failure(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::Connect { .. } | ProxyError::Timeout { .. } | ProxyError::Upstream { .. }
    )
}

/// Warns that a request failed at an endpoint. A failing endpoint fails
/// every request sent to it, and one line each would bury the rest of the
/// log under load: it is said once per [`QUIET_EVERY`] per endpoint
/// (`gate`), with how many were held back since.
fn warn_failed(gate: &Quiet, peer: SocketAddr, e: &ProxyError, now: u64) {
    if let Some(held) = gate.allow(now, QUIET_EVERY) {
        tracing::warn!(%peer, error = %e, repeats = held, "request failed (said at most every {QUIET_EVERY:?} per endpoint; repeats: times held back since)");
    }
}

impl UpstreamHead {
    /// This try's request to `endpoint`.
    fn request(
        &self,
        body: UpstreamBody,
        headers: HeaderMap,
        endpoint: &Endpoint,
    ) -> Request<UpstreamBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.parts.method.clone();
        // Origin form (`GET /path HTTP/1.1`), as servers expect from a
        // client that is not a forward proxy's.
        *req.uri_mut() = Uri::from(self.path.clone());
        *req.headers_mut() = headers;
        if !self.has_host {
            // HTTP/1.1 needs a Host: a client without one (HTTP/1.0)
            // reaches the endpoint by its address.
            if let Ok(h) = HeaderValue::from_str(endpoint.authority.as_str()) {
                req.headers_mut().insert(header::HOST, h);
            }
        }
        req
    }
}

/// A service's own pages for the proxy's answers (`error_pages`, a
/// maintenance page), kept from its routing for the error response.
struct Pages {
    by_status: Option<Arc<std::collections::BTreeMap<u16, bytes::Bytes>>>,
    maintenance: Option<bytes::Bytes>,
    /// The route's `Strict-Transport-Security`, for a TLS client.
    hsts: Option<HeaderValue>,
}

impl Pages {
    fn of(service: &Service, hsts: Option<HeaderValue>) -> Self {
        Pages {
            by_status: service.settings.error_pages.clone(),
            maintenance: service.settings.maintenance.clone(),
            hsts,
        }
    }

    /// The page for `e`'s answer: a maintenance's own (else the 503
    /// page), or the page for its status.
    fn page(&self, e: &ProxyError) -> Option<&bytes::Bytes> {
        let status = e.status().as_u16();
        let by_status = || self.by_status.as_ref()?.get(&status);
        match e {
            ProxyError::Maintenance(_) => self
                .maintenance
                .as_ref()
                .filter(|p| !p.is_empty())
                .or_else(by_status),
            _ => by_status(),
        }
    }
}

/// Where a plain-HTTP request to an `https_redirect` route is sent: the
/// same host (without its port) and target, over https on `port`.
fn https_location(uri: &Uri, host: &str, port: Option<u16>) -> String {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let name = match host.rsplit_once(':') {
        // `[::1]:80` or `name:80`; a bare IPv6 literal has no port.
        Some((name, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => name,
        _ => host,
    };
    match port {
        Some(port) if port != 443 => format!("https://{name}:{port}{pq}"),
        _ => format!("https://{name}{pq}"),
    }
}

/// How often a held request looks for an endpoint again.
const HOLD_TICK: Duration = Duration::from_millis(20);

/// How long a queued request waits for a wake-up before it looks again.
const QUEUE_TICK: Duration = Duration::from_millis(50);

/// A request in its service's queue for a slot: counted in `queued`
/// (and `max_queued`) while it waits, its wait in `queue_time` after.
struct Queued {
    until: Instant,
    since: Instant,
    live: Arc<ServiceState>,
}

impl Queued {
    fn start(live: &Arc<ServiceState>, timeout: Duration) -> Self {
        let now = live.queued.fetch_add(1, Relaxed) + 1;
        crate::engine::rate::raise_max(&live.max_queued, now);
        live.queued_total.fetch_add(1, Relaxed);
        let since = Instant::now();
        Queued {
            until: since + timeout,
            since,
            live: live.clone(),
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.live.queued.fetch_sub(1, Relaxed);
        self.live.queue_time.add(self.since.elapsed());
        // The next in line may go now.
        self.live.freed.notify_one();
    }
}

/// A request waiting for an endpoint (`hold_timeout`): counted in its
/// service's `held` gauge while it waits.
struct Hold {
    until: Instant,
    live: Arc<ServiceState>,
}

impl Hold {
    fn start(live: &Arc<ServiceState>, limit: Duration) -> Self {
        live.held.fetch_add(1, Relaxed);
        live.held_total.fetch_add(1, Relaxed);
        Hold {
            until: Instant::now() + limit,
            live: live.clone(),
        }
    }

    fn expired(&self) -> bool {
        Instant::now() >= self.until
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.live.held.fetch_sub(1, Relaxed);
    }
}

impl RetryState {
    fn new(method: &Method, headers: HeaderMap, body: UpstreamBody, attempts: u32) -> Self {
        RetryState {
            tries_left: attempts,
            unsent_left: UNSENT_RESENDS,
            tried: false,
            avoid: None,
            budget: None,
            idempotent: matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            ),
            headers: Some(headers),
            body: Some(body),
            replayable: false,
        }
    }

    /// The body and headers for this try: copies while more tries may
    /// follow and the body was held whole, else the originals. `None`: the
    /// body was already sent.
    fn this_try(&mut self) -> Option<(UpstreamBody, HeaderMap)> {
        let body = if self.tries_left > 0 {
            self.body.as_ref().and_then(UpstreamBody::replay)
        } else {
            None
        }
        .or_else(|| self.body.take())?;
        self.replayable = self.body.is_some();
        let headers = match (&self.headers, self.replayable) {
            (Some(h), true) => h.clone(),
            _ => self.headers.take().unwrap_or_default(),
        };
        Some((body, headers))
    }

    /// A request that came back unsent: its headers and body, whole, for
    /// the next try.
    fn put_back(&mut self, request: Request<UpstreamBody>) {
        let (parts, body) = request.into_parts();
        self.headers = Some(parts.headers);
        self.body = Some(body);
    }

    /// Decide: what follows a try to endpoint `picked` of the service
    /// whose counters are `live`. Only a replayable body is sent again.
    /// A request that never reached the upstream (refused, not written)
    /// may go elsewhere whatever its method; one that did only when it
    /// is idempotent, after a status of `policy.on_status`, or after a
    /// reset or a timeout when `policy.idempotent_after_send` allows it.
    fn decide(
        &mut self,
        tried: Tried,
        policy: &RetryPolicy,
        live: &Arc<ServiceState>,
        picked: usize,
    ) -> Next {
        let repeatable = self.idempotent && self.replayable;
        let after_send = repeatable && policy.idempotent_after_send;
        let retry = match tried {
            Tried::Unsent if self.unsent_left > 0 => {
                // Never written: the request and its body came back whole.
                self.unsent_left -= 1;
                self.tries_left += 1;
                self.avoid = None;
                return Next::Resend;
            }
            // Refused, or failed before a byte was written: the upstream
            // never saw it, so any method may go elsewhere (when the body
            // can be sent again), without adding load.
            Tried::Refused => self.may_retry(false, policy, live, picked),
            Tried::Unsent | Tried::NotWritten => {
                self.replayable && self.may_retry(false, policy, live, picked)
            }
            // It reached the upstream, which may have acted on it.
            Tried::Reset => after_send && self.may_retry(false, policy, live, picked),
            Tried::TimedOut => after_send && self.may_retry(true, policy, live, picked),
            Tried::Stalled => false,
            Tried::TurnedAway => {
                if repeatable && self.may_retry(false, policy, live, picked) {
                    return Next::Retry;
                }
                return Next::Respond;
            }
            Tried::Answered(status) => {
                let on_status = policy.on_status.contains(&status.as_u16());
                if repeatable && on_status && self.may_retry(true, policy, live, picked) {
                    return Next::Retry;
                }
                return Next::Respond;
            }
        };
        if retry {
            Next::Retry
        } else {
            Next::Fail
        }
    }

    /// Whether another try may follow, on another endpoint: tries must be
    /// left, and a retry that adds load to upstreams (after a status or a
    /// timeout) needs a slot of the retry budget; a request keeps the slot
    /// it already holds.
    fn may_retry(
        &mut self,
        adds_load: bool,
        policy: &RetryPolicy,
        live: &Arc<ServiceState>,
        picked: usize,
    ) -> bool {
        if self.tries_left == 0 {
            return false;
        }
        if adds_load && self.budget.is_none() {
            match live.try_retry(policy.budget_percent) {
                Some(g) => self.budget = Some(g),
                None => return false,
            }
        }
        live.retries.fetch_add(1, Relaxed);
        self.avoid = Some(picked);
        true
    }
}

impl Outcome {
    fn tried(&self) -> Tried {
        match self {
            Outcome::Answered(answer) => Tried::Answered(answer.resp.status()),
            Outcome::Failed(Failure::Refused(_)) => Tried::Refused,
            Outcome::Failed(Failure::Unsent(..)) => Tried::Unsent,
            Outcome::Failed(Failure::NotWritten(_)) => Tried::NotWritten,
            Outcome::Failed(Failure::Reset(_) | Failure::Malformed(_)) => Tried::Reset,
            Outcome::Failed(Failure::Stalled(_)) => Tried::Stalled,
            Outcome::Failed(Failure::TimedOut) => Tried::TimedOut,
        }
    }
}

impl Failure {
    /// The error a failed try to `endpoint` ends the request with; `None`
    /// when another try follows (`retry`), which is logged instead.
    fn give_up(self, retry: bool, endpoint: &Endpoint, timeout: Duration) -> Option<ProxyError> {
        let address = &endpoint.address;
        match self {
            Failure::Refused(e) if retry => {
                tracing::debug!(endpoint = %address, error = %e, "connect failed; retrying on another endpoint");
                None
            }
            Failure::Refused(e) => Some(ProxyError::Connect {
                endpoint: address.to_string(),
                reason: e.to_string(),
            }),
            Failure::Unsent(_, e) | Failure::NotWritten(e) | Failure::Reset(e) => {
                let reason = error_chain(&e);
                if retry {
                    tracing::debug!(endpoint = %address, %reason, "upstream failed before answering; retrying");
                    return None;
                }
                Some(ProxyError::Upstream {
                    endpoint: address.to_string(),
                    reason,
                })
            }
            Failure::Malformed(reason) if retry => {
                tracing::debug!(endpoint = %address, %reason, "unusable answer; retrying");
                None
            }
            Failure::Malformed(reason) => Some(ProxyError::Upstream {
                endpoint: address.to_string(),
                reason,
            }),
            Failure::Stalled(idle) => Some(ProxyError::ClientTimeout(idle)),
            Failure::TimedOut => (!retry).then(|| ProxyError::Timeout {
                endpoint: address.to_string(),
                timeout,
            }),
        }
    }
}

/// Why an upstream's answer cannot be relayed, if it cannot: a 101 to a
/// request that asked for no upgrade, or a transfer coding other than
/// chunked (hyper would pass its bytes on undecoded, as if identity).
fn unrelayable(resp: &Response<Incoming>, upgrade: bool) -> Option<String> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !upgrade {
        return Some(
            "the upstream switched protocols (101) though the request asked for no upgrade".into(),
        );
    }
    for value in resp.headers().get_all(header::TRANSFER_ENCODING) {
        let Ok(value) = value.to_str() else {
            return Some("the upstream's Transfer-Encoding is not text".into());
        };
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Some(format!(
                    "the upstream's transfer coding {coding:?} cannot be relayed: only chunked is understood"
                ));
            }
        }
    }
    None
}

/// The body timeout, when the failure came from the client's streamed
/// body stalling.
fn stalled(e: &hyper::Error) -> Option<Duration> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(BodyError::Stalled(idle)) = c.downcast_ref::<BodyError>() {
            return Some(*idle);
        }
        cause = c.source();
    }
    None
}

/// The endpoint value `service`'s sticky cookie carries in `headers`, if
/// the service is sticky and the request has one.
fn sticky_of(service: &Service, headers: &HeaderMap) -> Option<String> {
    service
        .settings
        .sticky
        .as_ref()
        .and_then(|cookie| cookie.value_in(headers))
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

/// Phase 0, before routing: a request names one host, the one it is
/// routed by and forwarded with (RFC 9112 §3.2, RFC 9113 §8.3.1).
///
/// - HTTP/1.1 must send `Host`, once; HTTP/1.x may not send two.
/// - A target with an authority (absolute form over HTTP/1, `:authority`
///   in h2) that differs from `Host`: 400 over HTTP/1 (which host is meant
///   cannot be known); in h2 the `:authority` wins and becomes `Host`.
/// - No userinfo in an authority (`http://user@host/`), no
///   authority-form target, and an asterisk-form one for OPTIONS only:
///   these would otherwise be forwarded as `/`.
/// - CONNECT: 501, as no route tunnels.
pub fn one_authority<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    let bad = ProxyError::BadRequest;
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(bad("more than one Host header"));
    }
    let h2 = req.version() == Version::HTTP_2;
    if req.version() == Version::HTTP_11 && hosts == 0 {
        return Err(bad("an HTTP/1.1 request without Host"));
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::NotImplemented(
            "this proxy does not open CONNECT tunnels",
        ));
    }
    let uri = req.uri();
    if uri.path_and_query().is_none() {
        return Err(bad("an authority-form target is for CONNECT only"));
    }
    if uri.path() == "*" && req.method() != Method::OPTIONS {
        return Err(bad("an asterisk-form target is for OPTIONS only"));
    }
    let Some(authority) = uri.authority() else {
        return Ok(());
    };
    if authority.as_str().contains('@') {
        return Err(bad("userinfo in the request target"));
    }
    let same = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.eq_ignore_ascii_case(authority.as_str()));
    if same || hosts == 0 {
        return Ok(());
    }
    if !h2 {
        return Err(bad(
            "the Host header differs from the request target's host",
        ));
    }
    let value =
        HeaderValue::from_str(authority.as_str()).map_err(|_| bad("an unusable :authority"))?;
    req.headers_mut().insert(header::HOST, value);
    Ok(())
}

/// Phase 0b: the path is routed and forwarded in its normal form (see
/// [`super::path`]); a request whose path is already normal is untouched.
fn normalize_target<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    let uri = req.uri();
    let normal = match path::normalize(uri.path()) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(p)) => p,
        Err(e) => return Err(ProxyError::BadRequest(e.as_str())),
    };
    let pq = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(pq).map_err(|_| ProxyError::BadRequest("unusable path"))?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("unusable path"))?;
    Ok(())
}

/// Header names a server may read as another one: CGI-style servers
/// (PHP, WSGI, Rack) turn `-` and `_` alike into `_`, so
/// `Transfer_Encoding` can frame a body there and `X_Forwarded_For` can
/// stand in for the header this proxy sets.
const FRAMING_LOOKALIKES: [&str; 6] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "upgrade",
    "te",
];
const FORWARDED_LOOKALIKES: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// Phase 0, with the host: a name spelt with `_` for one that frames the
/// message is refused (400); one for a forwarding header is dropped unless
/// the peer is a trusted proxy, as the header itself is. Allocates only
/// when there is something to drop.
fn lookalike_names(headers: &mut HeaderMap, trusted: bool) -> Result<(), ProxyError> {
    let mut dropped: Option<Vec<HeaderName>> = None;
    for name in headers.keys().filter(|n| n.as_str().contains('_')) {
        let like = |of: &&str| dashed_eq(name.as_str(), of);
        if FRAMING_LOOKALIKES.iter().any(like) {
            return Err(ProxyError::BadRequest(
                "a header name spelt with `_` for one that frames the request (Content-Length, Transfer-Encoding, Host...): spell it with `-`",
            ));
        }
        if !trusted && FORWARDED_LOOKALIKES.iter().any(like) {
            dropped.get_or_insert_with(Vec::new).push(name.clone());
        }
    }
    for name in dropped.into_iter().flatten() {
        headers.remove(name);
    }
    Ok(())
}

/// `name` (lower-case, as `HeaderName` keeps it) is `of` with some `-`
/// written as `_`.
fn dashed_eq(name: &str, of: &str) -> bool {
    name.len() == of.len()
        && name
            .bytes()
            .zip(of.bytes())
            .all(|(n, o)| n == o || (n == b'_' && o == b'-'))
}

/// The host a request is for: the URI's authority (h2, absolute form) or
/// the Host header.
fn target_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> &'a str {
    uri.host()
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("")
}

/// Joins both upgraded halves and copies until either side closes.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, guard: RequestGuard) {
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

const HOPS: usize = 8;

/// Hop-by-hop headers (RFC 9110 7.6.1 and the usual non-standard ones).
const HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
];

static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Does the request ask to switch protocols (WebSocket and the like)?
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && lists_token(headers, header::CONNECTION, "upgrade")
}

/// Does the request offer to switch to h2 in clear text (`Upgrade: h2c`)?
pub fn offers_h2c(headers: &HeaderMap) -> bool {
    lists_token(headers, header::UPGRADE, "h2c")
}

/// Whether any `name` header's comma-separated list holds `token`
/// (case-insensitively).
fn lists_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Connection: upgrade`
/// and `Upgrade` survive, as a protocol switch needs them end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names first: most messages carry none of them
    // (a header named by `Connection` needs `Connection` itself).
    let mut present = [false; HOPS + 1];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        } else if name == PROXY_CONNECTION {
            present[HOPS] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    // An h2c upgrade is answered with the settings it carries.
    let h2c_settings = upgrade
        .as_ref()
        .filter(|_| offers_h2c(headers))
        .and_then(|_| headers.get(&HTTP2_SETTINGS).cloned());
    if let Some(named) = connection_tokens(headers) {
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    if present[HOPS] {
        headers.remove(&PROXY_CONNECTION);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    if let Some(settings) = h2c_settings {
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("upgrade, http2-settings"),
        );
        headers.insert(&HTTP2_SETTINGS, settings);
    }
}

/// Header names listed in `Connection`, other than the hop-by-hop ones we
/// remove anyway. `None` (no allocation) when there are none.
fn connection_tokens(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut out: Option<Vec<HeaderName>> = None;
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case("keep-alive")
                || token.eq_ignore_ascii_case("upgrade")
            {
                continue;
            }
            if let Ok(name) = HeaderName::try_from(token) {
                // A client cannot make us drop Host this way.
                if name != header::HOST {
                    out.get_or_insert_with(Vec::new).push(name);
                }
            }
        }
    }
    out
}

/// Adds the X-Forwarded-* headers for a request from `client` that arrived
/// for `host`. From a trusted proxy, X-Forwarded-For is appended to and
/// -Proto, -Host and Forwarded are kept when present; from anyone else
/// they are this hop's alone: X-Forwarded-For is the client's address,
/// and a Forwarded header is removed (it could only be a claim).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    host: Option<&HeaderValue>,
    trust: bool,
    https: bool,
) {
    let mut xff = String::with_capacity(40);
    if trust {
        // Every X-Forwarded-For line, in order, then this hop's client.
        for prev in headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            let prev = prev.trim();
            if !prev.is_empty() {
                xff.push_str(prev);
                xff.push_str(", ");
            }
        }
    } else {
        headers.remove(header::FORWARDED);
    }
    let _ = write!(xff, "{}", client.to_canonical());
    if let Ok(v) = HeaderValue::try_from(xff) {
        // Several X-Forwarded-For lines are folded into one.
        headers.insert(&X_FORWARDED_FOR, v);
    }
    if !trust || !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = if https { "https" } else { "http" };
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !trust || !headers.contains_key(&X_FORWARDED_HOST) {
        match host {
            Some(h) => {
                headers.insert(&X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

/// The path to forward: with the route's prefix removed when it strips.
pub fn strip_path(path: &str, prefix: &str) -> String {
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on_status: &[u16]) -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            per_try_timeout: Duration::from_secs(1),
            on_status: on_status.into(),
            budget_percent: 20,
            replay_limit: 1024,
            idempotent_after_send: false,
        }
    }

    /// The lines `f` logs.
    fn logged(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("log lock").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&lines.0.lock().expect("log lock")).into_owned();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn a_failing_endpoint_is_warned_about_once_per_interval() {
        let (gate, other) = (Quiet::default(), Quiet::default());
        let peer: SocketAddr = "127.0.0.1:4000".parse().expect("an address");
        let e = ProxyError::Connect {
            endpoint: "10.0.0.1:80".into(),
            reason: "connection refused".into(),
        };
        let lines = logged(|| {
            for t in 0..1000 {
                warn_failed(&gate, peer, &e, t);
            }
            warn_failed(&other, peer, &e, 500);
            warn_failed(&gate, peer, &e, 10_000);
        });
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].contains("request failed") && lines[0].contains("repeats=0"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("repeats=0"),
            "another endpoint's own gate: {}",
            lines[1]
        );
        assert!(lines[2].contains("repeats=999"), "{}", lines[2]);
    }

    /// [`policy`] that also repeats idempotent requests after a send.
    fn after_send(on_status: &[u16]) -> RetryPolicy {
        RetryPolicy {
            idempotent_after_send: true,
            ..policy(on_status)
        }
    }

    /// A request's retry state as a try to endpoint 1 ended: `tries_left`
    /// left, its body a copy (`replayable`) or not.
    fn state(method: Method, tries_left: u32, replayable: bool) -> RetryState {
        let mut s = RetryState::new(&method, HeaderMap::new(), UpstreamBody::empty(), 3);
        s.tries_left = tries_left;
        s.replayable = replayable;
        s
    }

    const BUSY: Tried = Tried::Answered(StatusCode::SERVICE_UNAVAILABLE);
    const OK: Tried = Tried::Answered(StatusCode::OK);

    #[test]
    fn what_follows_a_try() {
        use Next::*;
        use Tried::*;
        let post = || Method::POST;
        let get = || Method::GET;
        let put = || Method::PUT;
        let (off, on) = (false, true);
        // (outcome, method, tries left, replayable, idempotent_after_send)
        // -> next
        let table = [
            // A refused connect sent nothing: any request goes elsewhere
            // while tries are left.
            (Refused, post(), 1, false, off, Retry),
            (Refused, get(), 0, true, on, Fail),
            // Failed before a byte was written: never reached the
            // upstream, any method goes elsewhere if its body is held.
            (NotWritten, post(), 1, true, off, Retry),
            (NotWritten, post(), 1, false, off, Fail),
            (NotWritten, get(), 0, true, on, Fail),
            // Reset or closed after bytes went out (or a malformed
            // answer): the upstream may have acted. Never a POST; an
            // idempotent request only when the policy allows it.
            (Reset, post(), 1, true, off, Fail),
            (Reset, post(), 1, true, on, Fail),
            (Reset, get(), 1, true, off, Fail),
            (Reset, put(), 1, true, on, Retry),
            (Reset, get(), 1, true, on, Retry),
            (Reset, get(), 1, false, on, Fail),
            (Reset, get(), 0, true, on, Fail),
            // A timeout: the same, and it adds load.
            (TimedOut, get(), 1, true, off, Fail),
            (TimedOut, get(), 1, true, on, Retry),
            (TimedOut, post(), 1, true, on, Fail),
            (TimedOut, get(), 1, false, on, Fail),
            (TimedOut, get(), 0, true, on, Fail),
            // The client stalled its body: nothing to try again.
            (Stalled, get(), 1, true, on, Fail),
            // An answer is retried on a listed status only, idempotent.
            (BUSY, get(), 1, true, off, Retry),
            (BUSY, post(), 1, true, on, Respond),
            (BUSY, get(), 1, false, off, Respond),
            (BUSY, get(), 0, true, off, Respond),
            (OK, get(), 1, true, on, Respond),
            (
                Answered(StatusCode::INTERNAL_SERVER_ERROR),
                get(),
                1,
                true,
                on,
                Respond,
            ),
            // A 503 from an endpoint known to be leaving: retried for an
            // idempotent request whatever on_status says (the policy here
            // lists 503, the case below is the same without it), and
            // without a budget slot.
            (TurnedAway, get(), 1, true, off, Retry),
            (TurnedAway, post(), 1, true, off, Respond),
            (TurnedAway, get(), 1, false, off, Respond),
            (TurnedAway, get(), 0, true, off, Respond),
            // Unsent came back whole: sent again, even with no try left.
            (Unsent, post(), 0, false, off, Resend),
        ];
        for (tried, method, tries_left, replayable, allow, want) in table {
            let live = Arc::new(ServiceState::default());
            let mut s = state(method.clone(), tries_left, replayable);
            let p = if allow {
                after_send(&[503])
            } else {
                policy(&[503])
            };
            let next = s.decide(tried, &p, &live, 1);
            let case = format!(
                "{tried:?} {method} tries_left={tries_left} replayable={replayable} \
                 idempotent_after_send={allow}"
            );
            assert_eq!(next, want, "{case}");
            let retries = live.retries.load(Relaxed);
            match next {
                Retry => {
                    assert_eq!(s.avoid, Some(1), "{case}");
                    assert_eq!(retries, 1, "{case}");
                    // Only retries that add load take a budget slot.
                    let adds_load = matches!(tried, TimedOut | Answered(_));
                    assert_eq!(s.budget.is_some(), adds_load, "{case}");
                }
                Resend => {
                    assert_eq!((s.tries_left, s.avoid, retries), (tries_left + 1, None, 0))
                }
                Respond | Fail => assert_eq!((s.avoid, retries), (None, 0), "{case}"),
            }
        }
    }

    #[test]
    fn a_503_from_a_leaving_endpoint_is_retried_even_when_503_is_not_a_retry_status() {
        let live = Arc::new(ServiceState::default());
        let p = policy(&[]);
        let mut s = state(Method::GET, 2, true);
        let busy = Tried::Answered(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(s.decide(busy, &p, &live, 0), Next::Respond);
        assert_eq!(s.decide(Tried::TurnedAway, &p, &live, 0), Next::Retry);
        assert!(s.budget.is_none(), "no budget slot taken");
    }

    #[test]
    fn an_unsent_request_is_sent_again_three_times_then_is_a_reset() {
        let live = Arc::new(ServiceState::default());
        let p = policy(&[]);
        let mut s = state(Method::POST, 1, true);
        for _ in 0..3 {
            assert_eq!(s.decide(Tried::Unsent, &p, &live, 0), Next::Resend);
        }
        assert_eq!(s.tries_left, 4);
        assert_eq!(s.decide(Tried::Unsent, &p, &live, 0), Next::Retry);
        s.replayable = false;
        assert_eq!(s.decide(Tried::Unsent, &p, &live, 0), Next::Fail);
    }

    #[test]
    fn retries_that_add_load_need_the_budget_once() {
        let live = Arc::new(ServiceState::default());
        // An idle service allows 3 retries in flight: take them all.
        let held: Vec<_> = (0..3).filter_map(|_| live.try_retry(20)).collect();
        assert_eq!(held.len(), 3);
        let p = after_send(&[503]);
        let mut s = state(Method::GET, 2, true);
        assert_eq!(s.decide(BUSY, &p, &live, 0), Next::Respond);
        assert_eq!(s.decide(Tried::TimedOut, &p, &live, 0), Next::Fail);
        // A refused connect adds no load: no slot needed.
        assert_eq!(s.decide(Tried::Refused, &p, &live, 0), Next::Retry);
        assert_eq!(live.retries.load(Relaxed), 1);
        drop(held);
        // A request that holds a slot keeps it for its later retries.
        assert_eq!(s.decide(BUSY, &p, &live, 0), Next::Retry);
        let _others: Vec<_> = (0..2).filter_map(|_| live.try_retry(20)).collect();
        assert!(live.try_retry(20).is_none());
        assert_eq!(s.decide(Tried::TimedOut, &p, &live, 0), Next::Retry);
        assert_eq!(live.retrying.load(Relaxed), 3);
    }

    #[test]
    fn a_try_takes_copies_while_the_body_can_be_sent_again() {
        let body = UpstreamBody::full(bytes::Bytes::from_static(b"x"));
        let mut s = RetryState::new(&Method::PUT, HeaderMap::new(), body, 2);
        s.tries_left = 1;
        assert!(s.this_try().is_some());
        assert!(s.replayable && s.body.is_some() && s.headers.is_some());
        // The last try gives the originals away.
        s.tries_left = 0;
        assert!(s.this_try().is_some());
        assert!(!s.replayable && s.body.is_none() && s.headers.is_none());
        assert!(s.this_try().is_none());
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret, host"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::HOST, HeaderValue::from_static("a.com"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["host", "x-kept"]);
    }

    #[test]
    fn each_hop_by_hop_header_alone_goes_and_others_stay() {
        for gone in ["proxy-connection", "keep-alive", "te", "connection"] {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("a.com"));
            h.insert(gone, HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, vec!["host", "x-kept"], "{gone}");
        }
        let mut clean = HeaderMap::new();
        clean.insert(header::HOST, HeaderValue::from_static("a.com"));
        strip_hop_by_hop(&mut clean, false);
        assert_eq!(clean.len(), 1);
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_headers_are_replaced_unless_trusted() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let host = HeaderValue::from_static("a.com");
        h.insert(header::FORWARDED, HeaderValue::from_static("for=10.0.0.1"));
        let mut trusted = h.clone();
        add_forwarded(
            &mut h,
            "127.0.0.2".parse().unwrap(),
            Some(&host),
            false,
            false,
        );
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.2");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "a.com");
        assert!(!h.contains_key(header::FORWARDED));
        add_forwarded(
            &mut trusted,
            "::ffff:127.0.0.3".parse().unwrap(),
            None,
            true,
            false,
        );
        assert_eq!(trusted[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.3");
        assert_eq!(trusted[&X_FORWARDED_PROTO], "https");
        assert_eq!(trusted[header::FORWARDED], "for=10.0.0.1");
    }

    #[test]
    fn an_https_redirect_keeps_the_host_and_target_and_names_the_port() {
        let uri = |s: &str| s.parse::<Uri>().expect("a URI");
        let cases = [
            (
                "a.test:8080",
                "/x?y=1",
                Some(8443),
                "https://a.test:8443/x?y=1",
            ),
            ("a.test", "/", None, "https://a.test/"),
            ("a.test:80", "/p", Some(443), "https://a.test/p"),
            ("[::1]:80", "/p", None, "https://[::1]/p"),
        ];
        for (host, target, port, want) in cases {
            assert_eq!(
                https_location(&uri(target), host, port),
                want,
                "{host}{target}"
            );
        }
    }

    #[test]
    fn strip_keeps_a_leading_slash() {
        assert_eq!(strip_path("/blog/a?x=1", "/blog"), "/a?x=1");
        assert_eq!(strip_path("/blog", "/blog"), "/");
        assert_eq!(strip_path("/blog/a", "/blog/"), "/a");
    }

    #[test]
    fn a_request_names_one_host() {
        let req = |version: Version, method: &str, target: &str, hosts: &[&str]| {
            let mut b = Request::builder()
                .method(method)
                .uri(target)
                .version(version);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).expect("a request")
        };
        let check = |mut r: Request<()>| one_authority(&mut r).map(|()| r);
        let h11 = Version::HTTP_11;
        assert!(check(req(h11, "GET", "/x", &["a.com"])).is_ok());
        assert!(check(req(Version::HTTP_10, "GET", "/x", &[])).is_ok());
        let refused = [
            req(h11, "GET", "/x", &[]),
            req(h11, "GET", "/x", &["a.com", "b.com"]),
            req(h11, "GET", "http://example.test/x", &["admin.internal"]),
            req(h11, "GET", "http://user@a.com/x", &["a.com"]),
            req(h11, "GET", "admin.internal:80", &["admin.internal"]),
            req(h11, "GET", "*", &["a.com"]),
        ];
        for r in refused {
            let shown = format!("{} {} {:?}", r.method(), r.uri(), r.headers());
            assert!(
                matches!(check(r), Err(ProxyError::BadRequest(_))),
                "{shown} is refused"
            );
        }
        assert!(check(req(h11, "GET", "http://a.com/x", &["A.com"])).is_ok());
        assert!(check(req(h11, "OPTIONS", "*", &["a.com"])).is_ok());
        // h2: the :authority is the host, and becomes Host.
        let r = check(req(
            Version::HTTP_2,
            "GET",
            "http://real.test/x",
            &["other.test"],
        ))
        .expect("h2 takes its :authority");
        assert_eq!(r.headers()[header::HOST], "real.test");
    }
}
