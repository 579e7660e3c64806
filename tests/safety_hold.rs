//! End to end: `hold_timeout`, zero downtime with one instance. While a
//! service has no endpoint that takes new requests, its requests wait for
//! one (a registration, a state change, a new table) up to the bound, then
//! get 503; without the setting they get 503 at once. The one-instance
//! restart runs under `pointsman register` against a real etcd.

mod support;

use std::time::{Duration, Instant};

use support::etcd::{del, put, start_proxy, EtcdServer};
use support::registry::{listener_config, wait_ready};
use support::sidekick::{DrainLoad, Sidekick};
use support::*;

/// Sets endpoint `id` of `web` to `state` through the admin API.
async fn set_state(proxy: &Proxy, id: &str, state: &str) {
    let resp = plain_client()
        .post(proxy.admin_url(&format!("/api/services/web/endpoints/{id}")))
        .header("content-type", "application/json")
        .body(format!("{{\"state\":\"{state}\"}}"))
        .send()
        .await
        .expect("admin change");
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
}

/// GET `url` on a new connection: its status and how long it took.
async fn timed_get(url: &str) -> (u16, Duration, String) {
    let started = Instant::now();
    let resp = plain_client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    (status, started.elapsed(), body)
}

/// The one instance is taken out (drain, as its sidekick would), stopped,
/// and started again on the same address 2 s later: under 64 clients no
/// request fails; those that came meanwhile waited and were answered by
/// the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_restarted_on_its_address_fails_no_request() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    let config = |listen| {
        format!(
            "{}\n[services.web]\nhold_timeout = \"10s\"\n",
            listener_config(listen, Some("web"))
        )
    };
    let proxy = Proxy::start_with_args(
        || config(free_addr()),
        &["--etcd", &endpoint, "--proxy-id", "p1", "--threads", "1"],
    )
    .await;
    let address = free_addr();
    let mut v1 = Sidekick::start("--etcd", &endpoint, "v1", address, &[], true);
    wait_ready(&[&proxy], "web", &["v1"]).await;

    let load = DrainLoad::start(&[&proxy], 64, "v1");
    load.wait_reaches(&["v1"]).await;
    sigterm(v1.child.id());
    v1.wait_exit(Duration::from_secs(30)).await;
    let gap = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _v2 = Sidekick::start("--etcd", &endpoint, "v2", address, &[], true);
    load.wait_reaches(&["v2"]).await;
    let took = gap.elapsed();
    let seen = load.finish().await;

    seen.assert_no_failures();
    let names: Vec<&String> = seen.served.keys().collect();
    assert_eq!(names, ["v1", "v2"], "only v1 and v2 answered");
    assert!(took >= Duration::from_secs(2), "the gap lasted {took:?}");
    let held = proxy
        .metric("pointsman_service_requests_held_total{service=\"web\"}")
        .await
        .unwrap_or(0.0);
    assert!(held >= 1.0, "requests waited during the gap: {held}");
    assert_eq!(
        proxy
            .metric("pointsman_service_requests_held{service=\"web\"}")
            .await,
        Some(0.0),
        "none waits any more"
    );
}

/// Past `hold_timeout` a held request gets 503; without the setting, the
/// 503 comes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_gets_503_when_hold_timeout_passes() {
    let up = Upstream::start("only").await;
    let config =
        |listen, settings: &str| web(listen, settings, &[endpoint_line(&up, "state = \"maint\"")]);
    let proxy = Proxy::start(|| config(free_addr(), "hold_timeout = \"400ms\"")).await;
    let (status, took, body) = timed_get(&proxy.url("/")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "held for hold_timeout, then 503: {took:?}"
    );

    proxy.reload(&config(proxy.addr(), "")).await;
    let (status, took, body) = timed_get(&proxy.url("/")).await;
    assert_eq!(status, 503, "{body}");
    assert!(took < Duration::from_millis(300), "503 at once: {took:?}");
}

/// Held requests go to the endpoint that comes back (a state change, live)
/// or appears (a new table), in whichever order they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_go_to_an_endpoint_that_comes_back_or_appears() {
    let ups = Upstream::start_many(&["first", "second"]).await;
    let settings = "hold_timeout = \"10s\"";
    let proxy = Proxy::start(|| {
        web(
            free_addr(),
            settings,
            &[endpoint_line(&ups[0], "state = \"maint\"")],
        )
    })
    .await;

    // Back from maintenance: the waiting requests are answered by it.
    let waiting: Vec<_> = (0..8)
        .map(|_| tokio::spawn(timed_get_owned(proxy.url("/"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_state(&proxy, "first", "ready").await;
    for w in waiting {
        let (status, took, body) = w.await.expect("a held request");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"first\""), "{body}");
        assert!(took >= Duration::from_millis(400), "it waited: {took:?}");
    }

    // No endpoint at all, then a reload that adds one.
    proxy.reload(&web(proxy.addr(), settings, &[])).await;
    let waiting = tokio::spawn(timed_get_owned(proxy.url("/")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy
        .reload(&web(proxy.addr(), settings, &[endpoint_line(&ups[1], "")]))
        .await;
    let (status, took, body) = waiting.await.expect("a held request");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"second\""), "{body}");
    assert!(took >= Duration::from_millis(400), "it waited: {took:?}");
}

async fn timed_get_owned(url: String) -> (u16, Duration, String) {
    timed_get(&url).await
}

/// `pointsman ctl --etcd <etcd> <args>`, off the test's runtime; panics
/// unless it succeeds. Its stdout.
async fn ctl(etcd: &str, args: &[&str]) -> String {
    let mut all = vec!["ctl".to_string(), "--etcd".into(), etcd.into()];
    all.extend(args.iter().map(|a| a.to_string()));
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run_cli(&refs)
    })
    .await
    .expect("ctl ran");
    assert_eq!(code, 0, "ctl {args:?} failed: {out}{err}");
    out
}

/// `ctl pause` under 64 clients, the instance replaced by another on a
/// new address meanwhile (3 s with no instance), `ctl resume`: no request
/// fails, those that came during the pause waited for the resume; a pause
/// past its timeout answers 503 saying the service is paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_pause_holds_requests_until_ctl_resume() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    let proxy = start_proxy(&etcd, "p1", Some("web")).await;
    let v1 = Upstream::start("v1").await;
    put(&etcd, "/services/web/v1", &v1.addr.to_string()).await;
    wait_ready(&[&proxy], "web", &["v1"]).await;

    let load = DrainLoad::start(&[&proxy], 64, "v1");
    load.wait_reaches(&["v1"]).await;
    let out = ctl(&endpoint, &["pause", "web", "--timeout", "20s"]).await;
    assert!(out.contains("web: paused at revision"), "{out}");
    assert!(out.contains("1 of 1 proxy confirmed in"), "{out}");
    let paused = Instant::now();
    let waiting = tokio::spawn(timed_get_owned(proxy.url("/")));
    // The instance goes away and another takes its place while paused.
    del(&etcd, "/services/web/v1").await;
    drop(v1);
    let v2 = Upstream::start("v2").await;
    put(&etcd, "/services/web/v2", &v2.addr.to_string()).await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(paused.elapsed())).await;
    let out = ctl(&endpoint, &["resume", "web"]).await;
    assert!(out.contains("web: resumed at revision"), "{out}");
    let (status, took, body) = waiting.await.expect("the held request");
    load.wait_reaches(&["v2"]).await;
    let seen = load.finish().await;

    seen.assert_no_failures();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"v2\""), "answered after the resume: {body}");
    assert!(
        took >= Duration::from_millis(2500),
        "it waited for the resume: {took:?}"
    );

    // A pause that outlasts its timeout: 503, saying why.
    ctl(&endpoint, &["pause", "web", "--timeout", "500ms"]).await;
    let (status, took, body) = timed_get(&proxy.url("/")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("is paused"), "{body}");
    assert!(took >= Duration::from_millis(500), "{took:?}");
    ctl(&endpoint, &["resume", "web"]).await;
    let (status, _, body) = timed_get(&proxy.url("/")).await;
    assert_eq!(status, 200, "{body}");
}

/// `ctl --admin ADDR pause` pauses the service on that proxy alone: its
/// requests wait until `ctl --admin ADDR resume`; a service it does not
/// have is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_on_one_proxy_holds_its_requests_until_resume() {
    let up = Upstream::start("only").await;
    let proxy = Proxy::start(|| web(free_addr(), "", &[endpoint_line(&up, "")])).await;
    let admin = proxy.admin_url("");
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--admin", admin.as_str()];
        all.extend_from_slice(args);
        run_cli(&all)
    };
    let (code, out, err) = ctl(&["pause", "web", "--timeout", "10s"]);
    assert_eq!(code, 0, "{out}{err}");
    let waiting = tokio::spawn(timed_get_owned(proxy.url("/")));
    wait_for(Duration::from_secs(5), "the request waits", || async {
        proxy
            .metric("pointsman_service_requests_held{service=\"web\"}")
            .await
            == Some(1.0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "held while paused");
    let (code, out, err) = ctl(&["resume", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    let (status, took, body) = waiting.await.expect("the held request");
    assert_eq!(status, 200, "{body}");
    assert!(took >= Duration::from_millis(300), "{took:?}");

    let (code, _, err) = ctl(&["pause", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("no such service (backend): nope"), "{err}");
}
