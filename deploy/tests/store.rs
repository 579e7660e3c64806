//! The registry store against a real etcd: with a dead member listed first
//! it connects to, reads from and writes to the live one, and a request
//! that gets no answer (a hung etcd) is tried again until etcd answers.

use std::time::{Duration, Instant};

use pointsman_deploy::{DeployError, Store};
use pointsman_discovery::{AdminState, EtcdOptions, Override};
use pointsman_testkit::etcd::EtcdServer;

/// An address nothing listens on: a port the OS just handed out and took
/// back.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = l.local_addr().expect("its address");
    format!("http://{addr}")
}

fn options(endpoints: Vec<String>) -> EtcdOptions {
    let mut o = EtcdOptions::new(endpoints);
    o.backoff_min = Duration::from_millis(50);
    o.backoff_max = Duration::from_millis(500);
    o.connect_timeout = Duration::from_secs(1);
    o.request_timeout = Duration::from_secs(2);
    o
}

#[tokio::test]
async fn fails_over_from_a_dead_member_to_the_live_one() {
    let etcd = EtcdServer::start();
    let opts = options(vec![dead_endpoint(), etcd.endpoint()]);
    let mut store = Store::connect(&opts)
        .await
        .expect("connect via the second member");

    let rev = store
        .set_override("api", "api0", Some(AdminState::Drain), Some(3))
        .await
        .expect("write an override");
    assert!(rev > 0);
    assert_eq!(
        store
            .override_of("api", "api0")
            .await
            .expect("read it back"),
        Some(Override {
            state: Some(AdminState::Drain),
            weight: Some(3),
        })
    );
    let rev2 = store
        .set_map("colors", "web", "blue")
        .await
        .expect("set a map entry");
    assert!(rev2 > rev);
    let (rev3, previous) = store
        .switch_map("colors", "web", "green")
        .await
        .expect("switch the map entry");
    assert!(rev3 > rev2);
    assert_eq!(previous.as_deref(), Some("blue"));
    let entry = store
        .map_entry("colors", "web")
        .await
        .expect("read the entry");
    assert_eq!(
        entry.map(|e| (e.value, e.mod_revision)),
        Some(("green".to_string(), rev3))
    );
    assert_eq!(
        store
            .switched_from("colors", "web")
            .await
            .expect("read the history"),
        Some("blue".to_string())
    );
    assert!(store.revision().await.expect("the revision") >= rev3);
    store
        .restore_override("api", "api0", None)
        .await
        .expect("remove the override");
    assert_eq!(store.override_of("api", "api0").await.expect("read"), None);
}

#[tokio::test]
async fn a_registry_nobody_answers_fails_at_connect() {
    let opts = options(vec![dead_endpoint(), dead_endpoint()]);
    let err = match Store::connect(&opts).await {
        Ok(_) => panic!("nothing listens"),
        Err(e) => e,
    };
    assert!(matches!(err, DeployError::Registry { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("registry: cannot connect: etcd at http://127.0.0.1:"),
        "{text}"
    );
}

#[tokio::test]
async fn a_request_without_an_answer_is_tried_again() {
    let mut etcd = EtcdServer::start();
    let mut opts = options(vec![etcd.endpoint()]);
    opts.request_timeout = Duration::from_millis(500);
    opts.backoff_min = Duration::from_millis(300);
    opts.backoff_max = Duration::from_secs(2);
    let mut store = Store::connect(&opts).await.expect("connect");
    store.set_map("colors", "web", "blue").await.expect("write");

    etcd.freeze();
    let frozen = Instant::now();
    let thawed = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        etcd.thaw();
        etcd
    });
    let entry = store
        .map_entry("colors", "web")
        .await
        .expect("read once etcd answers");
    let _etcd = thawed.join().expect("the thawing thread");
    assert_eq!(entry.map(|e| e.value), Some("blue".to_string()));
    assert!(
        frozen.elapsed() >= Duration::from_millis(500),
        "{:?}",
        frozen.elapsed()
    );
}
