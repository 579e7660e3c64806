//! From the sections of an haproxy.cfg to the text of a pointsman config.
//!
//! Each line either sets something in the output or becomes a note, a
//! comment in the output that quotes the line and says why it is not (or
//! only partly) translated. `defaults` sections are applied to the
//! sections after them, as in HAProxy; their lines are noted once, under
//! the `defaults` section.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use super::acl::{parse_acl, parse_condition};
use super::parse::{Cfg, Line, Section, SectionKind};
use super::routes::{self, Acl, Rule, Target};
use super::values::{
    call, format_duration, host_header, map_name, parse_bind, parse_server_address, parse_status,
    parse_time, split_top,
};

/// How a noted line was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoteKind {
    /// Nothing in the output comes from it.
    NotTranslated,
    /// Some of it is in the output; the note says what is not.
    Partly,
    /// pointsman always behaves this way; nothing to write.
    BuiltIn,
}

impl NoteKind {
    fn as_str(self) -> &'static str {
        match self {
            NoteKind::NotTranslated => "not translated",
            NoteKind::Partly => "partly translated",
            NoteKind::BuiltIn => "built in",
        }
    }
}

/// A line of the haproxy.cfg that is not, or not wholly, in the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub line: usize,
    pub text: String,
    pub kind: NoteKind,
    pub why: String,
}

/// A map file a `use_backend %[...map(FILE)]` names, as found.
pub struct MapFile {
    /// The path it was read from, as shown in comments.
    pub shown: String,
    pub text: String,
}

/// The translated config and what was left out.
pub struct Translation {
    pub toml: String,
    pub notes: Vec<Note>,
    pub listeners: usize,
    pub services: usize,
    pub routes: usize,
    pub maps: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Http,
    Tcp,
}

#[derive(Clone, Debug, Default)]
struct HttpCheck {
    method: Option<String>,
    uri: Option<String>,
    host: Option<String>,
}

/// Server options, from `default-server` and the `server` line.
#[derive(Clone, Debug, Default)]
struct ServerOpts {
    weight: Option<u16>,
    check: bool,
    inter: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    slowstart: Option<Duration>,
    disabled: bool,
    backup: bool,
    /// `port N`: the port its check goes to.
    check_port: Option<u16>,
}

/// What a `defaults` section carries to the sections after it; each
/// proxy section starts from a copy.
#[derive(Clone, Debug, Default)]
struct Settings {
    mode: Option<Mode>,
    balance: Option<&'static str>,
    /// The sticky cookie's name and mode.
    cookie: Option<(String, &'static str)>,
    connect: Option<Duration>,
    server: Option<Duration>,
    client: Option<Duration>,
    http_request: Option<Duration>,
    keep_alive: Option<Duration>,
    check_timeout: Option<Duration>,
    retries: Option<u32>,
    retry_on: Option<Vec<u16>>,
    httpchk: Option<HttpCheck>,
    expect: Option<(u16, u16)>,
    default_server: ServerOpts,
    default_backend: Option<(String, Line)>,
    access_log: bool,
}

struct Server {
    name: String,
    address: String,
    opts: ServerOpts,
}

/// A frontend's, backend's or listen's own state, beside its settings.
#[derive(Default)]
struct Proxy {
    binds: Vec<(usize, SocketAddr)>,
    /// ACL name -> its tests, or why it cannot be translated.
    acls: BTreeMap<String, Result<Acl, String>>,
    rules: Vec<Line>,
    servers: Vec<Server>,
    /// `stats enable` / `stats uri`: the section serves HAProxy's stats page.
    stats: bool,
}

#[derive(Default)]
struct GlobalOut {
    max_connections: Option<u64>,
    drain_timeout: Option<Duration>,
    runtime_socket: Option<String>,
    runtime_api: Option<SocketAddr>,
}

struct ServiceOut {
    name: String,
    balance: Option<&'static str>,
    /// The sticky cookie's name and mode.
    cookie: Option<(String, &'static str)>,
    connect: Option<Duration>,
    request: Option<Duration>,
    check: Option<String>,
    attempts: Option<u32>,
    on_status: Option<Vec<u16>>,
    slow_start: Option<Duration>,
    endpoints: Vec<String>,
}

struct ListenerOut {
    name: String,
    bind: SocketAddr,
    mode: Mode,
    default_service: Option<String>,
}

struct RouteOut {
    name: String,
    comment: String,
    route: routes::CompiledRoute,
}

/// One section's part of the output, in file order.
struct Block {
    heading: String,
    listeners: Vec<ListenerOut>,
    service: Option<ServiceOut>,
    notes: Vec<Note>,
}

struct Translator<'a> {
    file: &'a str,
    read_map: &'a dyn Fn(&str) -> Option<MapFile>,
    global: GlobalOut,
    /// (header_read_timeout, idle_timeout, access_log) and the frontend
    /// they came from.
    client_side: Option<(Option<Duration>, Option<Duration>, String)>,
    access_log: bool,
    blocks: Vec<Block>,
    routes: Vec<(String, usize, Vec<RouteOut>)>,
    /// Map name -> (file as written, entries).
    maps: BTreeMap<String, (String, Vec<(String, String)>)>,
    bound: BTreeMap<SocketAddr, String>,
    listener_names: BTreeSet<String>,
    /// Services written so far.
    services: BTreeSet<String>,
    backends: BTreeSet<String>,
}

/// Translates a parsed haproxy.cfg. `file` names it in the comments;
/// `read_map` finds a map file by the path the config gives.
pub fn translate(file: &str, cfg: &Cfg, read_map: &dyn Fn(&str) -> Option<MapFile>) -> Translation {
    let mut t = Translator {
        file,
        read_map,
        global: GlobalOut::default(),
        client_side: None,
        access_log: false,
        blocks: Vec::new(),
        routes: Vec::new(),
        maps: BTreeMap::new(),
        bound: BTreeMap::new(),
        listener_names: BTreeSet::new(),
        services: BTreeSet::new(),
        backends: cfg
            .sections
            .iter()
            .filter(|s| matches!(s.kind, SectionKind::Backend | SectionKind::Listen))
            .filter_map(|s| s.name.clone())
            .collect(),
    };
    if !cfg.preamble.is_empty() {
        let notes = cfg
            .preamble
            .iter()
            .map(|l| not(l, "it is outside any section"))
            .collect();
        t.blocks.push(Block {
            heading: String::new(),
            listeners: Vec::new(),
            service: None,
            notes,
        });
    }
    let mut defaults = Settings::default();
    for section in &cfg.sections {
        match section.kind {
            SectionKind::Global => t.global_section(section),
            SectionKind::Defaults => {
                let mut notes = Vec::new();
                if section.name.is_some() {
                    notes.push(partly(
                        &section.header,
                        "named defaults are applied like unnamed ones: to the sections that follow",
                    ));
                }
                let mut settings = Settings::default();
                let mut proxy = Proxy::default();
                for line in &section.lines {
                    if let Some(n) = t.proxy_line(section.kind, &mut settings, &mut proxy, line) {
                        notes.push(n);
                    }
                }
                defaults = settings;
                t.push_block(section, Vec::new(), None, notes);
            }
            SectionKind::Frontend | SectionKind::Backend | SectionKind::Listen => {
                t.proxy_section(section, &defaults)
            }
            SectionKind::Other => {
                let mut notes = vec![not(
                    &section.header,
                    "pointsman has no such section (backends come from the config or a registry)",
                )];
                notes.extend(
                    section
                        .lines
                        .iter()
                        .map(|l| not(l, "inside a section pointsman has no equivalent of")),
                );
                t.push_block(section, Vec::new(), None, notes);
            }
        }
    }
    t.finish()
}

fn note(line: &Line, kind: NoteKind, why: impl Into<String>) -> Note {
    Note {
        line: line.number,
        text: line.text.clone(),
        kind,
        why: why.into(),
    }
}

fn not(line: &Line, why: impl Into<String>) -> Note {
    note(line, NoteKind::NotTranslated, why)
}

fn partly(line: &Line, why: impl Into<String>) -> Note {
    note(line, NoteKind::Partly, why)
}

fn built_in(line: &Line, why: impl Into<String>) -> Note {
    note(line, NoteKind::BuiltIn, why)
}

const NO_EQUIVALENT: &str = "pointsman has no equivalent";
const TLS: &str =
    "pointsman does not terminate TLS (it serves plain HTTP and h2c): terminate TLS in front of it";
const LOGS: &str = "pointsman logs to stderr (--log-format json for JSON lines)";

/// Server option words that take no argument.
const SERVER_FLAGS: &[&str] = &[
    "check",
    "no-check",
    "backup",
    "no-backup",
    "disabled",
    "enabled",
    "ssl",
    "no-ssl",
    "check-ssl",
    "no-check-ssl",
    "send-proxy",
    "send-proxy-v2",
    "send-proxy-v2-ssl",
    "send-proxy-v2-ssl-cn",
    "no-send-proxy",
    "check-send-proxy",
    "agent-check",
    "no-agent-check",
    "tfo",
    "no-tfo",
    "allow-0rtt",
    "no-verifyhost",
    "non-stick",
    "stick",
    "force-sslv3",
    "force-tlsv10",
    "force-tlsv11",
    "force-tlsv12",
    "force-tlsv13",
    "no-sslv3",
    "no-tlsv10",
    "no-tlsv11",
    "no-tlsv12",
    "no-tlsv13",
    "no-tls-tickets",
    "tls-tickets",
    "check-via-socks4",
    "ws",
    "log-proto",
];

/// Applies server option words to `opts`; says what could not be applied.
fn server_options(words: &[String], opts: &mut ServerOpts) -> Vec<String> {
    let mut issues = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        let arg = words.get(i + 1).map(String::as_str);
        let takes_arg = !SERVER_FLAGS.contains(&w);
        i += if takes_arg { 2 } else { 1 };
        let time = |a: Option<&str>| a.and_then(parse_time);
        let count = |a: Option<&str>| a.and_then(|a| a.parse::<u32>().ok()).filter(|n| *n > 0);
        match w {
            "check" => opts.check = true,
            "no-check" => opts.check = false,
            "disabled" => opts.disabled = true,
            "enabled" => opts.disabled = false,
            "backup" => opts.backup = true,
            "no-backup" => opts.backup = false,
            "weight" => match arg.and_then(|a| a.parse::<u32>().ok()) {
                Some(n) if n <= 256 => opts.weight = Some(n as u16),
                _ => issues.push(format!("`weight {}`: expected 0 to 256", arg.unwrap_or(""))),
            },
            "inter" => match time(arg).filter(|d| !d.is_zero()) {
                Some(d) => opts.inter = Some(d),
                None => issues.push(format!(
                    "`inter {}`: expected a time above 0",
                    arg.unwrap_or("")
                )),
            },
            "rise" | "fall" => match count(arg) {
                Some(n) if w == "rise" => opts.rise = Some(n),
                Some(n) => opts.fall = Some(n),
                None => issues.push(format!(
                    "`{w} {}`: expected a count from 1",
                    arg.unwrap_or("")
                )),
            },
            "slowstart" => match time(arg) {
                Some(d) => opts.slowstart = Some(d),
                None => issues.push(format!("`slowstart {}`: not a time", arg.unwrap_or(""))),
            },
            "port" => match arg.and_then(|a| a.parse::<u16>().ok()).filter(|p| *p > 0) {
                Some(port) => opts.check_port = Some(port),
                None => issues.push(format!("`port {}`: not a port", arg.unwrap_or(""))),
            },
            "addr" => issues.push(format!(
                "`addr {}`: a pointsman check's `address` is set per service or in an instance's registration, not per server",
                arg.unwrap_or("")
            )),
            "cookie" => issues.push(format!(
                "`cookie {}`: pointsman's sticky cookie holds the endpoint id (the server name)",
                arg.unwrap_or("")
            )),
            "fastinter" | "downinter" => issues.push(format!(
                "`{w}`: pointsman checks every `interval`, up or down"
            )),
            "maxconn" | "maxqueue" | "minconn" => issues.push(format!(
                "`{w}`: pointsman has no per-server connection limit or queue"
            )),
            "ssl" | "check-ssl" | "verify" | "ca-file" | "crt" | "sni" | "alpn" | "ciphers" => {
                issues.push(format!("`{w}`: {TLS}"))
            }
            _ => issues.push(format!("`{w}`: {NO_EQUIVALENT}")),
        }
    }
    issues
}

/// A TOML string.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A TOML key: bare when it can be.
fn key(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        s.to_string()
    } else {
        q(s)
    }
}

/// A line of the haproxy.cfg fit to be quoted in a comment.
fn comment_text(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Translator<'_> {
    fn push_block(
        &mut self,
        section: &Section,
        listeners: Vec<ListenerOut>,
        service: Option<ServiceOut>,
        notes: Vec<Note>,
    ) {
        self.blocks.push(Block {
            heading: format!(
                "{}:{}: {}",
                self.file,
                section.header.number,
                comment_text(&section.header.text)
            ),
            listeners,
            service,
            notes,
        });
    }

    fn global_section(&mut self, section: &Section) {
        let mut notes = Vec::new();
        for line in &section.lines {
            let arg = line.word(1);
            let n = match line.word(0) {
                "maxconn" => match arg.parse::<u64>() {
                    Ok(n) if n > 0 => {
                        self.global.max_connections = Some(n);
                        None
                    }
                    _ => Some(not(line, "not a count")),
                },
                "hard-stop-after" => match parse_time(arg) {
                    Some(d) => {
                        self.global.drain_timeout = Some(d);
                        None
                    }
                    None => Some(not(line, "not a time")),
                },
                "stats" if arg == "socket" => self.stats_socket(line),
                "stats" => Some(not(line, "the runtime API takes no such setting")),
                "nbthread" => Some(not(line, format!("pass `pointsman run --threads {}`", line.word(1)))),
                "nbproc" => Some(not(line, "pointsman is one process; see --threads")),
                "daemon" | "master-worker" | "pidfile" => Some(not(
                    line,
                    "pointsman runs in the foreground: let the service manager or container runtime run it",
                )),
                "chroot" => Some(not(
                    line,
                    "confine pointsman with its service manager or container (systemd RootDirectory=, a read-only root)",
                )),
                "user" | "group" | "uid" | "gid" => Some(not(
                    line,
                    "run pointsman as the user it should be (a systemd unit's User=, a container)",
                )),
                "log" | "log-send-hostname" | "log-tag" => Some(not(line, LOGS)),
                w if w.starts_with("ssl-") || w.starts_with("ca-base") || w.starts_with("crt-base") => {
                    Some(not(line, TLS))
                }
                w if w.starts_with("tune.") => Some(not(line, "pointsman has no tuning settings of HAProxy's")),
                _ => Some(not(line, NO_EQUIVALENT)),
            };
            notes.extend(n);
        }
        self.push_block(section, Vec::new(), None, notes);
    }

    fn stats_socket(&mut self, line: &Line) -> Option<Note> {
        let addr = line.word(2);
        let extra = line.words.len() > 3;
        let kept = if let Some(path) = addr
            .strip_prefix("unix@")
            .or_else(|| addr.starts_with('/').then_some(addr))
        {
            self.global.runtime_socket = Some(path.to_string());
            None
        } else {
            match parse_bind(addr) {
                Ok(a) if a.ip().is_loopback() => {
                    self.global.runtime_api = Some(a);
                    None
                }
                Ok(a) => Some(format!(
                    "{a} is not loopback: pointsman's runtime API on TCP listens on loopback only (use a Unix socket, or 127.0.0.1)"
                )),
                Err(e) => Some(e),
            }
        };
        match (kept, extra) {
            (Some(why), _) => Some(not(line, why)),
            (None, true) => Some(partly(
                line,
                "its options are not: the runtime API's Unix socket is mode 0600, and on TCP changes need `auth <admin token>`",
            )),
            (None, false) => None,
        }
    }

    /// A line of a defaults, frontend, backend or listen section.
    fn proxy_line(
        &mut self,
        kind: SectionKind,
        s: &mut Settings,
        p: &mut Proxy,
        line: &Line,
    ) -> Option<Note> {
        if let Some(e) = &line.error {
            return Some(not(line, e.to_string()));
        }
        let front = matches!(
            kind,
            SectionKind::Frontend | SectionKind::Listen | SectionKind::Defaults
        );
        let back = matches!(
            kind,
            SectionKind::Backend | SectionKind::Listen | SectionKind::Defaults
        );
        let w = |i| line.word(i);
        let only_back = || Some(not(line, "HAProxy reads this in backends only"));
        let only_front = || Some(not(line, "HAProxy reads this in frontends only"));
        match (w(0), w(1)) {
            ("mode", "http") => s.mode = Some(Mode::Http),
            ("mode", "tcp") => s.mode = Some(Mode::Tcp),
            ("mode", _) => return Some(not(line, "pointsman listeners are http or tcp")),
            ("bind", _) if !matches!(kind, SectionKind::Frontend | SectionKind::Listen) => return only_front(),
            ("bind", _) => return self.bind(p, line),
            ("acl", _) if kind == SectionKind::Defaults => return Some(not(line, "ACLs belong in frontends")),
            ("acl", name) => {
                if name.is_empty() {
                    return Some(not(line, "an ACL needs a name"));
                }
                let acl = parse_acl(line.words.get(2..).unwrap_or(&[]));
                let why = acl.as_ref().err().cloned();
                let entry = p.acls.entry(name.to_string()).or_insert_with(|| Ok(Vec::new()));
                match (entry, acl) {
                    (Ok(tests), Ok(more)) => tests.extend(more),
                    (entry, Err(why)) => *entry = Err(why),
                    (Err(_), Ok(_)) => {}
                }
                return why.map(|why| not(line, format!("{why}; rules that use ACL {name:?} are left out")));
            }
            ("use_backend", _) if !front || kind == SectionKind::Defaults => return only_front(),
            ("use_backend", _) => p.rules.push(line.clone()),
            ("default_backend", b) if front && !b.is_empty() => {
                s.default_backend = Some((b.to_string(), line.clone()));
            }
            ("default_backend", _) => return only_front(),
            ("balance", algo) => {
                if !back {
                    return only_back();
                }
                s.balance = Some(match algo {
                    "roundrobin" => "roundrobin",
                    "leastconn" => "leastconn",
                    "source" => "source",
                    "random" => "random",
                    "static-rr" => {
                        s.balance = Some("roundrobin");
                        return Some(partly(line, "as roundrobin (whose weights can also change at run time)"));
                    }
                    _ => return Some(not(line, "pointsman balances by roundrobin, leastconn, source, random or cookie; the service keeps roundrobin")),
                });
            }
            ("cookie", name) if back => {
                let mode = line.words.iter().skip(2).find(|w| matches!(w.as_str(), "insert" | "prefix" | "rewrite"));
                let Some(mode) = mode.map(String::as_str) else {
                    return Some(not(line, "pointsman's sticky cookie needs a mode: `insert`, `prefix` or `rewrite`"));
                };
                let mode = match mode {
                    "insert" => "insert",
                    "prefix" => "prefix",
                    _ => "rewrite",
                };
                s.cookie = Some((name.to_string(), mode));
                // `indirect` is how pointsman inserts anyway: the servers
                // never see its cookie and a bound client is not sent it
                // again.
                let rest: Vec<&str> = line.words[2..]
                    .iter()
                    .map(String::as_str)
                    .filter(|w| *w != mode && !(mode == "insert" && *w == "indirect"))
                    .collect();
                if !rest.is_empty() {
                    let what = match mode {
                        "insert" => format!("pointsman inserts `{name}=<server name>; Path=/`"),
                        "prefix" => format!("pointsman prefixes the servers' `{name}` with `<server name>~`"),
                        _ => format!("pointsman sets the servers' `{name}` to `<server name>`"),
                    };
                    return Some(partly(line, format!("{what}; {} not translated", rest.join(" "))));
                }
            }
            ("cookie", _) => return only_back(),
            ("server", _) if !matches!(kind, SectionKind::Backend | SectionKind::Listen) => return only_back(),
            ("server", name) => return self.server(s, p, name, line),
            ("default-server", _) => {
                let issues = server_options(&line.words[1..], &mut s.default_server);
                if !issues.is_empty() {
                    return Some(partly(line, issues.join("; ")));
                }
            }
            ("server-template", _) => {
                return Some(not(
                    line,
                    "register the instances in a registry (etcd, Consul, a directory) instead: see discovery/README.md",
                ))
            }
            ("option", "httpchk") => {
                let args = &line.words[2..];
                let mut c = HttpCheck::default();
                match args.len() {
                    0 => c.method = Some("OPTIONS".into()),
                    1 => c.uri = Some(args[0].clone()),
                    _ => {
                        c.method = Some(args[0].clone());
                        c.uri = Some(args[1].clone());
                        c.host = args.get(2).and_then(|v| host_header(v));
                    }
                }
                return set_httpchk(s, c, line);
            }
            ("http-check", "send") => return http_check_send(s, line),
            ("http-check", "expect") => match (w(2), w(3)) {
                ("status", code) => match parse_status(code) {
                    Some(range) => s.expect = Some(range),
                    None => return Some(not(line, "expected a status or a range such as 200-399")),
                },
                _ => return Some(not(line, "pointsman's HTTP check expects a status or a status range only")),
            },
            ("http-check", _) => return Some(not(line, "pointsman's HTTP check sends one request and expects a status")),
            ("option", "redispatch") => {
                return Some(built_in(line, "pointsman always tries a failed connect again on another endpoint"))
            }
            ("no", "option") if w(2) == "redispatch" => {
                return Some(not(line, "pointsman always tries a failed connect again on another endpoint"))
            }
            ("option", "forwardfor") => {
                return Some(built_in(line, "pointsman always sets X-Forwarded-For (appended to only for the peers in trusted_proxies)"))
            }
            ("option", "http-keep-alive") => {
                return Some(built_in(line, "pointsman keeps client and upstream connections alive"))
            }
            ("option", "httplog" | "tcplog") => {
                s.access_log = true;
                return Some(partly(line, "as access_log = true: one JSON line per request on stderr"));
            }
            ("option", "http-server-close" | "httpclose" | "forceclose") => {
                return Some(not(line, "pointsman keeps upstream connections alive, pooled per endpoint"))
            }
            ("option", "dontlognull" | "log-health-checks" | "logasap") | ("log", _) => return Some(not(line, LOGS)),
            ("option", c) if c.ends_with("-check") || c == "ssl-hello-chk" || c == "tcp-check" => {
                return Some(not(line, "pointsman checks by TCP connect or HTTP request only"))
            }
            ("timeout", which) => return timeout(s, kind, which, line),
            ("retries", n) if back => match n.parse::<u32>() {
                Ok(n) => s.retries = Some(n),
                Err(_) => return Some(not(line, "not a count")),
            },
            ("retry-on", _) if back => return retry_on(s, line),
            ("retries" | "retry-on", _) => return only_back(),
            ("maxconn", _) => {
                return Some(not(
                    line,
                    "pointsman limits client connections of all listeners together: [global] max_connections",
                ))
            }
            ("stats", what) => {
                p.stats |= matches!(what, "enable" | "uri");
                return Some(not(
                    line,
                    "pointsman's stats page is on its admin listener: http://<[global] admin>/stats",
                ))
            }
            ("monitor-uri", _) => {
                return Some(not(line, "pointsman answers /healthz and /readyz on its admin listener"))
            }
            ("http-request" | "http-response" | "tcp-request" | "tcp-response" | "redirect", _) => {
                return Some(not(line, "pointsman has no request or response rules"))
            }
            ("errorfile" | "errorloc" | "errorloc302" | "errorloc303" | "errorfiles", _) => {
                return Some(not(line, "pointsman's error answers are its own"))
            }
            _ => return Some(not(line, NO_EQUIVALENT)),
        }
        None
    }

    fn bind(&mut self, p: &mut Proxy, line: &Line) -> Option<Note> {
        let opts = &line.words[2.min(line.words.len())..];
        if opts.iter().any(|o| o == "ssl" || o == "crt") {
            return Some(not(line, TLS));
        }
        let mut problems = Vec::new();
        for addr in line.word(1).split(',') {
            match parse_bind(addr) {
                Ok(a) => match self.bound.get(&a) {
                    Some(by) => problems.push(format!("{a} is already bound by listener {by:?}")),
                    None if p.binds.iter().any(|(_, b)| *b == a) => {
                        problems.push(format!("{a} is bound twice in this section"))
                    }
                    None => p.binds.push((line.number, a)),
                },
                Err(e) => problems.push(e),
            }
        }
        if !opts.is_empty() {
            problems.push(format!("the bind options `{}` are not", opts.join(" ")));
        }
        match (
            problems.is_empty(),
            p.binds.iter().any(|(l, _)| *l == line.number),
        ) {
            (true, _) => None,
            (false, true) => Some(partly(line, problems.join("; "))),
            (false, false) => Some(not(line, problems.join("; "))),
        }
    }

    fn server(&mut self, s: &Settings, p: &mut Proxy, name: &str, line: &Line) -> Option<Note> {
        let address = match parse_server_address(line.word(2)) {
            Ok(a) => a,
            Err(why) => return Some(not(line, why)),
        };
        if name.is_empty() || name.contains('/') {
            return Some(not(line, "the server name cannot be an endpoint id"));
        }
        let mut opts = s.default_server.clone();
        let mut issues = server_options(line.words.get(3..).unwrap_or(&[]), &mut opts);
        if let (Some(port), Some(first)) = (
            opts.check_port,
            p.servers.iter().find_map(|sv| sv.opts.check_port),
        ) {
            if port != first {
                issues.push(format!(
                    "`port {port}`: a pointsman check port is the service's: the first server's, {first}, is used"
                ));
            }
        }
        if p.servers.iter().any(|sv| sv.name == name) {
            return Some(not(
                line,
                format!("a second server named {name:?} in this backend"),
            ));
        }
        p.servers.push(Server {
            name: name.to_string(),
            address,
            opts,
        });
        (!issues.is_empty()).then(|| partly(line, issues.join("; ")))
    }

    fn proxy_section(&mut self, section: &Section, defaults: &Settings) {
        let name = section.name.clone().unwrap_or_default();
        let mut s = defaults.clone();
        let mut p = Proxy::default();
        let mut notes = Vec::new();
        for line in &section.lines {
            notes.extend(self.proxy_line(section.kind, &mut s, &mut p, line));
        }
        if name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace) {
            notes.insert(
                0,
                not(
                    &section.header,
                    "the section needs a name without '/' to become a listener or service",
                ),
            );
            self.push_block(section, Vec::new(), None, notes);
            return;
        }
        if p.stats && p.servers.is_empty() && p.rules.is_empty() && s.default_backend.is_none() {
            notes.insert(
                0,
                not(
                    &section.header,
                    "a stats page: pointsman's is /stats on its admin listener ([global] admin), beside the admin API",
                ),
            );
            self.push_block(section, Vec::new(), None, notes);
            return;
        }
        let front = matches!(section.kind, SectionKind::Frontend | SectionKind::Listen);
        let back = matches!(section.kind, SectionKind::Backend | SectionKind::Listen);
        let mode = s.mode.unwrap_or(Mode::Tcp);
        self.access_log |= s.access_log && front;
        let default = match (&s.default_backend, section.kind) {
            (Some((b, line)), _) => {
                notes.extend(self.undefined(b, line));
                Some(b.clone())
            }
            (None, SectionKind::Listen) => Some(name.clone()),
            (None, _) => None,
        };
        let mut listeners = Vec::new();
        if front {
            if mode == Mode::Http {
                self.client_side_timeouts(&s, &name, section, &mut notes);
            }
            if mode == Mode::Tcp && default.is_none() && !p.binds.is_empty() {
                notes.push(not(
                    &section.header,
                    "a tcp listener needs a default_backend (the service its connections go to)",
                ));
            } else {
                for (i, (_, bind)) in p.binds.iter().enumerate() {
                    let mut lname = if i == 0 {
                        name.clone()
                    } else {
                        format!("{name}-{}", i + 1)
                    };
                    while self.listener_names.contains(&lname) {
                        lname.push('_');
                    }
                    self.listener_names.insert(lname.clone());
                    self.bound.insert(*bind, lname.clone());
                    listeners.push(ListenerOut {
                        name: lname,
                        bind: *bind,
                        mode,
                        default_service: default.clone(),
                    });
                }
            }
            let rules = std::mem::take(&mut p.rules);
            if mode == Mode::Tcp {
                notes.extend(rules.iter().map(|l| {
                    not(
                        l,
                        "a tcp listener sends every connection to its default_service",
                    )
                }));
            } else {
                self.compile_routes(&name, &p, &rules, default.as_deref(), &mut notes);
            }
        }
        let service = match back {
            true if !self.services.insert(name.clone()) => {
                notes.push(not(
                    &section.header,
                    format!("a second backend named {name:?}: the first is kept"),
                ));
                None
            }
            true => Some(self.service(&name, &s, &p)),
            false => None,
        };
        notes.sort_by_key(|n| n.line);
        self.push_block(section, listeners, service, notes);
    }

    fn client_side_timeouts(
        &mut self,
        s: &Settings,
        name: &str,
        section: &Section,
        notes: &mut Vec<Note>,
    ) {
        let idle = s.keep_alive.or(s.client);
        let mine = (s.http_request, idle);
        match &self.client_side {
            None => self.client_side = Some((mine.0, mine.1, name.to_string())),
            Some((h, i, first)) if (*h, *i) != mine && (mine.0.is_some() || mine.1.is_some()) => {
                notes.push(partly(
                    &section.header,
                    format!("its client timeouts differ from frontend {first:?}'s, and pointsman has one header_read_timeout and idle_timeout for all listeners: {first:?}'s are kept"),
                ));
            }
            Some(_) => {}
        }
    }

    fn service(&mut self, name: &str, s: &Settings, p: &Proxy) -> ServiceOut {
        let (balance, cookie) = (s.balance, s.cookie.clone());
        let checked: Vec<&Server> = p.servers.iter().filter(|sv| sv.opts.check).collect();
        let check = checked.first().map(|first| {
            let mut fields = Vec::new();
            if let Some(c) = &s.httpchk {
                fields.push(format!("http = {}", q(c.uri.as_deref().unwrap_or("/"))));
                if let Some(m) = c.method.as_deref().filter(|m| *m != "GET") {
                    fields.push(format!("method = {}", q(m)));
                }
                if let Some(h) = &c.host {
                    fields.push(format!("host = {}", q(h)));
                }
                if let Some((lo, hi)) = s.expect {
                    fields.push(format!("expect_status = [{lo}, {hi}]"));
                }
            }
            if let Some(d) = first.opts.inter {
                fields.push(format!("interval = {}", q(&format_duration(d))));
            }
            if let Some(d) = s.check_timeout {
                fields.push(format!("timeout = {}", q(&format_duration(d))));
            }
            if let Some(n) = first.opts.rise {
                fields.push(format!("rise = {n}"));
            }
            if let Some(n) = first.opts.fall {
                fields.push(format!("fall = {n}"));
            }
            if let Some(port) = checked.iter().find_map(|sv| sv.opts.check_port) {
                fields.push(format!("port = {port}"));
            }
            if fields.is_empty() {
                "{} # a TCP connect check, as HAProxy's `check` alone".to_string()
            } else {
                format!("{{ {} }}", fields.join(", "))
            }
        });
        let endpoints = p
            .servers
            .iter()
            .map(|sv| {
                let mut e = format!("{{ id = {}, address = {}", q(&sv.name), q(&sv.address));
                if let Some(w) = sv.opts.weight {
                    e += &format!(", weight = {w}");
                }
                if sv.opts.disabled {
                    e += ", state = \"maint\"";
                }
                if sv.opts.backup {
                    e += ", backup = true";
                }
                e + " }"
            })
            .collect();
        ServiceOut {
            name: name.to_string(),
            balance,
            cookie,
            connect: s.connect,
            request: s.server,
            check,
            attempts: s.retries.map(|r| r.saturating_add(1)),
            on_status: s.retry_on.clone(),
            slow_start: p.servers.iter().find_map(|sv| sv.opts.slowstart),
            endpoints,
        }
    }

    /// The frontend's `use_backend` rules as routes.
    fn compile_routes(
        &mut self,
        frontend: &str,
        p: &Proxy,
        lines: &[Line],
        default: Option<&str>,
        notes: &mut Vec<Note>,
    ) {
        let mut rules = Vec::new();
        for line in lines {
            match self.rule(p, line) {
                Ok((rule, partial)) => {
                    if let Target::Service(b) = &rule.target {
                        notes.extend(self.undefined(b, line));
                    }
                    notes.extend(partial.map(|why| partly(line, why)));
                    rules.push(rule);
                }
                Err(why) => notes.push(not(
                    line,
                    format!("{why}; the requests it would take go to the rules after it"),
                )),
            }
        }
        if rules.is_empty() {
            return;
        }
        let default_target = default
            .map(|d| Target::Service(d.to_string()))
            .unwrap_or(Target::Nothing);
        let (compiled, unexpressed) = routes::compile(&rules, &default_target);
        for u in unexpressed {
            let at = lines.first().map(|l| l.number).unwrap_or(0);
            notes.push(Note {
                line: at,
                text: format!(
                    "requests for {} under {}",
                    u.host.as_deref().unwrap_or("any host"),
                    u.path_prefix
                ),
                kind: NoteKind::NotTranslated,
                why: "HAProxy has no backend for them (503), and a route cannot say \"none\": they go where the less specific route sends them".into(),
            });
        }
        let text_of = |n: usize| {
            lines
                .iter()
                .find(|l| l.number == n)
                .map(|l| comment_text(&l.text))
                .unwrap_or_default()
        };
        let routes: Vec<RouteOut> = compiled
            .into_iter()
            .enumerate()
            .map(|(i, r)| RouteOut {
                name: format!("{frontend}-{}", i + 1),
                comment: match r.rule_line {
                    Some(n) => format!("{}:{n}: {}", self.file, text_of(n)),
                    None => format!(
                        "the default_backend, ahead of a less specific route{}",
                        if r.host.is_some() {
                            " for other hosts"
                        } else {
                            ""
                        }
                    ),
                },
                route: r,
            })
            .collect();
        if !routes.is_empty() {
            if let (Some((other, _, _)), Some(first)) = (self.routes.first(), lines.first()) {
                notes.push(partly(
                    first,
                    format!("pointsman's routes apply to every HTTP listener: these and frontend {other:?}'s are one routing table"),
                ));
            }
            let first_line = lines.first().map(|l| l.number).unwrap_or(0);
            self.routes.push((frontend.to_string(), first_line, routes));
        }
    }

    /// A `use_backend` line as a rule; a partial translation says what is
    /// left out.
    fn rule(&mut self, p: &Proxy, line: &Line) -> Result<(Rule, Option<String>), String> {
        let target_word = line.word(1);
        let mut partial = None;
        let target = if let Some(expr) = target_word
            .strip_prefix("%[")
            .and_then(|e| e.strip_suffix(']'))
        {
            let (target, why) = self.map_target(expr)?;
            partial = why;
            target
        } else if target_word.contains("%[") || target_word.is_empty() {
            return Err(
                "a backend name built from the request: only %[<fetch>,map(<file>)] translates"
                    .into(),
            );
        } else {
            Target::Service(target_word.to_string())
        };
        let condition = match line.words.get(2).map(String::as_str) {
            None => None,
            Some(kw @ ("if" | "unless")) => {
                Some(parse_condition(kw == "unless", &line.words[3..], &p.acls)?)
            }
            Some(other) => return Err(format!("{other:?}: expected `if` or `unless`")),
        };
        Ok((
            Rule {
                line: line.number,
                condition,
                target,
            },
            partial,
        ))
    }

    /// `<fetch>[,lower],map(<file>[,<default>])` as a map target.
    fn map_target(&mut self, expr: &str) -> Result<(Target, Option<String>), String> {
        let parts = split_top(expr);
        let (fetch, rest) = parts.split_first().ok_or("an empty expression")?;
        let (last, convs) = rest.split_last().ok_or("no map(<file>) converter")?;
        let args = call(last, "map")
            .or_else(|| call(last, "map_str"))
            .ok_or("the last converter is not map(<file>)")?;
        let (file, default) = match args.split_once(',') {
            Some((f, d)) => (f.trim(), Some(d.trim().to_string())),
            None => (args.trim(), None),
        };
        let lower = |h: &str| h.eq_ignore_ascii_case("host");
        let key = match *fetch {
            f if call(f, "req.hdr").or_else(|| call(f, "hdr")).is_some_and(lower) => "req.host".to_string(),
            "path" => "req.path".to_string(),
            f if call(f, "str").is_some() => call(f, "str").unwrap_or_default().to_string(),
            f => match call(f, "req.hdr").or_else(|| call(f, "hdr")) {
                Some(h) => format!("req.hdr({h})"),
                None => match call(f, "req.cook").or_else(|| call(f, "cook")) {
                    Some(c) => format!("req.cookie({c})"),
                    None => return Err(format!("the fetch {f:?}: a map key is req.hdr(<name>), path, req.cook(<name>) or str(<key>)")),
                },
            },
        };
        let mut partial = None;
        for c in convs {
            match *c {
                "lower" if key == "req.host" => {}
                c if key == "req.host"
                    && call(c, "field").is_some_and(|a| a.replace(' ', "") == "1,:") => {}
                "lower" => {
                    partial = Some(
                        "`lower` is not applied to the key (only the host is lower-cased)"
                            .to_string(),
                    )
                }
                c => {
                    return Err(format!(
                        "the converter {c:?}: only lower and map(<file>) translate"
                    ))
                }
            }
        }
        if key == "req.host" {
            partial.get_or_insert_with(|| {
                "the key is the host without its port (as with field(1,:))".into()
            });
        }
        pointsman_discovery::route::MapKey::parse(&key)?;
        let map = self.load_map(file);
        Ok((Target::Map { map, key, default }, partial))
    }

    /// The map a file becomes; its entries when the file can be read.
    fn load_map(&mut self, file: &str) -> String {
        let mut name = map_name(file);
        while let Some((other, _)) = self.maps.get(&name) {
            if other == file {
                return name;
            }
            name.push('_');
        }
        let entries = (self.read_map)(file).map(|found| {
            let entries = found
                .text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(|l| {
                    let (k, v) = l.split_once(char::is_whitespace)?;
                    Some((k.to_string(), v.trim().to_string()))
                })
                .collect();
            (found.shown, entries)
        });
        match entries {
            Some((shown, entries)) => {
                let from = if shown == file {
                    shown
                } else {
                    format!("{file} (read from {shown})")
                };
                self.maps.insert(name.clone(), (from, entries));
            }
            None => {
                self.maps
                    .insert(name.clone(), (file.to_string(), Vec::new()));
            }
        }
        name
    }

    /// A note when `backend` is not defined in the file.
    fn undefined(&self, backend: &str, line: &Line) -> Option<Note> {
        (!self.backends.contains(backend)).then(|| {
            partly(
                line,
                format!("there is no backend {backend:?} in this file: its requests get 503 until a registry (or a [services] table) provides the service"),
            )
        })
    }

    fn finish(mut self) -> Translation {
        let mut out = String::new();
        let mut notes: Vec<Note> = Vec::new();
        out += &format!(
            "# pointsman config translated from {} by `pointsman import`.\n\
             # Lines kept as comments below are not (or only partly) translated, and say why.\n\
             # Check it with `pointsman check --config <file>`; see \"Coming from HAProxy\" in\n\
             # src/control/CONFIG.md for what translates.\n\n",
            self.file
        );

        // Settings every service shares move to [global].
        let services: Vec<&ServiceOut> = self
            .blocks
            .iter()
            .filter_map(|b| b.service.as_ref())
            .collect();
        let shared = |f: &dyn Fn(&ServiceOut) -> Option<Duration>| {
            let first = services.first().and_then(|s| f(s))?;
            services
                .iter()
                .all(|s| f(s) == Some(first))
                .then_some(first)
        };
        let connect = shared(&|s| s.connect);
        let request = shared(&|s| s.request);
        let mut global = Vec::new();
        if let Some(n) = self.global.max_connections {
            global.push(format!("max_connections = {n}"));
        }
        if let Some(d) = self.global.drain_timeout {
            global.push(format!("drain_timeout = {}", q(&format_duration(d))));
        }
        if let Some((h, i, _)) = &self.client_side {
            if let Some(h) = h {
                global.push(format!("header_read_timeout = {}", q(&format_duration(*h))));
            }
            if let Some(i) = i {
                global.push(format!("idle_timeout = {}", q(&format_duration(*i))));
            }
        }
        if let Some(d) = connect {
            global.push(format!("connect_timeout = {}", q(&format_duration(d))));
        }
        if let Some(d) = request {
            global.push(format!("request_timeout = {}", q(&format_duration(d))));
        }
        if self.access_log {
            global.push("access_log = true".into());
        }
        if let Some(p) = &self.global.runtime_socket {
            global.push(format!("runtime_socket = {}", q(p)));
        }
        if let Some(a) = self.global.runtime_api {
            global.push(format!("runtime_api = {}", q(&a.to_string())));
        }
        if !global.is_empty() {
            out += "[global]\n";
            for l in global {
                out += &l;
                out.push('\n');
            }
            out.push('\n');
        }

        let (mut listeners, mut services_n) = (0, 0);
        for block in &mut self.blocks {
            if !block.heading.is_empty() {
                out += &format!("# {}\n", block.heading);
            }
            for l in &block.listeners {
                listeners += 1;
                out += "[[listeners]]\n";
                out += &format!("name = {}\nbind = {}\n", q(&l.name), q(&l.bind.to_string()));
                out += match l.mode {
                    Mode::Http => "mode = \"http\"\n",
                    Mode::Tcp => "mode = \"tcp\"\n",
                };
                if let Some(d) = &l.default_service {
                    out += &format!("default_service = {}\n", q(d));
                }
                out.push('\n');
            }
            if let Some(s) = &block.service {
                services_n += 1;
                out += &format!("[services.{}]\n", key(&s.name));
                if let Some(b) = s.balance {
                    out += &format!("balance = {}\n", q(b));
                }
                if let Some((name, mode)) = &s.cookie {
                    out += "sticky = \"cookie\"\n";
                    out += &format!("cookie = {{ name = {}, mode = {} }}\n", q(name), q(mode));
                }
                if let Some(d) = s.connect.filter(|_| connect.is_none()) {
                    out += &format!("connect_timeout = {}\n", q(&format_duration(d)));
                }
                if let Some(d) = s.request.filter(|_| request.is_none()) {
                    out += &format!("request_timeout = {}\n", q(&format_duration(d)));
                }
                if let Some(c) = &s.check {
                    out += &format!("check = {c}\n");
                }
                let mut retry = Vec::new();
                if let Some(a) = s.attempts {
                    retry.push(format!("attempts = {a}"));
                }
                if let Some(on) = &s.on_status {
                    let on: Vec<String> = on.iter().map(u16::to_string).collect();
                    retry.push(format!("on_status = [{}]", on.join(", ")));
                }
                if !retry.is_empty() {
                    out += &format!("retry = {{ {} }}\n", retry.join(", "));
                }
                if let Some(d) = s.slow_start {
                    out += &format!("slow_start = {}\n", q(&format_duration(d)));
                }
                if s.endpoints.is_empty() {
                    out += "# no servers: endpoints come from a registry (etcd, Consul, a directory)\n";
                } else {
                    out += "endpoints = [\n";
                    for e in &s.endpoints {
                        out += &format!("  {e},\n");
                    }
                    out += "]\n";
                }
            }
            for n in &block.notes {
                out += &note_comment(self.file, n);
            }
            out.push('\n');
            notes.append(&mut block.notes);
        }

        let mut routes_n = 0;
        for (frontend, line, routes) in &self.routes {
            out += &format!(
                "# Routes of frontend {frontend:?} ({}:{line}), worked out from its use_backend rules\n\
                 # in their order; pointsman's routes apply to every HTTP listener.\n",
                self.file
            );
            for r in routes {
                routes_n += 1;
                out += &format!("# {}\n[routes.{}]\n", r.comment, key(&r.name));
                if let Some(h) = &r.route.host {
                    out += &format!("host = {}\n", q(h));
                }
                if r.route.path_prefix != "/" {
                    out += &format!("path_prefix = {}\n", q(&r.route.path_prefix));
                }
                match &r.route.target {
                    Target::Service(s) => out += &format!("service = {}\n", q(s)),
                    Target::Map { map, key, default } => {
                        out += &format!("map = {}\nmap_key = {}\n", q(map), q(key));
                        if let Some(d) = default {
                            out += &format!("map_default = {}\n", q(d));
                        }
                    }
                    Target::Nothing => {}
                }
                out.push('\n');
            }
        }
        for (name, (file, entries)) in &self.maps {
            if entries.is_empty() {
                out += &format!(
                    "# The map file {} was not found: add its entries here (key = \"backend\"),\n\
                     # or at run time (`add map {name} <key> <backend>` on the runtime API).\n",
                    comment_text(file)
                );
            } else {
                out += &format!("# From {}\n", comment_text(file));
            }
            out += &format!("[maps.{}]\n", key(name));
            for (k, v) in entries {
                out += &format!("{} = {}\n", key(k), q(v));
            }
            out.push('\n');
        }
        while out.contains("\n\n\n") {
            out = out.replace("\n\n\n", "\n\n");
        }
        while out.ends_with("\n\n") {
            out.pop();
        }
        Translation {
            toml: out,
            notes,
            listeners,
            services: services_n,
            routes: routes_n,
            maps: self.maps.len(),
        }
    }
}

fn note_comment(file: &str, n: &Note) -> String {
    format!(
        "# {file}:{}: {} -- {}: {}\n",
        n.line,
        comment_text(&n.text),
        n.kind.as_str(),
        comment_text(&n.why)
    )
}

/// `http-check send meth M uri U [ver V] [hdr Host H]`.
fn http_check_send(s: &mut Settings, line: &Line) -> Option<Note> {
    let mut c = s.httpchk.clone().unwrap_or_default();
    let mut left = Vec::new();
    let words = &line.words[2..];
    let mut i = 0;
    while i < words.len() {
        let arg = words.get(i + 1).cloned();
        match words[i].as_str() {
            "meth" => c.method = arg,
            "uri" => c.uri = arg,
            "ver" => {}
            "hdr"
                if arg
                    .as_deref()
                    .is_some_and(|h| h.eq_ignore_ascii_case("host")) =>
            {
                c.host = words.get(i + 2).cloned();
                i += 1;
            }
            other => left.push(other.to_string()),
        }
        i += 2;
    }
    if let Some(n) = set_httpchk(s, c, line) {
        return Some(n);
    }
    (!left.is_empty()).then(|| {
        partly(
            line,
            format!(
                "`{}` not translated: pointsman's check sends method, path and Host",
                left.join(" ")
            ),
        )
    })
}

/// Keeps an HTTP check whose method and path pointsman can send.
fn set_httpchk(s: &mut Settings, c: HttpCheck, line: &Line) -> Option<Note> {
    let method = c.method.clone().unwrap_or_default();
    if !method.is_empty() && !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Some(not(line, format!("{method:?} is not an HTTP method")));
    }
    if let Some(uri) = c.uri.as_deref().filter(|u| !u.starts_with('/')) {
        return Some(not(
            line,
            format!("{uri:?} is not a path: pointsman's check requests a path, e.g. /healthz"),
        ));
    }
    s.httpchk = Some(c);
    None
}

fn timeout(s: &mut Settings, kind: SectionKind, which: &str, line: &Line) -> Option<Note> {
    let Some(d) = parse_time(line.word(2)).filter(|d| !d.is_zero() || which != "check") else {
        return Some(not(line, format!("{:?} is not a time", line.word(2))));
    };
    let back = matches!(
        kind,
        SectionKind::Backend | SectionKind::Listen | SectionKind::Defaults
    );
    let front = matches!(
        kind,
        SectionKind::Frontend | SectionKind::Listen | SectionKind::Defaults
    );
    let slot = match which {
        "connect" if back => &mut s.connect,
        "server" if back => &mut s.server,
        "check" if back => &mut s.check_timeout,
        "client" if front => &mut s.client,
        "http-request" if front => &mut s.http_request,
        "http-keep-alive" if front => &mut s.keep_alive,
        "connect" | "server" | "check" => {
            return Some(not(line, "HAProxy reads this in backends only"))
        }
        "client" | "http-request" | "http-keep-alive" => {
            return Some(not(line, "HAProxy reads this in frontends only"))
        }
        "queue" => {
            return Some(not(
                line,
                "pointsman has no queue: clients over max_connections wait in the kernel's backlog",
            ))
        }
        "tunnel" | "client-fin" | "server-fin" | "tarpit" => return Some(not(line, NO_EQUIVALENT)),
        _ => return Some(not(line, "not a timeout HAProxy knows")),
    };
    *slot = Some(d);
    None
}

/// `retry-on`: the statuses become `retry.on_status`.
fn retry_on(s: &mut Settings, line: &Line) -> Option<Note> {
    let mut statuses = Vec::new();
    let mut left = Vec::new();
    for w in &line.words[1..] {
        match w.as_str() {
            "none" => s.retries = Some(0),
            // pointsman always retries a failed connect.
            "conn-failure" => {}
            w => match w.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => statuses.push(code),
                _ => left.push(w.to_string()),
            },
        }
    }
    s.retry_on = Some(statuses);
    (!left.is_empty()).then(|| {
        partly(line, format!(
            "`{}` not translated: pointsman retries failed connects, resets before an answer, and the statuses given",
            left.join(" ")
        ))
    })
}

#[cfg(test)]
mod tests;
