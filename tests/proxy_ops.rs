//! End to end: operating a running proxy. Hot reload (valid changes apply
//! under open connections, invalid ones are refused with a precise error),
//! graceful shutdown on SIGTERM, and per-endpoint counters that survive
//! table rebuilds.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::*;

/// The config of the reload tests: route `/a` (prefix stripped) to service
/// `a`, a map route `/m` whose `release.live` entry is `live`, and `extra`
/// appended as is.
fn reload_config(
    listen: SocketAddr,
    a: &Upstream,
    b: &Upstream,
    live: &str,
    extra: &str,
) -> String {
    format!(
        r#"[[listeners]]
name = "web"
bind = "{listen}"

[services.a]
endpoints = [{a}]

[services.b]
endpoints = [{b}]

[routes.a]
path_prefix = "/a"
strip_prefix = true
service = "a"

[routes.m]
path_prefix = "/m"
map = "release"
map_key = "live"

[maps.release]
live = "{live}"
{extra}"#,
        a = endpoint_line(a, ""),
        b = endpoint_line(b, ""),
    )
}

const ROUTE_B: &str = r#"
[routes.b]
path_prefix = "/b"
strip_prefix = true
service = "b"
"#;

/// GET `path` on an open keep-alive connection.
async fn get_on(s: &mut TcpStream, path: &str) -> RawResponse {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("send on the kept-alive connection");
    read_response(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_reload_applies_without_dropping_connections() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let proxy = Proxy::start(|| reload_config(free_addr(), a, b, "a", "")).await;

    let mut conn = TcpStream::connect(proxy.addr()).await.expect("connect");
    let r = get_on(&mut conn, "/a/x").await;
    assert_eq!((r.status, r.json()["server"].clone()), (200, "a".into()));
    assert_eq!(
        get_on(&mut conn, "/b/x").await.status,
        404,
        "no /b route yet"
    );
    let client = client();
    assert_eq!(server_of(&client, &proxy.url("/m/x"), &[]).await, "a");

    // A slow request in flight across the reload.
    let slow_url = proxy.url("/a/slow?ms=1500");
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let resp = plain_client().get(slow_url).send().await;
        (started.elapsed(), resp)
    });
    let p = &proxy;
    wait_for(
        Duration::from_secs(5),
        "the slow request is in flight",
        || async move { p.endpoint("a", "a").await["in_flight"] == 1 },
    )
    .await;

    proxy
        .reload(&reload_config(proxy.addr(), a, b, "b", ROUTE_B))
        .await;

    // The same connection sees the new route, and the map's new value.
    let r = get_on(&mut conn, "/b/x").await;
    assert_eq!(r.status, 200, "new route on an old connection: {r:?}");
    assert_eq!(r.json()["server"], "b");
    assert_eq!(r.json()["path"], "/x");
    let r = get_on(&mut conn, "/m/x").await;
    assert_eq!(r.json()["server"], "b", "the map's new value applies");
    // The pooled client keeps working too.
    assert_eq!(server_of(&client, &proxy.url("/m/x"), &[]).await, "b");
    assert_eq!(server_of(&client, &proxy.url("/a/x"), &[]).await, "a");

    let (took, resp) = slow.await.expect("slow task");
    let resp = resp.expect("the slow request survived the reload");
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.expect("JSON");
    assert_eq!(echo["server"], "a");
    assert!(
        took >= Duration::from_millis(1400),
        "it really was slow: {took:?}"
    );
}

/// The 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the config"));
    text[..at].matches('\n').count() + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_is_refused_and_the_old_config_keeps_serving() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let proxy = Proxy::start(|| reload_config(free_addr(), a, b, "a", "")).await;
    let client = client();
    let file = proxy.config_path().display().to_string();

    let still_serving = |what: &'static str| {
        let (client, proxy) = (&client, &proxy);
        async move {
            assert_eq!(
                server_of(client, &proxy.url("/a/x"), &[]).await,
                "a",
                "after {what}"
            );
            assert_eq!(
                server_of(client, &proxy.url("/m/x"), &[]).await,
                "a",
                "after {what}: the map's old value holds"
            );
            let (status, _) = get_echo(client, &proxy.url("/b/x"), &[]).await;
            assert_eq!(
                status, 404,
                "after {what}: the refused route /b is not there"
            );
        }
    };

    // A syntax error, in a file that also changes the map and adds /b.
    let text =
        reload_config(proxy.addr(), a, b, "b", ROUTE_B) + "\n[routes.oops\npath_prefix = \"/x\"\n";
    let err = proxy.reload_refused(&text).await;
    let at = format!("{file}:{}", line_of(&text, "[routes.oops"));
    assert!(err.contains(&at), "the error names {at}:\n{err}");
    still_serving("a syntax error").await;

    // An address without a port.
    let text = reload_config(proxy.addr(), a, b, "b", ROUTE_B)
        + "\n[services.c]\nendpoints = [\n  { id = \"c1\", address = \"127.0.0.1\" },\n]\n";
    let err = proxy.reload_refused(&text).await;
    assert!(
        err.contains("has no port"),
        "the error says what is wrong:\n{err}"
    );
    let at = format!("{file}:{}", line_of(&text, "{ id = \"c1\""));
    assert!(err.contains(&at), "the error names {at}:\n{err}");
    still_serving("a bad address").await;

    // A route without a target.
    let text = reload_config(proxy.addr(), a, b, "b", ROUTE_B)
        + "\n[routes.notarget]\npath_prefix = \"/nt\"\n";
    let err = proxy.reload_refused(&text).await;
    let at = format!(
        "{file}:{}: routes.notarget",
        line_of(&text, "[routes.notarget]")
    );
    assert!(err.contains(&at), "the error names {at}:\n{err}");
    assert!(
        err.contains("exactly one target"),
        "and what to fix:\n{err}"
    );
    still_serving("a route without a target").await;

    // The watcher is still alive: a valid file applies.
    proxy
        .reload(&reload_config(proxy.addr(), a, b, "b", ROUTE_B))
        .await;
    assert_eq!(server_of(&client, &proxy.url("/b/x"), &[]).await, "b");
    assert_eq!(server_of(&client, &proxy.url("/m/x"), &[]).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let up = Upstream::start("slow").await;
    let ep = endpoint_line(&up, "");
    let mut proxy = Proxy::start(|| {
        format!(
            "[global]\ndrain_timeout = \"10s\"\n\n[[listeners]]\nname = \"web\"\nbind = \"{}\"\ndefault_service = \"s\"\n\n[services.s]\nendpoints = [{ep}]\n",
            free_addr()
        )
    })
    .await;
    let addr = proxy.addr();

    let slow_url = proxy.url("/slow?ms=1500");
    let slow = tokio::spawn(async move { plain_client().get(slow_url).send().await });
    let p = &proxy;
    wait_for(
        Duration::from_secs(5),
        "the slow request is in flight",
        || async move { p.endpoint("s", "slow").await["in_flight"] == 1 },
    )
    .await;

    sigterm(proxy.pid());
    wait_for(
        Duration::from_secs(5),
        "the listener refuses new connections",
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    assert!(
        !slow.is_finished(),
        "new connections must be refused while the slow request is still running"
    );

    let resp = slow
        .await
        .expect("slow task")
        .expect("the in-flight request completes during the drain");
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.expect("JSON");
    assert_eq!(echo["server"], "slow");

    let status = wait_exit(
        proxy.child(),
        Duration::from_secs(10),
        "pointsman after SIGTERM",
    )
    .await;
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        proxy.stderr()
    );
    assert!(
        proxy.stderr().contains("drained"),
        "the log says the drain finished:\n{}",
        proxy.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_counters_survive_table_rebuilds() {
    let ups = Upstream::start_many(&["w1", "w2", "w3"]).await;
    let config = |listen: SocketAddr, endpoints: &[&Upstream], extra: &str| {
        let eps: Vec<String> = endpoints.iter().map(|u| endpoint_line(u, "")).collect();
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\ndefault_service = \"web\"\n\n\
             [services.web]\nendpoints = [{}]\n{extra}",
            eps.join(", ")
        )
    };
    let proxy = Proxy::start(|| config(free_addr(), &[&ups[0], &ups[1]], "")).await;
    let client = client();
    let counts = tally(&client, &proxy.url("/"), 10).await;
    assert_eq!(counts.values().sum::<usize>(), 10);

    let check = |when: &'static str| {
        let (proxy, counts) = (&proxy, &counts);
        async move {
            let all = proxy.services().await;
            for id in ["w1", "w2"] {
                let ep = endpoint_in(&all, "web", id)
                    .unwrap_or_else(|| panic!("{when}: no web/{id} in {all:#}"));
                let n = counts.get(id).copied().unwrap_or(0);
                assert_eq!(ep["requests"], n, "{when}: {id} requests: {ep}");
                assert_eq!(ep["responses"][1], n, "{when}: {id} 2xx: {ep}");
            }
        }
    };
    check("before any reload").await;

    // Something unrelated changes: a new route.
    let route = "\n[routes.other]\npath_prefix = \"/other\"\nservice = \"web\"\n";
    proxy
        .reload(&config(proxy.addr(), &[&ups[0], &ups[1]], route))
        .await;
    check("after adding a route").await;

    // The service itself changes: a third endpoint.
    proxy
        .reload(&config(proxy.addr(), &[&ups[0], &ups[1], &ups[2]], route))
        .await;
    check("after adding an endpoint").await;
    let w3 = proxy.endpoint("web", "w3").await;
    assert_eq!(w3["requests"], 0, "the new endpoint starts at zero: {w3}");

    // And the counters keep counting from where they were.
    let more = tally(&client, &proxy.url("/other"), 9).await;
    let all = proxy.services().await;
    for id in ["w1", "w2", "w3"] {
        let total = counts.get(id).copied().unwrap_or(0) + more.get(id).copied().unwrap_or(0);
        let ep = endpoint_in(&all, "web", id).expect("endpoint");
        assert_eq!(ep["requests"], total, "{id} after more requests: {ep}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_flag_overrides_the_config_even_after_reload() {
    let up = Upstream::start("app").await;
    let in_file = free_addr();
    let flag = free_addr();
    let config = |extra: &str| {
        format!(
            "[[listeners]]\nname = \"main\"\nbind = \"{in_file}\"\ndefault_service = \"app\"\n\n\
             [services.app]\nendpoints = [{}]\n{extra}",
            endpoint_line(&up, "")
        )
    };
    let flag_arg = flag.to_string();
    let proxy = Proxy::start_with_args(|| config(""), &["--listen", &flag_arg]).await;
    let client = plain_client();

    assert_eq!(
        server_of(&client, &format!("http://{flag}/"), &[]).await,
        "app"
    );
    assert!(
        !accepts(in_file).await,
        "the config's own address is replaced by --listen"
    );

    proxy
        .reload(&config(
            "\n[routes.x]\npath_prefix = \"/x\"\nservice = \"app\"\n",
        ))
        .await;
    assert_eq!(
        server_of(&client, &format!("http://{flag}/x"), &[]).await,
        "app",
        "after a reload the proxy still listens where --listen says"
    );
    assert!(!accepts(in_file).await, "and not where the file says");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_can_change_a_listener_in_place() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let config = |listen: SocketAddr, default: &str| {
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\ndefault_service = \"{default}\"\n\n\
             [services.a]\nendpoints = [{}]\n\n[services.b]\nendpoints = [{}]\n",
            endpoint_line(&ups[0], ""),
            endpoint_line(&ups[1], "")
        )
    };
    let proxy = Proxy::start(|| config(free_addr(), "a")).await;
    let client = plain_client();
    assert_eq!(server_of(&client, &proxy.url("/"), &[]).await, "a");

    // Same address, another default service: the listener is rebuilt.
    let addr = proxy.addr();
    proxy
        .write_and_wait(
            &config(addr, "b"),
            "the reload is applied or refused",
            |err| err.contains("config applied") || err.contains("config refused"),
        )
        .await;
    let err = proxy.stderr();
    if err.contains("config refused") {
        let still = accepts(addr).await;
        panic!(
            "a reload that only changes listener web's default_service was refused; \
             the old listener still accepts: {still}; stderr:\n{err}"
        );
    }
    for _ in 0..5 {
        assert_eq!(server_of(&client, &proxy.url("/"), &[]).await, "b");
    }
}
