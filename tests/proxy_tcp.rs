//! End to end: a `mode = "tcp"` listener in front of in-process TCP echo
//! servers. Bytes round-trip, a client's half-close reaches the upstream
//! while the way back stays open, and connections are balanced.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

fn tcp_config(listen: SocketAddr, upstreams: &[(&str, SocketAddr)]) -> String {
    let eps: Vec<String> = upstreams
        .iter()
        .map(|(id, addr)| format!("{{ id = \"{id}\", address = \"{addr}\" }}"))
        .collect();
    format!(
        r#"
[[listeners]]
name = "tcp"
bind = "{listen}"
mode = "tcp"
default_service = "echo"

[services.echo]
endpoints = [{}]
"#,
        eps.join(", ")
    )
}

async fn read_exact_within(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("bytes back within 10 s")
        .expect("read the echo");
    buf
}

async fn read_to_end_within(s: &mut TcpStream) -> String {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the upstream closes within 10 s")
        .expect("read to the end");
    String::from_utf8_lossy(&rest).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_round_trip_and_half_close_passes_through() {
    let echo = tcp_echo_server("t1").await;
    let proxy = Proxy::start(|| tcp_config(free_addr(), &[("t1", echo.addr)])).await;

    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    s.write_all(b"hello").await.expect("send");
    assert_eq!(read_exact_within(&mut s, 5).await, b"hello");

    // A megabyte each way at once: nothing is lost or reordered.
    let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("send 1 MiB");
        w
    });
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut back))
        .await
        .expect("1 MiB back within 10 s")
        .expect("read 1 MiB");
    assert!(back == data, "the megabyte came back changed");
    let mut w = writer.await.expect("writer task");

    // Half-close: the upstream sees EOF and can still answer.
    w.shutdown().await.expect("shut down our write side");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest))
        .await
        .expect("the upstream answers after our EOF within 10 s")
        .expect("read after half-close");
    assert_eq!(
        String::from_utf8_lossy(&rest),
        format!("t1 saw EOF after {} bytes", 5 + data.len()),
        "the upstream's answer after our half-close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_balanced_across_upstreams() {
    let a = tcp_echo_server("ta").await;
    let b = tcp_echo_server("tb").await;
    let proxy = Proxy::start(|| tcp_config(free_addr(), &[("ta", a.addr), ("tb", b.addr)])).await;

    // The start-up probe's connections took turns too: let them finish so
    // that the turns below start from a known state.
    let p = &proxy;
    wait_for(
        Duration::from_secs(5),
        "the probe connections are done",
        || async move {
            let all = p.services().await;
            let eps = all[0]["endpoints"].as_array().cloned().unwrap_or_default();
            let sum = |k: &str| eps.iter().map(|e| e[k].as_u64().unwrap_or(0)).sum::<u64>();
            sum("requests") == p.probes as u64 && sum("in_flight") == 0
        },
    )
    .await;

    let mut order = Vec::new();
    for i in 0..6 {
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        let msg = format!("conn{i}");
        s.write_all(msg.as_bytes()).await.expect("send");
        assert_eq!(read_exact_within(&mut s, msg.len()).await, msg.as_bytes());
        s.shutdown().await.expect("half-close");
        let bye = read_to_end_within(&mut s).await;
        let name = bye.split(' ').next().unwrap_or("").to_string();
        assert_eq!(bye, format!("{name} saw EOF after {} bytes", msg.len()));
        order.push(name);
    }
    let mut counts = BTreeMap::new();
    for n in &order {
        *counts.entry(n.as_str()).or_insert(0) += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([("ta", 3), ("tb", 3)]),
        "round robin by connection: {order:?}"
    );
    for w in order.windows(2) {
        assert_ne!(w[0], w[1], "consecutive connections alternate: {order:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_on_another_endpoint() {
    let live = tcp_echo_server("live").await;
    let dead = free_addr(); // Nothing listens here.
    let proxy =
        Proxy::start(|| tcp_config(free_addr(), &[("dead", dead), ("live", live.addr)])).await;

    // Round robin sends every other connection to the dead endpoint first.
    for i in 0..4 {
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        let msg = format!("try{i}");
        s.write_all(msg.as_bytes()).await.expect("send");
        assert_eq!(read_exact_within(&mut s, msg.len()).await, msg.as_bytes());
        s.shutdown().await.expect("half-close");
        assert_eq!(
            read_to_end_within(&mut s).await,
            format!("live saw EOF after {} bytes", msg.len()),
            "connection {i} reached the live endpoint"
        );
    }
    let dead = proxy.endpoint("echo", "dead").await;
    assert!(
        dead["failures"].as_u64().unwrap_or(0) >= 2,
        "the dead endpoint was tried and counted as failing: {dead}"
    );
    assert_eq!(dead["requests"], 0, "{dead}");
}
