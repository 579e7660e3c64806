//! End to end: the admin listener. Local changes through the JSON API (and
//! the token that guards them), the read views, `/metrics` read by the
//! Prometheus project's own parser, the access log, and the stats page as a
//! real browser (headless Chromium) renders it.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use support::*;

/// Two services behind a map route `/m` (map `colour`, key `live`) and the
/// listener's default `web` with endpoints `a` and `b`.
fn config(listen: std::net::SocketAddr, a: &Upstream, b: &Upstream, g: &Upstream) -> String {
    format!(
        r#"{}
[services.green]
endpoints = [{}]

[routes.m]
path_prefix = "/m"
strip_prefix = true
map = "colour"
map_key = "live"

[maps.colour]
live = "web"
"#,
        web(listen, "", &[endpoint_line(a, ""), endpoint_line(b, "")]),
        endpoint_line(g, ""),
    )
}

async fn send(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut req = plain_client()
        .request(method, &url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("admin request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("admin body");
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

#[tokio::test]
async fn changes_need_the_token_and_apply_to_traffic() {
    let ups = Upstream::start_many(&["a", "b", "green"]).await;
    let proxy = Proxy::start_with_args(
        || config(free_addr(), &ups[0], &ups[1], &ups[2]),
        &["--admin-token", "s3cret"],
    )
    .await;
    let change = proxy.admin_url("/api/services/web/endpoints/a");
    let drain = r#"{"state":"drain"}"#;

    // No token, a wrong one: refused, and nothing changes.
    let (status, body) = send(reqwest::Method::POST, change.clone(), None, drain).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("admin token"),
        "{body}"
    );
    let (status, _) = send(reqwest::Method::POST, change.clone(), Some("nope"), drain).await;
    assert_eq!(status, 401);
    assert_eq!(proxy.endpoint("web", "a").await["state"], "ready");
    // Reads need no token.
    assert_eq!(
        plain_client()
            .get(proxy.admin_url("/api/routes"))
            .send()
            .await
            .expect("routes")
            .status(),
        200
    );

    // With the token: a drains, and all traffic goes to b.
    let (status, body) = send(reqwest::Method::POST, change.clone(), Some("s3cret"), drain).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], true);
    let c = client();
    let counts = tally(&c, &proxy.url("/"), 20).await;
    assert_eq!(counts.get("b"), Some(&20), "{counts:?}");
    let a = proxy.endpoint("web", "a").await;
    assert_eq!(a["state"], "drain", "{a}");

    // Weight: b gets 0, a back to ready takes everything.
    let b_change = proxy.admin_url("/api/services/web/endpoints/b");
    let (status, body) = send(
        reqwest::Method::POST,
        b_change.clone(),
        Some("s3cret"),
        r#"{"weight":0}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = send(
        reqwest::Method::POST,
        change.clone(),
        Some("s3cret"),
        r#"{"state":"ready"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let counts = tally(&c, &proxy.url("/"), 20).await;
    assert_eq!(counts.get("a"), Some(&20), "{counts:?}");
    let b = proxy.endpoint("web", "b").await;
    assert_eq!(
        (b["weight"].as_u64(), b["initial_weight"].as_u64()),
        (Some(0), Some(1)),
        "{b}"
    );

    // Bad input: clear errors, nothing changes.
    for (url, body, want, says) in [
        (b_change.clone(), r#"{"weight":300}"#, 400, "out of range"),
        (
            b_change.clone(),
            r#"{"state":"down"}"#,
            400,
            "unknown variant",
        ),
        (b_change.clone(), r#"{"wieght":3}"#, 400, "unknown field"),
        (b_change.clone(), "{}", 400, "exactly one"),
        (
            proxy.admin_url("/api/services/web/endpoints/zz"),
            drain,
            404,
            "no such instance",
        ),
        (
            proxy.admin_url("/api/services/nope/endpoints/a"),
            drain,
            404,
            "no such service",
        ),
    ] {
        let (status, body) = send(reqwest::Method::POST, url.clone(), Some("s3cret"), body).await;
        assert_eq!(status, want, "{url}: {body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains(says),
            "{url}: {body}"
        );
    }
    assert_eq!(proxy.endpoint("web", "b").await["weight"], 0);

    // Maps: switch /m from web to green, then delete the key (no default: 503).
    assert_eq!(server_of(&c, &proxy.url("/m/x"), &[]).await, "a");
    let (status, body) = send(
        reqwest::Method::PUT,
        proxy.admin_url("/api/maps/colour/live"),
        Some("s3cret"),
        "green",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(server_of(&c, &proxy.url("/m/x"), &[]).await, "green");
    let maps: Value = plain_client()
        .get(proxy.admin_url("/api/maps"))
        .send()
        .await
        .expect("maps")
        .json()
        .await
        .expect("maps json");
    assert_eq!(maps["colour"]["live"], "green", "{maps}");
    let (status, _) = send(
        reqwest::Method::DELETE,
        proxy.admin_url("/api/maps/colour/live"),
        Some("s3cret"),
        "",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = get_echo(&c, &proxy.url("/m/x"), &[]).await;
    assert_ne!(
        status, 200,
        "a route whose map has no entry must not answer from a service"
    );
    let (status, body) = send(
        reqwest::Method::DELETE,
        proxy.admin_url("/api/maps/colour/live"),
        Some("s3cret"),
        "",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = send(
        reqwest::Method::PUT,
        proxy.admin_url("/api/maps/nosuch/k"),
        Some("s3cret"),
        "web",
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // Forgetting every local change: the config's values are back.
    let (status, _) = send(
        reqwest::Method::DELETE,
        proxy.admin_url("/api/local"),
        Some("s3cret"),
        "",
    )
    .await;
    assert_eq!(status, 200);
    let counts = tally(&c, &proxy.url("/m/x"), 10).await;
    assert_eq!(
        (counts.get("a"), counts.get("b")),
        (Some(&5), Some(&5)),
        "{counts:?}"
    );
    assert_eq!(proxy.endpoint("web", "b").await["weight"], 1);

    // Routes view.
    let routes: Value = plain_client()
        .get(proxy.admin_url("/api/routes"))
        .send()
        .await
        .expect("routes")
        .json()
        .await
        .expect("routes json");
    assert_eq!(routes[0]["name"], "m", "{routes}");
    assert_eq!(routes[0]["target"]["map"], "colour", "{routes}");
    assert_eq!(routes[0]["target"]["map_key"], "live", "{routes}");
}

#[tokio::test]
async fn an_admin_listener_off_loopback_needs_a_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        web(
            "127.0.0.1:0".parse().expect("addr"),
            "",
            &[ep("a", free_addr())],
        ),
    )
    .expect("write config");
    let path = path.to_string_lossy().into_owned();
    let (code, _out, err) = run_cli(&["run", "--config", &path, "--admin", "0.0.0.0:0"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("--admin-token"), "{err}");
    assert!(err.contains("not on loopback"), "{err}");
}

#[tokio::test]
async fn a_blank_token_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("p.toml");
    let listener = web(
        "127.0.0.1:0".parse().expect("addr"),
        "",
        &[ep("a", free_addr())],
    );
    std::fs::write(&path, &listener).expect("write config");
    let path = path.to_string_lossy().into_owned();
    let (code, _out, err) = run_cli(&["run", "--config", &path, "--admin-token", "  "]);
    assert_ne!(
        code, 0,
        "a blank --admin-token must not start a proxy: {err}"
    );
    assert!(err.contains("admin token is blank"), "{err}");
    // The same in the file, found by `check` with its line.
    let blank = format!("[global]\nadmin_token = \" \"\n{listener}");
    std::fs::write(&path, blank).expect("write config");
    let (code, _out, err) = run_cli(&["check", "--config", &path]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("admin_token") && err.contains("blank"),
        "{err}"
    );
}

/// A page on another site can make a browser POST to a loopback admin API;
/// such a change (a foreign Origin, or a form or text body) is refused even
/// with no token, and changes nothing.
#[tokio::test]
async fn changes_a_web_page_could_send_are_refused() {
    let ups = Upstream::start_many(&["a", "b", "green"]).await;
    let proxy = Proxy::start(|| config(free_addr(), &ups[0], &ups[1], &ups[2])).await;
    let url = proxy.admin_url("/api/services/web/endpoints/a");
    let attempts: [(&[(&str, &str)], u16); 3] = [
        (&[("content-type", "text/plain")], 415),
        (&[], 415),
        (
            &[
                ("content-type", "application/json"),
                ("origin", "http://evil.example"),
            ],
            403,
        ),
    ];
    for (headers, status) in attempts {
        let mut req = plain_client().post(&url).body(r#"{"state":"maint"}"#);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("admin request");
        assert_eq!(resp.status().as_u16(), status, "{headers:?}");
        let text = resp.text().await.expect("body");
        assert!(
            text.contains("Content-Type: application/json") || text.contains("evil.example"),
            "the refusal says why: {text}"
        );
    }
    assert_eq!(proxy.endpoint("web", "a").await["state"], "ready");
    // The same change as a tool sends it applies.
    let (status, _) = send(reqwest::Method::POST, url, None, r#"{"state":"maint"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(proxy.endpoint("web", "a").await["state"], "maint");
}

/// The token is read per change from the config last applied: a reload
/// that changes it applies at once, and one that would leave an admin
/// listener off loopback unprotected is refused.
#[tokio::test]
async fn a_reload_applies_a_changed_token() {
    let ups = Upstream::start_many(&["a", "b", "green"]).await;
    let listen = free_addr();
    let with_token = |t: &str| {
        format!(
            "[global]\nadmin_token = \"{t}\"\n{}",
            config(listen, &ups[0], &ups[1], &ups[2])
        )
    };
    let first = with_token("old-token");
    let proxy = Proxy::start(|| first.clone()).await;
    let url = proxy.admin_url("/api/services/web/endpoints/a");
    let change = |token: &'static str| {
        send(
            reqwest::Method::POST,
            url.clone(),
            Some(token),
            r#"{"weight":3}"#,
        )
    };
    assert_eq!(change("old-token").await.0, 200);
    proxy.reload(&with_token("new-token")).await;
    assert_eq!(
        change("old-token").await.0,
        401,
        "the old token no longer works"
    );
    assert_eq!(change("new-token").await.0, 200, "the new one does");
}

/// `text` read by the Prometheus project's Python parser (Debian's
/// python3-prometheus-client): every sample as `name|label=value,...`
/// (labels sorted), and `type|family` for each family's type. Panics if
/// the parser refuses it.
fn parse_prometheus(text: &str) -> BTreeMap<String, Value> {
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        key = s.name + "|" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[key] = s.value
    out["type|" + fam.name] = fam.type
print(json.dumps(out))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3 (make test installs python3-prometheus-client)");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write metrics");
    }
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the Prometheus parser refused it: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser json")
}

/// `/metrics/haproxy` gives the `show stat` figures under HAProxy's own
/// exporter's names, so its dashboards work: requests, answers by class,
/// sessions and status per frontend, backend and server.
#[tokio::test]
async fn metrics_under_haproxys_names_count_the_same_traffic() {
    let ups = Upstream::start_many(&["a", "b", "green"]).await;
    let proxy = Proxy::start(|| config(free_addr(), &ups[0], &ups[1], &ups[2])).await;
    let c = client();
    for _ in 0..30 {
        server_of(&c, &proxy.url("/"), &[]).await;
    }
    let (status, _) = get_echo(&c, &proxy.url("/status/404"), &[]).await;
    assert_eq!(status, 404);
    let text = plain_client()
        .get(proxy.admin_url("/metrics/haproxy"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let samples = parse_prometheus(&text);
    let num = |k: &str| samples.get(k).and_then(Value::as_f64).unwrap_or(-1.0);
    assert_eq!(
        num("haproxy_frontend_http_requests_total|proxy=web"),
        31.0,
        "{text}"
    );
    assert_eq!(
        num("haproxy_frontend_http_responses_total|code=2xx,proxy=web"),
        30.0,
        "{text}"
    );
    assert_eq!(num("haproxy_frontend_status|proxy=web"), 1.0);
    assert_eq!(
        num("haproxy_server_sessions_total|proxy=web,server=a")
            + num("haproxy_server_sessions_total|proxy=web,server=b"),
        31.0,
        "{text}"
    );
    assert_eq!(
        num("haproxy_backend_http_responses_total|code=4xx,proxy=web"),
        1.0,
        "{text}"
    );
    assert_eq!(
        num("haproxy_server_status|proxy=web,server=a,state=UP"),
        1.0,
        "{text}"
    );
    assert_eq!(
        num("haproxy_server_status|proxy=web,server=a,state=DOWN"),
        0.0
    );
    assert_eq!(
        samples
            .get("type|haproxy_server_bytes_out")
            .and_then(Value::as_str),
        Some("counter"),
        "{text}"
    );
    assert!(num("haproxy_backend_response_time_average_seconds|proxy=web") >= 0.0);
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_requests() {
    let ups = Upstream::start_many(&["a", "b", "green"]).await;
    let proxy = Proxy::start(|| config(free_addr(), &ups[0], &ups[1], &ups[2])).await;
    let c = client();
    for _ in 0..30 {
        server_of(&c, &proxy.url("/"), &[]).await;
    }
    let (status, _) = get_echo(&c, &proxy.url("/status/404"), &[]).await;
    assert_eq!(status, 404);
    let text = plain_client()
        .get(proxy.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let samples = parse_prometheus(&text);
    let num = |k: &str| samples.get(k).and_then(Value::as_f64).unwrap_or(-1.0);
    let requests = num("pointsman_endpoint_requests_total|endpoint=a,service=web")
        + num("pointsman_endpoint_requests_total|endpoint=b,service=web");
    assert_eq!(requests, 31.0, "{text}");
    assert_eq!(
        samples
            .get("type|pointsman_service_response_seconds")
            .and_then(Value::as_str),
        Some("histogram")
    );
    assert_eq!(
        num("pointsman_service_response_seconds_count|service=web"),
        31.0,
        "{text}"
    );
    assert_eq!(
        num("pointsman_service_response_seconds_bucket|le=+Inf,service=web"),
        31.0,
        "{text}"
    );
    let fours = num("pointsman_endpoint_responses_total|code_class=4xx,endpoint=a,service=web")
        .max(0.0)
        + num("pointsman_endpoint_responses_total|code_class=4xx,endpoint=b,service=web").max(0.0);
    assert_eq!(fours, 1.0, "{text}");
    assert_eq!(
        num("pointsman_endpoint_healthy|endpoint=a,service=web"),
        1.0,
        "{text}"
    );
    assert_eq!(
        num("pointsman_endpoint_state|endpoint=a,service=web,state=ready"),
        1.0
    );
    assert!(num("pointsman_table_version|") >= 1.0, "{text}");
}

#[tokio::test]
async fn the_access_log_writes_one_json_line_per_request() {
    let ups = Upstream::start_many(&["a", "b", "green"]).await;
    let proxy = Proxy::start_with_args(
        || config(free_addr(), &ups[0], &ups[1], &ups[2]),
        &["--access-log", "--log-format", "json"],
    )
    .await;
    let c = client();
    for i in 0..5 {
        server_of(&c, &proxy.url(&format!("/m/item{i}?q=1")), &[]).await;
    }
    let (status, _) = get_echo(&c, &proxy.url("/status/404"), &[]).await;
    assert_eq!(status, 404);
    let mut lines = Vec::new();
    wait_until(Duration::from_secs(5), "six access log lines", || {
        lines = proxy
            .stderr()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect();
        lines.len() >= 6
    })
    .await;
    assert_eq!(lines.len(), 6, "{lines:?}");
    let first = &lines[0]["fields"];
    assert_eq!(first["method"], "GET", "{first}");
    assert_eq!(first["uri"], "/m/item0?q=1", "{first}");
    assert_eq!(first["status"], 200, "{first}");
    assert_eq!(first["service"], "web", "{first}");
    assert!(
        first["endpoint"] == "a" || first["endpoint"] == "b",
        "{first}"
    );
    assert!(first["ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{first}");
    assert_eq!(lines[5]["fields"]["status"], 404, "{}", lines[5]);
}

/// Runs headless Chromium on `url` and returns the DOM it rendered.
fn chromium_dom(url: &str, profile: &std::path::Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-extensions",
            "--no-first-run",
            "--virtual-time-budget=1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium (make test installs Debian's chromium)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the cell with `class` in the row of endpoint `id`.
fn cell(dom: &str, id: &str, class: &str) -> Option<u64> {
    let row_start = dom.find(&format!("data-endpoint=\"{id}\""))?;
    let row = &dom[row_start..];
    let row = &row[..row.find("</tr>")?];
    let at = row.find(&format!("class=\"{class}\">"))? + class.len() + 9;
    row[at..].split('<').next()?.trim().parse().ok()
}

#[tokio::test]
async fn the_stats_page_renders_live_numbers_in_chromium() {
    let ups = Upstream::start_many(&["a", "b", "green"]).await;
    let proxy = Proxy::start(|| config(free_addr(), &ups[0], &ups[1], &ups[2])).await;
    let profile = tempfile::tempdir().expect("chromium profile dir");
    let c = client();
    for _ in 0..10 {
        server_of(&c, &proxy.url("/"), &[]).await;
    }
    let dom = chromium_dom(&proxy.admin_url("/stats"), profile.path());
    assert!(dom.contains("<h1>pointsman</h1>"), "{dom}");
    let a1 = cell(&dom, "a", "requests").expect("a's request count on the page");
    let b1 = cell(&dom, "b", "requests").expect("b's request count on the page");
    assert_eq!(a1 + b1, 10, "{dom}");
    assert_eq!(cell(&dom, "a", "in-flight"), Some(0));

    // Twenty more requests and a drain: the page shows them.
    for _ in 0..20 {
        server_of(&c, &proxy.url("/"), &[]).await;
    }
    let dom = chromium_dom(&proxy.admin_url("/stats"), profile.path());
    let a2 = cell(&dom, "a", "requests").expect("a's request count");
    let b2 = cell(&dom, "b", "requests").expect("b's request count");
    assert_eq!(a2 + b2, 30, "{dom}");
    let api = proxy.endpoint("web", "a").await;
    assert_eq!(
        Some(a2),
        api["requests"].as_u64(),
        "page and API disagree: {api}"
    );
    assert!(dom.contains("no check"), "health column: {dom}");
}

/// A drain notice (`POST /api/drains`), what the tools send a proxy that
/// has not applied a drain: it needs the token like any change, a body
/// that says what to drain until when, and then holds the instance out of
/// new requests (this proxy follows no etcd, so until it stops).
#[tokio::test]
async fn a_drain_notice_needs_the_token_and_a_whole_body() {
    let ups = Upstream::start_many(&["a", "b", "green"]).await;
    let proxy = Proxy::start_with_args(
        || config(free_addr(), &ups[0], &ups[1], &ups[2]),
        &["--admin-token", "s3cret"],
    )
    .await;
    let url = proxy.admin_url("/api/drains");
    let notice = r#"{"service":"web","id":"a","until_revision":42}"#;
    let (status, _) = send(reqwest::Method::POST, url.clone(), None, notice).await;
    assert_eq!(status, 401);
    for bad in [
        r#"{"service":"web","id":"a"}"#,
        r#"{"service":"web","id":"a","until_revision":0}"#,
        r#"{"service":"web","id":"a","until_revision":5,"extra":1}"#,
        "drain a",
    ] {
        let (status, body) = send(reqwest::Method::POST, url.clone(), Some("s3cret"), bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let why = body["error"].as_str().unwrap_or("");
        assert!(
            why.contains("until_revision") || why.contains("revision"),
            "{bad}: {why}"
        );
    }
    assert_eq!(proxy.endpoint("web", "a").await["state"], "ready");
    let (status, body) = send(reqwest::Method::POST, url, Some("s3cret"), notice).await;
    assert_eq!(status, 200, "{body}");
    let a = proxy.endpoint("web", "a").await;
    assert_eq!(
        (a["state"].as_str(), a["drain_notice"].as_i64()),
        (Some("drain"), Some(42)),
        "{a}"
    );
    let counts = tally(&client(), &proxy.url("/"), 20).await;
    assert_eq!(counts.get("b"), Some(&20), "{counts:?}");
}
