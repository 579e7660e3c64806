//! End to end: the retry side of the traffic-safety layer. A request whose
//! endpoint refuses the connection is tried again on another endpoint; one
//! whose endpoint dies, resets before answering or says 503 only when that
//! is safe (an idempotent method, for a reset or a timeout only with
//! `idempotent_after_send`, and a body that can be sent again), and never
//! when it is not (a POST that reached the upstream, a body larger than
//! `replay_limit` already partly sent). The retry budget bounds how many
//! retries run at once.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// What a load run saw: per request, when it ended (since the start), its
/// status (or the client error), and which upstream answered.
#[derive(Debug, Clone)]
struct Seen {
    at: Duration,
    result: Result<u16, String>,
    server: String,
}

/// `workers` keep-alive clients sending GET `url` back to back until
/// `duration` has passed since `start`.
async fn get_load(url: String, workers: usize, start: Instant, duration: Duration) -> Vec<Seen> {
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while start.elapsed() < duration {
                let (result, server) = match client.get(&url).send().await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        match resp.bytes().await {
                            Ok(body) => {
                                let echo: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                let server = echo["server"].as_str().unwrap_or("").to_string();
                                (Ok(status), server)
                            }
                            Err(e) => (Err(format!("body: {e}")), String::new()),
                        }
                    }
                    Err(e) => (Err(format!("{e:?}")), String::new()),
                };
                seen.push(Seen {
                    at: start.elapsed(),
                    result,
                    server,
                });
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("a load worker panicked"));
    }
    all.sort_by_key(|s| s.at);
    all
}

fn failed(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter().filter(|s| s.result != Ok(200)).collect()
}

/// The proxy's WARN and ERROR log lines.
fn warnings(proxy: &Proxy) -> String {
    proxy
        .stderr()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn sigkill(pid: u32) {
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill -KILL");
    assert!(status.success(), "kill -KILL {pid} failed: {status}");
}

/// Requests an in-process server saw, by method.
#[derive(Default)]
struct Hits {
    by_method: Mutex<BTreeMap<String, usize>>,
    total: AtomicUsize,
}

impl Hits {
    fn of(&self, method: &str) -> usize {
        *self.by_method.lock().unwrap().get(method).unwrap_or(&0)
    }
    fn count(&self, method: &str) {
        *self
            .by_method
            .lock()
            .unwrap()
            .entry(method.to_string())
            .or_insert(0) += 1;
        self.total.fetch_add(1, SeqCst);
    }
}

/// An in-process HTTP server that reads each request's body, counts it,
/// waits `delay`, and answers `status` with `{"server":NAME,"received":N}`.
async fn counting_server(name: &str, status: u16, delay: Duration) -> (Server, Arc<Hits>) {
    let hits = Arc::new(Hits::default());
    let (h, name) = (hits.clone(), name.to_string());
    let server = http_server(move |req| {
        let (h, name) = (h.clone(), name.clone());
        async move {
            let method = req.method().to_string();
            let received = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            h.count(&method);
            tokio::time::sleep(delay).await;
            let body = format!("{{\"server\":\"{name}\",\"received\":{received}}}");
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = StatusCode::from_u16(status).expect("a status");
            r
        }
    })
    .await;
    (server, hits)
}

/// A raw server that reads a request head and at most `body_bytes` of its
/// body (as much as Content-Length says, if less), then resets the
/// connection without answering. Counts the requests it saw.
async fn resetting_server(body_bytes: usize) -> (RawServer, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 16 * 1024];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                h.fetch_add(1, SeqCst);
                let (_, headers) = parse_head(&buf[..head_end]);
                let length: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let want = length.min(body_bytes);
                let mut got = buf.len() - head_end;
                while got < want {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    (RawServer { addr, task }, hits)
}

/// Sends a `method` request with a body of `len` bytes and a cookie on a
/// raw connection, writing the body while reading the answer (the proxy
/// may answer before it has read the whole body).
async fn raw_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: &str,
    len: usize,
) -> RawResponse {
    let s = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let (mut r, mut w) = s.into_split();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nCookie: {cookie}\r\nContent-Length: {len}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        w.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await?;
            left -= n;
        }
        Ok::<_, std::io::Error>(w)
    });
    let resp = read_response(&mut r).await;
    writer.abort();
    resp
}

/// A task serving on a loopback port; aborted when dropped.
struct RawServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `n` concurrent GETs; each one's status and time.
async fn burst(url: String, n: usize) -> Vec<(u16, Duration)> {
    let client = plain_client();
    let go = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, url, go) = (client.clone(), url.clone(), go.clone());
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let start = Instant::now();
            let status = client.get(&url).send().await.expect("GET").status();
            (status.as_u16(), start.elapsed())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a client task"));
    }
    out
}

/// A service whose two endpoints answer 503 after `delay`, with retries on
/// 503 limited by `budget_percent` and no passive ejection.
fn failing_service(listen: SocketAddr, eps: &[String], budget_percent: u32) -> String {
    let settings = format!(
        "retry = {{ attempts = 3, on_status = [503], budget_percent = {budget_percent} }}\n\
         passive = {{ consecutive_failures = 0 }}"
    );
    web(listen, &settings, eps)
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_upstream_under_get_load_fails_no_request() {
    let ups = Upstream::start_many(&["k1", "k2", "k3"]).await;
    let eps: Vec<String> = ups.iter().map(|u| endpoint_line(u, "")).collect();
    // One endpoint of three holds about a third of the requests in flight,
    // and all of them need a retry at the same moment. GETs may be sent
    // again after their bytes went out when the service allows it; resets
    // before any answer are retried elsewhere without spending the retry
    // budget, so nothing must be lost.
    let settings = "retry = { idempotent_after_send = true }";
    let proxy = Proxy::start(|| web(free_addr(), settings, &eps)).await;

    // Each answer takes 20 ms, so k1 always has requests in flight.
    let url = proxy.url("/slow?ms=20");
    let start = Instant::now();
    let load = tokio::spawn(get_load(url, 32, start, Duration::from_millis(2500)));
    tokio::time::sleep(Duration::from_millis(900)).await;
    let killed_at = start.elapsed();
    sigkill(ups[0].pid());
    let seen = load.await.expect("the load task");

    let bad = failed(&seen);
    assert!(
        bad.is_empty(),
        "{} of {} GETs failed around the SIGKILL of k1 (first: {:?}); the proxy logged:\n{}",
        bad.len(),
        seen.len(),
        bad.iter().take(5).collect::<Vec<_>>(),
        warnings(&proxy)
    );
    assert!(
        seen.len() >= 300,
        "too little load to mean anything: {}",
        seen.len()
    );
    let k1: Vec<&Seen> = seen.iter().filter(|s| s.server == "k1").collect();
    assert!(!k1.is_empty(), "k1 served nothing before it was killed");
    // Nothing answers from a dead process (slack for answers in transit).
    let late = |s: &Seen| s.at > killed_at + Duration::from_millis(200);
    assert_eq!(
        k1.iter().filter(|s| late(s)).count(),
        0,
        "k1 answered after it was killed"
    );
    let served_after = seen.iter().filter(|s| late(s)).count();
    assert!(
        served_after >= 100,
        "the load went on after the kill: {served_after}"
    );
    // k1 was sent requests it never answered (in flight when it died):
    // every one of them was answered by k2 or k3.
    let k1_view = proxy.endpoint("web", "k1").await;
    let sent = k1_view["requests"].as_u64().unwrap_or(0);
    let answered = k1_view["responses"][1].as_u64().unwrap_or(0);
    assert!(
        sent > answered,
        "k1 had requests in flight when it was killed: {k1_view}"
    );
    assert!(
        k1_view["failures"].as_u64().unwrap_or(0) >= 1,
        "the killed endpoint's failures were counted: {k1_view}"
    );
}

/// An app that answers 503 while it shuts down (seed 003's recipe), its
/// health check first: each of three instances in turn fails its check
/// until the proxy sees it down, then answers 503 to everything (requests
/// still in flight to it, and checks) for 1.2 s, then serves
/// again, under 64 clients and the default retry settings. The 503s come
/// from an endpoint the proxy knows is failing, so they are retried
/// without the budget, and no client sees one. (A 503 before the check
/// has said anything is retried within the budget only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_apps_that_answer_503_while_stopping_fails_no_request() {
    use std::sync::atomic::AtomicU8;
    // 0 serving, 1 failing its check, 2 answering 503 to everything.
    const SERVING: u8 = 0;
    const UNREADY: u8 = 1;
    const STOPPING: u8 = 2;
    let names = ["s1", "s2", "s3"];
    let mut servers = Vec::new();
    let mut phases = Vec::new();
    for name in names {
        let phase = Arc::new(AtomicU8::new(SERVING));
        let p = phase.clone();
        let server = http_server(move |req| {
            let now = p.load(SeqCst);
            let health = req.uri().path() == "/healthz";
            async move {
                let (status, body) = match now {
                    STOPPING => (503, "shutting down".to_string()),
                    UNREADY if health => (503, "shutting down".to_string()),
                    _ => (200, format!("{{\"server\":\"{name}\"}}")),
                };
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = StatusCode::from_u16(status).expect("a status");
                r
            }
        })
        .await;
        servers.push(server);
        phases.push(phase);
    }
    let eps: Vec<String> = names
        .iter()
        .zip(&servers)
        .map(|(n, s)| ep(n, s.addr))
        .collect();
    let settings = "check = { http = \"/healthz\", interval = \"100ms\", timeout = \"200ms\", rise = 1, fall = 1 }";
    let proxy = Proxy::start(|| web(free_addr(), settings, &eps)).await;
    let deadline = Duration::from_secs(5);
    for n in names {
        wait_for(deadline, "every instance is up", || async {
            proxy.endpoint("web", n).await["healthy"] == true
        })
        .await;
    }

    let start = Instant::now();
    let load = tokio::spawn(get_load(
        proxy.url("/"),
        64,
        start,
        Duration::from_millis(8500),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (phase, n) in phases.iter().zip(names) {
        phase.store(UNREADY, SeqCst);
        // The app stops once its check has taken it out (as a stop
        // script that waits for it would).
        wait_for(deadline, "the proxy sees the instance down", || async {
            proxy.endpoint("web", n).await["healthy"] == false
        })
        .await;
        phase.store(STOPPING, SeqCst);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        phase.store(SERVING, SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seen = load.await.expect("the load task");
    let bad = failed(&seen);
    assert!(
        bad.is_empty(),
        "{} of {} GETs failed (first: {:?}); the proxy logged:\n{}",
        bad.len(),
        seen.len(),
        bad.iter().take(5).collect::<Vec<_>>(),
        warnings(&proxy)
    );
    assert!(seen.len() >= 1000, "too little load: {}", seen.len());
    for n in names {
        assert!(seen.iter().any(|s| s.server == n), "{n} served");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_for_get_but_a_post_is_not() {
    let (down, down_hits) = counting_server("down", 503, Duration::ZERO).await;
    let (good, good_hits) = counting_server("good", 200, Duration::ZERO).await;
    // Sticky on `down` so every first try lands there; passive checks off
    // so `down` is never ejected.
    let settings = "balance = \"cookie\"\npassive = { consecutive_failures = 0 }";
    let eps = [ep("down", down.addr), ep("good", good.addr)];
    let proxy = Proxy::start(|| web(free_addr(), settings, &eps)).await;
    let client = plain_client();
    let cookie = ("cookie", "SERVERID=down");

    for i in 0..10 {
        let (status, echo) = get_echo(&client, &proxy.url("/x"), &[cookie]).await;
        assert_eq!(status, 200, "GET {i}: a 503 is retried elsewhere: {echo}");
        assert_eq!(echo["server"], "good", "GET {i}");
    }
    assert_eq!(down_hits.of("GET"), 10, "each GET tried `down` first");
    assert_eq!(good_hits.of("GET"), 10, "and was retried on `good`");

    // PUT is idempotent: retried too.
    let resp = client
        .put(proxy.url("/x"))
        .header(cookie.0, cookie.1)
        .body("put body")
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status(), 200, "an idempotent PUT is retried");
    assert_eq!((down_hits.of("PUT"), good_hits.of("PUT")), (1, 1));

    // POST is not idempotent: the 503 is the answer, sent once.
    let resp = client
        .post(proxy.url("/x"))
        .header(cookie.0, cookie.1)
        .body("a small body")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 503, "a POST's 503 reaches the client");
    let body = resp.text().await.unwrap_or_default();
    assert!(body.contains("\"down\""), "the 503 is down's own: {body}");
    assert_eq!(down_hits.of("POST"), 1, "the POST went to `down` once");
    assert_eq!(good_hits.of("POST"), 0, "and was not retried on `good`");

    // Every retry is counted for the service: 10 GETs and 1 PUT.
    let services = proxy.services().await;
    let web = services
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "web"))
        .expect("service web in /api/services");
    assert_eq!(web["retries"], 11, "{web}");
    assert_eq!(
        proxy
            .metric("pointsman_service_retries_total{service=\"web\"}")
            .await,
        Some(11.0)
    );
}

/// An app that answers 503 while it shuts down (seed 003's recipe): once
/// the proxy knows it is leaving (here: draining, with sessions still
/// bound to it by their cookie), its 503 goes elsewhere even though 503 is
/// not one of the service's retry statuses; from a ready endpoint the same
/// 503 is the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_from_a_draining_endpoint_is_retried_whatever_on_status_says() {
    let (leaving, leaving_hits) = counting_server("leaving", 503, Duration::ZERO).await;
    let (good, good_hits) = counting_server("good", 200, Duration::ZERO).await;
    let settings = "balance = \"cookie\"\nretry = { on_status = [] }\n\
                    passive = { consecutive_failures = 0 }";
    let config = |state: &str| {
        let eps = [
            format!(
                "{{ id = \"leaving\", address = \"{}\", state = \"{state}\" }}",
                leaving.addr
            ),
            ep("good", good.addr),
        ];
        move |listen| web(listen, settings, &eps)
    };
    let proxy = Proxy::start(|| config("ready")(free_addr())).await;
    let client = plain_client();
    let cookie = ("cookie", "SERVERID=leaving");

    // Ready: its 503 is relayed, as on_status lists nothing.
    let (status, echo) = get_echo(&client, &proxy.url("/x"), &[cookie]).await;
    assert_eq!(status, 503, "a ready endpoint's 503 is the answer: {echo}");
    assert_eq!(echo["server"], "leaving");

    proxy.reload(&config("drain")(proxy.addr())).await;
    for i in 0..5 {
        let (status, echo) = get_echo(&client, &proxy.url("/x"), &[cookie]).await;
        assert_eq!(
            status, 200,
            "GET {i}: the draining endpoint's 503 is retried: {echo}"
        );
        assert_eq!(echo["server"], "good", "GET {i}");
    }
    assert_eq!(
        leaving_hits.of("GET"),
        6,
        "each GET went to its session's endpoint first"
    );
    assert_eq!(good_hits.of("GET"), 5);

    // A POST reached the app: its 503 is the answer, sent once.
    let resp = client
        .post(proxy.url("/x"))
        .header(cookie.0, cookie.1)
        .body("order")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 503, "a POST is never sent twice");
    assert_eq!((leaving_hits.of("POST"), good_hits.of("POST")), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_on_a_good_endpoint() {
    let ups = Upstream::start_many(&["c1", "c2"]).await;
    let closed = free_addr(); // Nothing listens here.
    let eps = [
        endpoint_line(&ups[0], ""),
        ep("closed", closed),
        endpoint_line(&ups[1], ""),
    ];
    // Passive checks off, so `closed` stays in the rotation and a third of
    // all picks fail to connect; refused connects do not spend the retry
    // budget, so with the default budget every one of them is retried.
    let settings = "passive = { consecutive_failures = 0 }";
    let proxy = Proxy::start(|| web(free_addr(), settings, &eps)).await;

    let seen = get_load(
        proxy.url("/"),
        8,
        Instant::now(),
        Duration::from_millis(1500),
    )
    .await;
    let bad = failed(&seen);
    assert!(
        bad.is_empty(),
        "{} of {} GETs failed with an endpoint on a closed port (first: {:?})",
        bad.len(),
        seen.len(),
        bad.iter().take(5).collect::<Vec<_>>()
    );
    assert!(seen.len() >= 100, "too little load: {}", seen.len());

    // The body is handed over only once connected: a POST is retried too.
    let client = plain_client();
    for i in 0..6 {
        let resp = client
            .post(proxy.url("/upload"))
            .body(vec![b'p'; 1000])
            .send()
            .await
            .expect("POST /upload");
        assert_eq!(resp.status(), 200, "POST {i}");
    }
    let closed_view = proxy.endpoint("web", "closed").await;
    let tried = closed_view["failures"].as_u64().unwrap_or(0) as usize;
    assert!(
        tried >= (seen.len() + 6) / 4,
        "about a third of the picks went to the closed endpoint and were retried: \
         {tried} of {} requests: {closed_view}",
        seen.len() + 6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_replay_limit_is_not_retried_but_a_small_idempotent_one_is() {
    // Reads 64 KiB of any body, then resets.
    let (resetter, resets) = resetting_server(64 * 1024).await;
    let (good, good_hits) = counting_server("good", 200, Duration::ZERO).await;
    let settings = "balance = \"cookie\"\n\
                    retry = { replay_limit = 1024, idempotent_after_send = true }\n\
                    passive = { consecutive_failures = 0 }";
    let eps = [ep("resetter", resetter.addr), ep("good", good.addr)];
    let proxy = Proxy::start(|| web(free_addr(), settings, &eps)).await;

    // 1 MiB: streamed, so once bytes went to `resetter` it cannot be sent
    // again. The client gets a 502; `good` never sees it.
    let resp = raw_send(proxy.addr(), "PUT", "/big", "SERVERID=resetter", 1 << 20).await;
    assert_eq!(
        resp.status,
        502,
        "a body over replay_limit that reached a resetting upstream: {}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(resets.load(SeqCst), 1, "the resetter saw the big PUT");
    assert_eq!(good_hits.of("PUT"), 0, "the big PUT was not retried");

    // 100 bytes: held whole, sent again on `good` after the reset.
    let resp = raw_send(proxy.addr(), "PUT", "/small", "SERVERID=resetter", 100).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let echo = resp.json();
    assert_eq!(echo["server"], "good");
    assert_eq!(echo["received"], 100, "the whole body was replayed");
    assert_eq!(resets.load(SeqCst), 2, "the resetter saw the small PUT");
    assert_eq!(good_hits.of("PUT"), 1);

    // A small POST that reached the resetter is not sent again: the
    // upstream may have acted on it.
    let resp = raw_send(proxy.addr(), "POST", "/small", "SERVERID=resetter", 100).await;
    assert_eq!(resp.status, 502, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resets.load(SeqCst), 3, "the resetter saw the small POST");
    assert_eq!(good_hits.of("POST"), 0, "the POST was not retried");

    // The same big body to `good` streams through: the 502 was the reset.
    let resp = raw_send(proxy.addr(), "PUT", "/big", "SERVERID=good", 1 << 20).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["received"], 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_retries_when_every_endpoint_fails() {
    // Every answer is a 503 after 300 ms, so retries overlap.
    let delay = Duration::from_millis(300);
    let (s1, h1) = counting_server("s1", 503, delay).await;
    let (s2, h2) = counting_server("s2", 503, delay).await;
    let eps = [ep("s1", s1.addr), ep("s2", s2.addr)];
    let proxy = Proxy::start(|| failing_service(free_addr(), &eps, 10)).await;
    let tries = || h1.total.load(SeqCst) + h2.total.load(SeqCst);

    let n = 40;
    let before = tries();
    let results = burst(proxy.url("/"), n).await;
    let with_budget = tries() - before;
    assert!(
        results.iter().all(|(s, _)| *s == 503),
        "every endpoint fails: {results:?}"
    );
    let fast = results
        .iter()
        .filter(|(_, t)| *t < delay * 2 - Duration::from_millis(50))
        .count();
    assert!(
        with_budget <= n + n / 4,
        "budget_percent = 10: {n} requests made {with_budget} tries (3 each would be {})",
        3 * n
    );
    assert!(
        fast >= n * 3 / 4,
        "most clients got their error after one try: {fast} of {n} were fast: {results:?}"
    );

    // The same burst with the budget at 100 %: (nearly) every request
    // retries, so the bound above came from the budget, not the setup.
    proxy
        .reload(&failing_service(proxy.addr(), &eps, 100))
        .await;
    let before = tries();
    let results = burst(proxy.url("/"), n).await;
    let without = tries() - before;
    assert!(results.iter().all(|(s, _)| *s == 503));
    assert!(
        without >= 2 * n,
        "budget_percent = 100: {n} requests made only {without} tries"
    );

    // And the proxy is still well.
    let resp = plain_client()
        .get(proxy.admin_url("/healthz"))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(resp.status(), 200, "the proxy's admin still answers");
}

/// A request that already holds a retry slot gives it back when it takes
/// the next one; it must not need two at once. With the budget at 100 %
/// (as many retries in flight as requests in flight), `attempts = 3` and
/// every endpoint failing, every request gets its three tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_retry_budget_lets_every_request_make_all_its_attempts() {
    let delay = Duration::from_millis(300);
    let (s1, h1) = counting_server("s1", 503, delay).await;
    let (s2, h2) = counting_server("s2", 503, delay).await;
    let eps = [ep("s1", s1.addr), ep("s2", s2.addr)];
    let proxy = Proxy::start(|| failing_service(free_addr(), &eps, 100)).await;

    let n = 40;
    let results = burst(proxy.url("/"), n).await;
    assert!(results.iter().all(|(s, _)| *s == 503), "{results:?}");
    let tries = h1.total.load(SeqCst) + h2.total.load(SeqCst);
    assert_eq!(
        tries,
        3 * n,
        "budget_percent = 100 and attempts = 3: {n} concurrent requests should make {} tries",
        3 * n
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_past_per_try_timeout_is_retried_for_get_but_not_for_post() {
    let silent = silent_server().await;
    let (good, good_hits) = counting_server("good", 200, Duration::ZERO).await;
    let settings = "balance = \"cookie\"\n\
                    retry = { per_try_timeout = \"300ms\", idempotent_after_send = true }\n\
                    passive = { consecutive_failures = 0 }";
    let eps = [ep("silent", silent.addr), ep("good", good.addr)];
    let proxy = Proxy::start(|| web(free_addr(), settings, &eps)).await;
    let client = plain_client();
    let cookie = ("cookie", "SERVERID=silent");

    let start = Instant::now();
    let (status, echo) = get_echo(&client, &proxy.url("/"), &[cookie]).await;
    let took = start.elapsed();
    assert_eq!(
        status, 200,
        "a GET that timed out on `silent` is retried: {echo}"
    );
    assert_eq!(echo["server"], "good");
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(2),
        "after one per-try timeout: {took:?}"
    );

    let start = Instant::now();
    let resp = client
        .post(proxy.url("/"))
        .header(cookie.0, cookie.1)
        .body("a small body")
        .send()
        .await
        .expect("POST");
    let took = start.elapsed();
    assert_eq!(
        resp.status(),
        504,
        "a POST that timed out is not sent again"
    );
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(2),
        "one per-try timeout: {took:?}"
    );
    assert_eq!(good_hits.of("POST"), 0, "the POST did not go to `good`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_route_switch_goes_to_the_new_service() {
    let silent = silent_server().await;
    let (new, new_hits) = counting_server("new", 200, Duration::ZERO).await;
    let config = |listen: SocketAddr, to: &str| {
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\n\n\
             [routes.all]\nservice = \"{to}\"\n\n\
             [services.old]\nendpoints = [{}]\n\
             retry = {{ per_try_timeout = \"1500ms\", idempotent_after_send = true }}\n\
             passive = {{ consecutive_failures = 0 }}\n\n\
             [services.new]\nendpoints = [{}]\n",
            ep("silent", silent.addr),
            ep("new", new.addr)
        )
    };
    let proxy = Proxy::start(|| config(free_addr(), "old")).await;
    let client = plain_client();

    let start = Instant::now();
    let url = proxy.url("/");
    let request = tokio::spawn(async move { get_echo(&client, &url, &[]).await });
    // The first try waits on `silent`; meanwhile the route moves to `new`.
    wait_for(
        Duration::from_secs(1),
        "the first try is in flight to old/silent",
        || async { proxy.endpoint("old", "silent").await["in_flight"] == 1 },
    )
    .await;
    proxy.reload(&config(proxy.addr(), "new")).await;
    assert!(
        start.elapsed() < Duration::from_millis(1400),
        "the reload took longer than the first try: the test proves nothing"
    );
    let (status, echo) = request.await.expect("the request task");
    let took = start.elapsed();
    assert_eq!(status, 200, "the retry is answered: {echo}");
    assert_eq!(
        echo["server"], "new",
        "the retry went where the route points now, not to the old service"
    );
    assert!(
        took >= Duration::from_millis(1400),
        "answered after the first try timed out: {took:?}"
    );
    assert_eq!(new_hits.of("GET"), 1);
}
