//! Request bodies on their way upstream. A body that is empty, or small
//! enough to hold (up to the service's replay limit), is read before the
//! request is sent and can be sent again on a retry; a larger one streams
//! through with bounded memory and cannot be replayed once sent.
//!
//! Either way the client has `body_timeout` between two pieces of its
//! body: a body that stalls while held ends the request with 408 before
//! anything went upstream; one that stalls while streaming fails with
//! [`BodyError::Stalled`], which aborts the upstream request. The timer
//! is the body's own (`Sleep` lives inside it, no task or allocation per
//! request) and runs only while the body waits on the client.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// Why a request body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the client's request body failed: {0}")]
    Client(#[from] hyper::Error),
    #[error("the client sent no byte of its request body for {0:?} (body_timeout)")]
    Stalled(Duration),
}

pin_project_lite::pin_project! {
    /// The body of a request sent upstream.
    #[project = BodyProj]
    pub enum UpstreamBody {
        /// Held whole: replayable.
        Full { bytes: Option<Bytes> },
        /// Already-read bytes, then the rest of the client's body; `idle`
        /// is the longest wait for the client's next piece, and `stall`
        /// runs while `waiting` on it.
        Stream {
            head: Option<Bytes>,
            rest: Incoming,
            idle: Duration,
            #[pin]
            stall: Sleep,
            waiting: bool,
        },
    }
}

impl UpstreamBody {
    pub fn empty() -> Self {
        UpstreamBody::Full { bytes: None }
    }

    pub fn full(bytes: Bytes) -> Self {
        UpstreamBody::Full {
            bytes: Some(bytes).filter(|b| !b.is_empty()),
        }
    }

    fn stream(head: Option<Bytes>, rest: Incoming, idle: Duration) -> Self {
        UpstreamBody::Stream {
            head,
            rest,
            idle,
            stall: tokio::time::sleep(idle),
            waiting: false,
        }
    }

    /// A copy for another attempt, when the body was held whole.
    pub fn replay(&self) -> Option<UpstreamBody> {
        match self {
            UpstreamBody::Full { bytes } => Some(UpstreamBody::Full {
                bytes: bytes.clone(),
            }),
            UpstreamBody::Stream { .. } => None,
        }
    }

    /// Reads the client's body up to `limit` bytes: whole if it fits,
    /// otherwise what was read so far plus the rest as a stream. The
    /// client has `idle` for each piece.
    pub async fn read(
        mut body: Incoming,
        limit: usize,
        idle: Duration,
    ) -> Result<UpstreamBody, BodyError> {
        if body.is_end_stream() {
            return Ok(UpstreamBody::empty());
        }
        // A declared length over the limit streams straight away.
        if body.size_hint().lower() > limit as u64 {
            return Ok(UpstreamBody::stream(None, body, idle));
        }
        let mut buf = BytesMut::new();
        loop {
            let frame = tokio::time::timeout(idle, body.frame())
                .await
                .map_err(|_| BodyError::Stalled(idle))?;
            match frame {
                None => return Ok(UpstreamBody::full(buf.freeze())),
                Some(frame) => {
                    // Trailers are dropped: HTTP/1.1 upstreams rarely take them.
                    if let Ok(data) = frame?.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() > limit {
                        return Ok(UpstreamBody::stream(Some(buf.freeze()), body, idle));
                    }
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            BodyProj::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            BodyProj::Stream {
                head,
                rest,
                idle,
                mut stall,
                waiting,
            } => {
                if let Some(h) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(h))));
                }
                match Pin::new(rest).poll_frame(cx) {
                    Poll::Ready(frame) => {
                        *waiting = false;
                        Poll::Ready(frame.map(|f| f.map_err(BodyError::Client)))
                    }
                    Poll::Pending => {
                        // The timer runs from when the body began to wait
                        // on the client, not while the upstream is slow
                        // to take what it has.
                        if !*waiting {
                            *waiting = true;
                            stall.as_mut().reset(Instant::now() + *idle);
                        }
                        match stall.poll(cx) {
                            Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Stalled(*idle)))),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full { bytes } => bytes.is_none(),
            UpstreamBody::Stream { head, rest, .. } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            UpstreamBody::Stream { head, rest, .. } => {
                let h = head.as_ref().map_or(0, |b| b.len() as u64);
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + h);
                if let Some(u) = r.upper() {
                    hint.set_upper(u + h);
                }
                hint
            }
        }
    }
}
