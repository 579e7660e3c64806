//! Request bodies on their way upstream. A body that is empty, or small
//! enough to hold (up to the service's replay limit), is read before the
//! request is sent and can be sent again on a retry; a larger one streams
//! through with bounded memory and cannot be replayed once sent.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The body of a request sent upstream.
pub enum UpstreamBody {
    /// Held whole: replayable.
    Full(Option<Bytes>),
    /// Already-read bytes, then the rest of the client's body.
    Stream { head: Option<Bytes>, rest: Incoming },
}

impl UpstreamBody {
    pub fn empty() -> Self {
        UpstreamBody::Full(None)
    }

    /// A copy for another attempt, when the body was held whole.
    pub fn replay(&self) -> Option<UpstreamBody> {
        match self {
            UpstreamBody::Full(b) => Some(UpstreamBody::Full(b.clone())),
            UpstreamBody::Stream { .. } => None,
        }
    }

    /// Reads the client's body up to `limit` bytes: whole if it fits,
    /// otherwise what was read so far plus the rest as a stream.
    pub async fn read(mut body: Incoming, limit: usize) -> Result<UpstreamBody, hyper::Error> {
        if body.is_end_stream() {
            return Ok(UpstreamBody::empty());
        }
        // A declared length over the limit streams straight away.
        if body.size_hint().lower() > limit as u64 {
            return Ok(UpstreamBody::Stream {
                head: None,
                rest: body,
            });
        }
        let mut buf = BytesMut::new();
        loop {
            match body.frame().await {
                None => {
                    return Ok(UpstreamBody::Full(
                        Some(buf.freeze()).filter(|b| !b.is_empty()),
                    ))
                }
                Some(frame) => {
                    // Trailers are dropped: HTTP/1.1 upstreams rarely take them.
                    if let Ok(data) = frame?.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() > limit {
                        return Ok(UpstreamBody::Stream {
                            head: Some(buf.freeze()),
                            rest: body,
                        });
                    }
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::Stream { head, rest } => match head.take() {
                Some(h) => Poll::Ready(Some(Ok(Frame::data(h)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(b) => b.is_none(),
            UpstreamBody::Stream { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Stream { head, rest } => {
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
