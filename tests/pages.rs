//! End to end: the pages of the proxy's own answers. A service's
//! `error_pages` replace the plain 502, 503 and 504 bodies with HTML from
//! files; a page that cannot be read, or a status the proxy never answers
//! for a service, is refused and the last good config keeps serving. `ctl
//! maintenance` (an etcd key) makes every proxy answer a service's
//! requests with 503 and its maintenance page until `--off`.

mod support;

use std::path::Path;

use support::etcd::{del, put, start_proxy, wait_applied, EtcdServer};
use support::registry::wait_ready;
use support::*;

const DOWN_PAGE: &str = "<!doctype html><h1>We will be right back</h1>\n";
const GATEWAY_PAGE: &str = "<!doctype html><h1>The shop is not answering</h1>\n";

/// GET `url` on a new connection: status, Content-Type and body.
async fn fetch(url: &str) -> (u16, String, String) {
    let resp = plain_client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, ctype, resp.text().await.unwrap_or_default())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a page");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_pages_replace_the_proxys_own_answers_for_their_service() {
    let pages = tempfile::tempdir().expect("a temp dir");
    let down = write(pages.path(), "503.html", DOWN_PAGE);
    let gateway = write(pages.path(), "502.html", GATEWAY_PAGE);
    let up = Upstream::start("a").await;
    let closed = free_addr(); // nothing listens here
    let config = move |listen, down: &str, gateway: &str| {
        format!(
            r#"[[listeners]]
name = "web"
bind = "{listen}"
default_service = "shop"

[services.shop]
error_pages = {{ 503 = "{down}", 502 = "{gateway}" }}
retry = {{ attempts = 1 }}
endpoints = [{{ id = "a", address = "{}", state = "maint" }}]

[services.broken]
retry = {{ attempts = 1 }}
endpoints = [{{ id = "b", address = "{closed}" }}]

[routes.broken]
path_prefix = "/broken"
service = "broken"

[routes.gone]
path_prefix = "/gone"
service = "shop"
strip_prefix = true
"#,
            up.addr
        )
    };
    let proxy = Proxy::start(|| config(free_addr(), &down, &gateway)).await;

    // Every endpoint in maintenance: the shop's 503 page, as HTML.
    let (status, ctype, body) = fetch(&proxy.url("/")).await;
    assert_eq!((status, body.as_str()), (503, DOWN_PAGE));
    assert_eq!(ctype, "text/html; charset=utf-8");
    // Another service without pages keeps the plain answer.
    let (status, ctype, body) = fetch(&proxy.url("/broken")).await;
    assert_eq!(status, 502, "{body}");
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    assert!(!body.contains("<h1>"), "{body}");

    // A relative path is read beside the config file; the 502 page is the
    // one a refused connect gets.
    write(proxy.dir(), "shop-503.html", DOWN_PAGE);
    let text = config(proxy.addr(), "shop-503.html", &gateway).replace(
        &format!("address = \"{}\", state = \"maint\"", up.addr),
        &format!("address = \"{closed}\""),
    );
    proxy.reload(&text).await;
    let (status, _, body) = fetch(&proxy.url("/")).await;
    assert_eq!((status, body.as_str()), (502, GATEWAY_PAGE));

    // A page that cannot be read, or a status the proxy does not answer
    // for a service: refused, saying what to fix; the last good config
    // keeps serving.
    let refused = proxy
        .reload_refused(&config(proxy.addr(), "/nonexistent/503.html", &gateway))
        .await;
    assert!(
        refused
            .contains("services.shop.error_pages.503: cannot read the page /nonexistent/503.html"),
        "{refused}"
    );
    let refused = proxy
        .reload_refused(&text.replace("503 = \"shop-503.html\"", "404 = \"shop-503.html\""))
        .await;
    assert!(
        refused.contains(
            "404 is not a status the proxy answers for a service: expected 502, 503 or 504"
        ),
        "{refused}"
    );
    let (status, _, body) = fetch(&proxy.url("/")).await;
    assert_eq!(
        (status, body.as_str()),
        (502, GATEWAY_PAGE),
        "the last good config"
    );
}

/// `pointsman ctl --etcd ... maintenance SERVICE --page FILE` on a serving
/// service: every request gets 503 with the page at once; `--off` brings
/// the service back; without `--page`, the 503 says why in plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_maintenance_answers_every_request_with_the_page_until_off() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    let proxy = start_proxy(&etcd, "p1", Some("web")).await;
    let up = Upstream::start("a").await;
    put(&etcd, "/services/web/a", &up.addr.to_string()).await;
    wait_ready(&[&proxy], "web", &["a"]).await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let page = write(dir.path(), "maint.html", DOWN_PAGE);
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--etcd", endpoint.as_str()];
        all.extend_from_slice(args);
        let (code, out, err) = run_cli(&all);
        assert_eq!(code, 0, "ctl {args:?}: {out}{err}");
        out
    };

    let out = ctl(&["maintenance", "web", "--page", &page]);
    assert!(out.contains("web: in maintenance at revision"), "{out}");
    assert!(out.contains("1 of 1 proxy confirmed"), "{out}");
    for _ in 0..3 {
        let (status, ctype, body) = fetch(&proxy.url("/")).await;
        assert_eq!((status, body.as_str()), (503, DOWN_PAGE));
        assert_eq!(ctype, "text/html; charset=utf-8");
    }
    ctl(&["maintenance", "web"]);
    let (status, _, body) = fetch(&proxy.url("/")).await;
    assert_eq!(status, 503);
    assert!(
        body.contains("service \"web\" is down for maintenance"),
        "{body}"
    );

    let out = ctl(&["maintenance", "web", "--off"]);
    assert!(out.contains("web: maintenance ended"), "{out}");

    // A name nobody registered is not refused (a service may be only in
    // the proxies' config), but said, as it may be a typo.
    let (code, _, err) = run_cli(&["ctl", "--etcd", &endpoint, "maintenance", "wbe"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("note: no instance of wbe is registered"),
        "{err}"
    );
    ctl(&["maintenance", "wbe", "--off"]);
    let (status, _, body) = fetch(&proxy.url("/")).await;
    assert_eq!(status, 200, "{body}");

    // A page file that is not there: said so, nothing written.
    let (code, _, err) = run_cli(&[
        "ctl",
        "--etcd",
        &endpoint,
        "maintenance",
        "web",
        "--page",
        "/nonexistent.html",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot read the page /nonexistent.html"),
        "{err}"
    );
    let (status, _, _) = fetch(&proxy.url("/")).await;
    assert_eq!(status, 200);
}

/// A page in etcd (`/pointsman/pages/<service>/<status>`) is every
/// proxy's body for that answer, over the config's file; deleting it
/// brings the plain one back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_in_etcd_is_the_body_of_the_proxys_answer() {
    let etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, "p1", Some("web")).await;
    let up = Upstream::start("a").await;
    put(&etcd, "/services/web/a", &up.addr.to_string()).await;
    wait_ready(&[&proxy], "web", &["a"]).await;
    put(&etcd, "/pointsman/pages/web/503", DOWN_PAGE).await;
    let rev = put(&etcd, "/pointsman/overrides/web/a", r#"{"state":"maint"}"#).await;
    wait_applied(&[&proxy], rev).await;
    let (status, ctype, body) = fetch(&proxy.url("/")).await;
    assert_eq!((status, body.as_str()), (503, DOWN_PAGE));
    assert_eq!(ctype, "text/html; charset=utf-8");

    let rev = del(&etcd, "/pointsman/pages/web/503").await;
    wait_applied(&[&proxy], rev).await;
    let (status, ctype, body) = fetch(&proxy.url("/")).await;
    assert_eq!(status, 503);
    assert!(ctype.starts_with("text/plain"), "{ctype}: {body}");
}
