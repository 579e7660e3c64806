//! Upstream keep-alive connections: reused across requests, closed when
//! their endpoint drains; and the single-event-loop mode (`--threads 1`)
//! serving like the thread-per-core default.

mod support;

use support::*;

/// Sends `n` GETs on one keep-alive client; every one must succeed.
async fn requests(proxy: &Proxy, n: usize) -> Vec<String> {
    let c = client();
    let mut served = Vec::with_capacity(n);
    for i in 0..n {
        let r = c
            .get(format!("http://{}/r{i}", proxy.addr()))
            .send()
            .await
            .expect("request through the proxy");
        assert_eq!(r.status(), 200, "request {i}");
        let v: serde_json::Value = r.json().await.expect("echo JSON");
        served.push(v["server"].as_str().unwrap_or_default().to_string());
    }
    served
}

fn idle(endpoint: &serde_json::Value) -> u64 {
    endpoint["idle_connections"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_loop_reuses_upstream_connections_and_drain_closes_them() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let eps = |extra: &str| -> Vec<String> {
        vec![endpoint_line(&ups[0], extra), endpoint_line(&ups[1], "")]
    };
    let listen = free_addr();
    let proxy = Proxy::start_with_args(|| web(listen, "", &eps("")), &["--threads", "1"]).await;

    // Sequential requests: each finds the previous one's upstream
    // connection idle in the pool, so at most one per endpoint is open.
    let served = requests(&proxy, 40).await;
    assert_eq!(
        served.iter().filter(|s| *s == "a").count(),
        20,
        "{served:?}"
    );
    let a = proxy.endpoint("web", "a").await;
    assert_eq!(a["requests"], 20);
    assert_eq!(
        idle(&a),
        1,
        "20 sequential requests to a should share one pooled connection: {a}"
    );

    // Draining `a` closes its idle upstream connection; `b` keeps its own.
    proxy
        .reload(&web(listen, "", &eps("state = \"drain\"")))
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let a = proxy.endpoint("web", "a").await;
        if a["state"] == "drain" && idle(&a) == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a drained but its idle upstream connection stayed open: {a}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(idle(&proxy.endpoint("web", "b").await), 1);
    let served = requests(&proxy, 10).await;
    assert!(served.iter().all(|s| s == "b"), "a drains: {served:?}");
}
