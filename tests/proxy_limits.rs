//! End to end: the limits that protect the proxy and the answers when an
//! upstream fails. Slow request heads, idle keep-alive connections, huge
//! heads, upstream timeouts (504) and refused connects (502).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// One listener in front of `endpoint`, with `global` settings.
fn limited(listen: SocketAddr, global: &str, service: &str) -> String {
    format!(
        "[global]\n{global}\n\n[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\n\
         default_service = \"app\"\n\n[services.app]\n{service}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_head_is_cut_after_header_read_timeout() {
    let up = Upstream::start("app").await;
    let service = format!("endpoints = [{}]", endpoint_line(&up, ""));
    let global = "header_read_timeout = \"1s\"\nidle_timeout = \"30s\"";
    let proxy = Proxy::start(|| limited(free_addr(), global, &service)).await;

    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Half: ")
        .await
        .expect("send half a head");
    let (took, got) = wait_closed(&mut s, Duration::from_secs(8)).await;
    assert!(
        took >= Duration::from_millis(800),
        "closed after {took:?}, before the 1 s timeout"
    );
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 408"),
        "a stalled head gets nothing or a 408, not {text:?}"
    );
    let ep = proxy.endpoint("app", "app").await;
    assert_eq!(ep["requests"], 0, "nothing reached the upstream: {ep}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let up = Upstream::start("app").await;
    let service = format!("endpoints = [{}]", endpoint_line(&up, ""));
    let global = "idle_timeout = \"1s\"\nheader_read_timeout = \"30s\"";
    let proxy = Proxy::start(|| limited(free_addr(), global, &service)).await;

    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    // A request longer than the idle timeout is not cut: it is not idle.
    s.write_all(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let r = read_response(&mut s).await;
    assert_eq!(
        r.status, 200,
        "a busy connection outlives idle_timeout: {r:?}"
    );
    // Still usable right after.
    s.write_all(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/again");

    // Then idle: closed after about a second.
    let (took, got) = wait_closed(&mut s, Duration::from_secs(8)).await;
    assert!(got.is_empty(), "nothing but a close: {got:?}");
    assert!(
        took >= Duration::from_millis(700),
        "closed after {took:?}, before the 1 s idle timeout"
    );
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_outlives_header_read_timeout_until_idle_timeout() {
    let up = Upstream::start("app").await;
    let service = format!("endpoints = [{}]", endpoint_line(&up, ""));
    // The head timer must not cut the idle wait between requests.
    let global = "idle_timeout = \"3s\"\nheader_read_timeout = \"1s\"";
    let proxy = Proxy::start(|| limited(free_addr(), global, &service)).await;

    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    assert_eq!(read_response(&mut s).await.status, 200);
    // Idle for twice the head timeout, then the connection still serves.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    s.write_all(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send after an idle spell longer than header_read_timeout");
    let r = read_response(&mut s).await;
    assert_eq!(
        r.status, 200,
        "idle < idle_timeout must keep the connection: {r:?}"
    );
    assert_eq!(r.json()["path"], "/second");
    // And the idle timeout still closes it.
    let (took, got) = wait_closed(&mut s, Duration::from_secs(8)).await;
    assert!(got.is_empty(), "nothing but a close: {got:?}");
    assert!(
        took >= Duration::from_millis(2500),
        "closed after {took:?}, before idle_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_is_rejected() {
    let up = Upstream::start("app").await;
    let service = format!("endpoints = [{}]", endpoint_line(&up, ""));
    let proxy = Proxy::start(|| limited(free_addr(), "max_header_bytes = 8192", &service)).await;

    // Under the limit: fine.
    let ok = format!(
        "GET /fits HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4000)
    );
    let r = raw_request(proxy.addr(), ok.as_bytes()).await;
    assert_eq!(r.status, 200, "a 4 KB header is within the limit");

    // Far over it: a 431, or the connection closed, never a forward.
    let big = format!(
        "GET /huge HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    // The proxy may close before it has read everything; a write error is
    // one way of being refused.
    let _ = s.write_all(big.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the proxy answers or closes within 5 s");
    let text = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || text.starts_with("HTTP/1.1 431"),
        "a 64 KB head with max_header_bytes = 8192 got {text:?}"
    );
    let ep = proxy.endpoint("app", "app").await;
    assert_eq!(
        ep["requests"], 1,
        "only the small request was forwarded: {ep}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_is_504_and_refused_connect_is_502() {
    let up = Upstream::start("slow").await;
    let closed = free_addr(); // Nothing listens here.
    let config = |listen: SocketAddr| {
        format!(
            r#"
[[listeners]]
name = "web"
bind = "{listen}"

[services.slow]
request_timeout = "500ms"
endpoints = [{slow}]

[services.gone]
endpoints = [{{ id = "gone", address = "{closed}" }}]

[routes.slow]
path_prefix = "/"
service = "slow"

[routes.gone]
path_prefix = "/gone"
service = "gone"
"#,
            slow = endpoint_line(&up, ""),
        )
    };
    let proxy = Proxy::start(|| config(free_addr())).await;
    let client = plain_client();

    let started = Instant::now();
    let resp = client
        .get(proxy.url("/slow?ms=5000"))
        .send()
        .await
        .expect("GET /slow");
    let took = started.elapsed();
    assert_eq!(
        resp.status(),
        504,
        "an upstream slower than request_timeout"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "the 504 came after {took:?}, not after about 500 ms"
    );
    // Within the timeout all is well.
    let resp = client
        .get(proxy.url("/slow?ms=50"))
        .send()
        .await
        .expect("GET /slow");
    assert_eq!(resp.status(), 200);

    let resp = client
        .get(proxy.url("/gone/x"))
        .send()
        .await
        .expect("GET /gone");
    assert_eq!(resp.status(), 502, "nothing listens at the endpoint");
    let body = resp.text().await.unwrap_or_default();
    assert!(
        !body.contains(&closed.to_string()),
        "the upstream's address stays out of the client's answer: {body}"
    );

    let slow = proxy.endpoint("slow", "slow").await;
    // At least one: a retry policy may have tried again before the 504.
    assert!(
        slow["failures"].as_u64().unwrap_or(0) >= 1,
        "the timeout counts as a failure: {slow}"
    );
    let gone = proxy.endpoint("gone", "gone").await;
    assert!(
        gone["failures"].as_u64().unwrap_or(0) >= 1,
        "the refused connect counts as a failure: {gone}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_extra_clients_until_one_leaves() {
    let up = Upstream::start("app").await;
    let service = format!("endpoints = [{}]", endpoint_line(&up, ""));
    let proxy = Proxy::start(|| limited(free_addr(), "max_connections = 1", &service)).await;

    let mut first = TcpStream::connect(proxy.addr()).await.expect("connect");
    first
        .write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    assert_eq!(read_response(&mut first).await.status, 200);

    // The second client gets through the kernel's backlog but no answer
    // while the first one holds the only slot.
    let mut second = TcpStream::connect(proxy.addr()).await.expect("connect");
    second
        .write_all(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), second.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the second client was served while the first held the only connection: {early:?}"
    );

    drop(first);
    let r = read_response(&mut second).await;
    assert_eq!(r.status, 200, "served once the first client left: {r:?}");
    assert_eq!(r.json()["path"], "/second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_max_connections_on_reload_takes_effect_once_connections_leave() {
    let up = Upstream::start("app").await;
    let service = format!("endpoints = [{}]", endpoint_line(&up, ""));
    let proxy = Proxy::start(|| limited(free_addr(), "max_connections = 3", &service)).await;

    // Three clients hold every slot while the limit drops to 1.
    let mut held = Vec::new();
    for i in 0..3 {
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        s.write_all(format!("GET /held{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .expect("send");
        assert_eq!(read_response(&mut s).await.status, 200);
        held.push(s);
    }
    let config = limited(proxy.addr(), "max_connections = 1", &service);
    proxy.reload(&config).await;

    // They leave; the proxy has closed each of them when this is done.
    for mut s in held {
        s.shutdown().await.expect("half-close");
        wait_closed(&mut s, Duration::from_secs(5)).await;
    }

    let mut first = TcpStream::connect(proxy.addr()).await.expect("connect");
    first
        .write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    assert_eq!(read_response(&mut first).await.status, 200);
    let mut second = TcpStream::connect(proxy.addr()).await.expect("connect");
    second
        .write_all(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), second.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "max_connections is 1 after the reload, yet a second client was served"
    );
    drop(first);
    assert_eq!(read_response(&mut second).await.status, 200);
}

/// A gauge's value in the proxy's `/metrics`; it must be there.
async fn gauge(proxy: &Proxy, name: &str) -> i64 {
    let value = proxy
        .metric(name)
        .await
        .unwrap_or_else(|| panic!("no {name} in /metrics"));
    value as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_parks_and_serves_its_next_requests() {
    let up = Upstream::start("app").await;
    let service = format!("endpoints = [{}]", endpoint_line(&up, ""));
    let global = "idle_timeout = \"30s\"\nheader_read_timeout = \"5s\"";
    let proxy = Proxy::start(|| limited(free_addr(), global, &service)).await;
    let parked = "pointsman_client_connections_parked";

    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    assert_eq!(read_response(&mut s).await.status, 200);
    // Idle past the park delay (250 ms): it waits without HTTP state.
    wait_for(
        Duration::from_secs(5),
        "the idle connection to park",
        || async { gauge(&proxy, parked).await == 1 },
    )
    .await;
    assert_eq!(gauge(&proxy, "pointsman_client_connections").await, 1);

    // The next request on it is served as usual.
    s.write_all(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send after parking");
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/second");

    // A head that arrives in pieces, slower than the park delay, keeps the
    // connection in hyper's hands: nothing of it is lost.
    wait_for(
        Duration::from_secs(5),
        "the connection to park again",
        || async { gauge(&proxy, parked).await == 1 },
    )
    .await;
    s.write_all(b"GET /slow-head HTTP/1.1\r\n")
        .await
        .expect("send half a head");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        gauge(&proxy, parked).await,
        0,
        "a half-read head must not park"
    );
    s.write_all(b"Host: a\r\n\r\n")
        .await
        .expect("send the rest");
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/slow-head");

    // Two pipelined requests sent to a parked connection both get answers.
    wait_for(
        Duration::from_secs(5),
        "the connection to park a third time",
        || async { gauge(&proxy, parked).await == 1 },
    )
    .await;
    s.write_all(
        b"GET /p1 HTTP/1.1\r\nHost: a\r\n\r\nGET /p2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("send two requests at once");
    let (_, got) = wait_closed(&mut s, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    assert!(text.contains("/p1") && text.contains("/p2"), "{text}");
    wait_for(
        Duration::from_secs(5),
        "the closed connection to be gone",
        || async { gauge(&proxy, "pointsman_client_connections").await == 0 },
    )
    .await;
    assert_eq!(gauge(&proxy, parked).await, 0);
}
