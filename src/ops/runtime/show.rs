//! The read commands' output, built from one [`Snapshot`] of the routing
//! table: `show stat`, `show servers state|conn`, `show backend`, `show
//! info`, `show map`, `get weight`. Pure: no sockets.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Display, Write as _};
use std::sync::Arc;

use pointsman_discovery::AdminState;

use super::parse::{MapRef, ServerRef, StatFilter, UNKNOWN_MAP};
use crate::control::config::ListenerMode;
use crate::engine::balance::BalanceAlgorithm;
use crate::engine::endpoint::EndpointCounters;
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
}

/// Process facts for `show info`.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    pub started: u64,
    pub threads: usize,
    pub stopping: bool,
    pub node: String,
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
}

/// A server's `show stat` status, with HAProxy's words and precedence.
pub fn server_status(e: &Endpoint, c: &EndpointCounters) -> &'static str {
    if e.state == AdminState::Maint {
        "MAINT"
    } else if !c.healthy || c.ejected {
        "DOWN"
    } else if e.state == AdminState::Drain {
        "DRAIN"
    } else if e.checked {
        "UP"
    } else {
        "no check"
    }
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
    /// Services sorted by name, each with its proxy id (ids continue after
    /// the frontends', as HAProxy numbers all proxies in one sequence).
    fn backends(&self) -> Vec<(usize, &Arc<Service>)> {
        let mut v: Vec<&Arc<Service>> = self.table.services.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        let first = self.frontends.len() + 1;
        v.into_iter()
            .enumerate()
            .map(|(i, s)| (first + i, s))
            .collect()
    }

    fn backend(&self, name: &str) -> Option<(usize, &Arc<Service>)> {
        self.backends().into_iter().find(|(_, s)| &*s.name == name)
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

    /// `show stat`.
    pub fn show_stat(&self, f: &StatFilter) -> Result<String, String> {
        let backends = self.backends();
        if let Some(p) = &f.proxy {
            let known = self
                .frontends
                .iter()
                .enumerate()
                .any(|(i, fe)| fe.name == *p || (i + 1).to_string() == *p)
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
        let mut out = String::from("# ");
        for field in STAT_FIELDS {
            out.push_str(field);
            out.push(',');
        }
        out.push('\n');
        for (i, fe) in self.frontends.iter().enumerate() {
            let iid = i + 1;
            if f.types & 1 == 0 || !wanted(&fe.name, iid) || f.sid.is_some_and(|s| s != 0) {
                continue;
            }
            let mut row = StatRow::new();
            row.set(col!("pxname"), &fe.name);
            row.set(col!("svname"), "FRONTEND");
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
            row.write(&mut out);
        }
        for (iid, svc) in backends {
            if !wanted(&svc.name, iid) {
                continue;
            }
            self.backend_rows(iid, svc, f, &mut out);
        }
        Ok(out)
    }

    fn backend_rows(&self, iid: usize, svc: &Service, f: &StatFilter, out: &mut String) {
        let mode = self.service_mode(&svc.name);
        let mut requests = 0;
        let mut failures = 0;
        let mut responses = [0u64; 5];
        let mut usable = 0;
        let mut weight = 0;
        let mut newest_change = 0;
        for (i, e) in svc.endpoints.iter().enumerate() {
            let c = e.live.snapshot();
            requests += c.requests;
            failures += c.failures;
            for (sum, n) in responses.iter_mut().zip(c.responses) {
                *sum += n;
            }
            if e.accepts_new() {
                usable += 1;
                weight += e.weight;
            }
            newest_change = newest_change.max(c.last_change);
            let status = server_status(e, &c);
            let sid = i + 1;
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
            row.set(col!("qcur"), 0);
            row.set(col!("qmax"), 0);
            row.set(col!("scur"), c.in_flight);
            row.set(col!("stot"), c.requests);
            row.set(col!("eresp"), c.failures);
            row.set(col!("status"), status);
            row.set(col!("weight"), e.weight);
            row.set(col!("act"), 1);
            row.set(col!("bck"), 0);
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
                row.set(col!("check_status"), name);
                if let Some(code) = code {
                    row.set(col!("check_code"), code);
                }
                row.set(col!("check_desc"), desc);
            }
            for (field, n) in HRSP.iter().zip(c.responses) {
                row.set(*field, n);
            }
            row.set(col!("hrsp_other"), 0);
            row.set(col!("addr"), &e.address);
            if svc.settings.algorithm == BalanceAlgorithm::Cookie {
                row.set(col!("cookie"), &e.cookie);
            }
            row.set(col!("mode"), mode);
            row.set(col!("srv_icur"), c.idle_connections);
            row.set(col!("src_ilim"), max_idle());
            row.set(col!("idle_conn_cur"), c.idle_connections);
            row.set(col!("safe_conn_cur"), c.idle_connections);
            row.set(col!("used_conn_cur"), c.in_flight);
            row.set(col!("uweight"), e.weight);
            row.write(out);
        }
        if f.types & 2 == 0 || f.sid.is_some_and(|s| s != 0) {
            return;
        }
        let mut row = StatRow::new();
        row.set(col!("pxname"), &svc.name);
        row.set(col!("svname"), "BACKEND");
        row.set(col!("qcur"), 0);
        row.set(col!("qmax"), 0);
        row.set(
            col!("scur"),
            svc.settings
                .live
                .active
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        row.set(col!("stot"), requests);
        row.set(col!("eresp"), failures);
        row.set(
            col!("wretr"),
            svc.settings
                .live
                .retries
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        row.set(col!("status"), if usable > 0 { "UP" } else { "DOWN" });
        row.set(col!("weight"), weight);
        row.set(col!("act"), usable);
        row.set(col!("bck"), 0);
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
        row.write(out);
    }

    /// `show servers state [<backend>]`: HAProxy's version-1 format.
    pub fn show_servers_state(&self, backend: Option<&str>) -> Result<String, String> {
        let list = self.pick_backends(backend)?;
        let mut out = String::from(
            "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state \
             srv_uweight srv_iweight srv_time_since_last_change srv_check_status \
             srv_check_result srv_check_health srv_check_state srv_agent_state \
             bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl \
             srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n",
        );
        for (iid, svc) in list {
            for (i, e) in svc.endpoints.iter().enumerate() {
                let c = e.live.snapshot();
                let usable = c.healthy && !c.ejected;
                let op_state = if e.state == AdminState::Maint || !usable {
                    0
                } else {
                    2
                };
                let admin_state = match e.state {
                    AdminState::Ready => 0,
                    AdminState::Maint => 1,
                    AdminState::Drain => 8,
                };
                let check = check_terms(&c);
                let (check_status, check_result, check_health, check_state) = match &check {
                    Some((_, _, _, n)) => (
                        *n,
                        if c.check.as_ref().is_some_and(|k| k.passed) {
                            3
                        } else {
                            2
                        },
                        u8::from(c.healthy),
                        6,
                    ),
                    None => (1, 0, 0, 0),
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
                    i + 1,
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
        let list = self.pick_backends(backend)?;
        // One pool per endpoint, shared by every thread: one column.
        let mut out = String::from(
            "# bkname/svname bkid/svid addr port - purge_delay used_cur used_max need_est \
             unsafe_nb safe_nb idle_lim idle_cur idle_per_thr[1]\n",
        );
        for (iid, svc) in list {
            let purge = svc.settings.upstream_idle_timeout.as_millis();
            for (i, e) in svc.endpoints.iter().enumerate() {
                let idle = e.live.pool.idle();
                let _ = writeln!(
                    out,
                    "{}/{} {iid}/{} {} {} - {purge} {} - - 0 {idle} {} {idle} {idle}",
                    svc.name,
                    e.id,
                    i + 1,
                    e.address.host(),
                    e.address.port(),
                    e.live.in_flight(),
                    max_idle(),
                );
            }
        }
        Ok(out)
    }

    fn pick_backends(&self, backend: Option<&str>) -> Result<Vec<(usize, &Arc<Service>)>, String> {
        match backend {
            None => Ok(self.backends()),
            Some(name) => {
                let found = self.backend(name).or_else(|| {
                    // A backend id works too, as in HAProxy.
                    let id: usize = name.parse().ok()?;
                    self.backends().into_iter().find(|(i, _)| *i == id)
                });
                found
                    .map(|b| vec![b])
                    .ok_or_else(|| "Can't find backend.\n".to_string())
            }
        }
    }

    /// `show backend`.
    pub fn show_backend(&self) -> String {
        let mut out = String::from("# name\n");
        for (_, svc) in self.backends() {
            out.push_str(&svc.name);
            out.push('\n');
        }
        out
    }

    /// `show info`.
    pub fn show_info(&self) -> String {
        let p = &self.process;
        let up = self.now.saturating_sub(p.started);
        let mut out = String::new();
        let mut line = |k: &str, v: &dyn Display| {
            let _ = writeln!(out, "{k}: {v}");
        };
        line("Name", &"pointsman");
        line("Version", &env!("CARGO_PKG_VERSION"));
        line("Nbthread", &p.threads);
        line("Nbproc", &1);
        line("Process_num", &1);
        line("Pid", &p.pid);
        line(
            "Uptime",
            &format!(
                "{}d {}h{:02}m{:02}s",
                up / 86_400,
                up % 86_400 / 3600,
                up % 3600 / 60,
                up % 60
            ),
        );
        line("Uptime_sec", &up);
        line("Maxconn", &self.max_connections);
        line("Hard_maxconn", &self.max_connections);
        let (open, _, accepted) = crate::engine::conn::CLIENT_CONNS.snapshot();
        line("CurrConns", &open);
        line("CumConns", &accepted);
        line("Stopping", &u8::from(p.stopping));
        line("Listeners", &self.frontends.len());
        line("node", &p.node);
        line("Start_time_sec", &p.started);
        out
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
