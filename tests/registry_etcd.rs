//! End to end with a real etcd: the `pointsman` binary follows a throwaway
//! etcd (`--etcd`) and routes to real `pointsman upstream` processes. Keys are
//! written with `etcdctl`, as an operator or registrator would.
//!
//! What is covered: registration (bare and JSON with a weight), deletion,
//! lease expiry, one-transaction switches never seen half-applied, an etcd
//! restart while the watch is broken, compaction of the history the proxy
//! needs, fail-static start from `--state-dir` while etcd is down, malformed
//! values, and the revision `/api/discovery` reports.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::etcd::{etcdctl, etcdctl_fed, EtcdServer};
use support::*;

/// How long a registry change gets to reach the routing table.
const CHANGE_DEADLINE: Duration = Duration::from_secs(10);
/// How long the proxy gets to reconnect to an etcd that came back (its
/// backoff is capped at 5 s, plus connecting).
const RECONNECT_DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// etcd through etcdctl

/// The revision in the header of an `etcdctl -w json` answer.
fn header_revision(json: &str) -> i64 {
    let v: Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("etcdctl -w json gave no JSON ({e}): {json}"));
    v["header"]["revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("no header.revision in {json}"))
}

/// `etcdctl put key value`; the revision it created.
async fn put(etcd: &EtcdServer, key: &str, value: &str) -> i64 {
    header_revision(&etcdctl(etcd, &["-w", "json", "put", key, value]).await)
}

/// `etcdctl del key`; the revision after it.
async fn del(etcd: &EtcdServer, key: &str) -> i64 {
    header_revision(&etcdctl(etcd, &["-w", "json", "del", key]).await)
}

/// `etcdctl txn` with `ops` as the success operations and no conditions,
/// so every operation commits in one revision, which is returned.
async fn txn(etcd: &EtcdServer, ops: &[String]) -> i64 {
    // An empty line ends the (empty) conditions, the next one the success
    // operations, the last one the (empty) failure operations.
    let script = format!("\n{}\n\n\n", ops.join("\n"));
    let out = etcdctl_fed(etcd, &["-w", "json", "txn"], Some(&script)).await;
    let v: Value = serde_json::from_str(&out).expect("etcdctl txn -w json");
    assert_eq!(v["succeeded"], true, "txn did not succeed: {out}");
    header_revision(&out)
}

/// A quoted operand for `etcdctl txn` (JSON values contain quotes).
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// etcd's current revision.
async fn etcd_revision(etcd: &EtcdServer) -> i64 {
    header_revision(&etcdctl(etcd, &["-w", "json", "get", "/no-such-key"]).await)
}

/// `etcdctl lease grant <ttl>`; the lease id in hex, as `put --lease` takes it.
async fn grant_lease(etcd: &EtcdServer, ttl_secs: u32) -> String {
    let out = etcdctl(etcd, &["lease", "grant", &ttl_secs.to_string()]).await;
    // "lease 694d7f3c2a9b0e11 granted with TTL(2s)"
    out.split_whitespace()
        .nth(1)
        .filter(|_| out.starts_with("lease "))
        .unwrap_or_else(|| panic!("unexpected `etcdctl lease grant` output: {out}"))
        .to_string()
}

/// A bare registration value.
fn addr_of(u: &Upstream) -> String {
    u.addr.to_string()
}

// ---------------------------------------------------------------------------
// The proxy

/// A config with one HTTP listener; its `default_service` (if any) is the
/// only routing the file does: everything else comes from etcd.
fn config(listen: SocketAddr, default_service: Option<&str>) -> String {
    let default = default_service
        .map(|s| format!("default_service = \"{s}\"\n"))
        .unwrap_or_default();
    format!("[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\n{default}")
}

/// Starts the proxy following `etcd`, with `extra` arguments for `run`.
async fn start_proxy(etcd: &EtcdServer, default_service: Option<&str>, extra: &[&str]) -> Proxy {
    start_proxy_at(&etcd.endpoint(), default_service, extra).await
}

async fn start_proxy_at(endpoint: &str, default_service: Option<&str>, extra: &[&str]) -> Proxy {
    let mut args = vec!["--etcd", endpoint];
    args.extend_from_slice(extra);
    Proxy::start_with_args(|| config(free_addr(), default_service), &args).await
}

/// The etcd entry of `/api/discovery`.
async fn discovery(proxy: &Proxy) -> Value {
    let all: Value = plain_client()
        .get(proxy.admin_url("/api/discovery"))
        .send()
        .await
        .expect("GET /api/discovery")
        .json()
        .await
        .expect("/api/discovery is JSON");
    all.as_array()
        .and_then(|a| a.iter().find(|s| s["source"] == "etcd"))
        .cloned()
        .unwrap_or_else(|| panic!("no etcd source in /api/discovery: {all:#}"))
}

/// Waits until `series` in `/metrics` equals `want`.
async fn wait_metric(proxy: &Proxy, series: &str, want: f64, deadline: Duration) {
    wait_for(
        deadline,
        &format!("/metrics shows {series} {want}"),
        || async { proxy.metric(series).await == Some(want) },
    )
    .await;
}

/// Waits until the proxy says it applied etcd revision `rev` (or later).
async fn wait_applied(proxy: &Proxy, rev: i64) {
    wait_for(
        CHANGE_DEADLINE,
        &format!("the proxy applied etcd revision {rev}"),
        || async { discovery(proxy).await["applied_revision"].as_i64() >= Some(rev) },
    )
    .await;
}

/// One GET that never panics: the status (0 when no answer) and the
/// upstream's name, or, when the body is not an echo, the body (or the
/// error) in brackets, which names no upstream but tells a failing test
/// what happened.
async fn answer(client: &reqwest::Client, url: &str) -> (u16, String) {
    match client.get(url).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.bytes().await.unwrap_or_default();
            let echo: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            match echo["server"].as_str() {
                Some(server) => (status, server.to_string()),
                None => (
                    status,
                    format!("[{}]", String::from_utf8_lossy(&body).trim()),
                ),
            }
        }
        Err(e) => (0, format!("[{e}]")),
    }
}

/// Waits until a request to `url` is answered by the upstream `name`.
async fn wait_served_by(client: &reqwest::Client, url: &str, name: &str) {
    wait_for(
        CHANGE_DEADLINE,
        &format!("GET {url} is answered by {name}"),
        || async { answer(client, url).await == (200, name.to_string()) },
    )
    .await;
}

/// The endpoint ids of `service` in `/api/services` (empty when absent).
async fn endpoint_ids(proxy: &Proxy, service: &str) -> Vec<String> {
    let all = proxy.services().await;
    all.as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .and_then(|s| s["endpoints"].as_array())
        .map(|eps| {
            eps.iter()
                .filter_map(|e| e["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `service` has exactly the endpoints `ids` (sorted).
async fn wait_endpoints(proxy: &Proxy, service: &str, ids: &[&str]) {
    wait_for(
        CHANGE_DEADLINE,
        &format!("service {service} has exactly the endpoints {ids:?}"),
        || async {
            let mut now = endpoint_ids(proxy, service).await;
            now.sort();
            now == ids
        },
    )
    .await;
}

/// Sends `n` GETs and asserts every one is a 200 from one of `allowed`;
/// returns the count per upstream.
async fn tally_only(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    allowed: &[&str],
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let (status, server) = answer(client, url).await;
        assert!(
            status == 200 && allowed.contains(&server.as_str()),
            "request {i} of {n} to {url}: status {status} from {server:?}, expected 200 from one of {allowed:?}"
        );
        *counts.entry(server).or_insert(0) += 1;
    }
    counts
}

/// SIGSTOPs a process; SIGCONTs it when dropped (also when the test fails).
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        signal(pid, "STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

// ---------------------------------------------------------------------------
// Tests

/// A route and instances written to etcd after the proxy started become
/// routable, and a JSON registration's weight is what the balancer uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_makes_an_instance_routable_and_json_weight_applies() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, None, &[]).await;
    let client = client();
    let url = proxy.url("/shop/cart");

    // Nothing in etcd: no route matches.
    assert_eq!(answer(&client, &url).await.0, 404);

    put(
        &etcd,
        "/pointsman/routes/shop",
        r#"{"path_prefix":"/shop","service":"shop"}"#,
    )
    .await;
    put(&etcd, "/services/shop/a", &addr_of(&ups[0])).await;
    wait_served_by(&client, &url, "a").await;
    assert_eq!(
        tally_only(&client, &url, 10, &["a"]).await["a"],
        10,
        "only a is registered"
    );

    let reg = format!(r#"{{"address":"{}","weight":3}}"#, ups[1].addr);
    let rev = put(&etcd, "/services/shop/b", &reg).await;
    wait_applied(&proxy, rev).await;
    assert_eq!(proxy.endpoint("shop", "b").await["weight"], 3);
    assert_eq!(proxy.endpoint("shop", "a").await["weight"], 1);
    // Smooth weighted round robin: 1 of every 4 to a, 3 to b.
    let counts = tally_only(&client, &url, 40, &["a", "b"]).await;
    let (a, b) = (counts["a"], counts["b"]);
    assert!(
        (8..=12).contains(&a) && (28..=32).contains(&b),
        "weights 1:3 over 40 requests gave {counts:?}"
    );
}

/// A deleted instance gets no new requests once the deletion is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_instance_gets_no_new_requests() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let etcd = EtcdServer::start();
    put(&etcd, "/services/web/a", &addr_of(&ups[0])).await;
    put(&etcd, "/services/web/b", &addr_of(&ups[1])).await;
    let proxy = start_proxy(&etcd, Some("web"), &[]).await;
    let client = client();
    let url = proxy.url("/");
    let counts = tally_only(&client, &url, 20, &["a", "b"]).await;
    assert_eq!(counts.len(), 2, "both instances serve: {counts:?}");

    del(&etcd, "/services/web/b").await;
    wait_endpoints(&proxy, "web", &["a"]).await;
    let counts = tally_only(&client, &url, 200, &["a"]).await;
    assert_eq!(counts["a"], 200);
    // Fresh connections too, not only the pooled one.
    tally_only(&plain_client(), &url, 20, &["a"]).await;
}

/// An instance registered with a lease that is not kept alive disappears
/// a few seconds after the lease's TTL, with no delete from anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_removes_the_instance() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let etcd = EtcdServer::start();
    put(&etcd, "/services/web/a", &addr_of(&ups[0])).await;
    let proxy = start_proxy(&etcd, Some("web"), &[]).await;
    let client = client();
    let url = proxy.url("/");

    let lease = grant_lease(&etcd, 2).await;
    let granted = Instant::now();
    etcdctl(
        &etcd,
        &[
            "put",
            &format!("--lease={lease}"),
            "/services/web/b",
            &addr_of(&ups[1]),
        ],
    )
    .await;
    wait_served_by(&client, &url, "b").await;

    wait_endpoints(&proxy, "web", &["a"]).await;
    let gone_after = granted.elapsed();
    assert!(
        gone_after < Duration::from_secs(8),
        "a 2 s lease took {gone_after:?} to remove the instance"
    );
    tally_only(&client, &url, 100, &["a"]).await;
}

/// Blue/green switches in [`one_transaction_switch_is_never_half_applied`].
const SWITCHES: usize = 50;

/// A blue/green switch written in one etcd transaction is never seen
/// half-applied by requests running concurrently with it.
///
/// The design makes every partial application observable as a 503, not as
/// a subtle mix: each switch from colour Y to colour X is one transaction
/// that
///
/// 1. registers X's only instance (`/services/X/i`),
/// 2. points the route `/app` at service X (`/pointsman/routes/app`),
/// 3. points the map entry `live/colour`, which the route `/m` looks up,
///    at X (`/pointsman/maps/live/colour`),
/// 4. deletes Y's only instance (`/services/Y/i`).
///
/// Applied whole, `/app` and `/m` go from Y to X with a 200 every time.
/// Applied in two tables in any order, the first table either routes to X
/// before X has an instance (2 or 3 without 1: "service X not defined",
/// 503) or still routes to Y after Y lost its instance (4 without 2 or 3:
/// no endpoint, 503). Adding X's instance alone (1 first) is invisible, but
/// then the rest still splits as above. A request must not mix revisions
/// either: one that routed with the old table must not find the old
/// colour's endpoint already drained by the new revision (also a 503).
/// So three clients hammer `/app` and `/m` over keep-alive connections
/// across [`SWITCHES`] switches, each applied before the next, and every
/// answer must be a 200 from blue or green. A split that lives a few tens
/// of microseconds (one publish per etcd event, say) is hit with high
/// probability over that many switches; a proxy that is atomic never fails
/// this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_switch_is_never_half_applied() {
    let ups = Upstream::start_many(&["blue", "green"]).await;
    let addr = |colour: &str| {
        ups.iter()
            .find(|u| u.name == colour)
            .map(|u| u.addr.to_string())
            .expect("an upstream per colour")
    };
    let etcd = EtcdServer::start();
    let route_app = |colour: &str| format!(r#"{{"path_prefix":"/app","service":"{colour}"}}"#);
    put(&etcd, "/pointsman/routes/app", &route_app("blue")).await;
    put(
        &etcd,
        "/pointsman/routes/m",
        r#"{"path_prefix":"/m","map":"live","map_key":"colour"}"#,
    )
    .await;
    put(&etcd, "/pointsman/maps/live/colour", "blue").await;
    put(&etcd, "/services/blue/i", &addr("blue")).await;
    let proxy = start_proxy(&etcd, None, &[]).await;
    let client = client();
    wait_served_by(&client, &proxy.url("/app"), "blue").await;
    wait_served_by(&client, &proxy.url("/m"), "blue").await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (stop, client) = (stop.clone(), support::client());
        let urls = [proxy.url("/app"), proxy.url("/m")];
        clients.push(tokio::spawn(async move {
            // (path, status, server) of every answer that was not a 200
            // from blue or green, and how many answers there were.
            let mut bad = Vec::new();
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            let end = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                for url in &urls {
                    let (status, server) = answer(&client, url).await;
                    if status != 200 || !(server == "blue" || server == "green") {
                        bad.push((url.clone(), status, server));
                    } else {
                        *seen.entry(format!("{url} {server}")).or_insert(0) += 1;
                    }
                }
            }
            (bad, seen)
        }));
    }

    let mut from = "blue";
    for _ in 0..SWITCHES {
        let to = if from == "blue" { "green" } else { "blue" };
        let ops = [
            format!("put /services/{to}/i {}", addr(to)),
            format!("put /pointsman/routes/app {}", quoted(&route_app(to))),
            format!("put /pointsman/maps/live/colour {to}"),
            format!("del /services/{from}/i"),
        ];
        let rev = txn(&etcd, &ops).await;
        wait_applied(&proxy, rev).await;
        // Let the clients run on the new table for a moment.
        tokio::time::sleep(Duration::from_millis(30)).await;
        from = to;
    }
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for c in clients {
        let (bad, seen) = c.await.expect("client task");
        assert!(
            bad.is_empty(),
            "{} answers were not a 200 from blue or green (a half-applied switch); first ones: {:?}\n\
             (the proxy logged {} deregistered endpoints as draining, i.e. switches during \
             which a request was in flight to the old colour)",
            bad.len(),
            &bad[..bad.len().min(10)],
            proxy.stderr().matches("endpoint deregistered: draining").count()
        );
        for colour in ["blue", "green"] {
            for path in ["/app", "/m"] {
                let key = format!("{} {colour}", proxy.url(path));
                assert!(
                    seen.get(&key).copied().unwrap_or(0) > 0,
                    "a client never saw {key}: {seen:?}"
                );
            }
        }
        total += seen.values().sum::<usize>();
    }
    assert!(
        total >= 200,
        "only {total} requests ran during the switches"
    );
}

/// etcd stops while the proxy watches: the proxy keeps serving what it had;
/// changes made after etcd is back but before the proxy reconnected (the
/// proxy is SIGSTOPped meanwhile, so they certainly land while its watch is
/// broken) are not lost: it resumes after the last revision it saw, without
/// listing everything again; and later changes apply as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_resumes_the_watch_without_losing_changes() {
    let ups = Upstream::start_many(&["a", "b", "c"]).await;
    let mut etcd = EtcdServer::start();
    put(&etcd, "/services/web/a", &addr_of(&ups[0])).await;
    let proxy = start_proxy(&etcd, Some("web"), &[]).await;
    let client = client();
    let url = proxy.url("/");
    wait_served_by(&client, &url, "a").await;
    wait_for(CHANGE_DEADLINE, "the first listing is counted", || async {
        discovery(&proxy).await["resets"] == 1
    })
    .await;

    etcd.stop();
    wait_metric(
        &proxy,
        "pointsman_registry_connected{source=\"etcd\"}",
        0.0,
        CHANGE_DEADLINE,
    )
    .await;
    // Fail static: the last good view keeps serving.
    tally_only(&client, &url, 20, &["a"]).await;

    // The revision of the last change, not etcd's head: the proxy's own
    // record (`/pointsman/proxies/...`) moves the head once it runs again.
    let missed = {
        let _frozen = Frozen::new(proxy.pid());
        etcd.restart();
        put(&etcd, "/services/web/b", &addr_of(&ups[1])).await;
        del(&etcd, "/services/web/a").await
    };
    wait_applied(&proxy, missed).await;
    wait_endpoints(&proxy, "web", &["b"]).await;
    tally_only(&client, &url, 40, &["b"]).await;
    let d = discovery(&proxy).await;
    assert_eq!(d["connected"], true, "{d:#}");
    assert_eq!(
        d["resets"], 1,
        "the watch should resume after its last revision, not list again: {d:#}"
    );
    assert!(d["reconnects"].as_u64() >= Some(1), "{d:#}");

    let rev = put(&etcd, "/services/web/c", &addr_of(&ups[2])).await;
    wait_applied(&proxy, rev).await;
    let counts = tally_only(&client, &url, 20, &["b", "c"]).await;
    assert_eq!(counts.len(), 2, "b and c both serve: {counts:?}");
}

/// The history the proxy would resume from is compacted while its watch is
/// broken: etcd cancels the resumed watch, the proxy lists everything again
/// and ends with exactly what etcd holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_history_makes_the_proxy_list_again() {
    let ups = Upstream::start_many(&["a", "b", "c"]).await;
    let mut etcd = EtcdServer::start();
    put(&etcd, "/services/web/a", &addr_of(&ups[0])).await;
    let proxy = start_proxy(&etcd, Some("web"), &[]).await;
    let client = client();
    let url = proxy.url("/");
    wait_served_by(&client, &url, "a").await;

    etcd.stop();
    wait_metric(
        &proxy,
        "pointsman_registry_connected{source=\"etcd\"}",
        0.0,
        CHANGE_DEADLINE,
    )
    .await;
    let compacted = {
        let _frozen = Frozen::new(proxy.pid());
        etcd.restart();
        put(&etcd, "/services/web/b", "127.0.0.1:1").await;
        put(&etcd, "/services/web/c", &addr_of(&ups[2])).await;
        del(&etcd, "/services/web/a").await;
        let rev = put(&etcd, "/services/web/b", &addr_of(&ups[1])).await;
        etcdctl(&etcd, &["compact", &rev.to_string()]).await;
        rev
    };
    wait_applied(&proxy, compacted).await;
    wait_endpoints(&proxy, "web", &["b", "c"]).await;
    let counts = tally_only(&client, &url, 40, &["b", "c"]).await;
    assert_eq!(counts.len(), 2, "b and c both serve: {counts:?}");
    let d = discovery(&proxy).await;
    assert_eq!(
        d["resets"], 2,
        "a compacted resume point needs a new listing: {d:#}"
    );
    assert!(
        proxy.stderr().contains("compacted"),
        "the proxy should log why it listed again; stderr:\n{}",
        proxy.stderr()
    );

    // And it keeps watching after the new listing.
    let rev = del(&etcd, "/services/web/c").await;
    wait_applied(&proxy, rev).await;
    tally_only(&client, &url, 20, &["b"]).await;
}

/// Fail static: a proxy started while etcd is down, with a `--state-dir`
/// an earlier run against that etcd filled, is ready at once and serves the
/// saved table; when etcd comes up it syncs to what etcd holds now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_state_serves_while_etcd_is_down_until_it_syncs() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let mut etcd = EtcdServer::start();
    let state = tempfile::tempdir().expect("a state dir");
    let state_dir = state.path().to_str().expect("a UTF-8 path").to_string();
    put(&etcd, "/services/web/a", &addr_of(&ups[0])).await;
    {
        let first = start_proxy(&etcd, Some("web"), &["--state-dir", &state_dir]).await;
        wait_served_by(&client(), &first.url("/"), "a").await;
        let file = pointsman_discovery::state_path(state.path(), pointsman_discovery::Source::Etcd);
        let a = addr_of(&ups[0]);
        wait_until(
            CHANGE_DEADLINE,
            "the first proxy saves its etcd state",
            || {
                std::fs::read_to_string(&file)
                    .map(|s| s.contains(&a))
                    .unwrap_or(false)
            },
        )
        .await;
    }
    // etcd moves on after the first proxy stopped, then goes down.
    put(&etcd, "/services/web/b", &addr_of(&ups[1])).await;
    del(&etcd, "/services/web/a").await;
    let endpoint = etcd.endpoint();
    etcd.stop();

    let started = Instant::now();
    let proxy = start_proxy_at(&endpoint, Some("web"), &["--state-dir", &state_dir]).await;
    let ready_after = started.elapsed();
    assert!(
        ready_after < Duration::from_millis(1900),
        "/readyz took {ready_after:?} to say 200 on saved state: it should not wait for etcd"
    );
    assert!(
        proxy
            .stderr()
            .contains("serving the saved state until the registry syncs"),
        "{}",
        proxy.stderr()
    );
    let saved = "pointsman_registry_serving_saved_state{source=\"etcd\"}";
    assert_eq!(proxy.metric(saved).await, Some(1.0));
    assert_eq!(discovery(&proxy).await["serving_saved_state"], true);
    let client = client();
    let url = proxy.url("/");
    tally_only(&client, &url, 20, &["a"]).await;

    etcd.restart();
    wait_metric(&proxy, saved, 0.0, RECONNECT_DEADLINE).await;
    wait_endpoints(&proxy, "web", &["b"]).await;
    tally_only(&client, &url, 20, &["b"]).await;
    let d = discovery(&proxy).await;
    assert_eq!(d["serving_saved_state"], false, "{d:#}");
    assert_eq!(d["connected"], true, "{d:#}");
}

/// What a load of client loops saw.
#[derive(Debug, Default)]
struct LoadCounts {
    ok: usize,
    unavailable: usize,
    other_status: usize,
    /// Nothing listened: the connection was refused.
    refused: usize,
    /// Any other failure (a connection cut by `kill -9`, a timeout).
    failed: usize,
}

/// `clients` loops GETting `url` until `stop` is set (or 60 s pass), each
/// on connections of its own.
fn start_load(
    url: String,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<LoadCounts>> {
    (0..clients)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .connect_timeout(Duration::from_secs(2))
                    .build()
                    .expect("build a reqwest client");
                let mut n = LoadCounts::default();
                let end = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => n.ok += 1,
                        Ok(r) if r.status() == 503 => n.unavailable += 1,
                        Ok(_) => n.other_status += 1,
                        Err(e) if e.is_connect() => {
                            n.refused += 1;
                            // Nothing listens yet: no need to spin.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Err(_) => n.failed += 1,
                    }
                }
                n
            })
        })
        .collect()
}

async fn finish_load(
    stop: &AtomicBool,
    loops: Vec<tokio::task::JoinHandle<LoadCounts>>,
) -> LoadCounts {
    stop.store(true, Ordering::Relaxed);
    let mut all = LoadCounts::default();
    for l in loops {
        let n = l.await.expect("a load loop panicked");
        all.ok += n.ok;
        all.unavailable += n.unavailable;
        all.other_status += n.other_status;
        all.refused += n.refused;
        all.failed += n.failed;
    }
    all
}

/// A crash (`kill -9`) and a restart by a supervisor with `--state-dir`
/// while etcd is down, under load from 16 client loops: the new process
/// serves the saved state from its first accepted connection, so no client
/// gets a 503. Connections refused while no process listens are expected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_kill_9_with_etcd_down_serves_the_saved_state_without_503() {
    let ups = Upstream::start_many(&["a"]).await;
    let mut etcd = EtcdServer::start();
    let state = tempfile::tempdir().expect("a state dir");
    let state_dir = state.path().to_str().expect("a UTF-8 path").to_string();
    put(&etcd, "/services/web/a", &addr_of(&ups[0])).await;
    let listen = free_addr();
    let endpoint = etcd.endpoint();
    let args = [
        "--etcd",
        endpoint.as_str(),
        "--state-dir",
        state_dir.as_str(),
    ];
    let first = Proxy::start_with_args(|| config(listen, Some("web")), &args).await;
    let url = first.url("/");
    wait_served_by(&client(), &url, "a").await;
    let file = pointsman_discovery::state_path(state.path(), pointsman_discovery::Source::Etcd);
    let a = addr_of(&ups[0]);
    wait_until(
        CHANGE_DEADLINE,
        "the first proxy saves its etcd state",
        || {
            std::fs::read_to_string(&file)
                .map(|s| s.contains(&a))
                .unwrap_or(false)
        },
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let loops = start_load(url.clone(), 16, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.stop();
    signal(first.pid(), "KILL");
    // The supervisor starts it again, with the same flags.
    let second = Proxy::start_with_args(|| config(listen, Some("web")), &args).await;
    // Load on the restarted process for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = finish_load(&stop, loops).await;
    println!("after kill -9 and a restart with etcd down: {n:?}");
    eprintln!(
        "503s: {}, refused connections: {} (ok {}, other statuses {}, other failures {})",
        n.unavailable, n.refused, n.ok, n.other_status, n.failed
    );
    assert_eq!(n.unavailable, 0, "no 503 from the restarted process: {n:?}");
    assert_eq!(n.other_status, 0, "{n:?}");
    assert!(n.ok > 100, "the load was served before and after: {n:?}");
    assert!(second
        .stderr()
        .contains("serving the saved state until the registry syncs"));
    drop(first);
}

/// A start without `--state-dir` while etcd is slow to answer (frozen for
/// a while): requests that arrive before the first sync wait for it and
/// are answered 200, not 503 from a table that is still empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_the_first_sync_wait_for_it() {
    let ups = Upstream::start_many(&["a"]).await;
    let mut etcd = EtcdServer::start();
    put(&etcd, "/services/web/a", &addr_of(&ups[0])).await;
    let listen = free_addr();
    let url = format!("http://{listen}/");
    let endpoint = etcd.endpoint();
    etcd.freeze();
    let starting = tokio::spawn(async move {
        let args = ["--etcd", endpoint.as_str()];
        Proxy::start_with_args(|| config(listen, Some("web")), &args).await
    });
    // The listener takes connections (into its backlog) before the sync.
    wait_for(
        START_DEADLINE,
        "the proxy's listener takes connections",
        || async { accepts(listen).await },
    )
    .await;
    let early: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { answer(&plain_client(), &url).await })
        })
        .collect();
    // etcd answers nothing for a while: the requests wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        early.iter().all(|r| !r.is_finished()),
        "requests were answered before etcd could sync"
    );
    etcd.thaw();
    for r in early {
        let got = r.await.expect("a request task panicked");
        assert_eq!(got, (200, "a".to_string()), "answered by a once synced");
    }
    let proxy = starting.await.expect("the proxy started");
    assert!(
        !proxy.stderr().contains("not every registry synced in time"),
        "{}",
        proxy.stderr()
    );
}

/// A value that does not parse is skipped and counted; a bad value for a
/// key that had a good one keeps the good one; other instances keep
/// routing; a later valid value for the bad key is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_skipped_counted_and_later_fixed() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let etcd = EtcdServer::start();
    put(&etcd, "/services/web/a", &addr_of(&ups[0])).await;
    let proxy = start_proxy(&etcd, Some("web"), &[]).await;
    let client = client();
    let url = proxy.url("/");
    let malformed = "pointsman_registry_malformed_total{source=\"etcd\"}";
    assert_eq!(proxy.metric(malformed).await, Some(0.0));

    put(&etcd, "/services/web/bad", "nonsense").await;
    wait_metric(&proxy, malformed, 1.0, CHANGE_DEADLINE).await;
    let d = discovery(&proxy).await;
    assert!(
        d["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("/services/web/bad")),
        "last_error names the key: {d:#}"
    );
    tally_only(&client, &url, 40, &["a"]).await;
    assert_eq!(endpoint_ids(&proxy, "web").await, ["a"]);

    // A typo in a good key's new value: the last good value stays.
    let typo = format!(r#"{{"address":"{}","wieght":5}}"#, ups[1].addr);
    put(&etcd, "/services/web/a", &typo).await;
    wait_metric(&proxy, malformed, 2.0, CHANGE_DEADLINE).await;
    tally_only(&client, &url, 20, &["a"]).await;
    assert_eq!(proxy.endpoint("web", "a").await["weight"], 1);

    let rev = put(&etcd, "/services/web/bad", &addr_of(&ups[1])).await;
    wait_applied(&proxy, rev).await;
    let counts = tally_only(&client, &url, 20, &["a", "b"]).await;
    assert_eq!(counts.len(), 2, "the fixed key serves too: {counts:?}");
    assert_eq!(proxy.metric(malformed).await, Some(2.0));
}

/// `/api/discovery` (and `/metrics`) report as applied the etcd revision
/// the served table holds, after a start, a put and a transaction: at least
/// the revision of the last change, at most etcd's head. (The two differ by
/// the proxy's own record under `/pointsman/proxies/`, rewritten after each
/// change: it moves the head, and a listing's revision, but no change of it
/// is applied to the table.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_reports_the_applied_etcd_revision() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let etcd = EtcdServer::start();
    let listed = put(&etcd, "/services/web/a", &addr_of(&ups[0])).await;
    let proxy = start_proxy(&etcd, Some("web"), &[]).await;
    wait_applied(&proxy, listed).await;
    let d = discovery(&proxy).await;
    let head = etcd_revision(&etcd).await;
    assert!(
        d["applied_revision"].as_i64() <= Some(head),
        "at most etcd's head {head}: {d:#}"
    );
    assert_eq!(d["connected"], true, "{d:#}");

    let client = client();
    let url = proxy.url("/");
    let now = put(&etcd, "/services/web/a", &addr_of(&ups[1])).await;
    wait_served_by(&client, &url, "b").await;
    wait_applied(&proxy, now).await;
    let head = etcd_revision(&etcd).await;
    assert!(discovery(&proxy).await["applied_revision"].as_i64() <= Some(head));

    let rev = txn(
        &etcd,
        &[
            format!("put /services/web/a {}", ups[0].addr),
            format!("put /services/web/b {}", ups[1].addr),
        ],
    )
    .await;
    wait_endpoints(&proxy, "web", &["a", "b"]).await;
    wait_applied(&proxy, rev).await;
    let d = discovery(&proxy).await;
    let head = etcd_revision(&etcd).await;
    let applied = d["applied_revision"].as_i64().expect("an applied revision");
    assert!(
        (rev..=head).contains(&applied),
        "{rev} <= applied <= {head}: {d:#}"
    );
    assert!(
        (applied..=head).contains(&d["seen_revision"].as_i64().unwrap_or(-1)),
        "applied <= seen <= head: {d:#}"
    );
    let rev = applied;
    assert_eq!(
        proxy
            .metric("pointsman_registry_applied_revision{source=\"etcd\"}")
            .await,
        Some(rev as f64)
    );
}
