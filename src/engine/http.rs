//! Serving one HTTP client connection, the step before each of its
//! requests goes through the phases in [`super::forward`]: tell HTTP/2
//! with prior knowledge from HTTP/1 by the first bytes, let hyper serve
//! it, park an idle HTTP/1 connection holding none of hyper's buffers, and
//! close it when a timer expires or the drain asks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::conn::{ActivityIo, ConnActivity, Expired, CLIENT_CONNS, PARK_AFTER};
use super::frontend::FrontendCounters;
use super::path::PathNormalization;
use super::tls::ClientStream;
use super::{ClientLimits, ProxyBody, SharedLimits};
use crate::engine::table::SharedTable;
use tokio_rustls::TlsAcceptor;

/// What every HTTP listener shares.
pub struct HttpProxy {
    pub table: SharedTable,
    pub limits: SharedLimits,
}

/// What one client connection's requests share; their phases are in
/// [`super::forward`].
pub(super) struct ConnContext {
    pub(super) proxy: Arc<HttpProxy>,
    pub(super) listener: Arc<str>,
    pub(super) peer: SocketAddr,
    pub(super) activity: Arc<ConnActivity>,
    /// Whether the peer is one of `trusted_proxies`.
    pub(super) trust_forwarded: bool,
    pub(super) path_normalization: PathNormalization,
    pub(super) access_log: bool,
    /// The longest wait for the next piece of a request body.
    pub(super) body_timeout: Duration,
    /// The listener's counters: every answer counts there.
    pub(super) frontend: Arc<FrontendCounters>,
    /// The client came over TLS (`X-Forwarded-Proto: https`).
    pub(super) tls: bool,
}

impl HttpProxy {
    /// Serves one client connection until it closes, goes idle, or
    /// `shutdown` asks it to finish. HTTP/2 with prior knowledge is told
    /// from HTTP/1 by its first bytes. An HTTP/1 connection that idles for
    /// [`PARK_AFTER`] drops hyper's state (its buffers) and waits for its
    /// next request holding none; hyper takes over again when it sends.
    #[allow(clippy::too_many_arguments)]
    pub async fn serve_connection(
        self: Arc<Self>,
        listener: Arc<str>,
        frontend: Arc<FrontendCounters>,
        stream: TcpStream,
        tls: Option<TlsAcceptor>,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        let _open = CLIENT_CONNS.opened();
        let _session = frontend.open_session();
        let limits = self.limits.load_full();
        let stream = match tls {
            None => ClientStream::Plain(stream),
            // The handshake is part of the head: header_read_timeout
            // bounds it.
            Some(acceptor) => {
                match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => ClientStream::Tls(Box::new(s)),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake not done within header_read_timeout");
                        return;
                    }
                }
            }
        };
        let alpn_h2 = stream.alpn_h2();
        let activity = ConnActivity::new();
        let ctx = Arc::new(ConnContext {
            proxy: self,
            listener,
            peer,
            activity: activity.clone(),
            trust_forwarded: limits.trusted_proxies.contains(peer.ip()),
            path_normalization: limits.path_normalization,
            access_log: limits.access_log,
            body_timeout: limits.body_timeout,
            frontend: frontend.clone(),
            tls: stream.is_tls(),
        });
        let svc = service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(ctx.handle(req).await) }
        });
        let mut io = ActivityIo::new(stream, activity.clone(), frontend.clone());
        let mut client = ClientConn {
            activity,
            limits,
            shutdown,
            peer,
            frontend,
        };
        // Over TLS, ALPN says which; in the clear, the first bytes do.
        let protocol = match (io.get_ref().is_tls(), alpn_h2) {
            (true, true) => Some(Protocol::Http2),
            (true, false) => Some(Protocol::Http1),
            (false, _) => client.detect(&mut io).await,
        };
        match protocol {
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

/// Makes the coming close of `io` a reset (RST, as with SO_LINGER 0): for
/// a response cut short, so that even a body that ends at close reads as
/// broken; and for a client that stopped reading, because a plain close
/// leaves the kernel holding what the client never took (up to the
/// socket's send buffer, a few MB on a fast link) and retrying its
/// delivery for minutes.
fn reset(io: &ClientIo) {
    let _ = socket2::SockRef::from(io.get_ref().tcp()).set_linger(Some(Duration::ZERO));
}

/// An HTTP/2 client stream, [`reset`] when dropped once `reset` is set:
/// hyper's HTTP/2 connection does not give its stream back as HTTP/1's
/// does.
struct H2Io {
    io: ClientIo,
    reset: Arc<AtomicBool>,
}

impl Drop for H2Io {
    fn drop(&mut self) {
        if self.reset.load(Relaxed) {
            reset(&self.io);
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
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

type ClientIo = ActivityIo<ClientStream>;

/// One client connection's timers and drain state, across the phases of
/// its life: detection, hyper serving it, parked.
struct ClientConn {
    activity: Arc<ConnActivity>,
    limits: Arc<ClientLimits>,
    shutdown: CancellationToken,
    peer: SocketAddr,
    frontend: Arc<FrontendCounters>,
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
    /// The idle timeout in force (shorter while draining), the header
    /// read timeout and the send timeout.
    fn timers(&self) -> (Duration, Duration, Duration) {
        let idle = self.activity.idle_timeout(self.limits.idle_timeout);
        (
            idle,
            self.limits.header_read_timeout,
            self.limits.body_timeout,
        )
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
            let (idle, head, send) = self.timers();
            let Ok(wait) = self.activity.check(idle, head, send) else {
                return false;
            };
            let woke = tokio::select! {
                biased;
                ready = io.get_ref().tcp().readable() => return ready.is_ok(),
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
                let (idle, head, send) = self.timers();
                match self.activity.check(idle, head, send) {
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
            let (idle, head, send) = self.timers();
            let wait = if closing {
                // hyper flushes before it closes: only the send timer
                // still runs, for a client that does not take the last
                // bytes. Looked at every `PARK_AFTER`, so that a write
                // that blocks later is seen.
                let (idle, head) = (Duration::MAX, Duration::MAX);
                let wait = self.activity.check(idle, head, send).unwrap_or_default();
                wait.min(PARK_AFTER)
            } else {
                // Not parkable now (a request is being answered): look
                // again after `PARK_AFTER`, so a busy connection's timer
                // fires at most that often.
                let wait = self.activity.check(idle, head, send).unwrap_or_default();
                wait.min(self.activity.park_in(PARK_AFTER).unwrap_or(PARK_AFTER))
            };
            let woke = tokio::select! {
                biased;
                result = &mut *conn => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %self.peer, error = %e, "client connection ended with an error");
                        // hyper answered a head it could not parse itself
                        // (431 when too large, else 400), before any
                        // request reached the proxy: count it here.
                        if e.is_parse_too_large() {
                            self.frontend.bad_request();
                            self.frontend.answered(431);
                        } else if e.is_parse() {
                            self.frontend.bad_request();
                            self.frontend.answered(400);
                        }
                    }
                    if self.activity.aborted() {
                        // A response was cut short: reset (RST), so that
                        // even a body that ends at close reads as broken.
                        if let Some(parts) = conn.into_parts() {
                            reset(&parts.io.into_inner());
                        }
                    }
                    return None;
                }
                woke = self.until(wait) => woke,
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
                Woke::Expired(Expired::Send) => {
                    // Dropping the connection drops the response body
                    // and with it the upstream request. A reset, not a
                    // close: see `reset`.
                    tracing::debug!(peer = %self.peer, "client did not read its response within body_timeout; resetting");
                    if let Some(parts) = conn.into_parts() {
                        reset(&parts.io.into_inner());
                    }
                    return None;
                }
                // Closing already: hyper ends the connection.
                _ if closing => {}
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

    /// Serves an HTTP/2 connection until it ends; the drain, or the idle
    /// timeout, sends GOAWAY.
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
        let reset_on_drop = Arc::new(AtomicBool::new(false));
        let io = H2Io {
            io,
            reset: reset_on_drop.clone(),
        };
        let mut conn = Box::pin(http.serve_connection(TokioIo::new(io), svc));
        let mut closing = false;
        loop {
            let (idle, head, send) = self.timers();
            // Looked at again within `send` at the latest: a stream that
            // opens while the connection idles would otherwise leave its
            // blocked writes to the idle or head timer.
            let wait = self
                .activity
                .check(idle, head, send)
                .unwrap_or_default()
                .min(send);
            let woke = tokio::select! {
                biased;
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %self.peer, error = %e, "client connection ended with an error");
                    }
                    return;
                }
                woke = self.until(wait) => woke,
            };
            match woke {
                // hyper closes once the client acknowledges the PING sent
                // with the GOAWAY and its streams are done; a client that
                // never does would hold the connection, and a drain, until
                // it leaves: it gets one more idle timeout (the GOAWAY was
                // the last byte to move).
                Woke::Expired(Expired::Idle) if closing => {
                    tracing::debug!(peer = %self.peer, "GOAWAY not acknowledged within idle_timeout; closing");
                    return;
                }
                Woke::Drain if closing => {}
                Woke::Drain | Woke::Expired(Expired::Idle) => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                Woke::Expired(Expired::Head) => return,
                Woke::Expired(Expired::Send) => {
                    // A reset, not a close: see `reset`.
                    tracing::debug!(peer = %self.peer, "client did not read its responses within body_timeout; resetting");
                    reset_on_drop.store(true, Relaxed);
                    return;
                }
                Woke::Serve => {}
            }
        }
    }
}
