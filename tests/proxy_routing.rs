//! End to end: which service a request reaches. Hosts (exact, `*.` wildcard,
//! any), longest path prefix, prefix stripping, map and split targets, and
//! the answers when there is nowhere to go (404, 503).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use support::*;

/// `[services.<name>]` with `u` as its only endpoint.
fn service(name: &str, u: &Upstream) -> String {
    format!(
        "[services.{name}]\nendpoints = [{}]\n\n",
        endpoint_line(u, "")
    )
}

fn listener(listen: SocketAddr) -> String {
    format!("[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\n\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_then_longest_prefix_then_strip() {
    let ups = Upstream::start_many(&["exact", "wild", "any", "api", "apiv2"]).await;
    let config = |listen| {
        let mut c = listener(listen);
        for u in &ups {
            c += &service(&u.name, u);
        }
        c + r#"
[routes.exact]
host = "www.example.com"
service = "exact"

[routes.wild]
host = "*.example.com"
service = "wild"

[routes.site]
path_prefix = "/site"
service = "any"

[routes.api]
path_prefix = "/api"
service = "api"

[routes.apiv2]
path_prefix = "/api/v2"
service = "apiv2"

[routes.strip]
path_prefix = "/strip"
strip_prefix = true
service = "api"
"#
    };
    let proxy = Proxy::start(|| config(free_addr())).await;
    let client = client();
    let cases = [
        // (host, path, upstream, path the upstream sees)
        ("www.example.com", "/", "exact", "/"),
        // An exact host wins over a longer prefix for any host.
        ("www.example.com", "/site/x", "exact", "/site/x"),
        ("WWW.Example.COM", "/a", "exact", "/a"),
        ("shop.example.com", "/x", "wild", "/x"),
        ("a.b.example.com", "/x", "wild", "/x"),
        ("shop.example.com:8080", "/x", "wild", "/x"),
        ("other.org", "/site/page", "any", "/site/page"),
        ("other.org", "/api/v1/users", "api", "/api/v1/users"),
        (
            "other.org",
            "/api/v2/users?x=1",
            "apiv2",
            "/api/v2/users?x=1",
        ),
        ("other.org", "/strip/rest?q=1", "api", "/rest?q=1"),
        ("other.org", "/strip", "api", "/"),
    ];
    for (host, path, want, seen_path) in cases {
        let (status, echo) = get_echo(&client, &proxy.url(path), &[("host", host)]).await;
        assert_eq!(status, 200, "{host}{path}: {echo}");
        assert_eq!(
            echo["server"], want,
            "{host}{path} went to the wrong service"
        );
        assert_eq!(echo["path"], seen_path, "{host}{path}: the upstream's path");
        assert_eq!(echo["headers"]["host"], host, "{host}{path}: Host is kept");
    }
    // `example.com` itself is not a subdomain of example.com, and nothing
    // else matches `/x` for it.
    let (status, _) = get_echo(&client, &proxy.url("/x"), &[("host", "example.com")]).await;
    assert_eq!(status, 404, "example.com/x matches no route");
    let (status, body) = get_echo(&client, &proxy.url("/nothing"), &[("host", "other.org")]).await;
    assert_eq!(status, 404, "no route and no default service: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_and_split_targets() {
    let ups = Upstream::start_many(&["blue", "green"]).await;
    let config = |listen| {
        let mut c = listener(listen);
        for u in &ups {
            c += &service(&u.name, u);
        }
        c + r#"
[routes.release]
path_prefix = "/release"
map = "release"
map_key = "live"

[routes.version]
path_prefix = "/version"
map = "versions"
map_key = "req.hdr(x-version)"
map_default = "blue"

[routes.strict]
path_prefix = "/strict"
map = "versions"
map_key = "req.hdr(x-version)"

[routes.canary]
path_prefix = "/canary"
split = [{ service = "blue", weight = 90 }, { service = "green", weight = 10 }]

[maps.release]
live = "green"
staging = "blue"

[maps.versions]
v1 = "blue"
v2 = "green"
"#
    };
    let proxy = Proxy::start(|| config(free_addr())).await;
    let client = client();

    assert_eq!(
        server_of(&client, &proxy.url("/release/x"), &[]).await,
        "green"
    );
    let version = proxy.url("/version/x");
    assert_eq!(
        server_of(&client, &version, &[("x-version", "v2")]).await,
        "green"
    );
    assert_eq!(
        server_of(&client, &version, &[("x-version", "v1")]).await,
        "blue"
    );
    assert_eq!(
        server_of(&client, &version, &[("x-version", "v9")]).await,
        "blue",
        "an unknown key takes map_default"
    );
    assert_eq!(server_of(&client, &version, &[]).await, "blue");
    let strict = proxy.url("/strict/x");
    assert_eq!(
        server_of(&client, &strict, &[("x-version", "v2")]).await,
        "green"
    );
    let (status, body) = get_echo(&client, &strict, &[("x-version", "v9")]).await;
    assert_eq!(status, 503, "no entry and no default: {body}");

    let n = 400;
    let counts: BTreeMap<String, usize> = tally(&client, &proxy.url("/canary/x"), n).await;
    let green = counts.get("green").copied().unwrap_or(0);
    let blue = counts.get("blue").copied().unwrap_or(0);
    assert_eq!(green + blue, n);
    // Expected 40 of 400; the bounds are 4 standard deviations.
    assert!(
        (16..=64).contains(&green),
        "a 90/10 split sent {green} of {n} to green: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nowhere_to_go_is_404_or_503_and_never_falls_through() {
    let up = Upstream::start("site").await;
    let config = |listen: SocketAddr, fallback: SocketAddr| {
        format!(
            r#"
[[listeners]]
name = "web"
bind = "{listen}"

[[listeners]]
name = "fallback"
bind = "{fallback}"
default_service = "site"

[services.site]
endpoints = [{site}]

[services.down]
endpoints = [
  {{ id = "down1", address = "{addr}", state = "maint" }},
  {{ id = "down2", address = "{addr}", state = "maint" }},
]

[services.empty]
balance = "leastconn"

[routes.site]
path_prefix = "/site"
service = "site"

[routes.down]
path_prefix = "/site/down"
service = "down"

[routes.empty]
path_prefix = "/site/empty"
service = "empty"

[routes.ghost]
path_prefix = "/ghost"
service = "nobody"
"#,
            site = endpoint_line(&up, ""),
            addr = up.addr,
        )
    };
    let proxy = Proxy::start(|| config(free_addr(), free_addr())).await;
    let client = plain_client();
    let web = proxy.listener("web");

    assert_eq!(
        server_of(&client, &format!("http://{web}/site/ok"), &[]).await,
        "site"
    );

    for path in ["/site/down/x", "/site/empty/x"] {
        let resp = client
            .get(format!("http://{web}{path}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(
            resp.status(),
            503,
            "{path}: a service without usable endpoints is a 503, not the /site route"
        );
        assert!(
            resp.headers().contains_key("retry-after"),
            "{path}: 503 carries Retry-After: {:?}",
            resp.headers()
        );
    }

    let resp = client
        .get(format!("http://{web}/ghost/x"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 503, "a route to an unknown service");
    let body = resp.text().await.unwrap_or_default();
    assert!(body.contains("nobody"), "the 503 names the service: {body}");

    let resp = client
        .get(format!("http://{web}/elsewhere"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 404, "no route, no default service");

    // A listener with a default service sends unmatched requests there...
    let fallback = proxy.listener("fallback");
    assert_eq!(
        server_of(&client, &format!("http://{fallback}/elsewhere"), &[]).await,
        "site"
    );
    // ...but not requests whose route's service cannot serve.
    let resp = client
        .get(format!("http://{fallback}/site/down/x"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 503, "a matched route never falls through");

    let down = proxy.endpoint("down", "down1").await;
    assert_eq!(down["state"], "maint");
    assert_eq!(
        down["requests"], 0,
        "maint endpoints get no requests: {down}"
    );
}
