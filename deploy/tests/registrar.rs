//! The registrar against a real etcd: a registration written under a lease
//! and kept alive, rewritten in place (drain), deleted, written again when
//! the lease is lost, kept across an etcd restart, and written once an etcd
//! that was down at start comes up.

use std::time::{Duration, Instant};

use etcd_client::Client;
use pointsman_deploy::registrar::Registrar;
use pointsman_discovery::{
    parse_instance, AdminState, EtcdError, EtcdOptions, LeaseState, Registration,
};

use pointsman_testkit::etcd::EtcdServer;

const DEADLINE: Duration = Duration::from_secs(15);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn registration(id: &str) -> Registration {
    let mut r = Registration::new("web", id, "127.0.0.1:8081".parse().expect("an address"));
    r.weight = 5;
    r.tags = vec!["blue".into()];
    r.meta.insert("version".into(), "7".into());
    r
}

fn options(etcd: &EtcdServer) -> EtcdOptions {
    let mut o = EtcdOptions::new([etcd.endpoint()]);
    // Quick retries, so the tests wait on etcd, not on backoff.
    o.backoff_min = Duration::from_millis(50);
    o.backoff_max = Duration::from_millis(500);
    o.connect_timeout = Duration::from_secs(1);
    o.request_timeout = Duration::from_secs(2);
    o
}

async fn client(etcd: &EtcdServer) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect to the test etcd")
}

/// The value and lease of `key`, if it exists.
async fn read(etcd: &EtcdServer, key: &str) -> Option<(String, i64, i64)> {
    let mut c = client(etcd).await;
    let resp = c.get(key, None).await.expect("get");
    resp.kvs().first().map(|kv| {
        (
            String::from_utf8_lossy(kv.value()).into_owned(),
            kv.lease(),
            kv.mod_revision(),
        )
    })
}

async fn wait_key(
    etcd: &EtcdServer,
    key: &str,
    what: &str,
    cond: impl Fn(&Option<(String, i64, i64)>) -> bool,
) -> Option<(String, i64, i64)> {
    let end = Instant::now() + DEADLINE;
    loop {
        let now = read(etcd, key).await;
        if cond(&now) {
            return now;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting until {what}; {key} is {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn register_drain_and_deregister() {
    init_tracing();
    let etcd = EtcdServer::start();
    let mut reg = Registrar::new(options(&etcd), Duration::from_secs(3), registration("a1"))
        .expect("a valid registration");
    assert_eq!(reg.key(), "/services/web/a1");
    assert_eq!(
        read(&etcd, reg.key()).await,
        None,
        "nothing before register()"
    );

    let r1 = reg.register().await.expect("register");
    let (value, lease, rev) = read(&etcd, reg.key()).await.expect("registered");
    assert_eq!(rev, r1);
    assert_ne!(lease, 0, "written under a lease");
    let parsed = parse_instance(reg.key(), "web", "a1", value.as_bytes()).expect("parses");
    assert_eq!(parsed, registration("a1"));
    assert!(matches!(
        *reg.lease_state().borrow(),
        LeaseState::Held { revision, .. } if revision == r1
    ));

    // Kept alive well past its 3 s TTL.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(read(&etcd, reg.key()).await.is_some(), "kept alive");

    let r2 = reg.set_state(AdminState::Drain).await.expect("drain");
    assert!(r2 > r1);
    let (value, lease2, rev) = read(&etcd, reg.key()).await.expect("still registered");
    assert_eq!((lease2, rev), (lease, r2), "rewritten in place, same lease");
    let parsed = parse_instance(reg.key(), "web", "a1", value.as_bytes()).expect("parses");
    assert_eq!(parsed.state, AdminState::Drain);

    let key = reg.key().to_string();
    let r3 = reg.deregister().await.expect("deregister");
    assert!(r3 > r2);
    assert_eq!(read(&etcd, &key).await, None);
    let mut c = client(&etcd).await;
    let ttl = c.lease_time_to_live(lease, None).await.expect("lease ttl");
    assert!(ttl.ttl() <= 0, "the lease is revoked: {ttl:?}");
}

#[tokio::test]
async fn a_lost_lease_is_replaced_and_the_value_written_again() {
    init_tracing();
    let etcd = EtcdServer::start();
    let mut reg = Registrar::new(options(&etcd), Duration::from_secs(3), registration("a2"))
        .expect("a valid registration");
    reg.register().await.expect("register");
    reg.set_state(AdminState::Maint).await.expect("maint");
    let (_, lease, _) = read(&etcd, reg.key()).await.expect("registered");

    // As if etcd had expired it during a long pause.
    let mut c = client(&etcd).await;
    c.lease_revoke(lease).await.expect("revoke");
    let back = wait_key(
        &etcd,
        reg.key(),
        "the registration is back under a new lease",
        |v| v.as_ref().is_some_and(|(_, l, _)| *l != lease && *l != 0),
    )
    .await
    .expect("back");
    let parsed = parse_instance(reg.key(), "web", "a2", back.0.as_bytes()).expect("parses");
    assert_eq!(
        parsed.state,
        AdminState::Maint,
        "the latest value, not the first"
    );
}

#[tokio::test]
async fn an_etcd_restart_keeps_the_registration() {
    init_tracing();
    let mut etcd = EtcdServer::start();
    let reg = Registrar::new(options(&etcd), Duration::from_secs(3), registration("a3"))
        .expect("a valid registration");
    reg.register().await.expect("register");
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.restart();
    // After the restart, and for longer than the TTL: kept alive again.
    wait_key(&etcd, reg.key(), "registered after the restart", |v| {
        v.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        read(&etcd, reg.key()).await.is_some(),
        "kept alive after the restart"
    );
}

#[tokio::test]
async fn etcd_down_at_start_then_up() {
    init_tracing();
    let mut etcd = EtcdServer::start();
    etcd.stop();
    let reg = Registrar::new(options(&etcd), Duration::from_secs(3), registration("a4"))
        .expect("a valid registration");
    let err = reg.register().await.expect_err("etcd is down");
    assert!(err.is_transient(), "{err:?}");
    assert!(
        matches!(
            err,
            EtcdError::Unreachable { .. } | EtcdError::Timeout { .. }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains(&etcd.endpoint()),
        "names etcd: {err}"
    );
    etcd.restart();
    wait_key(&etcd, reg.key(), "registered once etcd is up", |v| {
        v.is_some()
    })
    .await;
}
