//! End to end: health. Active checks take an endpoint out after `fall`
//! failed checks in a row and bring it back after `rise` passes; a new
//! endpoint with a check takes no traffic before its first pass. Passive
//! checks eject an endpoint after a run of failed requests, for a while,
//! and never more than `max_ejected_percent` of a service at once.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::Value;

use support::*;

/// An in-process upstream whose `/healthz` answers 200 or 500 as told,
/// and whose other paths answer `status` with `{"server":NAME}`.
struct Flappy {
    server: Server,
    /// What `/healthz` says: true 200, false 500.
    healthy: Arc<AtomicBool>,
    /// `/healthz` answers given, by outcome.
    passes: Arc<AtomicUsize>,
    fails: Arc<AtomicUsize>,
    /// Other requests.
    traffic: Arc<AtomicUsize>,
    /// Other requests that came before any `/healthz` had passed.
    before_first_pass: Arc<AtomicUsize>,
}

impl Flappy {
    async fn start(name: &str, healthy: bool, status: u16) -> Flappy {
        let healthy = Arc::new(AtomicBool::new(healthy));
        let passes = Arc::new(AtomicUsize::new(0));
        let fails = Arc::new(AtomicUsize::new(0));
        let traffic = Arc::new(AtomicUsize::new(0));
        let before_first_pass = Arc::new(AtomicUsize::new(0));
        let (h, p, f, t, b) = (
            healthy.clone(),
            passes.clone(),
            fails.clone(),
            traffic.clone(),
            before_first_pass.clone(),
        );
        let name = name.to_string();
        let server = http_server(move |req| {
            let (h, p, f, t, b, name) = (
                h.clone(),
                p.clone(),
                f.clone(),
                t.clone(),
                b.clone(),
                name.clone(),
            );
            async move {
                let (code, body) = if req.uri().path() == "/healthz" {
                    if h.load(SeqCst) {
                        p.fetch_add(1, SeqCst);
                        (200, "ok".to_string())
                    } else {
                        f.fetch_add(1, SeqCst);
                        (500, "sick".to_string())
                    }
                } else {
                    if p.load(SeqCst) == 0 {
                        b.fetch_add(1, SeqCst);
                    }
                    t.fetch_add(1, SeqCst);
                    (status, format!("{{\"server\":\"{name}\"}}"))
                };
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = StatusCode::from_u16(code).expect("a status");
                r
            }
        })
        .await;
        Flappy {
            server,
            healthy,
            passes,
            fails,
            traffic,
            before_first_pass,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    fn set_healthy(&self, up: bool) {
        self.healthy.store(up, SeqCst);
    }
}

/// GETs `n` times, one after another; which server answered each (any
/// status), or the status for answers without a server name.
async fn servers(client: &reqwest::Client, url: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (status, echo) = get_echo(client, url, &[]).await;
        out.push(
            echo["server"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("status {status}")),
        );
    }
    out
}

fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

/// GET load in the background until `stop` is set: (requests, non-200s).
fn background_load(
    url: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<u16>)> {
    tokio::spawn(async move {
        let client = client();
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let (mut n, mut bad) = (0, Vec::new());
                while !stop.load(SeqCst) {
                    let status = match client.get(&url).send().await {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    };
                    n += 1;
                    if status != 200 {
                        bad.push(status);
                    }
                }
                (n, bad)
            }));
        }
        let (mut n, mut bad) = (0, Vec::new());
        for t in tasks {
            let (tn, tb) = t.await.expect("a load worker");
            n += tn;
            bad.extend(tb);
        }
        (n, bad)
    })
}

/// `web`'s endpoint `id` in `/api/services`, read with `client` (a
/// keep-alive client, so a sample takes as little time as possible).
async fn admin_view(client: &reqwest::Client, proxy: &Proxy, id: &str) -> Value {
    let all: Value = client
        .get(proxy.admin_url("/api/services"))
        .send()
        .await
        .expect("GET /api/services")
        .json()
        .await
        .expect("/api/services is JSON");
    endpoint_in(&all, "web", id).unwrap_or_else(|| panic!("no endpoint {id}: {all:#}"))
}

const CHECK: &str =
    "check = { http = \"/healthz\", interval = \"100ms\", timeout = \"500ms\", rise = 2, fall = 3 }";

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_check_goes_down_after_fall_failures_and_up_after_rise_passes() {
    let flappy = Flappy::start("flappy", true, 200).await;
    let steady = Upstream::start("steady").await;
    let eps = [ep("flappy", flappy.addr()), endpoint_line(&steady, "")];
    let proxy = Proxy::start(|| web(free_addr(), CHECK, &eps)).await;
    let client = client();
    let url = proxy.url("/");

    let deadline = Duration::from_secs(5);
    wait_for(deadline, "flappy is up after its first check", || async {
        proxy.endpoint("web", "flappy").await["healthy"] == true
    })
    .await;
    let names = servers(&client, &url, 20).await;
    assert_eq!(
        count(&names, "flappy"),
        10,
        "both serve while up: {names:?}"
    );
    let admin = client.clone();
    let started = Instant::now();

    // Down: only after `fall` = 3 failed checks in a row. The admin view
    // is sampled all along, each sample between two readings of the
    // server's count of failed checks.
    let base = flappy.fails.load(SeqCst);
    flappy.set_healthy(false);
    let fails = || flappy.fails.load(SeqCst) - base;
    let mut up_after_a_failure = None;
    let fails_at_down = loop {
        let before = fails();
        let view = admin_view(&admin, &proxy, "flappy").await;
        let after = fails();
        if view["healthy"] == false {
            break after;
        }
        if before >= 1 && view["check"]["passed"] == false {
            up_after_a_failure.get_or_insert((before, view));
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "flappy never went down"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (failed, view) =
        up_after_a_failure.expect("a view of the endpoint, still up, after a failed check");
    assert_eq!(view["check"]["status"], 500, "{view}");
    assert!(failed < 3, "{failed} failed checks and still up; fall = 3");
    assert!(
        (3..=4).contains(&fails_at_down),
        "down after {fails_at_down} failed check(s); fall = 3"
    );

    // No traffic while down.
    let traffic = flappy.traffic.load(SeqCst);
    let names = servers(&client, &url, 30).await;
    assert_eq!(count(&names, "steady"), 30, "{names:?}");
    assert_eq!(
        flappy.traffic.load(SeqCst),
        traffic,
        "flappy got traffic while down"
    );

    // Up: only after `rise` = 2 passed checks in a row.
    let base = flappy.passes.load(SeqCst);
    flappy.set_healthy(true);
    let passes = || flappy.passes.load(SeqCst) - base;
    let mut down_after_a_pass = None;
    let passes_at_up = loop {
        let before = passes();
        let view = admin_view(&admin, &proxy, "flappy").await;
        let after = passes();
        if view["healthy"] == true {
            break after;
        }
        if before >= 1 && view["check"]["passed"] == true {
            down_after_a_pass.get_or_insert((before, view));
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "flappy never came back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (passed, view) =
        down_after_a_pass.expect("a view of the endpoint, still down, after a passed check");
    assert!(
        passed < 2,
        "{passed} passed checks and still down ({view}); rise = 2"
    );
    assert_eq!(
        flappy.traffic.load(SeqCst),
        traffic,
        "no traffic before `rise` passes"
    );
    assert!(
        (2..=3).contains(&passes_at_up),
        "up after {passes_at_up} passed check(s); rise = 2"
    );
    let names = servers(&client, &url, 20).await;
    assert_eq!(count(&names, "flappy"), 10, "traffic is back: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_gets_no_traffic_before_its_first_passing_check() {
    let sick = Flappy::start("sick", false, 200).await;
    let late = Flappy::start("late", true, 200).await;
    let steady = Upstream::start("steady").await;
    let config = |listen: SocketAddr, with_late: bool| {
        let mut eps = vec![ep("sick", sick.addr()), endpoint_line(&steady, "")];
        if with_late {
            eps.push(ep("late", late.addr()));
        }
        web(listen, CHECK, &eps)
    };
    let proxy = Proxy::start(|| config(free_addr(), false)).await;

    // Load from the first moment on.
    let stop = Arc::new(AtomicBool::new(false));
    let load = background_load(proxy.url("/"), 4, stop.clone());
    wait_for(
        Duration::from_secs(5),
        "sick has failed a few checks",
        || async {
            let v = proxy.endpoint("web", "sick").await;
            v["check"]["passed"] == false && sick.fails.load(SeqCst) >= 5
        },
    )
    .await;

    // A new endpoint joins under load: nothing before its first pass.
    proxy.reload(&config(proxy.addr(), true)).await;
    wait_until(Duration::from_secs(5), "late gets traffic", || {
        late.traffic.load(SeqCst) >= 20
    })
    .await;
    stop.store(true, SeqCst);
    let (n, bad) = load.await.expect("the load");

    assert!(n >= 200, "too little load: {n}");
    assert!(bad.is_empty(), "{} of {n} GETs failed: {bad:?}", bad.len());
    assert_eq!(
        sick.traffic.load(SeqCst),
        0,
        "an endpoint whose check never passed got traffic"
    );
    let view = proxy.endpoint("web", "sick").await;
    assert_eq!(view["healthy"], false, "{view}");
    assert_eq!(view["requests"], 0, "{view}");
    assert_eq!(
        late.before_first_pass.load(SeqCst),
        0,
        "the new endpoint got traffic before its first check passed"
    );
    assert!(late.passes.load(SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_takes_a_failing_endpoint_out_and_brings_it_back() {
    let bad = Flappy::start("bad", true, 500).await;
    let good = Upstream::start("good").await;
    let settings = "passive = { consecutive_failures = 3, ejection = \"1s\", max_ejection = \"10s\", max_ejected_percent = 50 }";
    let eps = [ep("bad", bad.addr()), endpoint_line(&good, "")];
    let proxy = Proxy::start(|| web(free_addr(), settings, &eps)).await;
    let client = plain_client();
    let url = proxy.url("/");

    // Round robin: every other request reaches `bad` and gets its 500,
    // until the third one in a row ejects it.
    let mut third_sent = None;
    let mut third_back = None;
    for _ in 0..20 {
        let before = bad.traffic.load(SeqCst);
        let sent = Instant::now();
        let (status, _) = get_echo(&client, &url, &[]).await;
        if bad.traffic.load(SeqCst) > before {
            assert_eq!(status, 500, "bad's 500 is passed on (500 is not retried)");
            if bad.traffic.load(SeqCst) == 3 {
                third_sent = Some(sent);
                third_back = Some(Instant::now());
                break;
            }
        }
    }
    let (third_sent, third_back) = (
        third_sent.expect("bad saw 3 requests"),
        third_back.expect("bad saw 3 requests"),
    );
    let view = proxy.endpoint("web", "bad").await;
    assert_eq!(view["ejected"], true, "ejected after 3 failures: {view}");
    assert_eq!(view["ejections"], 1, "{view}");

    // Out: no traffic while ejected.
    let names = servers(&client, &url, 20).await;
    assert_eq!(count(&names, "good"), 20, "{names:?}");
    assert_eq!(bad.traffic.load(SeqCst), 3, "bad got traffic while ejected");

    // Back after the ejection (1 s).
    wait_for(Duration::from_secs(5), "bad is back", || async {
        proxy.endpoint("web", "bad").await["ejected"] == false
    })
    .await;
    let back_after = third_sent.elapsed();
    assert!(
        back_after >= Duration::from_millis(950),
        "the ejection lasted less than 1 s: back {back_after:?} after the request that ejected it was sent"
    );
    assert!(
        third_back.elapsed() <= Duration::from_millis(2000),
        "the ejection lasted much more than 1 s: {:?}",
        third_back.elapsed()
    );
    let names = servers(&client, &url, 10).await;
    assert!(
        count(&names, "bad") >= 3,
        "bad takes traffic again: {names:?}"
    );
    // Three more failures in a row: ejected again, the second time.
    let view = proxy.endpoint("web", "bad").await;
    assert_eq!(view["ejected"], true, "ejected again: {view}");
    assert_eq!(view["ejections"], 2, "{view}");
    // The service counts them too.
    let services = proxy.services().await;
    let web = services
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "web"))
        .expect("service web in /api/services");
    assert_eq!(web["ejections"], 2, "{web}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ejection_cap_keeps_one_of_two_failing_endpoints_in() {
    let f1 = Flappy::start("f1", true, 500).await;
    let f2 = Flappy::start("f2", true, 500).await;
    let settings = "passive = { consecutive_failures = 2, ejection = \"300ms\", max_ejection = \"300ms\", max_ejected_percent = 50 }";
    let eps = [ep("f1", f1.addr()), ep("f2", f2.addr())];
    let proxy = Proxy::start(|| web(free_addr(), settings, &eps)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = background_load(proxy.url("/"), 8, stop.clone());
    let start = Instant::now();
    let (mut snapshots, mut one_out, mut most_out) = (0, 0, 0);
    let mut worst = Value::Null;
    while start.elapsed() < Duration::from_millis(2500) {
        let all = proxy.services().await;
        let out = ["f1", "f2"]
            .iter()
            .filter(|id| endpoint_in(&all, "web", id).expect("endpoint")["ejected"] == true)
            .count();
        snapshots += 1;
        one_out += usize::from(out == 1);
        if out > most_out {
            most_out = out;
            worst = all;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, SeqCst);
    let (n, statuses) = load.await.expect("the load");

    let all = proxy.services().await;
    let ejections: u64 = ["f1", "f2"]
        .iter()
        .map(|id| {
            endpoint_in(&all, "web", id).expect("endpoint")["ejections"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(
        most_out <= 1,
        "max_ejected_percent = 50 of 2 endpoints, yet {most_out} were ejected at once: {worst:#}"
    );
    let no_endpoint = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(
        no_endpoint, 0,
        "{no_endpoint} of {n} requests found no endpoint (503): both were out at once"
    );
    assert!(
        statuses.iter().all(|s| *s == 500),
        "every answer is an endpoint's 500"
    );
    assert!(ejections >= 3, "ejections kept happening: {ejections}");
    assert!(
        one_out * 4 >= snapshots,
        "one endpoint was ejected most of the time: {one_out} of {snapshots} snapshots"
    );
}

/// Seed 000 checks the app on another port than it serves:
/// `check = { port }` makes the endpoint up or down as that port answers,
/// whatever its own port does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_on_another_port_decides_the_endpoint_health() {
    let health = Flappy::start("health", true, 200).await;
    let main = Upstream::start("main").await;
    let check = format!(
        "check = {{ http = \"/healthz\", interval = \"100ms\", timeout = \"500ms\", rise = 1, fall = 1, port = {} }}",
        health.addr().port()
    );
    let eps = [endpoint_line(&main, "")];
    let proxy = Proxy::start(|| web(free_addr(), &check, &eps)).await;
    let client = client();
    let url = proxy.url("/");
    let deadline = Duration::from_secs(5);
    wait_for(deadline, "main is up on its check port", || async {
        proxy.endpoint("web", "main").await["healthy"] == true
    })
    .await;
    assert!(health.passes.load(SeqCst) > 0, "the check port was asked");
    let names = servers(&client, &url, 5).await;
    assert_eq!(count(&names, "main"), 5, "{names:?}");

    // The check port fails: main is down though its own port serves.
    health.set_healthy(false);
    wait_for(deadline, "main is down on its check port", || async {
        proxy.endpoint("web", "main").await["healthy"] == false
    })
    .await;
    let names = servers(&client, &url, 5).await;
    assert_eq!(count(&names, "status 503"), 5, "{names:?}");
    health.set_healthy(true);
    wait_for(deadline, "main is up again", || async {
        proxy.endpoint("web", "main").await["healthy"] == true
    })
    .await;
}

/// `check = { address, port }` checks another host than the endpoint's
/// (HAProxy's `addr`): here 127.0.0.2, where only the check's port
/// listens. The endpoint is up while that port accepts and down once it
/// closes, whatever its own address does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_on_another_address_decides_the_endpoint_health() {
    let main = Upstream::start("main").await;
    let health = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2 (any 127/8 address is loopback on Linux)");
    let port = health.local_addr().expect("its address").port();
    let accepting = tokio::spawn(async move {
        loop {
            let _ = health.accept().await;
        }
    });
    let check = format!(
        "check = {{ interval = \"100ms\", timeout = \"300ms\", rise = 1, fall = 1, address = \"127.0.0.2\", port = {port} }}"
    );
    let proxy = Proxy::start(|| web(free_addr(), &check, &[endpoint_line(&main, "")])).await;
    let deadline = Duration::from_secs(5);
    wait_for(deadline, "main is up by the check on 127.0.0.2", || async {
        proxy.endpoint("web", "main").await["healthy"] == true
    })
    .await;
    let names = servers(&client(), &proxy.url("/"), 5).await;
    assert_eq!(count(&names, "main"), 5, "{names:?}");

    accepting.abort();
    let _ = accepting.await;
    wait_for(
        deadline,
        "main is down once 127.0.0.2 stops accepting",
        || async { proxy.endpoint("web", "main").await["healthy"] == false },
    )
    .await;
}

/// `backup = true`: no traffic while a main endpoint takes it, all of it
/// once none does (seed 000's backup server), and back to the main one
/// when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_serves_only_while_no_main_endpoint_does() {
    let ups = Upstream::start_many(&["main", "spare"]).await;
    let eps = [
        endpoint_line(&ups[0], ""),
        endpoint_line(&ups[1], "backup = true"),
    ];
    let proxy = Proxy::start(|| web(free_addr(), "", &eps)).await;
    let client = client();
    let url = proxy.url("/");
    let names = servers(&client, &url, 20).await;
    assert_eq!(count(&names, "main"), 20, "the backup idles: {names:?}");
    let set = |state: &'static str| {
        let url = proxy.admin_url("/api/services/web/endpoints/main");
        async move {
            let resp = plain_client()
                .post(url)
                .header("content-type", "application/json")
                .body(format!("{{\"state\":\"{state}\"}}"))
                .send()
                .await
                .expect("admin change");
            assert!(resp.status().is_success(), "{:?}", resp.text().await);
        }
    };
    set("maint").await;
    let names = servers(&client, &url, 20).await;
    assert_eq!(count(&names, "spare"), 20, "{names:?}");
    set("ready").await;
    let names = servers(&client, &url, 20).await;
    assert_eq!(count(&names, "main"), 20, "main takes over: {names:?}");
}
