//! End to end over raw sockets: what a client that misbehaves, or an
//! upstream that does, gets through the proxy, and exactly what reached
//! the upstream. A stalled request body is cut after `body_timeout` (408
//! while held; an aborted upstream request once streaming) and frees its
//! connection slot; a client that stops reading (HTTP/1 or HTTP/2, during
//! a response or with its last bytes unsent after it) is reset at
//! `body_timeout`; a silent HTTP/2 client cannot hold a drain; a request that
//! reached the upstream is not sent again unless idempotent and allowed;
//! conflicting or unknown response framing, a 101 nobody asked for and a
//! body cut short never reach a client as if they were fine.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::recorder::{Recorder, Script};
use support::*;

/// One HTTP listener in front of `web`, whose two endpoints (`a`, `b`)
/// are the same recorder, so a retry "elsewhere" reaches it too and is
/// seen. Passive checks off; `global` and `retry` lines as given.
fn config(listen: SocketAddr, up: SocketAddr, global: &str, service: &str) -> String {
    format!(
        "[global]\n{global}\n\n[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\n\
         default_service = \"web\"\n\n[services.web]\n{service}\n\
         passive = {{ consecutive_failures = 0 }}\n\
         endpoints = [{}, {}]\n",
        ep("a", up),
        ep("b", up)
    )
}

async fn proxy_for(up: &Recorder, global: &str, service: &str) -> Proxy {
    let addr = up.addr;
    Proxy::start(|| config(free_addr(), addr, global, service)).await
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reads until the peer closes or resets; what arrived and whether it
/// ended with a reset (an error) rather than a clean close.
async fn read_to_end(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) => return false,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(_) => return true,
            }
        }
    };
    let reset = tokio::time::timeout(within, read)
        .await
        .unwrap_or_else(|_| panic!("the connection was still open after {within:?}"));
    (got, reset)
}

// --- timers for what the client controls --------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_answered_408_and_nothing_reaches_the_upstream() {
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    let proxy = proxy_for(&up, "body_timeout = \"500ms\"", "").await;
    let heads: [&[u8]; 2] = [
        b"POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
        b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ];
    for request in heads {
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        s.write_all(request).await.expect("send a partial request");
        let start = Instant::now();
        let (got, _) = read_to_end(&mut s, Duration::from_secs(5)).await;
        let took = start.elapsed();
        let (status, headers) = parse_head(&got);
        assert_eq!(status, 408, "{}: {}", text(request), text(&got));
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "connection" && v == "close"),
            "the 408 closes the connection: {}",
            text(&got)
        );
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "answered after {took:?}, not after the 500 ms body_timeout"
        );
    }
    assert!(
        up.received().is_empty(),
        "a held body that stalled never reached the upstream: {:?}",
        up.received()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_while_streaming_aborts_the_upstream_request() {
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    // Over the 16-byte replay limit the body streams upstream as it comes.
    let proxy = proxy_for(
        &up,
        "body_timeout = \"500ms\"",
        "retry = { replay_limit = 16 }",
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    let head = "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n";
    s.write_all(head.as_bytes()).await.expect("send the head");
    s.write_all(&[b'x'; 40])
        .await
        .expect("send 40 of 100 bytes");
    let (got, _) = read_to_end(&mut s, Duration::from_secs(5)).await;
    assert_eq!(parse_head(&got).0, 408, "{}", text(&got));
    up.wait_all_closed(1, Duration::from_secs(3)).await;
    let received = up.received();
    let sent = text(&received[0]);
    assert!(sent.starts_with("POST /up HTTP/1.1\r\n"), "{sent}");
    assert!(
        sent.ends_with(&"x".repeat(40)) && !sent.contains(&"x".repeat(41)),
        "the upstream got the head and the 40 bytes, no more: {sent:?}"
    );
    assert_eq!(up.requests(), 1, "and the request was not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_on_every_connection_slot_free_them_after_body_timeout() {
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    let proxy = proxy_for(&up, "body_timeout = \"500ms\"\nmax_connections = 20", "").await;
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        let req = format!("POST /{i} HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc");
        s.write_all(req.as_bytes()).await.expect("send");
        stalled.push(s);
    }
    // Every slot is held: the next client waits, then is served once the
    // stalled ones are cut, well before they would have left on their own.
    let start = Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        raw_request(proxy.addr(), b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n"),
    )
    .await
    .expect("a new client is served once the stalled bodies time out");
    assert_eq!(resp.status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    for s in &mut stalled {
        let (got, _) = read_to_end(s, Duration::from_secs(3)).await;
        assert_eq!(parse_head(&got).0, 408, "{}", text(&got));
    }
    assert_eq!(up.requests(), 1, "only the late GET reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_the_upstream_request_aborted() {
    let up = Recorder::start(|_| {
        Script::Flood(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n".to_vec())
    })
    .await;
    let proxy = proxy_for(&up, "body_timeout = \"500ms\"", "").await;
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    // Read the head and a little, then stop reading.
    let mut head = Vec::new();
    read_until_blank_line(&mut s, &mut head).await;
    assert_eq!(parse_head(&head).0, 200);
    let start = Instant::now();
    up.wait_all_closed(1, Duration::from_secs(10)).await;
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "the upstream request was aborted after {:?}",
        start.elapsed()
    );
    // What the proxy had buffered drains, then the connection ends well
    // short of the gigabyte announced.
    let (got, _) = read_to_end(&mut s, Duration::from_secs(10)).await;
    assert!(
        got.len() < 1 << 29,
        "the client got {} bytes: it was not cut",
        got.len()
    );
}

/// Client connections open in the proxy, from `/metrics`.
async fn open_conns(proxy: &Proxy) -> i64 {
    let open = proxy.metric("pointsman_client_connections").await;
    open.expect("pointsman_client_connections in /metrics") as i64
}

/// A proxy in front of a real upstream (`pointsman upstream`, whose
/// `/bytes?n=N` streams N bytes), with `global` settings.
async fn proxy_for_real(up: &Upstream, global: &str) -> Proxy {
    let addr = up.addr;
    Proxy::start(|| config(free_addr(), addr, global, "")).await
}

/// A client that stops reading a response of several MB is reset at
/// `body_timeout`: closed gracefully, its connection would leave the
/// kernel holding (and retrying for minutes) the send buffer it never
/// took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_large_response_is_reset() {
    let up = Upstream::start("big").await;
    let proxy = proxy_for_real(&up, "body_timeout = \"500ms\"\nidle_timeout = \"60s\"").await;
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"GET /bytes?n=16000000 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let mut head = Vec::new();
    read_until_blank_line(&mut s, &mut head).await;
    assert_eq!(parse_head(&head).0, 200, "{}", text(&head));
    let stopped = Instant::now();
    wait_for(
        Duration::from_secs(10),
        "the proxy to cut the connection of a client that stopped reading",
        || async { open_conns(&proxy).await == 0 },
    )
    .await;
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "cut after {took:?}, before the 500 ms body_timeout"
    );
    let (got, reset) = read_to_end(&mut s, Duration::from_secs(5)).await;
    assert!(
        reset,
        "the connection was closed gracefully: the client could still read {} bytes \
         the kernel had held for it",
        got.len()
    );
    assert!(got.len() < 16_000_000, "the whole body arrived");
}

/// A keep-alive client that sends requests and never reads: once its
/// socket is full, a response ends at the proxy with its final bytes
/// still waiting to be written, and the next request waits behind them
/// without being answered. That write counts against `body_timeout` too;
/// the header and idle timeouts, here a minute, would hold the connection
/// that long (and a graceful close for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_left_unsent_after_a_response_are_cut_at_body_timeout() {
    let up = Upstream::start("big").await;
    let global = "body_timeout = \"500ms\"\nidle_timeout = \"60s\"\nheader_read_timeout = \"60s\"";
    let proxy = proxy_for_real(&up, global).await;
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    // 512 responses of 32 KiB: 16 MiB, more than the sockets hold; each
    // less than what the proxy buffers above the socket, so it ends there.
    let piece = b"GET /bytes?n=32768 HTTP/1.1\r\nHost: a\r\n\r\n";
    s.write_all(&piece.repeat(512)).await.expect("send");
    let start = Instant::now();
    // Well short of the minute the other timers would allow, with room
    // for a loaded machine.
    wait_for(
        Duration::from_secs(10),
        "the proxy to cut a client whose responses wait unsent",
        || async { open_conns(&proxy).await == 0 },
    )
    .await;
    let took = start.elapsed();
    let (got, reset) = read_to_end(&mut s, Duration::from_secs(5)).await;
    assert!(reset, "closed gracefully after {} bytes", got.len());
    assert!(
        got.len() < 512 * 32768,
        "every response arrived: nothing was left unsent"
    );
    assert!(
        took >= Duration::from_millis(400),
        "cut after {took:?}, before the 500 ms body_timeout"
    );
}

/// The frames (type, flags, payload) in `bytes`, as far as they are whole.
fn h2_frames(bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = usize::from(bytes[at]) << 16
            | usize::from(bytes[at + 1]) << 8
            | usize::from(bytes[at + 2]);
        let Some(payload) = bytes.get(at + 9..at + 9 + len) else {
            break;
        };
        frames.push((bytes[at + 3], bytes[at + 4], payload.to_vec()));
        at += 9 + len;
    }
    frames
}

/// Sends the HTTP/2 preface with `settings` (id, value pairs), waits for
/// the server's SETTINGS and acknowledges them.
async fn h2_handshake(s: &mut TcpStream, settings: &[(u16, u32)]) {
    const SETTINGS: u8 = 4;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let len = u32::try_from(settings.len() * 6).expect("a few settings");
    hello.extend_from_slice(&len.to_be_bytes()[1..]);
    hello.extend_from_slice(&[SETTINGS, 0, 0, 0, 0, 0]);
    for (id, value) in settings {
        hello.extend_from_slice(&id.to_be_bytes());
        hello.extend_from_slice(&value.to_be_bytes());
    }
    s.write_all(&hello).await.expect("send the preface");
    let mut got = Vec::new();
    while !h2_frames(&got)
        .iter()
        .any(|(t, f, _)| *t == SETTINGS && *f == 0)
    {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("the server's SETTINGS within 5 s")
            .expect("read");
        assert!(n > 0, "closed before the server's SETTINGS");
        got.extend_from_slice(&chunk[..n]);
    }
    s.write_all(&[0, 0, 0, SETTINGS, 1, 0, 0, 0, 0])
        .await
        .expect("acknowledge the server's SETTINGS");
}

/// An HTTP/2 client that opens its flow-control windows wide, asks for a
/// large response and stops reading is reset at `body_timeout`, as an
/// HTTP/1 one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_stops_reading_is_reset() {
    let up = Upstream::start("big").await;
    let proxy = proxy_for_real(&up, "body_timeout = \"500ms\"\nidle_timeout = \"60s\"").await;
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    // SETTINGS_INITIAL_WINDOW_SIZE, and the connection's window, at most.
    h2_handshake(&mut s, &[(4, 0x7fff_ffff)]).await;
    let mut frames = vec![0, 0, 4, 8, 0, 0, 0, 0, 0];
    frames.extend_from_slice(&(0x7fff_ffff_u32 - 65_535).to_be_bytes());
    // GET /bytes?n=16000000 on stream 1 (HPACK: :method GET, :scheme
    // http, then :path and :authority as literals).
    let path = b"/bytes?n=16000000";
    let mut block = vec![0x82, 0x86, 0x44, path.len() as u8];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x41, 1, b'a']);
    frames.extend_from_slice(&[0, 0, block.len() as u8, 1, 0x05, 0, 0, 0, 1]);
    frames.extend_from_slice(&block);
    s.write_all(&frames).await.expect("send the request");
    let stopped = Instant::now();
    wait_for(
        Duration::from_secs(5),
        "the proxy to cut the h2 connection of a client that stopped reading",
        || async { open_conns(&proxy).await == 0 },
    )
    .await;
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "cut after {took:?}, before the 500 ms body_timeout"
    );
    let (got, reset) = read_to_end(&mut s, Duration::from_secs(5)).await;
    assert!(
        reset,
        "the h2 connection was closed gracefully: the client could still read {} bytes",
        got.len()
    );
}

/// An HTTP/2 client that completes the handshake and then stays silent
/// never acknowledges the PING sent with the drain's GOAWAY: it is closed
/// after one idle timeout, and the drain ends then, not at its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_h2_client_does_not_hold_the_drain() {
    const PING: u8 = 6;
    const GOAWAY: u8 = 7;
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    let global = "idle_timeout = \"1s\"\nheader_read_timeout = \"60s\"\ndrain_timeout = \"30s\"";
    let mut proxy = proxy_for(&up, global, "").await;
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    h2_handshake(&mut s, &[]).await;
    wait_for(
        Duration::from_secs(5),
        "the h2 connection to be counted",
        || async { open_conns(&proxy).await == 1 },
    )
    .await;

    let start = Instant::now();
    sigterm(proxy.pid());
    let child = proxy.child();
    wait_until(
        Duration::from_secs(10),
        "the proxy to finish its drain (drain_timeout is 30 s)",
        || matches!(child.try_wait(), Ok(Some(_))),
    )
    .await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "the silent client was closed after {took:?}, before the 1 s idle timeout"
    );
    let stderr = proxy.stderr();
    assert!(
        stderr.contains("drained: every connection finished"),
        "{stderr}"
    );
    let (rest, _) = read_to_end(&mut s, Duration::from_secs(5)).await;
    let types: Vec<u8> = h2_frames(&rest).iter().map(|(t, _, _)| *t).collect();
    assert!(
        types.contains(&GOAWAY) && types.contains(&PING),
        "the drain sent GOAWAY and PING first: frame types {types:?}"
    );
}

// --- retries only when the request provably did not reach the upstream --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_upstream_read_is_never_sent_again() {
    for (what, script) in [
        ("closes without answering", Script::Close),
        (
            "answers a malformed status line",
            Script::AnswerClose(b"HTTP/1.1 abc\r\n\r\n".to_vec()),
        ),
    ] {
        let up = Recorder::start(move |_| script.clone()).await;
        let proxy = proxy_for(&up, "", "").await;
        let resp = raw_request(
            proxy.addr(),
            b"POST /pay HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert_eq!(resp.status, 502, "upstream {what}: {}", text(&resp.body));
        assert_eq!(up.requests(), 1, "upstream {what}: {:?}", up.received());
        let sent = text(&up.received()[0]);
        assert!(sent.starts_with("POST /pay HTTP/1.1\r\n") && sent.ends_with("\r\n\r\nhello"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_is_sent_again_only_when_allowed() {
    let up = Recorder::start(|_| Script::Close).await;
    // By default a GET that reached the upstream is not repeated either.
    let proxy = proxy_for(&up, "", "").await;
    let resp = raw_request(proxy.addr(), b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(resp.status, 502);
    assert_eq!(up.requests(), 1, "{:?}", up.received());
    drop(proxy);

    let up = Recorder::start(|_| Script::Close).await;
    let proxy = proxy_for(&up, "", "retry = { idempotent_after_send = true }").await;
    let put = b"PUT /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
    let resp = raw_request(proxy.addr(), put).await;
    assert_eq!(resp.status, 502);
    assert_eq!(up.requests(), 3, "every attempt: {:?}", up.received());
    for conn in up.received() {
        let sent = text(&conn);
        assert!(
            sent.starts_with("PUT /a HTTP/1.1\r\n") && sent.ends_with("\r\n\r\nabc"),
            "each try sent the whole PUT: {sent:?}"
        );
    }
    // A POST stays single even then.
    let before = up.requests();
    let resp = raw_request(
        proxy.addr(),
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert_eq!(resp.status, 502);
    assert_eq!(up.requests(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_after_the_upstream_closed_its_pooled_connection_is_answered_once() {
    // The first answer keeps the connection for the pool, then the
    // upstream closes it (as at its own idle timeout).
    let up = Recorder::start(|n| match n {
        0 => Script::AnswerClose(OK.to_vec()),
        _ => Script::Answer(OK.to_vec()),
    })
    .await;
    let proxy = proxy_for(&up, "", "").await;
    let resp = raw_request(proxy.addr(), b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(resp.status, 200);
    let resp = raw_request(
        proxy.addr(),
        b"POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", text(&resp.body));
    let posts: usize = up
        .received()
        .iter()
        .map(|c| text(c).matches("POST /second").count())
        .sum();
    assert_eq!(posts, 1, "{:?}", up.received());
}

// --- response framing ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_beside_chunked_is_dropped() {
    let up = Recorder::start(|_| {
        Script::Answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
              a\r\n0123456789\r\n0\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    let proxy = proxy_for(&up, "", "").await;
    let resp = raw_request(proxy.addr(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), None, "{:?}", resp.headers);
    assert_eq!(resp.body, b"0123456789", "the whole chunked body");

    let (version, status, body) = h2c_get(proxy.addr(), "/").await;
    assert_eq!((version, status), (hyper::Version::HTTP_2, 200));
    assert_eq!(&body[..], b"0123456789");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_transfer_codings_and_an_unasked_101_are_502() {
    let answers: [&[u8]; 3] = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n",
    ];
    for answer in answers {
        let up = Recorder::start(move |_| Script::AnswerClose(answer.to_vec())).await;
        let proxy = proxy_for(&up, "", "").await;
        let resp = raw_request(proxy.addr(), b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(resp.status, 502, "{}: {}", text(answer), text(&resp.body));
        assert_eq!(up.requests(), 1, "not retried: {}", text(answer));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_upstream_body_never_looks_complete() {
    const CHUNKED_CUT: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n";
    const LENGTH_CUT: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789";
    let up = Recorder::start(|_| Script::AnswerClose(CHUNKED_CUT.to_vec())).await;
    let proxy = proxy_for(&up, "", "").await;

    // HTTP/1.1: chunked, without the last chunk.
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let (got, _) = read_to_end(&mut s, Duration::from_secs(5)).await;
    let got = text(&got);
    assert!(got.contains("transfer-encoding: chunked"), "{got}");
    assert!(
        got.contains("0123456789") && !got.ends_with("0\r\n\r\n"),
        "{got:?}"
    );

    // HTTP/1.0: the body ends at close, so the close is a reset.
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("send");
    let (got, reset) = read_to_end(&mut s, Duration::from_secs(5)).await;
    assert!(text(&got).contains("0123456789"), "{}", text(&got));
    assert!(
        reset,
        "an HTTP/1.0 client saw a clean close: {}",
        text(&got)
    );

    // h2: the stream is reset, the body is an error.
    let stream = TcpStream::connect(proxy.addr()).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{}/", proxy.addr()))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("h2 response head");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await;
    assert!(body.is_err(), "an h2 client got a complete body: {body:?}");
    driver.abort();
    drop(proxy);

    // Content-Length: the connection ends before the length is reached.
    let up = Recorder::start(|_| Script::AnswerClose(LENGTH_CUT.to_vec())).await;
    let proxy = proxy_for(&up, "", "").await;
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let (got, _) = read_to_end(&mut s, Duration::from_secs(5)).await;
    let got = text(&got);
    assert!(got.contains("content-length: 100"), "{got}");
    assert!(got.ends_with("\r\n\r\n0123456789"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_hints_answer_is_followed_by_the_final_one() {
    // hyper's server side cannot send a 1xx: the 103 is not relayed, the
    // final answer is.
    let up = Recorder::start(|_| {
        Script::Answer(
            [
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n".as_slice(),
                OK,
            ]
            .concat(),
        )
    })
    .await;
    let proxy = proxy_for(&up, "", "").await;
    let resp = raw_request(proxy.addr(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!((resp.status, resp.body.as_slice()), (200, b"ok".as_slice()));
    assert_eq!(up.requests(), 1);
}

/// One host per request (RFC 9112 §3.2): a request that names two, or
/// none over HTTP/1.1, or a target that would be forwarded as `/`, gets
/// 400 and nothing reaches the upstream; the same host in both forms
/// passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_must_name_one_host() {
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    let proxy = proxy_for(&up, "", "").await;
    let refused: [&[u8]; 6] = [
        b"GET /x HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a.test\r\nHost: admin.internal\r\n\r\n",
        b"GET http://example.test/x HTTP/1.1\r\nHost: admin.internal\r\n\r\n",
        b"GET http://user@a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET admin.internal:80 HTTP/1.1\r\nHost: admin.internal\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a.test\r\n\r\n",
    ];
    for request in refused {
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        s.write_all(request).await.expect("send");
        let (got, _) = read_to_end(&mut s, Duration::from_secs(5)).await;
        let (status, _) = parse_head(&got);
        assert_eq!(status, 400, "{}: {}", text(request), text(&got));
    }
    assert!(
        up.received().is_empty(),
        "nothing reached the upstream: {:?}",
        up.received()
    );
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let (got, _) = read_to_end(&mut s, Duration::from_secs(5)).await;
    assert_eq!(parse_head(&got).0, 200, "{}", text(&got));
    assert_eq!(up.requests(), 1);
}

// --- safe paths ----------------------------------------------------------

/// Routes only for `/public` (one stripping `/static`), no default: a path
/// that would reach anything else must not reach the upstream.
async fn path_proxy(up: &Recorder, global: &str) -> Proxy {
    let addr = up.addr;
    Proxy::start(|| {
        format!(
            "[global]\n{global}\n\n[[listeners]]\nname = \"web\"\nbind = \"{}\"\n\n\
             [services.web]\nendpoints = [{}]\n\n\
             [routes.public]\npath_prefix = \"/public\"\nservice = \"web\"\n\n\
             [routes.static]\npath_prefix = \"/static\"\nstrip_prefix = true\nservice = \"web\"\n",
            free_addr(),
            ep("a", addr)
        )
    })
    .await
}

/// The request line of each request the upstream received, in order.
fn request_lines(up: &Recorder) -> Vec<String> {
    up.received()
        .iter()
        .flat_map(|c| {
            text(c)
                .split("\r\n")
                .filter(|l| l.ends_with(" HTTP/1.1") && !l.contains(':'))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Sends `request` on a new connection; everything that came back before
/// the proxy closed it.
async fn exchange(proxy: &Proxy, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(request).await.expect("send");
    read_to_end(&mut s, Duration::from_secs(5)).await.0
}

async fn status_of(proxy: &Proxy, target: &str) -> (u16, String) {
    let request = format!("GET {target} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    let got = exchange(proxy, request.as_bytes()).await;
    (parse_head(&got).0, text(&got))
}

/// A path that climbs out of `/public` by dot segments, in any spelling,
/// is routed where it really points (here: nowhere, 404) or refused when
/// servers read it differently (400); what is forwarded is the normal
/// form, so no backend can read it another way; a stripped prefix ends at
/// a segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_routed_and_forwarded_in_their_normal_form() {
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    let proxy = path_proxy(&up, "").await;
    let cases = [
        ("/public/../admin", 404),
        ("/public/%2e%2e/admin", 404),
        ("/public/.%2E/admin", 404),
        ("/staticadmin", 404),
        ("/public%2F..%2Fadmin", 400),
        ("/public/..%2fadmin", 400),
        ("/public/..;/admin", 400),
        ("/public/..%5cadmin", 400),
        ("/public/a%00", 400),
        ("/public/%zz", 400),
    ];
    for (target, want) in cases {
        let (status, got) = status_of(&proxy, target).await;
        assert_eq!(status, want, "{target}: {got}");
    }
    assert!(
        up.received().is_empty(),
        "none of them reached the upstream: {:?}",
        request_lines(&up)
    );
    let forwarded = [
        (
            "/public/./a/../b/%7Euser?q=%2e%2e/x",
            "/public/b/~user?q=%2e%2e/x",
        ),
        ("/public/a%3fb", "/public/a%3Fb"),
        ("/public/a;v=1/b", "/public/a;v=1/b"),
        ("/static/x/../app.css", "/app.css"),
        ("/static", "/"),
    ];
    for (target, _) in forwarded {
        let (status, got) = status_of(&proxy, target).await;
        assert_eq!(status, 200, "{target}: {got}");
    }
    let mut want: Vec<String> = forwarded
        .iter()
        .map(|(_, sent)| format!("GET {sent} HTTP/1.1"))
        .collect();
    let mut got = request_lines(&up);
    want.sort();
    got.sort();
    assert_eq!(got, want);
}

/// `path_normalization = "off"` routes and forwards the raw path, for the
/// applications that need encoded slashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_paths_pass_when_normalization_is_off() {
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    let proxy = path_proxy(&up, "path_normalization = \"off\"").await;
    for target in ["/public/../admin", "/public%2Fa%2Fb"] {
        let (status, got) = status_of(&proxy, target).await;
        assert_eq!(status, 200, "{target}: {got}");
    }
    let mut got = request_lines(&up);
    got.sort();
    assert_eq!(
        got,
        [
            "GET /public%2Fa%2Fb HTTP/1.1",
            "GET /public/../admin HTTP/1.1"
        ]
    );
}

// --- forwarding headers and header names ---------------------------------

/// The headers of the one request `up` received, names lower-cased.
fn upstream_headers(up: &Recorder) -> Vec<(String, String)> {
    let all = up.received();
    assert_eq!(all.len(), 1, "one upstream connection: {all:?}");
    let t = text(&all[0]);
    t.split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    hs.iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

const SPOOFED: &str = "GET /x HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 6.6.6.6\r\n\
    X-Forwarded-Proto: https\r\nX-Forwarded-Host: bank.test\r\nForwarded: for=6.6.6.6\r\n\
    X_Forwarded_For: 7.7.7.7\r\nConnection: close\r\n\r\n";

/// The headers the upstream got for [`SPOOFED`] through a proxy with
/// `global` settings.
async fn spoofed_through(global: &str) -> Vec<(String, String)> {
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    let proxy = proxy_for(&up, global, "").await;
    let got = exchange(&proxy, SPOOFED.as_bytes()).await;
    assert_eq!(parse_head(&got).0, 200, "{}", text(&got));
    upstream_headers(&up)
}

/// From a client that is not a trusted proxy, every forwarding header is
/// the proxy's own: what the client claimed (in any spelling) is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_an_untrusted_client_are_replaced() {
    let hs = spoofed_through("trusted_proxies = [\"10.0.0.0/8\"]").await;
    assert_eq!(header(&hs, "x-forwarded-for"), ["127.0.0.1"], "{hs:?}");
    assert_eq!(header(&hs, "x-forwarded-proto"), ["http"]);
    assert_eq!(header(&hs, "x-forwarded-host"), ["a.test"]);
    assert!(header(&hs, "forwarded").is_empty(), "{hs:?}");
    assert!(header(&hs, "x_forwarded_for").is_empty(), "{hs:?}");
}

/// From a trusted proxy the chain is kept and extended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_a_trusted_proxy_are_kept() {
    let hs = spoofed_through("trusted_proxies = [\"127.0.0.0/8\"]").await;
    assert_eq!(
        header(&hs, "x-forwarded-for"),
        ["6.6.6.6, 127.0.0.1"],
        "{hs:?}"
    );
    assert_eq!(header(&hs, "x-forwarded-proto"), ["https"]);
    assert_eq!(header(&hs, "x-forwarded-host"), ["bank.test"]);
    assert_eq!(header(&hs, "forwarded"), ["for=6.6.6.6"]);
}

/// `Transfer_Encoding` and its like are refused: a CGI-style server reads
/// them as the header they resemble, and would frame the body otherwise
/// than the proxy did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_header_lookalikes_are_refused() {
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    let proxy = proxy_for(&up, "", "").await;
    let refused: [&[u8]; 2] = [
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent_Length: 4\r\n\r\n",
    ];
    for request in refused {
        let got = exchange(&proxy, request).await;
        assert_eq!(parse_head(&got).0, 400, "{}: {}", text(request), text(&got));
    }
    assert!(up.received().is_empty(), "{:?}", up.received());
    // Other names with `_` are the application's.
    let got = exchange(
        &proxy,
        b"GET /x HTTP/1.1\r\nHost: a\r\nX_Api_Key: k\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(parse_head(&got).0, 200, "{}", text(&got));
    assert_eq!(header(&upstream_headers(&up), "x_api_key"), ["k"]);
}

// --- upgrades and tunnels ------------------------------------------------

/// Reads one response head (the connection may stay open).
async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response head within 5 s")
            .expect("read");
        assert!(n > 0, "closed before a response head: {}", text(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    got
}

const H2C: &str = "GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
    Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
const SWITCH: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";

/// `Upgrade: h2c` would open a tunnel past routing: by default the request
/// goes as plain HTTP/1.1 (the upstream's 101 is then one nobody asked
/// for: 502); with `h2c_upgrade = true` the offer and its settings reach
/// the upstream and the switch is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_passes_only_where_the_service_allows_it() {
    let up = Recorder::start(|_| Script::Answer(SWITCH.to_vec())).await;
    let proxy = proxy_for(&up, "", "").await;
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(H2C.as_bytes()).await.expect("send");
    let got = read_head(&mut s).await;
    assert_eq!(parse_head(&got).0, 502, "{}", text(&got));
    let hs = upstream_headers(&up);
    assert!(header(&hs, "upgrade").is_empty(), "{hs:?}");
    assert!(header(&hs, "http2-settings").is_empty(), "{hs:?}");

    let up = Recorder::start(|_| Script::Answer(SWITCH.to_vec())).await;
    let proxy = proxy_for(&up, "", "h2c_upgrade = true").await;
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(H2C.as_bytes()).await.expect("send");
    let mut head = vec![0u8; SWITCH.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    assert_eq!(parse_head(&head).0, 101, "{}", text(&head));
    let hs = upstream_headers(&up);
    assert_eq!(header(&hs, "upgrade"), ["h2c"], "{hs:?}");
    assert_eq!(header(&hs, "http2-settings"), ["AAMAAABkAARAAAAAAAIAAAAA"]);
    assert_eq!(header(&hs, "connection"), ["upgrade, http2-settings"]);
}

/// CONNECT gets 501 (no route tunnels), not a dropped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_answered_501() {
    let up = Recorder::start(|_| Script::Answer(OK.to_vec())).await;
    let proxy = proxy_for(&up, "", "").await;
    let got = exchange(
        &proxy,
        b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
    )
    .await;
    assert_eq!(parse_head(&got).0, 501, "{}", text(&got));
    assert!(up.received().is_empty(), "{:?}", up.received());
}
