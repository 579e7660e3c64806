//! End to end: `pointsman register` beside real apps, in front of real
//! proxies following a real etcd.
//!
//! What is covered: a SIGTERM under load drains with zero failed requests,
//! a long request in flight finishes, and the app gets its SIGTERM only
//! after both proxies reported nothing in flight to it; an app that dies is
//! deregistered at once; a sidekick killed with SIGKILL leaves its lease to
//! expire; a lost lease and an etcd restart end with the app registered;
//! an app that never becomes healthy is given up on; a bad address and an
//! etcd that is down at start are reported clearly; and each proxy keeps
//! its own record (admin address, applied revision) in etcd.

mod support;

#[path = "../discovery/tests/support/etcd.rs"]
mod etcd_support;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_support::EtcdServer;
use serde_json::Value;
use support::*;

/// How long a registry change gets to reach the proxies.
const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// etcd through etcdctl

async fn etcdctl(etcd: &EtcdServer, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::from(etcd.etcdctl());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("etcdctl {args:?} did not finish within 15 s"))
        .unwrap_or_else(|e| panic!("cannot run etcdctl {args:?} (install etcd-client): {e}"));
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value and lease of `key`, if it exists.
async fn get(etcd: &EtcdServer, key: &str) -> Option<(String, i64)> {
    let json: Value = serde_json::from_str(&etcdctl(etcd, &["-w", "json", "get", key]).await)
        .expect("etcdctl -w json");
    let kv = json["kvs"].as_array()?.first()?.clone();
    let value = etcdctl(etcd, &["get", "--print-value-only", key]).await;
    Some((
        value.trim_end().to_string(),
        kv["lease"].as_i64().unwrap_or(0),
    ))
}

async fn put(etcd: &EtcdServer, key: &str, value: &str) -> i64 {
    let out: Value = serde_json::from_str(&etcdctl(etcd, &["-w", "json", "put", key, value]).await)
        .expect("etcdctl -w json put");
    out["header"]["revision"].as_i64().expect("a revision")
}

async fn del(etcd: &EtcdServer, key: &str) -> i64 {
    let out: Value = serde_json::from_str(&etcdctl(etcd, &["-w", "json", "del", key]).await)
        .expect("etcdctl -w json del");
    out["header"]["revision"].as_i64().expect("a revision")
}

/// Waits until `cond` holds for `key`'s value and lease.
async fn wait_key(
    etcd: &EtcdServer,
    key: &str,
    deadline: Duration,
    what: &str,
    cond: impl Fn(&Option<(String, i64)>) -> bool,
) -> Option<(String, i64)> {
    let end = Instant::now() + deadline;
    loop {
        let now = get(etcd, key).await;
        if cond(&now) {
            return now;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}; {key} is {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Proxies

fn config(listen: SocketAddr) -> String {
    format!("[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\ndefault_service = \"web\"\n")
}

async fn start_proxy(etcd: &EtcdServer, id: &str) -> Proxy {
    let endpoint = etcd.endpoint();
    Proxy::start_with_args(
        || config(free_addr()),
        &["--etcd", &endpoint, "--proxy-id", id, "--threads", "1"],
    )
    .await
}

/// The etcd revision a proxy has applied.
async fn applied(proxy: &Proxy) -> Option<i64> {
    let all: Value = plain_client()
        .get(proxy.admin_url("/api/discovery"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    all.as_array()?.iter().find(|s| s["source"] == "etcd")?["applied_revision"].as_i64()
}

async fn wait_applied(proxy: &Proxy, rev: i64) {
    wait_for(
        CHANGE_DEADLINE,
        &format!("the proxy applied revision {rev}"),
        || async { applied(proxy).await >= Some(rev) },
    )
    .await;
}

/// `web`'s endpoints in a proxy: id -> (state, in_flight).
async fn endpoints(proxy: &Proxy) -> BTreeMap<String, (String, u64)> {
    let Ok(resp) = plain_client()
        .get(proxy.admin_url("/api/services"))
        .send()
        .await
    else {
        return BTreeMap::new();
    };
    let all: Value = resp.json().await.unwrap_or(Value::Null);
    let mut out = BTreeMap::new();
    if let Some(eps) = all
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "web"))
        .and_then(|s| s["endpoints"].as_array())
    {
        for e in eps {
            out.insert(
                e["id"].as_str().unwrap_or("").to_string(),
                (
                    e["state"].as_str().unwrap_or("").to_string(),
                    e["in_flight"].as_u64().unwrap_or(0),
                ),
            );
        }
    }
    out
}

/// Waits until every proxy has exactly the `ready` endpoints `ids`.
async fn wait_ready(proxies: &[&Proxy], ids: &[&str]) {
    for p in proxies {
        wait_for(
            CHANGE_DEADLINE,
            &format!("the proxy has exactly the ready endpoints {ids:?}"),
            || async {
                let eps = endpoints(p).await;
                eps.len() == ids.len()
                    && ids
                        .iter()
                        .all(|id| eps.get(*id).is_some_and(|(s, _)| s == "ready"))
            },
        )
        .await;
    }
}

// ---------------------------------------------------------------------------
// Sidekicks and their apps

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos()
}

/// The app the sidekicks run: `pointsman upstream` behind a shell that
/// notes its pids and, on SIGTERM, the time it came (ns since the epoch)
/// before passing it on and exiting 7.
const APP: &str = r#"
dir=$4
echo $$ > "$dir/app.pid"
trap 'date +%s%N > "$dir/term"; kill -TERM "$child" 2>/dev/null; wait "$child"; exit 7' TERM
"$1" upstream --listen "$2" --name "$3" &
child=$!
echo "$child" > "$dir/upstream.pid"
wait "$child"
"#;

/// A running `pointsman register`, with its app's files in a temporary
/// directory. Kills the sidekick and its app when dropped.
struct Sidekick {
    child: Child,
    dir: tempfile::TempDir,
    stderr_path: PathBuf,
    id: String,
}

impl Sidekick {
    /// `pointsman register ... --id <id> --address <addr> <extra> -- <APP>`
    /// (no app when `with_app` is false).
    fn start(etcd: &str, id: &str, addr: SocketAddr, extra: &[&str], with_app: bool) -> Sidekick {
        let dir = tempfile::tempdir().expect("a temp dir");
        let stderr_path = dir.path().join("stderr.log");
        let mut cmd = Command::new(BIN);
        cmd.args(["register", "--etcd", etcd, "--service", "web", "--id", id])
            .arg("--address")
            .arg(addr.to_string())
            .args(extra);
        if with_app {
            cmd.args(["--", "sh", "-c", APP, "app", BIN])
                .arg(addr.to_string())
                .arg(id)
                .arg(dir.path());
        }
        let child = cmd
            .env("NO_COLOR", "1")
            .env("POINTSMAN_LOG", "info")
            .env_remove("POINTSMAN_ETCD")
            .env_remove("POINTSMAN_SERVICE")
            .env_remove("POINTSMAN_ADDRESS")
            .env_remove("POINTSMAN_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).expect("create the stderr file"))
            .spawn()
            .expect("spawn pointsman register");
        Sidekick {
            child,
            dir,
            stderr_path,
            id: id.to_string(),
        }
    }

    fn key(&self) -> String {
        format!("/services/web/{}", self.id)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn read_pid(&self, file: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// When the app got its SIGTERM, in ns since the epoch.
    fn term_ns(&self) -> Option<u128> {
        std::fs::read_to_string(self.dir.path().join("term"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let status = wait_exit(&mut self.child, deadline, "the sidekick").await;
        eprintln!("--- sidekick {} stderr ---\n{}", self.id, self.stderr());
        status
    }
}

impl Drop for Sidekick {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in ["upstream.pid", "app.pid"] {
            if let Some(pid) = self.read_pid(f) {
                signal(pid, "KILL");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tests

/// Two proxies, three instances under load; SIGTERM to one sidekick while a
/// long request is in flight to its app: no request fails, the long one
/// finishes, and the app gets SIGTERM only after both proxies show nothing
/// in flight to it; then it is gone from both, and its exit code is the
/// sidekick's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_proxy_before_the_app_is_signalled() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    let p1 = start_proxy(&etcd, "p1").await;
    let p2 = start_proxy(&etcd, "p2").await;
    let proxies = [&p1, &p2];
    let mut x = Sidekick::start(
        &endpoint,
        "x",
        free_addr(),
        &["--check-http", "/", "--drain-timeout", "20s"],
        true,
    );
    let _y = Sidekick::start(&endpoint, "y", free_addr(), &[], true);
    let _z = Sidekick::start(&endpoint, "z", free_addr(), &[], true);
    wait_ready(&proxies, &["x", "y", "z"]).await;

    // A long request that is certainly on x: y and z in maint meanwhile.
    put(&etcd, "/pointsman/overrides/web/y", r#"{"state":"maint"}"#).await;
    let rev = put(&etcd, "/pointsman/overrides/web/z", r#"{"state":"maint"}"#).await;
    wait_applied(&p1, rev).await;
    let long_url = p1.url("/slow?ms=5000");
    let long = tokio::spawn(async move {
        let (status, echo) = get_echo(&plain_client(), &long_url, &[]).await;
        (
            status,
            echo["server"].as_str().unwrap_or("").to_string(),
            now_ns(),
        )
    });
    wait_for(
        CHANGE_DEADLINE,
        "the long request is in flight on x",
        || async { endpoints(&p1).await.get("x").is_some_and(|(_, n)| *n >= 1) },
    )
    .await;
    del(&etcd, "/pointsman/overrides/web/y").await;
    let rev = del(&etcd, "/pointsman/overrides/web/z").await;
    for p in proxies {
        wait_applied(p, rev).await;
    }

    // Load: keep-alive clients on both proxies, every answer counted.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let served: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let mut load = Vec::new();
    for i in 0..16 {
        let url = proxies[i % 2].url("/");
        let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
        load.push(tokio::spawn(async move {
            let client = client();
            let end = Instant::now() + Duration::from_secs(45);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let echo: Value = r.json().await.unwrap_or(Value::Null);
                        let server = echo["server"].as_str().unwrap_or("?").to_string();
                        *served.lock().unwrap().entry(server).or_insert(0) += 1;
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{url}: status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("{url}: {e}")),
                }
            }
        }));
    }
    // The last moment either proxy showed a request in flight to x.
    let last_busy = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (stop, last_busy) = (stop.clone(), last_busy.clone());
        let admins = [p1.admin_url("/api/services"), p2.admin_url("/api/services")];
        tokio::spawn(async move {
            let client = plain_client();
            let end = Instant::now() + Duration::from_secs(45);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                for url in &admins {
                    let before = now_ns();
                    let Ok(r) = client.get(url).send().await else {
                        continue;
                    };
                    let all: Value = r.json().await.unwrap_or(Value::Null);
                    let busy = all
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|s| s["name"] == "web")
                        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                        .any(|e| e["id"] == "x" && e["in_flight"].as_u64().unwrap_or(0) > 0);
                    if busy {
                        // Seen busy at some time at or after `before`.
                        last_busy.fetch_max((before / 1000) as u64, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    wait_until(CHANGE_DEADLINE, "the load reaches x, y and z", || {
        let s = served.lock().unwrap();
        ["x", "y", "z"]
            .iter()
            .all(|id| s.get(*id).copied().unwrap_or(0) >= 20)
    })
    .await;

    let signalled = Instant::now();
    sigterm(x.child.id());
    let status = x.wait_exit(Duration::from_secs(30)).await;
    let took = signalled.elapsed();
    let (long_status, long_server, long_done_ns) = long.await.expect("the long request");
    // The load goes on a little after x left, then stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("a load task");
    }
    monitor.await.expect("the monitor");

    let failures = failures.lock().unwrap().clone();
    let served = served.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed; first: {:?}",
        failures.len(),
        failures.len() + served.values().sum::<usize>(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        served.values().sum::<usize>() >= 200,
        "too little load: {served:?}"
    );
    assert_eq!(
        (long_status, long_server.as_str()),
        (200, "x"),
        "the long request finished on x"
    );
    let term_ns = x.term_ns().expect("the app noted its SIGTERM");
    let last_busy_ns = u128::from(last_busy.load(Ordering::Relaxed)) * 1000;
    assert!(
        last_busy_ns > 0,
        "the monitor saw the long request in flight"
    );
    assert!(
        term_ns > long_done_ns,
        "the app got SIGTERM {} ms before the long request finished",
        (long_done_ns - term_ns) / 1_000_000
    );
    assert!(
        term_ns > last_busy_ns,
        "the app got SIGTERM while a proxy still showed a request in flight to it"
    );
    assert!(
        took >= Duration::from_secs(1),
        "the drain waited for the long request ({took:?})"
    );
    assert_eq!(
        status.code(),
        Some(7),
        "the app's exit code is the sidekick's"
    );

    let log = x.stderr();
    let order = [
        "state drain written",
        "every proxy stopped sending",
        "deregistered",
        "passing the signal to the app",
    ];
    let at: Vec<Option<usize>> = order.iter().map(|m| log.find(m)).collect();
    assert!(
        at.iter().all(Option::is_some) && at.windows(2).all(|w| w[0] < w[1]),
        "the sidekick logs {order:?} in that order:\n{log}"
    );
    assert!(log.contains("2 of 2 proxies confirmed"), "{log}");
    assert_eq!(get(&etcd, &x.key()).await, None, "deregistered");
    wait_ready(&proxies, &["y", "z"]).await;
}

/// The app dies (SIGKILL): the sidekick deletes the registration at once,
/// not a TTL later, and exits as the app did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_app_is_deregistered_at_once() {
    let etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, "p1").await;
    let mut s = Sidekick::start(&etcd.endpoint(), "a", free_addr(), &["--ttl", "30s"], true);
    wait_ready(&[&proxy], &["a"]).await;
    assert_eq!(
        support::server_of(&client(), &proxy.url("/"), &[]).await,
        "a"
    );
    let app = s.read_pid("app.pid").expect("the app's pid");
    let killed = Instant::now();
    signal(app, "KILL");
    wait_key(
        &etcd,
        &s.key(),
        Duration::from_secs(5),
        "the registration is gone",
        |v| v.is_none(),
    )
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "deregistered {:?} after the app died (TTL 30 s)",
        killed.elapsed()
    );
    let status = s.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(137), "128 + SIGKILL");
    wait_ready(&[&proxy], &[]).await;
    assert!(s.stderr().contains("the app exited: deregistering at once"));
}

/// The sidekick is killed (SIGKILL) and cannot deregister: the registration
/// stays until its lease expires, then vanishes from etcd and the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidekick_leaves_its_lease_to_expire() {
    let etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, "p1").await;
    let s = Sidekick::start(&etcd.endpoint(), "k", free_addr(), &["--ttl", "3s"], true);
    wait_ready(&[&proxy], &["k"]).await;
    let killed = Instant::now();
    signal(s.child.id(), "KILL");
    assert!(
        get(&etcd, &s.key()).await.is_some(),
        "still registered right after"
    );
    wait_key(
        &etcd,
        &s.key(),
        Duration::from_secs(10),
        "the lease expired",
        |v| v.is_none(),
    )
    .await;
    let gone = killed.elapsed();
    assert!(
        gone >= Duration::from_secs(2) && gone < Duration::from_secs(9),
        "a 3 s lease expired after {gone:?}"
    );
    wait_ready(&[&proxy], &[]).await;
}

/// A sidekick without a command (the app runs beside it): registered again
/// when its lease is revoked and after an etcd restart; on SIGTERM it
/// drains, deregisters and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_and_an_etcd_restart_end_registered() {
    let mut etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, "p1").await;
    let app = Upstream::start("r").await;
    let mut s = Sidekick::start(&etcd.endpoint(), "r", app.addr, &["--ttl", "3s"], false);
    wait_ready(&[&proxy], &["r"]).await;
    let (_, lease) = get(&etcd, &s.key()).await.expect("registered");
    assert_ne!(lease, 0, "under a lease");

    etcdctl(&etcd, &["lease", "revoke", &format!("{lease:x}")]).await;
    let (_, again) = wait_key(
        &etcd,
        &s.key(),
        CHANGE_DEADLINE,
        "registered under a new lease",
        |v| v.as_ref().is_some_and(|(_, l)| *l != 0 && *l != lease),
    )
    .await
    .expect("registered again");
    wait_ready(&[&proxy], &["r"]).await;

    etcd.restart();
    // Kept alive over the restart, and for longer than the TTL after it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, after) = wait_key(
        &etcd,
        &s.key(),
        CHANGE_DEADLINE,
        "registered after the restart",
        |v| v.is_some(),
    )
    .await
    .expect("registered");
    assert_ne!(after, 0);
    wait_ready(&[&proxy], &["r"]).await;
    assert!(
        s.stderr().contains("the lease was lost: registering again"),
        "the revoked lease is reported:\n{}",
        s.stderr()
    );
    let _ = again;

    sigterm(s.child.id());
    let status = s.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(get(&etcd, &s.key()).await, None);
    assert!(
        alive(app.pid()),
        "without a command, nothing else is signalled"
    );
}

/// An app that never passes its check: given up on after --check-timeout,
/// stopped, nothing registered, exit code 1 and the reason on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_never_becomes_healthy_is_given_up_on() {
    let etcd = EtcdServer::start();
    let mut s = Sidekick::start(
        &etcd.endpoint(),
        "sick",
        free_addr(),
        &["--check-http", "/status/503", "--check-timeout", "2s"],
        true,
    );
    let status = s.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(1));
    let log = s.stderr();
    assert!(
        log.contains("did not pass its check within 2s") && log.contains("status 503"),
        "{log}"
    );
    assert_eq!(get(&etcd, &s.key()).await, None, "never registered");
    let app = s.read_pid("app.pid").expect("the app's pid");
    assert!(!alive(app), "the app was stopped");
    assert!(s.term_ns().is_some(), "with SIGTERM");
}

/// Usage errors exit 2 and say what was expected; an etcd that is down at
/// start is retried, and said so, until it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_addresses_are_refused_and_a_down_etcd_is_waited_for() {
    let (code, _, err) = run_cli(&[
        "register",
        "--etcd",
        "http://127.0.0.1:1",
        "--service",
        "web",
        "--address",
        "10.0.0.5",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--address") && err.contains("expected host:port"),
        "{err}"
    );
    let (code, _, err) = run_cli(&[
        "register",
        "--etcd",
        "http://127.0.0.1:1",
        "--service",
        "web",
        "--address",
        "0.0.0.0:80",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not an address proxies can reach"), "{err}");
    let (code, _, err) = run_cli(&[
        "register",
        "--etcd",
        "http://127.0.0.1:1",
        "--service",
        "web/x",
        "--address",
        "127.0.0.1:80",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("must not contain '/'"), "{err}");

    let mut etcd = EtcdServer::start();
    etcd.stop();
    let app = Upstream::start("late").await;
    let s = Sidekick::start(&etcd.endpoint(), "late", app.addr, &[], false);
    let want = format!("etcd at {} unreachable", etcd.endpoint());
    wait_until(
        CHANGE_DEADLINE,
        "the sidekick says etcd is unreachable",
        || {
            let log = s.stderr();
            log.contains(&want) && log.contains("retrying in")
        },
    )
    .await;
    etcd.restart();
    wait_key(
        &etcd,
        &s.key(),
        Duration::from_secs(15),
        "registered once etcd is up",
        |v| v.is_some(),
    )
    .await;
}

/// Each proxy keeps `/pointsman/proxies/<id>`: its admin address and the
/// revision it applied, rewritten when that changes, deleted when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_a_record_of_what_they_applied() {
    let etcd = EtcdServer::start();
    let mut proxy = start_proxy(&etcd, "edge-1").await;
    let key = "/pointsman/proxies/edge-1";
    let (first, lease) = wait_key(
        &etcd,
        key,
        CHANGE_DEADLINE,
        "the proxy's record exists",
        |v| v.is_some(),
    )
    .await
    .expect("a record");
    assert_ne!(lease, 0, "under a lease");
    let record: Value = serde_json::from_str(&first).expect("the record is JSON");
    assert_eq!(record["id"], "edge-1");
    assert_eq!(record["admin"], proxy.admin.to_string());
    assert_eq!(record["pid"], proxy.pid());

    let rev = put(&etcd, "/services/web/a", "127.0.0.1:9").await;
    wait_key(
        &etcd,
        key,
        CHANGE_DEADLINE,
        "the record carries the new revision",
        |v| {
            v.as_ref()
                .and_then(|(text, _)| serde_json::from_str::<Value>(text).ok())
                .and_then(|r| r["applied_revision"].as_i64())
                >= Some(rev)
        },
    )
    .await;

    sigterm(proxy.pid());
    wait_exit(proxy.child(), Duration::from_secs(15), "the proxy").await;
    assert_eq!(get(&etcd, key).await, None, "deleted on a clean stop");
}

#[test]
fn register_help_lists_its_flags() {
    let (code, out, _) = run_cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("register"), "`pointsman --help`:\n{out}");
    let (code, out, _) = run_cli(&["register", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--etcd",
        "--service",
        "--address",
        "--id",
        "--ttl",
        "--weight",
        "--tag",
        "--meta",
        "--check-http",
        "--check-tcp",
        "--check-timeout",
        "--drain-timeout",
        "[-- <CMD>...]",
    ] {
        assert!(
            out.contains(flag),
            "`pointsman register --help` mentions {flag}:\n{out}"
        );
    }
    let (code, out, _) = run_cli(&["run", "--help"]);
    assert_eq!(code, 0);
    for flag in ["--proxy-id", "--advertise-admin"] {
        assert!(
            out.contains(flag),
            "`pointsman run --help` mentions {flag}:\n{out}"
        );
    }
}

/// Once registered, an app that keeps failing its check is set to `maint`
/// (no traffic) and back to `ready` when it passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_sets_maint_until_the_app_recovers() {
    let etcd = EtcdServer::start();
    let proxy = start_proxy(&etcd, "p1").await;
    let addr = free_addr();
    let spawn_app = || {
        KillOnDrop(
            Command::new(BIN)
                .args(["upstream", "--listen", &addr.to_string(), "--name", "m"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn pointsman upstream"),
        )
    };
    let app = spawn_app();
    let s = Sidekick::start(
        &etcd.endpoint(),
        "m",
        addr,
        &["--check-interval", "200ms", "--check-fall", "2"],
        false,
    );
    wait_ready(&[&proxy], &["m"]).await;

    drop(app);
    wait_for(CHANGE_DEADLINE, "the instance is in maint", || async {
        endpoints(&proxy)
            .await
            .get("m")
            .is_some_and(|(state, _)| state == "maint")
    })
    .await;
    let (value, _) = get(&etcd, &s.key()).await.expect("still registered");
    assert!(value.contains(r#""state":"maint""#), "{value}");

    let _app = spawn_app();
    wait_ready(&[&proxy], &["m"]).await;
    assert!(
        s.stderr().contains("passes its check again"),
        "{}",
        s.stderr()
    );
}

/// A child process killed when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
