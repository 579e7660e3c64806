//! End to end: `pointsman register` beside real apps, in front of real
//! proxies following a real etcd.
//!
//! What is covered: a SIGTERM under load drains with zero failed requests,
//! a long request in flight finishes, and the app gets its SIGTERM only
//! after both proxies reported nothing in flight to it; an app that dies is
//! deregistered at once; a sidekick killed with SIGKILL leaves its lease to
//! expire; a lost lease and an etcd restart end with the app registered;
//! an app that never becomes healthy is given up on; a bad address and an
//! etcd that is down at start are reported clearly; and each proxy keeps
//! its own record (admin address, applied revision) in etcd.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::etcd::{del, etcdctl, put, start_proxy, wait_applied, EtcdServer};
use support::registry::{endpoints, wait_in_flight, wait_ready, CHANGE_DEADLINE};
use support::sidekick::{alive, spawn_long_request, App, DrainLoad, Sidekick};
use support::*;

// ---------------------------------------------------------------------------
// etcd

/// The value and lease of `key`, if it exists.
async fn get(etcd: &EtcdServer, key: &str) -> Option<(String, i64)> {
    let json: Value = serde_json::from_str(&etcdctl(etcd, &["-w", "json", "get", key]).await)
        .expect("etcdctl -w json");
    let kv = json["kvs"].as_array()?.first()?.clone();
    let value = etcdctl(etcd, &["get", "--print-value-only", key]).await;
    Some((
        value.trim_end().to_string(),
        kv["lease"].as_i64().unwrap_or(0),
    ))
}

/// Waits until `cond` holds for `key`'s value and lease.
async fn wait_key(
    etcd: &EtcdServer,
    key: &str,
    deadline: Duration,
    what: &str,
    cond: impl Fn(&Option<(String, i64)>) -> bool,
) -> Option<(String, i64)> {
    let end = Instant::now() + deadline;
    loop {
        let now = get(etcd, key).await;
        if cond(&now) {
            return now;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}; {key} is {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Tests

/// Two proxies, three instances under load; SIGTERM to one sidekick while a
/// long request is in flight to its app: no request fails, the long one
/// finishes, and the app gets SIGTERM only after both proxies show nothing
/// in flight to it; then it is gone from both, and its exit code is the
/// sidekick's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_proxy_before_the_app_is_signalled() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    let p1 = start_proxy(&etcd, "p1", Some("web")).await;
    let p2 = start_proxy(&etcd, "p2", Some("web")).await;
    let proxies = [&p1, &p2];
    let mut x = Sidekick::start(
        "--etcd",
        &endpoint,
        "x",
        free_addr(),
        &["--check-http", "/", "--drain-timeout", "20s"],
        true,
    );
    let _y = Sidekick::start("--etcd", &endpoint, "y", free_addr(), &[], true);
    let _z = Sidekick::start("--etcd", &endpoint, "z", free_addr(), &[], true);
    wait_ready(&proxies, "web", &["x", "y", "z"]).await;

    // A long request that is certainly on x: y and z in maint meanwhile.
    put(&etcd, "/pointsman/overrides/web/y", r#"{"state":"maint"}"#).await;
    let rev = put(&etcd, "/pointsman/overrides/web/z", r#"{"state":"maint"}"#).await;
    wait_applied(&[&p1], rev).await;
    let long_url = p1.url("/slow?ms=5000");
    let long = spawn_long_request(long_url);
    wait_in_flight(&p1, "web", "x").await;
    del(&etcd, "/pointsman/overrides/web/y").await;
    let rev = del(&etcd, "/pointsman/overrides/web/z").await;
    wait_applied(&proxies, rev).await;

    // Load: keep-alive clients on both proxies, every answer counted, and
    // the last moment either proxy showed a request in flight to x.
    let load = DrainLoad::start(&proxies, 16, "x");
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
    seen.assert_signalled_after(term_ns, long_done_ns);
    assert!(
        took >= Duration::from_secs(1),
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
    assert_eq!(get(&etcd, &x.key()).await, None, "deregistered");
    wait_ready(&proxies, "web", &["y", "z"]).await;
}

/// The app dies (SIGKILL): the sidekick deletes the registration at once,
/// not a TTL later, and exits as the app did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_app_is_deregistered_at_once() {
    let etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, "p1", Some("web")).await;
    let mut s = Sidekick::start(
        "--etcd",
        &etcd.endpoint(),
        "a",
        free_addr(),
        &["--ttl", "30s"],
        true,
    );
    wait_ready(&[&proxy], "web", &["a"]).await;
    assert_eq!(
        support::server_of(&client(), &proxy.url("/"), &[]).await,
        "a"
    );
    let app = s.read_pid("app.pid").expect("the app's pid");
    let killed = Instant::now();
    signal(app, "KILL");
    wait_key(
        &etcd,
        &s.key(),
        Duration::from_secs(5),
        "the registration is gone",
        |v| v.is_none(),
    )
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

/// The sidekick is killed (SIGKILL) and cannot deregister: the registration
/// stays until its lease expires, then vanishes from etcd and the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidekick_leaves_its_lease_to_expire() {
    let etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, "p1", Some("web")).await;
    let s = Sidekick::start(
        "--etcd",
        &etcd.endpoint(),
        "k",
        free_addr(),
        &["--ttl", "3s"],
        true,
    );
    wait_ready(&[&proxy], "web", &["k"]).await;
    let killed = Instant::now();
    signal(s.child.id(), "KILL");
    assert!(
        get(&etcd, &s.key()).await.is_some(),
        "still registered right after"
    );
    wait_key(
        &etcd,
        &s.key(),
        Duration::from_secs(10),
        "the lease expired",
        |v| v.is_none(),
    )
    .await;
    let gone = killed.elapsed();
    assert!(
        gone >= Duration::from_secs(2) && gone < Duration::from_secs(9),
        "a 3 s lease expired after {gone:?}"
    );
    wait_ready(&[&proxy], "web", &[]).await;
}

/// A sidekick without a command (the app runs beside it): registered again
/// when its lease is revoked and after an etcd restart; on SIGTERM it
/// drains, deregisters and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_and_an_etcd_restart_end_registered() {
    let mut etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, "p1", Some("web")).await;
    let app = Upstream::start("r").await;
    let mut s = Sidekick::start(
        "--etcd",
        &etcd.endpoint(),
        "r",
        app.addr,
        &["--ttl", "3s"],
        false,
    );
    wait_ready(&[&proxy], "web", &["r"]).await;
    let (_, lease) = get(&etcd, &s.key()).await.expect("registered");
    assert_ne!(lease, 0, "under a lease");

    etcdctl(&etcd, &["lease", "revoke", &format!("{lease:x}")]).await;
    let (_, again) = wait_key(
        &etcd,
        &s.key(),
        CHANGE_DEADLINE,
        "registered under a new lease",
        |v| v.as_ref().is_some_and(|(_, l)| *l != 0 && *l != lease),
    )
    .await
    .expect("registered again");
    wait_ready(&[&proxy], "web", &["r"]).await;

    etcd.restart();
    // Kept alive over the restart, and for longer than the TTL after it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, after) = wait_key(
        &etcd,
        &s.key(),
        CHANGE_DEADLINE,
        "registered after the restart",
        |v| v.is_some(),
    )
    .await
    .expect("registered");
    assert_ne!(after, 0);
    wait_ready(&[&proxy], "web", &["r"]).await;
    assert!(
        s.stderr().contains("the lease was lost: registering again"),
        "the revoked lease is reported:\n{}",
        s.stderr()
    );
    let _ = again;

    sigterm(s.child.id());
    let status = s.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(get(&etcd, &s.key()).await, None);
    assert!(
        alive(app.pid()),
        "without a command, nothing else is signalled"
    );
}

/// An app that never passes its check: given up on after --check-timeout,
/// stopped, nothing registered, exit code 1 and the reason on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_never_becomes_healthy_is_given_up_on() {
    let etcd = EtcdServer::start();
    let mut s = Sidekick::start(
        "--etcd",
        &etcd.endpoint(),
        "sick",
        free_addr(),
        &["--check-http", "/status/503", "--check-timeout", "2s"],
        true,
    );
    let status = s.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(1));
    let log = s.stderr();
    assert!(
        log.contains("did not pass its check within 2s") && log.contains("status 503"),
        "{log}"
    );
    assert_eq!(get(&etcd, &s.key()).await, None, "never registered");
    let app = s.read_pid("app.pid").expect("the app's pid");
    assert!(!alive(app), "the app was stopped");
    assert!(s.term_ns().is_some(), "with SIGTERM");
}

/// Usage errors exit 2 and say what was expected; an etcd that is down at
/// start is retried, and said so, until it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_addresses_are_refused_and_a_down_etcd_is_waited_for() {
    let (code, _, err) = run_cli(&[
        "register",
        "--etcd",
        "http://127.0.0.1:1",
        "--service",
        "web",
        "--address",
        "10.0.0.5",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--address") && err.contains("expected host:port"),
        "{err}"
    );
    let (code, _, err) = run_cli(&[
        "register",
        "--etcd",
        "http://127.0.0.1:1",
        "--service",
        "web",
        "--address",
        "0.0.0.0:80",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not an address proxies can reach"), "{err}");
    let (code, _, err) = run_cli(&[
        "register",
        "--etcd",
        "http://127.0.0.1:1",
        "--service",
        "web/x",
        "--address",
        "127.0.0.1:80",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("must not contain '/'"), "{err}");

    let mut etcd = EtcdServer::start();
    etcd.stop();
    let app = Upstream::start("late").await;
    let s = Sidekick::start("--etcd", &etcd.endpoint(), "late", app.addr, &[], false);
    let want = format!("etcd at {} unreachable", etcd.endpoint());
    wait_until(
        CHANGE_DEADLINE,
        "the sidekick says etcd is unreachable",
        || {
            let log = s.stderr();
            log.contains(&want) && log.contains("retrying in")
        },
    )
    .await;
    etcd.restart();
    wait_key(
        &etcd,
        &s.key(),
        Duration::from_secs(15),
        "registered once etcd is up",
        |v| v.is_some(),
    )
    .await;
}

/// Each proxy keeps `/pointsman/proxies/<id>`: its admin address and the
/// revision it applied, rewritten when that changes, deleted when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_a_record_of_what_they_applied() {
    let etcd = EtcdServer::start();
    let mut proxy = start_proxy(&etcd, "edge-1", Some("web")).await;
    let key = "/pointsman/proxies/edge-1";
    let (first, lease) = wait_key(
        &etcd,
        key,
        CHANGE_DEADLINE,
        "the proxy's record exists",
        |v| v.is_some(),
    )
    .await
    .expect("a record");
    assert_ne!(lease, 0, "under a lease");
    let record: Value = serde_json::from_str(&first).expect("the record is JSON");
    assert_eq!(record["id"], "edge-1");
    assert_eq!(record["admin"], proxy.admin.to_string());
    assert_eq!(record["pid"], proxy.pid());

    let rev = put(&etcd, "/services/web/a", "127.0.0.1:9").await;
    wait_key(
        &etcd,
        key,
        CHANGE_DEADLINE,
        "the record carries the new revision",
        |v| {
            v.as_ref()
                .and_then(|(text, _)| serde_json::from_str::<Value>(text).ok())
                .and_then(|r| r["applied_revision"].as_i64())
                >= Some(rev)
        },
    )
    .await;

    sigterm(proxy.pid());
    wait_exit(proxy.child(), Duration::from_secs(15), "the proxy").await;
    assert_eq!(get(&etcd, key).await, None, "deleted on a clean stop");
}

#[test]
fn register_help_lists_its_flags() {
    let (code, out, _) = run_cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("register"), "`pointsman --help`:\n{out}");
    let (code, out, _) = run_cli(&["register", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--etcd",
        "--service",
        "--address",
        "--id",
        "--ttl",
        "--weight",
        "--tag",
        "--meta",
        "--check-http",
        "--check-tcp",
        "--check-timeout",
        "--drain-timeout",
        "[-- <CMD>...]",
    ] {
        assert!(
            out.contains(flag),
            "`pointsman register --help` mentions {flag}:\n{out}"
        );
    }
    let (code, out, _) = run_cli(&["run", "--help"]);
    assert_eq!(code, 0);
    for flag in ["--proxy-id", "--advertise-admin"] {
        assert!(
            out.contains(flag),
            "`pointsman run --help` mentions {flag}:\n{out}"
        );
    }
}

/// Once registered, an app that keeps failing its check is set to `maint`
/// (no traffic) and back to `ready` when it passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_sets_maint_until_the_app_recovers() {
    let etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, "p1", Some("web")).await;
    let addr = free_addr();
    let app = App::start(addr, "m");
    let s = Sidekick::start(
        "--etcd",
        &etcd.endpoint(),
        "m",
        addr,
        &["--check-interval", "200ms", "--check-fall", "2"],
        false,
    );
    wait_ready(&[&proxy], "web", &["m"]).await;

    drop(app);
    wait_for(CHANGE_DEADLINE, "the instance is in maint", || async {
        endpoints(&proxy, "web")
            .await
            .get("m")
            .is_some_and(|(state, _, _)| state == "maint")
    })
    .await;
    let (value, _) = get(&etcd, &s.key()).await.expect("still registered");
    assert!(value.contains(r#""state":"maint""#), "{value}");

    let _app = App::start(addr, "m");
    wait_ready(&[&proxy], "web", &["m"]).await;
    assert!(
        s.stderr().contains("passes its check again"),
        "{}",
        s.stderr()
    );
}
