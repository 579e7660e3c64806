//! Fuzz harnesses for the proxy's parsers and its request path: each takes
//! arbitrary bytes, runs them through the functions the proxy itself uses,
//! and panics only when an invariant breaks. `fuzz/` runs them under
//! libFuzzer (`make fuzz`); `tests/fuzz_corpus.rs` replays every corpus
//! file and every crash found through them on the stable toolchain
//! (`make test`). The registry parsers' harnesses are in
//! `pointsman_discovery::fuzzing`, the takeover wire format's in
//! `process::takeover::fuzzing` (which uses this module's runtime and panic
//! watch, so this module does not import `process`).
//!
//! Not an API: the input layouts are described on each function.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::control::config::Config;
use crate::control::writer::{Control, ListenerControl};
use crate::engine::http::HttpProxy;
use crate::engine::table::{RoutingTable, SharedTable};
use crate::engine::ClientLimits;
use crate::ops::runtime::{looks_like_http, parse, resolve_weight, split_line, Request};

/// Runs `f` on this thread's runtime: a current-thread runtime built once
/// per thread, so that a fuzzer's millions of runs do not each build one,
/// and every task the proxy spawns runs on the calling thread.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RUNTIME: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("cannot build the harness runtime: {e}")),
        ));
    }
    RUNTIME.with(|rt| rt.block_on(f))
}

thread_local! {
    static PANICKED: Cell<bool> = const { Cell::new(false) };
}

/// From now on, notes every panic on this thread, also those of tasks the
/// proxy spawns (tokio keeps them from the caller), so that
/// [`assert_no_task_panicked`] can fail on them.
pub(crate) fn watch_panics() {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.with(|p| p.set(true));
            previous(info);
        }));
    });
    PANICKED.with(|p| p.set(false));
}

/// Fails if anything on this thread panicked since [`watch_panics`].
pub(crate) fn assert_no_task_panicked(what: &str) {
    assert!(
        !PANICKED.with(|p| p.replace(false)),
        "a task panicked while the proxy handled {what} (see the panic message above)"
    );
}

/// A config file's text. Checks: parsing never panics; a refusal names a
/// line of the text; parsing is deterministic; a config that parses gives
/// its entries and client limits.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse("fuzz.toml", text) {
        Ok(config) => {
            let again = Config::parse("fuzz.toml", text).ok();
            assert_eq!(again.as_ref(), Some(&config), "parsing is deterministic");
            let _ = config.entries();
            let _ = ClientLimits::from(&config.global);
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(
                shown.starts_with("fuzz.toml"),
                "the error names the file: {shown}"
            );
            let lines = text.lines().count().max(1);
            if let Some(line) = error_line(&e) {
                assert!(
                    line >= 1 && line <= lines + 1,
                    "line {line} of {lines}: {shown}"
                );
            }
        }
    }
}

fn error_line(e: &crate::control::config::ConfigError) -> Option<usize> {
    use crate::control::config::ConfigError;
    match e {
        ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => Some(*line),
        _ => None,
    }
}

/// One runtime API line, as a client sends it (without its newline).
/// Checks: splitting and parsing never panic; a refusal is an answer for
/// the client (one or more whole lines); the words, written back with
/// HAProxy's escapes, split to the same words.
pub fn runtime_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let _ = looks_like_http(line);
    let commands = split_line(line);
    assert!(!commands.is_empty(), "a line holds at least one command");
    for words in &commands {
        match parse(words) {
            Ok(Request::SetWeight(_, w)) => {
                let _ = resolve_weight(w, u32::MAX);
                let _ = resolve_weight(w, 0);
            }
            Ok(_) => {}
            Err(answer) => {
                assert!(
                    answer.ends_with('\n'),
                    "an answer ends its line: {answer:?}"
                );
            }
        }
    }
    if commands.iter().flatten().all(|w| !w.is_empty()) {
        let written = commands
            .iter()
            .map(|words| {
                words
                    .iter()
                    .map(|w| escape(w))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join(";");
        assert_eq!(
            split_line(&written),
            commands,
            "written back as {written:?}"
        );
    }
}

/// A request path, as routes see it. Checks: normalising never panics;
/// a normal path is normal already (normalising it again changes
/// nothing); it keeps its leading `/`, holds no dot segment and no escape
/// of an unreserved character, so no server reads it otherwise.
pub fn request_path(data: &[u8]) {
    use crate::engine::path::normalize;
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let path = format!("/{raw}");
    let Ok(normal) = normalize(&path) else {
        return;
    };
    assert!(normal.starts_with('/'), "{path:?} became {normal:?}");
    assert!(
        normal.split('/').all(|s| s != "." && s != ".."),
        "{path:?} became {normal:?}, with a dot segment"
    );
    let again = normalize(&normal).map(|n| n.into_owned());
    assert_eq!(
        again.as_deref(),
        Ok(&*normal),
        "{path:?}: its normal form {normal:?} is not normal"
    );
    let bytes = normal.as_bytes();
    for (i, _) in normal.match_indices('%') {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        let Some(c) = escaped else {
            panic!("{path:?} became {normal:?}, with a broken escape");
        };
        assert!(
            !(c.is_ascii_alphanumeric() || b"-._~/\\".contains(&c) || c == 0),
            "{path:?} became {normal:?}, which still escapes {:?}",
            char::from(c)
        );
    }
}

/// A word as a client writes it: the separators and `\` escaped.
fn escape(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if matches!(c, '\\' | ';' | ' ' | '\t' | '\r' | '\n') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Most a request head takes to be answered, timeouts included.
const ANSWER_BOUND: Duration = Duration::from_secs(5);

/// How long the client waits for the proxy to close before it closes
/// itself: well past the rig's idle (10 ms) and head (100 ms) timeouts,
/// which close a connection that is done. One wait has no timer of its
/// own (see the Fuzzing section of src/control/CONFIG.md): a request body
/// that stops coming; the client's leaving ends it.
const PATIENCE: Duration = Duration::from_millis(250);

/// The bytes a client sends on one connection, through the proxy to a
/// recording upstream, both on loopback; the proxy runs with short client
/// timeouts (idle 10 ms, head 100 ms), which close the connection once it
/// is done. Checks:
/// the proxy never panics (nor does any task it spawns); it is done with
/// the connection within [`ANSWER_BOUND`] once the client has gone; it
/// leaves no upstream connection
/// open once its idle ones are dropped; and the upstream never receives
/// more requests than the client sent heads (no request smuggled inside
/// another's body).
pub fn request_head(data: &[u8]) {
    let received = forwarded(data);
    let sent = heads_in(data);
    assert!(
        received <= sent,
        "the upstream received {received} requests, the client sent at most {sent} heads"
    );
}

/// How many requests the upstream received for one client connection
/// sending `data`, checking everything [`request_head`] checks but the
/// count.
pub fn forwarded(data: &[u8]) -> usize {
    watch_panics();
    let received = block_on(async {
        let rig = rig().await;
        let before = rig.upstream.requests.load(Ordering::SeqCst);
        rig.exchange(data).await;
        rig.drop_idle_upstreams().await;
        rig.upstream.requests.load(Ordering::SeqCst) - before
    });
    assert_no_task_panicked("a client connection");
    received
}

/// How many requests a client's bytes can hold at most: for HTTP/1, the
/// ends of heads (an empty line, `\r\n` or `\n`); for HTTP/2 with prior
/// knowledge, the HEADERS frames.
pub fn heads_in(data: &[u8]) -> usize {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    if let Some(frames) = data.strip_prefix(PREFACE) {
        return h2_headers_frames(frames);
    }
    (0..data.len())
        .filter(|&i| data[i] == b'\n' && matches!(&data[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
        .count()
}

fn h2_headers_frames(mut frames: &[u8]) -> usize {
    const HEADERS: u8 = 0x1;
    let mut n = 0;
    while let [a, b, c, kind, ..] = *frames {
        let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        // A HEADERS frame cut short may still be taken as a request.
        if kind == HEADERS {
            n += 1;
        }
        match frames.get(9 + len..) {
            Some(rest) => frames = rest,
            None => break,
        }
    }
    n
}

/// A proxy with one service, `app`, whose one endpoint records what it
/// receives; built once per thread (its sockets belong to the thread's
/// runtime), and so used by one client at a time.
struct Rig {
    proxy: Arc<HttpProxy>,
    table: SharedTable,
    client_side: TcpListener,
    client_addr: SocketAddr,
    permits: Arc<Semaphore>,
    upstream: Arc<Recorder>,
}

#[derive(Default)]
struct Recorder {
    /// Requests received, since the start.
    requests: AtomicUsize,
    /// Connections open now.
    open: AtomicUsize,
}

/// Binds nothing: the harness hands the proxy its client connections.
struct NoListeners;

impl ListenerControl for NoListeners {
    fn reconcile(&mut self, _: &Config) -> Result<(), String> {
        Ok(())
    }
}

async fn rig() -> &'static Rig {
    thread_local! {
        static RIG: Cell<Option<&'static Rig>> = const { Cell::new(None) };
    }
    if let Some(rig) = RIG.with(Cell::get) {
        return rig;
    }
    let rig: &'static Rig = Box::leak(Box::new(build_rig().await));
    RIG.with(|r| r.set(Some(rig)));
    rig
}

async fn build_rig() -> Rig {
    let loopback = |what: &str, e: std::io::Error| -> ! {
        panic!("the request-head harness cannot bind its {what} on 127.0.0.1: {e}")
    };
    let upstream_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| loopback("upstream", e));
    let upstream_addr = upstream_listener
        .local_addr()
        .unwrap_or_else(|e| loopback("upstream", e));
    let upstream = Arc::new(Recorder::default());
    tokio::spawn(record(upstream_listener, upstream.clone()));

    let text = format!(
        r#"
[global]
header_read_timeout = "100ms"
idle_timeout = "10ms"
max_header_bytes = 16384

[[listeners]]
name = "web"
bind = "127.0.0.1:1"
default_service = "app"

[services.app]
connect_timeout = "1s"
request_timeout = "2s"
retry = {{ attempts = 1 }}
passive = {{ consecutive_failures = 0 }}
endpoints = [{{ id = "recorder", address = "{upstream_addr}" }}]

[routes.app]
path_prefix = "/"
service = "app"
"#
    );
    let config = Config::parse("request-head.toml", &text)
        .unwrap_or_else(|e| panic!("the request-head harness's config is invalid: {e}"));
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
    let limits = Arc::new(ArcSwap::from_pointee(ClientLimits::from(&config.global)));
    let mut control = Control::new(config, table.clone(), Box::new(NoListeners));
    control
        .start()
        .unwrap_or_else(|e| panic!("the request-head harness's table: {e}"));
    let client_side = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| loopback("client side", e));
    let client_addr = client_side
        .local_addr()
        .unwrap_or_else(|e| loopback("client side", e));
    Rig {
        proxy: Arc::new(HttpProxy {
            table: table.clone(),
            limits,
        }),
        table,
        client_side,
        client_addr,
        permits: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
        upstream,
    }
}

/// The recording upstream: HTTP/1.1, reads each request's body whole,
/// then answers 200.
async fn record(listener: TcpListener, rec: Arc<Recorder>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        rec.open.fetch_add(1, Ordering::SeqCst);
        let rec = rec.clone();
        tokio::spawn(async move {
            let counting = rec.clone();
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                counting.requests.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"recorded\n"),
                    )))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            rec.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

impl Rig {
    /// One client connection: sends `data` and reads until the proxy
    /// closes (or [`PATIENCE`] runs out and the client closes), then waits
    /// for the proxy's connection task to end.
    async fn exchange(&self, data: &[u8]) {
        let connect = TcpStream::connect(self.client_addr);
        let (client, accepted) = tokio::join!(connect, self.client_side.accept());
        let (Ok(client), Ok((server, peer))) = (client, accepted) else {
            panic!("the request-head harness cannot connect on loopback");
        };
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            panic!("the request-head harness's permits are closed");
        };
        let serving = tokio::spawn(self.proxy.clone().serve_connection(
            Arc::from("web"),
            Arc::default(),
            server,
            None,
            peer,
            permit,
            CancellationToken::new(),
        ));
        let (mut rd, mut wr) = client.into_split();
        // A client that half-closes has its requests dropped (hyper stops
        // serving at the end of its input), so the write side stays open
        // while a request may be served; the proxy's short idle timeout
        // closes the connection after the last answer.
        let half_close = heads_in(data) == 0;
        let send = async {
            // The proxy may refuse and close before it read everything.
            let _ = wr.write_all(data).await;
            if half_close {
                let _ = wr.shutdown().await;
            }
        };
        let receive = async {
            let mut answer = Vec::new();
            let _ = rd.read_to_end(&mut answer).await;
        };
        let _ = tokio::time::timeout(PATIENCE, async { tokio::join!(send, receive) }).await;
        drop((rd, wr));
        match tokio::time::timeout(ANSWER_BOUND, serving).await {
            Err(_) => panic!(
                "the proxy still serves a client connection {ANSWER_BOUND:?} after the client closed it"
            ),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(_) => {}
        }
    }

    /// Drops the proxy's idle upstream connections and waits until the
    /// upstream has seen every connection close (and so counted every
    /// request that reached it).
    async fn drop_idle_upstreams(&self) {
        let table = self.table.load_full();
        for service in table.services.values() {
            for endpoint in &service.endpoints {
                endpoint.live.pool.clear();
            }
        }
        let deadline = tokio::time::Instant::now() + ANSWER_BOUND;
        while self.upstream.open.load(Ordering::SeqCst) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy keeps an upstream connection open after its client left"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
