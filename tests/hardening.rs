//! End to end over raw sockets: what a client that misbehaves, or an
//! upstream that does, gets through the proxy, and exactly what reached
//! the upstream. A stalled request body is cut after `body_timeout` (408
//! while held; an aborted upstream request once streaming) and frees its
//! connection slot; a client that stops reading is closed; a request that
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
