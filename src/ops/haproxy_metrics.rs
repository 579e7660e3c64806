//! `/metrics/haproxy`: the `show stat` rows under the names of HAProxy's
//! own Prometheus exporter (`haproxy_frontend_*`, `haproxy_backend_*`,
//! `haproxy_server_*`, labelled `proxy` and `server`), so dashboards made
//! for HAProxy read pointsman unchanged. Every value comes from the same
//! rows `show stat` prints; columns pointsman leaves empty give no series.
//! pointsman's own families stay on `/metrics`.

use std::fmt::Write;

use crate::ops::runtime::StatLine;

/// Row kinds a family has series for.
const F: u8 = 1;
const B: u8 = 2;
const S: u8 = 4;

/// How a column's value is read: as it is, or milliseconds as seconds.
#[derive(Clone, Copy)]
enum Unit {
    Plain,
    Millis,
}

/// (name after `haproxy_<kind>_`, type, help, column, kinds, unit)
const FAMILIES: &[(&str, &str, &str, &str, u8, Unit)] = &[
    (
        "current_sessions",
        "gauge",
        "Current number of active sessions.",
        "scur",
        F | B | S,
        Unit::Plain,
    ),
    (
        "max_sessions",
        "gauge",
        "Maximum observed number of active sessions.",
        "smax",
        F | B | S,
        Unit::Plain,
    ),
    (
        "limit_sessions",
        "gauge",
        "Configured session limit.",
        "slim",
        F | S,
        Unit::Plain,
    ),
    (
        "sessions_total",
        "counter",
        "Total number of sessions.",
        "stot",
        F | B | S,
        Unit::Plain,
    ),
    (
        "bytes_in_total",
        "counter",
        "Current total of incoming bytes.",
        "bin",
        F | B | S,
        Unit::Plain,
    ),
    (
        "bytes_out_total",
        "counter",
        "Current total of outgoing bytes.",
        "bout",
        F | B | S,
        Unit::Plain,
    ),
    (
        "request_errors_total",
        "counter",
        "Total number of request errors.",
        "ereq",
        F,
        Unit::Plain,
    ),
    (
        "connection_errors_total",
        "counter",
        "Total number of connection errors.",
        "econ",
        B | S,
        Unit::Plain,
    ),
    (
        "response_errors_total",
        "counter",
        "Total number of response errors.",
        "eresp",
        B | S,
        Unit::Plain,
    ),
    (
        "retry_warnings_total",
        "counter",
        "Total number of retry warnings.",
        "wretr",
        B | S,
        Unit::Plain,
    ),
    (
        "client_aborts_total",
        "counter",
        "Total number of data transfers aborted by the client.",
        "cli_abrt",
        B | S,
        Unit::Plain,
    ),
    (
        "server_aborts_total",
        "counter",
        "Total number of data transfers aborted by the server.",
        "srv_abrt",
        B | S,
        Unit::Plain,
    ),
    (
        "http_requests_total",
        "counter",
        "Total number of HTTP requests received.",
        "req_tot",
        F | B,
        Unit::Plain,
    ),
    (
        "current_queue",
        "gauge",
        "Number of current queued connections.",
        "qcur",
        B | S,
        Unit::Plain,
    ),
    (
        "max_queue",
        "gauge",
        "Maximum observed number of queued connections.",
        "qmax",
        B | S,
        Unit::Plain,
    ),
    (
        "weight",
        "gauge",
        "Service weight.",
        "weight",
        B | S,
        Unit::Plain,
    ),
    (
        "active_servers",
        "gauge",
        "Current number of active servers.",
        "act",
        B,
        Unit::Plain,
    ),
    (
        "backup_servers",
        "gauge",
        "Current number of backup servers.",
        "bck",
        B,
        Unit::Plain,
    ),
    (
        "check_failures_total",
        "counter",
        "Total number of failed check.",
        "chkfail",
        S,
        Unit::Plain,
    ),
    (
        "check_up_down_total",
        "counter",
        "Total number of UP->DOWN transitions.",
        "chkdown",
        S,
        Unit::Plain,
    ),
    (
        "downtime_seconds_total",
        "counter",
        "Total downtime (in seconds) for the service.",
        "downtime",
        S,
        Unit::Plain,
    ),
    (
        "last_session_seconds",
        "gauge",
        "Number of seconds since last session assigned to server/backend.",
        "lastsess",
        B | S,
        Unit::Plain,
    ),
    (
        "current_session_rate",
        "gauge",
        "Current number of sessions per second over last elapsed second.",
        "rate",
        F | B | S,
        Unit::Plain,
    ),
    (
        "max_session_rate",
        "gauge",
        "Maximum observed number of sessions per second.",
        "rate_max",
        F | B | S,
        Unit::Plain,
    ),
    (
        "queue_time_average_seconds",
        "gauge",
        "Avg. queue time for last 1024 successful connections.",
        "qtime",
        B,
        Unit::Millis,
    ),
    (
        "connect_time_average_seconds",
        "gauge",
        "Avg. connect time for last 1024 successful connections.",
        "ctime",
        B | S,
        Unit::Millis,
    ),
    (
        "response_time_average_seconds",
        "gauge",
        "Avg. response time for last 1024 successful connections.",
        "rtime",
        B | S,
        Unit::Millis,
    ),
    (
        "total_time_average_seconds",
        "gauge",
        "Avg. total time for last 1024 successful connections.",
        "ttime",
        B | S,
        Unit::Millis,
    ),
];

/// The response classes of `haproxy_*_http_responses_total`.
const CODES: [(&str, &str); 6] = [
    ("1xx", "hrsp_1xx"),
    ("2xx", "hrsp_2xx"),
    ("3xx", "hrsp_3xx"),
    ("4xx", "hrsp_4xx"),
    ("5xx", "hrsp_5xx"),
    ("other", "hrsp_other"),
];

/// The states of `haproxy_{backend,server}_status`, one series each.
const STATES: [&str; 5] = ["DOWN", "UP", "MAINT", "DRAIN", "NOLB"];

fn kind(line: &StatLine) -> (u8, &'static str) {
    match line.kind_letter() {
        'F' => (F, "frontend"),
        'B' => (B, "backend"),
        _ => (S, "server"),
    }
}

/// Prometheus label values: `\`, `"` and newlines escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(line: &StatLine, extra: Option<(&str, &str)>) -> String {
    let mut out = format!("proxy=\"{}\"", label(line.get("pxname")));
    if kind(line).0 == S {
        let _ = write!(out, ",server=\"{}\"", label(line.get("svname")));
    }
    if let Some((k, v)) = extra {
        let _ = write!(out, ",{k}=\"{v}\"");
    }
    out
}

/// The text exposition of `lines`.
pub fn render(lines: &[StatLine]) -> String {
    let mut out = String::new();
    for (k, kname) in [(F, "frontend"), (B, "backend"), (S, "server")] {
        let rows: Vec<&StatLine> = lines.iter().filter(|l| kind(l).0 == k).collect();
        for (name, kind_of, help, column, kinds, unit) in FAMILIES {
            if kinds & k == 0 {
                continue;
            }
            let mut series = String::new();
            for row in &rows {
                let Ok(v) = row.get(column).parse::<f64>() else {
                    continue;
                };
                let v = match unit {
                    Unit::Plain => v,
                    Unit::Millis => v / 1000.0,
                };
                let _ = writeln!(
                    series,
                    "haproxy_{kname}_{name}{{{}}} {v}",
                    labels(row, None)
                );
            }
            if !series.is_empty() {
                let _ = writeln!(out, "# HELP haproxy_{kname}_{name} {help}");
                let _ = writeln!(out, "# TYPE haproxy_{kname}_{name} {kind_of}");
                out.push_str(&series);
            }
        }
        let mut responses = String::new();
        for row in &rows {
            for (code, column) in CODES {
                if let Ok(v) = row.get(column).parse::<f64>() {
                    let l = labels(row, Some(("code", code)));
                    let _ = writeln!(responses, "haproxy_{kname}_http_responses_total{{{l}}} {v}");
                }
            }
        }
        if !responses.is_empty() {
            let _ = writeln!(
                out,
                "# HELP haproxy_{kname}_http_responses_total Total number of HTTP responses."
            );
            let _ = writeln!(out, "# TYPE haproxy_{kname}_http_responses_total counter");
            out.push_str(&responses);
        }
        let mut status = String::new();
        for row in &rows {
            let now = row.get("status");
            if k == F {
                let up = u8::from(now == "OPEN");
                let _ = writeln!(
                    status,
                    "haproxy_frontend_status{{{}}} {up}",
                    labels(row, None)
                );
                continue;
            }
            // A server without checks is UP, as HAProxy's exporter says.
            let now = if now == "no check" {
                "UP"
            } else {
                now.split(' ').next().unwrap_or("")
            };
            for state in STATES {
                let l = labels(row, Some(("state", state)));
                let _ = writeln!(
                    status,
                    "haproxy_{kname}_status{{{l}}} {}",
                    u8::from(now == state)
                );
            }
        }
        if !status.is_empty() {
            let _ = writeln!(
                out,
                "# HELP haproxy_{kname}_status Current status of the service."
            );
            let _ = writeln!(out, "# TYPE haproxy_{kname}_status gauge");
            out.push_str(&status);
        }
    }
    out
}
