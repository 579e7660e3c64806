//! The read commands' output, built from one [`Snapshot`] of the routing
//! table: `show stat`, `show servers state|conn`, `show backend`, `show
//! info`, `show map`, `get weight`. Pure: no sockets.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Display, Write as _};
use std::sync::{Arc, Mutex};

use pointsman_discovery::AdminState;

use super::ids::{lock, IdRegistry};
use super::parse::{Format, MapRef, ServerRef, StatFilter, UNKNOWN_MAP};
use super::typed;
use crate::control::config::ListenerMode;
use crate::engine::endpoint::{EndpointCounters, EndpointStats};
use crate::engine::frontend::FrontendSnapshot;
use crate::engine::pool::max_idle;
use crate::engine::table::{Endpoint, RoutingTable, Service, Target, WEIGHT_SCALE};

/// HAProxy 2.6's `show stat` columns, in its order (the ones after `-`
/// belong to its ssl, h2 and h1 modules; they stay empty here).
pub const STAT_FIELDS: &[&str] = &[
    "pxname",
    "svname",
    "qcur",
    "qmax",
    "scur",
    "smax",
    "slim",
    "stot",
    "bin",
    "bout",
    "dreq",
    "dresp",
    "ereq",
    "econ",
    "eresp",
    "wretr",
    "wredis",
    "status",
    "weight",
    "act",
    "bck",
    "chkfail",
    "chkdown",
    "lastchg",
    "downtime",
    "qlimit",
    "pid",
    "iid",
    "sid",
    "throttle",
    "lbtot",
    "tracked",
    "type",
    "rate",
    "rate_lim",
    "rate_max",
    "check_status",
    "check_code",
    "check_duration",
    "hrsp_1xx",
    "hrsp_2xx",
    "hrsp_3xx",
    "hrsp_4xx",
    "hrsp_5xx",
    "hrsp_other",
    "hanafail",
    "req_rate",
    "req_rate_max",
    "req_tot",
    "cli_abrt",
    "srv_abrt",
    "comp_in",
    "comp_out",
    "comp_byp",
    "comp_rsp",
    "lastsess",
    "last_chk",
    "last_agt",
    "qtime",
    "ctime",
    "rtime",
    "ttime",
    "agent_status",
    "agent_code",
    "agent_duration",
    "check_desc",
    "agent_desc",
    "check_rise",
    "check_fall",
    "check_health",
    "agent_rise",
    "agent_fall",
    "agent_health",
    "addr",
    "cookie",
    "mode",
    "algo",
    "conn_rate",
    "conn_rate_max",
    "conn_tot",
    "intercepted",
    "dcon",
    "dses",
    "wrew",
    "connect",
    "reuse",
    "cache_lookups",
    "cache_hits",
    "srv_icur",
    "src_ilim",
    "qtime_max",
    "ctime_max",
    "rtime_max",
    "ttime_max",
    "eint",
    "idle_conn_cur",
    "safe_conn_cur",
    "used_conn_cur",
    "need_conn_est",
    "uweight",
    "agg_server_status",
    "agg_server_check_status",
    "agg_check_status",
    "-",
    "ssl_sess",
    "ssl_reused_sess",
    "ssl_failed_handshake",
    "h2_headers_rcvd",
    "h2_data_rcvd",
    "h2_settings_rcvd",
    "h2_rst_stream_rcvd",
    "h2_goaway_rcvd",
    "h2_detected_conn_protocol_errors",
    "h2_detected_strm_protocol_errors",
    "h2_rst_stream_resp",
    "h2_goaway_resp",
    "h2_open_connections",
    "h2_backend_open_streams",
    "h2_total_connections",
    "h2_backend_total_streams",
    "h1_open_connections",
    "h1_open_streams",
    "h1_total_connections",
    "h1_total_streams",
    "h1_bytes_in",
    "h1_bytes_out",
    "h1_spliced_bytes_in",
    "h1_spliced_bytes_out",
];

/// The position of a `show stat` column, found at compile time (a name
/// that is not a column does not compile).
const fn column(name: &str) -> usize {
    let mut i = 0;
    while i < STAT_FIELDS.len() {
        let (a, b) = (STAT_FIELDS[i].as_bytes(), name.as_bytes());
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("not a show stat column")
}

macro_rules! col {
    ($name:literal) => {
        const { column($name) }
    };
}

/// The response columns, 1xx to 5xx.
const HRSP: [usize; 5] = [
    col!("hrsp_1xx"),
    col!("hrsp_2xx"),
    col!("hrsp_3xx"),
    col!("hrsp_4xx"),
    col!("hrsp_5xx"),
];

/// One `show stat` row; unset columns stay empty, as HAProxy leaves the
/// ones it has no value for.
struct StatRow(Vec<String>);

impl StatRow {
    fn new() -> StatRow {
        let mut row = StatRow(vec![String::new(); STAT_FIELDS.len()]);
        row.set(col!("-"), "-");
        row
    }

    /// Sets column `i` (from [`col!`]).
    fn set(&mut self, i: usize, value: impl Display) {
        self.0[i] = value.to_string();
    }

    fn write(&self, out: &mut String) {
        for v in &self.0 {
            if v.contains([',', '"', '\n']) {
                out.push('"');
                out.push_str(&v.replace('"', "\"\"").replace('\n', " "));
                out.push('"');
            } else {
                out.push_str(v);
            }
            out.push(',');
        }
        out.push('\n');
    }
}

/// A client listener, for `show stat`'s FRONTEND rows.
#[derive(Clone, Debug)]
pub struct Frontend {
    pub name: String,
    pub mode: ListenerMode,
    pub default_service: Option<String>,
    /// Its traffic counters as of the snapshot.
    pub counters: FrontendSnapshot,
}

/// Process facts for `show info`.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    pub started: u64,
    pub threads: usize,
    pub stopping: bool,
    pub node: String,
    /// `Name: HAProxy` (what HAProxy's clients check for), or `pointsman`.
    pub haproxy_name: bool,
    /// `YYYY/MM/DD`: when this binary was built (its file's time).
    pub release_date: String,
    /// Tasks alive on the event loop that runs the runtime API, and the
    /// ones waiting in its run queue.
    pub tasks: usize,
    pub run_queue: usize,
    /// 100 minus the process's CPU use per thread, in percent, since the
    /// previous `show info`.
    pub idle_pct: u64,
    /// Client connections per second since the previous `show info`, and
    /// the highest such rate seen.
    pub conn_rate: u64,
    pub max_conn_rate: u64,
    /// The open-file limit (`Ulimit-n`), when it can be read.
    pub ulimit_n: Option<u64>,
}

/// Everything the read commands print, as of one moment.
pub struct Snapshot {
    pub table: Arc<RoutingTable>,
    /// Sorted by name.
    pub frontends: Vec<Frontend>,
    pub max_connections: usize,
    /// Unix seconds.
    pub now: u64,
    pub process: ProcessInfo,
    /// The stable proxy and server ids of this table.
    pub ids: Arc<Mutex<IdRegistry>>,
}

/// Which kind of proxy or server a `show stat` row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    Frontend,
    Backend,
    Server,
}

impl RowKind {
    fn letter(self) -> char {
        match self {
            RowKind::Frontend => 'F',
            RowKind::Backend => 'B',
            RowKind::Server => 'S',
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            RowKind::Frontend => "Frontend",
            RowKind::Backend => "Backend",
            RowKind::Server => "Server",
        }
    }
}

/// One `show stat` row with its ids, ready for any of the three formats.
pub struct StatLine {
    pub kind: RowKind,
    pub iid: usize,
    pub sid: usize,
    row: StatRow,
}

impl StatLine {
    pub fn kind_letter(&self) -> char {
        self.kind.letter()
    }

    pub fn kind_name(&self) -> &'static str {
        self.kind.json_name()
    }

    /// The value of a column (empty when pointsman has none).
    pub fn get(&self, name: &str) -> &str {
        STAT_FIELDS
            .iter()
            .position(|f| *f == name)
            .map_or("", |i| self.row.0[i].as_str())
    }
}

/// HAProxy's defaults, which are pointsman's too: the table does not
/// carry each check's own `rise` and `fall`.
const RISE: u32 = 2;
const FALL: u32 = 3;

/// A server's `show stat` status, with HAProxy's words and precedence.
pub fn server_status(e: &Endpoint, c: &EndpointCounters) -> &'static str {
    if e.state == AdminState::Maint {
        "MAINT"
    } else if !c.healthy || c.ejected {
        "DOWN"
    } else if e.state == AdminState::Drain {
        "DRAIN"
    } else if e.checked && !c.checks_paused {
        "UP"
    } else {
        "no check"
    }
}

/// HAProxy's `check.health` counter: from 0 (down) to `rise + fall - 1`
/// (up); the check task keeps the steps between to itself, so a server
/// shows one end or the other.
fn check_health(c: &EndpointCounters) -> u32 {
    if c.healthy {
        RISE + FALL - 1
    } else {
        0
    }
}

/// A listener's traffic columns. A session is a client connection, as in
/// HAProxy (so `conn_*` repeat the session figures); the request and
/// response columns belong to HTTP listeners.
fn frontend_counters(row: &mut StatRow, c: &FrontendSnapshot, mode: ListenerMode) {
    row.set(col!("scur"), c.sessions);
    row.set(col!("smax"), c.max_sessions);
    row.set(col!("stot"), c.total_sessions);
    row.set(col!("bin"), c.bytes_in);
    row.set(col!("bout"), c.bytes_out);
    row.set(col!("dreq"), 0);
    row.set(col!("dresp"), 0);
    row.set(col!("ereq"), c.bad_requests);
    row.set(col!("rate"), c.session_rate);
    row.set(col!("rate_lim"), 0);
    row.set(col!("rate_max"), c.max_session_rate);
    row.set(col!("conn_rate"), c.session_rate);
    row.set(col!("conn_rate_max"), c.max_session_rate);
    row.set(col!("conn_tot"), c.total_sessions);
    if mode == ListenerMode::Http {
        for (field, n) in HRSP.iter().zip(c.responses) {
            row.set(*field, n);
        }
        row.set(col!("hrsp_other"), c.responses[5]);
        row.set(col!("req_rate"), c.request_rate);
        row.set(col!("req_rate_max"), c.max_request_rate);
        row.set(col!("req_tot"), c.requests);
    }
}

/// The traffic columns servers and backends share: bytes, the most
/// requests at once, request rates, the last request and the average
/// times.
fn traffic_columns(row: &mut StatRow, s: &EndpointStats, now: u64) {
    row.set(col!("bin"), s.bytes_in);
    row.set(col!("bout"), s.bytes_out);
    row.set(col!("smax"), s.max_in_flight);
    row.set(col!("rate"), s.request_rate);
    row.set(col!("rate_max"), s.max_request_rate);
    // HAProxy's -1: no request yet.
    match s.last_request {
        Some(t) => row.set(col!("lastsess"), now.saturating_sub(t)),
        None => row.set(col!("lastsess"), -1),
    }
    row.set(col!("ctime"), s.connect_time.map_or(0, |(ms, _)| ms));
    row.set(col!("rtime"), s.response_time.map_or(0, |(ms, _)| ms));
    row.set(col!("ttime"), s.total_time.map_or(0, |(ms, _)| ms));
}

/// Adds one server's averaged times into a backend's running sums
/// (weighted by how many requests each average is made of).
fn add_weighted(sum: &mut (u64, u64), avg: Option<(u64, u64)>) {
    if let Some((ms, n)) = avg {
        sum.0 += ms * n;
        sum.1 += n;
    }
}

/// `show stat`'s CSV: the `# pxname,...` header, then one line per row.
pub fn stat_csv(lines: &[StatLine]) -> String {
    let mut out = String::from("# ");
    for field in STAT_FIELDS {
        out.push_str(field);
        out.push(',');
    }
    out.push('\n');
    for l in lines {
        l.row.write(&mut out);
    }
    out
}

/// The last active check in HAProxy's terms: (check_status, check_code,
/// check_desc, the HCHK_STATUS number `show servers state` prints).
fn check_terms(c: &EndpointCounters) -> Option<(&'static str, Option<u16>, &'static str, u8)> {
    c.check.as_ref().map(|k| match (k.passed, k.status) {
        (true, 0) => ("L4OK", None, "Layer4 check passed", 6),
        (true, s) => ("L7OK", Some(s), "Layer7 check passed", 15),
        (false, 0) => ("L4CON", None, "Layer4 connection problem", 8),
        (false, s) => ("L7STS", Some(s), "Layer7 wrong status", 17),
    })
}

impl Snapshot {
    /// Services sorted by name, each with its proxy id from `ids` (ids
    /// continue after the frontends', as HAProxy numbers all proxies in
    /// one sequence, and stay while the service exists).
    fn backends(&self, ids: &IdRegistry) -> Vec<(usize, &Arc<Service>)> {
        let mut v: Vec<&Arc<Service>> = self.table.services.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v.into_iter().map(|s| (ids.backend(&s.name), s)).collect()
    }

    /// The id registry, fitted to this snapshot's table.
    fn fitted_ids(&self) -> std::sync::MutexGuard<'_, IdRegistry> {
        let mut ids = lock(&self.ids);
        ids.fit(&self.frontends, &self.table);
        ids
    }

    fn service_mode(&self, service: &str) -> &'static str {
        let tcp = self
            .frontends
            .iter()
            .any(|f| f.mode == ListenerMode::Tcp && f.default_service.as_deref() == Some(service));
        if tcp {
            "tcp"
        } else {
            "http"
        }
    }

    /// `show stat` in the format `f` asks for.
    pub fn show_stat(&self, f: &StatFilter) -> Result<String, String> {
        let lines = self.stat_lines(f)?;
        Ok(match f.format {
            Format::Plain => stat_csv(&lines),
            Format::Typed => typed::stat_typed(&lines),
            Format::Json => typed::stat_json(&lines),
        })
    }

    /// The `show stat` rows `f` picks.
    pub fn stat_lines(&self, f: &StatFilter) -> Result<Vec<StatLine>, String> {
        let ids = self.fitted_ids();
        let backends = self.backends(&ids);
        if let Some(p) = &f.proxy {
            let known = self
                .frontends
                .iter()
                .any(|fe| fe.name == *p || ids.frontend(&fe.name).to_string() == *p)
                || backends
                    .iter()
                    .any(|(id, s)| &*s.name == p || id.to_string() == *p);
            if !known {
                return Err("No such proxy.\n".into());
            }
        }
        let wanted = |name: &str, id: usize| match f.proxy.as_deref() {
            None => true,
            Some(p) => p == name || p == id.to_string(),
        };
        let mut out = Vec::new();
        for fe in &self.frontends {
            let iid = ids.frontend(&fe.name);
            if f.types & 1 == 0 || !wanted(&fe.name, iid) || f.sid.is_some_and(|s| s != 0) {
                continue;
            }
            let mut row = StatRow::new();
            row.set(col!("pxname"), &fe.name);
            row.set(col!("svname"), "FRONTEND");
            frontend_counters(&mut row, &fe.counters, fe.mode);
            row.set(col!("slim"), self.max_connections);
            row.set(col!("status"), "OPEN");
            row.set(col!("pid"), 1);
            row.set(col!("iid"), iid);
            row.set(col!("sid"), 0);
            row.set(col!("type"), 0);
            row.set(
                col!("mode"),
                match fe.mode {
                    ListenerMode::Http => "http",
                    ListenerMode::Tcp => "tcp",
                },
            );
            out.push(StatLine {
                kind: RowKind::Frontend,
                iid,
                sid: 0,
                row,
            });
        }
        for (iid, svc) in backends {
            if !wanted(&svc.name, iid) {
                continue;
            }
            self.backend_rows(iid, svc, f, &ids, &mut out);
        }
        Ok(out)
    }

    fn backend_rows(
        &self,
        iid: usize,
        svc: &Service,
        f: &StatFilter,
        ids: &IdRegistry,
        out: &mut Vec<StatLine>,
    ) {
        let mode = self.service_mode(&svc.name);
        let mut requests = 0;
        let mut failures = 0;
        let mut responses = [0u64; 5];
        let mut usable = 0;
        let mut weight = 0;
        let mut newest_change = 0;
        let mut backups = 0;
        let mut traffic = EndpointStats::default();
        let (mut rtime, mut ttime, mut ctime) = ((0, 0), (0, 0), (0, 0));
        for e in svc.endpoints.iter() {
            let c = e.live.snapshot();
            let s = e.live.stat_counters();
            traffic.bytes_in += s.bytes_in;
            traffic.bytes_out += s.bytes_out;
            traffic.connect_failures += s.connect_failures;
            traffic.client_aborts += s.client_aborts;
            traffic.server_aborts += s.server_aborts;
            traffic.last_request = traffic.last_request.max(s.last_request);
            add_weighted(&mut rtime, s.response_time);
            add_weighted(&mut ctime, s.connect_time);
            add_weighted(&mut ttime, s.total_time);
            requests += c.requests;
            failures += c.failures;
            for (sum, n) in responses.iter_mut().zip(c.responses) {
                *sum += n;
            }
            if e.accepts_new() {
                if e.backup {
                    backups += 1;
                } else {
                    usable += 1;
                }
                weight += e.weight;
            }
            newest_change = newest_change.max(c.last_change);
            let status = server_status(e, &c);
            let sid = ids.server(&svc.name, &e.id);
            if f.types & 4 == 0
                || f.sid.is_some_and(|s| s != sid)
                || (f.no_maint && status == "MAINT")
                || (f.up && matches!(status, "MAINT" | "DOWN"))
            {
                continue;
            }
            let mut row = StatRow::new();
            row.set(col!("pxname"), &svc.name);
            row.set(col!("svname"), &e.id);
            // The queue is the service's: a server's own is empty.
            row.set(col!("qcur"), 0);
            row.set(col!("qmax"), 0);
            row.set(col!("scur"), c.in_flight);
            let limit = e.live.max_conn();
            if limit > 0 {
                row.set(col!("slim"), limit);
            }
            row.set(col!("stot"), c.requests);
            traffic_columns(&mut row, &s, self.now);
            row.set(col!("econ"), s.connect_failures);
            row.set(col!("eresp"), c.failures.saturating_sub(s.connect_failures));
            row.set(col!("cli_abrt"), s.client_aborts);
            row.set(col!("srv_abrt"), s.server_aborts);
            row.set(col!("status"), status);
            row.set(col!("weight"), e.weight);
            row.set(col!("act"), u8::from(!e.backup));
            row.set(col!("bck"), u8::from(e.backup));
            row.set(col!("lastchg"), self.now.saturating_sub(c.last_change));
            row.set(col!("pid"), 1);
            row.set(col!("iid"), iid);
            row.set(col!("sid"), sid);
            let full = e.weight * WEIGHT_SCALE;
            if e.state == AdminState::Ready && e.balance_weight < full {
                row.set(
                    col!("throttle"),
                    u64::from(e.balance_weight) * 100 / u64::from(full),
                );
            }
            row.set(col!("lbtot"), c.requests);
            row.set(col!("type"), 2);
            if let Some((name, code, desc, _)) = check_terms(&c) {
                row.set(col!("chkfail"), e.live.check_failures());
                row.set(col!("chkdown"), s.went_down);
                row.set(col!("downtime"), s.down_secs);
                // Checks are paused in maintenance: HAProxy then leaves
                // the check columns empty.
                if e.state != AdminState::Maint {
                    row.set(col!("check_status"), name);
                    if let Some(code) = code {
                        row.set(col!("check_code"), code);
                    }
                    row.set(col!("check_desc"), desc);
                    row.set(col!("check_duration"), s.check_millis);
                    row.set(col!("check_rise"), RISE);
                    row.set(col!("check_fall"), FALL);
                    row.set(col!("check_health"), check_health(&c));
                }
            }
            for (field, n) in HRSP.iter().zip(c.responses) {
                row.set(*field, n);
            }
            row.set(col!("hrsp_other"), 0);
            row.set(col!("addr"), &e.address);
            if svc.settings.sticky.is_some() {
                row.set(col!("cookie"), &e.cookie);
            }
            row.set(col!("mode"), mode);
            row.set(col!("srv_icur"), c.idle_connections);
            row.set(col!("src_ilim"), max_idle());
            row.set(col!("idle_conn_cur"), c.idle_connections);
            row.set(col!("safe_conn_cur"), c.idle_connections);
            row.set(col!("used_conn_cur"), c.in_flight);
            row.set(col!("uweight"), e.weight);
            out.push(StatLine {
                kind: RowKind::Server,
                iid,
                sid,
                row,
            });
        }
        if f.types & 2 == 0 || f.sid.is_some_and(|s| s != 0) {
            return;
        }
        let mut row = StatRow::new();
        row.set(col!("pxname"), &svc.name);
        row.set(col!("svname"), "BACKEND");
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        row.set(col!("qcur"), svc.settings.live.queued.load(relaxed));
        row.set(col!("qmax"), svc.settings.live.max_queued.load(relaxed));
        if let Some((qtime, _)) = svc.settings.live.queue_time.millis() {
            row.set(col!("qtime"), qtime);
        }
        row.set(
            col!("scur"),
            svc.settings
                .live
                .active
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        row.set(col!("stot"), requests);
        let live = &svc.settings.live;
        traffic.max_in_flight = live.max_active.load(std::sync::atomic::Ordering::Relaxed);
        traffic.request_rate = live.request_rate.per_second();
        traffic.max_request_rate = live.request_rate.max();
        let average = |(sum, n): (u64, u64)| (n > 0).then(|| (sum / n, n));
        traffic.response_time = average(rtime);
        traffic.connect_time = average(ctime);
        traffic.total_time = average(ttime);
        traffic_columns(&mut row, &traffic, self.now);
        row.set(col!("econ"), traffic.connect_failures);
        row.set(
            col!("eresp"),
            failures.saturating_sub(traffic.connect_failures),
        );
        row.set(col!("cli_abrt"), traffic.client_aborts);
        row.set(col!("srv_abrt"), traffic.server_aborts);
        row.set(
            col!("wretr"),
            svc.settings
                .live
                .retries
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        row.set(
            col!("status"),
            if usable + backups > 0 { "UP" } else { "DOWN" },
        );
        row.set(col!("weight"), weight);
        row.set(col!("act"), usable);
        row.set(col!("bck"), backups);
        if newest_change > 0 {
            row.set(col!("lastchg"), self.now.saturating_sub(newest_change));
        }
        row.set(col!("pid"), 1);
        row.set(col!("iid"), iid);
        row.set(col!("sid"), 0);
        row.set(col!("lbtot"), requests);
        row.set(col!("type"), 1);
        for (field, n) in HRSP.iter().zip(responses) {
            row.set(*field, n);
        }
        row.set(col!("hrsp_other"), 0);
        row.set(col!("req_tot"), requests);
        row.set(col!("mode"), mode);
        row.set(col!("algo"), svc.settings.algorithm.as_str());
        row.set(col!("uweight"), weight);
        out.push(StatLine {
            kind: RowKind::Backend,
            iid,
            sid: 0,
            row,
        });
    }

    /// `show servers state [<backend>]`: HAProxy's version-1 format.
    pub fn show_servers_state(&self, backend: Option<&str>) -> Result<String, String> {
        let ids = self.fitted_ids();
        let list = self.pick_backends(backend, &ids)?;
        let mut out = String::from(
            "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state \
             srv_uweight srv_iweight srv_time_since_last_change srv_check_status \
             srv_check_result srv_check_health srv_check_state srv_agent_state \
             bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl \
             srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n",
        );
        for (iid, svc) in list {
            for e in svc.endpoints.iter() {
                let c = e.live.snapshot();
                let usable = c.healthy && !c.ejected;
                let op_state = if e.state == AdminState::Maint || !usable {
                    0
                } else {
                    2
                };
                // HAProxy's admin bits: maintenance forced at run time (1)
                // or by the configuration (4, here the registry's); drain
                // forced (8).
                let admin_state = match e.state {
                    AdminState::Ready => 0,
                    AdminState::Maint if e.local_state => 1,
                    AdminState::Maint => 4,
                    AdminState::Drain => 8,
                };
                let check = check_terms(&c);
                let maint = e.state == AdminState::Maint;
                // HAProxy's check state bits: 2 configured, 4 enabled,
                // 8 paused (in maintenance).
                let (check_status, check_result, check_health, check_state) = match &check {
                    Some((_, _, _, n)) => (
                        *n,
                        if c.check.as_ref().is_some_and(|k| k.passed) {
                            3
                        } else {
                            2
                        },
                        if maint { 0 } else { check_health(&c) },
                        if maint { 14 } else { 6 },
                    ),
                    // Paused by `disable health`: configured, not enabled.
                    None if e.checked && c.checks_paused => (1, 0, 0, if maint { 10 } else { 2 }),
                    None if e.checked => (1, 0, 0, if maint { 14 } else { 6 }),
                    None => (1, 0, RISE, 0),
                };
                let host = e.address.host();
                let fqdn = if host.parse::<std::net::IpAddr>().is_ok() {
                    "-"
                } else {
                    host
                };
                let _ = writeln!(
                    out,
                    "{iid} {} {} {} {host} {op_state} {admin_state} {} {} {} {check_status} \
                     {check_result} {check_health} {check_state} 0 0 0 {fqdn} {} - 0 0 - - 0",
                    svc.name,
                    ids.server(&svc.name, &e.id),
                    e.id,
                    e.weight,
                    e.initial_weight,
                    self.now.saturating_sub(c.last_change),
                    e.address.port(),
                );
            }
        }
        Ok(out)
    }

    /// `show servers conn [<backend>]`.
    pub fn show_servers_conn(&self, backend: Option<&str>) -> Result<String, String> {
        let ids = self.fitted_ids();
        let list = self.pick_backends(backend, &ids)?;
        // One pool per endpoint, shared by every thread: one column.
        let mut out = String::from(
            "# bkname/svname bkid/svid addr port - purge_delay used_cur used_max need_est \
             unsafe_nb safe_nb idle_lim idle_cur idle_per_thr[1]\n",
        );
        for (iid, svc) in list {
            let purge = svc.settings.upstream_idle_timeout.as_millis();
            for e in svc.endpoints.iter() {
                let idle = e.live.pool.idle();
                let _ = writeln!(
                    out,
                    "{}/{} {iid}/{} {} {} - {purge} {} - - 0 {idle} {} {idle} {idle}",
                    svc.name,
                    e.id,
                    ids.server(&svc.name, &e.id),
                    e.address.host(),
                    e.address.port(),
                    e.live.in_flight(),
                    max_idle(),
                );
            }
        }
        Ok(out)
    }

    fn pick_backends(
        &self,
        backend: Option<&str>,
        ids: &IdRegistry,
    ) -> Result<Vec<(usize, &Arc<Service>)>, String> {
        match backend {
            None => Ok(self.backends(ids)),
            Some(name) => {
                // A backend id works too, as in HAProxy.
                let found = self
                    .backends(ids)
                    .into_iter()
                    .find(|(i, s)| &*s.name == name || i.to_string() == name);
                found
                    .map(|b| vec![b])
                    .ok_or_else(|| "Can't find backend.\n".to_string())
            }
        }
    }

    /// `show backend`.
    pub fn show_backend(&self) -> String {
        let mut out = String::from("# name\n");
        let mut names: Vec<&Arc<str>> = self.table.services.keys().collect();
        names.sort();
        for name in names {
            out.push_str(name);
            out.push('\n');
        }
        out
    }

    /// `show info`'s fields in HAProxy 2.6's order and positions, the
    /// ones pointsman can fill: (position, name, value).
    pub fn info_fields(&self) -> Vec<(usize, &'static str, String)> {
        let p = &self.process;
        let up = self.now.saturating_sub(p.started);
        let (open, _, accepted) = crate::engine::conn::CLIENT_CONNS.snapshot();
        let requests: u64 = self
            .table
            .services
            .values()
            .flat_map(|s| s.endpoints.iter())
            .map(|e| e.live.snapshot().requests)
            .sum();
        let version = format!("pointsman-{}", env!("CARGO_PKG_VERSION"));
        let uptime = format!(
            "{}d {}h{:02}m{:02}s",
            up / 86_400,
            up % 86_400 / 3600,
            up % 3600 / 60,
            up % 60
        );
        let name = if p.haproxy_name {
            "HAProxy"
        } else {
            "pointsman"
        };
        let mut v: Vec<(usize, &'static str, String)> = vec![
            (0, "Name", name.into()),
            (1, "Version", version.clone()),
            (2, "Release_date", p.release_date.clone()),
            (3, "Nbthread", p.threads.to_string()),
            (4, "Nbproc", "1".into()),
            (5, "Process_num", "1".into()),
            (6, "Pid", p.pid.to_string()),
            (7, "Uptime", uptime),
            (8, "Uptime_sec", up.to_string()),
            // No memory limit is set, as HAProxy's 0 says.
            (9, "Memmax_MB", "0".into()),
        ];
        if let Some(n) = p.ulimit_n {
            v.push((13, "Ulimit-n", n.to_string()));
        }
        let zero = |pos, name: &'static str| (pos, name, "0".to_string());
        v.extend([
            (15, "Maxconn", self.max_connections.to_string()),
            (16, "Hard_maxconn", self.max_connections.to_string()),
            (17, "CurrConns", open.to_string()),
            (18, "CumConns", accepted.to_string()),
            (19, "CumReq", requests.to_string()),
            // No TLS, no splicing, no compression, no rate limits here:
            // HAProxy's own zeros for those.
            zero(20, "MaxSslConns"),
            zero(21, "CurrSslConns"),
            zero(22, "CumSslConns"),
            zero(23, "Maxpipes"),
            zero(24, "PipesUsed"),
            zero(25, "PipesFree"),
            (26, "ConnRate", p.conn_rate.to_string()),
            zero(27, "ConnRateLimit"),
            (28, "MaxConnRate", p.max_conn_rate.to_string()),
            (29, "SessRate", p.conn_rate.to_string()),
            zero(30, "SessRateLimit"),
            (31, "MaxSessRate", p.max_conn_rate.to_string()),
            zero(32, "SslRate"),
            zero(33, "SslRateLimit"),
            zero(34, "MaxSslRate"),
            zero(35, "SslFrontendKeyRate"),
            zero(36, "SslFrontendMaxKeyRate"),
            zero(37, "SslFrontendSessionReuse_pct"),
            zero(38, "SslBackendKeyRate"),
            zero(39, "SslBackendMaxKeyRate"),
            zero(40, "SslCacheLookups"),
            zero(41, "SslCacheMisses"),
            zero(42, "CompressBpsIn"),
            zero(43, "CompressBpsOut"),
            zero(44, "CompressBpsRateLim"),
            (47, "Tasks", p.tasks.to_string()),
            (48, "Run_queue", p.run_queue.to_string()),
            (49, "Idle_pct", p.idle_pct.to_string()),
            (50, "node", p.node.clone()),
        ]);
        if p.haproxy_name {
            v.push((
                51,
                "description",
                format!(
                    "pointsman {} (HAProxy 2.6 runtime API)",
                    env!("CARGO_PKG_VERSION")
                ),
            ));
        }
        v.extend([
            (52, "Stopping", u8::from(p.stopping).to_string()),
            (55, "Listeners", self.frontends.len().to_string()),
            (66, "Build info", version),
            zero(67, "Memmax_bytes"),
            (70, "Start_time_sec", p.started.to_string()),
        ]);
        v
    }

    /// `show info` in the format `f` asks for.
    pub fn show_info(&self, f: Format) -> String {
        let fields = self.info_fields();
        match f {
            Format::Plain => {
                let mut out = String::new();
                for (_, k, v) in &fields {
                    let _ = writeln!(out, "{k}: {v}");
                }
                out
            }
            Format::Typed => typed::info_typed(&fields),
            Format::Json => typed::info_json(&fields),
        }
    }

    /// `show version`: the `Version` of `show info`.
    pub fn show_version(&self) -> String {
        format!("pointsman-{}\n", env!("CARGO_PKG_VERSION"))
    }

    /// `get map <map> <value>`: HAProxy's lookup answer (keys are matched
    /// exactly here, as strings).
    pub fn get_map(&self, r: &MapRef, key: &str) -> Result<String, String> {
        let name = self.map_name(r).ok_or_else(|| UNKNOWN_MAP.to_string())?;
        let value = self.table.maps.get(name.as_str()).and_then(|m| m.get(key));
        Ok(match value {
            Some(v) => format!(
                "type=str, case=sensitive, found=yes, idx=tree, key=\"{}\", value=\"{}\", type=\"str\"\n",
                key.replace('"', "\\\""),
                v.replace('"', "\\\"")
            ),
            None => "type=str, case=sensitive, found=no\n".into(),
        })
    }

    /// Every map: the ones with entries and the ones a route reads, sorted,
    /// with the routes that read each. Ids are positions in this list.
    fn maps(&self) -> Vec<(Arc<str>, Vec<Arc<str>>)> {
        let mut maps: BTreeMap<Arc<str>, BTreeSet<Arc<str>>> = self
            .table
            .maps
            .keys()
            .map(|k| (k.clone(), BTreeSet::new()))
            .collect();
        for (_, route) in self.table.routes.iter() {
            if let Target::Map { map, .. } = &route.target {
                maps.entry(map.clone())
                    .or_default()
                    .insert(route.name.clone());
            }
        }
        maps.into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect()
    }

    /// The name of the map `r` names, if it exists.
    pub fn map_name(&self, r: &MapRef) -> Option<String> {
        let maps = self.maps();
        match r {
            MapRef::Id(id) => maps.get(id.checked_sub(1)?).map(|(n, _)| n.to_string()),
            MapRef::Name(n) => maps.iter().any(|(m, _)| **m == **n).then(|| n.clone()),
        }
    }

    /// `show map`: the list of maps.
    pub fn show_maps(&self) -> String {
        let mut out = String::from("# id (file) description\n");
        for (i, (name, routes)) in self.maps().iter().enumerate() {
            let entries = self.table.maps.get(name).map_or(0, |m| m.len());
            let used = if routes.is_empty() {
                "used by no route".to_string()
            } else {
                let names: Vec<&str> = routes.iter().map(|r| &**r).collect();
                format!("used by route {}", names.join(", "))
            };
            let _ = writeln!(
                out,
                "{} ({name}) routing map '{name}' {used}. entry_cnt={entries}",
                i + 1
            );
        }
        out
    }

    /// `show map <map>`: `<ref> <key> <value>` per entry, sorted by key.
    /// The first column is the entry's position (HAProxy prints a
    /// pointer there); it is not accepted back as a reference.
    pub fn show_map(&self, r: &MapRef) -> Result<String, String> {
        let name = self.map_name(r).ok_or_else(|| UNKNOWN_MAP.to_string())?;
        let mut out = String::new();
        if let Some(m) = self.table.maps.get(name.as_str()) {
            let sorted: BTreeMap<&String, &Arc<str>> = m.iter().collect();
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                let _ = writeln!(out, "{:#x} {k} {v}", i + 1);
            }
        }
        Ok(out)
    }

    pub(super) fn endpoint(&self, s: &ServerRef) -> Result<&Endpoint, String> {
        let svc = self
            .table
            .services
            .get(s.backend.as_str())
            .ok_or_else(|| "No such backend.\n".to_string())?;
        svc.endpoints
            .iter()
            .find(|e| *e.id == *s.server)
            .ok_or_else(|| "No such server.\n".to_string())
    }

    /// `get weight <backend>/<server>`.
    pub fn get_weight(&self, s: &ServerRef) -> Result<String, String> {
        let e = self.endpoint(s)?;
        Ok(format!("{} (initial {})\n", e.weight, e.initial_weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_status_column_is_the_eighteenth_as_scripts_cut_it() {
        assert_eq!(
            STAT_FIELDS.len(),
            128,
            "HAProxy 2.6 with its ssl, h2 and h1 modules"
        );
        assert_eq!(STAT_FIELDS[1], "svname");
        assert_eq!(STAT_FIELDS[17], "status");
        let unique: BTreeSet<&str> = STAT_FIELDS.iter().copied().collect();
        assert_eq!(unique.len(), STAT_FIELDS.len());
    }
}
