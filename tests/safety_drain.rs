//! End to end: endpoints leaving and joining without hurting traffic. A
//! draining endpoint (state `drain` in its registration) and a deregistered
//! one (its registration file deleted) take no new requests but finish
//! the ones they have; the deregistered one stays visible, draining, until
//! its last request ends. A new endpoint under `slow_start` gets its share
//! of new requests gradually over the window.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use support::*;

/// Writes `<dir>/web/<id>` as an editor would (a hidden temporary file
/// renamed into place).
fn register(dir: &Path, id: &str, content: &str) {
    let service = dir.join("web");
    std::fs::create_dir_all(&service).expect("create the service directory");
    let tmp = service.join(format!(".{id}.new"));
    std::fs::write(&tmp, content).expect("write a registration");
    std::fs::rename(&tmp, service.join(id)).expect("rename a registration into place");
}

fn deregister(dir: &Path, id: &str) {
    std::fs::remove_file(dir.join("web").join(id)).expect("remove a registration");
}

/// A proxy following the file registry in `dir`, with `web` configured
/// (no static endpoints).
async fn proxy_on_registry(dir: &Path) -> Proxy {
    let dir = dir.to_str().expect("a UTF-8 temp path").to_string();
    Proxy::start_with_args(|| web(free_addr(), "", &[]), &["--registry-dir", &dir]).await
}

/// `web`'s endpoint `id` in `/api/services`, if it is there.
async fn endpoint_of(proxy: &Proxy, id: &str) -> Option<Value> {
    endpoint_in(&proxy.services().await, "web", id)
}

/// Starts GET `/slow?ms=<ms>` in the background: (status, server, took).
fn slow_get(proxy: &Proxy, ms: u64) -> tokio::task::JoinHandle<(u16, String, Duration)> {
    let url = proxy.url(&format!("/slow?ms={ms}"));
    tokio::spawn(async move {
        let start = Instant::now();
        let (status, echo) = get_echo(&plain_client(), &url, &[]).await;
        let server = echo["server"].as_str().unwrap_or("").to_string();
        (status, server, start.elapsed())
    })
}

const DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_endpoint_takes_no_new_requests_while_its_slow_one_finishes() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let reg = tempfile::tempdir().expect("a registry dir");
    register(reg.path(), "a", &ups[0].addr.to_string());
    let proxy = proxy_on_registry(reg.path()).await;
    wait_for(DEADLINE, "a is registered", || async {
        endpoint_of(&proxy, "a").await.is_some()
    })
    .await;

    // `a` is the only endpoint: the slow request is on it.
    let slow = slow_get(&proxy, 2000);
    wait_for(DEADLINE, "the slow request is in flight on a", || async {
        endpoint_of(&proxy, "a")
            .await
            .is_some_and(|a| a["in_flight"] == 1)
    })
    .await;

    // `b` joins, then `a` is set to drain.
    register(reg.path(), "b", &ups[1].addr.to_string());
    wait_for(DEADLINE, "b is registered", || async {
        endpoint_of(&proxy, "b").await.is_some()
    })
    .await;
    register(
        reg.path(),
        "a",
        &format!("{{\"address\":\"{}\",\"state\":\"drain\"}}", ups[0].addr),
    );
    wait_for(DEADLINE, "a is draining", || async {
        endpoint_of(&proxy, "a")
            .await
            .is_some_and(|a| a["state"] == "drain")
    })
    .await;

    let client = client();
    let counts = tally(&client, &proxy.url("/"), 40).await;
    assert_eq!(
        counts.get("b"),
        Some(&40),
        "new requests avoid the draining a: {counts:?}"
    );
    let a = endpoint_of(&proxy, "a").await.expect("a is still listed");
    assert_eq!(a["in_flight"], 1, "the slow request is still on a: {a}");
    assert_eq!(a["requests"], 1, "a got nothing new: {a}");

    let (status, server, took) = slow.await.expect("the slow request");
    assert_eq!(
        (status, server.as_str()),
        (200, "a"),
        "the slow request finished on a"
    );
    assert!(
        took >= Duration::from_millis(1900),
        "it really was slow: {took:?}"
    );
    let a = endpoint_of(&proxy, "a").await.expect("a is still listed");
    assert_eq!(a["in_flight"], 0, "{a}");
    assert_eq!(a["requests"], 1, "{a}");
    assert_eq!(a["state"], "drain", "{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_endpoint_drains_its_in_flight_request_then_leaves() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let reg = tempfile::tempdir().expect("a registry dir");
    register(reg.path(), "a", &ups[0].addr.to_string());
    let proxy = proxy_on_registry(reg.path()).await;
    wait_for(DEADLINE, "a is registered", || async {
        endpoint_of(&proxy, "a").await.is_some()
    })
    .await;

    let slow = slow_get(&proxy, 2500);
    wait_for(DEADLINE, "the slow request is in flight on a", || async {
        endpoint_of(&proxy, "a")
            .await
            .is_some_and(|a| a["in_flight"] == 1)
    })
    .await;
    register(reg.path(), "b", &ups[1].addr.to_string());
    wait_for(DEADLINE, "b is registered", || async {
        endpoint_of(&proxy, "b").await.is_some()
    })
    .await;

    // `a` leaves its registry while its request is in flight: it stays,
    // draining, for that request.
    deregister(reg.path(), "a");
    wait_for(DEADLINE, "a shows as draining", || async {
        endpoint_of(&proxy, "a")
            .await
            .is_some_and(|a| a["state"] == "drain")
    })
    .await;
    let a = endpoint_of(&proxy, "a")
        .await
        .expect("a is listed while draining");
    assert_eq!(a["in_flight"], 1, "{a}");

    let client = client();
    let counts = tally(&client, &proxy.url("/"), 40).await;
    assert_eq!(
        counts.get("b"),
        Some(&40),
        "new requests avoid the departing a: {counts:?}"
    );

    // Still there as long as the request runs.
    while !slow.is_finished() {
        match endpoint_of(&proxy, "a").await {
            Some(a) => assert!(
                a["state"] == "drain" && a["requests"] == 1,
                "the departing a drains and takes nothing new: {a}"
            ),
            None => assert!(
                slow.is_finished(),
                "a left /api/services while its request was still in flight"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, server, took) = slow.await.expect("the slow request");
    assert_eq!(
        (status, server.as_str()),
        (200, "a"),
        "the slow request finished on a"
    );
    assert!(
        took >= Duration::from_millis(2400),
        "it really was slow: {took:?}"
    );

    // Then it is gone.
    wait_for(Duration::from_secs(3), "the drained a leaves", || async {
        endpoint_of(&proxy, "a").await.is_none()
    })
    .await;
    let counts = tally(&client, &proxy.url("/"), 10).await;
    assert_eq!(counts.get("b"), Some(&10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_endpoints_share_over_the_window() {
    let ups = Upstream::start_many(&["a", "b", "c"]).await;
    let two = [endpoint_line(&ups[0], ""), endpoint_line(&ups[1], "")];
    let three = [
        endpoint_line(&ups[0], ""),
        endpoint_line(&ups[1], ""),
        endpoint_line(&ups[2], ""),
    ];
    // a and b serve at full weight before slow start is switched on, so
    // only c ramps.
    let proxy = Proxy::start(|| web(free_addr(), "", &two)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let client = client();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, url, stop) = (client.clone(), proxy.url("/"), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(SeqCst) {
                let server = server_of(&client, &url, &[]).await;
                seen.push((start.elapsed(), server));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy
        .reload(&web(proxy.addr(), "slow_start = \"3s\"", &three))
        .await;
    let t0 = start.elapsed();
    tokio::time::sleep(Duration::from_millis(4000)).await;
    stop.store(true, SeqCst);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.expect("a load worker"));
    }

    // c's share of the answers between t0 + from and t0 + to (ms).
    let share = |from: u64, to: u64| {
        let (from, to) = (
            t0 + Duration::from_millis(from),
            t0 + Duration::from_millis(to),
        );
        let window: Vec<_> = seen
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .collect();
        assert!(
            window.len() >= 100,
            "too few requests between {from:?} and {to:?}: {}",
            window.len()
        );
        let c = window.iter().filter(|(_, s)| s == "c").count();
        c as f64 / window.len() as f64
    };
    let first = share(0, 500);
    let middle = share(1250, 1750);
    let late = share(2400, 2900);
    let after = share(3300, 3900);
    let shares = format!("first {first:.3}, middle {middle:.3}, late {late:.3}, after {after:.3}");
    eprintln!("c's share of new requests: {shares}");
    assert!(first < 0.12, "c starts well below 1/3: {shares}");
    assert!(
        (0.12..0.28).contains(&middle),
        "c is about halfway (1/5) mid-window: {shares}"
    );
    assert!(late > 0.25, "c is near 1/3 late in the window: {shares}");
    assert!(
        (0.29..0.38).contains(&after),
        "c has its full 1/3 after the window: {shares}"
    );
    assert!(first < middle && middle < late, "the share rises: {shares}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_endpoint_leaves_at_its_drain_timeout() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let reg = tempfile::tempdir().expect("a registry dir");
    register(reg.path(), "a", &ups[0].addr.to_string());
    let dir = reg.path().to_str().expect("a UTF-8 temp path").to_string();
    let proxy = Proxy::start_with_args(
        || web(free_addr(), "drain_timeout = \"1s\"", &[]),
        &["--registry-dir", &dir],
    )
    .await;
    wait_for(DEADLINE, "a is registered", || async {
        endpoint_of(&proxy, "a").await.is_some()
    })
    .await;

    let slow = slow_get(&proxy, 4000);
    wait_for(DEADLINE, "the slow request is in flight on a", || async {
        endpoint_of(&proxy, "a")
            .await
            .is_some_and(|a| a["in_flight"] == 1)
    })
    .await;
    register(reg.path(), "b", &ups[1].addr.to_string());
    wait_for(DEADLINE, "b is registered", || async {
        endpoint_of(&proxy, "b").await.is_some()
    })
    .await;

    let removed = Instant::now();
    deregister(reg.path(), "a");
    wait_for(DEADLINE, "a shows as draining", || async {
        endpoint_of(&proxy, "a")
            .await
            .is_some_and(|a| a["state"] == "drain")
    })
    .await;
    wait_for(DEADLINE, "a leaves at its drain timeout", || async {
        endpoint_of(&proxy, "a").await.is_none()
    })
    .await;
    let gone_after = removed.elapsed();
    assert!(
        !slow.is_finished(),
        "a left because of the timeout, not because its request ended"
    );
    assert!(
        gone_after >= Duration::from_millis(900) && gone_after <= Duration::from_millis(2500),
        "drain_timeout = 1s, but a left {gone_after:?} after it was deregistered"
    );
    assert!(
        proxy
            .stderr()
            .contains("drain timeout: endpoint leaves with requests in flight"),
        "the early leave is logged: {}",
        proxy.stderr()
    );
    let counts = tally(&client(), &proxy.url("/"), 10).await;
    assert_eq!(counts.get("b"), Some(&10), "{counts:?}");
    slow.abort();
}
