//! The takeover wire format under arbitrary bytes; see `crate::fuzzing`.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::{hand_over, next_frame, receive, HeldSockets, Wire};

/// Most one exchange takes: the peer half-closes after its bytes, so
/// every wait ends at the end of the input.
const BOUND: Duration = Duration::from_secs(15);

/// The bytes one process sends the other over the takeover socket
/// (length-prefixed JSON frames, without descriptors). Checks:
/// - every whole frame decodes to a message or an error, never a panic,
///   and a message encodes and decodes back to itself;
/// - an old process answering a new one that sends these bytes, and a new
///   process asking an old one that sends them, both end (with their
///   result or an error) within a bound, never panicking.
pub fn takeover_wire(data: &[u8]) {
    crate::fuzzing::watch_panics();
    let mut rest = data;
    while let Ok(Some((msg, used))) = next_frame(rest) {
        rest = &rest[used..];
        let Ok(msg) = msg else { continue };
        let body = serde_json::to_vec(&msg).unwrap_or_else(|e| panic!("{msg:?}: {e}"));
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        match next_frame(&frame) {
            Ok(Some((Ok(again), n))) if n == frame.len() => {
                assert_eq!(format!("{again:?}"), format!("{msg:?}"), "encoded back");
            }
            other => panic!("{msg:?} does not decode back: {other:?}"),
        }
    }
    crate::fuzzing::block_on(async {
        let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        let held = HeldSockets::default();
        let busy = AtomicBool::new(false);
        let taken_over = CancellationToken::new();
        let old = async {
            let _ = hand_over(ours, &held, &busy, &taken_over).await;
        };
        bounded("an old process answering", async {
            tokio::join!(old, peer(theirs, data));
        })
        .await;

        let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        let new = async {
            let mut wire = Wire::new(ours);
            let _ = receive(&mut wire).await;
        };
        bounded("a new process asking", async {
            tokio::join!(new, peer(theirs, data));
        })
        .await;
    });
    crate::fuzzing::assert_no_task_panicked("takeover messages");
}

/// The other process: sends `data`, half-closes, reads until closed.
async fn peer(stream: UnixStream, data: &[u8]) {
    let (mut rd, mut wr) = stream.into_split();
    let send = async {
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
    };
    let drain = async {
        let mut sink = Vec::new();
        let _ = rd.read_to_end(&mut sink).await;
    };
    tokio::join!(send, drain);
}

async fn bounded(what: &str, f: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(BOUND, f).await.is_err() {
        panic!("{what} did not end within {BOUND:?}");
    }
}
