//! End to end: `endpoint_max_connections` and the service queue (HAProxy's
//! server `maxconn` and `timeout queue`). An endpoint never has more
//! requests in flight than its limit; the others wait in arrival order and
//! are served as slots free up, or get 503 after `queue_timeout`. The
//! queue shows in `/stats;csv` (`qcur`, `qmax`, `qtime`, `slim`) and in
//! `/metrics`.

mod support;

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use support::*;

/// Requests in flight in an upstream now and the most at once.
#[derive(Default)]
struct Concurrency {
    now: AtomicU32,
    most: AtomicU32,
}

/// An in-process upstream that answers every request after `delay`,
/// counting how many it serves at once.
async fn slow_server(delay: Duration) -> (Server, Arc<Concurrency>) {
    let seen = Arc::new(Concurrency::default());
    let s = seen.clone();
    let server = http_server(move |_req| {
        let s = s.clone();
        async move {
            let now = s.now.fetch_add(1, SeqCst) + 1;
            s.most.fetch_max(now, SeqCst);
            tokio::time::sleep(delay).await;
            s.now.fetch_sub(1, SeqCst);
            Response::new(Full::new(Bytes::from_static(b"done")))
        }
    })
    .await;
    (server, seen)
}

/// `n` GETs at once, each on its own connection: (status, time taken).
async fn burst(url: &str, n: usize) -> Vec<(u16, Duration, String)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let started = Instant::now();
                let resp = plain_client()
                    .get(&url)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("GET {url}: {e}"));
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap_or_default();
                (status, started.elapsed(), body)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a request"));
    }
    out
}

/// Column `name` of row `pxname,svname` in a `show stat` CSV.
fn stat(csv: &str, pxname: &str, svname: &str, name: &str) -> String {
    let header: Vec<&str> = csv
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let i = header
        .iter()
        .position(|h| *h == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    csv.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&pxname) && f.get(1) == Some(&svname))
        .and_then(|f| f.get(i).map(|v| v.to_string()))
        .unwrap_or_else(|| panic!("no row {pxname},{svname}:\n{csv}"))
}

async fn stats_csv(proxy: &Proxy) -> String {
    plain_client()
        .get(proxy.admin_url("/stats;csv"))
        .send()
        .await
        .expect("GET /stats;csv")
        .text()
        .await
        .expect("the CSV")
}

/// 20 slow requests at once to one endpoint limited to 2: never more than
/// 2 reach it, every one is served, 18 of them after queueing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_gets_at_most_its_limit_and_the_rest_queue() {
    let (up, seen) = slow_server(Duration::from_millis(200)).await;
    let settings = "endpoint_max_connections = 2\nqueue_timeout = \"20s\"";
    let proxy = Proxy::start(|| web(free_addr(), settings, &[ep("slow", up.addr)])).await;

    let results = burst(&proxy.url("/"), 20).await;
    let failed: Vec<_> = results.iter().filter(|(s, _, _)| *s != 200).collect();
    assert!(failed.is_empty(), "every request is served: {failed:?}");
    assert_eq!(seen.most.load(SeqCst), 2, "at most 2 in flight, and 2 used");
    let slowest = results.iter().map(|(_, t, _)| *t).max().unwrap_or_default();
    assert!(
        slowest >= Duration::from_millis(1800),
        "20 requests 2 at a time take 10 rounds of 200 ms: {slowest:?}"
    );

    let csv = stats_csv(&proxy).await;
    assert_eq!(stat(&csv, "web", "slow", "slim"), "2");
    assert_eq!(stat(&csv, "web", "BACKEND", "qcur"), "0");
    let qmax: u32 = stat(&csv, "web", "BACKEND", "qmax").parse().expect("qmax");
    assert!((10..=18).contains(&qmax), "qmax {qmax}");
    let qtime: u64 = stat(&csv, "web", "BACKEND", "qtime")
        .parse()
        .expect("qtime");
    assert!(qtime >= 200, "queued requests waited: qtime {qtime} ms");
    let queued = proxy
        .metric("pointsman_service_queued_total{service=\"web\"}")
        .await
        .unwrap_or(0.0);
    assert!(queued >= 10.0, "pointsman_service_queued_total {queued}");
    assert_eq!(
        proxy
            .metric("pointsman_service_queue_length{service=\"web\"}")
            .await,
        Some(0.0)
    );
}

/// Past `queue_timeout`, a queued request gets 503 saying why; the one
/// in flight is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_past_queue_timeout_gets_503() {
    let (up, seen) = slow_server(Duration::from_millis(1500)).await;
    let settings = "endpoint_max_connections = 1\nqueue_timeout = \"300ms\"";
    let proxy = Proxy::start(|| web(free_addr(), settings, &[ep("slow", up.addr)])).await;

    let results = burst(&proxy.url("/"), 5).await;
    let served = results.iter().filter(|(s, _, _)| *s == 200).count();
    let refused: Vec<_> = results.iter().filter(|(s, _, _)| *s == 503).collect();
    assert_eq!((served, refused.len()), (1, 4), "{results:?}");
    for (_, took, body) in &refused {
        assert!(body.contains("connection limit"), "{body}");
        assert!(
            *took >= Duration::from_millis(300) && *took < Duration::from_millis(1400),
            "503 after queue_timeout, not after the slow answer: {took:?}"
        );
    }
    assert_eq!(seen.most.load(SeqCst), 1);
}
