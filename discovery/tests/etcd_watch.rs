//! The etcd watcher against a real etcd: what a proxy sees when containers
//! register, leases expire, operators switch traffic in a transaction, and
//! etcd restarts, freezes, compacts or is cut off.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, CompactionOptions, GetOptions, PutOptions, Txn, TxnOp};
use pointsman_discovery::{
    etcd, parse_entry, Address, AdminState, Change, Entry, EntryKey, EtcdOptions, Prefixes,
    Registration, Source, SourceStatus, Update, UpdateKind,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use pointsman_testkit::etcd::EtcdServer;
use pointsman_testkit::relay::CutRelay;

const DEADLINE: Duration = Duration::from_secs(15);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A running watcher and what it has sent so far.
struct Watch {
    rx: mpsc::Receiver<Update>,
    status: Arc<SourceStatus>,
    task: JoinHandle<()>,
    /// The watcher's view, built only from the updates it sent.
    view: BTreeMap<EntryKey, Entry>,
}

impl Watch {
    fn start(endpoints: Vec<String>) -> Watch {
        init_tracing();
        let (tx, rx) = mpsc::channel(64);
        let status = Arc::new(SourceStatus::new(Source::Etcd));
        let opts = EtcdOptions::new(endpoints);
        let task = tokio::spawn(etcd::run(opts, tx, status.clone()));
        Watch {
            rx,
            status,
            task,
            view: BTreeMap::new(),
        }
    }

    /// The next update, applied to `view`.
    async fn next(&mut self) -> Update {
        let u = match tokio::time::timeout(DEADLINE, self.rx.recv()).await {
            Ok(Some(u)) => u,
            Ok(None) => panic!("watcher ended"),
            Err(_) => panic!(
                "no update within {DEADLINE:?}; status: {:?}",
                self.status.snapshot()
            ),
        };
        assert_eq!(u.source, Source::Etcd);
        assert!(u.revision.is_some(), "etcd updates carry a revision: {u:?}");
        match &u.kind {
            UpdateKind::Reset(entries) => {
                self.view = entries.iter().map(|e| (e.key(), e.clone())).collect();
            }
            UpdateKind::Changes(changes) => {
                for c in changes {
                    match c {
                        Change::Upsert(e) => {
                            self.view.insert(e.key(), e.clone());
                        }
                        Change::Remove(k) => {
                            self.view.remove(k);
                        }
                    }
                }
            }
        }
        u
    }

    async fn reset(&mut self) -> (i64, Vec<Entry>) {
        let u = self.next().await;
        match u.kind {
            UpdateKind::Reset(entries) => (u.revision.unwrap_or_default(), entries),
            other => panic!("expected a Reset, got {other:?}"),
        }
    }

    async fn changes(&mut self) -> (i64, Vec<Change>) {
        let u = self.next().await;
        match u.kind {
            UpdateKind::Changes(c) => (u.revision.unwrap_or_default(), c),
            other => panic!("expected Changes, got {other:?}"),
        }
    }

    /// Applies updates until the view equals etcd's contents.
    async fn catch_up_with(&mut self, client: &mut Client) {
        let start = Instant::now();
        loop {
            let want = etcd_view(client).await;
            if self.view == want {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "watcher view never matched etcd\n  watcher: {:?}\n  etcd:    {want:?}\n  status: {:?}",
                self.view,
                self.status.snapshot()
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                let _ = self.next().await;
            })
            .await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(etcd: &EtcdServer) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("test client connects")
}

async fn put(client: &mut Client, key: &str, value: &str) -> i64 {
    let resp = client.put(key, value, None).await.expect("put");
    resp.header().expect("header").revision()
}

/// What etcd holds under the default prefixes, parsed the way the watcher
/// parses it (malformed values left out).
async fn etcd_view(client: &mut Client) -> BTreeMap<EntryKey, Entry> {
    let p = Prefixes::default();
    let mut out = BTreeMap::new();
    for prefix in [p.services_dir(), p.pointsman_dir()] {
        let resp = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .expect("get");
        for kv in resp.kvs() {
            let key = kv.key_str().expect("utf-8 key");
            if let Ok(Some(e)) = parse_entry(&p, key, kv.value()) {
                out.insert(e.key(), e);
            }
        }
    }
    out
}

async fn wait_for(what: &str, status: &SourceStatus, cond: impl Fn(&SourceStatus) -> bool) {
    let start = Instant::now();
    while !cond(status) {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}; status: {:?}",
            status.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn instance(service: &str, id: &str, host: &str, port: u16) -> Entry {
    Entry::Instance(Registration::new(service, id, Address::new(host, port)))
}

fn upsert(service: &str, id: &str, host: &str, port: u16) -> Change {
    Change::Upsert(instance(service, id, host, port))
}

fn remove(service: &str, id: &str) -> Change {
    Change::Remove(EntryKey::Instance {
        service: service.into(),
        id: id.into(),
    })
}

#[tokio::test]
async fn initial_listing_is_one_reset_at_one_revision() {
    let etcd = EtcdServer::start();
    let mut c = connect(&etcd).await;
    put(&mut c, "/services/web/a1", "127.0.0.1:8081").await;
    put(
        &mut c,
        "/services/web/a2",
        r#"{"address":"127.0.0.1:8082","weight":100,"state":"drain","tags":["green"]}"#,
    )
    .await;
    put(
        &mut c,
        "/pointsman/routes/blog",
        r#"{"path_prefix":"/blog","service":"blog"}"#,
    )
    .await;
    put(&mut c, "/pointsman/maps/colour/example.com", "green").await;
    put(&mut c, "/pointsman/overrides/web/a1", r#"{"weight":10}"#).await;
    put(
        &mut c,
        "/pointsman/proxies/p1",
        r#"{"admin":"127.0.0.1:8404"}"#,
    )
    .await;
    put(&mut c, "/other/thing", "ignored").await;
    let last = put(&mut c, "/services/api/b1", "10.0.0.1:80").await;

    let mut w = Watch::start(vec![etcd.endpoint()]);
    let (rev, entries) = w.reset().await;
    assert_eq!(rev, last);
    let keys: Vec<String> = entries.iter().map(|e| e.key().to_string()).collect();
    assert_eq!(
        keys,
        [
            "instance api/b1",
            "instance web/a1",
            "instance web/a2",
            "route blog",
            "map colour/example.com",
            "override web/a1",
        ]
    );
    let Some(Entry::Instance(a2)) = w.view.get(&EntryKey::Instance {
        service: "web".into(),
        id: "a2".into(),
    }) else {
        panic!("web/a2 missing")
    };
    assert_eq!((a2.weight, a2.state), (100, AdminState::Drain));
    assert!(w.status.is_connected() && w.status.has_synced());
    assert_eq!(w.status.seen_revision(), Some(last));
    assert_eq!(w.status.malformed(), 0);
}

#[tokio::test]
async fn put_is_upsert_and_delete_is_remove() {
    let etcd = EtcdServer::start();
    let mut c = connect(&etcd).await;
    let mut w = Watch::start(vec![etcd.endpoint()]);
    let (_, entries) = w.reset().await;
    assert!(entries.is_empty());

    let rev = put(&mut c, "/services/web/a1", "127.0.0.1:8081").await;
    assert_eq!(
        w.changes().await,
        (rev, vec![upsert("web", "a1", "127.0.0.1", 8081)])
    );

    // Keys outside the contract produce nothing: the next update is the
    // next real change.
    put(&mut c, "/pointsman/proxies/p1", "{}").await;
    put(&mut c, "/other/x", "y").await;
    let rev = put(&mut c, "/services/web/a1", "127.0.0.1:9091").await;
    assert_eq!(
        w.changes().await,
        (rev, vec![upsert("web", "a1", "127.0.0.1", 9091)])
    );

    let resp = c.delete("/services/web/a1", None).await.expect("delete");
    let rev = resp.header().expect("header").revision();
    assert_eq!(w.changes().await, (rev, vec![remove("web", "a1")]));
    assert_eq!(w.status.seen_revision(), Some(rev));
}

#[tokio::test]
async fn lease_expiry_removes_the_instance() {
    let etcd = EtcdServer::start();
    let mut c = connect(&etcd).await;
    let mut w = Watch::start(vec![etcd.endpoint()]);
    w.reset().await;

    let lease = c.lease_grant(2, None).await.expect("lease grant").id();
    c.put(
        "/services/web/a1",
        "127.0.0.1:8081",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put with lease");
    assert_eq!(
        w.changes().await.1,
        vec![upsert("web", "a1", "127.0.0.1", 8081)]
    );
    // No keepalive: the lease runs out and etcd deletes the key.
    let started = Instant::now();
    assert_eq!(w.changes().await.1, vec![remove("web", "a1")]);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_transaction_arrives_as_one_update() {
    let etcd = EtcdServer::start();
    let mut c = connect(&etcd).await;
    put(&mut c, "/services/web-blue/b1", "127.0.0.1:8081").await;
    put(&mut c, "/pointsman/maps/colour/example.com", "web-blue").await;
    let mut w = Watch::start(vec![etcd.endpoint()]);
    assert_eq!(w.reset().await.1.len(), 2);

    // Blue/green switch: new instance, map flipped, old instance drained,
    // all in one revision.
    let txn = Txn::new().and_then([
        TxnOp::put("/services/web-green/g1", "127.0.0.1:8082", None),
        TxnOp::put("/pointsman/maps/colour/example.com", "web-green", None),
        TxnOp::put(
            "/pointsman/overrides/web-blue/b1",
            r#"{"state":"drain"}"#,
            None,
        ),
        TxnOp::put("/pointsman/proxies/p1", "{}", None),
    ]);
    let resp = c.txn(txn).await.expect("txn");
    let rev = resp.header().expect("header").revision();
    let (got_rev, changes) = w.changes().await;
    assert_eq!(got_rev, rev);
    let keys: Vec<String> = changes
        .iter()
        .map(|c| match c {
            Change::Upsert(e) => e.key().to_string(),
            Change::Remove(k) => format!("-{k}"),
        })
        .collect();
    assert_eq!(
        keys,
        [
            "instance web-green/g1",
            "map colour/example.com",
            "override web-blue/b1"
        ]
    );
}

#[tokio::test]
async fn restart_mid_watch_loses_nothing() {
    let mut etcd = EtcdServer::start();
    let mut c = connect(&etcd).await;
    put(&mut c, "/services/web/a1", "127.0.0.1:8081").await;
    put(&mut c, "/services/web/a2", "127.0.0.1:8082").await;
    // The relay lets the test hold the watcher off after the restart, so
    // the writes below certainly happen while it is reconnecting.
    let relay = CutRelay::start(etcd.client_port()).await;
    let mut w = Watch::start(vec![relay.endpoint()]);
    w.reset().await;
    put(&mut c, "/services/web/a3", "127.0.0.1:8083").await;
    w.changes().await;

    etcd.stop();
    wait_for("disconnected after stop", &w.status, |s| !s.is_connected()).await;
    relay.cut();
    etcd.restart();
    let mut c = connect(&etcd).await;
    put(&mut c, "/services/web/a4", "127.0.0.1:8084").await;
    c.delete("/services/web/a1", None).await.expect("delete");
    put(&mut c, "/services/web/a2", "127.0.0.1:9092").await;
    put(&mut c, "/pointsman/maps/colour/example.com", "web").await;
    assert!(!w.status.is_connected());
    relay.heal();

    w.catch_up_with(&mut c).await;
    wait_for("connected again", &w.status, |s| s.is_connected()).await;
    let status = w.status.snapshot();
    assert!(status.reconnects >= 1, "{status:?}");
    // Resumed after the last revision seen, not re-listed.
    assert_eq!(status.resets, 1, "{status:?}");
    assert!(status.last_error.is_some());
}

#[tokio::test]
async fn compaction_while_cut_off_relists_and_keeps_last_good() {
    let etcd = EtcdServer::start();
    let mut c = connect(&etcd).await;
    put(&mut c, "/services/web/a1", "127.0.0.1:8081").await;
    put(&mut c, "/services/web/a2", "127.0.0.1:8082").await;
    let relay = CutRelay::start(etcd.client_port()).await;
    let mut w = Watch::start(vec![relay.endpoint()]);
    w.reset().await;

    relay.cut();
    wait_for("disconnected after cut", &w.status, |s| !s.is_connected()).await;
    put(&mut c, "/services/web/a3", "127.0.0.1:8083").await;
    c.delete("/services/web/a2", None).await.expect("delete");
    // a1 turns malformed: the re-list must keep its last good value.
    put(&mut c, "/services/web/a1", "no-port-here").await;
    let rev = put(&mut c, "/pointsman/maps/colour/example.com", "web").await;
    c.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    relay.heal();

    let (reset_rev, entries) = w.reset().await;
    assert_eq!(reset_rev, rev);
    let keys: Vec<String> = entries.iter().map(|e| e.key().to_string()).collect();
    assert_eq!(
        keys,
        [
            "instance web/a1",
            "instance web/a3",
            "map colour/example.com"
        ]
    );
    assert!(entries.contains(&instance("web", "a1", "127.0.0.1", 8081)));
    assert_eq!(w.status.resets(), 2);
    assert_eq!(w.status.malformed(), 1);

    // And it watches on from the new listing.
    let rev = put(&mut c, "/services/web/a4", "127.0.0.1:8084").await;
    assert_eq!(
        w.changes().await,
        (rev, vec![upsert("web", "a4", "127.0.0.1", 8084)])
    );
}

#[tokio::test]
async fn malformed_values_are_counted_and_skipped() {
    let etcd = EtcdServer::start();
    let mut c = connect(&etcd).await;
    put(
        &mut c,
        "/services/web/bad0",
        r#"{"address":"127.0.0.1:1","colour":"red"}"#,
    )
    .await;
    put(&mut c, "/services/web/a1", "127.0.0.1:8081").await;
    let mut w = Watch::start(vec![etcd.endpoint()]);
    let (_, entries) = w.reset().await;
    assert_eq!(entries, vec![instance("web", "a1", "127.0.0.1", 8081)]);
    assert_eq!(w.status.malformed(), 1);
    assert!(w
        .status
        .last_error()
        .is_some_and(|e| e.contains("/services/web/bad0") && e.contains("unknown field `colour`")));

    // A bad put on a good key: nothing sent, last good kept, counted.
    put(
        &mut c,
        "/services/web/a1",
        r#"{"address":"127.0.0.1:8081","weight":9000}"#,
    )
    .await;
    put(&mut c, "/pointsman/routes/r", r#"{"path_prefix":"/"}"#).await;
    wait_for("malformed counted", &w.status, |s| s.malformed() >= 3).await;
    assert!(w
        .status
        .last_error()
        .is_some_and(|e| e.contains("/pointsman/routes/r")));

    // Other keys still flow, and the next update is only theirs.
    let rev = put(&mut c, "/services/web/a2", "127.0.0.1:8082").await;
    assert_eq!(
        w.changes().await,
        (rev, vec![upsert("web", "a2", "127.0.0.1", 8082)])
    );
    assert!(w.view.contains_key(&EntryKey::Instance {
        service: "web".into(),
        id: "a1".into()
    }));
    assert!(w.status.is_connected());
}

#[tokio::test]
async fn frozen_etcd_is_noticed_and_recovered() {
    let mut etcd = EtcdServer::start();
    let mut c = connect(&etcd).await;
    let mut w = Watch::start(vec![etcd.endpoint()]);
    w.reset().await;

    etcd.freeze();
    let frozen_at = Instant::now();
    wait_for("disconnected while frozen", &w.status, |s| {
        !s.is_connected()
    })
    .await;
    let noticed = frozen_at.elapsed();
    assert!(
        noticed < Duration::from_secs(10),
        "noticed after {noticed:?}"
    );
    assert!(w
        .status
        .staleness()
        .is_some_and(|s| s >= Duration::from_secs(2)));
    etcd.thaw();

    let rev = put(&mut c, "/services/web/a1", "127.0.0.1:8081").await;
    w.catch_up_with(&mut c).await;
    wait_for("connected after thaw", &w.status, |s| s.is_connected()).await;
    assert!(w.status.seen_revision() >= Some(rev));
}

#[tokio::test]
async fn an_idle_watch_keeps_confirming_sync() {
    let etcd = EtcdServer::start();
    let mut w = Watch::start(vec![etcd.endpoint()]);
    w.reset().await;
    // Time passing is the point here: nothing changes for 4 s, yet the
    // watcher must keep confirming that its view is current, so staleness
    // stays far below the time since the listing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    wait_for("fresh sync while idle", &w.status, |s| {
        s.staleness().is_some_and(|d| d < Duration::from_secs(2))
    })
    .await;
    assert!(w.status.is_connected());
    assert_eq!(w.status.reconnects(), 0);
}

#[tokio::test]
async fn a_dead_endpoint_in_the_list_is_skipped() {
    let etcd = EtcdServer::start();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://127.0.0.1:{}", l.local_addr().expect("addr").port())
    };
    let mut c = connect(&etcd).await;
    let mut w = Watch::start(vec![dead, etcd.endpoint()]);
    w.reset().await;
    let rev = put(&mut c, "/services/web/a1", "127.0.0.1:8081").await;
    assert_eq!(
        w.changes().await,
        (rev, vec![upsert("web", "a1", "127.0.0.1", 8081)])
    );
}

#[tokio::test]
async fn ends_when_the_receiver_is_dropped() {
    let etcd = EtcdServer::start();
    let mut w = Watch::start(vec![etcd.endpoint()]);
    w.reset().await;
    let Watch { rx, task, .. } = &mut w;
    let (_, closed) = mpsc::channel(1);
    drop(std::mem::replace(rx, closed));
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("watcher did not stop")
        .expect("watcher panicked");
}
