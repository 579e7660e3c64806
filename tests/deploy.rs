//! End to end: `pointsman deploy` under load. A real etcd, two real proxies
//! (`pointsman run --etcd`) routing through registry routes and maps, real
//! upstream processes, and the real `pointsman deploy` binary run as a
//! child process.
//!
//! During every deploy [`CLIENTS`] keep-alive clients send requests to both
//! proxies, and every answer is counted by the phase it was sent in (before
//! or after the deploy returned), the proxy and who answered:
//!
//! - a rolling deploy of three instances run by `pointsman register`
//!   sidekicks: no request fails, every instance is replaced, and a 5 s
//!   request in flight when its instance's drain starts completes before
//!   the instance is stopped;
//! - a blue/green switch and its rollback: no request fails, and no request
//!   sent after the command returned reaches the old colour (by the
//!   answers and by both proxies' per-endpoint counters);
//! - a canary whose new service answers 500: aborted at its first step,
//!   the route back as it was, every proxy on the old service again;
//! - a canary of a healthy service: promoted, no request fails;
//! - etcd stopped for 10 s: no request fails, and once etcd is back a new
//!   registration is followed again.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use support::etcd::{del, etcd_source, etcdctl, put, start_proxy, wait_applied, EtcdServer};
use support::registry::{endpoints, wait_in_flight, wait_ready, CHANGE_DEADLINE};
use support::*;
use tokio::task::JoinHandle;

/// Concurrent keep-alive clients during every deploy.
const CLIENTS: usize = 64;
/// The load stops by itself after this long, whatever the test does.
const LOAD_LIMIT: Duration = Duration::from_secs(75);
/// Each client's pause between two requests, so that two tests loading
/// their proxies at once leave the deploys some CPU on two cores.
const PACE: Duration = Duration::from_millis(10);
/// The longest a `pointsman deploy` may run.
const DEPLOY_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// etcd through etcdctl

/// The value of `key` ("" when absent).
async fn get(etcd: &EtcdServer, key: &str) -> String {
    etcdctl(etcd, &["get", "--print-value-only", key])
        .await
        .trim()
        .to_string()
}

/// The keys under `prefix`.
async fn keys(etcd: &EtcdServer, prefix: &str) -> Vec<String> {
    etcdctl(etcd, &["get", "--prefix", "--keys-only", prefix])
        .await
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------
// Proxies

/// Two proxies following `etcd`, `p1` and `p2`.
async fn two_proxies(etcd: &EtcdServer) -> (Proxy, Proxy) {
    // One HTTP listener and nothing else: every route comes from etcd.
    let p1 = start_proxy(etcd, "p1", None).await;
    let p2 = start_proxy(etcd, "p2", None).await;
    (p1, p2)
}

/// Requests each proxy has sent to each endpoint of `service`, by proxy
/// and endpoint id.
async fn requests_to(proxies: &[&Proxy], service: &str) -> Vec<BTreeMap<String, u64>> {
    let mut out = Vec::new();
    for p in proxies {
        out.push(
            endpoints(p, service)
                .await
                .into_iter()
                .map(|(id, (_, requests, _))| (id, requests))
                .collect(),
        );
    }
    out
}

// ---------------------------------------------------------------------------
// The load

/// What one request came to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// A 2xx answer from the upstream with this `server` name.
    Served(String),
    /// Any other status.
    Status(u16),
    /// No answer: a connection error, a reset, a timeout, a bad body.
    Error,
}

/// Answers counted by (phase, proxy index, outcome).
#[derive(Clone, Debug, Default)]
struct Tally(BTreeMap<(usize, usize, Outcome), u64>);

impl Tally {
    /// 2xx answers from `server` in `phase`, on `proxy` or on any.
    fn served(&self, phase: usize, proxy: Option<usize>, server: &str) -> u64 {
        self.0
            .iter()
            .filter(|((ph, px, o), _)| {
                *ph == phase
                    && proxy.is_none_or(|p| p == *px)
                    && *o == Outcome::Served(server.to_string())
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// Who answered in `phase` (2xx only), on every proxy.
    fn servers(&self, phase: usize) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ((ph, _, o), n) in &self.0 {
            if let (true, Outcome::Served(s)) = (*ph == phase, o) {
                *out.entry(s.clone()).or_insert(0) += n;
            }
        }
        out
    }

    /// 2xx answers in `phase` from each proxy.
    fn served_by_proxy(&self, phase: usize, proxy: usize) -> u64 {
        self.0
            .iter()
            .filter(|((ph, px, o), _)| {
                *ph == phase && *px == proxy && matches!(o, Outcome::Served(_))
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests that failed in `phase` (any phase for `None`), by outcome.
    fn failures(&self, phase: Option<usize>) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ((ph, _, o), n) in &self.0 {
            if phase.is_some_and(|p| p != *ph) {
                continue;
            }
            let kind = match o {
                Outcome::Served(_) => continue,
                Outcome::Status(s) => format!("status {s}"),
                Outcome::Error => "no answer".to_string(),
            };
            *out.entry(kind).or_insert(0) += n;
        }
        out
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// [`CLIENTS`] tasks, each with its own keep-alive client, sending
/// requests to the proxies in turn (client `i` to proxy `i % n`) until
/// [`Load::finish`] or [`LOAD_LIMIT`].
struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    tally: Arc<Mutex<Tally>>,
    /// The first few failures in full.
    samples: Arc<Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// `path(i)` is the path client `i` asks for.
    fn start(proxies: &[&Proxy], path: impl Fn(usize) -> &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let tally: Arc<Mutex<Tally>> = Arc::default();
        let samples: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut tasks = Vec::new();
        for i in 0..CLIENTS {
            let proxy = i % proxies.len();
            let url = proxies[proxy].url(path(i));
            let (stop, phase, tally, samples) =
                (stop.clone(), phase.clone(), tally.clone(), samples.clone());
            tasks.push(tokio::spawn(async move {
                let client = client();
                let end = Instant::now() + LOAD_LIMIT;
                let sample = |what: String| {
                    let mut s = samples.lock().unwrap();
                    if s.len() < 10 {
                        s.push(what);
                    }
                };
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    let ph = phase.load(Ordering::SeqCst);
                    let outcome = match client.get(&url).send().await {
                        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                            Ok(echo) => {
                                Outcome::Served(echo["server"].as_str().unwrap_or("?").to_string())
                            }
                            Err(e) => {
                                sample(format!("phase {ph} {url}: body: {e}"));
                                Outcome::Error
                            }
                        },
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let body = r.text().await.unwrap_or_default();
                            sample(format!("phase {ph} {url}: status {status}: {body}"));
                            Outcome::Status(status)
                        }
                        Err(e) => {
                            sample(format!("phase {ph} {url}: {e:?}"));
                            Outcome::Error
                        }
                    };
                    *tally
                        .lock()
                        .unwrap()
                        .0
                        .entry((ph, proxy, outcome))
                        .or_insert(0) += 1;
                    tokio::time::sleep(PACE).await;
                }
            }));
        }
        Load {
            stop,
            phase,
            tally,
            samples,
            tasks,
        }
    }

    /// Requests sent from now on count in `phase`.
    fn set_phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    fn snapshot(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    /// Waits until `cond` holds for the answers counted so far.
    async fn wait(&self, deadline: Duration, what: &str, cond: impl Fn(&Tally) -> bool) {
        let end = Instant::now() + deadline;
        loop {
            let now = self.snapshot();
            if cond(&now) {
                return;
            }
            assert!(
                Instant::now() < end,
                "timed out after {deadline:?} waiting until {what}; answers so far: {:?}",
                now.0
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every client and returns what they counted and the first
    /// failures in full.
    async fn finish(self) -> (Tally, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("a load task");
        }
        let tally = self.tally.lock().unwrap().clone();
        let samples = self.samples.lock().unwrap().clone();
        eprintln!(
            "--- load: {} requests from {CLIENTS} clients; failed: {:?} ---",
            tally.total(),
            tally.failures(None)
        );
        for ((phase, proxy, outcome), n) in &tally.0 {
            eprintln!("  phase {phase}, proxy p{}: {outcome:?} x {n}", proxy + 1);
        }
        (tally, samples)
    }
}

/// Panics unless no request failed.
fn assert_no_failures(tally: &Tally, samples: &[String]) {
    let failures = tally.failures(None);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}; first: {samples:#?}",
        failures.values().sum::<u64>(),
        tally.total()
    );
}

// ---------------------------------------------------------------------------
// `pointsman deploy`

/// What a `pointsman deploy` run left.
struct Deployed {
    code: i32,
    out: String,
    err: String,
}

impl Deployed {
    /// The progress lines: `[   1.2s] what happens`.
    fn progress(&self) -> Vec<&str> {
        self.out
            .lines()
            .filter(|l| {
                l.starts_with('[')
                    && l.split_once("s] ").is_some_and(|(t, _)| {
                        t.trim_start_matches('[').trim().parse::<f64>().is_ok()
                    })
            })
            .collect()
    }

    /// Panics unless stdout has every one of `lines` (as parts of progress
    /// lines), in that order.
    fn assert_says(&self, lines: &[&str]) {
        let progress = self.progress();
        let mut from = 0;
        for want in lines {
            match progress[from..].iter().position(|l| l.contains(want)) {
                Some(i) => from += i + 1,
                None => panic!(
                    "no progress line with {want:?} (after line {from}); stdout:\n{}\nstderr:\n{}",
                    self.out, self.err
                ),
            }
        }
    }
}

/// A `pointsman deploy` running as a child process, its output collected
/// as it comes. Killed when dropped.
struct Running {
    child: tokio::process::Child,
    what: String,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

/// Starts `pointsman deploy --etcd <etcd> <args>`.
fn spawn_deploy(etcd: &EtcdServer, args: &[&str]) -> Running {
    use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("deploy")
        .arg("--etcd")
        .arg(etcd.endpoint())
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("POINTSMAN_ETCD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn pointsman deploy");
    fn collect(
        from: impl AsyncRead + Unpin + Send + 'static,
        into: Arc<Mutex<String>>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut lines = BufReader::new(from).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut all = into.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        })
    }
    let (out, err): (Arc<Mutex<String>>, Arc<Mutex<String>>) = Default::default();
    let readers = vec![
        collect(child.stdout.take().expect("piped stdout"), out.clone()),
        collect(child.stderr.take().expect("piped stderr"), err.clone()),
    ];
    Running {
        child,
        what: args.first().unwrap_or(&"").to_string(),
        out,
        err,
        readers,
    }
}

impl Running {
    /// Waits until stdout contains `what`.
    async fn wait_says(&self, what: &str) {
        let out = self.out.clone();
        wait_until(
            DEPLOY_LIMIT,
            &format!("pointsman deploy says {what:?}"),
            || out.lock().unwrap().contains(what),
        )
        .await;
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("the deploy is running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {pid}");
    }

    /// Waits, at most `limit`, until the deploy exits.
    async fn finish(mut self, limit: Duration) -> Deployed {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "pointsman deploy {} did not finish within {limit:?}; stdout so far:\n{}",
                    self.what,
                    self.out.lock().unwrap()
                )
            })
            .expect("wait for pointsman deploy");
        for r in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        let d = Deployed {
            code: status.code().unwrap_or(-1),
            out: self.out.lock().unwrap().clone(),
            err: self.err.lock().unwrap().clone(),
        };
        eprintln!(
            "--- pointsman deploy {} (exit {}) ---\n{}{}",
            self.what, d.code, d.out, d.err
        );
        d
    }
}

/// Runs `pointsman deploy --etcd <etcd> <args>` to completion.
async fn deploy(etcd: &EtcdServer, args: &[&str]) -> Deployed {
    spawn_deploy(etcd, args).finish(DEPLOY_LIMIT).await
}

// ---------------------------------------------------------------------------
// Instances run by `pointsman register`, started and stopped by shell
// commands as a deploy runs them

/// A directory with each instance's pid files and log; kills every
/// process named in a pid file when dropped.
struct Instances {
    dir: tempfile::TempDir,
}

impl Instances {
    fn new() -> Instances {
        Instances {
            dir: tempfile::tempdir().expect("a temp dir"),
        }
    }

    /// Starts `{id}` at `{address}` in the background: a sidekick
    /// registering it in `web` once it accepts connections, and as its app
    /// `pointsman upstream` answering as `{id}-<version>`. The sidekick's
    /// pid goes to `{id}.pid`, the app's to `{id}.app.pid`.
    fn start_cmd(&self, etcd: &str, version: &str) -> String {
        let d = self.dir.path().display();
        format!(
            "POINTSMAN_LOG=info setsid nohup {BIN} register --etcd {etcd} --service web --id {{id}} \
             --address {{address}} --drain-timeout 20s \
             -- sh -c 'echo $$ > {d}/{{id}}.app.pid; \
             exec {BIN} upstream --listen {{address}} --name {{id}}-{version}' \
             > {d}/{{id}}.log 2>&1 < /dev/null & echo $! > {d}/{{id}}.pid"
        )
    }

    /// Notes the time (ns since the epoch) in `{id}.stopped`, sends SIGTERM
    /// to the sidekick (which drains, deregisters and stops its app) and
    /// waits, at most 20 s, until it has exited.
    fn stop_cmd(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "date +%s%N > {d}/{{id}}.stopped; pid=$(cat {d}/{{id}}.pid); kill -TERM $pid; \
             i=0; while [ $i -lt 400 ] && [ -e /proc/$pid ] \
             && ! grep -q zombie /proc/$pid/status 2>/dev/null; \
             do sleep 0.05; i=$((i+1)); done; [ $i -lt 400 ]"
        )
    }

    /// Runs a start command for `id` at `addr` as the deploy would.
    fn run(&self, cmd: &str, id: &str, addr: SocketAddr) {
        let cmd = cmd
            .replace("{id}", id)
            .replace("{address}", &addr.to_string());
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdin(Stdio::null())
            .status()
            .expect("run sh");
        assert!(status.success(), "{cmd}: {status}");
    }

    /// When `{id}`'s stop command ran, in ns since the epoch.
    fn stopped_ns(&self, id: &str) -> Option<u128> {
        std::fs::read_to_string(self.dir.path().join(format!("{id}.stopped")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{id}.log"))).unwrap_or_default()
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        let Ok(files) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for f in files.flatten() {
            if !f.file_name().to_string_lossy().ends_with(".pid") {
                continue;
            }
            if let Some(pid) = std::fs::read_to_string(f.path())
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            {
                signal(pid, "KILL");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tests

/// Rolling deploy of three instances, each run by a `pointsman register`
/// sidekick: the deploy drains one instance fleet-wide, stops it (SIGTERM
/// to its sidekick), starts its next version, waits until both proxies see
/// it healthy and puts it back, one after the other. Under load on both
/// proxies no request fails, every instance ends replaced, and a 5 s
/// request in flight to the first instance when its drain starts completes
/// with a 200 before that instance is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deploy_replaces_every_instance_without_a_failed_request() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    put(
        &etcd,
        "/pointsman/routes/site",
        r#"{"path_prefix":"/","service":"web"}"#,
    )
    .await;
    let (p1, p2) = two_proxies(&etcd).await;
    let proxies = [&p1, &p2];
    let instances = Instances::new();
    let ids = ["w1", "w2", "w3"];
    let v1 = instances.start_cmd(&endpoint, "v1");
    for id in ids {
        instances.run(&v1, id, free_addr());
    }
    wait_ready(&proxies, "web", &ids).await;

    // A long request that is certainly on w1: w2 and w3 in maint meanwhile.
    put(&etcd, "/pointsman/overrides/web/w2", r#"{"state":"maint"}"#).await;
    let rev = put(&etcd, "/pointsman/overrides/web/w3", r#"{"state":"maint"}"#).await;
    wait_applied(&[&p1], rev).await;
    let long_url = p1.url("/slow?ms=5000");
    let long = tokio::spawn(async move {
        let (sent, sent_ns) = (Instant::now(), now_ns());
        let (status, echo) = get_echo(&plain_client(), &long_url, &[]).await;
        let server = echo["server"].as_str().unwrap_or("").to_string();
        (status, server, sent.elapsed(), sent_ns)
    });
    wait_in_flight(&p1, "web", "w1").await;
    del(&etcd, "/pointsman/overrides/web/w2").await;
    let rev = del(&etcd, "/pointsman/overrides/web/w3").await;
    wait_applied(&proxies, rev).await;
    wait_ready(&proxies, "web", &ids).await;

    let load = Load::start(&proxies, |_| "/");
    load.wait(
        CHANGE_DEADLINE,
        "the load reaches every v1 on both proxies",
        |t| {
            (0..2).all(|p| {
                ids.iter()
                    .all(|id| t.served(0, Some(p), &format!("{id}-v1")) >= 10)
            })
        },
    )
    .await;

    let started = Instant::now();
    let stop_cmd = instances.stop_cmd();
    let start_cmd = instances.start_cmd(&endpoint, "v2");
    let d = deploy(
        &etcd,
        &[
            "rolling",
            "--service",
            "web",
            "--stop-cmd",
            &stop_cmd,
            "--start-cmd",
            &start_cmd,
            "--drain-timeout",
            "20s",
            "--health-timeout",
            "30s",
        ],
    )
    .await;
    let took = started.elapsed();
    load.set_phase(1);
    // After the deploy, only the new versions answer, on both proxies.
    load.wait(CHANGE_DEADLINE, "every v2 answers on both proxies", |t| {
        (0..2).all(|p| {
            ids.iter()
                .all(|id| t.served(1, Some(p), &format!("{id}-v2")) >= 10)
        })
    })
    .await;
    let (tally, samples) = load.finish().await;
    let (long_status, long_server, long_took, long_sent_ns) = long.await.expect("the long request");
    for id in ids {
        eprintln!("--- {id} (v2) ---\n{}", instances.log(id));
    }

    assert_eq!(
        d.code, 0,
        "the rolling deploy succeeded:\n{}{}",
        d.out, d.err
    );
    d.assert_says(&[
        "rolling web: 3 instances (w1, w2, w3)",
        "[1/3] web/w1",
        "web/w1: drain",
        "2 of 2 proxies confirmed",
        "web/w1: stop",
        "web/w1: start",
        "web/w1: registered at",
        "web/w1: back to ready",
        "[2/3] web/w2",
        "[3/3] web/w3",
        "web/w3: back to ready",
        "rolled 3 instances of web",
    ]);
    assert_no_failures(&tally, &samples);
    assert!(
        tally.total() >= 1000,
        "the load kept both proxies busy: {:?}",
        tally.0
    );
    let after: BTreeSet<String> = tally.servers(1).into_keys().collect();
    let want: BTreeSet<String> = ids.iter().map(|id| format!("{id}-v2")).collect();
    assert_eq!(after, want, "only the new versions answer after the deploy");
    // The first two new instances took traffic while the others were
    // replaced (the last one's turn ends with the deploy).
    let during = tally.servers(0);
    for id in ["w1", "w2"] {
        assert!(
            during.contains_key(&format!("{id}-v2")),
            "{id}-v2 took traffic while the deploy went on: {during:?}"
        );
    }

    assert_eq!(
        (long_status, long_server.as_str()),
        (200, "w1-v1"),
        "the long request finished on w1"
    );
    assert!(
        long_took >= Duration::from_secs(5),
        "the long request took {long_took:?}"
    );
    // The upstream answers 5 s after the request reached it, so a stop
    // command that ran earlier than 5 s after the request was sent came
    // before the answer. (The time the client saw the answer would be a
    // late mark: the test's own runtime is busy with the load.)
    let w1_stopped = instances.stopped_ns("w1").expect("w1 was stopped");
    let answered_ns = long_sent_ns + 5_000_000_000;
    assert!(
        w1_stopped >= answered_ns,
        "w1 was stopped {} ms before its long request could have been answered",
        answered_ns.saturating_sub(w1_stopped) / 1_000_000
    );
    for id in ids {
        assert!(instances.stopped_ns(id).is_some(), "{id} was stopped");
    }
    assert!(took < Duration::from_secs(45), "the deploy took {took:?}");

    // Nothing left behind: no override, every instance ready everywhere.
    assert_eq!(
        keys(&etcd, "/pointsman/overrides/").await,
        Vec::<String>::new()
    );
    wait_ready(&proxies, "web", &ids).await;
}

/// Blue/green: `deploy switch --drain-old` moves a map entry from blue to
/// green under load. No request fails; once the command returned (both
/// proxies confirmed the switch and have nothing in flight to blue), no
/// request reaches blue: every answer is green's, and blue's endpoints'
/// request counters on both proxies stop. `deploy rollback` then brings
/// blue back the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switch_and_rollback_under_load() {
    let etcd = EtcdServer::start();
    let ups = Upstream::start_many(&["blue-1", "blue-2", "green-1", "green-2"]).await;
    for u in &ups {
        let (colour, n) = u.name.split_once('-').expect("colour-n");
        put(
            &etcd,
            &format!("/services/{colour}/{}{n}", &colour[..1]),
            &u.addr.to_string(),
        )
        .await;
    }
    put(
        &etcd,
        "/pointsman/routes/site",
        r#"{"path_prefix":"/","map":"colour","map_key":"live"}"#,
    )
    .await;
    put(&etcd, "/pointsman/maps/colour/live", "blue").await;
    let (p1, p2) = two_proxies(&etcd).await;
    let proxies = [&p1, &p2];
    wait_ready(&proxies, "blue", &["b1", "b2"]).await;
    wait_ready(&proxies, "green", &["g1", "g2"]).await;

    // One client in eight asks for a slow answer, so that the switch has
    // requests in flight to blue to wait for.
    let load = Load::start(&proxies, |i| if i % 8 == 7 { "/slow?ms=300" } else { "/" });
    load.wait(
        CHANGE_DEADLINE,
        "the load reaches blue on both proxies",
        |t| {
            (0..2).all(|p| {
                t.served(0, Some(p), "blue-1") >= 10 && t.served(0, Some(p), "blue-2") >= 10
            })
        },
    )
    .await;

    let d = deploy(
        &etcd,
        &[
            "switch",
            "--map",
            "colour",
            "--key",
            "live",
            "--to",
            "green",
            "--drain-old",
            "--timeout",
            "20s",
        ],
    )
    .await;
    load.set_phase(1);
    let blue_then = requests_to(&proxies, "blue").await;
    assert_eq!(d.code, 0, "the switch succeeded:\n{}{}", d.out, d.err);
    d.assert_says(&[
        "map colour[live]: blue -> green",
        "every proxy applied revision",
        "2 of 2 proxies confirmed",
        "no proxy has a request in flight to blue",
        "2 of 2 proxies confirmed",
        "switched colour[live] to green",
    ]);
    assert_eq!(get(&etcd, "/pointsman/maps/colour/live").await, "green");
    load.wait(CHANGE_DEADLINE, "green answers on both proxies", |t| {
        (0..2).all(|p| t.served_by_proxy(1, p) >= 300)
    })
    .await;
    let blue_now = requests_to(&proxies, "blue").await;
    assert_eq!(
        blue_now, blue_then,
        "a proxy sent requests to blue after the switch was confirmed"
    );

    // Phase 2: during the rollback; phase 3: after it returned.
    load.set_phase(2);
    let d = deploy(
        &etcd,
        &[
            "rollback",
            "--map",
            "colour",
            "--key",
            "live",
            "--drain-old",
            "--timeout",
            "20s",
        ],
    )
    .await;
    load.set_phase(3);
    let green_then = requests_to(&proxies, "green").await;
    assert_eq!(d.code, 0, "the rollback succeeded:\n{}{}", d.out, d.err);
    d.assert_says(&[
        "rolling colour[live] back to blue",
        "map colour[live]: green -> blue",
        "no proxy has a request in flight to green",
        "switched colour[live] to blue",
    ]);
    assert_eq!(get(&etcd, "/pointsman/maps/colour/live").await, "blue");
    load.wait(CHANGE_DEADLINE, "blue answers on both proxies", |t| {
        (0..2).all(|p| t.served_by_proxy(3, p) >= 300)
    })
    .await;
    let green_now = requests_to(&proxies, "green").await;
    let (tally, samples) = load.finish().await;

    assert_no_failures(&tally, &samples);
    assert_eq!(
        green_now, green_then,
        "a proxy sent requests to green after the rollback was confirmed"
    );
    let after_switch = tally.servers(1);
    assert!(
        after_switch.keys().all(|s| s.starts_with("green-")) && after_switch.len() == 2,
        "after the switch only green answers: {after_switch:?}"
    );
    let after_rollback = tally.servers(3);
    assert!(
        after_rollback.keys().all(|s| s.starts_with("blue-")) && after_rollback.len() == 2,
        "after the rollback only blue answers: {after_rollback:?}"
    );
}

/// The route `site` sends everything to `api`, run by one instance `v1`;
/// two proxies follow etcd.
async fn one_instance_api(etcd: &EtcdServer, v1: &Upstream) -> (Proxy, Proxy) {
    put(etcd, "/services/api/v1", &v1.addr.to_string()).await;
    put(
        etcd,
        "/pointsman/routes/site",
        r#"{"path_prefix":"/","service":"api"}"#,
    )
    .await;
    let (p1, p2) = two_proxies(etcd).await;
    wait_ready(&[&p1, &p2], "api", &["v1"]).await;
    (p1, p2)
}

/// `deploy replace` moves a one-instance service to a new target on
/// another port under load: no request fails, and afterwards only the new
/// instance answers and is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_moves_a_one_instance_service_without_a_failed_request() {
    let etcd = EtcdServer::start();
    let ups = Upstream::start_many(&["v1", "v2"]).await;
    let (p1, p2) = one_instance_api(&etcd, &ups[0]).await;
    let proxies = [&p1, &p2];
    let load = Load::start(&proxies, |_| "/");
    load.wait(CHANGE_DEADLINE, "v1 answers on both proxies", |t| {
        (0..2).all(|p| t.served(0, Some(p), "v1") >= 10)
    })
    .await;

    let target = ups[1].addr.to_string();
    let d = deploy(
        &etcd,
        &[
            "replace",
            "--service",
            "api",
            "--target",
            &target,
            "--id",
            "v2",
        ],
    )
    .await;
    load.set_phase(1);
    assert_eq!(d.code, 0, "the replacement succeeded:\n{}{}", d.out, d.err);
    d.assert_says(&[
        "replacing api (v1) by v2",
        "api/v2: registered at",
        "every proxy sends to api/v2",
        "2 of 2 proxies confirmed",
        "api/v1: drain",
        "no proxy sends to api/v1",
        "api/v1: deregistered",
        "api: now served by v2 alone",
    ]);
    load.wait(CHANGE_DEADLINE, "v2 answers on both proxies", |t| {
        (0..2).all(|p| t.served_by_proxy(1, p) >= 200)
    })
    .await;
    let (tally, samples) = load.finish().await;
    assert_no_failures(&tally, &samples);
    let after: Vec<String> = tally.servers(1).into_keys().collect();
    assert_eq!(after, ["v2"], "afterwards only v2 answers");
    assert_eq!(keys(&etcd, "/services/api/").await, ["/services/api/v2"]);
}

/// `deploy replace --pause` for an app that cannot run twice: the new
/// version takes the old one's address, started only after the old one
/// stopped; requests meanwhile wait on the proxies, none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_with_pause_runs_one_copy_at_a_time_and_fails_no_request() {
    let etcd = EtcdServer::start();
    let v1 = Upstream::start("v1").await;
    let (p1, p2) = one_instance_api(&etcd, &v1).await;
    let proxies = [&p1, &p2];
    let dir = tempfile::tempdir().expect("a temp dir");
    let pid_file = dir.path().join("v2.pid");
    let load = Load::start(&proxies, |_| "/");
    load.wait(CHANGE_DEADLINE, "v1 answers on both proxies", |t| {
        (0..2).all(|p| t.served(0, Some(p), "v1") >= 10)
    })
    .await;

    let address = v1.addr.to_string();
    // Started in the background; returns once it answers.
    let start = format!(
        "{BIN} upstream --listen {{address}} --name {{id}} >/dev/null 2>&1 & echo $! > {}; \
         for i in $(seq 100); do curl -s -o /dev/null http://{{address}}/ && exit 0; sleep 0.05; done; exit 1",
        pid_file.display(),
    );
    let stop = format!("kill {}", v1.pid());
    let d = deploy(
        &etcd,
        &[
            "replace",
            "--service",
            "api",
            "--target",
            &address,
            "--id",
            "v2",
            "--pause",
            "--start-cmd",
            &start,
            "--stop-cmd",
            &stop,
        ],
    )
    .await;
    load.set_phase(1);
    assert_eq!(d.code, 0, "the replacement succeeded:\n{}{}", d.out, d.err);
    d.assert_says(&[
        "paused meanwhile",
        "api: paused",
        "every proxy applied revision",
        "api/v1: drain",
        "api/v1: stop",
        "api/v1: deregistered",
        "api/v2: start",
        "every proxy sends to api/v2",
        "api: resumed",
        "api: now served by v2 alone",
    ]);
    load.wait(CHANGE_DEADLINE, "v2 answers on both proxies", |t| {
        (0..2).all(|p| t.served_by_proxy(1, p) >= 200)
    })
    .await;
    let (tally, samples) = load.finish().await;
    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        let _ = std::process::Command::new("kill").arg(pid.trim()).status();
    }
    assert_no_failures(&tally, &samples);
    let after: Vec<String> = tally.servers(1).into_keys().collect();
    assert_eq!(after, ["v2"], "afterwards only v2 answers");
    assert_eq!(keys(&etcd, "/services/api/").await, ["/services/api/v2"]);
    assert_eq!(
        keys(&etcd, "/pointsman/pauses/").await,
        Vec::<String>::new(),
        "resumed"
    );
}

/// Starts `v1` (a `pointsman upstream`) and `v2` as services of their own,
/// the registry route `api` on `v1`, and two proxies with both services.
async fn canary_setup(etcd: &EtcdServer, v2: SocketAddr) -> (Proxy, Proxy, Upstream) {
    let v1 = Upstream::start("v1").await;
    put(etcd, "/services/v1/a", &v1.addr.to_string()).await;
    put(etcd, "/services/v2/b", &v2.to_string()).await;
    put(
        etcd,
        "/pointsman/routes/api",
        r#"{"path_prefix":"/","service":"v1"}"#,
    )
    .await;
    let (p1, p2) = two_proxies(etcd).await;
    wait_ready(&[&p1, &p2], "v1", &["a"]).await;
    wait_ready(&[&p1, &p2], "v2", &["b"]).await;
    (p1, p2, v1)
}

/// The route `api` as etcd holds it.
async fn route_api(etcd: &EtcdServer) -> Value {
    let raw = get(etcd, "/pointsman/routes/api").await;
    serde_json::from_str(&raw).unwrap_or_else(|e| panic!("route api {raw:?}: {e}"))
}

/// A canary to a service whose instance answers 500 to everything: the
/// deploy aborts at its first step (20%), exits non-zero saying it rolled
/// back, the route in etcd is the original one (service v1), and after it
/// returned every request on both proxies is answered by v1 and none
/// reaches v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_with_failing_new_version_is_rolled_back() {
    let etcd = EtcdServer::start();
    let broken = http_server(|_req| async {
        hyper::Response::builder()
            .status(500)
            .body(Full::new(Bytes::from_static(b"v2 is broken\n")))
            .expect("a response")
    })
    .await;
    let (p1, p2, _v1) = canary_setup(&etcd, broken.addr).await;
    let proxies = [&p1, &p2];
    let load = Load::start(&proxies, |_| "/");
    load.wait(CHANGE_DEADLINE, "v1 answers on both proxies", |t| {
        (0..2).all(|p| t.served(0, Some(p), "v1") >= 10)
    })
    .await;

    let d = deploy(
        &etcd,
        &[
            "canary",
            "--route",
            "api",
            "--from",
            "v1",
            "--to",
            "v2",
            "--steps",
            "20,50,100",
            "--interval",
            "2s",
            "--min-requests",
            "5",
            "--timeout",
            "20s",
        ],
    )
    .await;
    load.set_phase(1);
    let v2_then = requests_to(&proxies, "v2").await;
    load.wait(CHANGE_DEADLINE, "v1 answers on both proxies again", |t| {
        (0..2).all(|p| t.served_by_proxy(1, p) >= 300)
    })
    .await;
    let v2_now = requests_to(&proxies, "v2").await;
    let (tally, samples) = load.finish().await;

    assert_ne!(d.code, 0, "an aborted canary fails:\n{}{}", d.out, d.err);
    assert!(
        d.err.contains("canary aborted and rolled back") && d.err.contains("errors"),
        "stderr says why: {}",
        d.err
    );
    d.assert_says(&[
        "canary on route api: v1 -> v2 in steps 20% -> 50% -> 100%",
        "20% to v2",
        "2 of 2 proxies confirmed",
        "abort: v2 answered",
        "route api restored",
        "2 of 2 proxies confirmed",
    ]);
    assert!(
        !d.out.contains("50% to v2"),
        "the canary stopped at its first step:\n{}",
        d.out
    );
    let route = route_api(&etcd).await;
    assert_eq!(route["service"], "v1", "the route is back on v1: {route}");
    assert_eq!(route["path_prefix"], "/", "{route}");
    assert!(
        route["split"].as_array().is_none_or(Vec::is_empty),
        "no split left: {route}"
    );

    // During the canary some requests met v2's 500s, and nothing else
    // failed; after it, every answer is v1's and v2 gets nothing.
    let during = tally.failures(Some(0));
    assert!(
        during.get("status 500").copied().unwrap_or(0) >= 5,
        "the canary sent requests to v2: {during:?}"
    );
    assert!(
        during.keys().all(|k| k.starts_with("status 5")),
        "only v2's answers failed: {during:?}; first: {samples:#?}"
    );
    assert_eq!(tally.failures(Some(1)), BTreeMap::new(), "{samples:#?}");
    assert_eq!(
        tally.servers(1).into_keys().collect::<Vec<_>>(),
        vec!["v1".to_string()]
    );
    assert_eq!(v2_now, v2_then, "v2 got requests after the rollback");
}

/// A canary to a healthy service: promoted through 20%, 50% and 100%, exit
/// 0, the route ends as `service: v2`, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_with_healthy_new_version_is_promoted() {
    let etcd = EtcdServer::start();
    let v2 = Upstream::start("v2").await;
    let (p1, p2, _v1) = canary_setup(&etcd, v2.addr).await;
    let proxies = [&p1, &p2];
    let load = Load::start(&proxies, |_| "/");
    load.wait(CHANGE_DEADLINE, "v1 answers on both proxies", |t| {
        (0..2).all(|p| t.served(0, Some(p), "v1") >= 10)
    })
    .await;

    let d = deploy(
        &etcd,
        &[
            "canary",
            "--route",
            "api",
            "--from",
            "v1",
            "--to",
            "v2",
            "--steps",
            "20,50,100",
            "--interval",
            "1s",
            "--min-requests",
            "5",
            "--timeout",
            "20s",
        ],
    )
    .await;
    load.set_phase(1);
    load.wait(CHANGE_DEADLINE, "v2 answers on both proxies", |t| {
        (0..2).all(|p| t.served_by_proxy(1, p) >= 300)
    })
    .await;
    let (tally, samples) = load.finish().await;

    assert_eq!(d.code, 0, "the canary was promoted:\n{}{}", d.out, d.err);
    d.assert_says(&[
        "20% to v2",
        "v1: ",
        "50% to v2",
        "100% to v2",
        "2 of 2 proxies confirmed",
        "promoted: route api sends everything to v2",
    ]);
    let route = route_api(&etcd).await;
    assert_eq!(route["service"], "v2", "{route}");
    assert!(
        route["split"].as_array().is_none_or(Vec::is_empty),
        "{route}"
    );
    assert_no_failures(&tally, &samples);
    let during = tally.servers(0);
    assert!(
        during.get("v2").copied().unwrap_or(0) > 0 && during.get("v1").copied().unwrap_or(0) > 0,
        "both versions answered during the canary: {during:?}"
    );
    assert_eq!(
        tally.servers(1).into_keys().collect::<Vec<_>>(),
        vec!["v2".to_string()]
    );
}

/// etcd stopped for 10 s under load: both proxies notice (their etcd source
/// shows disconnected) and keep serving from what they have, without a
/// single failed request; once etcd is back they reconnect, and a new
/// registration is followed on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_under_load_fails_no_request() {
    let mut etcd = EtcdServer::start();
    let ups = Upstream::start_many(&["a1", "a2", "a3"]).await;
    put(&etcd, "/services/web/a1", &ups[0].addr.to_string()).await;
    put(&etcd, "/services/web/a2", &ups[1].addr.to_string()).await;
    put(
        &etcd,
        "/pointsman/routes/site",
        r#"{"path_prefix":"/","service":"web"}"#,
    )
    .await;
    let (p1, p2) = two_proxies(&etcd).await;
    let proxies = [&p1, &p2];
    wait_ready(&proxies, "web", &["a1", "a2"]).await;
    let load = Load::start(&proxies, |_| "/");
    load.wait(CHANGE_DEADLINE, "a1 and a2 answer on both proxies", |t| {
        (0..2).all(|p| t.served(0, Some(p), "a1") >= 10 && t.served(0, Some(p), "a2") >= 10)
    })
    .await;

    load.set_phase(1);
    let stopped = Instant::now();
    tokio::task::block_in_place(|| etcd.stop());
    for p in proxies {
        wait_for(
            CHANGE_DEADLINE,
            &format!("proxy {} sees etcd gone", p.admin),
            || async {
                etcd_source(p)
                    .await
                    .is_some_and(|s| s["connected"] == false)
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;
    let outage = stopped.elapsed();
    load.set_phase(2);
    tokio::task::block_in_place(|| etcd.restart());

    for p in proxies {
        wait_for(
            Duration::from_secs(20),
            &format!("proxy {} is connected to etcd again", p.admin),
            || async { etcd_source(p).await.is_some_and(|s| s["connected"] == true) },
        )
        .await;
    }
    put(&etcd, "/services/web/a3", &ups[2].addr.to_string()).await;
    wait_ready(&proxies, "web", &["a1", "a2", "a3"]).await;
    load.wait(CHANGE_DEADLINE, "a3 answers on both proxies", |t| {
        (0..2).all(|p| t.served(2, Some(p), "a3") >= 10)
    })
    .await;
    let (tally, samples) = load.finish().await;

    assert!(
        outage >= Duration::from_secs(10),
        "etcd was down {outage:?}"
    );
    assert_no_failures(&tally, &samples);
    for p in 0..2 {
        let n = tally.served_by_proxy(1, p);
        assert!(
            n >= 300,
            "proxy {} served only {n} requests while etcd was down",
            p + 1
        );
    }
    let while_down = tally.servers(1);
    assert!(
        while_down.contains_key("a1") && while_down.contains_key("a2"),
        "both instances served while etcd was down: {while_down:?}"
    );
}

/// What the deploys refuse, because it would hurt traffic: stopping an
/// instance a proxy still sends new requests to once the drain timeout
/// passed, a switch or a canary to a service no proxy can send requests
/// to, a canary from a
/// service the route is not on, and promoting a canary that never got
/// enough requests to be judged. Each refusal exits non-zero, says why and
/// leaves the registry as it was (or puts it back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_refuse_what_would_hurt_traffic() {
    let etcd = EtcdServer::start();
    let ups = Upstream::start_many(&["v1", "blue-1", "a1", "a2"]).await;
    for (key, u) in ["v1/a", "blue/b1", "web/a1", "web/a2"].iter().zip(&ups) {
        put(&etcd, &format!("/services/{key}"), &u.addr.to_string()).await;
    }
    let api = r#"{"path_prefix":"/api","service":"v1"}"#;
    put(&etcd, "/pointsman/routes/api", api).await;
    put(
        &etcd,
        "/pointsman/routes/site",
        r#"{"path_prefix":"/","map":"colour","map_key":"live"}"#,
    )
    .await;
    put(&etcd, "/pointsman/maps/colour/live", "blue").await;
    let (p1, p2) = two_proxies(&etcd).await;
    let proxies = [&p1, &p2];
    wait_ready(&proxies, "v1", &["a"]).await;
    wait_ready(&proxies, "blue", &["b1"]).await;
    wait_ready(&proxies, "web", &["a1", "a2"]).await;

    // A rolling deploy whose drain does not take on one proxy (a local
    // override keeps a1 ready on p2): the instance is not stopped, and its
    // fleet-wide state is put back.
    let resp = plain_client()
        .put(p2.admin_url("/api/services/web/endpoints/a1"))
        .header("content-type", "application/json")
        .body(r#"{"state":"ready"}"#)
        .send()
        .await
        .expect("PUT a local state");
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let marks = tempfile::tempdir().expect("a temp dir");
    let stop_cmd = format!("touch {}/{{id}}.stopped", marks.path().display());
    let d = deploy(
        &etcd,
        &[
            "rolling",
            "--service",
            "web",
            "--stop-cmd",
            &stop_cmd,
            "--start-cmd",
            "true",
            "--drain-timeout",
            "2s",
        ],
    )
    .await;
    assert_ne!(d.code, 0, "{}{}", d.out, d.err);
    assert!(
        d.err.contains(
            "stopped at a1 (0 of 2 done): not drained on every proxy within 2s, \
                 so it is not stopped: 1 of 2 proxies confirmed; waiting for p2 (",
        ) && d
            .err
            .contains("still sends new requests to web/a1: its state ready was set on this proxy")
            && d.err
                .contains("pointsman ctl --admin <this proxy's admin address> reset web/a1"),
        "{}",
        d.err
    );
    d.assert_says(&["web/a1: drain", "web/a1: previous state restored"]);
    assert!(
        !marks.path().join("a1.stopped").exists(),
        "the stop command did not run"
    );
    assert_eq!(
        keys(&etcd, "/pointsman/overrides/").await,
        Vec::<String>::new()
    );
    wait_ready(&proxies, "web", &["a1", "a2"]).await;

    // A switch to a service without instances: refused, nothing written.
    let d = deploy(
        &etcd,
        &[
            "switch",
            "--map",
            "colour",
            "--key",
            "live",
            "--to",
            "nosuch",
            "--timeout",
            "2s",
        ],
    )
    .await;
    assert_ne!(d.code, 0, "{}{}", d.out, d.err);
    assert!(
        d.err.contains("not switching colour[live] to nosuch")
            && d.err.contains("has no instance of nosuch"),
        "{}",
        d.err
    );
    d.assert_says(&["waiting until every proxy has a ready, healthy instance of nosuch"]);
    assert_eq!(get(&etcd, "/pointsman/maps/colour/live").await, "blue");
    assert_eq!(get(&etcd, "/pointsman/history/maps/colour/live").await, "");

    // A canary to a service without instances: refused before any step.
    let d = deploy(
        &etcd,
        &[
            "canary",
            "--route",
            "api",
            "--from",
            "v1",
            "--to",
            "nosuch",
            "--steps",
            "50,100",
            "--interval",
            "1s",
            "--timeout",
            "2s",
        ],
    )
    .await;
    assert_ne!(d.code, 0, "{}{}", d.out, d.err);
    assert!(
        d.err.contains("not starting the canary") && d.err.contains("route api is unchanged"),
        "{}",
        d.err
    );
    assert!(!d.out.contains("50% to nosuch"), "{}", d.out);
    assert_eq!(get(&etcd, "/pointsman/routes/api").await, api);

    // A canary from a service the route does not send to: refused.
    let d = deploy(
        &etcd,
        &[
            "canary", "--route", "api", "--from", "v0", "--to", "blue", "--steps", "50,100",
        ],
    )
    .await;
    assert_ne!(d.code, 0, "{}{}", d.out, d.err);
    assert!(
        d.err
            .contains("route api sends everything to v1, not everything to v0"),
        "{}",
        d.err
    );
    assert_eq!(get(&etcd, "/pointsman/routes/api").await, api);

    // No traffic at all: no step can judge blue, so it is not promoted.
    let d = deploy(
        &etcd,
        &[
            "canary",
            "--route",
            "api",
            "--from",
            "v1",
            "--to",
            "blue",
            "--steps",
            "50,100",
            "--interval",
            "1s",
        ],
    )
    .await;
    assert_ne!(d.code, 0, "{}{}", d.out, d.err);
    assert!(
        d.err.contains("canary aborted and rolled back")
            && d.err
                .contains("fewer than 20 requests reached blue at every step"),
        "{}",
        d.err
    );
    d.assert_says(&[
        "50% to blue",
        "no verdict at this step",
        "route api restored",
    ]);
    assert!(!d.out.contains("100% to blue"), "{}", d.out);
    assert_eq!(route_api(&etcd).await["service"], "v1");
}

/// SIGINT to a rolling deploy while it stops an instance, and SIGTERM to a
/// canary while it observes a step, under load: each exits non-zero at
/// once and puts back what it changed (the drained instance ready again
/// on both proxies, the route on its old service), and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_deploy_puts_back_what_it_changed() {
    let etcd = EtcdServer::start();
    let ups = Upstream::start_many(&["a1", "a2", "v1", "v2"]).await;
    for (key, u) in ["web/a1", "web/a2", "v1/a", "v2/b"].iter().zip(&ups) {
        put(&etcd, &format!("/services/{key}"), &u.addr.to_string()).await;
    }
    put(
        &etcd,
        "/pointsman/routes/site",
        r#"{"path_prefix":"/","service":"web"}"#,
    )
    .await;
    put(
        &etcd,
        "/pointsman/routes/api",
        r#"{"path_prefix":"/api","service":"v1"}"#,
    )
    .await;
    let (p1, p2) = two_proxies(&etcd).await;
    let proxies = [&p1, &p2];
    wait_ready(&proxies, "web", &["a1", "a2"]).await;
    wait_ready(&proxies, "v2", &["b"]).await;
    // Clients 0, 1 (one per proxy) ask for "/", clients 2, 3 for "/api"...
    let load = Load::start(&proxies, |i| if i % 4 < 2 { "/" } else { "/api" });
    load.wait(
        CHANGE_DEADLINE,
        "a1, a2 and v1 answer on both proxies",
        |t| {
            (0..2).all(|p| {
                ["a1", "a2", "v1"]
                    .iter()
                    .all(|s| t.served(0, Some(p), s) >= 10)
            })
        },
    )
    .await;

    // The stop command hangs; the deploy is interrupted there.
    let rolling = spawn_deploy(
        &etcd,
        &[
            "rolling",
            "--service",
            "web",
            "--stop-cmd",
            "exec sleep 20",
            "--start-cmd",
            "true",
        ],
    );
    rolling.wait_says("web/a1: stop:").await;
    assert!(
        get(&etcd, "/pointsman/overrides/web/a1")
            .await
            .contains(r#""state":"drain""#),
        "a1 is drained while it is stopped"
    );
    wait_for(CHANGE_DEADLINE, "both proxies have a1 drained", || async {
        let mut all = true;
        for p in proxies {
            all &= endpoints(p, "web")
                .await
                .get("a1")
                .is_some_and(|(s, _, _)| s == "drain");
        }
        all
    })
    .await;
    let interrupted = Instant::now();
    rolling.signal("INT");
    let d = rolling.finish(Duration::from_secs(15)).await;
    assert!(
        interrupted.elapsed() < Duration::from_secs(10),
        "the deploy took {:?} to stop",
        interrupted.elapsed()
    );
    assert_ne!(d.code, 0, "{}{}", d.out, d.err);
    assert!(
        d.err.contains("SIGINT")
            && d.err
                .contains("rolling deploy of web stopped at a1 (0 of 2 done): interrupted"),
        "{}",
        d.err
    );
    d.assert_says(&[
        "web/a1: drain",
        "web/a1: stop:",
        "web/a1: interrupted; putting its previous state back",
        "web/a1: previous state restored",
    ]);
    assert_eq!(
        keys(&etcd, "/pointsman/overrides/").await,
        Vec::<String>::new()
    );
    wait_ready(&proxies, "web", &["a1", "a2"]).await;

    // The canary is stopped while it observes its first step.
    let canary = spawn_deploy(
        &etcd,
        &[
            "canary",
            "--route",
            "api",
            "--from",
            "v1",
            "--to",
            "v2",
            "--steps",
            "50,100",
            "--interval",
            "30s",
            "--min-requests",
            "5",
        ],
    );
    canary.wait_says("observing for").await;
    let split = route_api(&etcd).await;
    assert_eq!(split["split"][1]["service"], "v2", "{split}");
    let interrupted = Instant::now();
    canary.signal("TERM");
    let d = canary.finish(Duration::from_secs(15)).await;
    assert!(
        interrupted.elapsed() < Duration::from_secs(10),
        "the canary took {:?} to stop",
        interrupted.elapsed()
    );
    assert_ne!(d.code, 0, "{}{}", d.out, d.err);
    assert!(
        d.err.contains("SIGTERM")
            && d.err
                .contains("canary stopped and rolled back: interrupted"),
        "{}",
        d.err
    );
    d.assert_says(&[
        "50% to v2",
        "observing for",
        "route api restored",
        "2 of 2 proxies confirmed",
    ]);
    let route = route_api(&etcd).await;
    assert_eq!(route["service"], "v1", "{route}");

    load.set_phase(1);
    load.wait(
        CHANGE_DEADLINE,
        "answers on both proxies after the canary",
        |t| (0..2).all(|p| t.served_by_proxy(1, p) >= 200),
    )
    .await;
    let (tally, samples) = load.finish().await;
    assert_no_failures(&tally, &samples);
    assert!(
        tally.served(0, None, "v2") > 0,
        "the canary's step sent requests to v2: {:?}",
        tally.servers(0)
    );
    let after: BTreeSet<String> = tally.servers(1).into_keys().collect();
    assert_eq!(
        after,
        ["a1", "a2", "v1"].iter().map(|s| s.to_string()).collect(),
        "after the canary was stopped, v2 gets nothing"
    );
}
