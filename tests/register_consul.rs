//! End to end: `pointsman register --consul` beside real apps, in front of
//! real proxies following Consul (`pointsman run --consul`).
//!
//! Consul is played by the test double in
//! `discovery/tests/support/consul.rs` (no Consul binary can be installed
//! here): it runs TTL checks but not HTTP checks, whose status the tests
//! set.
//!
//! What is covered: the app is registered only once it is healthy, with a
//! TTL check the sidekick keeps passing (and fails while the app fails its
//! check); a SIGTERM under load drains with zero failed requests, a long
//! request in flight finishes, and the app gets its SIGTERM only after the
//! `--proxy-admin` proxies show nothing in flight to it; an app that dies is
//! deregistered at once; an agent that is down at start is retried until it
//! answers, and `--check-http` becomes an HTTP check run by the agent; a
//! sidekick without `--proxy-admin` gives the proxies a fixed grace; and
//! `--etcd` with `--consul` is a usage error.

mod support;

#[path = "../discovery/tests/support/consul.rs"]
mod consul_support;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use consul_support::{parse_go_duration, ConsulDouble, Health};
use serde_json::{json, Value};
use support::*;

/// How long a registry change gets to reach the proxies.
const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Proxies

fn config(listen: SocketAddr) -> String {
    format!("[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\ndefault_service = \"web\"\n")
}

async fn start_proxy(consul: &ConsulDouble) -> Proxy {
    let url = consul.url();
    Proxy::start_with_args(
        || config(free_addr()),
        &["--consul", &url, "--consul-wait", "5s", "--threads", "1"],
    )
    .await
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

/// Re-registers `id` in the double as it is, with meta `pointsman-state`
/// set to `state` (its check is kept): an operator's override.
fn set_state(consul: &ConsulDouble, id: &str, state: &str) {
    let s = consul.service(id).expect("registered");
    let mut meta = s.meta.clone();
    meta.insert("pointsman-state".to_string(), state.to_string());
    consul.register(json!({
        "ID": s.id,
        "Name": s.name,
        "Address": s.address,
        "Port": s.port,
        "Tags": s.tags,
        "Meta": meta,
    }));
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

/// A running `pointsman register --consul`, with its app's files in a
/// temporary directory. Kills the sidekick and its app when dropped.
struct Sidekick {
    child: Child,
    dir: tempfile::TempDir,
    stderr_path: PathBuf,
    id: String,
}

impl Sidekick {
    /// `pointsman register --consul <url> --service web --id <id> --address
    /// <addr> <extra> -- <APP>` (no app when `with_app` is false).
    fn start(consul: &str, id: &str, addr: SocketAddr, extra: &[&str], with_app: bool) -> Sidekick {
        let dir = tempfile::tempdir().expect("a temp dir");
        let stderr_path = dir.path().join("stderr.log");
        let mut cmd = Command::new(BIN);
        cmd.args([
            "register",
            "--consul",
            consul,
            "--service",
            "web",
            "--id",
            id,
        ])
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
            .env_remove("POINTSMAN_CONSUL")
            .env_remove("CONSUL_HTTP_TOKEN")
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

    fn check_id(&self) -> String {
        format!("service:{}", self.id)
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

/// A `pointsman upstream` at `addr`, killed when dropped: an app that runs
/// beside its sidekick.
struct App(Child);

impl App {
    fn start(addr: SocketAddr, name: &str) -> App {
        App(Command::new(BIN)
            .args(["upstream", "--listen", &addr.to_string(), "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pointsman upstream"))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the double's check `id` has `status`.
async fn wait_check(consul: &ConsulDouble, id: &str, status: Health) {
    wait_until(
        CHANGE_DEADLINE,
        &format!("check {id} is {}", status.as_str()),
        || consul.check(id).is_some_and(|c| c.status == status),
    )
    .await;
}

// ---------------------------------------------------------------------------
// Tests

/// An app that runs beside its sidekick: nothing is registered until it
/// answers; then it is registered with a TTL check that stays passing over
/// several TTLs and is routable; failing its check fails the TTL check
/// (no traffic) until it recovers; SIGTERM without --proxy-admin drains
/// for the fixed grace, deregisters and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_once_healthy_with_a_ttl_check_kept_passing() {
    let consul = ConsulDouble::start();
    let proxy = start_proxy(&consul).await;
    let addr = free_addr();
    let mut s = Sidekick::start(
        &consul.url(),
        "t",
        addr,
        &[
            "--ttl",
            "1s",
            "--check-interval",
            "200ms",
            "--check-fall",
            "2",
        ],
        false,
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        consul.service("t").is_none(),
        "registered before the app answered"
    );
    assert!(
        s.stderr().contains("waiting for the app to pass its check"),
        "{}",
        s.stderr()
    );

    let app = App::start(addr, "t");
    wait_ready(&[&proxy], &["t"]).await;
    let c = client();
    assert_eq!(server_of(&c, &proxy.url("/"), &[]).await, "t");
    let service = consul.service("t").expect("registered");
    assert_eq!(
        (
            service.name.as_str(),
            service.address.as_str(),
            service.port
        ),
        ("web", "127.0.0.1", i64::from(addr.port()))
    );
    assert_eq!(
        service.meta.get("pointsman-state").map(String::as_str),
        Some("ready")
    );
    let check = consul.check(&s.check_id()).expect("a check");
    assert_eq!(check.kind, "ttl");
    assert_eq!(check.ttl, Some(Duration::from_secs(1)));
    assert_eq!(
        check.definition["DeregisterCriticalServiceAfter"]
            .as_str()
            .and_then(parse_go_duration),
        Some(Duration::from_secs(60)),
        "{}",
        check.definition
    );

    // Four TTLs: the check never leaves passing, and the proxy keeps it.
    let watch_from = Instant::now();
    while watch_from.elapsed() < Duration::from_secs(4) {
        let status = consul.check(&s.check_id()).map(|c| c.status);
        assert_eq!(
            status,
            Some(Health::Passing),
            "after {:?}",
            watch_from.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server_of(&c, &proxy.url("/"), &[]).await, "t");
    let passes = consul
        .requests()
        .iter()
        // The check id as sent (percent-encoded) or as decoded.
        .filter(|r| {
            matches!(
                r.path.as_str(),
                "/v1/agent/check/pass/service%3At" | "/v1/agent/check/pass/service:t"
            ) && r.at >= watch_from
        })
        .count();
    assert!(
        (8..=20).contains(&passes),
        "{passes} passes in 4 s (one every TTL/3 expected)"
    );

    // The app stops answering: after two failed checks the TTL check fails
    // and the proxy drops the instance; back once it answers again.
    drop(app);
    wait_check(&consul, &s.check_id(), Health::Critical).await;
    wait_ready(&[&proxy], &[]).await;
    assert!(
        consul
            .check(&s.check_id())
            .is_some_and(|c| c.output.contains("failed its check 2 times")),
        "{:?}",
        consul.check(&s.check_id())
    );
    let _app = App::start(addr, "t");
    wait_check(&consul, &s.check_id(), Health::Passing).await;
    wait_ready(&[&proxy], &["t"]).await;
    assert!(s.stderr().contains("TTL check failing"), "{}", s.stderr());

    // SIGTERM, no --proxy-admin: drain, the fixed grace, deregister.
    let signalled = Instant::now();
    sigterm(s.child.id());
    wait_for(CHANGE_DEADLINE, "the proxy sees the drain", || async {
        endpoints(&proxy)
            .await
            .get("t")
            .is_some_and(|(state, _)| state == "drain")
    })
    .await;
    let status = s.wait_exit(Duration::from_secs(15)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(1900),
        "deregistered after {took:?}, before the 2 s grace"
    );
    assert!(consul.service("t").is_none(), "deregistered");
    wait_ready(&[&proxy], &[]).await;
    let log = s.stderr();
    assert!(
        log.contains("no proxies to ask (no --proxy-admin)"),
        "{log}"
    );
}

/// Two proxies given with --proxy-admin, three instances under load;
/// SIGTERM to one sidekick while a long request is in flight to its app:
/// no request fails, the long one finishes, and the app gets SIGTERM only
/// after both proxies show nothing in flight to it; then it is deregistered
/// and the sidekick exits with the app's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_proxies_before_the_app_is_signalled() {
    let consul = ConsulDouble::start();
    let url = consul.url();
    let p1 = start_proxy(&consul).await;
    let p2 = start_proxy(&consul).await;
    let proxies = [&p1, &p2];
    let (a1, a2) = (p1.admin.to_string(), p2.admin.to_string());
    let mut x = Sidekick::start(
        &url,
        "x",
        free_addr(),
        &[
            "--drain-timeout",
            "20s",
            "--proxy-admin",
            &a1,
            "--proxy-admin",
            &a2,
        ],
        true,
    );
    let _y = Sidekick::start(&url, "y", free_addr(), &[], true);
    let _z = Sidekick::start(&url, "z", free_addr(), &[], true);
    wait_ready(&proxies, &["x", "y", "z"]).await;

    // A long request that is certainly on x: y and z in maint meanwhile.
    set_state(&consul, "y", "maint");
    set_state(&consul, "z", "maint");
    wait_for(CHANGE_DEADLINE, "y and z are in maint on p1", || async {
        let eps = endpoints(&p1).await;
        ["y", "z"]
            .iter()
            .all(|id| eps.get(*id).is_some_and(|(s, _)| s == "maint"))
    })
    .await;
    let long_url = p1.url("/slow?ms=3000");
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
    set_state(&consul, "y", "ready");
    set_state(&consul, "z", "ready");
    wait_ready(&proxies, &["x", "y", "z"]).await;

    // Load: keep-alive clients on both proxies, every answer counted.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let served: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let mut load = Vec::new();
    for i in 0..12 {
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
    // The last moment either proxy showed a request in flight to x, and
    // whether one showed x draining.
    let last_busy = Arc::new(AtomicU64::new(0));
    let saw_drain = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (stop, last_busy, saw_drain) = (stop.clone(), last_busy.clone(), saw_drain.clone());
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
                    let x: Vec<Value> = all
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|s| s["name"] == "web")
                        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                        .filter(|e| e["id"] == "x")
                        .collect();
                    if x.iter().any(|e| e["in_flight"].as_u64().unwrap_or(0) > 0) {
                        // Seen busy at some time at or after `before`.
                        last_busy.fetch_max((before / 1000) as u64, Ordering::Relaxed);
                    }
                    if x.iter().any(|e| e["state"] == "drain") {
                        saw_drain.store(true, Ordering::Relaxed);
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
        saw_drain.load(Ordering::Relaxed),
        "a proxy showed x draining"
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
        took >= Duration::from_millis(500),
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
    assert!(consul.service("x").is_none(), "deregistered");
    assert!(consul.check("service:x").is_none(), "its check too");
    wait_ready(&proxies, &["y", "z"]).await;
}

/// The app dies (SIGKILL): the sidekick deregisters it at once, not a TTL
/// later, and exits as the app did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_app_is_deregistered_at_once() {
    let consul = ConsulDouble::start();
    let proxy = start_proxy(&consul).await;
    let mut s = Sidekick::start(&consul.url(), "a", free_addr(), &["--ttl", "30s"], true);
    wait_ready(&[&proxy], &["a"]).await;
    assert_eq!(server_of(&client(), &proxy.url("/"), &[]).await, "a");
    let app = s.read_pid("app.pid").expect("the app's pid");
    let killed = Instant::now();
    signal(app, "KILL");
    wait_until(Duration::from_secs(5), "a is deregistered", || {
        consul.service("a").is_none()
    })
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

/// An agent that is down at start is retried, and said so, until it
/// answers; --check-http becomes an HTTP check the agent runs, so the
/// instance is routable once that check passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_agent_is_waited_for_and_check_http_is_an_agent_check() {
    let mut consul = ConsulDouble::start();
    let proxy = start_proxy(&consul).await;
    consul.stop();
    let app = Upstream::start("h").await;
    let s = Sidekick::start(
        &consul.url(),
        "h",
        app.addr,
        &["--check-http", "/healthz", "--check-interval", "3s"],
        false,
    );
    let want = format!("Consul agent at {} unreachable", consul.url());
    wait_until(
        CHANGE_DEADLINE,
        "the sidekick says the agent is unreachable",
        || {
            let log = s.stderr();
            log.contains(&want) && log.contains("retrying in")
        },
    )
    .await;
    consul.restart();
    wait_until(
        Duration::from_secs(15),
        "registered once the agent answers",
        || consul.service("h").is_some(),
    )
    .await;
    let check = consul.check("service:h").expect("a check");
    assert_eq!(check.kind, "http");
    assert_eq!(
        check.definition["HTTP"],
        format!("http://{}/healthz", app.addr),
        "{}",
        check.definition
    );
    assert_eq!(
        check.definition["Interval"]
            .as_str()
            .and_then(parse_go_duration),
        Some(Duration::from_secs(3)),
        "{}",
        check.definition
    );
    // The double does not run HTTP checks: a new one is critical, so the
    // instance is not routable until the agent finds it passing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !endpoints(&proxy).await.contains_key("h"),
        "routable before its check passed"
    );
    assert!(
        !consul
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/v1/agent/check/")),
        "no TTL updates for an HTTP check"
    );
    consul.set_check_status("service:h", Health::Passing);
    wait_ready(&[&proxy], &["h"]).await;
    assert_eq!(server_of(&client(), &proxy.url("/"), &[]).await, "h");
}

/// Usage errors exit 2 and say what was expected.
#[test]
fn registry_flags_are_checked() {
    let base = [
        "register",
        "--service",
        "web",
        "--address",
        "127.0.0.1:8080",
    ];
    let with = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        run_cli(&args)
    };
    let (code, _, err) = with(&[
        "--etcd",
        "http://127.0.0.1:1",
        "--consul",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--etcd URL or --consul URL") && err.contains("not both"),
        "{err}"
    );
    let (code, _, err) = with(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("say where to register"), "{err}");
    let (code, _, err) = with(&[
        "--etcd",
        "http://127.0.0.1:1",
        "--proxy-admin",
        "127.0.0.1:8404",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--proxy-admin goes with --consul"), "{err}");
    let (code, _, err) = with(&["--consul", "ftp://127.0.0.1:1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("consul"), "{err}");
    let (code, _, err) = with(&[
        "--consul",
        "http://127.0.0.1:1",
        "--proxy-admin",
        "127.0.0.1",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--proxy-admin") && err.contains("expected host:port"),
        "{err}"
    );
    let (code, out, _) = run_cli(&["register", "--help"]);
    assert_eq!(code, 0);
    for flag in ["--consul", "--consul-token", "--proxy-admin"] {
        assert!(
            out.contains(flag),
            "`pointsman register --help` mentions {flag}:\n{out}"
        );
    }
}
