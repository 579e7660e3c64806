//! End to end: drains that never drop a proxy silently. Real proxies follow
//! a real etcd; `pointsman register` and `pointsman deploy` drain instances
//! while one proxy is cut off from etcd (its only route to etcd goes
//! through a relay the test cuts) or frozen (SIGSTOP).
//!
//! What is covered: a proxy cut off from etcd, whose record has expired,
//! is still asked and told of the drain directly, so its slow requests in
//! flight finish before the app is signalled; a frozen proxy makes
//! `register` and `deploy rolling` wait, name it and stop without
//! stopping the instance, or go on with `--on-unconfirmed proceed`,
//! saying so; an empty fleet confirms nothing unless `--empty-fleet-ok`.

mod support;

use std::time::{Duration, Instant};

use pointsman_testkit::relay::CutRelay;
use serde_json::Value;
use support::etcd::{etcdctl, put, start_proxy, wait_applied, EtcdServer};
use support::registry::{listener_config, wait_in_flight, wait_ready};
use support::sidekick::{alive, spawn_long_request, Sidekick};
use support::*;

/// Whether `key` exists in etcd.
async fn exists(etcd: &EtcdServer, key: &str) -> bool {
    let json: Value = serde_json::from_str(&etcdctl(etcd, &["-w", "json", "get", key]).await)
        .expect("etcdctl -w json");
    json["kvs"].as_array().is_some_and(|k| !k.is_empty())
}

/// `pointsman deploy --etcd <etcd> <args>`: exit code, stdout, stderr.
async fn deploy(etcd: &EtcdServer, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN)
        .arg("deploy")
        .arg("--etcd")
        .arg(etcd.endpoint())
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("POINTSMAN_ETCD")
        .env_remove("POINTSMAN_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("deploy ends within 60s")
        .expect("run pointsman deploy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A proxy cut off from etcd keeps serving what it last knew, and its
/// record expires. SIGTERM to the sidekick of the instance its slow
/// requests are on: the sidekick still asks that proxy (it knew it from
/// before), tells it of the drain over its admin API, and waits until its
/// requests are done; every one of them completes, and the app gets its
/// SIGTERM only after the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_etcd_is_told_of_the_drain_and_waited_for() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    let relay = CutRelay::start(etcd.client_port()).await;
    let relay_endpoint = relay.endpoint();
    let p1 = Proxy::start_with_args(
        || listener_config(free_addr(), Some("web")),
        &[
            "--etcd",
            &relay_endpoint,
            "--proxy-id",
            "p1",
            "--threads",
            "1",
        ],
    )
    .await;
    let p2 = start_proxy(&etcd, "p2", Some("web")).await;
    let proxies = [&p1, &p2];
    let mut x = Sidekick::start(
        "--etcd",
        &endpoint,
        "x",
        free_addr(),
        &["--drain-timeout", "40s"],
        true,
    );
    let _y = Sidekick::start("--etcd", &endpoint, "y", free_addr(), &[], true);
    wait_ready(&proxies, "web", &["x", "y"]).await;
    // Requests to p1 go to x alone from now on.
    let rev = put(&etcd, "/pointsman/overrides/web/y", r#"{"state":"maint"}"#).await;
    wait_applied(&proxies, rev).await;

    relay.cut();
    let cut = Instant::now();
    wait_for(
        Duration::from_secs(25),
        "p1's record expired in etcd",
        || async { !exists(&etcd, "/pointsman/proxies/p1").await },
    )
    .await;
    eprintln!("p1's record expired {:?} after the cut", cut.elapsed());

    // Still serving (fail static): slow requests on p1, all on x.
    let long: Vec<_> = (0..3)
        .map(|_| spawn_long_request(p1.url("/slow?ms=4000")))
        .collect();
    wait_in_flight(&p1, "web", "x").await;

    sigterm(x.child.id());
    let status = x.wait_exit(Duration::from_secs(45)).await;
    let log = x.stderr();
    let mut last_done = 0;
    for l in long {
        let (code, server, done_ns) = l.await.expect("a long request");
        assert_eq!(
            (code, server.as_str()),
            (200, "x"),
            "a request in flight on the cut-off proxy completed\n{log}"
        );
        last_done = last_done.max(done_ns);
    }
    let term_ns = x.term_ns().expect("the app noted its SIGTERM");
    assert!(
        term_ns > last_done,
        "the app got SIGTERM {} ms before the cut-off proxy's last request finished\n{log}",
        (last_done - term_ns) / 1_000_000
    );
    assert_eq!(status.code(), Some(7), "the app's exit code\n{log}");
    x.assert_logged_drain_steps();
    assert!(log.contains("2 of 2 proxies confirmed"), "{log}");
    // p1 holds x in drain on the notice, until it applies the revision.
    let ep = p1.endpoint("web", "x").await;
    assert_eq!(ep["state"], "drain", "{ep}");
    assert!(ep["drain_notice"].as_i64().is_some(), "{ep}");
}

/// A frozen proxy (SIGSTOP) during a `register` drain: the sidekick waits
/// until the drain timeout, names it, and exits 75 without signalling the
/// app; with `--on-unconfirmed proceed` it names it and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_proxy_stops_a_register_drain_unless_told_to_proceed() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    let p1 = start_proxy(&etcd, "p1", Some("web")).await;
    let p2 = start_proxy(&etcd, "p2", Some("web")).await;
    let mut x = Sidekick::start(
        "--etcd",
        &endpoint,
        "x",
        free_addr(),
        &["--drain-timeout", "3s"],
        true,
    );
    let mut z = Sidekick::start(
        "--etcd",
        &endpoint,
        "z",
        free_addr(),
        &["--drain-timeout", "2s", "--on-unconfirmed", "proceed"],
        true,
    );
    wait_ready(&[&p1, &p2], "web", &["x", "z"]).await;

    signal(p1.pid(), "STOP");
    let started = Instant::now();
    sigterm(x.child.id());
    let status = x.wait_exit(Duration::from_secs(20)).await;
    let log = x.stderr();
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "waited the drain timeout"
    );
    assert!(
        log.contains("the drain is not confirmed")
            && log.contains("p1 (")
            && log.contains("admin API did not answer")
            && log.contains("--on-unconfirmed proceed"),
        "{log}"
    );
    assert!(x.term_ns().is_none(), "the app was not signalled\n{log}");
    let app = x.read_pid("upstream.pid").expect("the app's pid");
    assert!(alive(app), "the app still runs");

    sigterm(z.child.id());
    let status = z.wait_exit(Duration::from_secs(20)).await;
    let log = z.stderr();
    signal(p1.pid(), "CONT");
    assert_eq!(status.code(), Some(7), "the app's exit code\n{log}");
    assert!(
        log.contains("going on as --on-unconfirmed proceed asks") && log.contains("p1 ("),
        "{log}"
    );
    assert!(z.term_ns().is_some(), "the app was signalled");
}

/// No proxy at all: a drain confirms nothing, so the sidekick does not
/// stop the app, unless told the fleet is empty on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_fleet_confirms_no_drain_unless_expected() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    let mut x = Sidekick::start(
        "--etcd",
        &endpoint,
        "x",
        free_addr(),
        &["--drain-timeout", "1s"],
        true,
    );
    let mut y = Sidekick::start(
        "--etcd",
        &endpoint,
        "y",
        free_addr(),
        &["--drain-timeout", "1s", "--empty-fleet-ok"],
        true,
    );
    for s in [&x, &y] {
        let key = s.key();
        wait_for(Duration::from_secs(15), "registered", || async {
            exists(&etcd, &key).await
        })
        .await;
    }
    sigterm(x.child.id());
    sigterm(y.child.id());
    let (sx, sy) = (
        x.wait_exit(Duration::from_secs(15)).await,
        y.wait_exit(Duration::from_secs(15)).await,
    );
    let log = x.stderr();
    assert_eq!(sx.code(), Some(75), "{log}");
    assert!(log.contains("no proxy is known"), "{log}");
    assert_eq!(sy.code(), Some(7), "{}", y.stderr());
}

/// A frozen proxy during `deploy rolling`: the rollout waits the drain
/// timeout, names the proxy and stops without stopping the instance (its
/// state put back); with `--on-unconfirmed proceed` it says so and stops
/// the instance anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_proxy_stops_a_rolling_deploy_unless_told_to_proceed() {
    let etcd = EtcdServer::start();
    let ups = Upstream::start_many(&["a1", "a2"]).await;
    for u in &ups {
        put(
            &etcd,
            &format!("/services/web/{}", u.name),
            &u.addr.to_string(),
        )
        .await;
    }
    let p1 = start_proxy(&etcd, "p1", Some("web")).await;
    let p2 = start_proxy(&etcd, "p2", Some("web")).await;
    wait_ready(&[&p1, &p2], "web", &["a1", "a2"]).await;
    let marks = tempfile::tempdir().expect("a temp dir");
    let stop_cmd = format!("touch {}/{{id}}.stopped", marks.path().display());
    let rolling = |extra: &'static [&'static str]| {
        let mut args = vec![
            "rolling",
            "--service",
            "web",
            "--stop-cmd",
            &stop_cmd,
            "--start-cmd",
            "true",
            "--drain-timeout",
            "2s",
            "--health-timeout",
            "2s",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_string).collect::<Vec<_>>()
    };

    signal(p1.pid(), "STOP");
    let args = rolling(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = deploy(&etcd, &args).await;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("not drained on every proxy within 2s, so it is not stopped")
            && err.contains("p1 (")
            && err.contains("admin API did not answer"),
        "{out}{err}"
    );
    assert!(out.contains("web/a1: previous state restored"), "{out}");
    assert!(
        !marks.path().join("a1.stopped").exists(),
        "the instance was not stopped"
    );

    let args = rolling(&["--on-unconfirmed", "proceed"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = deploy(&etcd, &args).await;
    signal(p1.pid(), "CONT");
    assert!(
        out.contains(
            "web/a1: drain not confirmed within 2s; stopping it anyway (--on-unconfirmed proceed)"
        ) && out.contains("p1 ("),
        "{out}{err}"
    );
    assert!(
        marks.path().join("a1.stopped").exists(),
        "the instance was stopped"
    );
    // Its new registration never comes (the start command is `true`).
    assert_ne!(code, 0, "{out}{err}");
}

/// `deploy` with no proxy registered: nothing can confirm a step, so it
/// stops at once and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_with_no_proxy_says_so_and_stops() {
    let etcd = EtcdServer::start();
    let up = Upstream::start("b1").await;
    put(&etcd, "/services/blue/b1", &up.addr.to_string()).await;
    let started = Instant::now();
    let (code, out, err) = deploy(
        &etcd,
        &[
            "switch",
            "--map",
            "colour",
            "--key",
            "live",
            "--to",
            "blue",
            "--timeout",
            "20s",
        ],
    )
    .await;
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("no proxy is known"), "{out}{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "no point waiting: {:?}",
        started.elapsed()
    );
}

/// A registration changing every second for 60 s: the proxy rewrites its
/// record at every revision it applies, and the record's lease is kept
/// alive all the same. Watched, not sampled: not one delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_record_stays_while_registrations_change_every_second() {
    let etcd = EtcdServer::start();
    let p1 = start_proxy(&etcd, "p1", Some("web")).await;
    let key = "/pointsman/proxies/p1";
    wait_for(Duration::from_secs(15), "p1's record", || async {
        exists(&etcd, key).await
    })
    .await;
    let mut watch = tokio::process::Command::from(etcd.etcdctl());
    let mut watch = watch
        .args(["watch", key])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("etcdctl watch");
    let mut lines = {
        use tokio::io::AsyncBufReadExt;
        tokio::io::BufReader::new(watch.stdout.take().expect("its stdout")).lines()
    };
    let seen = tokio::spawn(async move {
        let (mut puts, mut deletes) = (0u32, 0u32);
        while let Ok(Some(line)) = lines.next_line().await {
            match line.as_str() {
                "PUT" => puts += 1,
                "DELETE" => deletes += 1,
                _ => {}
            }
        }
        (puts, deletes)
    });
    let up = Upstream::start("a").await;
    let mut rev = 0;
    for i in 0..60u32 {
        let weight = 1 + i % 5;
        rev = put(
            &etcd,
            "/services/web/a",
            &format!(r#"{{"address":"{}","weight":{weight}}}"#, up.addr),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_applied(&[&p1], rev).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = watch.kill().await;
    let (puts, deletes) = seen.await.expect("the watch reader");
    assert_eq!(deletes, 0, "p1's record vanished {deletes} times");
    assert!(
        puts >= 50,
        "the record follows the revisions: {puts} writes"
    );
    assert!(exists(&etcd, key).await);
}

/// A proxy that is stopping still answers on its admin address until its
/// last request is over, and only then refuses connections: that refusal
/// is what lets the tools drop it from the set of proxies to wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_proxy_answers_its_admin_api_until_its_requests_end() {
    let etcd = EtcdServer::start();
    let up = Upstream::start("slowpoke").await;
    put(&etcd, "/services/web/slowpoke", &up.addr.to_string()).await;
    let mut p1 = start_proxy(&etcd, "p1", Some("web")).await;
    wait_ready(&[&p1], "web", &["slowpoke"]).await;
    let long = spawn_long_request(p1.url("/slow?ms=3000"));
    wait_in_flight(&p1, "web", "slowpoke").await;
    let admin = p1.admin_url("/api/services");
    sigterm(p1.pid());
    // Draining: the client listener is closed, the admin API answers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = plain_client()
        .get(&admin)
        .send()
        .await
        .expect("the admin API answers while the proxy drains");
    assert!(during.status().is_success());
    let (code, server, _) = long.await.expect("the long request");
    assert_eq!((code, server.as_str()), (200, "slowpoke"));
    let status = wait_exit(p1.child(), Duration::from_secs(15), "the proxy").await;
    assert!(status.success(), "{status}");
    let after = plain_client().get(&admin).send().await;
    assert!(
        after.as_ref().is_err_and(|e| e.is_connect()),
        "nothing listens once it has exited: {after:?}"
    );
}
