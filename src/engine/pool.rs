//! Upstream connections: one pool of idle HTTP/1.1 keep-alive connections
//! per endpoint, kept in the endpoint's live state so it survives table
//! rebuilds. A request takes a connection (or opens one) *before* it hands
//! over its body, so a failed connect can be retried on another endpoint
//! whatever the body. A connection goes back to the pool when its response
//! body is finished, unless the endpoint no longer takes new requests:
//! draining closes an endpoint's idle connections.
//!
//! With several worker threads each keeps its own idle connections per
//! endpoint: a connection's I/O is driven by the event loop that opened
//! it, and a request served on another thread would wake that loop (and
//! be woken by it) across threads on every exchange.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use http::uri::Authority;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use pointsman_discovery::Address;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::UpstreamBody;

/// Idle connections kept per endpoint and worker thread; more are closed
/// when released.
pub const MAX_IDLE: usize = 256;

pub type Sender = SendRequest<UpstreamBody>;

/// An upstream connection: hyper's sender, and how many bytes the socket
/// took so far. A request that failed with the count unchanged provably
/// never reached the upstream, so any request may go elsewhere; once a
/// byte went out, only what the retry policy allows after a send.
pub struct Conn {
    pub sender: Sender,
    written: Arc<AtomicU64>,
}

impl Conn {
    /// Bytes written to the socket since it was opened.
    pub fn written(&self) -> u64 {
        self.written.load(Relaxed)
    }
}

/// How many worker threads share the pools (set once at start).
static THREADS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread's share of every pool (0 outside the worker threads).
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Sets how many worker threads serve requests; call it before the
/// first request.
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), Relaxed);
}

/// The most idle connections an endpoint keeps, all threads together.
pub fn max_idle() -> usize {
    MAX_IDLE * THREADS.load(Relaxed)
}

/// Makes this thread worker `i` (of [`set_threads`]'s count).
pub fn enter_thread(i: usize) {
    SHARD.with(|s| s.set(i));
}

struct Idle {
    conn: Conn,
    /// Where it goes: an endpoint re-registered at another address must
    /// not reuse it. (`Authority` clones without allocating.)
    authority: Authority,
    since: Instant,
}

/// One thread's idle connections to an endpoint.
#[derive(Default)]
struct Shard {
    idle: SegQueue<Idle>,
    len: AtomicUsize,
}

/// An endpoint's idle upstream connections. Lock-free; it allocates
/// nothing until a connection is first given back (a table of 10,000
/// endpoints that take no traffic costs nothing here), then grows in small
/// blocks up to `MAX_IDLE` per thread.
#[derive(Default)]
pub struct Pool {
    shards: OnceLock<Box<[Shard]>>,
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
    /// An idle connection to `authority`, opened by this thread, that is
    /// still open and was idle for less than `max_idle`, if there is one.
    pub async fn take(&self, authority: &Authority, max_idle: Duration) -> Option<Conn> {
        let shard = self.mine()?;
        while let Some(idle) = shard.pop() {
            if idle.since.elapsed() >= max_idle || &idle.authority != authority {
                continue;
            }
            let mut conn = idle.conn;
            // The previous response is finished, so this resolves at once:
            // ready, or closed by the upstream meanwhile.
            if conn.sender.ready().await.is_ok() {
                return Some(conn);
            }
        }
        None
    }

    /// Gives a connection back for reuse by this thread.
    pub fn put(&self, conn: Conn, authority: Authority) {
        if conn.sender.is_closed() {
            return;
        }
        let shards = self.shards.get_or_init(|| {
            (0..THREADS.load(Relaxed))
                .map(|_| Shard::default())
                .collect()
        });
        let i = SHARD.with(Cell::get);
        shards[i % shards.len()].push(Idle {
            conn,
            authority,
            since: Instant::now(),
        });
    }

    /// This thread's share, if any connection was ever given back.
    fn mine(&self) -> Option<&Shard> {
        let shards = self.shards.get()?;
        let i = SHARD.with(Cell::get);
        shards.get(i % shards.len())
    }

    fn all(&self) -> &[Shard] {
        self.shards.get().map(|s| &s[..]).unwrap_or_default()
    }

    /// Closes every idle connection.
    pub fn clear(&self) {
        for shard in self.all() {
            while shard.pop().is_some() {}
        }
    }

    /// Closes idle connections older than `max_idle`.
    pub fn expire(&self, max_idle: Duration) {
        for shard in self.all() {
            for _ in 0..shard.len.load(Relaxed) {
                match shard.pop() {
                    Some(idle)
                        if idle.since.elapsed() < max_idle && !idle.conn.sender.is_closed() =>
                    {
                        shard.push(idle);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }

    /// Idle connections, all threads together.
    pub fn idle(&self) -> usize {
        self.all().iter().map(|s| s.len.load(Relaxed)).sum()
    }
}

impl Shard {
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
}

/// Bytes an endpoint's connections moved, all of them together: what the
/// proxy sent (requests) and read (responses).
#[derive(Debug, Default)]
pub struct Traffic {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Traffic {
    pub fn sent(&self) -> u64 {
        self.sent.load(Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Relaxed)
    }

    /// Counts bytes moved outside a pooled connection (a TCP session).
    pub fn add(&self, sent: u64, received: u64) {
        self.sent.fetch_add(sent, Relaxed);
        self.received.fetch_add(received, Relaxed);
    }

    pub fn clear(&self) {
        self.sent.store(0, Relaxed);
        self.received.store(0, Relaxed);
    }
}

/// Opens a new HTTP/1.1 connection to `address`; its bytes count in
/// `traffic` when given (a health check's do not).
pub async fn connect(
    address: &Address,
    timeout: Duration,
    traffic: Option<&Arc<Traffic>>,
) -> Result<Conn, ConnectError> {
    let stream = tokio::time::timeout(
        timeout,
        TcpStream::connect((address.host(), address.port())),
    )
    .await
    .map_err(|_| ConnectError::Timeout(timeout))??;
    let _ = stream.set_nodelay(true);
    let written = Arc::new(AtomicU64::new(0));
    let io = CountingIo {
        inner: stream,
        written: written.clone(),
        traffic: traffic.cloned(),
    };
    let (sender, conn) = http1::Builder::new()
        .handshake::<_, UpstreamBody>(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection closed with an error");
        }
    });
    Ok(Conn { sender, written })
}

/// An upstream socket that counts the bytes it took, and the bytes both
/// ways in its endpoint's [`Traffic`].
struct CountingIo {
    inner: TcpStream,
    written: Arc<AtomicU64>,
    traffic: Option<Arc<Traffic>>,
}

impl CountingIo {
    fn count(&self, r: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(*n as u64, Relaxed);
            if let Some(t) = &self.traffic {
                t.sent.fetch_add(*n as u64, Relaxed);
            }
        }
    }
}

impl AsyncRead for CountingIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(t) = &this.traffic {
            let n = buf.filled().len() - before;
            if n > 0 {
                t.received.fetch_add(n as u64, Relaxed);
            }
        }
        r
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.count(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.count(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
