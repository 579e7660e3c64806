//! End to end with a real etcd: a proxy whose etcd watcher cannot make
//! progress says so, and one that can makes it however much etcd holds.
//!
//! - 70 registrations of 1 MiB each (70 MiB, over the watcher's 64 MiB
//!   message cap) under `/services`, written while a proxy is down or cut
//!   off from etcd: the proxy syncs (the listing is paged; a watch answer
//!   over the cap makes it list again at a newer revision) and then applies
//!   a later small change within seconds, with no compaction to help it;
//! - a proxy that cannot reach etcd at start is not ready, says for how
//!   long and why, and shows a growing staleness in `/metrics`.

mod support;

use std::time::{Duration, Instant};

use pointsman_discovery::conn::EtcdConn;
use pointsman_discovery::EtcdOptions;
use pointsman_testkit::relay::CutRelay;
use support::etcd::{etcd_source, put, EtcdServer};
use support::registry::{listener_config, wait_ready};
use support::*;

const STALENESS: &str = "pointsman_registry_staleness_seconds{source=\"etcd\"}";

/// Values of 1 MiB need a request limit above etcd's 1.5 MiB default only
/// for headroom; 2 MiB keeps one value per request well inside it.
const ETCD_ARGS: &[&str] = &[
    "--max-request-bytes=2097152",
    "--quota-backend-bytes=1073741824",
];
const BIG_VALUES: usize = 70;
const BIG_VALUE_BYTES: usize = 1024 * 1024;
/// How long the proxy gets to list 70 MiB and catch up.
const SYNC_DEADLINE: Duration = Duration::from_secs(30);

/// Writes `BIG_VALUES` valid registrations of about 1 MiB each under
/// `/services/big/`, one revision each; returns the last revision.
async fn write_big_values(etcd: &EtcdServer) -> i64 {
    let mut opts = EtcdOptions::new([etcd.endpoint()]);
    opts.request_timeout = Duration::from_secs(20);
    let mut conn = EtcdConn::new(opts).unwrap_or_else(|e| panic!("etcd options: {e}"));
    let pad = "x".repeat(BIG_VALUE_BYTES);
    let started = Instant::now();
    let mut rev = 0;
    for i in 0..BIG_VALUES {
        let value = format!(
            r#"{{"address":"127.0.0.1:{}","meta":{{"pad":"{pad}"}}}}"#,
            10_000 + i
        );
        let key = format!("/services/big/i{i:03}");
        let resp = conn
            .call("writing", move |mut c| async move {
                c.put(key, value, None).await
            })
            .await
            .unwrap_or_else(|e| panic!("put {i} of {BIG_VALUES} (20 s at most): {e}"));
        rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    }
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "writing {BIG_VALUES} MiB took {:?}",
        started.elapsed()
    );
    rev
}

/// Waits until `proxy` has applied revision `rev` or a later one, and
/// returns its etcd entry of `/api/discovery`.
async fn wait_applied_within(proxy: &Proxy, rev: i64, deadline: Duration) -> serde_json::Value {
    let end = Instant::now() + deadline;
    loop {
        let source = etcd_source(proxy).await;
        if let Some(s) = &source {
            if s["applied_revision"].as_i64() >= Some(rev) {
                return s.clone();
            }
        }
        assert!(
            Instant::now() < end,
            "proxy did not apply revision {rev} within {deadline:?}; /api/discovery etcd: {source:?}; stderr:\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_proxy_via(endpoint: &str) -> Proxy {
    Proxy::start_with_args(
        || listener_config(free_addr(), None),
        &["--etcd", endpoint, "--proxy-id", "edge-1", "--threads", "1"],
    )
    .await
}

/// A proxy started while `/services` holds 70 MiB syncs, and then follows
/// small changes as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_over_a_big_registry_syncs_and_follows() {
    let etcd = EtcdServer::start_with_args(ETCD_ARGS);
    let written = write_big_values(&etcd).await;

    let started = Instant::now();
    // Ready means the first sync was applied (there is no saved state).
    let proxy = start_proxy_via(&etcd.endpoint()).await;
    let source = wait_applied_within(&proxy, written, SYNC_DEADLINE).await;
    eprintln!("synced {BIG_VALUES} MiB in {:?}", started.elapsed());
    assert_eq!(source["connected"], true, "{source}");

    let small = put(&etcd, "/services/web/a1", "127.0.0.1:9").await;
    let t = Instant::now();
    wait_applied_within(&proxy, small, Duration::from_secs(10)).await;
    wait_ready(&[&proxy], "web", &["a1"]).await;
    eprintln!("a later change applied in {:?}", t.elapsed());
    let eps = support::registry::endpoints(&proxy, "big").await;
    assert_eq!(eps.len(), BIG_VALUES, "every big registration is served");
}

/// A proxy whose watch is cut while 70 MiB are written resumes: the watch
/// answer carrying them is over the cap, so it lists again at a newer
/// revision instead of asking for the same answer forever, and then
/// applies a later small change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cut_during_big_writes_catches_up_without_compaction() {
    let etcd = EtcdServer::start_with_args(ETCD_ARGS);
    let relay = CutRelay::start(etcd.client_port()).await;
    let first = put(&etcd, "/services/web/a1", "127.0.0.1:9").await;
    let proxy = start_proxy_via(&relay.endpoint()).await;
    wait_applied_within(&proxy, first, Duration::from_secs(10)).await;
    let resets_before = etcd_source(&proxy)
        .await
        .and_then(|s| s["resets"].as_u64())
        .unwrap_or(0);

    relay.cut();
    let written = write_big_values(&etcd).await;
    relay.heal();

    let started = Instant::now();
    let source = wait_applied_within(&proxy, written, SYNC_DEADLINE).await;
    eprintln!("caught up on {BIG_VALUES} MiB in {:?}", started.elapsed());
    let resets = source["resets"].as_u64().unwrap_or(0);
    assert!(
        resets > resets_before,
        "the oversized watch answer was met by listing again: {source}"
    );
    let error = source["last_error"].as_str().unwrap_or("");
    assert!(error.contains("over the 64 MiB cap"), "{source}");

    let small = put(&etcd, "/services/web/a2", "127.0.0.1:9").await;
    wait_applied_within(&proxy, small, Duration::from_secs(10)).await;
    wait_ready(&[&proxy], "web", &["a1", "a2"]).await;
    let staleness = etcd_source(&proxy)
        .await
        .and_then(|s| s["staleness_secs"].as_f64());
    assert!(
        staleness.is_some_and(|s| s < 5.0),
        "staleness after catching up: {staleness:?}"
    );
}

/// A proxy that cannot reach etcd at start (and has no saved state) is not
/// ready: `/readyz` names the registry, how long it has waited and the
/// last error, and the staleness metric is there and grows. Once etcd can
/// be reached it syncs and turns ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_synced_is_not_ready_and_says_why() {
    let etcd = EtcdServer::start();
    let first = put(&etcd, "/services/web/a1", "127.0.0.1:9").await;
    let relay = CutRelay::start(etcd.client_port()).await;
    relay.cut();
    let admin = free_addr();
    let endpoint = relay.endpoint();
    // Returns once the proxy is ready, which it cannot be before the relay
    // is healed below.
    let starting = tokio::spawn(async move {
        let admin = admin.to_string();
        Proxy::start_with_args(
            || listener_config(free_addr(), None),
            &[
                "--etcd",
                &endpoint,
                "--proxy-id",
                "edge-1",
                "--threads",
                "1",
                "--admin",
                &admin,
            ],
        )
        .await
    });

    let http = plain_client();
    let mut said = String::new();
    let mut staleness = Vec::new();
    let end = Instant::now() + Duration::from_secs(15);
    while staleness.len() < 2 || !said.contains("last error") {
        assert!(
            Instant::now() < end,
            "no 503 naming the wait and its error within 15 s; /readyz said {said:?}, staleness {staleness:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Ok(resp) = http.get(format!("http://{admin}/readyz")).send().await else {
            continue; // not listening yet
        };
        assert_eq!(resp.status(), 503, "ready without ever syncing");
        said = resp.text().await.unwrap_or_default();
        let metrics = http
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .ok();
        let Some(text) = (match metrics {
            Some(m) => m.text().await.ok(),
            None => None,
        }) else {
            continue;
        };
        if let Some(v) = text
            .lines()
            .find_map(|l| l.strip_prefix(STALENESS)?.trim().parse::<f64>().ok())
        {
            staleness.push(v);
        }
    }
    assert!(
        said.contains("waiting for the first sync from etcd for"),
        "{said}"
    );
    assert!(
        staleness.windows(2).all(|w| w[1] >= w[0]) && staleness[staleness.len() - 1] > 0.0,
        "staleness must grow while nothing syncs: {staleness:?}"
    );

    relay.heal();
    let proxy = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("the proxy turned ready once etcd could be reached")
        .expect("the starting task");
    let source = wait_applied_within(&proxy, first, Duration::from_secs(10)).await;
    assert_eq!(source["connected"], true, "{source}");
    let now = proxy.metric(STALENESS).await;
    assert!(
        now.is_some_and(|s| s < 5.0),
        "staleness after the sync: {now:?}"
    );
}
