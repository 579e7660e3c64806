//! End to end with Consul: the `pointsman` binary follows Consul's catalog
//! and health (`--consul`) and routes to real `pointsman upstream`
//! processes.
//!
//! No Consul binary can be installed here, so Consul is played by the test
//! double `pointsman_testkit::consul` (tests/testkit): a real HTTP server
//! that implements the parts of Consul's API pointsman uses, blocking
//! queries included. It is the only stand-in for a real server in the test suite.

mod support;

use std::time::Duration;

use pointsman_testkit::consul::{ConsulDouble, Health};
use serde_json::{json, Value};
use support::etcd::EtcdServer;
use support::*;

const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

fn listener(listen: std::net::SocketAddr) -> String {
    format!(
        r#"[[listeners]]
name = "web"
bind = "{listen}"
"#
    )
}

/// An agent registration of `id` in service `app`, with a passing TTL check
/// and a Fabio-style route tag.
fn app(id: &str, u: &Upstream) -> Value {
    json!({
        "ID": id,
        "Name": "app",
        "Address": u.addr.ip().to_string(),
        "Port": u.addr.port(),
        "Tags": ["urlprefix-/app strip=/app"],
        "Check": {"TTL": "60s", "Status": "passing"},
    })
}

async fn ids(proxy: &Proxy, service: &str) -> Vec<String> {
    let services = proxy.services().await;
    let mut out: Vec<String> = services
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}

async fn wait_ids(proxy: &Proxy, service: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + CHANGE_DEADLINE;
    loop {
        let now = ids(proxy, service).await;
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} has {now:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

async fn discovery(proxy: &Proxy, source: &str) -> Value {
    let all: Value = plain_client()
        .get(proxy.admin_url("/api/discovery"))
        .send()
        .await
        .expect("/api/discovery")
        .json()
        .await
        .expect("discovery json");
    all.as_array()
        .into_iter()
        .flatten()
        .find(|s| s["source"] == source)
        .cloned()
        .unwrap_or_else(|| panic!("no {source} in {all}"))
}

#[tokio::test]
async fn consul_services_are_routed_by_health_and_tags() {
    let consul = ConsulDouble::start();
    let ups = Upstream::start_many(&["a1", "a2"]).await;
    consul.register(app("a1", &ups[0]));
    let url = consul.url();
    let proxy = Proxy::start_with_args(
        || listener(free_addr()),
        &["--consul", url.as_str(), "--consul-wait", "2s"],
    )
    .await;
    wait_ids(&proxy, "app", &["a1"]).await;
    let c = client();
    // The tag's route, with its prefix stripped.
    let (status, echo) = get_echo(&c, &proxy.url("/app/hello"), &[]).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["server"], "a1");
    assert_eq!(echo["path"], "/hello", "{echo}");

    // A second instance joins; both take traffic.
    consul.register(app("a2", &ups[1]));
    wait_ids(&proxy, "app", &["a1", "a2"]).await;
    let counts = tally(&c, &proxy.url("/app/"), 10).await;
    assert_eq!(
        (counts.get("a1"), counts.get("a2")),
        (Some(&5), Some(&5)),
        "{counts:?}"
    );

    // a1's check turns critical: no new requests reach it.
    consul.set_check_status("service:a1", Health::Critical);
    wait_ids(&proxy, "app", &["a2"]).await;
    let counts = tally(&c, &proxy.url("/app/"), 10).await;
    assert_eq!(counts.get("a2"), Some(&10), "{counts:?}");
    consul.set_check_status("service:a1", Health::Passing);
    wait_ids(&proxy, "app", &["a1", "a2"]).await;

    // Weight and state from Meta.
    let mut drained = app("a1", &ups[0]);
    drained["Meta"] = json!({"pointsman-state": "drain"});
    consul.register(drained);
    let deadline = tokio::time::Instant::now() + CHANGE_DEADLINE;
    while proxy.endpoint("app", "a1").await["state"] != "drain" {
        assert!(tokio::time::Instant::now() < deadline, "a1 never drained");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let counts = tally(&c, &proxy.url("/app/"), 6).await;
    assert_eq!(counts.get("a2"), Some(&6), "{counts:?}");

    // Deregistered: gone.
    assert!(consul.deregister("a2"));
    wait_ids(&proxy, "app", &["a1"]).await;

    // Consul's index goes backwards (a snapshot restore): the proxy follows
    // the restored state.
    let snap = consul.snapshot();
    consul.register(app("a2", &ups[1]));
    wait_ids(&proxy, "app", &["a1", "a2"]).await;
    consul.restore(&snap);
    wait_ids(&proxy, "app", &["a1"]).await;
    consul.register(app("a1", &ups[0]));
    let deadline = tokio::time::Instant::now() + CHANGE_DEADLINE;
    while proxy.endpoint("app", "a1").await["state"] != "ready" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a1 never came back to ready after the restore"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test]
async fn consul_down_keeps_serving_and_saved_state_survives_a_restart() {
    let mut consul = ConsulDouble::start();
    let ups = Upstream::start_many(&["a1"]).await;
    consul.register(app("a1", &ups[0]));
    let state = tempfile::tempdir().expect("state dir");
    let state_dir = state.path().to_string_lossy().into_owned();
    let url = consul.url();
    let args = [
        "--consul",
        url.as_str(),
        "--consul-wait",
        "1s",
        "--state-dir",
        state_dir.as_str(),
    ];
    let proxy = Proxy::start_with_args(|| listener(free_addr()), &args).await;
    wait_ids(&proxy, "app", &["a1"]).await;
    // The relay saves the state at most once a second.
    let saved = state.path().join("consul.state.json");
    wait_until(
        CHANGE_DEADLINE,
        "the proxy saved a1 in its state dir",
        || std::fs::read_to_string(&saved).is_ok_and(|s| s.contains("a1")),
    )
    .await;

    consul.stop();
    let c = client();
    let deadline = tokio::time::Instant::now() + CHANGE_DEADLINE;
    while discovery(&proxy, "consul").await["connected"] != false {
        assert!(
            tokio::time::Instant::now() < deadline,
            "consul never shown disconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        assert_eq!(server_of(&c, &proxy.url("/app/"), &[]).await, "a1");
    }
    let d = discovery(&proxy, "consul").await;
    assert!(d["last_error"].is_string(), "{d}");

    // A new proxy while Consul is still down serves the saved state.
    drop(proxy);
    let proxy = Proxy::start_with_args(|| listener(free_addr()), &args).await;
    assert_eq!(server_of(&c, &proxy.url("/app/"), &[]).await, "a1");
    assert_eq!(
        discovery(&proxy, "consul").await["serving_saved_state"],
        true
    );

    // Consul comes back with a change: it is followed.
    consul.restart();
    consul.deregister("a1");
    wait_ids(&proxy, "app", &[]).await;
}

#[tokio::test]
async fn consul_and_etcd_feed_one_table() {
    let etcd = EtcdServer::start();
    let consul = ConsulDouble::start();
    let ups = Upstream::start_many(&["a1", "w1"]).await;
    consul.register(app("a1", &ups[0]));
    let out = etcd
        .etcdctl()
        .args(["put", "/services/web/w1", &ups[1].addr.to_string()])
        .output()
        .expect("run etcdctl (install etcd-client)");
    assert!(out.status.success(), "{out:?}");
    let out = etcd
        .etcdctl()
        .args([
            "put",
            "/pointsman/routes/web",
            r#"{"path_prefix":"/web","strip_prefix":true,"service":"web"}"#,
        ])
        .output()
        .expect("run etcdctl");
    assert!(out.status.success(), "{out:?}");
    let (curl, eurl) = (consul.url(), etcd.endpoint());
    let proxy = Proxy::start_with_args(
        || listener(free_addr()),
        &["--consul", curl.as_str(), "--etcd", eurl.as_str()],
    )
    .await;
    wait_ids(&proxy, "app", &["a1"]).await;
    wait_ids(&proxy, "web", &["w1"]).await;
    let c = client();
    assert_eq!(server_of(&c, &proxy.url("/app/x"), &[]).await, "a1");
    assert_eq!(server_of(&c, &proxy.url("/web/x"), &[]).await, "w1");
    assert_eq!(discovery(&proxy, "consul").await["connected"], true);
    assert_eq!(discovery(&proxy, "etcd").await["connected"], true);
}
