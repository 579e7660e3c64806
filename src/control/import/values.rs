//! The values of an haproxy.cfg line as pointsman writes them: times,
//! listen and server addresses, status ranges, fetch expressions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// An HAProxy time: a number with `us`, `ms`, `s`, `m`, `h` or `d`
/// (milliseconds when bare).
pub fn parse_time(s: &str) -> Option<Duration> {
    let at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s.get(..at)?.parse().ok()?;
    Some(match &s[at..] {
        "" | "ms" => Duration::from_millis(n),
        "us" => Duration::from_micros(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86400)?),
        _ => return None,
    })
}

/// A duration as pointsman writes it: `"5s"`, `"250ms"`, `"2m"`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A `bind` address: `*:80`, `:80`, `0.0.0.0:80`, `[::]:80`, `:::80`, with
/// an optional `ipv4@`/`ipv6@`.
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    let (family, rest) = match s.split_once('@') {
        Some(("ipv4" | "tcp4", r)) => (Some(false), r),
        Some(("ipv6" | "tcp6", r)) => (Some(true), r),
        Some(("tcp", r)) => (None, r),
        Some((other, _)) => {
            return Err(format!(
                "a {other}@ address: pointsman listens on TCP addresses only"
            ))
        }
        None if s.starts_with('/') => {
            return Err("a Unix socket: pointsman listens on TCP addresses only".into())
        }
        None => (None, s),
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} has no port"))?;
    if port.contains('-') {
        return Err(format!(
            "the port range {port}: pointsman listens on one port per listener; write one listener per port"
        ));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = match host {
        "" | "*" if family == Some(true) => Ipv6Addr::UNSPECIFIED.into(),
        "" | "*" => Ipv4Addr::UNSPECIFIED.into(),
        "::" => Ipv6Addr::UNSPECIFIED.into(),
        h => h.parse().map_err(|_| {
            format!(
                "{h:?} is not an IP address: write the address to listen on, or *:{port} for all"
            )
        })?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// A `server` address as a pointsman endpoint address (`host:port`,
/// `[v6]:port`).
pub fn parse_server_address(s: &str) -> Result<String, String> {
    let rest = match s.split_once('@') {
        Some(("ipv4" | "ipv6" | "tcp" | "tcp4" | "tcp6", r)) => r,
        Some((other, _)) => {
            return Err(format!(
                "a {other}@ address: pointsman connects over TCP only"
            ))
        }
        None if s.starts_with('/') => {
            return Err("a Unix socket: pointsman connects over TCP only".into())
        }
        None => s,
    };
    let no_port = || {
        format!(
            "{s:?} has no port (HAProxy then uses the port the client connected to): add the port"
        )
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (h, p) = inner
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: no closing ]"))?;
        (h, p.strip_prefix(':').ok_or_else(no_port)?)
    } else if rest.parse::<Ipv6Addr>().is_ok() {
        return Err(no_port());
    } else {
        rest.rsplit_once(':').ok_or_else(no_port)?
    };
    if port.starts_with('+') || port.starts_with('-') {
        return Err(format!(
            "the port offset {port}: pointsman needs the port itself"
        ));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{port:?} is not a port"))?;
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    address
        .parse::<pointsman_discovery::Address>()
        .map_err(|e| e.to_string())?;
    Ok(address)
}

/// The map name HAProxy's runtime API uses for a map file: its last path
/// segment without `.map` (so `set map /etc/haproxy/hosts.map ...` keeps
/// working against pointsman's runtime API).
pub fn map_name(file: &str) -> String {
    let last = file.rsplit('/').next().unwrap_or(file);
    last.strip_suffix(".map").unwrap_or(last).to_string()
}

/// Splits `a,b(c,d),e` at the commas outside parentheses.
pub fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

pub fn call<'s>(s: &'s str, name: &str) -> Option<&'s str> {
    s.strip_prefix(name)?.strip_prefix('(')?.strip_suffix(')')
}

/// The Host header in an `option httpchk` version string
/// (`HTTP/1.1\r\nHost: example.com`).
pub fn host_header(version: &str) -> Option<String> {
    version.split("\r\n").skip(1).find_map(|h| {
        let (name, value) = h.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("host")
            .then(|| value.trim().to_string())
    })
}

pub fn parse_status(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let (lo, hi): (u16, u16) = (lo.parse().ok()?, hi.parse().ok()?);
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_binds_read_as_haproxy_writes_them() {
        assert_eq!(parse_time("5000"), Some(Duration::from_secs(5)));
        assert_eq!(parse_time("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_time("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_time("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_time("5x"), None);
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        let b = |s: &str| parse_bind(s).map(|a| a.to_string());
        assert_eq!(b("*:80"), Ok("0.0.0.0:80".into()));
        assert_eq!(b(":80"), Ok("0.0.0.0:80".into()));
        assert_eq!(b("0.0.0.0:80"), Ok("0.0.0.0:80".into()));
        assert_eq!(b("ipv4@127.0.0.1:8080"), Ok("127.0.0.1:8080".into()));
        assert_eq!(b("ipv6@:80"), Ok("[::]:80".into()));
        assert_eq!(b(":::80"), Ok("[::]:80".into()));
        assert_eq!(b("[::1]:80"), Ok("[::1]:80".into()));
        assert!(b("unix@/run/x.sock").is_err());
        assert!(b("*:8000-8010").unwrap_err().contains("port range"));
        assert!(b("example.com:80")
            .unwrap_err()
            .contains("not an IP address"));
        let s = parse_server_address;
        assert_eq!(
            s("web1.yourdomain.com:9001"),
            Ok("web1.yourdomain.com:9001".into())
        );
        assert_eq!(s("ipv6@[::1]:80"), Ok("[::1]:80".into()));
        assert!(s("10.0.0.1").unwrap_err().contains("has no port"));
        assert!(s("10.0.0.1:+1").unwrap_err().contains("offset"));
    }
}
