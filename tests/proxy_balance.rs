//! End to end: every balancer spreads requests over real `pointsman
//! upstream` processes the way its name promises, weights included, and the
//! sticky ones (source, cookie) keep clients where they were across reloads.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::*;

/// One HTTP listener whose default service is `web`, balanced by
/// `algorithm` over `endpoints` (config lines from [`endpoint_line`]).
fn one_service(listen: SocketAddr, algorithm: &str, endpoints: &[String]) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
bind = "{listen}"
default_service = "web"

[services.web]
balance = "{algorithm}"
endpoints = [
  {}
]
"#,
        endpoints.join(",\n  ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roundrobin_follows_weights_exactly() {
    let ups = Upstream::start_many(&["rr1", "rr2", "rr3"]).await;
    let eps = [
        endpoint_line(&ups[0], ""),
        endpoint_line(&ups[1], ""),
        endpoint_line(&ups[2], "weight = 2"),
    ];
    let proxy = Proxy::start(|| one_service(free_addr(), "roundrobin", &eps)).await;
    let client = client();

    let mut order = Vec::new();
    for _ in 0..40 {
        order.push(server_of(&client, &proxy.url("/"), &[]).await);
    }
    let mut counts = BTreeMap::new();
    for s in &order {
        *counts.entry(s.as_str()).or_insert(0) += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([("rr1", 10), ("rr2", 10), ("rr3", 20)]),
        "weights 1,1,2 over 40 requests: {order:?}"
    );
    // Smooth: every 4 consecutive requests are one cycle of the schedule.
    for w in order.windows(4) {
        let mut w = w.to_vec();
        w.sort();
        assert_eq!(
            w,
            ["rr1", "rr2", "rr3", "rr3"],
            "a window of 4 in {order:?}"
        );
    }
    // The admin counters saw the same thing.
    for (id, n) in [("rr1", 10), ("rr2", 10), ("rr3", 20)] {
        let ep = proxy.endpoint("web", id).await;
        assert_eq!(ep["requests"], n, "{id}: {ep}");
        assert_eq!(ep["responses"][1], n, "{id} 2xx: {ep}");
    }
}

/// The endpoint of `web` that has a request in flight, if one has.
async fn busy_endpoint(proxy: &Proxy) -> Option<String> {
    let all = proxy.services().await;
    all[0]["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["in_flight"] == 1)
        .and_then(|e| e["id"].as_str())
        .map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leastconn_avoids_the_busy_endpoint() {
    let ups = Upstream::start_many(&["lc1", "lc2", "lc3"]).await;
    let eps: Vec<String> = ups.iter().map(|u| endpoint_line(u, "")).collect();
    let proxy = Proxy::start(|| one_service(free_addr(), "leastconn", &eps)).await;

    // Hold one endpoint busy with a slow request, and find out which.
    let slow_url = proxy.url("/slow?ms=8000");
    let slow = tokio::spawn(async move { plain_client().get(slow_url).send().await });
    let p = &proxy;
    wait_for(
        Duration::from_secs(5),
        "one endpoint has a request in flight",
        || async move { busy_endpoint(p).await.is_some() },
    )
    .await;
    let busy = busy_endpoint(&proxy).await.expect("a busy endpoint");

    let counts = tally(&client(), &proxy.url("/"), 30).await;
    slow.abort();
    assert!(
        !counts.contains_key(&busy),
        "{busy} was busy yet got new requests: {counts:?}"
    );
    let idle: Vec<&str> = ["lc1", "lc2", "lc3"]
        .into_iter()
        .filter(|id| *id != busy)
        .collect();
    for id in idle {
        let n = counts.get(id).copied().unwrap_or(0);
        assert!(
            n >= 10,
            "idle {id} should share the 30 requests with the other idle one: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_roughly_follows_weights() {
    let ups = Upstream::start_many(&["rnd1", "rnd2", "rnd3"]).await;
    let eps = [
        endpoint_line(&ups[0], ""),
        endpoint_line(&ups[1], ""),
        endpoint_line(&ups[2], "weight = 2"),
    ];
    let proxy = Proxy::start(|| one_service(free_addr(), "random", &eps)).await;
    let n = 400;
    let counts = tally(&client(), &proxy.url("/"), n).await;
    let got = |id: &str| counts.get(id).copied().unwrap_or(0);
    // Expected 100/100/200; the bounds are about 4 standard deviations, so a
    // uniform pick (133 each) fails them and a correct one practically never.
    assert!(
        (160..=240).contains(&got("rnd3")),
        "weight 2 of 4: {counts:?}"
    );
    assert!(
        (65..=135).contains(&got("rnd1")),
        "weight 1 of 4: {counts:?}"
    );
    assert!(
        (65..=135).contains(&got("rnd2")),
        "weight 1 of 4: {counts:?}"
    );
    assert_eq!(got("rnd1") + got("rnd2") + got("rnd3"), n);
}

/// The upstream each client IP lands on, three requests per IP (which
/// must agree).
async fn source_map(proxy: &Proxy, ips: &[IpAddr]) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for ip in ips {
        let client = client_from(*ip);
        let first = server_of(&client, &proxy.url("/"), &[]).await;
        for _ in 0..2 {
            let again = server_of(&client, &proxy.url("/"), &[]).await;
            assert_eq!(again, first, "client {ip} moved between requests");
        }
        out.insert(*ip, first);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_keeps_each_client_ip_and_moves_only_removed_keys() {
    let ups = Upstream::start_many(&["src1", "src2", "src3"]).await;
    let config = |listen: SocketAddr, keep: &[&Upstream]| {
        let eps: Vec<String> = keep.iter().map(|u| endpoint_line(u, "")).collect();
        one_service(listen, "source", &eps)
    };
    let all: Vec<&Upstream> = ups.iter().collect();
    let proxy = Proxy::start(|| config(free_addr(), &all)).await;

    let ips: Vec<IpAddr> = (2..=20)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let before = source_map(&proxy, &ips).await;
    let used: BTreeSet<&String> = before.values().collect();
    assert!(
        used.len() >= 2,
        "19 client IPs should not all hash to one endpoint: {before:?}"
    );

    // Remove the endpoint holding the most clients.
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for s in before.values() {
        *load.entry(s.as_str()).or_insert(0) += 1;
    }
    let (removed, _) = load
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(s, n)| (s.to_string(), *n))
        .expect("some load");
    let keep: Vec<&Upstream> = ups.iter().filter(|u| u.name != removed).collect();
    proxy.reload(&config(proxy.addr(), &keep)).await;

    let after = source_map(&proxy, &ips).await;
    for ip in &ips {
        let (was, is) = (&before[ip], &after[ip]);
        if *was == removed {
            assert_ne!(is, &removed, "{ip} still on the removed endpoint");
        } else {
            assert_eq!(
                is, was,
                "{ip} moved although its endpoint {was} stayed (removed {removed})"
            );
        }
    }
}

/// The `SERVERID` value a response sets, if any.
fn set_cookie(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("SERVERID="))
        .map(|v| v.split(';').next().unwrap_or("").to_string())
}

/// GET / with an optional SERVERID cookie: (server, cookie set).
async fn cookie_get(
    client: &reqwest::Client,
    proxy: &Proxy,
    cookie: Option<&str>,
) -> (String, Option<String>) {
    let mut req = client.get(proxy.url("/"));
    if let Some(c) = cookie {
        req = req.header("cookie", format!("theme=dark; SERVERID={c}"));
    }
    let resp = req.send().await.expect("GET /");
    assert_eq!(resp.status(), 200);
    let set = set_cookie(&resp);
    let echo: serde_json::Value = resp.json().await.expect("echo JSON");
    (echo["server"].as_str().unwrap_or("").to_string(), set)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_sticks_and_moves_when_its_endpoint_goes_to_maint() {
    let ups = Upstream::start_many(&["ck1", "ck2", "ck3"]).await;
    let config = |listen: SocketAddr, states: &BTreeMap<&str, &str>| {
        let eps: Vec<String> = ups
            .iter()
            .map(|u| {
                let state = states.get(u.name.as_str()).copied().unwrap_or("ready");
                endpoint_line(u, &format!("state = \"{state}\""))
            })
            .collect();
        one_service(listen, "cookie", &eps)
    };
    let proxy = Proxy::start(|| config(free_addr(), &BTreeMap::new())).await;
    let client = client();

    // The first answer binds the client and says so in a cookie.
    let (first, set) = cookie_get(&client, &proxy, None).await;
    let bound = set.expect("the first response sets SERVERID");
    assert_eq!(bound, first, "the cookie names the endpoint that answered");
    for _ in 0..10 {
        let (server, set) = cookie_get(&client, &proxy, Some(&bound)).await;
        assert_eq!(
            server, bound,
            "a request with SERVERID={bound} went elsewhere"
        );
        assert_eq!(set, None, "no new cookie while the binding holds");
    }
    // Any endpoint's cookie selects it.
    let other = ["ck1", "ck2", "ck3"]
        .into_iter()
        .find(|c| *c != bound)
        .expect("another endpoint");
    assert_eq!(cookie_get(&client, &proxy, Some(other)).await.0, other);

    // Drain: sessions bound to it stay; new clients never go there.
    proxy
        .reload(&config(
            proxy.addr(),
            &BTreeMap::from([(bound.as_str(), "drain")]),
        ))
        .await;
    for _ in 0..5 {
        assert_eq!(cookie_get(&client, &proxy, Some(&bound)).await.0, bound);
    }
    for _ in 0..9 {
        let (server, set) = cookie_get(&client, &proxy, None).await;
        assert_ne!(server, bound, "a new client went to the draining endpoint");
        assert_eq!(set.as_deref(), Some(server.as_str()));
    }

    // Maint: the bound client moves and gets a cookie for its new endpoint.
    proxy
        .reload(&config(
            proxy.addr(),
            &BTreeMap::from([(bound.as_str(), "maint")]),
        ))
        .await;
    let (moved, set) = cookie_get(&client, &proxy, Some(&bound)).await;
    assert_ne!(moved, bound, "SERVERID={bound} still served while in maint");
    assert_eq!(
        set.as_deref(),
        Some(moved.as_str()),
        "the client is re-bound with a new cookie"
    );
    for _ in 0..5 {
        let (server, set) = cookie_get(&client, &proxy, Some(&moved)).await;
        assert_eq!(server, moved, "the new binding holds");
        assert_eq!(set, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_zero_gets_nothing_whatever_the_algorithm() {
    let ups = Upstream::start_many(&["zero", "one", "two"]).await;
    let algorithms = ["roundrobin", "leastconn", "random", "source", "cookie"];
    let config = |listen: SocketAddr| {
        let mut c = format!("[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\n");
        for a in algorithms {
            c += &format!(
                "\n[services.{a}]\nbalance = \"{a}\"\nendpoints = [{}, {}, {}]\n\
                 \n[routes.{a}]\npath_prefix = \"/{a}\"\nservice = \"{a}\"\n",
                endpoint_line(&ups[0], "weight = 0"),
                endpoint_line(&ups[1], ""),
                endpoint_line(&ups[2], ""),
            );
        }
        c
    };
    let proxy = Proxy::start(|| config(free_addr())).await;
    for a in algorithms {
        let mut seen = BTreeMap::new();
        // Several client IPs so that `source` hashes more than one key.
        for i in 2..=9u8 {
            let client = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)));
            for _ in 0..3 {
                let s = server_of(&client, &proxy.url(&format!("/{a}/x")), &[]).await;
                *seen.entry(s).or_insert(0) += 1;
            }
        }
        assert!(
            !seen.contains_key("zero"),
            "{a}: the weight 0 endpoint got requests: {seen:?}"
        );
        if a != "source" {
            assert_eq!(
                seen.len(),
                2,
                "{a}: both weighted endpoints serve: {seen:?}"
            );
        }
        let ep = proxy.endpoint(a, "zero").await;
        assert_eq!(ep["requests"], 0, "{a}: {ep}");
    }
}
