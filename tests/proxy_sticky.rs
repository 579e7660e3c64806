//! End to end: `sticky = "cookie"` in its three modes (insert, prefix,
//! rewrite) in front of real application servers that keep their own
//! `JSESSIONID` session cookie: what the client gets, what the application
//! receives, that a binding holds over many requests, that the cookie of
//! an endpoint that went away falls back to the balancer (and one that
//! refuses is redispatched), and that stickiness sits on top of leastconn
//! rather than replacing it.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use tokio::sync::watch;

use support::*;

/// An application server with sessions: a request without a session of
/// its own (no `JSESSIONID`, or one it did not issue) gets a new one,
/// `Set-Cookie: JSESSIONID=s-<name>-<n>; Path=/; HttpOnly`. It answers
/// with its name and the Cookie header it received. `/slow` answers once
/// the test releases it.
struct App {
    name: String,
    addr: SocketAddr,
    in_flight: Arc<AtomicUsize>,
    _server: Server,
}

async fn app(name: &str, release: watch::Receiver<bool>) -> App {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let sessions = Arc::new(AtomicUsize::new(0));
    let (me, busy) = (name.to_string(), in_flight.clone());
    let server = http_server(move |req| {
        let (me, busy, sessions) = (me.clone(), busy.clone(), sessions.clone());
        let mut release = release.clone();
        async move {
            let cookie: Option<String> = {
                let all: Vec<&str> = req
                    .headers()
                    .get_all("cookie")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (!all.is_empty()).then(|| all.join("; "))
            };
            if req.uri().path() == "/slow" {
                busy.fetch_add(1, SeqCst);
                let _ = release.wait_for(|r| *r).await;
                busy.fetch_sub(1, SeqCst);
            }
            let mine = format!("s-{me}-");
            let has_session = cookie.as_deref().is_some_and(|c| {
                c.split(';')
                    .filter_map(|p| p.trim().strip_prefix("JSESSIONID="))
                    .any(|v| v.starts_with(&mine))
            });
            let body = serde_json::json!({ "server": me, "cookie": cookie }).to_string();
            let mut resp = Response::builder().header("content-type", "application/json");
            if !has_session {
                let n = sessions.fetch_add(1, SeqCst) + 1;
                resp = resp.header(
                    "set-cookie",
                    format!("JSESSIONID={mine}{n}; Path=/; HttpOnly"),
                );
            }
            resp.body(Full::new(Bytes::from(body)))
                .expect("a valid response")
        }
    })
    .await;
    App {
        name: name.to_string(),
        addr: server.addr,
        in_flight,
        _server: server,
    }
}

/// Application servers named `names`, and the sender that releases their
/// `/slow` requests.
async fn apps(names: &[&str]) -> (Vec<App>, watch::Sender<bool>) {
    let (release, rx) = watch::channel(false);
    let mut out = Vec::new();
    for n in names {
        out.push(app(n, rx.clone()).await);
    }
    (out, release)
}

/// The `web` service over `apps` with `settings`.
fn config(listen: SocketAddr, settings: &str, apps: &[&App]) -> String {
    let eps: Vec<String> = apps.iter().map(|a| ep(&a.name, a.addr)).collect();
    web(listen, settings, &eps)
}

/// One answer as the client saw it.
#[derive(Debug)]
struct Answer {
    server: String,
    /// The Cookie header the application received.
    app_got: Option<String>,
    /// The Set-Cookie headers the client received.
    set: Vec<String>,
}

impl Answer {
    /// The value the client is told to store for cookie `name`.
    fn sets(&self, name: &str) -> Option<&str> {
        self.set.iter().find_map(|c| {
            let pair = c.split(';').next()?;
            pair.strip_prefix(name)?.strip_prefix('=')
        })
    }
}

async fn get(client: &reqwest::Client, url: &str, cookie: Option<&str>) -> Answer {
    let mut req = client.get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status(), 200, "GET {url}");
    let set = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("a text Set-Cookie").to_string())
        .collect();
    let echo: serde_json::Value = resp.json().await.expect("the app's JSON");
    Answer {
        server: echo["server"].as_str().unwrap_or("").to_string(),
        app_got: echo["cookie"].as_str().map(String::from),
        set,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_binds_with_the_proxys_own_cookie_which_the_app_never_sees() {
    let (apps, _release) = apps(&["a1", "a2", "a3"]).await;
    let all: Vec<&App> = apps.iter().collect();
    let settings = "balance = \"roundrobin\"\nsticky = \"cookie\"";
    let proxy = Proxy::start(|| config(free_addr(), settings, &all)).await;
    let client = client();
    let url = proxy.url("/");

    let first = get(&client, &url, None).await;
    let bound = first.server.clone();
    assert_eq!(first.sets("SERVERID"), Some(bound.as_str()), "{first:?}");
    assert!(
        first.set.contains(&format!("SERVERID={bound}; Path=/")),
        "the proxy's cookie as inserted: {first:?}"
    );
    let session = first
        .sets("JSESSIONID")
        .expect("the app's own cookie reaches the client untouched")
        .to_string();
    assert!(session.starts_with(&format!("s-{bound}-")), "{first:?}");
    assert_eq!(first.app_got, None);

    let jar = format!("theme=dark; SERVERID={bound}; JSESSIONID={session}");
    for i in 0..30 {
        let a = get(&client, &url, Some(&jar)).await;
        assert_eq!(a.server, bound, "request {i} left its endpoint: {a:?}");
        assert!(a.set.is_empty(), "a bound client is told nothing: {a:?}");
        assert_eq!(
            a.app_got.as_deref(),
            Some(format!("theme=dark; JSESSIONID={session}").as_str()),
            "the app gets its cookies without SERVERID"
        );
    }
    let alone = get(&client, &url, Some(&format!("SERVERID={bound}"))).await;
    assert_eq!(alone.server, bound);
    assert_eq!(alone.app_got, None, "a Cookie header left empty goes");

    // The bound endpoint leaves: its cookie falls back to the balancer,
    // which binds the client anew.
    let rest: Vec<&App> = apps.iter().filter(|a| a.name != bound).collect();
    proxy.reload(&config(proxy.addr(), settings, &rest)).await;
    let moved = get(&client, &url, Some(&jar)).await;
    assert_ne!(moved.server, bound, "{moved:?}");
    assert_eq!(moved.sets("SERVERID"), Some(moved.server.as_str()));
    let jar = format!("SERVERID={}", moved.server);
    for _ in 0..10 {
        let a = get(&client, &url, Some(&jar)).await;
        assert_eq!(a.server, moved.server, "the new binding holds");
        assert_eq!(a.sets("SERVERID"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_under_the_apps_own_cookie_name_warns_once_and_keeps_the_binding() {
    let (apps, _release) = apps(&["b1", "b2"]).await;
    let all: Vec<&App> = apps.iter().collect();
    let settings = "sticky = \"cookie\"\ncookie = \"JSESSIONID\"";
    let proxy = Proxy::start(|| config(free_addr(), settings, &all)).await;
    let client = client();
    for _ in 0..20 {
        let a = get(&client, &proxy.url("/"), None).await;
        assert_eq!(
            a.set,
            [format!("JSESSIONID={}; Path=/", a.server)],
            "only the proxy's cookie: the app's would undo the binding"
        );
    }
    let err = proxy.stderr();
    let warned = err
        .lines()
        .filter(|l| l.contains("sets the sticky cookie itself"))
        .collect::<Vec<_>>();
    assert_eq!(warned.len(), 1, "said once for 20 clashes:\n{err}");
    assert!(
        warned[0].contains("rewrite"),
        "says what to do: {}",
        warned[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_carries_the_binding_in_the_apps_session_cookie() {
    let (apps, _release) = apps(&["p1", "p2", "p3"]).await;
    let all: Vec<&App> = apps.iter().collect();
    let settings =
        "balance = \"roundrobin\"\nsticky = \"cookie\"\ncookie = { name = \"JSESSIONID\", mode = \"prefix\" }";
    let proxy = Proxy::start(|| config(free_addr(), settings, &all)).await;
    let client = client();
    let url = proxy.url("/");

    let first = get(&client, &url, None).await;
    let bound = first.server.clone();
    assert_eq!(
        first.set,
        [format!("JSESSIONID={bound}~s-{bound}-1; Path=/; HttpOnly")],
        "the app's cookie, prefixed, and no cookie of the proxy's own"
    );
    let value = first.sets("JSESSIONID").expect("a session").to_string();

    let jar = format!("theme=dark; JSESSIONID={value}");
    for i in 0..30 {
        let a = get(&client, &url, Some(&jar)).await;
        assert_eq!(a.server, bound, "request {i} left its endpoint: {a:?}");
        assert_eq!(
            a.app_got.as_deref(),
            Some(format!("theme=dark; JSESSIONID=s-{bound}-1").as_str()),
            "the app gets its own value back"
        );
        assert!(a.set.is_empty(), "the session holds: {a:?}");
    }

    let rest: Vec<&App> = apps.iter().filter(|a| a.name != bound).collect();
    proxy.reload(&config(proxy.addr(), settings, &rest)).await;
    let moved = get(&client, &url, Some(&jar)).await;
    assert_ne!(moved.server, bound, "{moved:?}");
    assert_eq!(
        moved.app_got.as_deref(),
        Some(format!("theme=dark; JSESSIONID=s-{bound}-1").as_str()),
        "the new endpoint sees the old session's value, unprefixed"
    );
    let new = moved.server.clone();
    assert_eq!(
        moved.set,
        [format!("JSESSIONID={new}~s-{new}-1; Path=/; HttpOnly")],
        "its new session binds the client to it"
    );
    let jar = format!("JSESSIONID={new}~s-{new}-1");
    for _ in 0..10 {
        let a = get(&client, &url, Some(&jar)).await;
        assert_eq!(a.server, new, "the new binding holds");
        assert!(a.set.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_turns_the_apps_cookie_into_the_binding() {
    let (apps, _release) = apps(&["r1", "r2", "r3"]).await;
    let all: Vec<&App> = apps.iter().collect();
    let settings =
        "balance = \"random\"\nsticky = \"cookie\"\ncookie = { name = \"JSESSIONID\", mode = \"rewrite\" }";
    let proxy = Proxy::start(|| config(free_addr(), settings, &all)).await;
    let client = client();
    let url = proxy.url("/");

    let first = get(&client, &url, None).await;
    let bound = first.server.clone();
    assert_eq!(
        first.set,
        [format!("JSESSIONID={bound}; Path=/; HttpOnly")],
        "the app's value is replaced, its attributes kept"
    );

    let jar = format!("theme=dark; JSESSIONID={bound}");
    for i in 0..30 {
        let a = get(&client, &url, Some(&jar)).await;
        assert_eq!(a.server, bound, "request {i} left its endpoint: {a:?}");
        assert_eq!(
            a.app_got.as_deref(),
            Some("theme=dark"),
            "the binding is not the app's to see"
        );
        assert_eq!(a.sets("JSESSIONID"), Some(bound.as_str()), "{a:?}");
    }

    let rest: Vec<&App> = apps.iter().filter(|a| a.name != bound).collect();
    proxy.reload(&config(proxy.addr(), settings, &rest)).await;
    let moved = get(&client, &url, Some(&jar)).await;
    assert_ne!(moved.server, bound, "{moved:?}");
    assert_eq!(moved.sets("JSESSIONID"), Some(moved.server.as_str()));
    let jar = format!("JSESSIONID={}", moved.server);
    for _ in 0..10 {
        assert_eq!(get(&client, &url, Some(&jar)).await.server, moved.server);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_on_leastconn_keeps_bound_clients_and_sends_new_ones_to_the_least_loaded() {
    let (apps, release) = apps(&["l1", "l2"]).await;
    let all: Vec<&App> = apps.iter().collect();
    let settings = "balance = \"leastconn\"\nsticky = \"cookie\"";
    let proxy = Proxy::start(|| config(free_addr(), settings, &all)).await;
    let client = plain_client();

    let first = get(&client, &proxy.url("/"), None).await;
    let bound = first.server.clone();
    let cookie = format!("SERVERID={bound}");
    assert_eq!(first.sets("SERVERID"), Some(bound.as_str()));
    let busy = apps
        .iter()
        .find(|a| a.name == bound)
        .expect("the bound app");
    let idle = apps
        .iter()
        .find(|a| a.name != bound)
        .expect("the other app");

    // Three slow requests hold the bound endpoint busy.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let (client, url, cookie) = (client.clone(), proxy.url("/slow"), cookie.clone());
            tokio::spawn(async move { get(&client, &url, Some(&cookie)).await })
        })
        .collect();
    let in_flight = busy.in_flight.clone();
    wait_until(Duration::from_secs(10), "3 slow requests in flight", || {
        in_flight.load(SeqCst) == 3
    })
    .await;

    for _ in 0..6 {
        let a = get(&client, &proxy.url("/"), None).await;
        assert_eq!(a.server, idle.name, "a new client goes to the least loaded");
        assert_eq!(a.sets("SERVERID"), Some(idle.name.as_str()));
    }
    for _ in 0..6 {
        let a = get(&client, &proxy.url("/"), Some(&cookie)).await;
        assert_eq!(a.server, bound, "a bound client stays, busy or not");
        assert_eq!(a.sets("SERVERID"), None);
    }
    release.send(true).expect("the apps listen");
    for s in slow {
        assert_eq!(s.await.expect("a slow request").server, bound);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_endpoint_that_refuses_is_redispatched_and_the_client_rebound() {
    let (apps, _release) = apps(&["d1"]).await;
    let live = &apps[0];
    // Nothing listens on `dead`'s address: every connect is refused.
    let dead = free_addr();
    let settings = "sticky = \"cookie\"\npassive = { consecutive_failures = 0 }";
    let eps = [ep("dead", dead), ep(&live.name, live.addr)];
    let proxy = Proxy::start(|| web(free_addr(), settings, &eps)).await;
    let client = client();
    for _ in 0..5 {
        let a = get(&client, &proxy.url("/"), Some("SERVERID=dead")).await;
        assert_eq!(a.server, live.name, "retried on the endpoint that answers");
        assert_eq!(
            a.sets("SERVERID"),
            Some(live.name.as_str()),
            "and bound to it: {a:?}"
        );
    }
}
