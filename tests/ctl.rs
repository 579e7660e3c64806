//! End to end: `pointsman ctl`. Fleet-wide changes through a real etcd reach
//! two proxy replicas; changes through one proxy's admin API stay on it;
//! mistakes are refused with what to fix.

mod support;

use std::time::Duration;

use support::etcd::EtcdServer;
use support::*;

const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

fn put(etcd: &EtcdServer, key: &str, value: &str) {
    let out = etcd
        .etcdctl()
        .args(["put", key, value])
        .output()
        .expect("run etcdctl (install etcd-client)");
    assert!(out.status.success(), "etcdctl put {key}: {out:?}");
}

fn get(etcd: &EtcdServer, key: &str) -> String {
    let out = etcd
        .etcdctl()
        .args(["get", "--print-value-only", key])
        .output()
        .expect("run etcdctl");
    assert!(out.status.success(), "etcdctl get {key}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn listener_config(listen: std::net::SocketAddr) -> String {
    format!(
        r#"[[listeners]]
name = "web"
bind = "{listen}"

[routes.site]
path_prefix = "/"
map = "colour"
map_key = "live"
map_default = "web"
"#
    )
}

async fn state_of(proxy: &Proxy, id: &str) -> (String, u64) {
    let e = proxy.endpoint("web", id).await;
    (
        e["state"].as_str().unwrap_or("?").to_string(),
        e["weight"].as_u64().unwrap_or(999),
    )
}

async fn wait_state(proxy: &Proxy, id: &str, want: (&str, u64)) {
    let deadline = tokio::time::Instant::now() + CHANGE_DEADLINE;
    loop {
        let now = state_of(proxy, id).await;
        if now.0 == want.0 && now.1 == want.1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} stayed {now:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn fleet_changes_reach_every_proxy_and_local_ones_stay_local() {
    let etcd = EtcdServer::start();
    let ups = Upstream::start_many(&["a1", "a2", "green"]).await;
    put(&etcd, "/services/web/a1", &ups[0].addr.to_string());
    put(&etcd, "/services/web/a2", &ups[1].addr.to_string());
    put(&etcd, "/services/green/g1", &ups[2].addr.to_string());
    let endpoint = etcd.endpoint();
    let args = ["--etcd", endpoint.as_str()];
    let p1 = Proxy::start_with_args(|| listener_config(free_addr()), &args).await;
    let p2 = Proxy::start_with_args(|| listener_config(free_addr()), &args).await;
    for p in [&p1, &p2] {
        wait_state(p, "a1", ("ready", 1)).await;
    }
    let ctl = |extra: &[&str]| {
        let mut a = vec!["ctl", "--etcd", endpoint.as_str()];
        a.extend_from_slice(extra);
        run_cli(&a)
    };

    // Drain a1 fleet-wide, then weight it, then reset it.
    let (code, out, err) = ctl(&["state", "web/a1", "drain"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("revision"), "{out}");
    for p in [&p1, &p2] {
        wait_state(p, "a1", ("drain", 1)).await;
    }
    let (code, _, err) = ctl(&["weight", "web/a1", "7"]);
    assert_eq!(code, 0, "{err}");
    // The weight joins the state: both fields are kept.
    assert_eq!(
        get(&etcd, "/pointsman/overrides/web/a1"),
        r#"{"state":"drain","weight":7}"#
    );
    for p in [&p1, &p2] {
        wait_state(p, "a1", ("drain", 7)).await;
    }
    let c = client();
    let counts = tally(&c, &p1.url("/"), 10).await;
    assert_eq!(
        counts.get("a2"),
        Some(&10),
        "a drained instance got traffic: {counts:?}"
    );
    let (code, _, err) = ctl(&["reset", "web/a1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(get(&etcd, "/pointsman/overrides/web/a1"), "");
    for p in [&p1, &p2] {
        wait_state(p, "a1", ("ready", 1)).await;
    }

    // A blue/green switch through a map entry, and back.
    let (code, _, err) = ctl(&["map-set", "colour", "live", "green"]);
    assert_eq!(code, 0, "{err}");
    for p in [&p1, &p2] {
        let url = p.url("/");
        wait_for(CHANGE_DEADLINE, "traffic on green", || {
            let c = c.clone();
            let url = url.clone();
            async move { server_of(&c, &url, &[]).await == "green" }
        })
        .await;
    }
    let (code, _, err) = ctl(&["map-del", "colour", "live"]);
    assert_eq!(code, 0, "{err}");
    let url = p2.url("/");
    wait_for(CHANGE_DEADLINE, "traffic back on web", || {
        let c = c.clone();
        let url = url.clone();
        async move { server_of(&c, &url, &[]).await != "green" }
    })
    .await;

    // Mistakes: refused, with what to fix, and nothing written.
    let (code, _, err) = ctl(&["state", "web/zz", "drain"]);
    assert_ne!(code, 0);
    assert!(err.contains("not registered"), "{err}");
    assert_eq!(get(&etcd, "/pointsman/overrides/web/zz"), "");
    let (code, _, err) = ctl(&["state", "web", "drain"]);
    assert_ne!(code, 0);
    assert!(err.contains("<service>/<instance-id>"), "{err}");
    let (code, _, err) = ctl(&["weight", "web/a1", "300"]);
    assert_ne!(code, 0);
    assert!(err.contains("out of range"), "{err}");
    let (code, _, err) = ctl(&["state", "web/a1", "down"]);
    assert_ne!(code, 0);
    assert!(err.contains("ready") && err.contains("drain"), "{err}");
    let (code, _, err) = ctl(&["map-del", "colour", "nokey"]);
    assert_ne!(code, 0);
    assert!(err.contains("no key"), "{err}");

    // One proxy through its admin API: only that one changes.
    let admin = p1.admin_url("");
    let (code, out, err) = run_cli(&["ctl", "--admin", &admin, "state", "web/a2", "maint"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_state(&p1, "a2", ("maint", 1)).await;
    // A fleet-wide change made after it reaches p2: had the admin change
    // gone through etcd as well, p2 would have applied it first.
    let (code, _, err) = ctl(&["weight", "web/a1", "3"]);
    assert_eq!(code, 0, "{err}");
    wait_state(&p2, "a1", ("ready", 3)).await;
    assert_eq!(state_of(&p2, "a2").await, ("ready".to_string(), 1));
    let (code, _, err) = ctl(&["reset", "web/a1"]);
    assert_eq!(code, 0, "{err}");
    for p in [&p1, &p2] {
        wait_state(p, "a1", ("ready", 1)).await;
    }
    let (code, _, err) = run_cli(&["ctl", "--admin", &admin, "state", "web/nope", "maint"]);
    assert_ne!(code, 0);
    assert!(err.contains("no such instance"), "{err}");
    let (code, _, err) = run_cli(&["ctl", "--admin", &admin, "reset", "web/a2"]);
    assert_eq!(code, 0, "{err}");
    wait_state(&p1, "a2", ("ready", 1)).await;

    // Fleet status: both proxies' records, then the endpoints one serves.
    let (code, out, err) = ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("proxies (2):"), "{out}");
    for p in [&p1, &p2] {
        let admin = p.admin_url("");
        let admin = admin.trim_start_matches("http://").trim_end_matches('/');
        assert!(out.contains(admin), "status misses proxy {admin}: {out}");
    }
    assert!(out.contains("a1") && out.contains("g1"), "{out}");

    // Status through one proxy's admin API lists every endpoint.
    let (code, out, err) = run_cli(&["ctl", "--admin", &admin, "status"]);
    assert_eq!(code, 0, "{err}");
    for id in ["a1", "a2", "g1"] {
        assert!(out.contains(id), "status misses {id}: {out}");
    }
    let (code, _, err) = run_cli(&["ctl", "status"]);
    assert_ne!(code, 0);
    assert!(err.contains("--etcd") && err.contains("--admin"), "{err}");
}
