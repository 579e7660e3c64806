//! The harness every end-to-end test shares: the real `pointsman` binary
//! started on free loopback ports with a config in a temporary directory,
//! real `pointsman upstream` processes, small in-process servers for the
//! behaviours an echo upstream cannot show, and a few clients (reqwest, raw
//! sockets, HTTP/2 prior knowledge).
//!
//! Nothing here sleeps for a fixed time when a condition can be awaited:
//! every wait is [`wait_until`] or [`wait_for`] with a deadline, and a
//! failed wait panics with what was awaited and, for a proxy, its stderr.
#![allow(dead_code)]

/// A real etcd, `etcdctl` and proxies following etcd.
pub mod etcd;
/// A proxy's view of a registry's services: listener config, endpoints, waits.
pub mod registry;
/// `pointsman register` sidekicks, their apps and the load they drain under.
pub mod sidekick;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pointsman");

/// How long a process gets to become ready.
pub const START_DEADLINE: Duration = Duration::from_secs(15);
/// How long a config reload gets to be applied (or refused).
pub const RELOAD_DEADLINE: Duration = Duration::from_secs(10);
/// When a config change has had no effect yet, it is written again once.
const REWRITE_AFTER: Duration = Duration::from_secs(2);
/// Start attempts when a picked free port was taken in the meantime.
const START_ATTEMPTS: usize = 3;

// ---------------------------------------------------------------------------
// Waiting

/// Waits until `cond` holds, polling, or panics after `deadline` naming
/// `what` was awaited.
pub async fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] with an async condition.
pub async fn wait_for<F, Fut>(deadline: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        let remaining = end.saturating_duration_since(Instant::now());
        if let Ok(true) =
            tokio::time::timeout(remaining.max(Duration::from_millis(50)), cond()).await
        {
            return;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Ports and small facts about processes

/// A loopback address with a port that was free a moment ago (bound to
/// port 0, read back, released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr of a bound socket")
}

/// The resident-set high-water mark (VmHWM) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status:\n{status}"))
}

/// Sends SIGTERM to a process.
pub fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill -TERM");
    assert!(status.success(), "kill -TERM {pid} failed: {status}");
}

/// Sends `kill -<sig>` to a process, ignoring whether it still exists.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// The time now, in ns since the epoch: comparable with `date +%s%N` in a
/// shell the test runs.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos()
}

/// Does something accept TCP connections at `addr`?
pub async fn accepts(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Removes ANSI colour sequences (in case the log writer adds them).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits for a child to exit, or panics after `deadline`.
pub async fn wait_exit(child: &mut Child, deadline: Duration, what: &str) -> ExitStatus {
    let end = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < end => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(None) => panic!("{what} did not exit within {deadline:?}"),
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The proxy

/// A running `pointsman run` with its config in a temporary directory.
/// Killed when dropped.
pub struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    stderr_path: PathBuf,
    /// The admin listener (passed with `--admin`).
    pub admin: SocketAddr,
    /// Listener name -> address, from the config's `[[listeners]]`.
    pub listeners: BTreeMap<String, SocketAddr>,
    /// Connections the start-up probe opened (and closed at once) to see
    /// that the listeners accept; a TCP listener forwards each of them.
    pub probes: usize,
}

impl Proxy {
    /// Starts the proxy with the config `make` writes. `make` is called
    /// again (to pick new ports with [`free_addr`]) if a port it picked was
    /// taken before the proxy could bind it. Returns once `/readyz` answers
    /// 200 and every listener accepts.
    pub async fn start(make: impl Fn() -> String) -> Proxy {
        Proxy::start_with_args(make, &[]).await
    }

    /// [`Proxy::start`] with extra arguments for `pointsman run`.
    pub async fn start_with_args(make: impl Fn() -> String, extra: &[&str]) -> Proxy {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match Proxy::try_start(&make(), extra).await {
                Ok(p) => return p,
                Err(stderr) if is_bind_race(&stderr) => last = stderr,
                Err(stderr) => panic!("pointsman did not start; its stderr:\n{stderr}"),
            }
        }
        panic!(
            "pointsman could not bind its ports in {START_ATTEMPTS} attempts; last stderr:\n{last}"
        )
    }

    async fn try_start(config: &str, extra: &[&str]) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let config_path = dir.path().join("pointsman.toml");
        std::fs::write(&config_path, config).expect("write the config");
        let stderr_path = dir.path().join("stderr.log");
        // A free admin address, unless the test passes its own `--admin`.
        let own_admin = extra
            .iter()
            .position(|a| *a == "--admin")
            .and_then(|i| extra.get(i + 1))
            .map(|a| a.parse::<SocketAddr>().expect("--admin takes an address"));
        let admin = own_admin.unwrap_or_else(free_addr);
        let admin_arg = admin.to_string();
        let admin_args = ["--admin", admin_arg.as_str()];
        let listeners = listener_addrs(config, extra);
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(if own_admin.is_some() {
                &[][..]
            } else {
                &admin_args[..]
            })
            // Two event loops unless the test asks for something else.
            .args(if extra.contains(&"--threads") {
                &[][..]
            } else {
                &["--threads", "2"][..]
            })
            .args(extra)
            .env("NO_COLOR", "1")
            .env("POINTSMAN_LOG", "info")
            .env_remove("POINTSMAN_CONFIG")
            .env_remove("POINTSMAN_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).expect("create the stderr file"))
            .spawn()
            .expect("spawn pointsman");
        let mut proxy = Proxy {
            child,
            dir,
            config_path,
            stderr_path,
            admin,
            listeners,
            probes: 0,
        };
        let end = Instant::now() + START_DEADLINE;
        let probe = plain_client();
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                return Err(format!("(exited with {status})\n{}", proxy.stderr()));
            }
            let ready = match probe.get(proxy.admin_url("/readyz")).send().await {
                Ok(r) => r.status() == 200,
                Err(_) => false,
            };
            let mut all = ready;
            for addr in proxy.listeners.values() {
                all = all && accepts(*addr).await;
                proxy.probes += usize::from(all);
            }
            if all {
                return Ok(proxy);
            }
            if Instant::now() >= end {
                panic!(
                    "pointsman was not ready within {START_DEADLINE:?} (admin {}, listeners {:?}); its stderr:\n{}",
                    proxy.admin,
                    proxy.listeners,
                    proxy.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The address of a listener named in the config.
    pub fn listener(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no listener {name:?} in {:?}", self.listeners))
    }

    /// The first listener (by name) of the config.
    pub fn addr(&self) -> SocketAddr {
        *self
            .listeners
            .values()
            .next()
            .expect("the config has a listener")
    }

    /// `http://<first listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// What the proxy has written to stderr so far.
    pub fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    /// Writes a new config over the watched file atomically (a rename, as
    /// editors do).
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.path().join(".pointsman.toml.new");
        std::fs::write(&tmp, text).expect("write the new config");
        std::fs::rename(&tmp, &self.config_path).expect("rename the new config into place");
    }

    /// Writes a new config and waits until the proxy says it applied it.
    pub async fn reload(&self, text: &str) {
        let before = self.stderr().matches("config applied").count();
        self.write_and_wait(
            text,
            "the proxy logs `config applied` for the new config",
            |err| err.matches("config applied").count() > before,
        )
        .await;
    }

    /// Writes a config that must be refused; waits for the refusal and
    /// returns the stderr lines it added.
    pub async fn reload_refused(&self, text: &str) -> String {
        let before = self.stderr();
        let refusals = before.matches("reload refused").count();
        self.write_and_wait(text, "the proxy refuses the new config", |err| {
            err.matches("reload refused").count() > refusals
        })
        .await;
        let err = self.stderr();
        err.get(before.len()..).unwrap_or(&err).to_string()
    }

    /// Writes `text` as the config and waits until `done(stderr)`.
    ///
    /// The file is written a second time if nothing happened after
    /// [`REWRITE_AFTER`]: `/readyz` answers 200 before the config watcher
    /// is installed (see `App::start`), so a change made right after start
    /// can go unseen. The second write is reported on stderr.
    pub async fn write_and_wait(&self, text: &str, what: &str, done: impl Fn(&str) -> bool) {
        self.write_config(text);
        let start = Instant::now();
        let mut rewritten = false;
        loop {
            let err = self.stderr();
            if done(&err) {
                return;
            }
            if !rewritten && start.elapsed() >= REWRITE_AFTER {
                eprintln!(
                    "note: no reaction to the config change after {REWRITE_AFTER:?}; writing it again \
                     (the watcher may have started after /readyz said ready)"
                );
                self.write_config(text);
                rewritten = true;
            }
            if start.elapsed() >= RELOAD_DEADLINE {
                panic!("timed out after {RELOAD_DEADLINE:?} waiting until {what}; stderr:\n{err}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `/api/services` as JSON.
    /// The value of one series of `/metrics`, e.g.
    /// `pointsman_registry_malformed_total{source="etcd"}`; `None` when the
    /// scrape fails or the series is not there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = plain_client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    pub async fn services(&self) -> Value {
        let resp = plain_client()
            .get(self.admin_url("/api/services"))
            .send()
            .await
            .expect("GET /api/services");
        assert_eq!(resp.status(), 200, "GET /api/services");
        resp.json().await.expect("/api/services is JSON")
    }

    /// One endpoint's view in `/api/services`.
    pub async fn endpoint(&self, service: &str, id: &str) -> Value {
        let all = self.services().await;
        endpoint_in(&all, service, id)
            .unwrap_or_else(|| panic!("no endpoint {service}/{id} in /api/services: {all:#}"))
    }
}

/// Finds `service`/`id` in an `/api/services` answer.
pub fn endpoint_in(services: &Value, service: &str, id: &str) -> Option<Value> {
    services.as_array()?.iter().find(|s| s["name"] == service)?["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["id"] == id)
        .cloned()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_bind_race(stderr: &str) -> bool {
    stderr.contains("cannot bind") || stderr.contains("Address already in use")
}

/// Listener name -> bind address, read from a config's `[[listeners]]`,
/// with `--listen` in `args` applied as `pointsman run` applies it: it
/// replaces the first HTTP listener's address, or adds one named "web".
fn listener_addrs(config: &str, args: &[&str]) -> BTreeMap<String, SocketAddr> {
    let value: toml::Value = toml::from_str(config)
        .unwrap_or_else(|e| panic!("the test's config is not TOML: {e}\n{config}"));
    let listen: Option<SocketAddr> = args
        .iter()
        .position(|a| *a == "--listen")
        .and_then(|i| args.get(i + 1))
        .map(|a| a.parse().expect("--listen takes an address"));
    let mut out = BTreeMap::new();
    let mut replaced = false;
    for l in value
        .get("listeners")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        let name = l["name"].as_str().expect("listener name").to_string();
        let mut bind: SocketAddr = l["bind"]
            .as_str()
            .expect("listener bind")
            .parse()
            .expect("listener bind is an address");
        let http = l.get("mode").and_then(|m| m.as_str()).unwrap_or("http") == "http";
        if let (Some(addr), true, false) = (listen, http, replaced) {
            bind = addr;
            replaced = true;
        }
        out.insert(name, bind);
    }
    if let (Some(addr), false) = (listen, replaced) {
        out.insert("web".to_string(), addr);
    }
    out
}

/// Runs `pointsman <args>` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("POINTSMAN_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run pointsman");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------
// Upstreams

/// A running `pointsman upstream`: a real HTTP echo server. Killed when
/// dropped.
pub struct Upstream {
    child: Child,
    pub name: String,
    pub addr: SocketAddr,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Upstream::start_many(&[name]).await.remove(0)
    }

    /// Starts one upstream per name, all at once, and waits for each.
    pub async fn start_many(names: &[&str]) -> Vec<Upstream> {
        let mut out: Vec<Upstream> = names.iter().map(|n| Upstream::spawn(n)).collect();
        for u in &mut out {
            u.wait_ready().await;
        }
        out
    }

    fn spawn(name: &str) -> Upstream {
        let addr = free_addr();
        let child = Command::new(BIN)
            .arg("upstream")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--name")
            .arg(name)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pointsman upstream");
        Upstream {
            child,
            name: name.to_string(),
            addr,
        }
    }

    async fn wait_ready(&mut self) {
        let end = Instant::now() + START_DEADLINE;
        for _ in 0..START_ATTEMPTS {
            loop {
                if let Ok(Some(_)) = self.child.try_wait() {
                    // Most likely the port was taken meanwhile: another one.
                    *self = Upstream::spawn(&self.name);
                    break;
                }
                if accepts(self.addr).await {
                    return;
                }
                assert!(
                    Instant::now() < end,
                    "upstream {} did not listen on {} within {START_DEADLINE:?}",
                    self.name,
                    self.addr
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("upstream {} could not start", self.name);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config with one HTTP listener whose default service is `web`, with
/// `settings` (TOML lines of `[services.web]`) and `endpoints` (inline
/// tables, see [`ep`] and [`endpoint_line`]).
pub fn web(listen: SocketAddr, settings: &str, endpoints: &[String]) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
bind = "{listen}"
default_service = "web"

[services.web]
{settings}
endpoints = [
  {}
]
"#,
        endpoints.join(",\n  ")
    )
}

/// An endpoint as an inline table.
pub fn ep(id: &str, addr: SocketAddr) -> String {
    format!("{{ id = \"{id}\", address = \"{addr}\" }}")
}

/// A config line for an endpoint: `{ id = "<name>", address = "<addr>" }`
/// plus `extra` (e.g. `weight = 2`).
pub fn endpoint_line(u: &Upstream, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!("{{ id = \"{}\", address = \"{}\"{extra} }}", u.name, u.addr)
}

// ---------------------------------------------------------------------------
// Clients

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .connect_timeout(Duration::from_secs(5))
}

/// A client that keeps connections alive and reuses them.
pub fn client() -> reqwest::Client {
    builder().build().expect("build a reqwest client")
}

/// A client that opens a new connection for every request.
pub fn plain_client() -> reqwest::Client {
    builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("build a reqwest client")
}

/// A keep-alive client whose connections come from `ip` (any 127.0.0.0/8
/// address works on Linux loopback).
pub fn client_from(ip: IpAddr) -> reqwest::Client {
    builder()
        .local_address(ip)
        .build()
        .expect("build a reqwest client")
}

/// GET `url` with `headers`; the status and the upstream's JSON echo (or
/// `Value::Null` when the body is not JSON).
pub async fn get_echo(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// GET `url` and return which upstream answered (its `server` name);
/// panics unless the answer is a 200 echo.
pub async fn server_of(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> String {
    let (status, echo) = get_echo(client, url, headers).await;
    assert_eq!(status, 200, "GET {url} {headers:?}: {echo}");
    echo["server"]
        .as_str()
        .unwrap_or_else(|| panic!("GET {url}: no server in {echo}"))
        .to_string()
}

/// Counts answers by upstream name over `n` GETs.
pub async fn tally(client: &reqwest::Client, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts.entry(server_of(client, url, &[]).await).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 over a socket, for checks a client library would hide.

/// A response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads bytes into `buf` until it contains `\r\n\r\n`; returns the head's
/// length (including the blank line). Panics on EOF or after 10 s.
pub async fn read_until_blank_line<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> usize {
    let read = async {
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = r.read(&mut chunk).await.expect("read a response head");
            assert!(
                n > 0,
                "connection closed before a full head; got {:?}",
                String::from_utf8_lossy(buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response head within 10 s")
}

/// Parses a response head: the status and lower-cased headers.
pub fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// Reads one response (Content-Length, chunked, or until close) from a
/// keep-alive connection. 1xx interim responses are skipped.
pub async fn read_response<R: AsyncRead + Unpin>(r: &mut R) -> RawResponse {
    let mut buf = Vec::new();
    loop {
        let head_len = read_until_blank_line(r, &mut buf).await;
        let (status, headers) = parse_head(&buf[..head_len]);
        buf.drain(..head_len);
        if (100..200).contains(&status) {
            continue;
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let body = if let Some(len) = header("content-length") {
            let len: usize = len.parse().expect("numeric content-length");
            while buf.len() < len {
                read_more(r, &mut buf).await;
            }
            buf.truncate(len);
            buf
        } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            read_chunked(r, buf).await
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut buf)).await;
            buf
        };
        return RawResponse {
            status,
            headers,
            body,
        };
    }
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut chunk))
        .await
        .expect("more body within 10 s")
        .expect("read a body");
    assert!(n > 0, "connection closed in the middle of a body");
    buf.extend_from_slice(&chunk[..n]);
}

async fn read_chunked<R: AsyncRead + Unpin>(r: &mut R, mut buf: Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            read_more(r, &mut buf).await;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (none expected) and the final CRLF.
            while !buf.windows(2).any(|w| w == b"\r\n") {
                read_more(r, &mut buf).await;
            }
            return body;
        }
        while buf.len() < size + 2 {
            read_more(r, &mut buf).await;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// Sends `request` (raw bytes) on a new connection and reads one response.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("send the request");
    read_response(&mut s).await
}

/// Waits until the peer closes `s` (a read returns 0 or fails); returns
/// how long that took and what arrived before it.
pub async fn wait_closed(s: &mut TcpStream, deadline: Duration) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or_else(|_| panic!("the connection was still open after {deadline:?}"));
    (start.elapsed(), got)
}

// ---------------------------------------------------------------------------
// HTTP/2 with prior knowledge (h2c), through hyper's client.

/// Sends GET `path` over h2c to `addr`; the response's version, status and
/// body.
pub async fn h2c_get(addr: SocketAddr, path: &str) -> (hyper::Version, u16, Bytes) {
    let stream = TcpStream::connect(addr).await.expect("connect for h2c");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake with the proxy");
    let driver = tokio::spawn(conn);
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("build an h2 request");
    let resp = sender.send_request(req).await.expect("h2c request");
    let version = resp.version();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("h2c body")
        .to_bytes();
    driver.abort();
    (version, status, body)
}

// ---------------------------------------------------------------------------
// In-process servers

/// A task serving on a loopback port; aborted when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// An HTTP/1.1 server on the test's runtime answering with `handler`.
pub async fn http_server<F, Fut>(handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, task }
}

/// A WebSocket server that echoes every text and binary message, and
/// greets each client with `hello from <name>` first.
pub async fn ws_echo_server(name: &str) -> Server {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let greeting = format!("hello from {name}");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let greeting = greeting.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                if ws.send(Message::text(greeting)).await.is_err() {
                    return;
                }
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(_) | Message::Binary(_) => msg,
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Server { addr, task }
}

/// A TCP server that echoes bytes as they arrive and, once the client has
/// shut down its write side, sends `<name> saw EOF after <n> bytes` and
/// closes.
pub async fn tcp_echo_server(name: &str) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let name = name.to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let mut total = 0usize;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            total += n;
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let bye = format!("{name} saw EOF after {total} bytes");
                let _ = stream.write_all(bye.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Server { addr, task }
}

/// A TCP listener that accepts and never answers (for timeouts).
pub async fn silent_server() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    Server { addr, task }
}
