//! Step 4c of the flow: sticky sessions by cookie, on top of any balancer
//! (HAProxy's `cookie NAME insert|prefix|rewrite`).
//!
//! A request whose cookie names an endpoint that still serves its sessions
//! goes to it (see `balance::Balancer::pick`); otherwise the balancer picks
//! and the response binds the client. How the binding travels depends on
//! the mode:
//!
//! - `insert`: the proxy sets a cookie of its own, `NAME=<endpoint>`. The
//!   application never sees it: it is taken out of the request's Cookie
//!   header, and a Set-Cookie of the same name from the application is
//!   dropped (the binding must stay the proxy's).
//! - `prefix`: the application's own session cookie carries the binding,
//!   `NAME=<endpoint>~<its value>`; the application sets and receives its
//!   value unchanged, and the proxy adds no cookie.
//! - `rewrite`: the application sets `NAME` and the proxy replaces its
//!   value with the endpoint's; the application does not get it back.
//!
//! Endpoint values never contain `~` (see `balance::cookie_value`), so the
//! first `~` of a prefixed value always ends the endpoint's part.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{self, Entry, HeaderMap, HeaderValue};

/// The cookie name a sticky service uses when its config names none.
pub const DEFAULT_COOKIE: &str = "SERVERID";

/// Ends the endpoint's part of a prefixed cookie value.
pub const PREFIX_DELIMITER: char = '~';

/// How the endpoint's value reaches the client (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CookieMode {
    #[default]
    Insert,
    Prefix,
    Rewrite,
}

impl CookieMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CookieMode::Insert => "insert",
            CookieMode::Prefix => "prefix",
            CookieMode::Rewrite => "rewrite",
        }
    }
}

/// A service's sticky cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StickyCookie {
    pub name: Arc<str>,
    pub mode: CookieMode,
}

impl StickyCookie {
    /// The endpoint value the request's cookie carries, if any.
    pub fn value_in<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        let value = find_cookie(headers, &self.name)?;
        match self.mode {
            CookieMode::Prefix => value.split_once(PREFIX_DELIMITER).map(|(e, _)| e),
            CookieMode::Insert | CookieMode::Rewrite => Some(value),
        }
    }

    /// Makes the request's Cookie headers what the application expects:
    /// without the proxy's cookie (insert, rewrite), or with the
    /// application's own value back (prefix). Other cookies are kept as
    /// sent; a header left empty goes. Nothing is copied when the request
    /// carries nothing to change.
    pub fn clean_request(&self, headers: &mut HeaderMap) {
        let touches = |v: &HeaderValue| {
            v.to_str()
                .is_ok_and(|s| pairs(s).any(|p| self.rewritten(p).is_some()))
        };
        if !headers.get_all(header::COOKIE).iter().any(touches) {
            return;
        }
        let Entry::Occupied(entry) = headers.entry(header::COOKIE) else {
            return;
        };
        let (_, values) = entry.remove_entry_mult();
        let kept: Vec<HeaderValue> = values
            .filter_map(|v| {
                let Ok(s) = v.to_str() else {
                    return Some(v);
                };
                let rebuilt: Vec<Cow<'_, str>> = pairs(s)
                    .filter_map(|p| self.rewritten(p).unwrap_or(Some(Cow::Borrowed(p))))
                    .collect();
                if rebuilt.is_empty() {
                    return None;
                }
                HeaderValue::try_from(rebuilt.join("; ")).ok().or(Some(v))
            })
            .collect();
        for v in kept {
            headers.append(header::COOKIE, v);
        }
    }

    /// What becomes of one `name=value` pair of a request: `None` if it is
    /// not this cookie's (kept), `Some(None)` to drop it, `Some(Some(p))`
    /// to send `p` instead.
    fn rewritten<'a>(&self, pair: &'a str) -> Option<Option<Cow<'a, str>>> {
        let (name, value) = pair.split_once('=')?;
        if name.trim() != &*self.name {
            return None;
        }
        match self.mode {
            CookieMode::Insert | CookieMode::Rewrite => Some(None),
            CookieMode::Prefix => {
                let (quote, inner) = unquoted(value.trim());
                let (_, app) = inner.split_once(PREFIX_DELIMITER)?;
                Some(Some(Cow::Owned(format!("{name}={quote}{app}{quote}"))))
            }
        }
    }

    /// Makes the response's Set-Cookie headers bind the client to the
    /// endpoint whose value is `endpoint`; `bind` says whether the request
    /// was not bound to it yet (insert mode then adds its cookie). Returns
    /// whether the application set insert mode's cookie itself (that
    /// Set-Cookie is dropped).
    pub fn on_response(&self, headers: &mut HeaderMap, endpoint: &str, bind: bool) -> bool {
        let mut clash = false;
        let ours = |v: &HeaderValue| v.to_str().ok().and_then(|s| self.own(s)).is_some();
        if headers.get_all(header::SET_COOKIE).iter().any(ours) {
            if let Entry::Occupied(entry) = headers.entry(header::SET_COOKIE) {
                let (_, values) = entry.remove_entry_mult();
                let values: Vec<HeaderValue> = values.collect();
                for v in values {
                    match self.answered(v, endpoint) {
                        Some(v) => {
                            headers.append(header::SET_COOKIE, v);
                        }
                        None => clash = true,
                    }
                }
            }
        }
        if bind && self.mode == CookieMode::Insert {
            let cookie = format!("{}={endpoint}; Path=/", self.name);
            if let Ok(v) = HeaderValue::try_from(cookie) {
                headers.append(header::SET_COOKIE, v);
            }
        }
        clash
    }

    /// What becomes of one of the application's Set-Cookie headers:
    /// `None` to drop it (insert mode's own name).
    fn answered(&self, set_cookie: HeaderValue, endpoint: &str) -> Option<HeaderValue> {
        let Some((value, attributes)) = set_cookie.to_str().ok().and_then(|s| self.own(s)) else {
            return Some(set_cookie);
        };
        let name = &self.name;
        let changed = match self.mode {
            CookieMode::Insert => return None,
            // Deleting the cookie (an empty value) stays a deletion.
            CookieMode::Prefix if value.trim().is_empty() => return Some(set_cookie),
            CookieMode::Prefix => {
                let (quote, inner) = unquoted(value.trim());
                format!("{name}={quote}{endpoint}{PREFIX_DELIMITER}{inner}{quote}{attributes}")
            }
            CookieMode::Rewrite => format!("{name}={endpoint}{attributes}"),
        };
        Some(HeaderValue::try_from(changed).unwrap_or(set_cookie))
    }

    /// The value and the attributes (from their `;` on) of a Set-Cookie
    /// that sets this cookie.
    fn own<'a>(&self, set_cookie: &'a str) -> Option<(&'a str, &'a str)> {
        let (pair, attributes) = match set_cookie.find(';') {
            Some(i) => set_cookie.split_at(i),
            None => (set_cookie, ""),
        };
        let (name, value) = pair.split_once('=')?;
        (name.trim() == &*self.name).then_some((value, attributes))
    }
}

/// The `name=value` pairs of one Cookie header.
fn pairs(value: &str) -> impl Iterator<Item = &str> {
    value.split(';').map(str::trim).filter(|p| !p.is_empty())
}

/// A cookie value without its double quotes, and the quote to put back.
fn unquoted(value: &str) -> (&'static str, &str) {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => ("\"", inner),
        None => ("", value),
    }
}

/// The value of cookie `name` in the request's Cookie headers.
pub fn find_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v: &HeaderValue| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// Whether `name` can name a cookie (an RFC 9110 token).
pub fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests;
