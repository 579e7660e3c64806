//! End to end: hitless restart. A new proxy process started with the same
//! `--takeover SOCKET` takes the listening sockets over from the running
//! one, which stops accepting, drains and exits 0; clients see no failed
//! request, no refused connection and no reset.
//!
//! The load is real processes and real sockets: keep-alive clients (one
//! HTTP/1.1 connection each, a request after another, a new connection only
//! when an answer says `Connection: close`) and connection-per-request
//! clients (to catch a refused or reset connect). Every error is counted by
//! kind, and nothing is retried behind the test's back.

mod support;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{CONNECTION, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use support::*;

/// Pause between one client's requests: enough load to have requests in
/// flight at every moment, without starving the proxies of CPU.
const PACE: Duration = Duration::from_millis(10);
/// How long one request may take before it counts as failed.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Requests one client makes at most (the test stops them sooner).
const MAX_REQUESTS: u64 = 20_000;
/// The long request in flight on the old process at the switch.
const SLOW_MS: u64 = 4000;

/// Two web upstreams behind the default service, and `/slow` to its own
/// service (so its in-flight request is visible on its own).
fn config(listen: SocketAddr, ups: &[Upstream], extra: &str) -> String {
    format!(
        r#"[global]
drain_timeout = "15s"

[[listeners]]
name = "web"
bind = "{listen}"
default_service = "web"
{extra}
[services.web]
endpoints = [{}, {}]

[services.slow]
endpoints = [{}]

[routes.slow]
path_prefix = "/slow"
service = "slow"
"#,
        endpoint_line(&ups[0], ""),
        endpoint_line(&ups[1], ""),
        endpoint_line(&ups[2], ""),
    )
}

async fn upstreams() -> Vec<Upstream> {
    Upstream::start_many(&["u1", "u2", "slow"]).await
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

/// Starts `pointsman run --takeover SOCKET` with `extra` arguments.
async fn proxy(config: &str, socket: &Path, extra: &[&str]) -> Proxy {
    let mut args = vec!["--takeover", path_arg(socket)];
    args.extend_from_slice(extra);
    let config = config.to_string();
    Proxy::start_with_args(move || config.clone(), &args).await
}

// ---------------------------------------------------------------------------
// Load

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Answers 200 with their whole body.
    ok: AtomicU64,
    /// Answers on keep-alive connections that said `Connection: close`.
    closes: AtomicU64,
    /// Keep-alive connections opened.
    connections: AtomicU64,
    /// Failures by kind.
    failures: Mutex<BTreeMap<String, u64>>,
    /// The first few failures in full.
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, kind: &str, detail: impl Display) {
        *self
            .failures
            .lock()
            .unwrap()
            .entry(kind.to_string())
            .or_default() += 1;
        let mut ex = self.examples.lock().unwrap();
        if ex.len() < 20 {
            ex.push(format!("{kind}: {detail}"));
        }
    }

    fn failures(&self) -> BTreeMap<String, u64> {
        self.failures.lock().unwrap().clone()
    }

    fn report(&self) -> String {
        format!(
            "ok {}, keep-alive connections {}, closes {}, failures {:?}\n  {}",
            self.ok.load(Relaxed),
            self.connections.load(Relaxed),
            self.closes.load(Relaxed),
            self.failures(),
            self.examples.lock().unwrap().join("\n  ")
        )
    }
}

struct Load {
    stop: CancellationToken,
    tally: Arc<Tally>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// `keep_alive` clients with a connection each, and `per_request`
    /// clients that open a connection for every request.
    fn start(addr: SocketAddr, keep_alive: usize, per_request: usize) -> Load {
        let stop = CancellationToken::new();
        let tally = Arc::new(Tally::default());
        let mut tasks = Vec::new();
        for _ in 0..keep_alive {
            tasks.push(tokio::spawn(keep_alive_client(
                addr,
                stop.clone(),
                tally.clone(),
            )));
        }
        for _ in 0..per_request {
            tasks.push(tokio::spawn(per_request_client(
                addr,
                stop.clone(),
                tally.clone(),
            )));
        }
        Load { stop, tally, tasks }
    }

    /// Waits until `more` further requests succeeded.
    async fn wait_ok(&self, more: u64, what: &str) {
        let target = self.tally.ok.load(Relaxed) + more;
        let tally = self.tally.clone();
        wait_until(Duration::from_secs(20), what, || {
            tally.ok.load(Relaxed) >= target
        })
        .await;
    }

    /// Stops the clients (each finishes its request) and returns the tally.
    async fn stop(self) -> Arc<Tally> {
        self.stop.cancel();
        for t in self.tasks {
            tokio::time::timeout(REQUEST_DEADLINE + Duration::from_secs(5), t)
                .await
                .expect("a load client stops")
                .expect("a load client does not panic");
        }
        self.tally
    }
}

fn says_close(resp: &hyper::Response<hyper::body::Incoming>) -> bool {
    resp.headers()
        .get_all(CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// One HTTP/1.1 connection, requests one after another; a new connection
/// only after an answer with `Connection: close`. A connection that ends
/// any other way is a failure.
async fn keep_alive_client(addr: SocketAddr, stop: CancellationToken, tally: Arc<Tally>) {
    let mut made = 0;
    'connection: while !stop.is_cancelled() {
        let stream = match tokio::time::timeout(REQUEST_DEADLINE, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tally.fail(&format!("keep-alive connect: {:?}", e.kind()), e);
                tokio::time::sleep(PACE).await;
                continue;
            }
            Err(_) => {
                tally.fail("keep-alive connect: timeout", addr);
                continue;
            }
        };
        tally.connections.fetch_add(1, Relaxed);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    tally.fail("keep-alive handshake", e);
                    continue;
                }
            };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        loop {
            if stop.is_cancelled() || made >= MAX_REQUESTS {
                return;
            }
            made += 1;
            // The server closed the connection between two requests
            // without saying so first: the race a drain must not have.
            if let Err(e) = sender.ready().await {
                tally.fail("keep-alive connection closed while idle", e);
                continue 'connection;
            }
            let req = Request::get("/")
                .header(HOST, "test")
                .body(Empty::<Bytes>::new())
                .expect("a request");
            let resp = match tokio::time::timeout(REQUEST_DEADLINE, sender.send_request(req)).await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tally.fail("keep-alive request", e);
                    continue 'connection;
                }
                Err(_) => {
                    tally.fail("keep-alive request: timeout", addr);
                    continue 'connection;
                }
            };
            let status = resp.status();
            let close = says_close(&resp);
            if let Err(e) = resp.into_body().collect().await {
                tally.fail("keep-alive response body", e);
                continue 'connection;
            }
            if status == 200 {
                tally.ok.fetch_add(1, Relaxed);
            } else {
                tally.fail("keep-alive status", status);
            }
            if close {
                tally.closes.fetch_add(1, Relaxed);
                continue 'connection;
            }
            tokio::time::sleep(PACE).await;
        }
    }
}

/// A new connection for every request (`Connection: close`).
async fn per_request_client(addr: SocketAddr, stop: CancellationToken, tally: Arc<Tally>) {
    for _ in 0..MAX_REQUESTS {
        if stop.is_cancelled() {
            return;
        }
        let exchange = async {
            let mut s = TcpStream::connect(addr)
                .await
                .map_err(|e| (format!("connect: {:?}", e.kind()), e.to_string()))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .await
                .map_err(|e| (format!("write: {:?}", e.kind()), e.to_string()))?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)
                .await
                .map_err(|e| (format!("read: {:?}", e.kind()), e.to_string()))?;
            let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).into_owned();
            if head.starts_with("HTTP/1.1 200 ") {
                Ok(())
            } else {
                Err(("status".to_string(), head))
            }
        };
        match tokio::time::timeout(REQUEST_DEADLINE, exchange).await {
            Ok(Ok(())) => {
                tally.ok.fetch_add(1, Relaxed);
            }
            Ok(Err((kind, detail))) => tally.fail(&format!("per-request {kind}"), detail),
            Err(_) => tally.fail("per-request: timeout", addr),
        }
        tokio::time::sleep(PACE).await;
    }
}

/// A `/slow?ms=N` request on its own connection, answered with (status,
/// `Connection: close` said, the echo's server name).
fn slow_request(addr: SocketAddr, ms: u64) -> JoinHandle<(u16, bool, String)> {
    tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.expect("connect for /slow");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .expect("handshake for /slow");
        tokio::spawn(conn);
        let req = Request::get(format!("/slow?ms={ms}"))
            .header(HOST, "test")
            .body(Empty::<Bytes>::new())
            .expect("a request");
        let resp = sender.send_request(req).await.expect("the /slow answer");
        let (status, close) = (resp.status().as_u16(), says_close(&resp));
        let body = resp.into_body().collect().await.expect("the /slow body");
        let echo: serde_json::Value =
            serde_json::from_slice(&body.to_bytes()).expect("the echo is JSON");
        (
            status,
            close,
            echo["server"].as_str().unwrap_or("").to_string(),
        )
    })
}

/// Requests the proxy counted for the `web` service.
async fn web_requests(p: &Proxy) -> u64 {
    let services = p.services().await;
    ["u1", "u2"]
        .iter()
        .filter_map(|id| endpoint_in(&services, "web", id))
        .map(|e| e["requests"].as_u64().unwrap_or(0))
        .sum()
}

fn assert_socket_file(path: &Path) {
    let meta = std::fs::symlink_metadata(path).expect("the takeover socket exists");
    assert!(
        meta.file_type().is_socket(),
        "{} is a socket",
        path.display()
    );
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the takeover socket is private to its user"
    );
    std::os::unix::net::UnixStream::connect(path)
        .expect("a process answers on the takeover socket");
}

async fn assert_exits_zero(p: &mut Proxy, what: &str) {
    let status = wait_exit(p.child(), Duration::from_secs(20), what).await;
    assert!(
        status.success(),
        "{what}: exit status {status}; stderr:\n{}",
        p.stderr()
    );
}

fn assert_clean(tally: &Tally, procs: &[&Proxy]) {
    if !tally.failures().is_empty() {
        let logs: Vec<String> = procs.iter().map(|p| p.stderr()).collect();
        panic!(
            "clients saw failures: {}\nproxy logs:\n{}",
            tally.report(),
            logs.join("\n-----\n")
        );
    }
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_fails_no_request_and_refuses_no_connection() {
    let started = Instant::now();
    let ups = upstreams().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("takeover.sock");
    let listen = free_addr();
    let cfg = config(listen, &ups, "");
    let mut a = proxy(&cfg, &socket, &["--threads", "2"]).await;
    assert_socket_file(&socket);
    assert!(a.stderr().contains("no process serves the takeover socket"));

    let load = Load::start(listen, 64, 8);
    load.wait_ok(500, "the clients are under way on A").await;
    let tally = load.tally.clone();
    wait_until(
        Duration::from_secs(10),
        "all 64 keep-alive connections are open",
        || tally.connections.load(Relaxed) >= 64,
    )
    .await;

    // A long request in flight on A at the switch.
    let slow = slow_request(listen, SLOW_MS);
    let pa = &a;
    wait_for(
        Duration::from_secs(5),
        "the slow request is in flight on A",
        || async move { pa.endpoint("slow", "slow").await["in_flight"] == 1 },
    )
    .await;

    let b = proxy(&cfg, &socket, &["--threads", "2"]).await;
    assert!(
        !slow.is_finished(),
        "the switch happens while the slow request is in flight"
    );
    assert_exits_zero(&mut a, "proxy A after the takeover").await;
    let (status, close, server) = slow.await.expect("the slow request");
    assert_eq!(
        (status, server.as_str()),
        (200, "slow"),
        "the request in flight on A completes"
    );
    assert!(close, "A answers during its drain with Connection: close");

    load.wait_ok(500, "the clients are served by B").await;
    let tally = load.stop().await;
    assert_clean(&tally, &[&a, &b]);
    assert!(
        tally.closes.load(Relaxed) >= 64,
        "every keep-alive connection A had was told to close: {}",
        tally.report()
    );
    assert!(
        tally.connections.load(Relaxed) >= 128,
        "the keep-alive clients reconnected (to B): {}",
        tally.report()
    );
    assert!(web_requests(&b).await > 0, "B serves the clients");

    let a_log = a.stderr();
    assert!(
        a_log.contains("handing the listening sockets to a new process"),
        "{a_log}"
    );
    assert!(
        a_log.contains("taken over by a new process: draining"),
        "{a_log}"
    );
    assert!(
        a_log.contains("drained: every connection finished"),
        "{a_log}"
    );
    let b_log = b.stderr();
    assert!(
        b_log.contains("serving the sockets passed by the previous process"),
        "{b_log}"
    );
    assert!(b_log.contains("took the listening sockets over"), "{b_log}");
    // B serves the takeover socket now; A, exiting, left it in place.
    assert_socket_file(&socket);
    eprintln!(
        "restart under load: {} in {:?}",
        tally.report(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_means_a_normal_start_and_the_config_can_name_the_socket() {
    let ups = upstreams().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("takeover.sock");
    // A socket file whose process is gone.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a socket file"));
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err());

    // The socket named in the config this time, not with --takeover.
    let listen = free_addr();
    let cfg = config(listen, &ups, "").replace(
        "[global]\n",
        &format!("[global]\ntakeover_socket = \"{}\"\n", path_arg(&socket)),
    );
    let mut p = Proxy::start_with_args(move || cfg.clone(), &[]).await;
    assert!(
        p.stderr().contains("stale"),
        "the log says the socket was stale:\n{}",
        p.stderr()
    );
    let resp = plain_client()
        .get(format!("http://{listen}/"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(resp.status(), 200);
    assert_socket_file(&socket);

    sigterm(p.pid());
    assert_exits_zero(&mut p, "the proxy after SIGTERM").await;
    assert!(
        !socket.exists(),
        "the proxy removes its takeover socket when it stops on a signal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeovers_chain_across_thread_counts_and_pass_the_admin_socket() {
    let ups = upstreams().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("takeover.sock");
    let listen = free_addr();
    let admin = free_addr().to_string();
    let cfg = config(listen, &ups, "");

    let mut a = proxy(&cfg, &socket, &["--threads", "2", "--admin", &admin]).await;
    let load = Load::start(listen, 16, 4);
    load.wait_ok(200, "the clients are under way on A").await;

    // The same admin address: B can only start if A passes its admin
    // socket (it is bound without SO_REUSEPORT).
    let mut b = proxy(&cfg, &socket, &["--threads", "1", "--admin", &admin]).await;
    assert_exits_zero(&mut a, "proxy A after B took over").await;
    load.wait_ok(200, "the clients are served by B").await;
    let b_log = b.stderr();
    assert!(
        b_log.contains("received listening sockets") && b_log.contains("listener=admin"),
        "B received the admin socket:\n{b_log}"
    );
    assert!(
        b_log.contains("listener=web") && b_log.contains("sockets=2"),
        "B (one thread) took both of A's sockets:\n{b_log}"
    );

    let c = proxy(&cfg, &socket, &["--threads", "3", "--admin", &admin]).await;
    assert_exits_zero(&mut b, "proxy B after C took over").await;
    load.wait_ok(200, "the clients are served by C").await;
    let tally = load.stop().await;
    assert_clean(&tally, &[&a, &b, &c]);
    assert!(web_requests(&c).await > 0, "C serves the clients");
    let c_log = c.stderr();
    assert!(
        c_log.contains("listener=web") && c_log.contains("sockets=2"),
        "C received B's two sockets:\n{c_log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_fails_midway_leaves_the_old_process_serving() {
    let ups = upstreams().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("takeover.sock");
    let listen = free_addr();
    let cfg = config(listen, &ups, "");
    let mut a = proxy(&cfg, &socket, &["--threads", "2"]).await;
    let load = Load::start(listen, 16, 4);
    load.wait_ok(200, "the clients are under way on A").await;

    // B receives A's sockets, then cannot bind a second listener (the port
    // is held without SO_REUSEPORT), and exits.
    let occupied = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = occupied.local_addr().expect("addr");
    let bad = config(
        listen,
        &ups,
        &format!(
            "\n[[listeners]]\nname = \"other\"\nbind = \"{taken}\"\ndefault_service = \"web\"\n"
        ),
    );
    let bad_path: PathBuf = dir.path().join("bad.toml");
    std::fs::write(&bad_path, bad).expect("write the config");
    let b_err = dir.path().join("b.stderr");
    let mut b = Command::new(BIN)
        .args(["run", "--threads", "2", "--config"])
        .arg(&bad_path)
        .args(["--admin", &free_addr().to_string(), "--takeover"])
        .arg(&socket)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&b_err).expect("create B's stderr"))
        .spawn()
        .expect("spawn B");
    let status = wait_exit(
        &mut b,
        Duration::from_secs(20),
        "B with a listener it cannot bind",
    )
    .await;
    let b_log = std::fs::read_to_string(&b_err).unwrap_or_default();
    assert!(!status.success(), "B cannot start:\n{b_log}");
    assert!(b_log.contains("received listening sockets"), "{b_log}");
    assert!(b_log.contains("cannot bind"), "{b_log}");

    let pa = &a;
    wait_until(
        Duration::from_secs(5),
        "A logs that the takeover was aborted",
        || {
            pa.stderr()
                .contains("takeover aborted: this process keeps serving")
        },
    )
    .await;
    assert!(
        a.child().try_wait().expect("try_wait").is_none(),
        "A still runs"
    );
    load.wait_ok(200, "A still serves after the failed takeover")
        .await;
    assert_socket_file(&socket);

    // The next takeover works.
    let b = proxy(&cfg, &socket, &["--threads", "2"]).await;
    assert_exits_zero(&mut a, "proxy A after the second attempt").await;
    load.wait_ok(200, "the clients are served by B").await;
    let tally = load.stop().await;
    assert_clean(&tally, &[&a, &b]);
    drop(occupied);
}
