//! The Consul watcher and registrar against the Consul test double (a real
//! HTTP server on loopback, `pointsman_testkit::consul`): what a proxy sees when
//! instances register, fail their checks, deregister, carry routes in their
//! tags; when Consul's index goes backwards, Consul goes away and comes
//! back, or refuses the token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pointsman_discovery::consul::{self, Agent, AgentCheck, AgentService, ConsulError, TtlStatus};
use pointsman_discovery::{
    Address, AdminState, Change, ConsulOptions, Entry, EntryKey, Registration, RouteSpec, Source,
    SourceStatus, Update, UpdateKind,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use pointsman_testkit::consul::{ConsulDouble, Health};

const DEADLINE: Duration = Duration::from_secs(10);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Options for tests: short waits and backoff so failures show quickly.
fn options(urls: Vec<String>) -> ConsulOptions {
    ConsulOptions {
        wait: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..ConsulOptions::new(urls)
    }
}

/// A running watcher and what it has sent so far.
struct Watch {
    rx: mpsc::Receiver<Update>,
    status: Arc<SourceStatus>,
    task: JoinHandle<()>,
    /// The watcher's view, built only from the updates it sent.
    view: BTreeMap<EntryKey, Entry>,
    revisions: Vec<i64>,
}

impl Watch {
    fn start(opts: ConsulOptions) -> Watch {
        init_tracing();
        let (tx, rx) = mpsc::channel(64);
        let status = Arc::new(SourceStatus::new(Source::Consul));
        let task = tokio::spawn(consul::run(opts, tx, status.clone()));
        Watch {
            rx,
            status,
            task,
            view: BTreeMap::new(),
            revisions: Vec::new(),
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
        assert_eq!(u.source, Source::Consul);
        let rev = u.revision.expect("Consul updates carry a revision");
        self.revisions.push(rev);
        match &u.kind {
            UpdateKind::Reset(entries) => {
                self.view = entries.iter().map(|e| (e.key(), e.clone())).collect();
            }
            UpdateKind::Changes(changes) => {
                assert!(!changes.is_empty(), "an empty Changes was sent");
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

    async fn reset(&mut self) -> Vec<Entry> {
        match self.next().await.kind {
            UpdateKind::Reset(entries) => entries,
            other => panic!("expected a Reset, got {other:?}"),
        }
    }

    async fn changes(&mut self) -> Vec<Change> {
        match self.next().await.kind {
            UpdateKind::Changes(c) => c,
            other => panic!("expected Changes, got {other:?}"),
        }
    }

    /// Applies updates until `pred` holds for the view.
    async fn until(&mut self, what: &str, pred: impl Fn(&BTreeMap<EntryKey, Entry>) -> bool) {
        let start = Instant::now();
        while !pred(&self.view) {
            assert!(
                start.elapsed() < DEADLINE,
                "{what}: never happened; view: {:?}; status: {:?}",
                self.view.keys(),
                self.status.snapshot()
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                let _ = self.next().await;
            })
            .await;
        }
    }

    /// Asserts that nothing is sent for `d`.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(Some(u)) = tokio::time::timeout(d, self.rx.recv()).await {
            panic!("expected no update, got {u:?}");
        }
    }

    /// Waits until the watcher has failed once more (it counts and retries
    /// every failure), then checks that it has sent nothing: whatever a
    /// failed attempt sends is on the channel before the failure is
    /// counted.
    async fn fails_again_and_sends_nothing(&mut self) {
        let status = self.status.clone();
        let failed = status.reconnects();
        eventually("another failed attempt", || status.reconnects() > failed).await;
        if let Ok(u) = self.rx.try_recv() {
            panic!("expected no update, got {u:?}");
        }
    }

    fn instance(&self, service: &str, id: &str) -> Option<Registration> {
        instance(&self.view, service, id)
    }

    fn route(&self, name: &str) -> Option<RouteSpec> {
        match self.view.get(&EntryKey::Route { name: name.into() }) {
            Some(Entry::Route { spec, .. }) => Some(spec.clone()),
            _ => None,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn instance(view: &BTreeMap<EntryKey, Entry>, service: &str, id: &str) -> Option<Registration> {
    match view.get(&EntryKey::Instance {
        service: service.into(),
        id: id.into(),
    }) {
        Some(Entry::Instance(r)) => Some(r.clone()),
        _ => None,
    }
}

fn key(service: &str, id: &str) -> EntryKey {
    EntryKey::Instance {
        service: service.into(),
        id: id.into(),
    }
}

/// An agent registration body.
fn svc(
    name: &str,
    id: &str,
    address: &str,
    port: u16,
    tags: &[&str],
    meta: &[(&str, &str)],
) -> Value {
    let meta: BTreeMap<&str, &str> = meta.iter().copied().collect();
    json!({"ID": id, "Name": name, "Address": address, "Port": port, "Tags": tags, "Meta": meta})
}

fn with_ttl(mut body: Value, ttl: &str) -> Value {
    body["Check"] = json!({"TTL": ttl});
    body
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "{what}: never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn instances_appear_change_and_leave() {
    let consul = ConsulDouble::start();
    consul.register(svc(
        "web",
        "web-1",
        "10.0.0.5",
        9001,
        &["green"],
        &[("version", "2"), ("pointsman-weight", "10")],
    ));
    let mut w = Watch::start(options(vec![consul.url()]));
    let entries = w.reset().await;
    assert_eq!(entries.len(), 2, "web-1 and Consul itself: {entries:?}");
    let web1 = w.instance("web", "web-1").expect("web-1 in the Reset");
    assert_eq!(web1.address, Address::new("10.0.0.5", 9001));
    assert_eq!(web1.weight, 10);
    assert_eq!(web1.state, AdminState::Ready);
    assert_eq!(web1.tags, vec!["green".to_string()]);
    assert_eq!(web1.meta.get("version").map(String::as_str), Some("2"));
    // The `consul` service has no address of its own: the node's.
    assert_eq!(
        w.instance("consul", "consul").map(|r| r.address),
        Some(Address::new("127.0.0.1", 8300))
    );
    let first = w.revisions[0];
    assert!(first >= 1);
    assert!(w.status.is_connected());
    assert!(w.status.has_synced());
    assert_eq!(w.status.resets(), 1);
    assert_eq!(w.status.seen_revision(), Some(first));

    // A new instance without an address of its own.
    let index = consul.register(svc("web", "web-2", "", 9002, &[], &[]));
    let changes = w.changes().await;
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        w.instance("web", "web-2").map(|r| r.address),
        Some(Address::new("127.0.0.1", 9002))
    );
    let rev = *w.revisions.last().unwrap();
    assert_eq!(rev, index as i64, "the revision is Consul's index");
    assert_eq!(w.status.seen_revision(), Some(rev));

    // A change of meta: the same key, new weight and state.
    consul.register(svc(
        "web",
        "web-2",
        "",
        9002,
        &[],
        &[("pointsman-weight", "0"), ("pointsman-state", "drain")],
    ));
    let changes = w.changes().await;
    assert!(
        matches!(changes.as_slice(), [Change::Upsert(Entry::Instance(r))] if r.weight == 0 && r.state == AdminState::Drain),
        "{changes:?}"
    );

    // Deregistered through the agent API.
    let agent = Agent::new(&options(vec![consul.url()])).unwrap();
    agent.deregister("web-1").await.unwrap();
    let changes = w.changes().await;
    assert_eq!(changes, vec![Change::Remove(key("web", "web-1"))]);
    // The last instance of a service leaves: the service is gone too.
    agent.deregister("web-2").await.unwrap();
    w.until("web-2 removed", |v| instance(v, "web", "web-2").is_none())
        .await;
    assert_eq!(w.view.len(), 1, "only Consul itself is left: {:?}", w.view);
    assert_eq!(w.status.malformed(), 0);
    assert!(
        w.revisions.windows(2).all(|p| p[0] <= p[1]),
        "{:?}",
        w.revisions
    );
}

#[tokio::test]
async fn an_instance_whose_check_fails_is_not_routable() {
    let consul = ConsulDouble::start();
    consul.register(with_ttl(
        svc("web", "web-1", "127.0.0.1", 9001, &["urlprefix-/web"], &[]),
        "30s",
    ));
    let mut w = Watch::start(options(vec![consul.url()]));
    w.reset().await;
    // A new check starts critical: not routable, but its route is there
    // (so requests get a 503 rather than another route's answer).
    assert_eq!(w.instance("web", "web-1"), None);
    assert_eq!(
        w.route("consul:%2Fweb").and_then(|r| r.service),
        Some("web".to_string())
    );

    let agent = Agent::new(&options(vec![consul.url()])).unwrap();
    agent
        .update_ttl("service:web-1", TtlStatus::Pass, Some("up"))
        .await
        .unwrap();
    let changes = w.changes().await;
    assert!(
        matches!(changes.as_slice(), [Change::Upsert(Entry::Instance(r))] if r.id == "web-1"),
        "{changes:?}"
    );

    consul.set_check_status("service:web-1", Health::Critical);
    let changes = w.changes().await;
    assert_eq!(changes, vec![Change::Remove(key("web", "web-1"))]);
    assert!(w.route("consul:%2Fweb").is_some(), "the route stays");

    // Warning is not passing either (Consul's `?passing`).
    consul.set_check_status("service:web-1", Health::Passing);
    w.until("web-1 back", |v| instance(v, "web", "web-1").is_some())
        .await;
    agent
        .update_ttl("service:web-1", TtlStatus::Warn, None)
        .await
        .unwrap();
    w.until("web-1 out on warning", |v| {
        instance(v, "web", "web-1").is_none()
    })
    .await;

    // A failing node check takes every instance on the node out.
    consul.set_check_status("service:web-1", Health::Passing);
    w.until("web-1 back again", |v| {
        instance(v, "web", "web-1").is_some()
    })
    .await;
    consul.set_check_status("serfHealth", Health::Critical);
    w.until("node down", |v| {
        instance(v, "web", "web-1").is_none() && instance(v, "consul", "consul").is_none()
    })
    .await;
    consul.set_check_status("serfHealth", Health::Passing);
    w.until("node up", |v| instance(v, "web", "web-1").is_some())
        .await;
}

#[tokio::test]
async fn a_ttl_that_runs_out_takes_the_instance_out() {
    let consul = ConsulDouble::start();
    consul.register(with_ttl(
        svc("web", "web-1", "127.0.0.1", 9001, &[], &[]),
        "1s",
    ));
    let agent = Agent::new(&options(vec![consul.url()])).unwrap();
    agent
        .update_ttl("service:web-1", TtlStatus::Pass, None)
        .await
        .unwrap();
    let mut w = Watch::start(options(vec![consul.url()]));
    w.reset().await;
    assert!(w.instance("web", "web-1").is_some());
    // Passing for as long as it is kept alive (passes that change nothing
    // send nothing)...
    for _ in 0..8 {
        agent
            .update_ttl("service:web-1", TtlStatus::Pass, None)
            .await
            .unwrap();
        w.quiet(Duration::from_millis(200)).await;
    }
    // ...then it expires.
    let passed = Instant::now();
    let changes = w.changes().await;
    assert_eq!(changes, vec![Change::Remove(key("web", "web-1"))]);
    assert!(
        passed.elapsed() >= Duration::from_millis(700),
        "{:?}",
        passed.elapsed()
    );
    assert_eq!(
        consul.check("service:web-1").map(|c| c.output),
        Some("TTL expired".to_string())
    );
}

#[tokio::test]
async fn an_index_that_goes_backwards_is_reset_and_the_view_relisted() {
    let consul = ConsulDouble::start();
    consul.register(svc("web", "web-1", "127.0.0.1", 9001, &[], &[]));
    // Things after the restore must show up sooner than this wait: only a
    // query that was blocked when the restore happened, or one sent with
    // a reset index, can answer before it.
    let opts = ConsulOptions {
        wait: Duration::from_secs(4),
        ..options(vec![consul.url()])
    };
    let mut w = Watch::start(opts);
    w.reset().await;
    let before = consul.snapshot();
    for i in 2..=4 {
        consul.register(svc(
            "web",
            &format!("web-{i}"),
            "127.0.0.1",
            9000 + i,
            &[],
            &[],
        ));
    }
    w.until("web-2..4 seen", |v| instance(v, "web", "web-4").is_some())
        .await;
    let high = *w.revisions.last().unwrap();
    // Every query must block again first: Consul releases blocked queries
    // on a restore; one that arrives later with the old index waits for
    // `wait`. The last registration moved both queries' index to Consul's.
    let index = consul.index().to_string();
    eventually("both queries block at the new index", || {
        let asked = consul.requests();
        ["/v1/catalog/services", "/v1/health/service/web"]
            .iter()
            .all(|path| {
                asked
                    .iter()
                    .any(|r| r.path == *path && r.query.get("index") == Some(&index))
            })
    })
    .await;

    let started = Instant::now();
    consul.restore(&before);
    let entries = w.reset().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        entries
            .iter()
            .all(|e| !matches!(e, Entry::Instance(r) if r.id != "web-1" && r.service == "web")),
        "the restored view has only web-1: {entries:?}"
    );
    assert!(w.instance("web", "web-1").is_some());
    let low = *w.revisions.last().unwrap();
    assert!(
        low < high,
        "the Reset carries the restored (lower) index: {low} vs {high}"
    );
    assert_eq!(w.status.seen_revision(), Some(low));
    assert_eq!(w.status.resets(), 2);

    // The index now counts from the snapshot's, below what was seen; a
    // watcher that kept its old index would not hear of this for 4 s.
    let started = Instant::now();
    let index = consul.register(svc("web", "web-9", "127.0.0.1", 9009, &[], &[]));
    assert!((index as i64) < high);
    let changes = w.changes().await;
    assert!(
        matches!(changes.as_slice(), [Change::Upsert(Entry::Instance(r))] if r.id == "web-9"),
        "{changes:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(w.status.is_connected());
}

#[tokio::test]
async fn consul_down_keeps_the_view_and_relists_when_back() {
    let mut consul = ConsulDouble::start();
    consul.register(svc(
        "web",
        "web-1",
        "127.0.0.1",
        9001,
        &["urlprefix-/"],
        &[],
    ));
    let mut w = Watch::start(options(vec![consul.url()]));
    w.reset().await;
    assert!(w.status.is_connected());

    consul.stop();
    let status = w.status.clone();
    eventually("disconnected", || !status.is_connected()).await;
    let error = w.status.last_error().unwrap_or_default();
    assert!(error.contains(&consul.url()), "{error}");
    // Nothing is sent while Consul is away: above all no empty Reset.
    w.fails_again_and_sends_nothing().await;
    assert!(w.status.reconnects() >= 1);
    assert!(w.instance("web", "web-1").is_some());

    // Registered while the watcher could not see it.
    consul.register(svc("web", "web-2", "127.0.0.1", 9002, &[], &[]));
    consul.restart();
    let entries = w.reset().await;
    let ids: Vec<String> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Instance(r) if r.service == "web" => Some(r.id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec!["web-1", "web-2"]);
    assert!(w.route("consul:%2F").is_some());
    assert!(w.status.is_connected());
    assert_eq!(w.status.resets(), 2);

    // And it follows again.
    consul.register(svc("web", "web-3", "127.0.0.1", 9003, &[], &[]));
    let changes = w.changes().await;
    assert!(
        matches!(changes.as_slice(), [Change::Upsert(Entry::Instance(r))] if r.id == "web-3"),
        "{changes:?}"
    );
}

#[tokio::test]
async fn routes_come_from_urlprefix_tags() {
    let consul = ConsulDouble::start();
    consul.register(svc(
        "blog",
        "blog-1",
        "127.0.0.1",
        9001,
        &["urlprefix-example.com/blog strip=/blog"],
        &[],
    ));
    consul.register(svc(
        "shop-a",
        "a-1",
        "127.0.0.1",
        9002,
        &["urlprefix-/shop"],
        &[],
    ));
    consul.register(svc(
        "shop-b",
        "b-1",
        "127.0.0.1",
        9003,
        &["urlprefix-/shop weight=0.25"],
        &[],
    ));
    consul.register(svc(
        "db",
        "db-1",
        "127.0.0.1",
        3306,
        &["urlprefix-:3306 proto=tcp"],
        &[],
    ));
    let mut w = Watch::start(options(vec![consul.url()]));
    w.reset().await;

    let blog = w.route("consul:example.com%2Fblog").expect("blog route");
    assert_eq!(blog.host.as_deref(), Some("example.com"));
    assert_eq!(blog.path_prefix, "/blog");
    assert!(blog.strip_prefix);
    assert_eq!(blog.service.as_deref(), Some("blog"));

    let shop = w.route("consul:%2Fshop").expect("shop route");
    assert_eq!(shop.host, None);
    let arms: Vec<(String, u32)> = shop
        .split
        .iter()
        .map(|s| (s.service.clone(), s.weight))
        .collect();
    assert_eq!(arms, vec![("shop-a".into(), 7500), ("shop-b".into(), 2500)]);

    // The TCP route is refused with a reason, once; db itself is there.
    assert!(w.instance("db", "db-1").is_some());
    assert_eq!(w.status.malformed(), 1);
    let error = w.status.last_error().unwrap_or_default();
    assert!(error.contains("TCP route"), "{error}");
    assert_eq!(
        w.view
            .keys()
            .filter(|k| matches!(k, EntryKey::Route { .. }))
            .count(),
        2
    );

    // shop-b leaves: /shop goes to shop-a alone.
    consul.deregister("b-1");
    let changes = w.changes().await;
    assert!(
        changes.contains(&Change::Remove(key("shop-b", "b-1"))),
        "{changes:?}"
    );
    let shop = w.route("consul:%2Fshop").unwrap();
    assert_eq!(shop.service.as_deref(), Some("shop-a"));
    assert!(shop.split.is_empty());

    // blog leaves: its route goes with it.
    consul.deregister("blog-1");
    w.until("blog route gone", |v| {
        !v.contains_key(&EntryKey::Route {
            name: "consul:example.com%2Fblog".into(),
        })
    })
    .await;
    assert_eq!(w.status.malformed(), 1, "nothing new was malformed");
}

#[tokio::test]
async fn a_malformed_instance_is_skipped_and_counted_once() {
    let consul = ConsulDouble::start();
    consul.register(svc(
        "web",
        "web-1",
        "127.0.0.1",
        9001,
        &[],
        &[("pointsman-weight", "300")],
    ));
    consul.register(svc("web", "web-2", "127.0.0.1", 9002, &[], &[]));
    consul.register(svc("web", "web-3", "127.0.0.1", 0, &[], &[]));
    let mut w = Watch::start(options(vec![consul.url()]));
    w.reset().await;
    assert!(w.instance("web", "web-1").is_none());
    assert!(w.instance("web", "web-2").is_some());
    assert!(w.instance("web", "web-3").is_none());
    assert_eq!(w.status.malformed(), 2);
    let error = w.status.last_error().unwrap_or_default();
    assert!(
        error.contains("meta pointsman-weight \"300\" is out of range: expected 0 to 256")
            || error.contains("has an invalid port"),
        "{error}"
    );

    // Other changes to the service do not count the same problems again.
    consul.register(svc("web", "web-4", "127.0.0.1", 9004, &[], &[]));
    w.changes().await;
    assert_eq!(w.status.malformed(), 2);

    // Fixed: it arrives.
    consul.register(svc(
        "web",
        "web-1",
        "127.0.0.1",
        9001,
        &[],
        &[("pointsman-weight", "50")],
    ));
    let changes = w.changes().await;
    assert!(
        matches!(changes.as_slice(), [Change::Upsert(Entry::Instance(r))] if r.id == "web-1" && r.weight == 50),
        "{changes:?}"
    );

    // Broken again after a good value: the good value stays in force.
    consul.register(svc(
        "web",
        "web-1",
        "127.0.0.1",
        9001,
        &[],
        &[("pointsman-weight", "lots")],
    ));
    let status = w.status.clone();
    eventually("counted", || status.malformed() == 3).await;
    assert_eq!(w.instance("web", "web-1").map(|r| r.weight), Some(50));
    assert!(w
        .status
        .last_error()
        .unwrap_or_default()
        .contains("\"lots\" is not a number"));
}

#[tokio::test]
async fn a_refused_token_is_a_clear_error_and_nothing_is_sent() {
    let consul = ConsulDouble::with_token("s3cret");
    consul.register(svc("web", "web-1", "127.0.0.1", 9001, &[], &[]));

    let mut wrong = Watch::start(ConsulOptions {
        token: Some("wrong".into()),
        ..options(vec![consul.url()])
    });
    let status = wrong.status.clone();
    eventually("refused", || status.last_error().is_some()).await;
    wrong.fails_again_and_sends_nothing().await;
    let error = wrong.status.last_error().unwrap_or_default();
    assert!(
        error.contains("403") && error.contains("ACL not found") && error.contains("token"),
        "{error}"
    );
    assert!(!wrong.status.is_connected());
    assert!(!wrong.status.has_synced());
    drop(wrong);

    let mut right = Watch::start(ConsulOptions {
        token: Some("s3cret".into()),
        ..options(vec![consul.url()])
    });
    right.reset().await;
    assert!(right.instance("web", "web-1").is_some());
    assert!(consul
        .requests()
        .iter()
        .any(|r| r.path == "/v1/catalog/services" && r.token.as_deref() == Some("s3cret")));
    drop(right);

    // No token at all: Consul filters everything away and says so.
    let mut anonymous = Watch::start(options(vec![consul.url()]));
    let entries = anonymous.reset().await;
    assert!(entries.is_empty());
    let error = anonymous.status.last_error().unwrap_or_default();
    assert!(error.contains("filtered by ACLs"), "{error}");
}

#[tokio::test]
async fn a_sub_second_wait_is_sent_and_honoured() {
    let consul = ConsulDouble::start();
    consul.register(svc("web", "web-1", "127.0.0.1", 9001, &[], &[]));
    let mut w = Watch::start(ConsulOptions {
        wait: Duration::from_millis(200),
        ..options(vec![consul.url()])
    });
    w.reset().await;
    let since = Instant::now();
    // Idle: blocking queries time out and come back unchanged, silently.
    w.quiet(Duration::from_millis(1300)).await;
    let blocking: Vec<_> = consul
        .requests()
        .into_iter()
        .filter(|r| {
            r.path == "/v1/catalog/services" && r.query.contains_key("index") && r.at >= since
        })
        .collect();
    assert!(blocking
        .iter()
        .all(|r| r.query.get("wait").map(String::as_str) == Some("200ms")));
    // About one per 200 ms (plus Consul's jitter): not 0s (no blocking,
    // a tight loop) nor 5 minutes.
    assert!(
        (3..=9).contains(&blocking.len()),
        "{} blocking catalog queries in 1.3 s",
        blocking.len()
    );
    let staleness = w.status.staleness().unwrap();
    assert!(staleness < Duration::from_millis(700), "{staleness:?}");

    consul.register(svc("web", "web-2", "127.0.0.1", 9002, &[], &[]));
    w.changes().await;
    assert!(w.instance("web", "web-2").is_some());
}

#[tokio::test]
async fn several_urls_fail_over_and_the_datacenter_is_sent() {
    let consul = ConsulDouble::start();
    consul.register(svc("web", "web-1", "127.0.0.1", 9001, &[], &[]));
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut w = Watch::start(ConsulOptions {
        datacenter: Some("dc1".into()),
        ..options(vec![dead.clone(), consul.url()])
    });
    w.reset().await;
    assert!(w.instance("web", "web-1").is_some());
    assert!(w.status.reconnects() >= 1);
    assert!(consul
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v1/health/") || r.path.starts_with("/v1/catalog/"))
        .all(|r| r.query.get("dc").map(String::as_str) == Some("dc1")));
    drop(w);

    let mut elsewhere = Watch::start(ConsulOptions {
        datacenter: Some("dc9".into()),
        ..options(vec![consul.url()])
    });
    let status = elsewhere.status.clone();
    eventually("refused", || status.last_error().is_some()).await;
    elsewhere.fails_again_and_sends_nothing().await;
    let error = elsewhere.status.last_error().unwrap_or_default();
    assert!(error.contains("No path to datacenter"), "{error}");
}

#[tokio::test]
async fn the_registrar_registers_keeps_alive_drains_and_deregisters() {
    let consul = ConsulDouble::start();
    let opts = options(vec![consul.url()]);
    let agent = Agent::new(&opts).unwrap();
    let mut w = Watch::start(opts.clone());
    w.reset().await;

    let mut reg = Registration::new("web", "web-1", Address::new("127.0.0.1", 9001));
    reg.weight = 20;
    reg.tags = vec!["urlprefix-/".into()];
    reg.meta.insert("version".into(), "7".into());
    let mut service = AgentService::from_registration(
        &reg,
        Some(AgentCheck::Ttl {
            ttl: Duration::from_secs(10),
            deregister_critical_after: Some(Duration::from_secs(90)),
        }),
    );
    agent.register(&service).await.unwrap();
    let record = consul.service("web-1").expect("registered");
    assert_eq!(record.name, "web");
    assert_eq!(record.address, "127.0.0.1");
    assert_eq!(record.port, 9001);
    assert_eq!(record.tags, vec!["urlprefix-/".to_string()]);
    assert_eq!(
        record.meta.get("pointsman-weight").map(String::as_str),
        Some("20")
    );
    assert_eq!(
        record.meta.get("pointsman-state").map(String::as_str),
        Some("ready")
    );
    assert_eq!(record.meta.get("version").map(String::as_str), Some("7"));
    let check = consul.check(&service.check_id()).expect("its TTL check");
    assert_eq!(check.kind, "ttl");
    assert_eq!(
        check.status,
        Health::Critical,
        "a new check starts critical"
    );
    assert_eq!(check.definition["TTL"], "10s");
    assert_eq!(check.definition["DeregisterCriticalServiceAfter"], "90s");

    agent
        .update_ttl(&service.check_id(), TtlStatus::Pass, Some("serving"))
        .await
        .unwrap();
    assert_eq!(
        consul.check("service:web-1").map(|c| c.status),
        Some(Health::Passing)
    );
    w.until("web-1 routable", |v| instance(v, "web", "web-1").is_some())
        .await;
    assert_eq!(w.instance("web", "web-1").map(|r| r.weight), Some(20));

    // Drain: re-registered with pointsman-state drain; the check keeps
    // passing, so the proxy sees a draining instance, not a dead one.
    agent
        .set_state(&mut service, AdminState::Drain)
        .await
        .unwrap();
    assert_eq!(service.state, AdminState::Drain);
    assert_eq!(
        consul
            .service("web-1")
            .and_then(|s| s.meta.get("pointsman-state").cloned()),
        Some("drain".to_string())
    );
    assert_eq!(
        consul.check("service:web-1").map(|c| c.status),
        Some(Health::Passing)
    );
    w.until("web-1 draining", |v| {
        instance(v, "web", "web-1").is_some_and(|r| r.state == AdminState::Drain)
    })
    .await;

    agent.deregister("web-1").await.unwrap();
    assert!(consul.service("web-1").is_none());
    assert!(consul.check("service:web-1").is_none());
    w.until("web-1 gone", |v| instance(v, "web", "web-1").is_none())
        .await;

    // What the agent refuses comes back as an error with Consul's words.
    let err = agent.deregister("web-1").await.unwrap_err();
    assert!(
        matches!(&err, ConsulError::Http(e) if e.status().map(|s| s.as_u16()) == Some(404)),
        "{err}"
    );
    assert!(err.to_string().contains("Unknown service ID"), "{err}");
    let err = agent
        .update_ttl("service:nope", TtlStatus::Pass, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Unknown check ID"), "{err}");

    // An HTTP check is registered with its timings.
    let http = AgentService {
        check: Some(AgentCheck::Http {
            url: "http://127.0.0.1:9002/healthz".into(),
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            deregister_critical_after: Some(Duration::from_secs(60)),
        }),
        ..AgentService::from_registration(
            &Registration::new("api", "api-1", Address::new("127.0.0.1", 9002)),
            None,
        )
    };
    agent.register(&http).await.unwrap();
    let check = consul.check("service:api-1").expect("its HTTP check");
    assert_eq!(check.kind, "http");
    assert_eq!(check.definition["HTTP"], "http://127.0.0.1:9002/healthz");
    assert_eq!(check.definition["Interval"], "500ms");
    assert_eq!(check.definition["Timeout"], "1s");
    assert_eq!(check.definition["DeregisterCriticalServiceAfter"], "60s");
    // Not a TTL check: Consul refuses to have it passed by hand.
    let err = agent
        .update_ttl("service:api-1", TtlStatus::Pass, None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("does not have associated TTL"),
        "{err}"
    );
}

#[tokio::test]
async fn the_registrar_sends_the_token() {
    let consul = ConsulDouble::with_token("s3cret");
    let service = AgentService::from_registration(
        &Registration::new("web", "web-1", Address::new("127.0.0.1", 9001)),
        None,
    );
    let anonymous = Agent::new(&options(vec![consul.url()])).unwrap();
    let err = anonymous.register(&service).await.unwrap_err();
    assert!(
        err.to_string().contains("403") && err.to_string().contains("Permission denied"),
        "{err}"
    );
    let wrong = Agent::new(&ConsulOptions {
        token: Some("nope".into()),
        ..options(vec![consul.url()])
    })
    .unwrap();
    let err = wrong.register(&service).await.unwrap_err();
    assert!(err.to_string().contains("ACL not found"), "{err}");
    assert!(consul.service("web-1").is_none());

    let right = Agent::new(&ConsulOptions {
        token: Some("s3cret".into()),
        ..options(vec![consul.url()])
    })
    .unwrap();
    right.register(&service).await.unwrap();
    assert!(consul.service("web-1").is_some());
    right.deregister("web-1").await.unwrap();
    assert!(consul.service("web-1").is_none());
}

#[test]
fn the_double_reads_go_durations() {
    use pointsman_testkit::consul::parse_go_duration as d;
    assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(d("5s"), Some(Duration::from_secs(5)));
    assert_eq!(d("1m"), Some(Duration::from_secs(60)));
    assert_eq!(d("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(d("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(d("0"), Some(Duration::ZERO));
    assert_eq!(d("5"), None);
    assert_eq!(d(""), None);
    assert_eq!(d("5x"), None);
}
