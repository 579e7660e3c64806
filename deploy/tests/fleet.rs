//! The fleet queries against a real etcd and small stand-ins for proxies'
//! admin APIs: which proxies are live, who has applied a revision, who still
//! has requests in flight to an instance, and what waiting reports.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use pointsman_discovery::admin_api::{EndpointView, ServiceView, SourceView};
use pointsman_discovery::keys::proxy_key;
use pointsman_discovery::{EtcdOptions, Prefixes, ProxyRecord, Source, SourceStatusSnapshot};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

use pointsman_deploy::fleet::{ask_all, judge_drained, probe, Expectation, Fleet, FleetError};
use pointsman_testkit::etcd::EtcdServer;

/// What a stand-in admin API reports.
#[derive(Clone, Debug)]
struct State {
    applied: Option<i64>,
    /// (id, state, in_flight) of service `web`.
    endpoints: Vec<(&'static str, &'static str, u64)>,
    /// A field left out of every endpoint, as a proxy that renamed it
    /// would send.
    without: Option<&'static str>,
}

/// A registry in `/api/discovery`, as a proxy reports it.
fn source(source: Source, applied: Option<i64>) -> SourceView {
    SourceView {
        status: SourceStatusSnapshot {
            source,
            connected: true,
            seen_revision: applied,
            applied_revision: applied,
            last_sync_unix_ms: None,
            staleness_secs: None,
            malformed: 0,
            reconnects: 0,
            resets: 0,
            last_error: None,
        },
        serving_saved_state: false,
    }
}

/// An admin API answering `/api/discovery` and `/api/services` from a
/// shared [`State`], several requests per connection.
struct FakeAdmin {
    addr: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAdmin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAdmin {
    async fn start(state: State) -> FakeAdmin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr").to_string();
        let state = Arc::new(Mutex::new(state));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                        let st = state.lock().unwrap().clone();
                        let body = match path.as_str() {
                            "/api/discovery" => json!([
                                source(Source::File, None),
                                source(Source::Etcd, st.applied),
                            ]),
                            "/api/services" => json!([ServiceView {
                                name: "web".into(),
                                balance: "roundrobin".into(),
                                endpoints: st
                                    .endpoints
                                    .iter()
                                    .map(|(id, state, n)| EndpointView {
                                        id: id.to_string(),
                                        address: "127.0.0.1:1".into(),
                                        state: state.parse().unwrap(),
                                        healthy: true,
                                        in_flight: *n,
                                        weight: 1,
                                        ..EndpointView::default()
                                    })
                                    .collect(),
                                ..ServiceView::default()
                            }]),
                            _ => json!({}),
                        };
                        let mut body = body;
                        if let (Some(field), Some(services)) = (st.without, body.as_array_mut()) {
                            for s in services {
                                for e in s["endpoints"].as_array_mut().into_iter().flatten() {
                                    if let Some(e) = e.as_object_mut() {
                                        e.remove(field);
                                    }
                                }
                            }
                        }
                        let body = body.to_string();
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeAdmin { addr, state, task }
    }

    fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
    }
}

async fn put_record(etcd: &EtcdServer, id: &str, admin: &str) {
    let record = ProxyRecord {
        id: id.to_string(),
        admin: admin.to_string(),
        applied_revision: None,
        pid: 1,
        started: 0,
    };
    let mut c = Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect");
    c.put(
        proxy_key(&Prefixes::default(), id),
        serde_json::to_vec(&record).unwrap(),
        None,
    )
    .await
    .expect("put a proxy record");
}

fn drained(revision: i64) -> Expectation {
    Expectation::Drained {
        service: "web".into(),
        id: "a".into(),
        revision,
    }
}

#[tokio::test]
async fn a_probe_reads_the_admin_api() {
    let admin = FakeAdmin::start(State {
        applied: Some(12),
        endpoints: vec![("a", "drain", 3)],
        without: None,
    })
    .await;
    let view = probe(&admin.addr, Duration::from_secs(2))
        .await
        .expect("probe");
    assert!(view.follows_etcd);
    assert_eq!(view.applied_revision, Some(12));
    let a = view.endpoint("web", "a").expect("web/a");
    assert_eq!((a.in_flight, a.state.as_str()), (3, "drain"));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let err = probe(&closed, Duration::from_secs(2))
        .await
        .expect_err("nothing listens");
    assert!(err.contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn waits_until_every_live_proxy_applied_and_stopped_sending() {
    let etcd = EtcdServer::start();
    let p1 = FakeAdmin::start(State {
        applied: Some(9),
        endpoints: vec![("a", "ready", 0), ("b", "ready", 4)],
        without: None,
    })
    .await;
    let p2 = FakeAdmin::start(State {
        applied: Some(10),
        endpoints: vec![("a", "drain", 2)],
        without: None,
    })
    .await;
    put_record(&etcd, "p1", &p1.addr).await;
    put_record(&etcd, "p2", &p2.addr).await;
    let mut c = Client::connect([etcd.endpoint()], None).await.unwrap();
    c.put("/pointsman/proxies/broken", "not json", None)
        .await
        .unwrap();

    let mut fleet = Fleet::new(EtcdOptions::new([etcd.endpoint()])).expect("fleet");
    let (records, malformed) = fleet.proxies().await.expect("list");
    assert_eq!(records.len(), 2);
    assert_eq!(malformed.len(), 1, "{malformed:?}");
    assert!(malformed[0].starts_with("/pointsman/proxies/broken: "));

    let check = fleet.check(&drained(10)).await;
    assert!(!check.confirmed());
    let summary = check.summary();
    assert!(
        summary.contains("0 of 2 proxies confirmed")
            && summary.contains("p1 (")
            && summary.contains("applied revision 9, waiting for 10")
            && summary.contains("2 requests in flight to web/a"),
        "{summary}"
    );

    // The proxies catch up while the fleet is being waited for.
    let (a1, a2) = (p1.state.clone(), p2.state.clone());
    let catch_up = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        a1.lock().unwrap().applied = Some(11);
        a1.lock().unwrap().endpoints = vec![("a", "drain", 1), ("b", "ready", 4)];
        tokio::time::sleep(Duration::from_millis(300)).await;
        a1.lock().unwrap().endpoints = vec![("b", "ready", 4)];
        a2.lock().unwrap().endpoints = vec![("a", "drain", 0)];
    });
    let mut rounds = Vec::new();
    let done = fleet
        .wait_until_drained(
            "web",
            "a",
            10,
            Instant::now() + Duration::from_secs(10),
            |c| rounds.push(c.summary()),
        )
        .await
        .expect("drained");
    catch_up.await.unwrap();
    assert!(done.confirmed());
    assert_eq!(done.summary(), "2 of 2 proxies confirmed");
    assert!(rounds.len() >= 3, "every round is reported: {rounds:?}");
    assert!(
        rounds
            .iter()
            .any(|r| r.contains("1 request in flight to web/a")),
        "{rounds:?}"
    );
    assert!(
        fleet
            .check(&Expectation::Applied { revision: 11 })
            .await
            .summary()
            .contains("waiting for p2"),
        "p2 is at 10"
    );
    p2.set(|s| s.applied = Some(11));
    assert!(fleet
        .check(&Expectation::Applied { revision: 11 })
        .await
        .confirmed());
}

#[tokio::test]
async fn a_proxy_leaves_the_set_only_once_it_has_stopped() {
    let etcd = EtcdServer::start();
    let p1 = FakeAdmin::start(State {
        applied: Some(20),
        endpoints: vec![],
        without: None,
    })
    .await;
    // Nothing listens here: a proxy that has exited.
    let stopped = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    // Listens but never answers: a frozen proxy (SIGSTOP) still has its
    // socket, and the kernel still accepts connections for it.
    let frozen_socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let frozen = frozen_socket.local_addr().unwrap().to_string();
    put_record(&etcd, "p1", &p1.addr).await;
    put_record(&etcd, "stopped", &stopped).await;
    put_record(&etcd, "frozen", &frozen).await;
    let mut fleet = Fleet::new(EtcdOptions::new([etcd.endpoint()])).expect("fleet");
    fleet.probe_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = fleet
        .wait_until(
            &drained(20),
            Instant::now() + Duration::from_millis(800),
            |_| {},
        )
        .await
        .expect_err("neither answers");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by the deadline"
    );
    let FleetError::Timeout { last, .. } = &err;
    assert_eq!(last.pending().count(), 2, "{}", last.summary());
    let text = err.to_string();
    assert!(
        text.contains("not confirmed within")
            && text.contains("stopped (")
            && text.contains("frozen (")
            && text.contains("admin API did not answer"),
        "{text}"
    );

    // Both records expire. The one whose address refuses connections has
    // exited and leaves the set, said so; the frozen one is still waited
    // for, and named with its record gone.
    let mut c = Client::connect([etcd.endpoint()], None).await.unwrap();
    for id in ["stopped", "frozen"] {
        c.delete(proxy_key(&Prefixes::default(), id), None)
            .await
            .unwrap();
    }
    let mut rounds = Vec::new();
    let err = fleet
        .wait_until(
            &drained(20),
            Instant::now() + Duration::from_millis(1500),
            |c| rounds.push(c.clone()),
        )
        .await
        .expect_err("the frozen proxy is still waited for");
    let left: Vec<_> = rounds.iter().flat_map(|r| r.left.clone()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].id, "stopped");
    assert!(left[0].why.contains("nothing listens"), "{left:?}");
    let text = err.to_string();
    assert!(
        text.contains("1 of 2 proxies confirmed")
            && text.contains("frozen (")
            && text.contains("record in etcd is gone"),
        "{text}"
    );
    drop(frozen_socket);
    let ok = fleet
        .wait_until(
            &drained(20),
            Instant::now() + Duration::from_secs(5),
            |_| {},
        )
        .await
        .expect("the frozen one has exited too");
    assert!(
        ok.summary().starts_with("1 of 1 proxy confirmed"),
        "{}",
        ok.summary()
    );
}

#[tokio::test]
async fn a_proxy_named_by_address_is_waited_for_without_a_record() {
    let etcd = EtcdServer::start();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut fleet = Fleet::new(EtcdOptions::new([etcd.endpoint()])).expect("fleet");
    fleet.name(&closed);
    let check = fleet.check(&drained(1)).await;
    assert!(!check.confirmed(), "{}", check.summary());
    assert!(check.left.is_empty(), "a named proxy never leaves unasked");
    assert!(check.summary().contains(&closed), "{}", check.summary());
}

#[tokio::test]
async fn an_empty_fleet_confirms_nothing_unless_expected_and_an_unreachable_etcd_never() {
    let mut etcd = EtcdServer::start();
    let mut fleet = Fleet::new(EtcdOptions::new([etcd.endpoint()])).expect("fleet");
    let check = fleet.check(&drained(1)).await;
    assert!(!check.confirmed());
    assert!(
        check.summary().starts_with("no proxy is known"),
        "{}",
        check.summary()
    );
    fleet.allow_empty = true;
    assert!(fleet.check(&drained(1)).await.confirmed());
    etcd.stop();
    let mut opts = EtcdOptions::new([etcd.endpoint()]);
    opts.connect_timeout = Duration::from_millis(300);
    opts.request_timeout = Duration::from_millis(500);
    let mut fleet = Fleet::new(opts).expect("fleet");
    let check = fleet.check(&drained(1)).await;
    assert!(!check.confirmed());
    assert!(
        check
            .summary()
            .starts_with("cannot list the proxies: etcd at "),
        "{}",
        check.summary()
    );
}

#[tokio::test]
async fn a_proxy_answer_without_in_flight_is_refused_by_name() {
    let admin = FakeAdmin::start(State {
        applied: Some(5),
        endpoints: vec![("a", "drain", 0)],
        without: Some("in_flight"),
    })
    .await;
    let err = probe(&admin.addr, Duration::from_secs(5))
        .await
        .expect_err("an endpoint without in_flight read as drained");
    assert!(err.contains("missing field `in_flight`"), "{err}");
    assert!(err.contains(&admin.addr), "{err}");
    let verdicts = ask_all(
        vec![("edge-1".into(), admin.addr.clone())],
        Duration::from_secs(5),
        |view| judge_drained(view, "web", "a"),
    )
    .await;
    let pending = verdicts[0].pending.as_deref().unwrap_or("");
    assert!(pending.contains("in_flight"), "{pending}");
    assert_eq!(verdicts[0].id, "edge-1");
}
