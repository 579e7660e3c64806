//! Client connections: accepting under a connection limit, and the two
//! timers of a keep-alive connection. `header_read_timeout` runs from the
//! connection's start, or from the first byte after an idle spell, until a
//! request head is complete (the slowloris guard); `idle_timeout` runs while
//! no request is active and no byte moves. hyper's own header timer also
//! covers the idle wait between requests, so it is off and each connection
//! records its last byte, when it began waiting for a head, and its
//! requests in flight. A third timer, `body_timeout`, covers a client that
//! stops reading its response: a write that found the client's socket
//! full for that long, while a response is being sent or after it ended
//! with its last bytes still waiting, cuts the connection (and so aborts
//! the upstream request behind it).
//!
//! An HTTP/1 connection that stays idle for [`PARK_AFTER`] gives its
//! buffers back (see `HttpProxy::serve_connection`): [`ConnActivity::park_in`]
//! says when that is safe.
//!
//! Draining (on shutdown, or when a successor process has taken the
//! listening sockets over) is race-free for keep-alive clients: an HTTP/1
//! connection is never closed at the moment a client may be sending on it.
//! Responses written while draining carry `Connection: close`, so a busy
//! connection ends after its next response, and an idle one is closed only
//! after it stayed idle for [`DRAIN_IDLE_GRACE`] (at most `idle_timeout`)
//! since the drain began. HTTP/2 connections get a GOAWAY at once.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::header::{HeaderValue, CONNECTION};
use http::{Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::engine::frontend::FrontendCounters;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds on the process's monotonic clock.
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// The process's client connections, for `/metrics` and `show info`.
#[derive(Debug)]
pub struct ClientConns {
    open: AtomicUsize,
    parked: AtomicUsize,
    total: AtomicU64,
}

/// Every client connection of this process, HTTP and TCP.
pub static CLIENT_CONNS: ClientConns = ClientConns {
    open: AtomicUsize::new(0),
    parked: AtomicUsize::new(0),
    total: AtomicU64::new(0),
};

/// Counts a connection as open (or parked) until dropped.
#[derive(Debug)]
pub struct Counted(&'static AtomicUsize);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl ClientConns {
    /// A client connection was accepted.
    pub fn opened(&'static self) -> Counted {
        self.total.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
        Counted(&self.open)
    }

    /// A connection waits for its next request without HTTP state.
    pub fn parked(&'static self) -> Counted {
        self.parked.fetch_add(1, Relaxed);
        Counted(&self.parked)
    }

    /// Open now, parked now, accepted since start.
    pub fn snapshot(&self) -> (usize, usize, u64) {
        (
            self.open.load(Relaxed),
            self.parked.load(Relaxed),
            self.total.load(Relaxed),
        )
    }
}

/// When a connection last moved a byte, and how many of its requests are
/// still being answered.
#[derive(Debug)]
pub struct ConnActivity {
    last: AtomicU64,
    active: AtomicU32,
    /// When the connection began waiting for the rest of a request head
    /// (ms on the process clock); 0 when it is not.
    head_since: AtomicU64,
    /// The process is draining: answers carry `Connection: close`.
    draining: AtomicBool,
    /// Since when (ms on the process clock) writes find the client's
    /// socket full, so bytes may still wait in the HTTP engine's buffer;
    /// 0 when the last write went through.
    write_blocked_since: AtomicU64,
    /// A response body failed halfway (the upstream's ended early): the
    /// connection is reset, not closed, so the client cannot take the
    /// response for complete.
    aborted: AtomicBool,
}

/// How long an HTTP/1 connection with no request in progress and no byte
/// moving keeps its HTTP state (hyper's read and write buffers, about
/// 16 KiB); after that it waits for its next request holding none, as
/// nginx's idle keep-alive connections do.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// How long an idle HTTP/1 keep-alive connection stays open once a drain
/// began (capped by `idle_timeout`): a client that sends on it in that time
/// is answered, with `Connection: close`, instead of finding it closed.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(2);

/// Why a connection should be closed now.
#[derive(Debug, PartialEq, Eq)]
pub enum Expired {
    /// A request head took longer than `header_read_timeout`.
    Head,
    /// No request and no byte for `idle_timeout`.
    Idle,
    /// The client has not read its response for `body_timeout`.
    Send,
}

impl ConnActivity {
    pub fn new() -> Arc<Self> {
        let now = now_ms();
        Arc::new(ConnActivity {
            last: AtomicU64::new(now),
            active: AtomicU32::new(0),
            // A new connection owes its first request head.
            head_since: AtomicU64::new(now.max(1)),
            draining: AtomicBool::new(false),
            write_blocked_since: AtomicU64::new(0),
            aborted: AtomicBool::new(false),
        })
    }

    /// The drain began: from now on answers close the connection, and the
    /// idle timer (see [`ConnActivity::idle_timeout`]) starts afresh.
    pub fn begin_drain(&self) {
        self.draining.store(true, Relaxed);
        self.touch();
    }

    /// The idle timeout in force: `idle`, or while draining the shorter
    /// [`DRAIN_IDLE_GRACE`].
    pub fn idle_timeout(&self, idle: Duration) -> Duration {
        if self.draining.load(Relaxed) {
            idle.min(DRAIN_IDLE_GRACE)
        } else {
            idle
        }
    }

    /// Is the process draining?
    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// How long until an idle HTTP/1 connection may drop its HTTP state
    /// (zero: now), or `None` while that is not safe: a request is being
    /// answered or its head has begun to arrive, the last write is still
    /// waiting for the client to read, or the process drains (the idle
    /// grace closes the connection soon anyway).
    pub fn park_in(&self, after: Duration) -> Option<Duration> {
        if self.active.load(Relaxed) > 0
            || self.head_since.load(Relaxed) != 0
            || self.write_blocked_since.load(Relaxed) != 0
            || self.draining.load(Relaxed)
        {
            return None;
        }
        let idle_for = now_ms().saturating_sub(self.last.load(Relaxed));
        Some(after.saturating_sub(Duration::from_millis(idle_for)))
    }

    /// While draining, an HTTP/1 answer tells the client to close the
    /// connection after it, so the client never sends on a connection that
    /// is about to close. A `101` keeps its upgrade.
    pub fn mark_response<B>(&self, version: Version, resp: &mut Response<B>) {
        if self.draining.load(Relaxed)
            && version < Version::HTTP_2
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }

    #[inline]
    fn touch(&self) {
        self.last.store(now_ms(), Relaxed);
    }

    /// A write returned: bytes moved, or the client's socket is full.
    #[inline]
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) => {
                if *n > 0 {
                    self.touch();
                }
                self.write_blocked_since.store(0, Relaxed);
            }
            Poll::Pending => {
                if self.write_blocked_since.load(Relaxed) == 0 {
                    self.write_blocked_since.store(now_ms().max(1), Relaxed);
                }
            }
            Poll::Ready(Err(_)) => {}
        }
    }

    /// Bytes arrived: with no request active they begin a request head.
    #[inline]
    fn read_some(&self) {
        let now = now_ms();
        self.last.store(now, Relaxed);
        if self.active.load(Relaxed) == 0 && self.head_since.load(Relaxed) == 0 {
            self.head_since.store(now.max(1), Relaxed);
        }
    }

    /// Counts a request on this connection until the guard drops; its head
    /// is complete.
    pub fn start(self: &Arc<Self>) -> ConnActive {
        self.active.fetch_add(1, Relaxed);
        self.head_since.store(0, Relaxed);
        ConnActive(self.clone())
    }

    /// Was a response body on this connection cut short?
    pub fn aborted(&self) -> bool {
        self.aborted.load(Relaxed)
    }

    /// Time until one of the timers may expire, or which one has.
    pub fn check(
        &self,
        idle: Duration,
        head: Duration,
        send: Duration,
    ) -> Result<Duration, Expired> {
        let now = now_ms();
        let since = |t: u64| Duration::from_millis(now.saturating_sub(t));
        // A write the client's socket refuses counts whether a request is
        // still being answered or its last bytes wait unsent after it
        // ended (the idle timer would hold them for `idle` or, once hyper
        // closes gracefully and flushes first, for ever).
        let blocked = self.write_blocked_since.load(Relaxed);
        let send_left = match blocked {
            0 => send,
            _ => match send.checked_sub(since(blocked)).filter(|d| !d.is_zero()) {
                Some(left) => left,
                None => return Err(Expired::Send),
            },
        };
        if self.active.load(Relaxed) > 0 {
            return Ok(idle.min(head).min(send_left));
        }
        let mut wait = if blocked == 0 {
            idle
        } else {
            idle.min(send_left)
        };
        let head_since = self.head_since.load(Relaxed);
        if head_since != 0 {
            match head.checked_sub(since(head_since)).filter(|d| !d.is_zero()) {
                Some(left) => wait = wait.min(left),
                None => return Err(Expired::Head),
            }
        }
        match idle
            .checked_sub(since(self.last.load(Relaxed)))
            .filter(|d| !d.is_zero())
        {
            Some(left) => Ok(wait.min(left)),
            None => Err(Expired::Idle),
        }
    }
}

/// A request being answered on a client connection.
#[derive(Debug)]
pub struct ConnActive(Arc<ConnActivity>);

impl ConnActive {
    /// The response cannot end well: reset the connection when it ends.
    pub fn abort(&self) {
        self.0.aborted.store(true, Relaxed);
    }
}

impl Drop for ConnActive {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// A client stream that records its activity, and counts its bytes in its
/// listener's `bin` and `bout`. Bytes already read from it (by protocol
/// detection, or left in a parked connection's buffer) are given back
/// first, and counted once, when the socket gave them.
pub struct ActivityIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
    unread: Bytes,
    frontend: Arc<FrontendCounters>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, activity: Arc<ConnActivity>, frontend: Arc<FrontendCounters>) -> Self {
        ActivityIo {
            inner,
            activity,
            unread: Bytes::new(),
            frontend,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Hands back bytes read from the socket before: they are read first.
    /// Each hand-back follows a reader that took every byte handed back
    /// before (hyper's first read has room for the 1 KiB detection read).
    pub fn unread(&mut self, bytes: Bytes) {
        debug_assert!(self.unread.is_empty(), "bytes handed back twice");
        self.unread = bytes;
    }

    /// Are there bytes to read that were read from the socket before?
    pub fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }
}

/// The two reads below go to the socket itself: for a plain TCP client
/// only (a TLS one's bytes are records, not the request).
impl ActivityIo<crate::engine::tls::ClientStream> {
    /// Reads what the socket holds into `buf` with a plain `recv`, even
    /// before the event loop has reported the socket readable. Only for a
    /// first attempt: its `WouldBlock` does not reset tokio's readiness, so
    /// waiting on `readable` afterwards is still correct.
    pub fn read_now(&mut self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        use std::io::Read;
        let start = buf.len();
        buf.resize(buf.capacity().max(start + 1), 0);
        let socket = socket2::SockRef::from(self.inner.tcp());
        let r = (&*socket).read(&mut buf[start..]);
        buf.truncate(start + r.as_ref().map_or(0, |n| *n));
        if let Ok(n @ 1..) = r {
            self.activity.read_some();
            self.frontend.received(n);
        }
        r
    }

    /// Reads what the socket holds into `buf` without waiting.
    pub fn try_read_buf(&mut self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        let n = self.inner.tcp().try_read_buf(buf)?;
        if n > 0 {
            self.activity.read_some();
            self.frontend.received(n);
        }
        Ok(n)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            this.unread.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read_some();
            this.frontend.received(buf.filled().len() - before);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity.wrote(&r);
        if let Poll::Ready(Ok(n)) = r {
            this.frontend.sent(n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity.wrote(&r);
        if let Poll::Ready(Ok(n)) = r {
            this.frontend.sent(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The connection limit shared by every accept loop: one permit per open
/// client connection. Lowering it forgets free permits at once and owes
/// the rest; an accept loop that gets a permit while some are owed pays the
/// debt with it instead of accepting.
#[derive(Debug)]
pub struct ConnLimit {
    permits: Arc<Semaphore>,
    owed: AtomicUsize,
}

impl ConnLimit {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnLimit {
            permits: Arc::new(Semaphore::new(0)),
            owed: AtomicUsize::new(0),
        })
    }

    /// Changes the limit from `old` to `new`.
    pub fn resize(&self, old: usize, new: usize) {
        if new > old {
            let mut more = new - old;
            // Cancel what is still owed before adding permits.
            while more > 0 {
                let owed = self.owed.load(Relaxed);
                if owed == 0 {
                    break;
                }
                let paid = owed.min(more);
                if self
                    .owed
                    .compare_exchange(owed, owed - paid, Relaxed, Relaxed)
                    .is_ok()
                {
                    more -= paid;
                }
            }
            self.permits.add_permits(more);
        } else if new < old {
            let forgotten = self.permits.forget_permits(old - new);
            self.owed.fetch_add(old - new - forgotten, Relaxed);
        }
    }

    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        loop {
            let permit = self.permits.clone().acquire_owned().await.ok()?;
            let owed = self.owed.load(Relaxed);
            if owed > 0
                && self
                    .owed
                    .compare_exchange(owed, owed - 1, Relaxed, Relaxed)
                    .is_ok()
            {
                permit.forget();
                continue;
            }
            return Some(permit);
        }
    }
}

/// Accepts connections until `shutdown`, holding one permit of `limit` per
/// open connection; when the limit is reached, each accept loop holds one
/// new client until a slot frees and the rest wait in the kernel's backlog,
/// as with HAProxy's maxconn.
pub async fn accept_loop<F>(
    listener: TcpListener,
    limit: Arc<ConnLimit>,
    shutdown: CancellationToken,
    mut serve: F,
) where
    F: FnMut(TcpStream, std::net::SocketAddr, OwnedSemaphorePermit),
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Over the limit, the connection waits here for a slot
                // (and the next clients of this socket in the backlog):
                // any slot freed on any thread serves a waiting client.
                // It was accepted, so it is served even when a drain begins
                // meanwhile (the drain frees slots); dropping it would
                // reset it.
                let Some(permit) = limit.acquire().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                serve(stream, peer, permit);
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly
                // instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_parks_only_when_nothing_is_in_progress() {
        let a = ConnActivity::new();
        // A new connection owes its first head.
        assert_eq!(a.park_in(PARK_AFTER), None);
        let req = a.start();
        assert_eq!(a.park_in(PARK_AFTER), None, "a request is being answered");
        drop(req);
        let left = a.park_in(PARK_AFTER).expect("idle after its answer");
        assert!(left > Duration::ZERO && left <= PARK_AFTER, "{left:?}");
        assert_eq!(a.park_in(Duration::ZERO), Some(Duration::ZERO));
        // Bytes of the next head arrived.
        a.read_some();
        assert_eq!(a.park_in(Duration::ZERO), None, "a head has begun");
        drop(a.start());
        // The client's socket was full on the last write.
        a.wrote(&Poll::Pending);
        assert_eq!(a.park_in(Duration::ZERO), None, "bytes wait to be written");
        a.wrote(&Poll::Ready(Ok(10)));
        assert_eq!(a.park_in(Duration::ZERO), Some(Duration::ZERO));
        a.begin_drain();
        assert_eq!(a.park_in(Duration::ZERO), None, "a drain closes it instead");
    }

    #[test]
    fn a_client_that_stops_reading_expires_the_send_timer() {
        let a = ConnActivity::new();
        let (idle, head) = (Duration::from_secs(60), Duration::from_secs(10));
        let req = a.start();
        let send = Duration::from_secs(5);
        assert_eq!(a.check(idle, head, send), Ok(send), "nothing blocked");
        a.wrote(&Poll::Pending);
        let left = a.check(idle, head, send).expect("blocked just now");
        assert!(left <= send && left > Duration::ZERO, "{left:?}");
        // Blocked for longer than a short send timeout.
        std::thread::sleep(Duration::from_millis(3));
        let short = Duration::from_millis(1);
        assert_eq!(a.check(idle, head, short), Err(Expired::Send));
        // A write that goes through clears it.
        a.wrote(&Poll::Ready(Ok(1)));
        assert_eq!(a.check(idle, head, send), Ok(send));
        drop(req);
    }

    #[test]
    fn last_bytes_left_unsent_after_the_response_expire_the_send_timer() {
        let a = ConnActivity::new();
        let (idle, head) = (Duration::from_secs(60), Duration::from_secs(10));
        drop(a.start());
        // The response ended, its last bytes did not fit.
        a.wrote(&Poll::Pending);
        let send = Duration::from_secs(5);
        let left = a.check(idle, head, send).expect("blocked just now");
        assert!(left <= send && left > Duration::ZERO, "{left:?}");
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(
            a.check(idle, head, Duration::from_millis(1)),
            Err(Expired::Send),
            "not held until the idle timeout"
        );
        a.wrote(&Poll::Ready(Ok(1)));
        let left = a.check(idle, head, send).expect("the bytes went out");
        assert!(left > send, "only the idle timer runs: {left:?}");
    }
}
