//! End to end: `pointsman register --consul` beside real apps, in front of
//! real proxies following Consul (`pointsman run --consul`).
//!
//! Consul is played by the test double `pointsman_testkit::consul`
//! (tests/testkit; no Consul binary can be installed here): it runs TTL
//! checks but not HTTP checks, whose status the tests set.
//!
//! What is covered: the app is registered only once it is healthy, with a
//! TTL check the sidekick keeps passing (and fails while the app fails its
//! check); a SIGTERM under load drains with zero failed requests, a long
//! request in flight finishes, and the app gets its SIGTERM only after the
//! `--proxy-admin` proxies show nothing in flight to it; an app that dies is
//! deregistered at once; an agent that is down at start is retried until it
//! answers, and `--check-http` becomes an HTTP check run by the agent; a
//! sidekick without `--proxy-admin` gives the proxies a fixed grace; and
//! `--etcd` with `--consul` is a usage error.

mod support;

use std::time::{Duration, Instant};

use pointsman_testkit::consul::{parse_go_duration, ConsulDouble, Health};
use serde_json::json;
use support::registry::{endpoints, listener_config, wait_in_flight, wait_ready, CHANGE_DEADLINE};
use support::sidekick::{spawn_long_request, App, DrainLoad, Sidekick};
use support::*;

// ---------------------------------------------------------------------------
// Proxies and the Consul double

async fn start_proxy(consul: &ConsulDouble) -> Proxy {
    let url = consul.url();
    Proxy::start_with_args(
        || listener_config(free_addr(), Some("web")),
        &["--consul", &url, "--consul-wait", "5s", "--threads", "1"],
    )
    .await
}

/// Re-registers `id` in the double as it is, with meta `pointsman-state`
/// set to `state` (its check is kept): an operator's override.
fn set_state(consul: &ConsulDouble, id: &str, state: &str) {
    let s = consul.service(id).expect("registered");
    let mut meta = s.meta.clone();
    meta.insert("pointsman-state".to_string(), state.to_string());
    consul.register(json!({
        "ID": s.id,
        "Name": s.name,
        "Address": s.address,
        "Port": s.port,
        "Tags": s.tags,
        "Meta": meta,
    }));
}

/// Waits until the double's check `id` has `status`.
async fn wait_check(consul: &ConsulDouble, id: &str, status: Health) {
    wait_until(
        CHANGE_DEADLINE,
        &format!("check {id} is {}", status.as_str()),
        || consul.check(id).is_some_and(|c| c.status == status),
    )
    .await;
}

// ---------------------------------------------------------------------------
// Tests

/// An app that runs beside its sidekick: nothing is registered until it
/// answers; then it is registered with a TTL check that stays passing over
/// several TTLs and is routable; failing its check fails the TTL check
/// (no traffic) until it recovers; SIGTERM without --proxy-admin drains
/// for the fixed grace, deregisters and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_once_healthy_with_a_ttl_check_kept_passing() {
    let consul = ConsulDouble::start();
    let proxy = start_proxy(&consul).await;
    let addr = free_addr();
    let mut s = Sidekick::start(
        "--consul",
        &consul.url(),
        "t",
        addr,
        &[
            "--ttl",
            "1s",
            "--check-interval",
            "200ms",
            "--check-fall",
            "2",
        ],
        false,
    );
    // The sidekick has judged the app (and found it failing) once it says
    // it waits; registering it anyway would have come with that judgement.
    wait_until(
        CHANGE_DEADLINE,
        "the sidekick says it waits for the app to pass its check",
        || s.stderr().contains("waiting for the app to pass its check"),
    )
    .await;
    assert!(
        consul.service("t").is_none(),
        "registered before the app answered"
    );

    let app = App::start(addr, "t");
    wait_ready(&[&proxy], "web", &["t"]).await;
    let c = client();
    assert_eq!(server_of(&c, &proxy.url("/"), &[]).await, "t");
    let service = consul.service("t").expect("registered");
    assert_eq!(
        (
            service.name.as_str(),
            service.address.as_str(),
            service.port
        ),
        ("web", "127.0.0.1", i64::from(addr.port()))
    );
    assert_eq!(
        service.meta.get("pointsman-state").map(String::as_str),
        Some("ready")
    );
    let check = consul.check(&s.check_id()).expect("a check");
    assert_eq!(check.kind, "ttl");
    assert_eq!(check.ttl, Some(Duration::from_secs(1)));
    assert_eq!(
        check.definition["DeregisterCriticalServiceAfter"]
            .as_str()
            .and_then(parse_go_duration),
        Some(Duration::from_secs(60)),
        "{}",
        check.definition
    );

    // Four TTLs: the check never leaves passing, and the proxy keeps it.
    let watch_from = Instant::now();
    while watch_from.elapsed() < Duration::from_secs(4) {
        let status = consul.check(&s.check_id()).map(|c| c.status);
        assert_eq!(
            status,
            Some(Health::Passing),
            "after {:?}",
            watch_from.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server_of(&c, &proxy.url("/"), &[]).await, "t");
    let passes = consul
        .requests()
        .iter()
        // The check id as sent (percent-encoded) or as decoded.
        .filter(|r| {
            matches!(
                r.path.as_str(),
                "/v1/agent/check/pass/service%3At" | "/v1/agent/check/pass/service:t"
            ) && r.at >= watch_from
        })
        .count();
    assert!(
        (8..=20).contains(&passes),
        "{passes} passes in 4 s (one every TTL/3 expected)"
    );

    // The app stops answering: after two failed checks the TTL check fails
    // and the proxy drops the instance; back once it answers again.
    drop(app);
    wait_check(&consul, &s.check_id(), Health::Critical).await;
    wait_ready(&[&proxy], "web", &[]).await;
    assert!(
        consul
            .check(&s.check_id())
            .is_some_and(|c| c.output.contains("failed its check 2 times")),
        "{:?}",
        consul.check(&s.check_id())
    );
    let _app = App::start(addr, "t");
    wait_check(&consul, &s.check_id(), Health::Passing).await;
    wait_ready(&[&proxy], "web", &["t"]).await;
    assert!(s.stderr().contains("TTL check failing"), "{}", s.stderr());

    // SIGTERM, no --proxy-admin: drain, the fixed grace, deregister.
    let signalled = Instant::now();
    sigterm(s.child.id());
    wait_for(CHANGE_DEADLINE, "the proxy sees the drain", || async {
        endpoints(&proxy, "web")
            .await
            .get("t")
            .is_some_and(|(state, _, _)| state == "drain")
    })
    .await;
    let status = s.wait_exit(Duration::from_secs(15)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(1900),
        "deregistered after {took:?}, before the 2 s grace"
    );
    assert!(consul.service("t").is_none(), "deregistered");
    wait_ready(&[&proxy], "web", &[]).await;
    let log = s.stderr();
    assert!(
        log.contains("no proxies to ask (no --proxy-admin)"),
        "{log}"
    );
}

/// Two proxies given with --proxy-admin, three instances under load;
/// SIGTERM to one sidekick while a long request is in flight to its app:
/// no request fails, the long one finishes, and the app gets SIGTERM only
/// after both proxies show nothing in flight to it; then it is deregistered
/// and the sidekick exits with the app's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_proxies_before_the_app_is_signalled() {
    let consul = ConsulDouble::start();
    let url = consul.url();
    let p1 = start_proxy(&consul).await;
    let p2 = start_proxy(&consul).await;
    let proxies = [&p1, &p2];
    let (a1, a2) = (p1.admin.to_string(), p2.admin.to_string());
    let mut x = Sidekick::start(
        "--consul",
        &url,
        "x",
        free_addr(),
        &[
            "--drain-timeout",
            "20s",
            "--proxy-admin",
            &a1,
            "--proxy-admin",
            &a2,
        ],
        true,
    );
    let _y = Sidekick::start("--consul", &url, "y", free_addr(), &[], true);
    let _z = Sidekick::start("--consul", &url, "z", free_addr(), &[], true);
    wait_ready(&proxies, "web", &["x", "y", "z"]).await;

    // A long request that is certainly on x: y and z in maint meanwhile.
    set_state(&consul, "y", "maint");
    set_state(&consul, "z", "maint");
    wait_for(CHANGE_DEADLINE, "y and z are in maint on p1", || async {
        let eps = endpoints(&p1, "web").await;
        ["y", "z"]
            .iter()
            .all(|id| eps.get(*id).is_some_and(|(s, _, _)| s == "maint"))
    })
    .await;
    let long_url = p1.url("/slow?ms=3000");
    let long = spawn_long_request(long_url);
    wait_in_flight(&p1, "web", "x").await;
    set_state(&consul, "y", "ready");
    set_state(&consul, "z", "ready");
    wait_ready(&proxies, "web", &["x", "y", "z"]).await;

    // Load: keep-alive clients on both proxies, every answer counted; the
    // last moment either proxy showed a request in flight to x, and whether
    // one showed x draining.
    let load = DrainLoad::start(&proxies, 12, "x");
    load.wait_reaches(&["x", "y", "z"]).await;

    let signalled = Instant::now();
    sigterm(x.child.id());
    let status = x.wait_exit(Duration::from_secs(30)).await;
    let took = signalled.elapsed();
    let (long_status, long_server, long_done_ns) = long.await.expect("the long request");
    // The load goes on a little after x left, then stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = load.finish().await;

    seen.assert_no_failures();
    assert_eq!(
        (long_status, long_server.as_str()),
        (200, "x"),
        "the long request finished on x"
    );
    let term_ns = x.term_ns().expect("the app noted its SIGTERM");
    assert!(seen.saw_drain, "a proxy showed x draining");
    seen.assert_signalled_after(term_ns, long_done_ns);
    assert!(
        took >= Duration::from_millis(500),
        "the drain waited for the long request ({took:?})"
    );
    assert_eq!(
        status.code(),
        Some(7),
        "the app's exit code is the sidekick's"
    );

    x.assert_logged_drain_steps();
    let log = x.stderr();
    assert!(log.contains("2 of 2 proxies confirmed"), "{log}");
    assert!(consul.service("x").is_none(), "deregistered");
    assert!(consul.check("service:x").is_none(), "its check too");
    wait_ready(&proxies, "web", &["y", "z"]).await;
}

/// The app dies (SIGKILL): the sidekick deregisters it at once, not a TTL
/// later, and exits as the app did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_app_is_deregistered_at_once() {
    let consul = ConsulDouble::start();
    let proxy = start_proxy(&consul).await;
    let mut s = Sidekick::start(
        "--consul",
        &consul.url(),
        "a",
        free_addr(),
        &["--ttl", "30s"],
        true,
    );
    wait_ready(&[&proxy], "web", &["a"]).await;
    assert_eq!(server_of(&client(), &proxy.url("/"), &[]).await, "a");
    let app = s.read_pid("app.pid").expect("the app's pid");
    let killed = Instant::now();
    signal(app, "KILL");
    wait_until(Duration::from_secs(5), "a is deregistered", || {
        consul.service("a").is_none()
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "deregistered {:?} after the app died (TTL 30 s)",
        killed.elapsed()
    );
    let status = s.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(137), "128 + SIGKILL");
    wait_ready(&[&proxy], "web", &[]).await;
    assert!(s.stderr().contains("the app exited: deregistering at once"));
}

/// An agent that is down at start is retried, and said so, until it
/// answers; --check-http becomes an HTTP check the agent runs, so the
/// instance is routable once that check passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_agent_is_waited_for_and_check_http_is_an_agent_check() {
    let mut consul = ConsulDouble::start();
    let proxy = start_proxy(&consul).await;
    consul.stop();
    let app = Upstream::start("h").await;
    let s = Sidekick::start(
        "--consul",
        &consul.url(),
        "h",
        app.addr,
        &["--check-http", "/healthz", "--check-interval", "3s"],
        false,
    );
    let want = format!("Consul agent at {} unreachable", consul.url());
    wait_until(
        CHANGE_DEADLINE,
        "the sidekick says the agent is unreachable",
        || {
            let log = s.stderr();
            log.contains(&want) && log.contains("retrying in")
        },
    )
    .await;
    consul.restart();
    wait_until(
        Duration::from_secs(15),
        "registered once the agent answers",
        || consul.service("h").is_some(),
    )
    .await;
    let check = consul.check("service:h").expect("a check");
    assert_eq!(check.kind, "http");
    assert_eq!(
        check.definition["HTTP"],
        format!("http://{}/healthz", app.addr),
        "{}",
        check.definition
    );
    assert_eq!(
        check.definition["Interval"]
            .as_str()
            .and_then(parse_go_duration),
        Some(Duration::from_secs(3)),
        "{}",
        check.definition
    );
    // The double does not run HTTP checks: a new one is critical, so the
    // instance is not routable until the agent finds it passing. An
    // instance registered after it, without checks, shows on the proxy
    // only once the proxy has seen Consul's state with h in it.
    consul.register(json!({
        "ID": "later",
        "Name": "web",
        "Address": "127.0.0.1",
        "Port": app.addr.port(),
    }));
    wait_ready(&[&proxy], "web", &["later"]).await;
    assert!(
        !endpoints(&proxy, "web").await.contains_key("h"),
        "routable before its check passed"
    );
    assert!(consul.deregister("later"));
    wait_ready(&[&proxy], "web", &[]).await;
    assert!(
        !consul
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/v1/agent/check/")),
        "no TTL updates for an HTTP check"
    );
    consul.set_check_status("service:h", Health::Passing);
    wait_ready(&[&proxy], "web", &["h"]).await;
    assert_eq!(server_of(&client(), &proxy.url("/"), &[]).await, "h");
}

/// Usage errors exit 2 and say what was expected.
#[test]
fn registry_flags_are_checked() {
    let base = [
        "register",
        "--service",
        "web",
        "--address",
        "127.0.0.1:8080",
    ];
    let with = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        run_cli(&args)
    };
    let (code, _, err) = with(&[
        "--etcd",
        "http://127.0.0.1:1",
        "--consul",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--etcd URL or --consul URL") && err.contains("not both"),
        "{err}"
    );
    let (code, _, err) = with(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("say where to register"), "{err}");
    let (code, _, err) = with(&["--etcd", "http://127.0.0.1:1", "--on-unconfirmed", "maybe"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("fail") && err.contains("proceed"), "{err}");
    let (code, _, err) = with(&["--consul", "ftp://127.0.0.1:1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("consul"), "{err}");
    let (code, _, err) = with(&[
        "--consul",
        "http://127.0.0.1:1",
        "--proxy-admin",
        "127.0.0.1",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--proxy-admin") && err.contains("expected host:port"),
        "{err}"
    );
    let (code, out, _) = run_cli(&["register", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--consul",
        "--consul-token",
        "--proxy-admin",
        "--admin-token",
        "--on-unconfirmed",
        "--empty-fleet-ok",
    ] {
        assert!(
            out.contains(flag),
            "`pointsman register --help` mentions {flag}:\n{out}"
        );
    }
}
