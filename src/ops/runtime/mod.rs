//! The HAProxy-compatible runtime API, on a Unix socket (mode 0600) and on
//! loopback TCP. Operators' scripts written for HAProxy's stats socket
//! (`echo "show stat" | socat stdio unix-connect:...`) work unchanged: the
//! commands, their arguments, their output formats and their error texts
//! follow HAProxy 2.6's management guide wherever a script could parse them.
//!
//! The Unix socket (mode 0600) takes every command. The loopback TCP
//! listener is read-only unless the connection first sends `auth <token>`
//! with the admin token: a loopback port is open to every local user, and
//! to a browser page that posts to it (a line that looks like an HTTP
//! request closes the connection). See RUNTIME.md.
//!
//! A backend is a service, a server an instance id, a map a routing map.
//! Changes go through [`ControlHandle::change`] (the local layer of the
//! control task): like HAProxy's, they are local to this process and last
//! until it stops. Fleet-wide changes belong in the registry.
//!
//! Three parts: `parse` (lines into [`Request`]s: pure), `show` (output
//! built from one table [`Snapshot`]: pure), and `server` (the listeners
//! and client connections: [`bind`], [`RuntimeListeners::serve`]); this
//! module runs the commands.

mod ids;
mod parse;
mod server;
mod show;
mod typed;

pub use parse::{
    looks_like_http, map_ref, parse, parse_delay, parse_weight, resolve_weight, split_line, Format,
    MapRef, Request, ServerRef, StatFilter, WeightArg,
};
pub use server::{bind, serve_client, ObservedListeners, RuntimeListeners, Serving, SocketFile};
pub use show::{
    server_status, stat_csv, Frontend, ProcessInfo, RowKind, Snapshot, StatLine, STAT_FIELDS,
};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::control::config::{admin_token_matches, Config, RuntimeIdentity};
use crate::control::local::{LocalChange, LocalError};
use crate::control::ControlHandle;
use crate::engine::endpoint::unix_now;
use crate::engine::frontend::{frontends_for, FrontendCounters};
use parse::{help, UNKNOWN_MAP};

/// Longest command line accepted, in bytes; a longer one is answered with
/// an error and the connection is closed.
pub const MAX_LINE: usize = 64 * 1024;
/// Most commands on one line (separated by `;`).
pub const MAX_COMMANDS: usize = 64;

/// The answer to a refused change.
fn refused(e: &LocalError, missing_key: &str) -> String {
    match e {
        LocalError::NoSuchService(_) => "No such backend.\n".into(),
        LocalError::NoSuchServer { .. } => "No such server.\n".into(),
        LocalError::NoSuchMap(_) => UNKNOWN_MAP.into(),
        LocalError::NoSuchKey { .. } => missing_key.into(),
        LocalError::KeyExists { .. } => {
            "Key already exists: use 'set map' to change its value.\n".into()
        }
        LocalError::Stopped => "The proxy is stopping.\n".into(),
    }
}

const READ_ONLY: &str = "Permission denied: this listener is read-only; send \"auth <token>\" \
     first (the admin token), or use the Unix socket (--runtime-socket).\n";
const NO_TOKEN: &str = "Permission denied: this listener is read-only and no admin token is \
     configured; set one (--admin-token or [global] admin_token) and send \"auth <token>\", \
     or use the Unix socket (--runtime-socket).\n";
const WRONG_TOKEN: &str =
    "Permission denied: wrong token (auth takes the admin token); closing the connection.\n";

/// How long an interactive session may sit idle unless `set timeout cli`
/// says otherwise.
pub const PROMPT_IDLE: Duration = Duration::from_secs(600);

/// What one client connection may do, and its mode.
#[derive(Debug)]
pub struct Session {
    /// `prompt` mode: prompts, and the connection stays open.
    pub interactive: bool,
    /// How long an interactive session may wait for its next command.
    pub idle_timeout: Duration,
    may_change: bool,
    over_tcp: bool,
}

impl Session {
    /// A connection on the Unix socket: every command.
    pub fn unix() -> Session {
        Session {
            interactive: false,
            idle_timeout: PROMPT_IDLE,
            may_change: true,
            over_tcp: false,
        }
    }

    /// A connection on the TCP listener: read-only until `auth`.
    pub fn tcp() -> Session {
        Session {
            interactive: false,
            idle_timeout: PROMPT_IDLE,
            may_change: false,
            over_tcp: true,
        }
    }
}

/// What a command does to its connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Print this (possibly nothing).
    Text(String),
    /// Toggle interactive mode.
    Prompt,
    /// Close the connection.
    Quit,
    /// Set the session's idle timeout.
    Timeout(Duration),
}

/// The previous `show info`'s sample, for its rates and `Idle_pct`.
#[derive(Debug)]
struct Sample {
    at: Instant,
    /// Process CPU time, in clock ticks.
    cpu_ticks: u64,
    accepted: u64,
    idle_pct: u64,
    conn_rate: u64,
    max_conn_rate: u64,
}

/// Process CPU time (user + system) in clock ticks, from `/proc/self/stat`.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split(' ').skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The soft open-file limit, from `/proc/self/limits`.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `YYYY/MM/DD` of this binary's file time: when it was built.
fn release_date() -> String {
    let secs = std::env::current_exe()
        .and_then(std::fs::metadata)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let (y, m, d, ..) = typed::civil(secs);
    format!("{y}/{m:02}/{d:02}")
}

/// Clock ticks per second as Linux reports CPU times (`USER_HZ`, 100 on
/// every architecture Linux runs on).
const TICKS_PER_SEC: f64 = 100.0;

/// The runtime API's view of the proxy.
pub struct Runtime {
    control: ControlHandle,
    /// The config last applied (listeners and global settings).
    config: Arc<ArcSwap<Config>>,
    started: u64,
    threads: usize,
    node: String,
    shutdown: CancellationToken,
    /// Stable proxy and server ids, shared with the admin listener.
    ids: Arc<Mutex<ids::IdRegistry>>,
    release_date: String,
    sample: Mutex<Sample>,
}

/// A [`Snapshot`] for `show stat` and its CSV, from the table and the
/// applied config: what the admin listener's `/stats;csv` prints. Its ids
/// are the runtime API's.
pub fn stat_snapshot(table: &crate::engine::table::SharedTable, config: &Config) -> Snapshot {
    Snapshot {
        table: table.load_full(),
        frontends: frontends(config, table),
        max_connections: config.global.max_connections,
        now: unix_now(),
        process: ProcessInfo::default(),
        ids: ids::registry_for(table),
    }
}

/// The config's listeners, with their counters as of now.
fn frontends(config: &Config, table: &crate::engine::table::SharedTable) -> Vec<Frontend> {
    let live = frontends_for(table);
    let mut frontends: Vec<Frontend> = config
        .listeners
        .iter()
        .map(|l| Frontend {
            name: l.name.clone(),
            mode: l.mode,
            default_service: l.default_service.clone(),
            counters: live.snapshot(&l.name),
        })
        .collect();
    frontends.sort_by(|a, b| a.name.cmp(&b.name));
    frontends
}

impl Runtime {
    pub fn new(
        control: ControlHandle,
        config: Arc<ArcSwap<Config>>,
        threads: usize,
        shutdown: CancellationToken,
    ) -> Runtime {
        let ids = ids::registry_for(control.table());
        let (_, _, accepted) = crate::engine::conn::CLIENT_CONNS.snapshot();
        Runtime {
            ids,
            release_date: release_date(),
            sample: Mutex::new(Sample {
                at: Instant::now(),
                cpu_ticks: cpu_ticks().unwrap_or(0),
                accepted,
                idle_pct: 100,
                conn_rate: 0,
                max_conn_rate: 0,
            }),
            control,
            config,
            started: unix_now(),
            threads,
            node: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            shutdown,
        }
    }

    /// The table and facts as of now.
    pub fn snapshot(&self) -> Snapshot {
        let config = self.config.load_full();
        Snapshot {
            table: self.control.table().load_full(),
            frontends: frontends(&config, self.control.table()),
            max_connections: config.global.max_connections,
            now: unix_now(),
            process: ProcessInfo {
                pid: std::process::id(),
                started: self.started,
                threads: self.threads,
                stopping: self.shutdown.is_cancelled(),
                node: self.node.clone(),
                haproxy_name: config.global.runtime_identity == RuntimeIdentity::Haproxy,
                release_date: self.release_date.clone(),
                ..ProcessInfo::default()
            },
            ids: self.ids.clone(),
        }
    }

    /// [`Runtime::snapshot`] with `show info`'s live facts: tasks, run
    /// queue, the connection rate and the idle share since the previous
    /// `show info` (at least a second ago; sooner, that one's figures).
    fn info_snapshot(&self) -> Snapshot {
        let mut snap = self.snapshot();
        let p = &mut snap.process;
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let m = h.metrics();
            p.tasks = m.num_alive_tasks();
            p.run_queue = m.global_queue_depth();
        }
        p.ulimit_n = open_file_limit();
        let mut s = self.sample.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = s.at.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let (_, _, accepted) = crate::engine::conn::CLIENT_CONNS.snapshot();
            let ticks = cpu_ticks().unwrap_or(s.cpu_ticks);
            let secs = elapsed.as_secs_f64();
            let busy = (ticks.saturating_sub(s.cpu_ticks) as f64 / TICKS_PER_SEC)
                / (secs * self.threads.max(1) as f64);
            s.idle_pct = (100.0 - busy * 100.0).clamp(0.0, 100.0).round() as u64;
            s.conn_rate = (accepted.saturating_sub(s.accepted) as f64 / secs).round() as u64;
            s.max_conn_rate = s.max_conn_rate.max(s.conn_rate);
            s.at = Instant::now();
            s.cpu_ticks = ticks;
            s.accepted = accepted;
        }
        p.idle_pct = s.idle_pct;
        p.conn_rate = s.conn_rate;
        p.max_conn_rate = s.max_conn_rate;
        snap
    }

    /// `clear counters [all]`, with HAProxy's semantics: the maxima (and
    /// `show info`'s `MaxConnRate`) start again from now; with `all`,
    /// every counter of every listener, service and instance is zeroed as
    /// by a restart. Gauges (sessions open, requests in flight) and
    /// states stay.
    fn clear_counters(&self, all: bool) {
        let table = self.control.table().load_full();
        for svc in table.services.values() {
            if all {
                svc.settings.live.clear();
            } else {
                svc.settings.live.clear_max();
            }
            for e in svc.endpoints.iter() {
                if all {
                    e.live.clear();
                } else {
                    e.live.clear_max();
                }
            }
        }
        let live = frontends_for(self.control.table());
        if all {
            live.for_each(FrontendCounters::clear);
        } else {
            live.for_each(FrontendCounters::clear_max);
        }
        let mut s = self.sample.lock().unwrap_or_else(|e| e.into_inner());
        s.max_conn_rate = s.conn_rate;
    }

    /// Runs one command.
    pub async fn execute(&self, req: Request) -> Outcome {
        let text = |r: Result<String, String>| Outcome::Text(r.unwrap_or_else(|e| e));
        match req {
            // Handled by `run_line`, which knows the session.
            Request::Auth(_) => Outcome::Text(String::new()),
            Request::Help(words) => Outcome::Text(help(&words)),
            Request::Prompt => Outcome::Prompt,
            Request::Quit => Outcome::Quit,
            Request::ShowStat(f) => text(self.render(move |s| s.show_stat(&f)).await),
            Request::ShowInfo(f) => Outcome::Text(self.info_snapshot().show_info(f)),
            Request::ShowVersion => Outcome::Text(self.snapshot().show_version()),
            Request::ShowErrors(proxy) => text(self.show_errors(proxy.as_deref())),
            Request::GetMap { map, key } => text(self.snapshot().get_map(&map, &key)),
            Request::SetTimeoutCli(d) => Outcome::Timeout(d),
            Request::ClearCounters { all } => {
                self.clear_counters(all);
                Outcome::Text(String::new())
            }
            Request::ShutdownSessions(s) => match self.snapshot().endpoint(&s) {
                // Requests in flight finish; the idle connections kept
                // for the next ones are closed.
                Ok(e) => {
                    e.live.pool.clear();
                    Outcome::Text(String::new())
                }
                Err(e) => Outcome::Text(e),
            },
            // HAProxy's answers: silence, or its text for a server
            // without checks. Local to this proxy, like a weight change,
            // and kept while the endpoint's registration lasts.
            Request::Health(s, enable) => Outcome::Text(match self.snapshot().endpoint(&s) {
                Err(e) => e,
                Ok(e) if !e.checked && enable => {
                    "Health check was not configured on this server, cannot enable.\n".into()
                }
                Ok(e) if enable => {
                    e.live.resume_checks();
                    String::new()
                }
                Ok(e) => {
                    e.live.pause_checks();
                    String::new()
                }
            }),
            Request::ShowServersState(b) => text(
                self.render(move |s| s.show_servers_state(b.as_deref()))
                    .await,
            ),
            Request::ShowServersConn(b) => text(
                self.render(move |s| s.show_servers_conn(b.as_deref()))
                    .await,
            ),
            Request::ShowBackend => Outcome::Text(self.snapshot().show_backend()),
            Request::ShowMap(None) => Outcome::Text(self.snapshot().show_maps()),
            Request::ShowMap(Some(r)) => text(self.snapshot().show_map(&r)),
            Request::GetWeight(s) => text(self.snapshot().get_weight(&s)),
            Request::SetState(s, state) => {
                self.change(
                    LocalChange::ServerState {
                        service: s.backend,
                        id: s.server,
                        state,
                    },
                    "",
                )
                .await
            }
            Request::EnableServer(s) => {
                self.change(
                    LocalChange::ServerEnable {
                        service: s.backend,
                        id: s.server,
                    },
                    "",
                )
                .await
            }
            // Local to this proxy and to the endpoint's live state, like
            // HAProxy's: it lasts while the registration does.
            Request::SetMaxconnServer(s, n) => Outcome::Text(match self.snapshot().endpoint(&s) {
                Ok(e) => {
                    e.live.set_max_conn_local(n);
                    String::new()
                }
                Err(e) => e,
            }),
            Request::SetWeight(s, w) => {
                let initial = match self.snapshot().endpoint(&s) {
                    Ok(e) => e.initial_weight,
                    Err(e) => return Outcome::Text(e),
                };
                self.change(
                    LocalChange::ServerWeight {
                        service: s.backend,
                        id: s.server,
                        weight: resolve_weight(w, initial),
                    },
                    "",
                )
                .await
            }
            Request::SetMap { map, key, value } => match self.map(&map) {
                Ok(map) => {
                    self.change(
                        LocalChange::MapSet { map, key, value },
                        "entry not found.\n",
                    )
                    .await
                }
                Err(e) => Outcome::Text(e),
            },
            Request::AddMap { map, key, value } => match self.map(&map) {
                Ok(map) => {
                    self.change(LocalChange::MapAdd { map, key, value }, "")
                        .await
                }
                Err(e) => Outcome::Text(e),
            },
            Request::DelMap { map, key } => match self.map(&map) {
                Ok(map) => {
                    self.change(LocalChange::MapDel { map, key }, "Key not found.\n")
                        .await
                }
                Err(e) => Outcome::Text(e),
            },
            Request::ClearMap(map) => match self.map(&map) {
                Ok(map) => self.change(LocalChange::MapClear { map }, "").await,
                Err(e) => Outcome::Text(e),
            },
        }
    }

    /// `show errors`: pointsman keeps no copies of malformed requests or
    /// responses, so HAProxy's header says there are none.
    fn show_errors(&self, proxy: Option<&str>) -> Result<String, String> {
        let snap = self.snapshot();
        if let Some(p) = proxy {
            let f = StatFilter {
                proxy: Some(p.to_string()),
                ..StatFilter::default()
            };
            snap.stat_lines(&f)?;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let (y, mo, d, h, mi, s) = typed::civil(now.as_secs());
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month = MONTHS[(mo as usize).saturating_sub(1) % 12];
        Ok(format!(
            "Total events captured on [{d:02}/{month}/{y}:{h:02}:{mi:02}:{s:02}.{:03}] : 0\n",
            now.subsec_millis()
        ))
    }

    /// Builds a per-endpoint listing off the event loop: on a table of
    /// many thousands of endpoints it takes long enough to delay the
    /// control task, which shares this event loop.
    async fn render<F>(&self, f: F) -> Result<String, String>
    where
        F: FnOnce(&Snapshot) -> Result<String, String> + Send + 'static,
    {
        let snapshot = self.snapshot();
        tokio::task::spawn_blocking(move || f(&snapshot))
            .await
            .unwrap_or_else(|e| Err(format!("Internal error: {e}.\n")))
    }

    /// The name of a map a change names: a `#<id>` must exist in `show
    /// map`; a name is checked by the control task.
    fn map(&self, r: &MapRef) -> Result<String, String> {
        match r {
            MapRef::Name(n) => Ok(n.clone()),
            MapRef::Id(_) => self
                .snapshot()
                .map_name(r)
                .ok_or_else(|| UNKNOWN_MAP.to_string()),
        }
    }

    async fn change(&self, change: LocalChange, missing_key: &str) -> Outcome {
        match self.control.change(change).await {
            Ok(()) => Outcome::Text(String::new()),
            Err(e) => Outcome::Text(refused(&e, missing_key)),
        }
    }

    /// Runs one line: what to send back, and whether to close the
    /// connection after it. Each command's output is followed by an empty
    /// line, and in interactive mode by the `> ` prompt, as in HAProxy.
    /// A change on a TCP session runs only after `auth`; a wrong token
    /// closes the connection.
    pub async fn run_line(&self, line: &str, session: &mut Session) -> (String, bool) {
        let commands = split_line(line);
        if commands.len() > MAX_COMMANDS {
            let mut out = format!(
                "Too many commands on one line: at most {MAX_COMMANDS}, separated by ';'. \
                 None was run.\n\n"
            );
            if session.interactive {
                out.push_str("> ");
            }
            return (out, false);
        }
        let mut out = String::new();
        for words in commands {
            let outcome = match parse(&words) {
                Ok(Request::Auth(token)) => match self.auth(&token, session) {
                    Ok(()) => Outcome::Text(String::new()),
                    Err(refusal) => {
                        out.push_str(refusal);
                        out.push('\n');
                        return (out, true);
                    }
                },
                Ok(req) if req.is_change() && !session.may_change => {
                    let configured = self.config.load().global.admin_token.is_some();
                    Outcome::Text(if configured { READ_ONLY } else { NO_TOKEN }.into())
                }
                Ok(req) => self.execute(req).await,
                Err(e) => Outcome::Text(e),
            };
            match outcome {
                Outcome::Text(t) => out.push_str(&t),
                Outcome::Prompt => session.interactive = !session.interactive,
                Outcome::Quit => return (out, true),
                Outcome::Timeout(d) => session.idle_timeout = d,
            }
            out.push('\n');
            if session.interactive {
                out.push_str("> ");
            }
        }
        (out, false)
    }

    /// `auth <token>`: on TCP, allows changes for the rest of the
    /// connection if `token` is the admin token of the applied config. The
    /// Unix socket allows them anyway.
    fn auth(&self, token: &str, session: &mut Session) -> Result<(), &'static str> {
        if !session.over_tcp {
            return Ok(());
        }
        let config = self.config.load();
        if config.global.admin_token.is_none() {
            return Err(NO_TOKEN);
        }
        if !admin_token_matches(&config.global, token.as_bytes()) {
            tracing::warn!("runtime API: auth with a wrong token; connection closed");
            return Err(WRONG_TOKEN);
        }
        session.may_change = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Control, ListenerControl};
    use crate::engine::table::RoutingTable;
    use crate::engine::table::SharedTable;
    use pointsman_discovery::AdminState;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    struct NoListeners;

    impl ListenerControl for NoListeners {
        fn reconcile(&mut self, _: &Config) -> Result<(), String> {
            Ok(())
        }
    }

    const CONFIG: &str = r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:1"

[services.blue]
endpoints = [{ id = "blue", address = "127.0.0.1:2", weight = 10 }]

[services.green]
balance = "cookie"
endpoints = [
  { id = "green", address = "127.0.0.1:3" },
  { id = "g2", address = "localhost:4", state = "drain" },
]

[routes.app]
path_prefix = "/"
map = "hosts"
map_key = "STATIC"

[maps.hosts]
STATIC = "blue"
OTHER = "green"
"#;

    /// A runtime over a real control task with [`CONFIG`] (no sockets).
    fn runtime() -> Runtime {
        runtime_with("")
    }

    /// [`runtime`] with `global` (a `[global]` table's lines) prepended.
    fn runtime_with(global: &str) -> Runtime {
        let text = format!("[global]\n{global}\n{CONFIG}");
        let config = Config::parse("test.toml", &text).expect("valid config");
        let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
        let applied = Arc::new(ArcSwap::from_pointee(config.clone()));
        let observed = ObservedListeners::new(Box::new(NoListeners), applied.clone());
        let mut control = Control::new(config, table.clone(), Box::new(observed));
        control.start().expect("start");
        let (commands, rx) = mpsc::channel(16);
        tokio::spawn(control.run(rx));
        Runtime::new(
            ControlHandle::new(commands, table),
            applied,
            1,
            CancellationToken::new(),
        )
    }

    async fn run(rt: &Runtime, line: &str) -> String {
        let mut session = Session::unix();
        let (out, _) = rt.run_line(line, &mut session).await;
        out
    }

    fn column(csv: &str, row: (&str, &str), field: &str) -> String {
        let i = STAT_FIELDS
            .iter()
            .position(|f| *f == field)
            .expect("a field");
        csv.lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|r| r.len() > 2 && (r[0], r[1]) == row)
            .unwrap_or_else(|| panic!("no row {row:?} in\n{csv}"))[i]
            .to_string()
    }

    #[tokio::test]
    async fn show_stat_has_frontend_backend_and_server_rows() {
        let rt = runtime();
        let csv = run(&rt, "show stat").await;
        assert!(csv.starts_with("# pxname,svname,qcur,"), "{csv}");
        assert!(
            csv.ends_with(",\n\n"),
            "a trailing comma per row, then an empty line"
        );
        for line in csv.lines().filter(|l| !l.is_empty()) {
            assert_eq!(line.matches(',').count(), STAT_FIELDS.len(), "{line}");
        }
        let rows: Vec<(String, String)> = csv
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let mut f = l.split(',');
                (f.next().unwrap_or("").into(), f.next().unwrap_or("").into())
            })
            .collect();
        let want: Vec<(String, String)> = [
            ("web", "FRONTEND"),
            ("blue", "blue"),
            ("blue", "BACKEND"),
            ("green", "g2"),
            ("green", "green"),
            ("green", "BACKEND"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(rows, want);
        assert_eq!(column(&csv, ("web", "FRONTEND"), "status"), "OPEN");
        assert_eq!(column(&csv, ("web", "FRONTEND"), "iid"), "1");
        assert_eq!(column(&csv, ("blue", "blue"), "status"), "no check");
        assert_eq!(column(&csv, ("blue", "blue"), "weight"), "10");
        assert_eq!(column(&csv, ("blue", "blue"), "iid"), "2");
        assert_eq!(column(&csv, ("blue", "blue"), "sid"), "1");
        assert_eq!(column(&csv, ("blue", "blue"), "type"), "2");
        assert_eq!(column(&csv, ("blue", "blue"), "addr"), "127.0.0.1:2");
        assert_eq!(column(&csv, ("blue", "blue"), "scur"), "0");
        assert_eq!(
            column(&csv, ("blue", "blue"), "chkfail"),
            "",
            "no check, no count"
        );
        assert_eq!(column(&csv, ("blue", "BACKEND"), "status"), "UP");
        assert_eq!(column(&csv, ("blue", "BACKEND"), "algo"), "roundrobin");
        assert_eq!(column(&csv, ("green", "g2"), "status"), "DRAIN");
        assert_ne!(column(&csv, ("green", "g2"), "cookie"), "");
        assert_eq!(
            column(&csv, ("green", "BACKEND"), "act"),
            "1",
            "the draining one is not usable"
        );
        assert_eq!(column(&csv, ("green", "BACKEND"), "weight"), "1");

        let disabled = run(&rt, "disable server blue/blue; show stat").await;
        assert!(disabled.starts_with("\n# pxname"), "{disabled}");
        assert_eq!(column(&disabled, ("blue", "blue"), "status"), "MAINT");
        assert_eq!(column(&disabled, ("blue", "BACKEND"), "status"), "DOWN");

        let servers = run(&rt, "show stat green 4 -1").await;
        assert_eq!(
            servers.lines().filter(|l| l.starts_with("green,")).count(),
            2,
            "{servers}"
        );
        assert!(!servers.contains("BACKEND"), "{servers}");
        let no_maint = run(&rt, "show stat no-maint").await;
        assert!(!no_maint.contains("blue,blue,"), "{no_maint}");
        assert!(no_maint.contains("blue,BACKEND,"), "{no_maint}");
        assert_eq!(run(&rt, "show stat nope -1 -1").await, "No such proxy.\n\n");
    }

    #[tokio::test]
    async fn server_commands_change_the_table_and_answer_errors() {
        let rt = runtime();
        assert_eq!(
            run(&rt, "get weight blue/blue").await,
            "10 (initial 10)\n\n"
        );
        assert_eq!(run(&rt, "set server blue/blue weight 50%").await, "\n");
        assert_eq!(run(&rt, "get weight blue/blue").await, "5 (initial 10)\n\n");
        assert_eq!(run(&rt, "set weight blue/blue 300%").await, "\n");
        assert_eq!(
            run(&rt, "get weight blue/blue").await,
            "30 (initial 10)\n\n"
        );
        assert_eq!(run(&rt, "set server blue/blue weight 0").await, "\n");
        let table = rt.control.table().load_full();
        let blue = &table.services["blue"].endpoints[0];
        assert_eq!((blue.weight, blue.initial_weight), (0, 10));

        assert_eq!(run(&rt, "set server blue/blue state drain").await, "\n");
        assert_eq!(
            rt.control.table().load().services["blue"].endpoints[0].state,
            AdminState::Drain
        );
        assert_eq!(run(&rt, "enable server blue/blue").await, "\n");
        assert_eq!(
            rt.control.table().load().services["blue"].endpoints[0].state,
            AdminState::Ready
        );

        for line in [
            "get weight nope/x",
            "disable server nope/x",
            "set server nope/x state maint",
            "set server nope/x weight 3",
        ] {
            assert_eq!(run(&rt, line).await, "No such backend.\n\n", "{line}");
        }
        for line in [
            "get weight blue/x",
            "enable server blue/x",
            "set server blue/x state drain",
            "set weight blue/x 50%",
        ] {
            assert_eq!(run(&rt, line).await, "No such server.\n\n", "{line}");
        }
    }

    #[tokio::test]
    async fn map_commands_follow_the_map_name_rule() {
        let rt = runtime();
        let list = run(&rt, "show map").await;
        assert_eq!(
            list,
            "# id (file) description\n1 (hosts) routing map 'hosts' used by route app. entry_cnt=2\n\n"
        );
        assert_eq!(
            run(&rt, "show map hosts").await,
            "0x1 OTHER green\n0x2 STATIC blue\n\n"
        );
        assert_eq!(
            run(&rt, "set map /etc/haproxy/hosts.map STATIC green").await,
            "\n"
        );
        assert_eq!(
            run(&rt, "show map #1").await,
            "0x1 OTHER green\n0x2 STATIC green\n\n"
        );
        assert_eq!(
            run(&rt, "set map hosts NOPE green").await,
            "entry not found.\n\n"
        );
        assert_eq!(run(&rt, "add map hosts NEW blue").await, "\n");
        assert!(run(&rt, "add map hosts NEW green")
            .await
            .starts_with("Key already exists"));
        assert_eq!(run(&rt, "del map hosts NEW").await, "\n");
        assert_eq!(run(&rt, "del map hosts NEW").await, "Key not found.\n\n");
        for line in [
            "show map nope",
            "show map #2",
            "set map nope a b",
            "add map /x/nope.map a b",
            "del map #9 a",
            "clear map nope",
        ] {
            assert_eq!(
                run(&rt, line).await,
                "Unknown map identifier. Please use #<id> or <file>.\n\n",
                "{line}"
            );
        }
        assert_eq!(run(&rt, "clear map hosts").await, "\n");
        assert_eq!(
            run(&rt, "show map hosts").await,
            "\n",
            "still listed: a route reads it"
        );
        assert!(run(&rt, "show map").await.contains("entry_cnt=0"));
    }

    #[tokio::test]
    async fn servers_state_conn_backend_and_info_formats() {
        let rt = runtime();
        let state = run(&rt, "show servers state green").await;
        let lines: Vec<&str> = state.lines().collect();
        assert_eq!(lines[0], "1");
        assert!(lines[1].starts_with("# be_id be_name srv_id srv_name srv_addr srv_op_state"));
        assert_eq!(lines[1].split(' ').count(), 26, "'#' and 25 names");
        let g2: Vec<&str> = lines[2].split(' ').collect();
        assert_eq!(g2.len(), 25, "{}", lines[2]);
        assert_eq!(&g2[..5], &["3", "green", "1", "g2", "localhost"]);
        assert_eq!(g2[6], "8", "drain is HAProxy's FDRAIN admin state");
        assert_eq!(g2[17], "localhost", "a host name is the fqdn");
        assert_eq!(g2[18], "4");
        assert_eq!(lines[4], "");
        assert_eq!(
            run(&rt, "show servers state nope").await,
            "Can't find backend.\n\n"
        );

        let conn = run(&rt, "show servers conn blue $").await;
        let lines: Vec<&str> = conn.lines().collect();
        assert_eq!(
            lines[0],
            "# bkname/svname bkid/svid addr port - purge_delay used_cur used_max need_est \
             unsafe_nb safe_nb idle_lim idle_cur idle_per_thr[1]"
        );
        assert_eq!(
            lines[1],
            "blue/blue 2/1 127.0.0.1 2 - 30000 0 - - 0 0 256 0 0"
        );
        assert_eq!(
            lines[1].split(' ').nth(6),
            Some("0"),
            "used_cur is the 7th field"
        );
        assert_eq!(
            run(&rt, "show servers conn 3").await.lines().count(),
            4,
            "by id"
        );
        assert_eq!(
            run(&rt, "show servers conn nope").await,
            "Can't find backend.\n\n"
        );

        assert_eq!(run(&rt, "show backend").await, "# name\nblue\ngreen\n\n");
        let info = run(&rt, "show info").await;
        assert!(
            info.starts_with("Name: HAProxy\nVersion: pointsman-"),
            "{info}"
        );
        for field in [
            "Release_date",
            "Maxpipes",
            "PipesUsed",
            "Tasks",
            "Run_queue",
            "CumReq",
            "Idle_pct",
        ] {
            assert!(info.contains(&format!("\n{field}: ")), "{field}: {info}");
        }
        assert!(
            info.contains(&format!("\nPid: {}\n", std::process::id())),
            "{info}"
        );
        assert!(info.contains("\nMaxconn: 10000\n"), "{info}");
        assert!(info.contains("\nUptime_sec: "), "{info}");
        assert!(info.contains("\nCurrConns: "), "{info}");
        assert!(info.contains("\nCumConns: "), "{info}");
    }

    #[tokio::test]
    async fn prompt_mode_prints_prompts_and_quit_stops_the_line() {
        let rt = runtime();
        let mut session = Session::unix();
        let (out, quit) = rt.run_line("prompt", &mut session).await;
        assert_eq!(
            (out.as_str(), quit, session.interactive),
            ("\n> ", false, true)
        );
        let (out, _) = rt
            .run_line("get weight blue/blue; show backend", &mut session)
            .await;
        assert_eq!(out, "10 (initial 10)\n\n> # name\nblue\ngreen\n\n> ");
        let (out, quit) = rt
            .run_line(
                "get weight blue/blue;quit;get weight blue/blue",
                &mut session,
            )
            .await;
        assert_eq!((out.as_str(), quit), ("10 (initial 10)\n\n> ", true));
        let (out, _) = rt.run_line("prompt", &mut session).await;
        assert_eq!((out.as_str(), session.interactive), ("\n", false));

        let many = vec!["show backend"; MAX_COMMANDS + 1].join(";");
        let (out, quit) = rt.run_line(&many, &mut session).await;
        assert!(out.starts_with("Too many commands on one line"), "{out}");
        assert!(!quit);
    }

    async fn session(rt: &Runtime, input: &[u8], keep_open: bool) -> String {
        session_on(rt, Session::unix(), input, keep_open).await
    }

    async fn session_on(rt: &Runtime, on: Session, input: &[u8], keep_open: bool) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.expect("write");
        if !keep_open {
            client.shutdown().await.expect("shutdown");
        }
        let stop = CancellationToken::new();
        let serve = serve_client(server, on, rt, stop);
        let mut out = Vec::new();
        let read = async {
            client.read_to_end(&mut out).await.expect("read");
        };
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(serve, read) })
            .await
            .expect("the session ends by itself");
        String::from_utf8(out).expect("UTF-8")
    }

    #[tokio::test]
    async fn a_connection_answers_one_line_unless_prompted() {
        let rt = runtime();
        // Without prompt: the line (and what came with it) is answered,
        // then the connection closes although the client keeps it open.
        let out = session(&rt, b"show backend\n", true).await;
        assert_eq!(out, "# name\nblue\ngreen\n\n");
        let out = session(&rt, b"get weight blue/blue\nget weight green/g2\n", true).await;
        assert_eq!(out, "10 (initial 10)\n\n1 (initial 1)\n\n");
        // A last line without its newline is run at EOF.
        let out = session(&rt, b"get weight blue/blue", false).await;
        assert_eq!(out, "10 (initial 10)\n\n");
        // Prompt mode: prompts, and the connection stays until quit.
        let out = session(&rt, b"prompt\r\nshow backend\nquit\nshow backend\n", true).await;
        assert_eq!(out, "\n> # name\nblue\ngreen\n\n> ");
        // An over-long line is refused and the connection closed.
        let long = vec![b'x'; MAX_LINE + 10];
        let out = session(&rt, &long, true).await;
        assert!(out.starts_with("Line too long"), "{out}");
    }

    #[tokio::test]
    async fn tcp_sessions_change_only_after_auth() {
        let rt = runtime_with(r#"admin_token = "s3cret""#);
        let weight = |rt: &Runtime| {
            rt.snapshot()
                .get_weight(&ServerRef {
                    backend: "blue".into(),
                    server: "blue".into(),
                })
                .unwrap_or_else(|e| e)
        };
        // Reads work, a change is refused with what to do.
        let out = session_on(&rt, Session::tcp(), b"get weight blue/blue\n", true).await;
        assert_eq!(out, "10 (initial 10)\n\n");
        let out = session_on(&rt, Session::tcp(), b"set weight blue/blue 3\n", true).await;
        assert!(
            out.starts_with("Permission denied: this listener is read-only; send \"auth <token>\""),
            "{out}"
        );
        assert!(out.contains("--runtime-socket"), "{out}");
        // A wrong token closes the session before the rest of the line.
        let out = session_on(
            &rt,
            Session::tcp(),
            b"auth nope; set weight blue/blue 3\n",
            true,
        )
        .await;
        assert!(out.starts_with("Permission denied: wrong token"), "{out}");
        assert_eq!(weight(&rt), "10 (initial 10)\n");
        // The right one allows changes for the rest of the session.
        let out = session_on(
            &rt,
            Session::tcp(),
            b"auth s3cret; set weight blue/blue 3; get weight blue/blue\n",
            true,
        )
        .await;
        assert_eq!(out, "\n\n3 (initial 10)\n\n");
        // The Unix socket needs no auth.
        let out = session(&rt, b"set weight blue/blue 4\n", true).await;
        assert_eq!(out, "\n");
        assert_eq!(weight(&rt), "4 (initial 10)\n");
    }

    #[tokio::test]
    async fn without_an_admin_token_tcp_refuses_every_change() {
        let rt = runtime();
        let out = session_on(&rt, Session::tcp(), b"set weight blue/blue 3\n", true).await;
        assert!(out.contains("no admin token is configured"), "{out}");
        let out = session_on(
            &rt,
            Session::tcp(),
            b"auth anything; set weight blue/blue 3\n",
            true,
        )
        .await;
        assert!(out.contains("no admin token is configured"), "{out}");
        assert_eq!(
            out.matches("Permission denied").count(),
            1,
            "nothing after the refused auth ran: {out}"
        );
    }

    #[tokio::test]
    async fn an_http_request_line_closes_the_session_unanswered() {
        let rt = runtime_with(r#"admin_token = "s3cret""#);
        for on in [Session::tcp(), Session::unix()] {
            let post =
                b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nauth s3cret; set weight blue/blue 1\n";
            assert_eq!(session_on(&rt, on, post, true).await, "");
        }
        let out = session_on(
            &rt,
            Session::tcp(),
            b"prompt\nshow backend\nGET /stats HTTP/1.0\nshow backend\n",
            true,
        )
        .await;
        assert_eq!(out, "\n> # name\nblue\ngreen\n\n> ");
        for line in [
            "POST / HTTP/1.1",
            "GET /x",
            " PUT /a HTTP/1.0",
            "PRI * HTTP/2.0",
        ] {
            assert!(looks_like_http(line), "{line}");
        }
        for line in ["show stat", "get weight a/b", "GET", "post / HTTP/1.1"] {
            assert!(!looks_like_http(line), "{line}");
        }
    }
}
