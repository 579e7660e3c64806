//! The TCP engine (HAProxy's `mode tcp`): one endpoint per client
//! connection, chosen by the service's balancer, then bytes copied both ways
//! until each side has closed (a half-close is passed on, not treated as
//! the end). What goes wrong goes wrong for every connection alike (an
//! endpoint down, a service gone): its warnings are said once per
//! [`QUIET_EVERY`] per endpoint or service, with how many were held back.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::engine::balance::PickContext;
use crate::engine::conn::now_ms;
use crate::engine::frontend::{FrontendCounters, Session};
use crate::engine::pool::Traffic;
use crate::engine::quiet::{Quiet, QUIET_EVERY};
use crate::engine::table::SharedTable;

/// "the listener's service is not registered" (a config mistake, repeated
/// on every connection until it is fixed).
static UNREGISTERED: Quiet = Quiet::new();

/// Connect attempts on distinct endpoints before a client is turned away.
const CONNECT_ATTEMPTS: usize = 3;

/// Serves one client connection of listener `listener`, counted in its
/// `session`.
pub async fn serve_connection(
    table: SharedTable,
    listener: Arc<str>,
    session: Session,
    client: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let _open = super::conn::CLIENT_CONNS.opened();
    let service = {
        let table = table.load();
        table
            .defaults
            .get(&listener)
            .and_then(|name| table.service(name))
            .cloned()
    };
    let Some(service) = service else {
        if let Some(held) = UNREGISTERED.allow(now_ms(), QUIET_EVERY) {
            tracing::warn!(%listener, %peer, repeats = held, "tcp listener's service is not registered; closing the connection (said at most every {QUIET_EVERY:?}; repeats: times held back since)");
        }
        return;
    };
    let mut avoid = None;
    for _ in 0..CONNECT_ATTEMPTS.min(service.endpoints.len().max(1)) {
        let ctx = PickContext {
            client_ip: Some(peer.ip()),
            sticky: None,
            avoid,
        };
        let Some(pick) = service.balancer.pick(&service.endpoints, &ctx) else {
            let gate = &service.settings.live.no_endpoint_warning;
            if let Some(held) = gate.allow(now_ms(), QUIET_EVERY) {
                tracing::warn!(service = %service.name, %peer, repeats = held, "no endpoint accepts traffic; closing the connection (said at most every {QUIET_EVERY:?} per service; repeats: times held back since)");
            }
            return;
        };
        let endpoint = &service.endpoints[pick.index];
        let target = (endpoint.address.host(), endpoint.address.port());
        let connected =
            tokio::time::timeout(service.settings.connect_timeout, TcpStream::connect(target))
                .await;
        let mut upstream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                endpoint.live.record_failure();
                endpoint.live.connect_failed();
                if let Some(held) = endpoint.live.failure_warning.allow(now_ms(), QUIET_EVERY) {
                    tracing::warn!(endpoint = %endpoint.address, error = %e, repeats = held, "tcp connect failed; trying another endpoint (said at most every {QUIET_EVERY:?} per endpoint; repeats: times held back since)");
                }
                avoid = Some(pick.index);
                continue;
            }
            Err(_) => {
                endpoint.live.record_failure();
                endpoint.live.connect_failed();
                if let Some(held) = endpoint.live.failure_warning.allow(now_ms(), QUIET_EVERY) {
                    tracing::warn!(endpoint = %endpoint.address, repeats = held, "tcp connect timed out; trying another endpoint (said at most every {QUIET_EVERY:?} per endpoint; repeats: times held back since)");
                }
                avoid = Some(pick.index);
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        let _in_flight = endpoint.live.start_request();
        let mut client = CountedClient {
            inner: client,
            frontend: session.counters().clone(),
            traffic: endpoint.live.traffic.clone(),
        };
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok(_) => endpoint.live.record_status(200),
            Err(e) => {
                tracing::debug!(endpoint = %endpoint.address, error = %e, "tcp session ended with an error");
                endpoint.live.record_failure();
            }
        }
        drop(permit);
        return;
    }
}

/// The client side of a TCP session, counting its bytes as they move: in
/// the listener's `bin`/`bout`, and (the same bytes, relayed) in the
/// endpoint's.
struct CountedClient {
    inner: TcpStream,
    frontend: Arc<FrontendCounters>,
    traffic: Arc<Traffic>,
}

impl AsyncRead for CountedClient {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.frontend.received(n);
            this.traffic.add(n as u64, 0);
        }
        r
    }
}

impl AsyncWrite for CountedClient {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.frontend.sent(n);
            this.traffic.add(0, n as u64);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
