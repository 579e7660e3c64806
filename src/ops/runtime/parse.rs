//! Command lines into [`Request`]s, and the `help` text. Pure: no table,
//! no sockets.

use std::fmt::Write as _;

use pointsman_discovery::registration::MAX_WEIGHT;
use pointsman_discovery::AdminState;

/// Splits a line into commands (at `;`) and each command into words (at
/// spaces and tabs). A backslash makes the next character part of the word,
/// as in HAProxy: `\;` and `\ ` do not split. An empty command (an empty
/// line, `a;;b`, a trailing `;`) stays in the list: HAProxy answers it
/// with the command list.
pub fn split_line(line: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                in_word = true;
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            ';' | ' ' | '\t' | '\r' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                if c == ';' {
                    commands.push(std::mem::take(&mut words));
                }
            }
            _ => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    commands.push(words);
    commands
}

/// `<backend>/<server>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerRef {
    pub backend: String,
    pub server: String,
}

/// A weight as written: absolute, or a share of the initial weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightArg {
    Absolute(u16),
    /// Percent of the initial weight (at most 25600, as HAProxy caps it).
    Percent(u32),
}

/// A map as named in a command: by name, or `#<id>` from `show map`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapRef {
    Name(String),
    Id(usize),
}

/// HAProxy's output formats for `show stat` and `show info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// CSV for `show stat`, `Name: value` lines for `show info`.
    #[default]
    Plain,
    Typed,
    Json,
}

/// Which rows `show stat` prints, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatFilter {
    pub format: Format,
    /// Only servers that are not down or in maintenance.
    pub up: bool,
    /// No servers in maintenance.
    pub no_maint: bool,
    /// A proxy (frontend or backend) by name or id; `None`: all.
    pub proxy: Option<String>,
    /// Row types: 1 frontends, 2 backends, 4 servers.
    pub types: u8,
    /// A server id; `None`: all.
    pub sid: Option<usize>,
}

impl Default for StatFilter {
    fn default() -> Self {
        StatFilter {
            format: Format::Plain,
            up: false,
            no_maint: false,
            proxy: None,
            types: 7,
            sid: None,
        }
    }
}

/// One parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `auth <token>`: allows changes on a TCP connection.
    Auth(String),
    Help(Vec<String>),
    Prompt,
    Quit,
    ShowStat(StatFilter),
    ShowInfo(Format),
    ShowVersion,
    /// `show errors [<proxy>] [request|response]`: the proxy, if named.
    ShowErrors(Option<String>),
    GetMap {
        map: MapRef,
        key: String,
    },
    /// `set timeout cli <delay>`: this session's idle timeout.
    SetTimeoutCli(std::time::Duration),
    /// `clear counters [all]`.
    ClearCounters {
        all: bool,
    },
    /// `shutdown sessions server <b>/<s>`.
    ShutdownSessions(ServerRef),
    /// `enable health <b>/<s>` (true) or `disable health` (false).
    Health(ServerRef, bool),
    ShowServersState(Option<String>),
    ShowServersConn(Option<String>),
    ShowBackend,
    ShowMap(Option<MapRef>),
    GetWeight(ServerRef),
    SetState(ServerRef, AdminState),
    /// `enable server`: undoes a local `disable`, so the registry's state
    /// applies again (pinned ready only if the registry does not say so).
    EnableServer(ServerRef),
    SetWeight(ServerRef, WeightArg),
    /// `set maxconn server <b>/<s> <n>`: requests in flight at most (0:
    /// no limit), on this proxy.
    SetMaxconnServer(ServerRef, u32),
    SetMap {
        map: MapRef,
        key: String,
        value: String,
    },
    AddMap {
        map: MapRef,
        key: String,
        value: String,
    },
    DelMap {
        map: MapRef,
        key: String,
    },
    ClearMap(MapRef),
}

impl Request {
    /// Whether the command changes state (and so needs `auth` on TCP).
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            Request::SetState(..)
                | Request::EnableServer(..)
                | Request::SetWeight(..)
                | Request::SetMaxconnServer(..)
                | Request::ClearCounters { .. }
                | Request::ShutdownSessions(_)
                | Request::Health(..)
                | Request::SetMap { .. }
                | Request::AddMap { .. }
                | Request::DelMap { .. }
                | Request::ClearMap(_)
        )
    }
}

/// Whether `line` starts like an HTTP request (`POST / HTTP/1.1`): what a
/// browser sends when a page posts to the runtime API's port. No runtime
/// command starts with an upper-case method name.
pub fn looks_like_http(line: &str) -> bool {
    const METHODS: &[&str] = &[
        "GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "PRI",
    ];
    let line = line.trim_start();
    let method = line.split([' ', '\t']).next().unwrap_or("");
    METHODS.contains(&method) && line.len() > method.len()
}

const REQUIRE_SERVER: &str = "Require 'backend/server'.\n";
pub(super) const UNKNOWN_MAP: &str = "Unknown map identifier. Please use #<id> or <file>.\n";
const SET_SERVER_USAGE: &str =
    "usage: set server <backend>/<server> state ready|drain|maint | weight <weight>[%]\n";
const BAD_STATE: &str = "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n";
const REQUIRE_WEIGHT: &str = "Require <weight> or <weight%>.\n";

/// Parses one command's words. `Err` holds the answer for the client: what
/// is wrong and, where it helps, the usage.
pub fn parse(words: &[String]) -> Result<Request, String> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["auth", token] => Ok(Request::Auth(token.to_string())),
        ["auth", ..] => Err("'auth' expects the admin token: auth <token>\n".into()),
        ["help", rest @ ..] => Ok(Request::Help(rest.iter().map(|s| s.to_string()).collect())),
        ["prompt"] => Ok(Request::Prompt),
        ["quit"] => Ok(Request::Quit),
        ["prompt" | "quit", ..] => Err(format!("'{}' takes no argument.\n", w[0])),
        ["show", "stat", rest @ ..] => parse_stat(rest).map(Request::ShowStat),
        ["show", "info", rest @ ..] => parse_info(rest).map(Request::ShowInfo),
        ["show", "version"] => Ok(Request::ShowVersion),
        ["show", "version", ..] => Err("'show version' takes no argument.\n".into()),
        ["show", "errors", rest @ ..] => {
            let mut proxy = None;
            for a in rest {
                match *a {
                    "request" | "response" => {}
                    p if proxy.is_none() => proxy = (p != "-1").then(|| p.to_string()),
                    _ => {
                        return Err("usage: show errors [<iid>|<proxy>] [request|response]\n".into())
                    }
                }
            }
            Ok(Request::ShowErrors(proxy))
        }
        ["get", "map", rest @ ..] => match rest {
            [map, key] => {
                no_version(map)?;
                Ok(Request::GetMap {
                    map: map_ref(map),
                    key: key.to_string(),
                })
            }
            _ => Err("Missing map identifier and/or key.\n".into()),
        },
        ["set", "timeout", "cli", rest @ ..] => match rest {
            [delay] => parse_delay(delay)
                .map(Request::SetTimeoutCli)
                .ok_or_else(|| "Invalid timeout value.\n".to_string()),
            _ => Err("Expects an integer value.\n".into()),
        },
        ["set", "timeout", ..] => Err("'set timeout' only supports 'cli'.\n".into()),
        ["clear", "counters"] => Ok(Request::ClearCounters { all: false }),
        ["clear", "counters", "all"] => Ok(Request::ClearCounters { all: true }),
        ["clear", "counters", ..] => Err("usage: clear counters [all]\n".into()),
        ["shutdown", "sessions", "server", rest @ ..] => {
            let s = server_ref(rest.first().copied())?;
            Ok(Request::ShutdownSessions(s))
        }
        [verb @ ("disable" | "enable"), "health", rest @ ..] => {
            let s = server_ref(rest.first().copied())?;
            Ok(Request::Health(s, *verb == "enable"))
        }
        // Words after the backend are ignored, as HAProxy does: scripts
        // written for it pass some (`show servers conn blue $`).
        ["show", "servers", "state", rest @ ..] => Ok(Request::ShowServersState(
            rest.first().map(|s| s.to_string()),
        )),
        ["show", "servers", "conn", rest @ ..] => Ok(Request::ShowServersConn(
            rest.first().map(|s| s.to_string()),
        )),
        ["show", "backend"] => Ok(Request::ShowBackend),
        ["show", "backend", ..] => Err("'show backend' takes no argument.\n".into()),
        ["show", "map"] => Ok(Request::ShowMap(None)),
        ["show", "map", map] => {
            no_version(map)?;
            Ok(Request::ShowMap(Some(map_ref(map))))
        }
        ["show", "map", ..] => Err("usage: show map [<map>]\n".into()),
        ["get", "weight", rest @ ..] => {
            let s = server_ref(rest.first().copied())?;
            if rest.len() > 1 {
                return Err("usage: get weight <backend>/<server>\n".into());
            }
            Ok(Request::GetWeight(s))
        }
        [verb @ ("disable" | "enable"), "server", rest @ ..] => {
            let s = server_ref(rest.first().copied())?;
            if rest.len() > 1 {
                return Err(format!("usage: {verb} server <backend>/<server>\n"));
            }
            if *verb == "disable" {
                Ok(Request::SetState(s, AdminState::Maint))
            } else {
                Ok(Request::EnableServer(s))
            }
        }
        ["set", "server", rest @ ..] => parse_set_server(rest),
        ["set", "maxconn", "server", rest @ ..] => {
            let s = server_ref(rest.first().copied())?;
            // HAProxy's words for each way the number can be wrong.
            match rest.get(1).copied() {
                None | Some("") => Err("Require <maxconn>.\n".into()),
                Some(n) if !n.starts_with(|c: char| c.is_ascii_digit()) => {
                    // HAProxy ends these two without a newline of their own.
                    Err("maxconn string empty or preceded by garbage".into())
                }
                Some(n) => match n.parse::<u32>() {
                    Ok(n) => Ok(Request::SetMaxconnServer(s, n)),
                    Err(_) => Err("Trailing garbage in maxconn string".into()),
                },
            }
        }
        ["set", "weight", rest @ ..] => {
            let s = server_ref(rest.first().copied())?;
            match rest.get(1..) {
                Some([w]) => Ok(Request::SetWeight(s, parse_weight(w)?)),
                Some([]) | None => Err(REQUIRE_WEIGHT.into()),
                Some(_) => Err("usage: set weight <backend>/<server> <weight>[%]\n".into()),
            }
        }
        ["set", "map", rest @ ..] => match rest {
            [map, key, value] => {
                no_version(map)?;
                Ok(Request::SetMap {
                    map: map_ref(map),
                    key: key.to_string(),
                    value: value.to_string(),
                })
            }
            _ => Err("'set map' expects three parameters: map identifier, key and value.\n".into()),
        },
        ["add", "map", rest @ ..] => match rest {
            [map, key, value] => {
                no_version(map)?;
                Ok(Request::AddMap {
                    map: map_ref(map),
                    key: key.to_string(),
                    value: value.to_string(),
                })
            }
            _ => Err(
                "'add map' expects three parameters: map identifier, key and value \
                 (payloads are not supported).\n"
                    .into(),
            ),
        },
        ["del", "map", rest @ ..] => match rest {
            [map, key] => {
                no_version(map)?;
                Ok(Request::DelMap {
                    map: map_ref(map),
                    key: key.to_string(),
                })
            }
            _ => Err("This command expects two parameters: map identifier and key.\n".into()),
        },
        ["clear", "map", rest @ ..] => match rest {
            [map] => {
                no_version(map)?;
                Ok(Request::ClearMap(map_ref(map)))
            }
            [] => Err("Missing map identifier.\n".into()),
            _ => Err("usage: clear map <map>\n".into()),
        },
        _ => Err(unknown_command(&w)),
    }
}

/// HAProxy's map versions (`@<ver>`) are not kept here.
fn no_version(map: &str) -> Result<(), String> {
    if map.starts_with('@') {
        return Err(
            "Map versions (@<ver>) are not supported: every change applies at once.\n".into(),
        );
    }
    Ok(())
}

fn server_ref(arg: Option<&str>) -> Result<ServerRef, String> {
    let (backend, server) = arg
        .and_then(|a| a.split_once('/'))
        .ok_or_else(|| REQUIRE_SERVER.to_string())?;
    Ok(ServerRef {
        backend: backend.to_string(),
        server: server.to_string(),
    })
}

fn parse_set_server(rest: &[&str]) -> Result<Request, String> {
    let s = server_ref(rest.first().copied())?;
    match rest.get(1..).unwrap_or_default() {
        ["state", state] => {
            let state = match *state {
                "ready" => AdminState::Ready,
                "drain" => AdminState::Drain,
                "maint" => AdminState::Maint,
                _ => return Err(BAD_STATE.into()),
            };
            Ok(Request::SetState(s, state))
        }
        ["state"] => Err(BAD_STATE.into()),
        ["weight", w] => Ok(Request::SetWeight(s, parse_weight(w)?)),
        ["weight"] => Err(REQUIRE_WEIGHT.into()),
        [opt @ ("state" | "weight"), ..] => Err(format!(
            "'set server <srv> {opt}' takes one value.\n{SET_SERVER_USAGE}"
        )),
        [opt @ ("addr" | "fqdn" | "check-addr" | "check-port" | "ssl"), ..] => Err(format!(
            "'set server <srv> {opt}' is not supported: addresses and checks come from the \
             service registry.\n{SET_SERVER_USAGE}"
        )),
        _ => Err(SET_SERVER_USAGE.into()),
    }
}

/// A weight as HAProxy reads it: a number, then an optional `%`.
pub fn parse_weight(s: &str) -> Result<WeightArg, String> {
    let digits_from = usize::from(s.starts_with(['-', '+']));
    let digits_len = s[digits_from..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    if digits_len == 0 {
        return Err("Empty weight string empty or preceded by garbage.\n".into());
    }
    let end = digits_from + digits_len;
    // Only digits and a sign: the one failure left is overflow.
    let n: i64 = s[..end].parse().unwrap_or(if s.starts_with('-') {
        i64::MIN
    } else {
        i64::MAX
    });
    match &s[end..] {
        "%" if n < 0 => Err("Relative weight must be positive.\n".into()),
        "%" => Ok(WeightArg::Percent(n.min(25_600) as u32)),
        _ if n < 0 || n > i64::from(MAX_WEIGHT) => Err(format!(
            "Absolute weight can only be between 0 and {MAX_WEIGHT} inclusive.\n"
        )),
        "" => Ok(WeightArg::Absolute(n as u16)),
        _ => Err("Trailing garbage in weight string.\n".into()),
    }
}

/// The map a command names. `#<id>` is an id from `show map`. A name with
/// a `/` is a file path as HAProxy takes it: its last segment, without a
/// trailing `.map`, names the map (`/etc/haproxy/hosts.map` -> `hosts`).
/// Anything else is the map's name.
pub fn map_ref(arg: &str) -> MapRef {
    if let Some(id) = arg.strip_prefix('#').and_then(|n| n.parse().ok()) {
        return MapRef::Id(id);
    }
    match arg.rsplit_once('/') {
        Some((_, last)) => MapRef::Name(last.strip_suffix(".map").unwrap_or(last).to_string()),
        None => MapRef::Name(arg.to_string()),
    }
}

/// `show info [json|typed] [float]`.
fn parse_info(args: &[&str]) -> Result<Format, String> {
    let mut format = Format::Plain;
    for a in args {
        match *a {
            "json" => format = Format::Json,
            "typed" => format = Format::Typed,
            // Every value here is a whole number already.
            "float" => {}
            _ => {
                return Err(format!(
                    "'show info {a}' is not supported: usage: show info [json|typed] [float]\n"
                ))
            }
        }
    }
    Ok(format)
}

/// A delay as HAProxy's `set timeout cli` reads it: a number of seconds,
/// or a number with a unit (`us`, `ms`, `s`, `m`, `h`, `d`); 0 is refused.
pub fn parse_delay(s: &str) -> Option<std::time::Duration> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = s[..digits].parse().ok()?;
    let us = match &s[digits..] {
        "us" => n,
        "ms" => n.checked_mul(1_000)?,
        "" | "s" => n.checked_mul(1_000_000)?,
        "m" => n.checked_mul(60_000_000)?,
        "h" => n.checked_mul(3_600_000_000)?,
        "d" => n.checked_mul(86_400_000_000)?,
        _ => return None,
    };
    (us > 0).then(|| std::time::Duration::from_micros(us))
}

fn parse_stat(args: &[&str]) -> Result<StatFilter, String> {
    const USAGE: &str =
        "usage: show stat [json|typed] [up|no-maint] [{<iid>|<proxy>} <type> <sid>]\n";
    let mut f = StatFilter::default();
    let mut rest = Vec::new();
    for a in args {
        match *a {
            "up" => f.up = true,
            "no-maint" => f.no_maint = true,
            "json" => f.format = Format::Json,
            "typed" => f.format = Format::Typed,
            "desc" => {
                return Err(format!(
                    "'show stat desc' is not supported: the fields are described in \
                     HAProxy's management guide.\n{USAGE}"
                ))
            }
            _ => rest.push(*a),
        }
    }
    match rest.as_slice() {
        [] => Ok(f),
        [proxy, kind, sid] => {
            f.proxy = (*proxy != "-1").then(|| proxy.to_string());
            f.types = match kind.parse::<i32>() {
                Ok(-1) => 7,
                Ok(t @ 0..=7) => t as u8,
                _ => {
                    return Err(format!(
                        "Invalid type {kind:?}: expected -1 (all) or a sum of 1 (frontends), \
                         2 (backends) and 4 (servers).\n{USAGE}"
                    ))
                }
            };
            f.sid = match sid.parse::<i64>() {
                Ok(-1) => None,
                Ok(n) if n >= 0 => Some(n as usize),
                _ => {
                    return Err(format!(
                        "Invalid server id {sid:?}: expected -1 (all) or a number.\n{USAGE}"
                    ))
                }
            };
            Ok(f)
        }
        _ => Err(USAGE.into()),
    }
}

/// A weight to set: absolute, or a share of the initial weight capped at
/// the maximum, as HAProxy computes it.
pub fn resolve_weight(w: WeightArg, initial: u32) -> u16 {
    let max = u64::from(MAX_WEIGHT);
    match w {
        WeightArg::Absolute(n) => n.min(MAX_WEIGHT),
        WeightArg::Percent(p) => (u64::from(initial) * u64::from(p) / 100).min(max) as u16,
    }
}

struct HelpEntry {
    words: &'static [&'static str],
    usage: &'static str,
    text: &'static str,
}

/// Every command, sorted; the last three are listed with every answer.
const HELP: &[HelpEntry] = &[
    HelpEntry {
        words: &["add", "map"],
        usage: "add map <map> <key> <val>",
        text: "add a map entry (refused if the key exists)",
    },
    HelpEntry {
        words: &["auth"],
        usage: "auth <token>",
        text: "allow changes on the TCP listener (the admin token)",
    },
    HelpEntry {
        words: &["clear", "counters"],
        usage: "clear counters [all]",
        text: "clear max statistics counters (or all counters)",
    },
    HelpEntry {
        words: &["clear", "map"],
        usage: "clear map <map>",
        text: "clear the contents of this map",
    },
    HelpEntry {
        words: &["del", "map"],
        usage: "del map <map> <key>",
        text: "delete the map entry of <key>",
    },
    HelpEntry {
        words: &["disable", "health"],
        usage: "disable health <bk>/<srv>",
        text: "stop a server's health checks; it counts as up until 'enable health'",
    },
    HelpEntry {
        words: &["disable", "server"],
        usage: "disable server <bk>/<srv>",
        text: "put a server in maintenance (same as 'set server ... state maint')",
    },
    HelpEntry {
        words: &["enable", "health"],
        usage: "enable health <bk>/<srv>",
        text: "start a server's stopped health checks again",
    },
    HelpEntry {
        words: &["enable", "server"],
        usage: "enable server <bk>/<srv>",
        text: "make a server ready again (same as 'set server ... state ready')",
    },
    HelpEntry {
        words: &["get", "map"],
        usage: "get map <map> <value>",
        text: "report the keys and values matching a sample for a map",
    },
    HelpEntry {
        words: &["get", "weight"],
        usage: "get weight <bk>/<srv>",
        text: "report a server's current weight",
    },
    HelpEntry {
        words: &["set", "map"],
        usage: "set map <map> <key> <value>",
        text: "modify a map entry",
    },
    HelpEntry {
        words: &["set", "maxconn", "server"],
        usage: "set maxconn server <bk>/<srv> <n>",
        text: "change a server's maxconn setting (0: no limit)",
    },
    HelpEntry {
        words: &["set", "server"],
        usage: "set server <bk>/<srv> [opts]",
        text: "change a server's state (ready|drain|maint) or weight (<n>|<n>%)",
    },
    HelpEntry {
        words: &["set", "timeout", "cli"],
        usage: "set timeout cli <delay>",
        text: "change this session's idle timeout",
    },
    HelpEntry {
        words: &["set", "weight"],
        usage: "set weight <bk>/<srv> <w>[%]",
        text: "change a server's weight (same as 'set server ... weight')",
    },
    HelpEntry {
        words: &["show", "backend"],
        usage: "show backend",
        text: "list backends (services)",
    },
    HelpEntry {
        words: &["show", "errors"],
        usage: "show errors [<px>] [request|response]",
        text: "report the last request and/or response errors (none are captured)",
    },
    HelpEntry {
        words: &["show", "info"],
        usage: "show info [json|typed]",
        text: "report information about the running process",
    },
    HelpEntry {
        words: &["show", "map"],
        usage: "show map [<map>]",
        text: "report available maps or dump a map's contents",
    },
    HelpEntry {
        words: &["show", "servers", "conn"],
        usage: "show servers conn [<backend>]",
        text: "dump server connections status (all or for a single backend)",
    },
    HelpEntry {
        words: &["show", "servers", "state"],
        usage: "show servers state [<backend>]",
        text: "dump volatile server information (all or for a single backend)",
    },
    HelpEntry {
        words: &["show", "stat"],
        usage: "show stat [json|typed] [<px> <t> <s>]",
        text: "report counters for each proxy and server (CSV)",
    },
    HelpEntry {
        words: &["show", "version"],
        usage: "show version",
        text: "show version of the current process",
    },
    HelpEntry {
        words: &["shutdown", "sessions", "server"],
        usage: "shutdown sessions server <bk>/<srv>",
        text: "close the idle connections to a server",
    },
    HelpEntry {
        words: &["help"],
        usage: "help [<command>]",
        text: "list matching or all commands",
    },
    HelpEntry {
        words: &["prompt"],
        usage: "prompt",
        text: "toggle interactive mode with prompt",
    },
    HelpEntry {
        words: &["quit"],
        usage: "quit",
        text: "disconnect",
    },
];

/// The entries that are always listed: help, prompt, quit.
const ALWAYS_LISTED: usize = 3;

fn help_list(headline: &str, pick: impl Fn(&HelpEntry) -> bool) -> String {
    let mut out = String::from(headline);
    out.push('\n');
    let (commands, always) = HELP.split_at(HELP.len() - ALWAYS_LISTED);
    for e in commands.iter().filter(|e| pick(e)).chain(always) {
        let _ = writeln!(out, "  {:<40}: {}", e.usage, e.text);
    }
    out
}

/// How many leading words of `words` name `entry`.
fn common_words(entry: &HelpEntry, words: &[&str]) -> usize {
    entry
        .words
        .iter()
        .zip(words)
        .take_while(|(a, b)| a == b)
        .count()
}

/// `help [<words>]`: the commands that start with `words`, or all of them.
pub(super) fn help(words: &[String]) -> String {
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let matches = |e: &HelpEntry| common_words(e, &words) == e.words.len().min(words.len());
    let any = HELP[..HELP.len() - ALWAYS_LISTED].iter().any(&matches);
    help_list("The following commands are valid at this level:", |e| {
        !any || matches(e)
    })
}

/// HAProxy's answer to an unknown command: the closest commands, or all.
fn unknown_command(words: &[&str]) -> String {
    let best = HELP[..HELP.len() - ALWAYS_LISTED]
        .iter()
        .map(|e| common_words(e, words))
        .max()
        .unwrap_or(0);
    if best == 0 {
        return help_list(
            "Unknown command. Please enter one of the following commands only:",
            |_| true,
        );
    }
    help_list(
        "Unknown command, but maybe one of the following ones is a better match:",
        |e| common_words(e, words) == best,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        let mut commands = split_line(line);
        assert_eq!(commands.len(), 1, "{line:?} is one command");
        commands.remove(0)
    }

    fn parsed(line: &str) -> Result<Request, String> {
        parse(&words(line))
    }

    fn server(b: &str, s: &str) -> ServerRef {
        ServerRef {
            backend: b.into(),
            server: s.into(),
        }
    }

    #[test]
    fn lines_split_at_semicolons_and_blanks_with_backslash_escapes() {
        assert_eq!(
            split_line("a  b\t;c\\;d e\\ f;;"),
            vec![
                vec!["a".to_string(), "b".into()],
                vec!["c;d".to_string(), "e f".into()],
                vec![],
                vec![],
            ]
        );
        assert_eq!(split_line(""), vec![Vec::<String>::new()]);
        assert_eq!(split_line("show stat\r"), vec![vec!["show", "stat"]]);
        assert_eq!(
            split_line("get weight blue\\/x"),
            vec![vec!["get", "weight", "blue/x"]]
        );
    }

    #[test]
    fn every_command_parses() {
        use Request::*;
        let cases: Vec<(&str, Request)> = vec![
            ("help", Help(vec![])),
            ("help set server", Help(vec!["set".into(), "server".into()])),
            ("prompt", Prompt),
            ("quit", Quit),
            ("show stat", ShowStat(StatFilter::default())),
            (
                "show stat up no-maint",
                ShowStat(StatFilter {
                    up: true,
                    no_maint: true,
                    ..StatFilter::default()
                }),
            ),
            (
                "show stat blue 4 -1",
                ShowStat(StatFilter {
                    proxy: Some("blue".into()),
                    types: 4,
                    ..StatFilter::default()
                }),
            ),
            (
                "show stat -1 -1 2",
                ShowStat(StatFilter {
                    sid: Some(2),
                    ..StatFilter::default()
                }),
            ),
            ("show info", ShowInfo(Format::Plain)),
            ("show info typed", ShowInfo(Format::Typed)),
            ("show info json float", ShowInfo(Format::Json)),
            ("show version", ShowVersion),
            ("show errors", ShowErrors(None)),
            ("show errors blue response", ShowErrors(Some("blue".into()))),
            (
                "get map /etc/haproxy/hosts.map STATIC",
                GetMap {
                    map: MapRef::Name("hosts".into()),
                    key: "STATIC".into(),
                },
            ),
            (
                "set timeout cli 60",
                SetTimeoutCli(std::time::Duration::from_secs(60)),
            ),
            (
                "set timeout cli 500ms",
                SetTimeoutCli(std::time::Duration::from_millis(500)),
            ),
            ("clear counters", ClearCounters { all: false }),
            ("clear counters all", ClearCounters { all: true }),
            (
                "shutdown sessions server b/s",
                ShutdownSessions(server("b", "s")),
            ),
            ("enable health b/s", Health(server("b", "s"), true)),
            ("disable health b/s", Health(server("b", "s"), false)),
            (
                "show stat typed",
                ShowStat(StatFilter {
                    format: Format::Typed,
                    ..StatFilter::default()
                }),
            ),
            ("show servers state", ShowServersState(None)),
            (
                "show servers state blue",
                ShowServersState(Some("blue".into())),
            ),
            ("show servers conn", ShowServersConn(None)),
            // The operators' script passes a `$` after the backend.
            (
                "show servers conn blue $",
                ShowServersConn(Some("blue".into())),
            ),
            ("show backend", ShowBackend),
            ("show map", ShowMap(None)),
            (
                "show map hosts",
                ShowMap(Some(MapRef::Name("hosts".into()))),
            ),
            ("show map #2", ShowMap(Some(MapRef::Id(2)))),
            ("get weight b/s", GetWeight(server("b", "s"))),
            (
                "disable server b/s",
                SetState(server("b", "s"), AdminState::Maint),
            ),
            ("enable server b/s", EnableServer(server("b", "s"))),
            (
                "set server b/s state ready",
                SetState(server("b", "s"), AdminState::Ready),
            ),
            (
                "set server b/s state drain",
                SetState(server("b", "s"), AdminState::Drain),
            ),
            (
                "set server b/s state maint",
                SetState(server("b", "s"), AdminState::Maint),
            ),
            (
                "set server b/s weight 7",
                SetWeight(server("b", "s"), WeightArg::Absolute(7)),
            ),
            (
                "set maxconn server b/s 20",
                SetMaxconnServer(server("b", "s"), 20),
            ),
            (
                "set server b/s weight 50%",
                SetWeight(server("b", "s"), WeightArg::Percent(50)),
            ),
            (
                "set weight b/s 0",
                SetWeight(server("b", "s"), WeightArg::Absolute(0)),
            ),
            (
                "set map /home/dong/code/learn-haproxy/hosts.map STATIC green",
                SetMap {
                    map: MapRef::Name("hosts".into()),
                    key: "STATIC".into(),
                    value: "green".into(),
                },
            ),
            (
                "add map hosts NEW blue",
                AddMap {
                    map: MapRef::Name("hosts".into()),
                    key: "NEW".into(),
                    value: "blue".into(),
                },
            ),
            (
                "del map #1 NEW",
                DelMap {
                    map: MapRef::Id(1),
                    key: "NEW".into(),
                },
            ),
            ("clear map hosts", ClearMap(MapRef::Name("hosts".into()))),
        ];
        for (line, want) in cases {
            assert_eq!(parsed(line), Ok(want), "{line}");
        }
    }

    #[test]
    fn wrong_arguments_get_haproxy_answers() {
        let cases = [
            ("get weight", "Require 'backend/server'."),
            ("get weight blue", "Require 'backend/server'."),
            ("get weight b/s extra", "usage: get weight"),
            ("disable server", "Require 'backend/server'."),
            ("enable server blue", "Require 'backend/server'."),
            ("set server", "Require 'backend/server'."),
            ("set server b/s", "usage: set server <backend>/<server>"),
            ("set server b/s bogus", "usage: set server"),
            ("set server b/s addr 10.0.0.1", "not supported"),
            (
                "set server b/s state",
                "expects 'ready', 'drain' and 'maint'",
            ),
            (
                "set server b/s state up",
                "expects 'ready', 'drain' and 'maint'",
            ),
            ("set server b/s state ready now", "takes one value"),
            ("set server b/s weight", "Require <weight> or <weight%>."),
            ("set server b/s weight 257", "between 0 and 256"),
            ("set server b/s weight -1", "between 0 and 256"),
            ("set server b/s weight x", "preceded by garbage"),
            ("set server b/s weight 5x", "Trailing garbage"),
            (
                "set server b/s weight -5%",
                "Relative weight must be positive",
            ),
            ("set weight b/s", "Require <weight> or <weight%>."),
            ("set map", "'set map' expects three parameters"),
            ("set map hosts STATIC", "'set map' expects three parameters"),
            ("set map hosts a b c", "'set map' expects three parameters"),
            ("set map @1 hosts a", "versions"),
            ("add map hosts a", "'add map' expects three parameters"),
            ("del map hosts", "expects two parameters"),
            ("clear map", "Missing map identifier."),
            ("clear map a b", "usage: clear map"),
            ("show map a b", "usage: show map"),
            ("show stat desc", "not supported"),
            ("get map hosts", "Missing map identifier and/or key."),
            ("set timeout cli", "Expects an integer value."),
            ("set timeout cli 0", "Invalid timeout value."),
            ("set timeout cli x", "Invalid timeout value."),
            ("set timeout server 3", "'set timeout' only supports 'cli'."),
            ("shutdown sessions server b", "Require 'backend/server'."),
            ("disable health", "Require 'backend/server'."),
            ("set maxconn server", "Require 'backend/server'."),
            ("set maxconn server b/s", "Require <maxconn>."),
            (
                "set maxconn server b/s x1",
                "maxconn string empty or preceded by garbage",
            ),
            (
                "set maxconn server b/s 1x",
                "Trailing garbage in maxconn string",
            ),
            ("clear counters now", "usage: clear counters"),
            ("show stat blue", "usage: show stat"),
            ("show stat blue x -1", "Invalid type"),
            ("show stat blue 4 x", "Invalid server id"),
            ("show info desc", "not supported"),
            ("show backend x", "takes no argument"),
            ("quit now", "takes no argument"),
        ];
        for (line, want) in cases {
            match parsed(line) {
                Err(e) => {
                    assert!(e.contains(want), "{line}: {e:?} should say {want:?}");
                    // Two of HAProxy's own answers end without a newline.
                    let bare = e.contains("maxconn string");
                    assert!(e.ends_with('\n') != bare, "{line}: {e:?} ends its line");
                }
                Ok(r) => panic!("{line}: parsed as {r:?}"),
            }
        }
    }

    #[test]
    fn unknown_commands_list_the_closest_ones_or_all() {
        let e = parsed("show servers").unwrap_err();
        assert!(
            e.starts_with(
                "Unknown command, but maybe one of the following ones is a better match:\n"
            ),
            "{e}"
        );
        assert!(e.contains("show servers conn [<backend>]"), "{e}");
        assert!(e.contains("show servers state [<backend>]"), "{e}");
        assert!(!e.contains("show stat"), "{e}");
        assert!(e.contains("  quit "), "{e}");

        let e = parsed("frobnicate").unwrap_err();
        assert!(
            e.starts_with("Unknown command. Please enter one of the following commands only:\n"),
            "{e}"
        );
        assert_eq!(e.lines().count(), HELP.len() + 1, "{e}");
        let e = parse(&[]).unwrap_err();
        assert!(e.starts_with("Unknown command. Please"), "{e}");
    }

    #[test]
    fn help_is_aligned_and_filters_by_words() {
        for e in HELP {
            assert!(e.usage.len() <= 40, "{} is wider than the column", e.usage);
        }
        let all = help(&[]);
        assert!(all.starts_with("The following commands are valid at this level:\n"));
        assert!(
            all.contains("\n  get weight <bk>/<srv>                   : report"),
            "{all}"
        );
        assert_eq!(all.lines().count(), HELP.len() + 1);
        let get = help(&["get".into()]);
        assert_eq!(get.lines().count(), 1 + 2 + ALWAYS_LISTED, "{get}");
        let none = help(&["zzz".into()]);
        assert_eq!(none, all, "no match lists everything");
    }

    #[test]
    fn weights_read_like_haproxy() {
        assert_eq!(parse_weight("0"), Ok(WeightArg::Absolute(0)));
        assert_eq!(parse_weight("256"), Ok(WeightArg::Absolute(256)));
        assert_eq!(parse_weight("+3"), Ok(WeightArg::Absolute(3)));
        assert_eq!(parse_weight("50%"), Ok(WeightArg::Percent(50)));
        assert_eq!(
            parse_weight("99999999999999999999%"),
            Ok(WeightArg::Percent(25_600))
        );
        assert!(parse_weight("99999999999999999999").is_err());
        assert!(parse_weight("%").is_err());
        assert!(parse_weight("").is_err());
        assert!(parse_weight("5%x").is_err());
        assert_eq!(resolve_weight(WeightArg::Percent(50), 10), 5);
        assert_eq!(resolve_weight(WeightArg::Percent(200), 10), 20);
        assert_eq!(resolve_weight(WeightArg::Percent(25_600), 10), 256);
        assert_eq!(resolve_weight(WeightArg::Absolute(9), 10), 9);
    }

    #[test]
    fn map_arguments_name_maps_by_their_last_path_segment() {
        let name = |s: &str| MapRef::Name(s.to_string());
        assert_eq!(
            map_ref("/home/dong/code/learn-haproxy/hosts.map"),
            name("hosts")
        );
        assert_eq!(map_ref("./hosts.map"), name("hosts"));
        assert_eq!(map_ref("conf/release"), name("release"));
        assert_eq!(
            map_ref("hosts.map"),
            name("hosts.map"),
            "no '/': the name as is"
        );
        assert_eq!(map_ref("hosts"), name("hosts"));
        assert_eq!(map_ref("#3"), MapRef::Id(3));
        assert_eq!(map_ref("#x"), name("#x"));
    }
}
