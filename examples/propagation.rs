//! Propagation benchmark: how long a registry change in etcd takes to show
//! in the requests a real proxy serves.
//!
//! It starts a throwaway etcd (or uses `--etcd-endpoint`), two in-process
//! echo upstreams (`u0`, `u1`, the same server `pointsman upstream` runs),
//! and the real proxy binary (`pointsman run --etcd ...`) whose listener
//! sends everything to one service. The service always has one instance,
//! on one of the two upstreams. Each change then
//!
//! - **put**: registers a new instance on the *other* upstream with the etcd
//!   JSON gateway (`/v3/kv/put`) and, from the moment the put's answer
//!   arrives, polls the proxy over one keep-alive connection until a
//!   response names the new upstream;
//! - **del**: deletes the old instance (`/v3/kv/deleterange`) and polls
//!   until responses stop naming the old upstream: the time is taken at the
//!   first response of the final run that does not name it, confirmed by
//!   20 more such responses in a row (while both instances are in the table
//!   a single client's requests alternate strictly between them).
//!
//! Both figures are upper bounds that include one poll round trip (about
//! 0.1 ms on loopback), and a put can need a second poll when the
//! round-robin cursor points at the old instance first. The result is one
//! line a script can grep:
//!
//! ```text
//! propagation put_p50_ms=.. put_p99_ms=.. put_max_ms=.. del_p50_ms=.. del_p99_ms=.. del_max_ms=.. etcd_write_p50_ms=.. etcd_write_p99_ms=.. changes=200 errors=0
//! ```
//!
//! The clock starts when etcd's answer arrives, as an operator's script
//! would see it; etcd notifies watchers while that answer is on its way,
//! so on one machine the proxy has often applied the change before the
//! first poll. `etcd_write_*` is how long etcd took to answer (commit and
//! fsync), not included in the other figures.
//!
//!     cargo run --release --example propagation -- [--changes 200]
//!
//! Without `--pointsman-bin` the proxy binary is the one next to this
//! example's target directory (`target/release/pointsman`), built first
//! with `cargo build` if needed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use pointsman_testkit::etcd::EtcdServer;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Responses in a row not naming the deleted instance that confirm it left.
const CONFIRM: usize = 20;

#[derive(Parser)]
#[command(about = "Measures etcd change -> proxy propagation (put and delete), p50/p99/max")]
struct Args {
    /// Use this running etcd (client URL) instead of starting one. Only keys
    /// under /services/<service>/ are written, and deleted at the end.
    #[arg(long)]
    etcd_endpoint: Option<String>,
    /// The proxy binary [default: `pointsman` in this example's target
    /// directory, built with cargo first].
    #[arg(long)]
    pointsman_bin: Option<PathBuf>,
    /// Measured changes (each one put and one delete).
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Unmeasured changes first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// The service name the instances register under.
    #[arg(long, default_value = "propagation")]
    service: String,
    /// Worker threads of the proxy [default: the proxy's default, all cores].
    #[arg(long)]
    proxy_threads: Option<usize>,
    /// Give up when one change has not shown after this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("propagation: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("propagation: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, String>;

async fn run(args: Args) -> Result<bool> {
    let bin = match &args.pointsman_bin {
        Some(b) => b.clone(),
        None => build_pointsman()?,
    };
    let work = tempfile::Builder::new()
        .prefix("pointsman-propagation-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;

    let (_etcd, endpoint) = match &args.etcd_endpoint {
        Some(e) => (None, e.trim_end_matches('/').to_string()),
        None => {
            // The tests' throwaway etcd: free loopback ports, its own
            // temporary directory, killed when dropped.
            let etcd = tokio::task::spawn_blocking(EtcdServer::start)
                .await
                .map_err(|e| format!("starting etcd failed: {e}"))?;
            let e = etcd.endpoint();
            (Some(etcd), e)
        }
    };
    let kv = EtcdKv::new(&endpoint)?;
    let dir = format!("/services/{}/", args.service);
    kv.delete_prefix(&dir).await?;

    let stop = CancellationToken::new();
    let _stop_upstreams = stop.clone().drop_guard();
    let mut upstreams = Vec::new();
    for name in ["u0", "u1"] {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot bind an upstream: {e}"))?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(pointsman::process::upstream::serve(
            l,
            name.into(),
            stop.clone(),
        ));
        upstreams.push((name, addr));
    }

    let key = |id: &str| format!("{dir}{id}");
    kv.put(&key("i0"), &upstreams[0].1.to_string()).await?;
    let proxy = ProxyProcess::start(&bin, work.path(), &endpoint, &args).await?;
    let mut poller = Poller::new(proxy.listen);
    let timeout = Duration::from_millis(args.timeout_ms);
    // The proxy serves u0 before anything is measured.
    let start = Instant::now();
    loop {
        if let Ok((200, Some(name))) = poller.get().await {
            if name == "u0" {
                break;
            }
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "the proxy never served the first instance; its stderr:\n{}",
                proxy.stderr_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut puts = Vec::with_capacity(args.changes);
    let mut dels = Vec::with_capacity(args.changes);
    // How long etcd took to answer each put and delete (the commit, with
    // its fsync), to read the figures above against.
    let mut writes = Vec::with_capacity(args.changes * 2);
    let mut errors = 0usize;
    let (mut cur_id, mut cur) = ("i0".to_string(), 0usize);
    let total = args.warmup + args.changes;
    let mut next_report = 50;
    for i in 1..=total {
        let next = 1 - cur;
        let (old_name, new_name) = (upstreams[cur].0, upstreams[next].0);
        let new_id = format!("i{i}");

        // (a) put -> first response from the new instance.
        let put_sent = Instant::now();
        kv.put(&key(&new_id), &upstreams[next].1.to_string())
            .await?;
        let put_done = Instant::now();
        let put_write = put_done - put_sent;
        let put_latency = loop {
            match poller.get().await {
                Ok((200, Some(name))) if name == new_name => break put_done.elapsed(),
                Ok((200, Some(name))) if name == old_name => {}
                other => {
                    errors += 1;
                    eprintln!("change {i}: unexpected answer after the put: {other:?}");
                }
            }
            if put_done.elapsed() > timeout {
                return Err(format!(
                    "change {i}: the new instance {new_id} was not served within {timeout:?}; proxy stderr:\n{}",
                    proxy.stderr_tail()
                ));
            }
        };

        // (b) delete -> responses stop naming the old instance.
        let del_sent = Instant::now();
        kv.delete(&key(&cur_id)).await?;
        let del_done = Instant::now();
        let del_write = del_done - del_sent;
        let mut streak_start: Option<Duration> = None;
        let mut streak = 0usize;
        let del_latency = loop {
            match poller.get().await {
                Ok((200, Some(name))) if name == old_name => {
                    streak = 0;
                    streak_start = None;
                }
                Ok((200, Some(name))) if name == new_name => {
                    if streak == 0 {
                        streak_start = Some(del_done.elapsed());
                    }
                    streak += 1;
                    if streak > CONFIRM {
                        break streak_start.unwrap_or_default();
                    }
                }
                other => {
                    errors += 1;
                    eprintln!("change {i}: unexpected answer after the delete: {other:?}");
                }
            }
            if del_done.elapsed() > timeout {
                return Err(format!(
                    "change {i}: the deleted instance {cur_id} was still served after {timeout:?}; proxy stderr:\n{}",
                    proxy.stderr_tail()
                ));
            }
        };

        if i > args.warmup {
            puts.push(put_latency);
            dels.push(del_latency);
            writes.extend([put_write, del_write]);
            let done = i - args.warmup;
            if done >= next_report {
                eprintln!("propagation: {done}/{} changes", args.changes);
                next_report += 50;
            }
        }
        cur_id = new_id;
        cur = next;
    }
    kv.delete_prefix(&dir).await?;

    let (p, d, w) = (
        Stats::of(&mut puts),
        Stats::of(&mut dels),
        Stats::of(&mut writes),
    );
    eprintln!(
        "put -> first response from the new instance:     p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        p.p50, p.p99, p.max
    );
    eprintln!(
        "delete -> responses stop naming the old instance: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        d.p50, d.p99, d.max
    );
    eprintln!(
        "etcd answering a put or delete (not included above): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        w.p50, w.p99, w.max
    );
    println!(
        "propagation put_p50_ms={:.3} put_p99_ms={:.3} put_max_ms={:.3} del_p50_ms={:.3} del_p99_ms={:.3} del_max_ms={:.3} etcd_write_p50_ms={:.3} etcd_write_p99_ms={:.3} changes={} errors={errors}",
        p.p50,
        p.p99,
        p.max,
        d.p50,
        d.p99,
        d.max,
        w.p50,
        w.p99,
        puts.len()
    );
    Ok(errors == 0)
}

/// p50, p99 and max in milliseconds (nearest rank).
struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Stats {
    fn of(samples: &mut [Duration]) -> Stats {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let rank = |p: f64| {
            let n = samples.len();
            if n == 0 {
                return 0.0;
            }
            let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            ms(samples[i])
        };
        Stats {
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples.last().map(|d| ms(*d)).unwrap_or(0.0),
        }
    }
}

// ---------------------------------------------------------------------------
// The proxy binary

/// `pointsman` next to this example (`target/<profile>/examples/propagation`
/// -> `target/<profile>/pointsman`), built with cargo first so it is current.
fn build_pointsman() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| format!("where am I? {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected location {}", exe.display()))?;
    let bin = profile_dir.join("pointsman");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--bin", "pointsman", "--manifest-path"])
        .arg(&manifest);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    eprintln!("propagation: building the proxy (cargo build --bin pointsman)");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) if bin.exists() => eprintln!(
            "propagation: cargo build failed ({s}); using the existing {}",
            bin.display()
        ),
        Ok(s) => return Err(format!("cargo build --bin pointsman failed ({s})")),
        Err(e) if bin.exists() => eprintln!(
            "propagation: cannot run cargo ({e}); using the existing {}",
            bin.display()
        ),
        Err(e) => return Err(format!("cannot run cargo to build the proxy: {e}")),
    }
    if !bin.exists() {
        return Err(format!(
            "no proxy binary at {}: pass --pointsman-bin",
            bin.display()
        ));
    }
    Ok(bin)
}

/// A running `pointsman run`, killed when dropped.
struct ProxyProcess {
    child: Child,
    listen: SocketAddr,
    stderr_path: PathBuf,
}

impl ProxyProcess {
    async fn start(bin: &Path, work: &Path, etcd: &str, args: &Args) -> Result<ProxyProcess> {
        let (listen, admin) = (free_addr()?, free_addr()?);
        let config = work.join("pointsman.toml");
        std::fs::write(
            &config,
            format!(
                "[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\ndefault_service = \"{}\"\n",
                args.service
            ),
        )
        .map_err(|e| format!("cannot write the config: {e}"))?;
        let stderr_path = work.join("pointsman.log");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--etcd", etcd, "--admin", &admin.to_string()])
            .env("NO_COLOR", "1")
            .env("POINTSMAN_LOG", "warn")
            .env_remove("POINTSMAN_CONFIG")
            .env_remove("POINTSMAN_ETCD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(n) = args.proxy_threads {
            cmd.args(["--threads", &n.to_string()]);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut proxy = ProxyProcess {
            child,
            listen,
            stderr_path,
        };
        let ready = format!("http://{admin}/readyz");
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                return Err(format!(
                    "the proxy exited ({status}); its stderr:\n{}",
                    proxy.stderr_tail()
                ));
            }
            if let Ok(r) = client.get(&ready).send().await {
                if r.status() == 200 {
                    return Ok(proxy);
                }
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!(
                    "the proxy was not ready within 20 s; its stderr:\n{}",
                    proxy.stderr_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr_tail(&self) -> String {
        tail(&self.stderr_path)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The client that polls the proxy

/// GETs over one keep-alive HTTP/1.1 connection, reconnecting if it breaks.
struct Poller {
    addr: SocketAddr,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Poller {
    fn new(addr: SocketAddr) -> Poller {
        Poller { addr, sender: None }
    }

    /// One GET: the status and the upstream named in the echo (if any).
    async fn get(&mut self) -> Result<(u16, Option<String>)> {
        match tokio::time::timeout(Duration::from_secs(2), self.try_get()).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                Err("no answer within 2 s".into())
            }
        }
    }

    async fn try_get(&mut self) -> Result<(u16, Option<String>)> {
        let usable = matches!(&self.sender, Some(s) if !s.is_closed());
        if !usable {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect to the proxy: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake with the proxy: {e}"))?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let Some(sender) = self.sender.as_mut() else {
            return Err("no connection".into());
        };
        sender.ready().await.map_err(|e| e.to_string())?;
        let req = Request::get("/")
            .header(hyper::header::HOST, self.addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let server = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["server"].as_str().map(str::to_string));
        Ok((status, server))
    }
}

// ---------------------------------------------------------------------------
// etcd

/// etcd's v3 JSON gateway (keys and values in base64).
struct EtcdKv {
    http: reqwest::Client,
    endpoint: String,
}

impl EtcdKv {
    fn new(endpoint: &str) -> Result<EtcdKv> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(EtcdKv {
            http,
            endpoint: endpoint.to_string(),
        })
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}{path}", self.endpoint);
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| format!("POST {url}: {e}"))?;
        if !status.is_success() {
            return Err(format!("POST {url}: {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("POST {url}: not JSON ({e}): {text}"))
    }

    async fn put(&self, key: &str, value: &str) -> Result<()> {
        let body = json!({ "key": b64(key.as_bytes()), "value": b64(value.as_bytes()) });
        self.call("/v3/kv/put", body).await.map(drop)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let v = self
            .call("/v3/kv/deleterange", json!({ "key": b64(key.as_bytes()) }))
            .await?;
        // The gateway leaves `deleted` out when it is 0.
        match v.get("deleted") {
            Some(_) => Ok(()),
            None => Err(format!("delete {key}: nothing was deleted")),
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1; // prefixes here end in '/', never 0xff
        }
        let body = json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&end) });
        self.call("/v3/kv/deleterange", body).await.map(drop)
    }
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Small things

/// A loopback address whose port was free a moment ago.
fn free_addr() -> Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(super::b64(b""), "");
        assert_eq!(super::b64(b"f"), "Zg==");
        assert_eq!(super::b64(b"fo"), "Zm8=");
        assert_eq!(super::b64(b"foo"), "Zm9v");
        assert_eq!(super::b64(b"/x/a"), "L3gvYQ==");
    }
}
