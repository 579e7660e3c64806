//! What a careful proxy changes in the headers it forwards: hop-by-hop
//! headers go (both ways, including every header named in `Connection`),
//! `X-Forwarded-*` are added, `Host` is kept.

use std::fmt::Write;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const HOPS: usize = 8;

/// Hop-by-hop headers (RFC 9110 7.6.1 and the usual non-standard ones).
const HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
];

static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Does the request ask to switch protocols (WebSocket and the like)?
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Connection: upgrade`
/// and `Upgrade` survive, as a protocol switch needs them end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names first: most messages carry none of them
    // (a header named by `Connection` needs `Connection` itself).
    let mut present = [false; HOPS + 1];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        } else if name == PROXY_CONNECTION {
            present[HOPS] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    if let Some(named) = connection_tokens(headers) {
        for name in named {
            headers.remove(name);
        }
    }
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    if present[HOPS] {
        headers.remove(&PROXY_CONNECTION);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// Header names listed in `Connection`, other than the hop-by-hop ones we
/// remove anyway. `None` (no allocation) when there are none.
fn connection_tokens(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut out: Option<Vec<HeaderName>> = None;
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case("keep-alive")
                || token.eq_ignore_ascii_case("upgrade")
            {
                continue;
            }
            if let Ok(name) = HeaderName::try_from(token) {
                // A client cannot make us drop Host this way.
                if name != header::HOST {
                    out.get_or_insert_with(Vec::new).push(name);
                }
            }
        }
    }
    out
}

/// Adds the X-Forwarded-* headers for a request from `client` that arrived
/// for `host`. X-Forwarded-For is appended to; -Proto and -Host are set
/// unless the client is trusted and already sent them.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    host: Option<&HeaderValue>,
    trust: bool,
) {
    // Every X-Forwarded-For line, in order, then this hop's client.
    let mut xff = String::with_capacity(40);
    for prev in headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        let prev = prev.trim();
        if !prev.is_empty() {
            xff.push_str(prev);
            xff.push_str(", ");
        }
    }
    let _ = write!(xff, "{}", client.to_canonical());
    if let Ok(v) = HeaderValue::try_from(xff) {
        // Several X-Forwarded-For lines are folded into one.
        headers.insert(&X_FORWARDED_FOR, v);
    }
    if !trust || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !trust || !headers.contains_key(&X_FORWARDED_HOST) {
        match host {
            Some(h) => {
                headers.insert(&X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

/// The path to forward: with the route's prefix removed when it strips.
pub fn strip_path(path: &str, prefix: &str) -> String {
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret, host"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::HOST, HeaderValue::from_static("a.com"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["host", "x-kept"]);
    }

    #[test]
    fn each_hop_by_hop_header_alone_goes_and_others_stay() {
        for gone in ["proxy-connection", "keep-alive", "te", "connection"] {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("a.com"));
            h.insert(gone, HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, vec!["host", "x-kept"], "{gone}");
        }
        let mut clean = HeaderMap::new();
        clean.insert(header::HOST, HeaderValue::from_static("a.com"));
        strip_hop_by_hop(&mut clean, false);
        assert_eq!(clean.len(), 1);
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_headers_append_and_overwrite() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let host = HeaderValue::from_static("a.com");
        add_forwarded(&mut h, "127.0.0.2".parse().unwrap(), Some(&host), false);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.2");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "a.com");
        let mut h2 = HeaderMap::new();
        h2.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        add_forwarded(&mut h2, "::ffff:127.0.0.3".parse().unwrap(), None, true);
        assert_eq!(h2[&X_FORWARDED_FOR], "127.0.0.3");
        assert_eq!(h2[&X_FORWARDED_PROTO], "https");
    }

    #[test]
    fn strip_keeps_a_leading_slash() {
        assert_eq!(strip_path("/blog/a?x=1", "/blog"), "/a?x=1");
        assert_eq!(strip_path("/blog", "/blog"), "/");
        assert_eq!(strip_path("/blog/a", "/blog/"), "/a");
    }
}
