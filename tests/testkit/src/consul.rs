//! A test double of Consul's HTTP API: a real HTTP/1.1 server on a loopback
//! port, with one agent on one node (`node1`, 127.0.0.1) in datacenter
//! `dc1`, started and stopped by the test. No Consul binary can be
//! installed on the test machines, so this is what every Consul test of the
//! workspace runs against; it is the only double of a real server in the
//! tests, and it implements Consul's blocking queries faithfully.
//!
//! It follows Consul's documented semantics for what pointsman uses:
//!
//! - one raft-like index that every write increments; each query answers
//!   with its own index in `X-Consul-Index`: `/v1/catalog/services` the
//!   last change to any service registration, `/v1/health/service/<name>`
//!   the last change to that service's instances or their checks (a write
//!   that changes nothing does not move it); never below 1;
//! - blocking queries: with `index=N` (N > 0) the answer is held until the
//!   query's index moves past N or `wait` passes (Go duration syntax,
//!   `500ms`, `5s`, `1m`; default 5 minutes, at most 10, plus up to
//!   `wait/16` of jitter), then answered with whatever holds then — which
//!   may be unchanged, or lower after a restore;
//! - `/v1/catalog/services`: service name -> the union of its tags
//!   (the `consul` service itself included, as a real server has it);
//! - `/v1/health/service/<name>`: Node, Service {ID, Service, Address,
//!   Port, Tags, Meta, ...} and Checks [{CheckID, Status, ServiceID, ...}]
//!   per instance, the node's `serfHealth` check included; `?passing`
//!   keeps instances whose checks all pass; `dc=` other than `dc1` is
//!   `500 No path to datacenter`;
//! - agent endpoints (PUT only): `/v1/agent/service/register` (ID defaults
//!   to Name; `Check` gets id `service:<id>`, `Checks` get
//!   `service:<id>:<n>`; new checks start critical unless `Status` says
//!   otherwise; a re-registered check keeps its status;
//!   `?replace-existing-checks` drops checks not named again),
//!   `/v1/agent/service/deregister/<id>` (404 for an unknown id),
//!   `/v1/agent/check/pass|warn|fail/<check-id>?note=` (TTL checks only,
//!   each restarts the TTL; a TTL that runs out turns the check critical);
//! - ACLs, when a token is configured: another token is `403 ACL not
//!   found`; no token is the anonymous token, whose reads are filtered to
//!   nothing (with `X-Consul-Results-Filtered-By-ACLs: true`) and whose
//!   writes are `403 Permission denied`.
//!
//! Not modelled: HTTP and TCP checks are recorded but not run (set their
//! status with [`ConsulDouble::set_check_status`]), nor is
//! `DeregisterCriticalServiceAfter` acted on; one node only.
//!
//! Test hooks: [`ConsulDouble::set_check_status`], [`ConsulDouble::snapshot`]
//! and [`ConsulDouble::restore`] (a snapshot restore: data and indexes go
//! back, blocked queries are released at once as Consul abandons its state
//! store), [`ConsulDouble::stop`] and [`ConsulDouble::restart`] (on the
//! same port, data kept), and [`ConsulDouble::requests`].
//!
//! A test crate takes it as a dev-dependency on `pointsman-testkit`:
//!
//! ```ignore
//! use pointsman_testkit::consul::ConsulDouble;
//! let consul = ConsulDouble::start();
//! let url = consul.url(); // http://127.0.0.1:<port>
//! ```
//!
//! The server runs on its own thread and runtime, so the hooks are plain
//! functions usable from sync and async tests alike.
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::sync::{oneshot, watch};

pub const DATACENTER: &str = "dc1";
pub const NODE: &str = "node1";
pub const NODE_ADDRESS: &str = "127.0.0.1";
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
const TTL_TICK: Duration = Duration::from_millis(20);

/// A check's status, as Consul spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }

    fn parse(s: &str) -> Option<Health> {
        match s {
            "passing" => Some(Health::Passing),
            "warning" => Some(Health::Warning),
            "critical" => Some(Health::Critical),
            _ => None,
        }
    }
}

/// A registered service instance.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceRecord {
    pub id: String,
    pub name: String,
    pub address: String,
    pub port: i64,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A registered check: the node's `serfHealth` (empty `service_id`) or an
/// instance's.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckRecord {
    pub id: String,
    pub name: String,
    pub service_id: String,
    pub status: Health,
    pub output: String,
    /// `ttl`, `http`, `tcp` or `serf`.
    pub kind: &'static str,
    /// The check as registered (HTTP, Interval, Timeout, TTL,
    /// DeregisterCriticalServiceAfter, ...).
    pub definition: Value,
    pub ttl: Option<Duration>,
    ttl_deadline: Option<Instant>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub token: Option<String>,
    pub at: Instant,
}

/// Everything a snapshot holds.
#[derive(Clone, Debug)]
struct Data {
    /// The raft index: the last write.
    index: u64,
    services: BTreeMap<String, ServiceRecord>,
    checks: BTreeMap<String, CheckRecord>,
    /// Index of the last change to any service registration.
    services_index: u64,
    /// Index of the last change to each service name's instances or checks.
    service_index: BTreeMap<String, u64>,
}

/// A copy of the double's data and indexes, for [`ConsulDouble::restore`].
#[derive(Clone, Debug)]
pub struct Snapshot(Data);

struct State {
    data: Data,
    token: Option<String>,
    /// Bumped by a restore: blocked queries answer at once.
    abandon: u64,
    log: Vec<Logged>,
}

struct Shared {
    state: Mutex<State>,
    /// Ticks on every write, waking blocked queries.
    writes: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        self.writes.send_modify(|n| *n += 1);
    }
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The double: a server and its data.
pub struct ConsulDouble {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Option<Running>,
}

impl ConsulDouble {
    /// A server without ACLs, holding the `consul` service.
    pub fn start() -> ConsulDouble {
        ConsulDouble::start_with(None)
    }

    /// A server whose ACLs deny anything without `token`.
    pub fn with_token(token: &str) -> ConsulDouble {
        ConsulDouble::start_with(Some(token.to_string()))
    }

    fn start_with(token: Option<String>) -> ConsulDouble {
        let mut data = Data {
            index: 0,
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            services_index: 0,
            service_index: BTreeMap::new(),
        };
        // As a freshly bootstrapped server: its node check and itself.
        data.index = 1;
        data.checks.insert(
            "serfHealth".to_string(),
            CheckRecord {
                id: "serfHealth".to_string(),
                name: "Serf Health Status".to_string(),
                service_id: String::new(),
                status: Health::Passing,
                output: "Agent alive and reachable".to_string(),
                kind: "serf",
                definition: Value::Null,
                ttl: None,
                ttl_deadline: None,
                create_index: 1,
                modify_index: 1,
            },
        );
        let mut state = State {
            data,
            token,
            abandon: 0,
            log: Vec::new(),
        };
        let consul = json!({"ID": "consul", "Name": "consul", "Port": 8300});
        register(&mut state.data, &consul, false).unwrap_or_else(|(_, m)| panic!("{m}"));
        let (writes, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            writes,
        });
        let listener = StdListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind a loopback port for the Consul double: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("cannot read the bound port: {e}"));
        let mut double = ConsulDouble {
            shared,
            addr,
            running: None,
        };
        double.serve(listener);
        double
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The raft index: the last write.
    pub fn index(&self) -> u64 {
        self.shared.lock().data.index
    }

    /// Registers (or re-registers) an instance as the agent endpoint does,
    /// from the same JSON. Returns the index after it.
    pub fn register(&self, body: Value) -> u64 {
        let index = {
            let mut st = self.shared.lock();
            register(&mut st.data, &body, false).unwrap_or_else(|(_, m)| panic!("{m}"));
            st.data.index
        };
        self.shared.wake();
        index
    }

    /// Deregisters an instance; false if there was none.
    pub fn deregister(&self, id: &str) -> bool {
        let done = deregister(&mut self.shared.lock().data, id).is_ok();
        self.shared.wake();
        done
    }

    /// Sets a check's status, as the agent does when a check runs.
    pub fn set_check_status(&self, check_id: &str, status: Health) {
        {
            let mut st = self.shared.lock();
            let data = &mut st.data;
            let Some(check) = data.checks.get(check_id) else {
                panic!("no check {check_id:?}");
            };
            if check.status != status {
                let output = format!("set to {} by the test", status.as_str());
                set_status(data, check_id, status, output);
            }
        }
        self.shared.wake();
    }

    pub fn service(&self, id: &str) -> Option<ServiceRecord> {
        self.shared.lock().data.services.get(id).cloned()
    }

    pub fn check(&self, id: &str) -> Option<CheckRecord> {
        self.shared.lock().data.checks.get(id).cloned()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// A copy of the data and every index, as `consul snapshot save`.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.shared.lock().data.clone())
    }

    /// Puts a snapshot back, as `consul snapshot restore`: data and indexes
    /// return to the snapshot's (so indexes go backwards), and blocked
    /// queries answer at once with what the snapshot holds.
    pub fn restore(&self, snapshot: &Snapshot) {
        {
            let mut st = self.shared.lock();
            st.data = snapshot.0.clone();
            st.abandon += 1;
        }
        self.shared.wake();
    }

    /// Stops serving: the port refuses connections and open connections
    /// (blocked queries included) are closed. The data stays.
    pub fn stop(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        if let Some(stop) = running.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = running.thread.take() {
            let _ = thread.join();
        }
    }

    /// Serves again on the same port, with the data it had.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match StdListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot bind {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&mut self, listener: StdListener) {
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("consul-double".to_string())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap_or_else(|e| panic!("cannot build the Consul double's runtime: {e}"));
                rt.block_on(serve(listener, shared, stop_rx));
                // Dropping the runtime drops every connection task, which
                // closes their sockets.
                drop(rt);
            })
            .unwrap_or_else(|e| panic!("cannot start the Consul double's thread: {e}"));
        self.running = Some(Running {
            stop: Some(stop_tx),
            thread: Some(thread),
        });
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(listener: StdListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("set_nonblocking: {e}"));
    let listener = tokio::net::TcpListener::from_std(listener)
        .unwrap_or_else(|e| panic!("cannot serve on the bound port: {e}"));
    tokio::spawn(expire_ttls(shared.clone()));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// Turns TTL checks whose time ran out critical, as the agent does.
async fn expire_ttls(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TTL_TICK);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let expired = {
            let mut st = shared.lock();
            let due: Vec<String> = st
                .data
                .checks
                .values()
                .filter(|c| c.ttl_deadline.is_some_and(|d| d <= now))
                .map(|c| c.id.clone())
                .collect();
            for id in &due {
                if let Some(c) = st.data.checks.get_mut(id) {
                    c.ttl_deadline = None;
                }
                set_status(
                    &mut st.data,
                    id,
                    Health::Critical,
                    "TTL expired".to_string(),
                );
            }
            !due.is_empty()
        };
        if expired {
            shared.wake();
        }
    }
}

type Answer = Response<Full<Bytes>>;

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn text(status: StatusCode, msg: &str) -> Answer {
    respond(status, msg.to_string())
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Answer, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let token = req
        .headers()
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| query.get("token").cloned())
        .filter(|t| !t.is_empty());
    let configured = {
        let mut st = shared.lock();
        st.log.push(Logged {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            token: token.clone(),
            at: Instant::now(),
        });
        st.token.clone()
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(text(StatusCode::BAD_REQUEST, &format!("reading body: {e}"))),
    };
    // ACLs: a token that is not the configured one does not exist; no
    // token is the anonymous one, which may read nothing and write nothing.
    let anonymous = match (&configured, &token) {
        (None, _) => false,
        (Some(want), Some(got)) if want == got => false,
        (Some(_), Some(_)) => return Ok(text(StatusCode::FORBIDDEN, "ACL not found")),
        (Some(_), None) => true,
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let answer = match segments.as_slice() {
        ["v1", "catalog", "services"] => {
            if method != Method::GET {
                return Ok(not_allowed(&method));
            }
            read(&shared, &query, anonymous, Read::Catalog).await
        }
        ["v1", "health", "service", name] => {
            if method != Method::GET {
                return Ok(not_allowed(&method));
            }
            let Some(name) = percent_decode(name) else {
                return Ok(text(StatusCode::BAD_REQUEST, "invalid escape in path"));
            };
            let passing = query
                .get("passing")
                .is_some_and(|v| !matches!(v.as_str(), "false" | "0"));
            read(&shared, &query, anonymous, Read::Health { name, passing }).await
        }
        ["v1", "agent", "service", "register"] => {
            if method != Method::PUT {
                return Ok(not_allowed(&method));
            }
            let parsed: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        &format!("Request decode failed: {e}"),
                    ))
                }
            };
            if anonymous {
                let name = parsed.get("Name").and_then(Value::as_str).unwrap_or("");
                return Ok(denied("service:write", name));
            }
            let replace = query.contains_key("replace-existing-checks");
            write(&shared, |data| {
                register(data, &parsed, replace).map(|_| String::new())
            })
        }
        ["v1", "agent", "service", "deregister", id] => {
            if method != Method::PUT {
                return Ok(not_allowed(&method));
            }
            let Some(id) = percent_decode(id) else {
                return Ok(text(StatusCode::BAD_REQUEST, "invalid escape in path"));
            };
            if anonymous {
                return Ok(denied("service:write", &id));
            }
            write(&shared, |data| deregister(data, &id).map(|_| String::new()))
        }
        ["v1", "agent", "check", verb @ ("pass" | "warn" | "fail"), id] => {
            if method != Method::PUT {
                return Ok(not_allowed(&method));
            }
            let Some(id) = percent_decode(id) else {
                return Ok(text(StatusCode::BAD_REQUEST, "invalid escape in path"));
            };
            if anonymous {
                return Ok(denied("service:write", &id));
            }
            let status = match *verb {
                "pass" => Health::Passing,
                "warn" => Health::Warning,
                _ => Health::Critical,
            };
            let note = query.get("note").cloned().unwrap_or_default();
            write(&shared, |data| {
                update_ttl(data, &id, status, note).map(|_| String::new())
            })
        }
        _ => text(StatusCode::NOT_FOUND, &format!("no handler for {path}")),
    };
    Ok(answer)
}

fn not_allowed(method: &Method) -> Answer {
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} not allowed"),
    )
}

fn denied(permission: &str, on: &str) -> Answer {
    text(
        StatusCode::FORBIDDEN,
        &format!("Permission denied: anonymous token lacks permission '{permission}' on \"{on}\""),
    )
}

/// Applies a write under the lock and wakes blocked queries.
fn write(
    shared: &Shared,
    f: impl FnOnce(&mut Data) -> Result<String, (StatusCode, String)>,
) -> Answer {
    let result = f(&mut shared.lock().data);
    shared.wake();
    match result {
        Ok(body) => respond(StatusCode::OK, body),
        Err((status, msg)) => text(status, &msg),
    }
}

enum Read {
    Catalog,
    Health { name: String, passing: bool },
}

/// A read endpoint: blocking when `index` is given.
async fn read(
    shared: &Shared,
    query: &BTreeMap<String, String>,
    anonymous: bool,
    what: Read,
) -> Answer {
    if let Some(dc) = query.get("dc") {
        if dc != DATACENTER && !dc.is_empty() {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
        }
    }
    let min_index = match query.get("index").map(|s| s.parse::<u64>()) {
        None => 0,
        Some(Ok(i)) => i,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid index"),
    };
    let wait = match query.get("wait") {
        None => DEFAULT_WAIT,
        Some(w) => match parse_go_duration(w) {
            Some(d) if d.is_zero() => DEFAULT_WAIT,
            Some(d) => d.min(MAX_WAIT),
            None => return text(StatusCode::BAD_REQUEST, "Invalid wait time"),
        },
    };
    let snapshot = |st: &State| -> (Value, u64) {
        match &what {
            Read::Catalog => catalog(&st.data),
            Read::Health { name, passing } => health(&st.data, name, *passing),
        }
    };
    let mut writes = shared.writes.subscribe();
    let (mut value, mut index, abandon) = {
        let st = shared.lock();
        let (v, i) = snapshot(&st);
        (v, i, st.abandon)
    };
    if min_index > 0 && index <= min_index {
        let jitter_ms = u64::try_from((wait / 16).as_millis()).unwrap_or(0);
        let deadline = tokio::time::Instant::now()
            + wait
            + Duration::from_millis(fastrand::u64(0..=jitter_ms));
        loop {
            tokio::select! {
                changed = writes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let st = shared.lock();
            let (v, i) = snapshot(&st);
            value = v;
            index = i;
            if index > min_index || st.abandon != abandon || tokio::time::Instant::now() >= deadline
            {
                break;
            }
        }
    }
    let empty = match &what {
        Read::Catalog => json!({}),
        Read::Health { .. } => json!([]),
    };
    let filtered = anonymous && value != empty;
    let body = if anonymous { empty } else { value };
    let mut r = respond(StatusCode::OK, body.to_string());
    let h = r.headers_mut();
    h.insert("content-type", "application/json".parse().expect("static"));
    h.insert("x-consul-index", index.to_string().parse().expect("digits"));
    h.insert("x-consul-knownleader", "true".parse().expect("static"));
    h.insert("x-consul-lastcontact", "0".parse().expect("static"));
    if filtered {
        h.insert(
            "x-consul-results-filtered-by-acls",
            "true".parse().expect("static"),
        );
    }
    r
}

fn catalog(data: &Data) -> (Value, u64) {
    let mut names: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for s in data.services.values() {
        names
            .entry(&s.name)
            .or_default()
            .extend(s.tags.iter().map(String::as_str));
    }
    let map: Map<String, Value> = names
        .into_iter()
        .map(|(n, tags)| (n.to_string(), json!(tags.into_iter().collect::<Vec<_>>())))
        .collect();
    (Value::Object(map), data.services_index.max(1))
}

fn health(data: &Data, name: &str, passing: bool) -> (Value, u64) {
    let node_checks: Vec<&CheckRecord> = data
        .checks
        .values()
        .filter(|c| c.service_id.is_empty())
        .collect();
    let mut list = Vec::new();
    for s in data.services.values().filter(|s| s.name == name) {
        let checks: Vec<&CheckRecord> = node_checks
            .iter()
            .copied()
            .chain(data.checks.values().filter(|c| c.service_id == s.id))
            .collect();
        if passing && checks.iter().any(|c| c.status != Health::Passing) {
            continue;
        }
        let checks: Vec<Value> = checks
            .iter()
            .map(|c| {
                let (service_name, service_tags) = if c.service_id.is_empty() {
                    (String::new(), Vec::new())
                } else {
                    (s.name.clone(), s.tags.clone())
                };
                json!({
                    "Node": NODE,
                    "CheckID": c.id,
                    "Name": c.name,
                    "Status": c.status.as_str(),
                    "Notes": "",
                    "Output": c.output,
                    "ServiceID": c.service_id,
                    "ServiceName": service_name,
                    "ServiceTags": service_tags,
                    "Type": if c.kind == "serf" { "" } else { c.kind },
                    "CreateIndex": c.create_index,
                    "ModifyIndex": c.modify_index,
                })
            })
            .collect();
        list.push(json!({
            "Node": {
                "ID": "4e8a2bde-0000-4000-8000-000000000001",
                "Node": NODE,
                "Address": NODE_ADDRESS,
                "Datacenter": DATACENTER,
                "TaggedAddresses": {"lan": NODE_ADDRESS, "wan": NODE_ADDRESS},
                "Meta": {"consul-network-segment": ""},
                "CreateIndex": 1,
                "ModifyIndex": 1,
            },
            "Service": {
                "ID": s.id,
                "Service": s.name,
                "Tags": s.tags,
                "Address": s.address,
                "Meta": s.meta,
                "Port": s.port,
                "Weights": {"Passing": 1, "Warning": 1},
                "EnableTagOverride": false,
                "CreateIndex": s.create_index,
                "ModifyIndex": s.modify_index,
            },
            "Checks": checks,
        }));
    }
    let index = data
        .service_index
        .get(name)
        .copied()
        .unwrap_or(data.services_index)
        .max(1);
    (Value::Array(list), index)
}

/// Bumps the raft index for a write touching `names` (service names whose
/// health changed) and, when `services` is set, the catalog's list.
fn commit(data: &mut Data, names: &[String], services: bool) -> u64 {
    data.index += 1;
    let index = data.index;
    if services {
        data.services_index = index;
    }
    for n in names {
        data.service_index.insert(n.clone(), index);
    }
    index
}

fn set_status(data: &mut Data, check_id: &str, status: Health, output: String) {
    let Some(check) = data.checks.get(check_id) else {
        return;
    };
    if check.status == status {
        return;
    }
    let names: Vec<String> = if check.service_id.is_empty() {
        // A node check affects every instance on the node.
        data.services.values().map(|s| s.name.clone()).collect()
    } else {
        data.services
            .get(&check.service_id)
            .map(|s| vec![s.name.clone()])
            .unwrap_or_default()
    };
    let index = commit(data, &names, false);
    if let Some(c) = data.checks.get_mut(check_id) {
        c.status = status;
        c.output = output;
        c.modify_index = index;
    }
}

type Refusal = (StatusCode, String);

fn bad(msg: String) -> Refusal {
    (StatusCode::BAD_REQUEST, msg)
}

/// `PUT /v1/agent/service/register`.
fn register(data: &mut Data, body: &Value, replace_checks: bool) -> Result<(), Refusal> {
    let str_field = |name: &str| -> Result<String, Refusal> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(bad(format!(
                "Request decode failed: {name}: expected a string, got {other}"
            ))),
        }
    };
    let name = str_field("Name")?;
    if name.is_empty() {
        return Err(bad("Missing service name".to_string()));
    }
    let id = Some(str_field("ID")?)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| name.clone());
    let address = str_field("Address")?;
    let port = match body.get("Port") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_i64().ok_or_else(|| {
            bad(format!(
                "Request decode failed: Port: expected a number, got {v}"
            ))
        })?,
    };
    let tags: Vec<String> = match body.get("Tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| bad(format!("Request decode failed: Tags: {e}")))?,
    };
    let meta: BTreeMap<String, String> = match body.get("Meta") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| bad(format!("Invalid Service Meta: {e}")))?,
    };
    if meta.len() > 64 || meta.iter().any(|(k, v)| k.len() > 128 || v.len() > 512) {
        return Err(bad(
            "Invalid Service Meta: at most 64 pairs, keys up to 128 and values up to 512 characters"
                .to_string(),
        ));
    }
    let mut defs: Vec<Value> = Vec::new();
    if let Some(c) = body.get("Check").filter(|c| !c.is_null()) {
        defs.push(c.clone());
    }
    if let Some(Value::Array(cs)) = body.get("Checks") {
        defs.extend(cs.iter().cloned());
    }
    let numbered = defs.len() > 1;
    let mut checks = Vec::new();
    for (i, def) in defs.iter().enumerate() {
        let check_id = def
            .get("CheckID")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| {
                if numbered {
                    format!("service:{id}:{}", i + 1)
                } else {
                    format!("service:{id}")
                }
            });
        checks.push(parse_check(def, check_id, &id, &name)?);
    }

    let record = ServiceRecord {
        id: id.clone(),
        name: name.clone(),
        address,
        port,
        tags,
        meta,
        create_index: 0,
        modify_index: 0,
    };
    let old = data.services.get(&id).cloned();
    let same_service = old.as_ref().is_some_and(|o| {
        ServiceRecord {
            create_index: 0,
            modify_index: 0,
            ..o.clone()
        } == record
    });
    let now = Instant::now();
    let current: BTreeMap<String, CheckRecord> = data
        .checks
        .values()
        .filter(|c| c.service_id == id)
        .map(|c| (c.id.clone(), c.clone()))
        .collect();
    // Without replace-existing-checks, checks not named again stay.
    let mut next = if replace_checks {
        BTreeMap::new()
    } else {
        current.clone()
    };
    for mut c in checks {
        if let Some(prev) = current.get(&c.id) {
            // A check registered again keeps its status.
            if def_status(&c.definition).is_none() {
                c.status = prev.status;
                c.output = prev.output.clone();
            }
            c.create_index = prev.create_index;
            c.modify_index = prev.modify_index;
        }
        c.ttl_deadline = c.ttl.map(|t| now + t);
        next.insert(c.id.clone(), c);
    }
    let same_checks = current.len() == next.len()
        && current.iter().all(|(k, c)| {
            next.get(k).is_some_and(|n| {
                n.status == c.status && n.definition == c.definition && n.name == c.name
            })
        });
    if same_service && same_checks {
        // Nothing to write; TTL timers restart all the same.
        for (cid, n) in &next {
            if let Some(c) = data.checks.get_mut(cid) {
                c.ttl_deadline = n.ttl_deadline;
            }
        }
        return Ok(());
    }
    let mut names = vec![name.clone()];
    if let Some(o) = &old {
        if o.name != name {
            names.push(o.name.clone());
        }
    }
    let index = commit(data, &names, !same_service);
    let mut record = record;
    record.create_index = old.as_ref().map_or(index, |o| o.create_index);
    record.modify_index = if same_service {
        old.as_ref().map_or(index, |o| o.modify_index)
    } else {
        index
    };
    data.services.insert(id.clone(), record);
    data.checks.retain(|_, c| c.service_id != id);
    for (cid, mut c) in next {
        let changed = current
            .get(&cid)
            .is_none_or(|o| o.status != c.status || o.definition != c.definition);
        if changed {
            if c.create_index == 0 {
                c.create_index = index;
            }
            c.modify_index = index;
        }
        data.checks.insert(cid, c);
    }
    Ok(())
}

fn def_status(def: &Value) -> Option<Health> {
    def.get("Status")
        .and_then(Value::as_str)
        .and_then(Health::parse)
}

fn parse_check(
    def: &Value,
    id: String,
    service_id: &str,
    service: &str,
) -> Result<CheckRecord, Refusal> {
    let duration = |field: &str| -> Result<Option<Duration>, Refusal> {
        match def.get(field).and_then(Value::as_str) {
            None | Some("") => Ok(None),
            Some(s) => parse_go_duration(s)
                .map(Some)
                .ok_or_else(|| bad(format!("Invalid check: {field} {s:?} is not a duration"))),
        }
    };
    let ttl = duration("TTL")?;
    let interval = duration("Interval")?;
    duration("Timeout")?;
    duration("DeregisterCriticalServiceAfter")?;
    let kind = if ttl.is_some() {
        "ttl"
    } else if def.get("HTTP").and_then(Value::as_str).is_some() {
        if interval.is_none_or(|i| i.is_zero()) {
            return Err(bad(
                "Invalid check: Interval must be > 0 for Script, HTTP, or TCP checks".to_string(),
            ));
        }
        "http"
    } else if def.get("TCP").and_then(Value::as_str).is_some() {
        if interval.is_none_or(|i| i.is_zero()) {
            return Err(bad(
                "Invalid check: Interval must be > 0 for Script, HTTP, or TCP checks".to_string(),
            ));
        }
        "tcp"
    } else {
        return Err(bad(
            "Invalid check: TTL must be > 0 for TTL checks, or give HTTP or TCP with an Interval"
                .to_string(),
        ));
    };
    let status = match def.get("Status").and_then(Value::as_str) {
        None | Some("") => Health::Critical,
        Some(s) => Health::parse(s).ok_or_else(|| bad(format!("Invalid check: Status {s:?}")))?,
    };
    let name = def
        .get("Name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| format!("Service '{service}' check"));
    Ok(CheckRecord {
        id,
        name,
        service_id: service_id.to_string(),
        status,
        output: String::new(),
        kind,
        definition: def.clone(),
        ttl,
        ttl_deadline: None,
        create_index: 0,
        modify_index: 0,
    })
}

/// `PUT /v1/agent/service/deregister/<id>`.
fn deregister(data: &mut Data, id: &str) -> Result<(), Refusal> {
    let Some(old) = data.services.get(id).cloned() else {
        return Err((
            StatusCode::NOT_FOUND,
            format!("Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."),
        ));
    };
    commit(data, std::slice::from_ref(&old.name), true);
    data.services.remove(id);
    data.checks.retain(|_, c| c.service_id != id);
    Ok(())
}

/// `PUT /v1/agent/check/pass|warn|fail/<id>`.
fn update_ttl(data: &mut Data, id: &str, status: Health, note: String) -> Result<(), Refusal> {
    let Some(check) = data.checks.get_mut(id) else {
        return Err((
            StatusCode::NOT_FOUND,
            format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
            ),
        ));
    };
    let Some(ttl) = check.ttl else {
        return Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CheckID {id:?} does not have associated TTL"),
        ));
    };
    check.ttl_deadline = Some(Instant::now() + ttl);
    if check.status == status {
        // Output alone is synced lazily by the agent: no write.
        check.output = note;
        return Ok(());
    }
    set_status(data, id, status, note);
    Ok(())
}

/// Go's `time.ParseDuration` for non-negative values: `300ms`, `1.5s`,
/// `1m30s`, `0`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." {
            return None;
        }
        let value: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let nanos = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += value * nanos;
        rest = tail;
    }
    Some(Duration::from_nanos(total as u64))
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(k).unwrap_or_else(|| k.to_string()),
                percent_decode(&v.replace('+', " ")).unwrap_or_else(|| v.to_string()),
            )
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
