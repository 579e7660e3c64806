//! Client connections: accepting under a connection limit, and knowing when
//! a keep-alive connection has been idle long enough to close. hyper bounds
//! the time to read a request head but not the idle wait between requests,
//! so each connection records its last byte and its requests in flight.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds on the process's monotonic clock.
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// When a connection last moved a byte, and how many of its requests are
/// still being answered.
#[derive(Debug)]
pub struct ConnActivity {
    last: AtomicU64,
    active: AtomicU32,
}

impl ConnActivity {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnActivity {
            last: AtomicU64::new(now_ms()),
            active: AtomicU32::new(0),
        })
    }

    #[inline]
    fn touch(&self) {
        self.last.store(now_ms(), Relaxed);
    }

    /// Counts a request on this connection until the guard drops.
    pub fn start(self: &Arc<Self>) -> ConnActive {
        self.active.fetch_add(1, Relaxed);
        ConnActive(self.clone())
    }

    /// How long until this connection counts as idle for `limit`; `None`
    /// once it is idle now.
    pub fn idle_deadline(&self, limit: Duration) -> Option<Duration> {
        if self.active.load(Relaxed) > 0 {
            return Some(limit);
        }
        let idle = Duration::from_millis(now_ms().saturating_sub(self.last.load(Relaxed)));
        limit.checked_sub(idle).filter(|d| !d.is_zero())
    }
}

/// A request being answered on a client connection.
#[derive(Debug)]
pub struct ConnActive(Arc<ConnActivity>);

impl Drop for ConnActive {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// A stream that records its activity.
pub struct ActivityIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, activity: Arc<ConnActivity>) -> Self {
        ActivityIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
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

/// Accepts connections until `shutdown`, holding one permit of `limit` per
/// open connection; when the limit is reached new clients wait in the
/// kernel's backlog, as with HAProxy's maxconn.
pub async fn accept_loop<F>(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
    mut serve: F,
) where
    F: FnMut(TcpStream, std::net::SocketAddr, OwnedSemaphorePermit),
{
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
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
