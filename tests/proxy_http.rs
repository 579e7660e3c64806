//! End to end: what the HTTP engine does to a request and its response on
//! the way through. Hop-by-hop headers, X-Forwarded-*, chunked bodies,
//! `Expect: 100-continue`, h2c, WebSocket upgrades, and 200 MB streamed
//! each way in bounded memory.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::Response;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::*;

/// One listener whose default service has `endpoint` as its only endpoint.
fn default_to(listen: SocketAddr, endpoint: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
bind = "{listen}"
default_service = "app"

[services.app]
endpoints = [{endpoint}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_hop_by_hop_headers_are_stripped_and_forwarded_headers_set() {
    let up = Upstream::start("echo").await;
    let ep = endpoint_line(&up, "");
    let proxy = Proxy::start(|| default_to(free_addr(), &ep)).await;

    let request = "GET /hdr?a=1 HTTP/1.1\r\n\
                   Host: app.example.com\r\n\
                   Connection: keep-alive, X-Custom\r\n\
                   X-Custom: 1\r\n\
                   Keep-Alive: timeout=5\r\n\
                   Proxy-Connection: keep-alive\r\n\
                   TE: trailers\r\n\
                   Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
                   X-End-To-End: yes\r\n\
                   X-Forwarded-For: 10.1.1.1\r\n\
                   X-Forwarded-Proto: https\r\n\
                   X-Forwarded-Host: spoofed.example\r\n\
                   \r\n";
    let resp = raw_request(proxy.addr(), request.as_bytes()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = resp.json();
    let seen = &echo["headers"];
    for gone in [
        "connection",
        "x-custom",
        "keep-alive",
        "proxy-connection",
        "te",
        "proxy-authorization",
    ] {
        assert!(
            seen.get(gone).is_none(),
            "the upstream got hop-by-hop header {gone}: {seen:#}"
        );
    }
    assert_eq!(seen["x-end-to-end"], "yes", "end-to-end headers pass");
    assert_eq!(seen["host"], "app.example.com", "Host is kept");
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "an untrusted client's X-Forwarded-For is replaced"
    );
    assert_eq!(
        seen["x-forwarded-proto"], "http",
        "an untrusted client's X-Forwarded-Proto is replaced"
    );
    assert_eq!(seen["x-forwarded-host"], "app.example.com");
    assert_eq!(echo["path"], "/hdr?a=1");
    assert_eq!(
        echo["target"], "/hdr?a=1",
        "the upstream gets the origin form, not the absolute form"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_host_reaches_the_upstream_with_its_address_as_host() {
    let up = Upstream::start("echo").await;
    let ep = endpoint_line(&up, "");
    let proxy = Proxy::start(|| default_to(free_addr(), &ep)).await;

    let resp = raw_request(proxy.addr(), b"GET /old?x=1 HTTP/1.0\r\n\r\n").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echo = resp.json();
    assert_eq!(echo["target"], "/old?x=1");
    assert_eq!(echo["headers"]["host"], up.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_x_forwarded_for_lines_are_folded_in_order() {
    let up = Upstream::start("echo").await;
    let ep = endpoint_line(&up, "");
    // From a trusted proxy the chain is kept.
    let proxy = Proxy::start(|| {
        format!(
            "[global]\ntrusted_proxies = [\"127.0.0.1\"]\n{}",
            default_to(free_addr(), &ep)
        )
    })
    .await;

    // Two header lines are one list (RFC 9110 5.3): every hop must survive.
    let request = "GET / HTTP/1.1\r\n\
                   Host: a.example\r\n\
                   X-Forwarded-For: 10.1.1.1\r\n\
                   X-Forwarded-For: 10.2.2.2, 10.3.3.3\r\n\
                   \r\n";
    let resp = raw_request(proxy.addr(), request.as_bytes()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.json()["headers"]["x-forwarded-for"],
        "10.1.1.1, 10.2.2.2, 10.3.3.3, 127.0.0.1",
        "the upstream's X-Forwarded-For"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_hop_by_hop_headers_are_stripped() {
    let up = http_server(|_req| async {
        Response::builder()
            .header("connection", "X-Resp-Hop")
            .header("x-resp-hop", "1")
            .header("keep-alive", "timeout=99")
            .header("proxy-authenticate", "Basic realm=\"x\"")
            .header("x-end-to-end", "yes")
            .body(Full::new(Bytes::from_static(b"hello")))
            .expect("a response")
    })
    .await;
    let ep = format!("{{ id = \"hop\", address = \"{}\" }}", up.addr);
    let proxy = Proxy::start(|| default_to(free_addr(), &ep)).await;

    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    for i in 0..2 {
        // Twice on one connection: the stripped Connection header did not
        // make the proxy close it either.
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            .await
            .expect("send");
        let resp = read_response(&mut s).await;
        assert_eq!(resp.status, 200, "request {i}: {resp:?}");
        assert_eq!(resp.body, b"hello");
        for gone in [
            "connection",
            "x-resp-hop",
            "keep-alive",
            "proxy-authenticate",
        ] {
            assert_eq!(
                resp.header(gone),
                None,
                "the client got hop-by-hop header {gone}: {:?}",
                resp.headers
            );
        }
        assert_eq!(resp.header("x-end-to-end"), Some("yes"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_and_expect_continue() {
    let up = Upstream::start("upload").await;
    let ep = endpoint_line(&up, "");
    let proxy = Proxy::start(|| default_to(free_addr(), &ep)).await;

    // Chunked: three chunks arrive whole.
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .expect("send");
    s.write_all(b"7\r\n, world\r\n").await.expect("send");
    let big = vec![b'x'; 70_000];
    s.write_all(format!("{:x}\r\n", big.len()).as_bytes())
        .await
        .expect("send");
    s.write_all(&big).await.expect("send");
    s.write_all(b"\r\n0\r\n\r\n").await.expect("send");
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.json()["received"],
        12 + 70_000,
        "the whole chunked body"
    );

    // Expect: 100-continue: the proxy says 100 before we send the body.
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("send");
    let mut buf = Vec::new();
    let head = read_until_blank_line(&mut s, &mut buf).await;
    let interim = String::from_utf8_lossy(&buf[..head]).to_string();
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "expected a 100 Continue before the body, got {interim:?}"
    );
    assert_eq!(
        buf.len(),
        head,
        "nothing but the 100 before the body is sent"
    );
    s.write_all(b"hello world").await.expect("send the body");
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["received"], 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_proxied() {
    let up = Upstream::start("h2up").await;
    let ep = endpoint_line(&up, "");
    let proxy = Proxy::start(|| default_to(free_addr(), &ep)).await;

    for path in ["/one", "/two?x=1"] {
        let (version, status, body) = h2c_get(proxy.addr(), path).await;
        assert_eq!(version, hyper::Version::HTTP_2, "the proxy spoke h2c");
        assert_eq!(status, 200);
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
        assert_eq!(echo["server"], "h2up");
        assert_eq!(echo["path"], path);
        assert_eq!(echo["target"], path, "origin form upstream");
        assert_eq!(
            echo["headers"]["host"],
            proxy.addr().to_string(),
            "the h2 :authority becomes the upstream's Host"
        );
        assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn next_message(conn: &mut Ws) -> Message {
    tokio::time::timeout(Duration::from_secs(5), conn.next())
        .await
        .expect("a message within 5 s")
        .expect("the stream is open")
        .expect("a valid message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_flow_both_ways() {
    let ws = ws_echo_server("ws1").await;
    let ep = format!("{{ id = \"ws1\", address = \"{}\" }}", ws.addr);
    let proxy = Proxy::start(|| default_to(free_addr(), &ep)).await;

    let url = format!("ws://{}/chat", proxy.addr());
    let (mut conn, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("WebSocket handshake within 10 s")
    .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), 101);

    assert_eq!(
        next_message(&mut conn).await,
        Message::text("hello from ws1"),
        "the server speaks first"
    );
    for i in 0..5 {
        let text = Message::text(format!("message {i}"));
        conn.send(text.clone()).await.expect("send text");
        assert_eq!(next_message(&mut conn).await, text);
        let bin = Message::binary(vec![i as u8; 1000 * (i + 1)]);
        conn.send(bin.clone()).await.expect("send binary");
        assert_eq!(next_message(&mut conn).await, bin);
    }
    conn.close(None).await.expect("close");
}

/// The proxy's VmHWM must stay under this while 200 MB pass through.
const MEMORY_LIMIT_KIB: u64 = 64 * 1024;
const BIG: u64 = 200 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_of_200_mb_is_streamed() {
    let up = Upstream::start("sink").await;
    let ep = endpoint_line(&up, "");
    let proxy = Proxy::start(|| default_to(free_addr(), &ep)).await;

    const CHUNK: usize = 256 * 1024;
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let chunks = (BIG as usize) / CHUNK;
    let body = futures_util::stream::iter(
        (0..chunks).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(&ZEROS))),
    );
    let started = Instant::now();
    let resp = client()
        .post(proxy.url("/upload"))
        .body(reqwest::Body::wrap_stream(body))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("POST 200 MB");
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.expect("JSON");
    let took = started.elapsed();
    assert_eq!(echo["received"], BIG, "the upstream got every byte");
    let hwm = vm_hwm_kib(proxy.pid());
    println!(
        "upload: 200 MB in {took:?} ({:.0} MB/s); proxy VmHWM {} KiB",
        200.0 / took.as_secs_f64(),
        hwm
    );
    assert!(
        hwm < MEMORY_LIMIT_KIB,
        "the proxy's VmHWM reached {hwm} KiB: the upload was buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_of_200_mb_is_streamed() {
    let up = Upstream::start("source").await;
    let ep = endpoint_line(&up, "");
    let proxy = Proxy::start(|| default_to(free_addr(), &ep)).await;

    let started = Instant::now();
    let resp = client()
        .get(proxy.url(&format!("/bytes?n={BIG}")))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("GET 200 MB");
    assert_eq!(resp.status(), 200);
    let mut total = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        total += chunk.expect("a body chunk").len() as u64;
    }
    let took = started.elapsed();
    assert_eq!(total, BIG, "every byte arrived");
    let hwm = vm_hwm_kib(proxy.pid());
    println!(
        "download: 200 MB in {took:?} ({:.0} MB/s); proxy VmHWM {} KiB",
        200.0 / took.as_secs_f64(),
        hwm
    );
    assert!(
        hwm < MEMORY_LIMIT_KIB,
        "the proxy's VmHWM reached {hwm} KiB: the download was buffered"
    );
}
