//! Upstream connections: one pool of idle HTTP/1.1 keep-alive connections
//! per endpoint, kept in the endpoint's live state so it survives table
//! rebuilds. A request takes a connection (or opens one) *before* it hands
//! over its body, so a failed connect can be retried on another endpoint
//! whatever the body. A connection goes back to the pool when its response
//! body is finished, unless the endpoint no longer takes new requests:
//! draining closes an endpoint's idle connections.

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crossbeam_queue::SegQueue;
use http::uri::Authority;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use pointsman_discovery::Address;
use tokio::net::TcpStream;

use super::body::UpstreamBody;

/// Idle connections kept per endpoint; more are closed when released.
pub const MAX_IDLE: usize = 256;

pub type Sender = SendRequest<UpstreamBody>;

struct Idle {
    sender: Sender,
    /// Where it goes: an endpoint re-registered at another address must
    /// not reuse it. (`Authority` clones without allocating.)
    authority: Authority,
    since: Instant,
}

/// An endpoint's idle upstream connections. Lock-free; it allocates
/// nothing until a connection is first given back (a table of 10,000
/// endpoints that take no traffic costs nothing here), then grows in small
/// blocks up to `MAX_IDLE`.
#[derive(Default)]
pub struct Pool {
    idle: SegQueue<Idle>,
    len: AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} idle)", self.idle())
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

impl Pool {
    /// An idle connection to `authority` that is still open and was idle for
    /// less than `max_idle`, if there is one.
    pub async fn take(&self, authority: &Authority, max_idle: Duration) -> Option<Sender> {
        while let Some(idle) = self.pop() {
            if idle.since.elapsed() >= max_idle || &idle.authority != authority {
                continue;
            }
            let mut sender = idle.sender;
            // The previous response is finished, so this resolves at once:
            // ready, or closed by the upstream meanwhile.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
        None
    }

    /// Gives a connection back for reuse.
    pub fn put(&self, sender: Sender, authority: Authority) {
        if sender.is_closed() {
            return;
        }
        self.push(Idle {
            sender,
            authority,
            since: Instant::now(),
        });
    }

    fn push(&self, idle: Idle) {
        // A full pool drops (closes) the connection.
        if self.len.fetch_add(1, Relaxed) >= MAX_IDLE {
            self.len.fetch_sub(1, Relaxed);
            return;
        }
        self.idle.push(idle);
    }

    fn pop(&self) -> Option<Idle> {
        let idle = self.idle.pop()?;
        self.len.fetch_sub(1, Relaxed);
        Some(idle)
    }

    /// Closes every idle connection.
    pub fn clear(&self) {
        while self.pop().is_some() {}
    }

    /// Closes idle connections older than `max_idle`.
    pub fn expire(&self, max_idle: Duration) {
        for _ in 0..self.idle() {
            match self.pop() {
                Some(idle) if idle.since.elapsed() < max_idle && !idle.sender.is_closed() => {
                    self.push(idle);
                }
                Some(_) => {}
                None => break,
            }
        }
    }

    pub fn idle(&self) -> usize {
        self.len.load(Relaxed)
    }
}

/// Opens a new HTTP/1.1 connection to `address`.
pub async fn connect(address: &Address, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = tokio::time::timeout(
        timeout,
        TcpStream::connect((address.host(), address.port())),
    )
    .await
    .map_err(|_| ConnectError::Timeout(timeout))??;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake::<_, UpstreamBody>(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection closed with an error");
        }
    });
    Ok(sender)
}
