//! The writer driven by commands alone: discovery updates, local changes,
//! health flips and configs go in through `apply_batch_at`, and each test
//! reads the published `RoutingTable`. No listener is bound and no task is
//! started; time is the batch clock the test passes in.

use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use super::*;

/// Binds nothing; refuses every config once `refuse` is set.
struct NoListeners {
    refuse: Arc<AtomicBool>,
}

impl ListenerControl for NoListeners {
    fn reconcile(&mut self, _: &Config) -> Result<(), String> {
        if self.refuse.load(Ordering::Relaxed) {
            Err("listener web: address in use".into())
        } else {
            Ok(())
        }
    }
}

const CONFIG: &str = r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:1"

[services.web]
endpoints = [{ id = "a1", address = "127.0.0.1:9001", weight = 3 }]

[services.slow]
slow_start = "10s"

[services.drained]
drain_timeout = "5s"
"#;

struct Writer {
    control: Control,
    table: SharedTable,
    refuse: Arc<AtomicBool>,
    /// The clock of the next batch.
    now: Instant,
}

impl Writer {
    fn new() -> Writer {
        Writer::with_config(CONFIG)
    }

    fn with_config(text: &str) -> Writer {
        let config = Config::parse("test.toml", text).expect("valid config");
        let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
        let refuse = Arc::new(AtomicBool::new(false));
        let listeners = NoListeners {
            refuse: refuse.clone(),
        };
        let mut control = Control::new(config, table.clone(), Box::new(listeners));
        control.start().expect("start");
        Writer {
            control,
            table,
            refuse,
            now: Instant::now(),
        }
    }

    fn apply(&mut self, cmds: impl IntoIterator<Item = Command>) {
        self.control.apply_batch_at(self.now, cmds);
    }

    /// Moves the batch clock on and runs an empty batch, as `run`'s tick
    /// does.
    fn tick(&mut self, by: Duration) {
        self.now += by;
        self.apply([]);
    }

    fn update(&mut self, source: Source, kind: UpdateKind) {
        self.apply([Command::Discovery(Update {
            source,
            revision: None,
            kind,
        })]);
    }

    fn changes(&mut self, source: Source, changes: Vec<Change>) {
        self.update(source, UpdateKind::Changes(changes));
    }

    /// Applies a local change; returns the writer's answer.
    fn local(&mut self, change: LocalChange) -> Result<(), LocalError> {
        let (tx, mut rx) = oneshot::channel();
        self.apply([Command::Local(change, tx)]);
        rx.try_recv().expect("a reply once the batch is published")
    }

    fn endpoint(&self, service: &str, id: &str) -> Option<Endpoint> {
        let table = self.table.load();
        let svc = table.services.get(service)?;
        svc.endpoints.iter().find(|e| &*e.id == id).cloned()
    }

    fn ids(&self, service: &str) -> Vec<String> {
        let table = self.table.load();
        let mut ids: Vec<String> = table
            .services
            .get(service)
            .map(|s| s.endpoints.iter().map(|e| e.id.to_string()).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    fn route_names(&self) -> Vec<String> {
        let table = self.table.load();
        let mut names: Vec<String> = table
            .routes
            .iter()
            .map(|(_, r)| r.name.to_string())
            .collect();
        names.sort();
        names
    }

    fn map_value(&self, map: &str, key: &str) -> Option<String> {
        let table = self.table.load();
        table.maps.get(map)?.get(key).map(|v| v.to_string())
    }
}

fn instance(service: &str, id: &str, port: u16, weight: u16) -> Registration {
    let mut reg = Registration::new(service, id, Address::new("127.0.0.1", port));
    reg.weight = weight;
    reg
}

fn upsert(reg: Registration) -> Change {
    Change::Upsert(Entry::Instance(reg))
}

fn remove(service: &str, id: &str) -> Change {
    Change::Remove(EntryKey::Instance {
        service: service.into(),
        id: id.into(),
    })
}

fn set_override(service: &str, id: &str, state: Option<AdminState>, weight: Option<u16>) -> Change {
    Change::Upsert(Entry::Override {
        service: service.into(),
        id: id.into(),
        spec: Override { state, weight },
    })
}

fn route_to(name: &str, service: &str) -> Entry {
    Entry::Route {
        name: name.into(),
        spec: RouteSpec {
            path_prefix: format!("/{name}"),
            service: Some(service.into()),
            ..RouteSpec::default()
        },
    }
}

fn map_entry(map: &str, key: &str, value: &str) -> Entry {
    Entry::MapEntry {
        map: map.into(),
        key: key.into(),
        value: value.into(),
    }
}

#[test]
fn config_endpoints_are_published_at_start() {
    let w = Writer::new();
    let ep = w.endpoint("web", "a1").expect("config endpoint");
    assert_eq!(ep.address, Address::new("127.0.0.1", 9001));
    assert_eq!(ep.weight, 3);
    assert_eq!(ep.state, AdminState::Ready);
    assert_eq!(ep.balance_weight, 3 * WEIGHT_SCALE);
}

#[test]
fn later_source_wins_for_the_same_instance() {
    // The rule: sources are ordered config < file < etcd < consul, and for
    // one (service, id) the latest source that has it wins whole.
    let mut w = Writer::new();
    w.changes(Source::File, vec![upsert(instance("web", "a1", 9101, 4))]);
    assert_eq!(w.endpoint("web", "a1").map(|e| e.weight), Some(4));

    w.changes(Source::Consul, vec![upsert(instance("web", "a1", 9301, 6))]);
    // Etcd arrives after Consul but ranks below it.
    w.changes(Source::Etcd, vec![upsert(instance("web", "a1", 9201, 5))]);
    let ep = w.endpoint("web", "a1").expect("a1");
    assert_eq!(ep.address, Address::new("127.0.0.1", 9301));
    assert_eq!(ep.weight, 6);

    // Each source keeps its own view: removing Consul's copy uncovers
    // etcd's, then the file's, then the config file's.
    w.changes(Source::Consul, vec![remove("web", "a1")]);
    assert_eq!(
        w.endpoint("web", "a1").map(|e| e.address),
        Some(Address::new("127.0.0.1", 9201))
    );
    w.changes(Source::Etcd, vec![remove("web", "a1")]);
    assert_eq!(
        w.endpoint("web", "a1").map(|e| e.address),
        Some(Address::new("127.0.0.1", 9101))
    );
    w.changes(Source::File, vec![remove("web", "a1")]);
    let ep = w.endpoint("web", "a1").expect("config's a1");
    assert_eq!(ep.address, Address::new("127.0.0.1", 9001));
    assert_eq!(ep.weight, 3);
    assert_eq!(w.ids("web"), ["a1"]);
}

#[test]
fn instances_from_every_source_are_merged() {
    let mut w = Writer::new();
    w.changes(Source::Etcd, vec![upsert(instance("web", "e1", 9201, 1))]);
    w.changes(Source::Consul, vec![upsert(instance("web", "c1", 9301, 1))]);
    assert_eq!(w.ids("web"), ["a1", "c1", "e1"]);
    // A service only a registry knows is built with default settings.
    w.changes(Source::Etcd, vec![upsert(instance("api", "x1", 9401, 2))]);
    assert_eq!(w.ids("api"), ["x1"]);
    w.changes(Source::Etcd, vec![remove("api", "x1")]);
    assert!(w.table.load().services.get("api").is_none());
}

#[test]
fn overrides_win_over_registrations_field_by_field() {
    let mut w = Writer::new();
    w.changes(Source::Etcd, vec![upsert(instance("web", "e1", 9201, 2))]);
    w.changes(
        Source::Etcd,
        vec![set_override("web", "e1", Some(AdminState::Drain), None)],
    );
    let ep = w.endpoint("web", "e1").expect("e1");
    assert_eq!(ep.state, AdminState::Drain);
    assert_eq!(ep.weight, 2);

    // A later source's weight leaves the earlier one's state in force.
    w.changes(
        Source::Consul,
        vec![set_override("web", "e1", None, Some(9))],
    );
    let ep = w.endpoint("web", "e1").expect("e1");
    assert_eq!(ep.state, AdminState::Drain);
    assert_eq!(ep.weight, 9);
    assert_eq!(ep.initial_weight, 9);

    // An override applies to an instance of another source (the config's).
    w.changes(
        Source::Etcd,
        vec![set_override("web", "a1", Some(AdminState::Maint), None)],
    );
    assert_eq!(
        w.endpoint("web", "a1").map(|e| e.state),
        Some(AdminState::Maint)
    );

    w.changes(
        Source::Etcd,
        vec![Change::Remove(EntryKey::Override {
            service: "web".into(),
            id: "e1".into(),
        })],
    );
    let ep = w.endpoint("web", "e1").expect("e1");
    assert_eq!(
        ep.state,
        AdminState::Ready,
        "consul's override has no state"
    );
    assert_eq!(ep.weight, 9);
}

#[test]
fn local_changes_win_over_registry_until_cleared() {
    let mut w = Writer::new();
    w.changes(Source::Etcd, vec![upsert(instance("web", "e1", 9201, 2))]);
    w.local(LocalChange::ServerState {
        service: "web".into(),
        id: "e1".into(),
        state: AdminState::Maint,
    })
    .expect("disable");
    w.local(LocalChange::ServerWeight {
        service: "web".into(),
        id: "e1".into(),
        weight: 7,
    })
    .expect("set weight");
    let ep = w.endpoint("web", "e1").expect("e1");
    assert_eq!(ep.state, AdminState::Maint);
    assert_eq!(ep.weight, 7);
    assert_eq!(ep.initial_weight, 2, "initial weight is the registry's");

    // The registry and its overrides change; the local values stay.
    w.changes(
        Source::Etcd,
        vec![
            upsert(instance("web", "e1", 9201, 4)),
            set_override("web", "e1", Some(AdminState::Ready), Some(5)),
        ],
    );
    let ep = w.endpoint("web", "e1").expect("e1");
    assert_eq!(ep.state, AdminState::Maint);
    assert_eq!(ep.weight, 7);
    assert_eq!(ep.initial_weight, 5);
    assert_eq!(ep.live.admin_state(), AdminState::Maint);
    assert!(ep.local_state && ep.local_weight, "marked as local");

    w.local(LocalChange::ServerReset {
        service: "web".into(),
        id: "e1".into(),
    })
    .expect("reset server");
    let ep = w.endpoint("web", "e1").expect("e1");
    assert_eq!(ep.state, AdminState::Ready);
    assert_eq!(ep.weight, 5);
    assert!(!ep.local_state && !ep.local_weight, "no longer local");

    w.local(LocalChange::ServerWeight {
        service: "web".into(),
        id: "a1".into(),
        weight: 0,
    })
    .expect("set weight");
    assert_eq!(w.endpoint("web", "a1").map(|e| e.weight), Some(0));
    w.local(LocalChange::Reset).expect("reset");
    assert_eq!(w.endpoint("web", "a1").map(|e| e.weight), Some(3));
}

#[test]
fn local_change_to_unknown_server_is_refused() {
    let mut w = Writer::new();
    let before = w.table.load_full();
    let err = w.local(LocalChange::ServerState {
        service: "web".into(),
        id: "nope".into(),
        state: AdminState::Maint,
    });
    assert_eq!(
        err,
        Err(LocalError::NoSuchServer {
            service: "web".into(),
            id: "nope".into()
        })
    );
    let err = w.local(LocalChange::ServerWeight {
        service: "nosuch".into(),
        id: "a1".into(),
        weight: 1,
    });
    assert_eq!(err, Err(LocalError::NoSuchService("nosuch".into())));
    assert_eq!(w.ids("web"), ["a1"]);
    assert_eq!(
        w.endpoint("web", "a1").map(|e| (e.state, e.weight)),
        Some((AdminState::Ready, 3))
    );
    assert!(Arc::ptr_eq(
        &before.services["web"],
        &w.table.load().services["web"]
    ));
}

#[test]
fn local_map_changes_layer_over_registry_maps() {
    let mut w = Writer::new();
    w.update(
        Source::Etcd,
        UpdateKind::Reset(vec![map_entry("hosts", "a.example", "web")]),
    );
    assert_eq!(w.map_value("hosts", "a.example").as_deref(), Some("web"));
    w.local(LocalChange::MapSet {
        map: "hosts".into(),
        key: "a.example".into(),
        value: "slow".into(),
    })
    .expect("set map");
    // The registry writes the key again: the local value stays.
    w.changes(
        Source::Etcd,
        vec![Change::Upsert(map_entry("hosts", "a.example", "drained"))],
    );
    assert_eq!(w.map_value("hosts", "a.example").as_deref(), Some("slow"));
    w.local(LocalChange::Reset).expect("reset");
    assert_eq!(
        w.map_value("hosts", "a.example").as_deref(),
        Some("drained")
    );
}

#[test]
fn deregistered_endpoint_drains_until_its_requests_finish() {
    let mut w = Writer::new();
    w.changes(
        Source::Etcd,
        vec![
            upsert(instance("drained", "d1", 9501, 1)),
            upsert(instance("drained", "d2", 9502, 1)),
        ],
    );
    let live = w.endpoint("drained", "d1").expect("d1").live;
    let request = live.start_request();

    w.changes(Source::Etcd, vec![remove("drained", "d1")]);
    let ep = w.endpoint("drained", "d1").expect("d1 drains");
    assert_eq!(ep.state, AdminState::Drain);
    assert_eq!(ep.balance_weight, 0);
    assert!(!ep.accepts_new());
    assert!(Arc::ptr_eq(&ep.live, &live), "same live state");

    w.tick(Duration::from_secs(2));
    assert_eq!(w.ids("drained"), ["d1", "d2"]);

    drop(request);
    w.tick(TICK);
    assert_eq!(w.ids("drained"), ["d2"]);
}

#[test]
fn deregistered_endpoint_leaves_at_drain_timeout() {
    let mut w = Writer::new();
    w.changes(
        Source::Etcd,
        vec![upsert(instance("drained", "d1", 9501, 1))],
    );
    let live = w.endpoint("drained", "d1").expect("d1").live;
    let _stuck = live.start_request();

    w.changes(Source::Etcd, vec![remove("drained", "d1")]);
    w.tick(Duration::from_millis(4900));
    assert_eq!(w.ids("drained"), ["d1"]);
    w.tick(Duration::from_millis(100));
    assert!(w.ids("drained").is_empty());
}

#[test]
fn deregistered_idle_endpoint_leaves_at_once() {
    let mut w = Writer::new();
    w.changes(
        Source::Etcd,
        vec![upsert(instance("drained", "d1", 9501, 1))],
    );
    w.changes(Source::Etcd, vec![remove("drained", "d1")]);
    // The config still names the service: it stays, with no endpoint.
    assert!(w.table.load().services.contains_key("drained"));
    assert!(w.ids("drained").is_empty());
}

#[test]
fn reregistered_draining_endpoint_keeps_its_live_state() {
    let mut w = Writer::new();
    w.changes(
        Source::Etcd,
        vec![upsert(instance("drained", "d1", 9501, 1))],
    );
    let live = w.endpoint("drained", "d1").expect("d1").live;
    let _request = live.start_request();
    w.changes(Source::Etcd, vec![remove("drained", "d1")]);
    w.changes(
        Source::Etcd,
        vec![upsert(instance("drained", "d1", 9501, 1))],
    );
    let ep = w.endpoint("drained", "d1").expect("d1");
    assert_eq!(ep.state, AdminState::Ready);
    assert!(Arc::ptr_eq(&ep.live, &live));
    assert_eq!(w.ids("drained"), ["d1"]);
}

#[test]
fn slow_start_ramps_weight_over_its_window() {
    let mut w = Writer::new();
    let full = 4 * WEIGHT_SCALE;
    w.changes(Source::Etcd, vec![upsert(instance("slow", "s1", 9601, 4))]);
    let ep = w.endpoint("slow", "s1").expect("s1");
    assert_eq!(ep.weight, 4, "the table's weight is the full one");
    assert_eq!(ep.balance_weight, 1, "a new endpoint starts at the least");

    w.tick(Duration::from_millis(2500));
    assert_eq!(
        w.endpoint("slow", "s1").map(|e| e.balance_weight),
        Some(full / 4)
    );
    w.tick(Duration::from_millis(2500));
    assert_eq!(
        w.endpoint("slow", "s1").map(|e| e.balance_weight),
        Some(full / 2)
    );
    w.tick(Duration::from_secs(5));
    assert_eq!(
        w.endpoint("slow", "s1").map(|e| e.balance_weight),
        Some(full)
    );
    w.tick(Duration::from_secs(1));
    assert_eq!(
        w.endpoint("slow", "s1").map(|e| e.balance_weight),
        Some(full)
    );

    // Coming back from maintenance ramps again...
    w.changes(
        Source::Etcd,
        vec![set_override("slow", "s1", Some(AdminState::Maint), None)],
    );
    w.changes(
        Source::Etcd,
        vec![Change::Remove(EntryKey::Override {
            service: "slow".into(),
            id: "s1".into(),
        })],
    );
    assert_eq!(w.endpoint("slow", "s1").map(|e| e.balance_weight), Some(1));
    w.tick(Duration::from_secs(5));
    assert_eq!(
        w.endpoint("slow", "s1").map(|e| e.balance_weight),
        Some(full / 2)
    );
    w.tick(Duration::from_secs(5));

    // ...and so does a health check that flips it back up.
    w.apply([Command::Health {
        service: "slow".into(),
        id: "s1".into(),
        up: true,
    }]);
    assert_eq!(w.endpoint("slow", "s1").map(|e| e.balance_weight), Some(1));
    w.tick(Duration::from_secs(10));
    assert_eq!(
        w.endpoint("slow", "s1").map(|e| e.balance_weight),
        Some(full)
    );
}

#[test]
fn without_slow_start_new_endpoints_take_full_weight() {
    let mut w = Writer::new();
    w.changes(Source::Etcd, vec![upsert(instance("web", "e1", 9201, 2))]);
    assert_eq!(
        w.endpoint("web", "e1").map(|e| e.balance_weight),
        Some(2 * WEIGHT_SCALE)
    );
    w.apply([Command::Health {
        service: "web".into(),
        id: "e1".into(),
        up: true,
    }]);
    assert_eq!(
        w.endpoint("web", "e1").map(|e| e.balance_weight),
        Some(2 * WEIGHT_SCALE)
    );
}

#[test]
fn reset_replaces_one_sources_whole_view() {
    let mut w = Writer::new();
    w.changes(Source::File, vec![upsert(instance("web", "f1", 9101, 1))]);
    w.update(
        Source::Etcd,
        UpdateKind::Reset(vec![
            Entry::Instance(instance("web", "e1", 9201, 1)),
            Entry::Instance(instance("web", "e2", 9202, 1)),
            Entry::Instance(instance("api", "x1", 9401, 1)),
            route_to("old", "web"),
            map_entry("hosts", "a.example", "web"),
        ]),
    );
    assert_eq!(w.ids("web"), ["a1", "e1", "e2", "f1"]);
    assert_eq!(w.route_names(), ["old"]);

    w.update(
        Source::Etcd,
        UpdateKind::Reset(vec![
            Entry::Instance(instance("web", "e2", 9202, 5)),
            Entry::Instance(instance("web", "e3", 9203, 1)),
            route_to("new", "web"),
        ]),
    );
    // What etcd no longer lists is gone; the file's and config's stay.
    assert_eq!(w.ids("web"), ["a1", "e2", "e3", "f1"]);
    assert_eq!(w.endpoint("web", "e2").map(|e| e.weight), Some(5));
    assert!(w.table.load().services.get("api").is_none());
    assert_eq!(w.route_names(), ["new"]);
    assert_eq!(w.map_value("hosts", "a.example"), None);

    w.update(Source::Etcd, UpdateKind::Reset(Vec::new()));
    assert_eq!(w.ids("web"), ["a1", "f1"]);
    assert!(w.route_names().is_empty());
}

#[test]
fn unknown_removals_change_nothing() {
    let mut w = Writer::new();
    w.changes(Source::Etcd, vec![upsert(instance("web", "e1", 9201, 2))]);
    let before = w.table.load_full();
    w.changes(
        Source::Etcd,
        vec![
            remove("web", "never"),
            remove("nosuch", "x"),
            // The config's instance is not etcd's to remove.
            remove("web", "a1"),
            Change::Remove(EntryKey::Route {
                name: "nope".into(),
            }),
            Change::Remove(EntryKey::MapEntry {
                map: "nope".into(),
                key: "k".into(),
            }),
        ],
    );
    let after = w.table.load_full();
    assert!(after.version > before.version);
    assert_eq!(w.ids("web"), ["a1", "e1"]);
    assert!(after.services.get("nosuch").is_none());
    assert!(Arc::ptr_eq(&before.routes, &after.routes));
}

#[test]
fn unusable_entries_are_skipped_and_the_rest_stays() {
    let mut w = Writer::new();
    w.changes(Source::Etcd, vec![upsert(instance("web", "e1", 9201, 2))]);
    let mut bad = instance("web", "bad", 80, 1);
    bad.address = Address::new("not a host", 80);
    w.changes(
        Source::Etcd,
        vec![
            upsert(bad),
            Change::Upsert(route_to("good", "web")),
            // No target: the route is skipped, the others are kept.
            Change::Upsert(Entry::Route {
                name: "broken".into(),
                spec: RouteSpec::default(),
            }),
        ],
    );
    assert_eq!(w.ids("web"), ["a1", "e1"]);
    assert_eq!(w.route_names(), ["good"]);
}

#[test]
fn refused_config_keeps_the_previous_one_serving() {
    let mut w = Writer::new();
    w.changes(Source::Etcd, vec![upsert(instance("web", "e1", 9201, 2))]);
    w.refuse.store(true, Ordering::Relaxed);
    let next = Config::parse(
        "next.toml",
        r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:2"

[services.web]
endpoints = [{ id = "z9", address = "127.0.0.1:9999" }]
"#,
    )
    .expect("valid config");
    let (tx, mut rx) = oneshot::channel();
    w.apply([Command::Config(Box::new(next.clone()), Some(tx))]);
    assert_eq!(
        rx.try_recv().expect("reply"),
        Err("listener web: address in use".to_string())
    );
    assert_eq!(w.ids("web"), ["a1", "e1"]);
    assert!(w.control.config().services.contains_key("slow"));

    // Accepted, it replaces the config's own entries only.
    w.refuse.store(false, Ordering::Relaxed);
    let (tx, mut rx) = oneshot::channel();
    w.apply([Command::Config(Box::new(next), Some(tx))]);
    assert_eq!(rx.try_recv().expect("reply"), Ok(()));
    assert_eq!(w.ids("web"), ["e1", "z9"]);
}

#[test]
fn applied_revision_is_reported_after_publishing() {
    let mut w = Writer::new();
    let status = Arc::new(SourceStatus::new(Source::Etcd));
    w.control.follow(status.clone());
    w.apply([Command::Discovery(Update {
        source: Source::Etcd,
        revision: Some(42),
        kind: UpdateKind::Changes(vec![upsert(instance("web", "e1", 9201, 1))]),
    })]);
    assert_eq!(status.applied_revision(), Some(42));
}

#[test]
fn a_drain_notice_holds_an_instance_until_its_revision_is_applied() {
    let mut w = Writer::new();
    let status = Arc::new(SourceStatus::new(Source::Etcd));
    w.control.follow(status.clone());
    let at = |w: &mut Writer, rev: i64, changes: Vec<Change>| {
        w.apply([Command::Discovery(Update {
            source: Source::Etcd,
            revision: Some(rev),
            kind: UpdateKind::Changes(changes),
        })])
    };
    at(&mut w, 10, vec![upsert(instance("web", "e1", 9201, 1))]);
    let notice = |service: &str, id: &str, revision| LocalChange::DrainNotice {
        service: service.into(),
        id: id.into(),
        revision,
    };
    // A notice for a revision already applied changes nothing.
    w.local(notice("web", "e1", 10)).expect("accepted");
    assert_eq!(
        w.endpoint("web", "e1").map(|e| e.state),
        Some(AdminState::Ready)
    );

    // Ahead of this proxy: held in drain, also for an instance it has not
    // seen yet, and kept by a reset of the local changes.
    w.local(notice("web", "e1", 15)).expect("accepted");
    w.local(notice("web", "e2", 15)).expect("accepted");
    let e1 = w.endpoint("web", "e1").expect("e1");
    assert_eq!((e1.state, e1.drain_notice), (AdminState::Drain, Some(15)));
    w.local(LocalChange::Reset).expect("reset");
    at(&mut w, 12, vec![upsert(instance("web", "e2", 9202, 1))]);
    assert_eq!(
        w.endpoint("web", "e1").map(|e| e.state),
        Some(AdminState::Drain)
    );
    assert_eq!(
        w.endpoint("web", "e2").map(|e| e.state),
        Some(AdminState::Drain)
    );
    // A local `ready` does not undo it.
    w.local(LocalChange::ServerState {
        service: "web".into(),
        id: "e1".into(),
        state: AdminState::Ready,
    })
    .expect("accepted");
    assert_eq!(
        w.endpoint("web", "e1").map(|e| e.state),
        Some(AdminState::Drain)
    );

    // The registry catches up: from here on it decides.
    at(&mut w, 15, vec![remove("web", "e1")]);
    let e2 = w.endpoint("web", "e2").expect("e2");
    assert_eq!((e2.state, e2.drain_notice), (AdminState::Ready, None));
    assert_eq!(w.ids("web"), vec!["a1", "e2"]);
}

/// Seed 002's deploy step on one proxy: `disable server` then `enable
/// server`. The enable undoes the disable, so the fleet's word applies
/// again (a later drain in etcd takes effect here too); only when the
/// registry itself keeps the instance out does it pin `ready` locally.
#[test]
fn enable_server_undoes_a_local_disable_instead_of_pinning_ready() {
    let mut w = Writer::new();
    w.changes(Source::Etcd, vec![upsert(instance("web", "e1", 9201, 1))]);
    let disable = || LocalChange::ServerState {
        service: "web".into(),
        id: "e1".into(),
        state: AdminState::Maint,
    };
    let enable = || LocalChange::ServerEnable {
        service: "web".into(),
        id: "e1".into(),
    };
    w.local(disable()).expect("disable");
    w.local(enable()).expect("enable");
    let ep = w.endpoint("web", "e1").expect("e1");
    assert_eq!((ep.state, ep.local_state), (AdminState::Ready, false));
    // The fleet drains it: this proxy follows.
    w.changes(
        Source::Etcd,
        vec![set_override("web", "e1", Some(AdminState::Drain), None)],
    );
    assert_eq!(
        w.endpoint("web", "e1").map(|e| e.state),
        Some(AdminState::Drain)
    );
    // Enabled against the registry's drain: pinned, and marked so.
    w.local(enable()).expect("enable");
    let ep = w.endpoint("web", "e1").expect("e1");
    assert_eq!((ep.state, ep.local_state), (AdminState::Ready, true));
    // A local weight survives an enable.
    w.local(LocalChange::ServerWeight {
        service: "web".into(),
        id: "e1".into(),
        weight: 9,
    })
    .expect("weight");
    w.changes(
        Source::Etcd,
        vec![set_override("web", "e1", Some(AdminState::Ready), None)],
    );
    w.local(enable()).expect("enable");
    let ep = w.endpoint("web", "e1").expect("e1");
    assert_eq!(
        (ep.state, ep.local_state, ep.weight),
        (AdminState::Ready, false, 9)
    );
}

/// A pause in the registry keeps its service in the table, with its
/// bound, even when no instance is registered; the resume takes it out
/// again once nothing else holds it.
#[test]
fn a_paused_service_stays_in_the_table_without_instances() {
    let mut w = Writer::new();
    let pause = |service: &str| {
        Change::Upsert(Entry::Pause {
            service: service.into(),
            spec: PauseSpec {
                timeout: Duration::from_secs(7),
            },
        })
    };
    w.changes(
        Source::Etcd,
        vec![upsert(instance("api", "a1", 9101, 1)), pause("api")],
    );
    let paused = |w: &Writer| {
        w.table
            .load()
            .service("api")
            .map(|s| (s.endpoints.len(), s.settings.paused))
    };
    assert_eq!(paused(&w), Some((1, Some(Duration::from_secs(7)))));
    w.changes(Source::Etcd, vec![remove("api", "a1")]);
    w.tick(Duration::from_secs(60));
    assert_eq!(paused(&w), Some((0, Some(Duration::from_secs(7)))));
    w.changes(
        Source::Etcd,
        vec![Change::Remove(EntryKey::Pause {
            service: "api".into(),
        })],
    );
    assert_eq!(paused(&w), None, "resumed, with nothing registered");
}
