//! The key/value contract: how one registry key and its value become an
//! [`Entry`]. Every source goes through here — the etcd watcher with real
//! keys, the file registry with keys made from file paths — so a value means
//! the same thing wherever it is written. `SCHEMA.md` is the prose version of
//! this module; keep them in step.
//!
//! Parsing is pure and never panics: `Ok(None)` means "not ours, ignore it",
//! `Err` means "ours, but wrong", and the caller logs, counts and skips it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::excerpt::shorten;
use crate::keys;
use crate::registration::{DEFAULT_WEIGHT, MAX_WEIGHT};
use crate::{Address, AddressError, AdminState, CheckSpec, Entry, EntryKey, Override, PauseSpec};
use crate::{Registration, RouteSpec};

/// Where in the key space the two halves of the contract live.
///
/// Service registrations (written by containers or their sidekicks) and
/// proxy-side configuration (written by operators and rollouts) usually sit
/// under different roots, so each has its own prefix. A trailing `/` is
/// optional: `/services` and `/services/` mean the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Prefixes {
    /// Root of `<services>/<service>/<instance-id>` registrations.
    pub services: String,
    /// Root of `<pointsman>/{routes,maps,overrides,proxies}/...`.
    pub pointsman: String,
    /// Keys directly under the services root are instances too, one per
    /// container (`/services/webapp1:49153`, the CoreOS layout); their
    /// service is named by [`flat_service`].
    pub flat_keys: bool,
}

impl Default for Prefixes {
    fn default() -> Self {
        Prefixes {
            services: "/services".to_string(),
            pointsman: "/pointsman".to_string(),
            flat_keys: false,
        }
    }
}

/// The service of a flat key's instance: its name without a trailing
/// `:port`, then without trailing digits and a separator before them
/// (`docker-container-webapp1:49153` -> `docker-container-webapp`,
/// `web-2` -> `web`); the whole name when nothing would be left.
pub fn flat_service(instance: &str) -> String {
    let name = match instance.rsplit_once(':') {
        Some((head, port)) if !head.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => instance,
    };
    let stem = name
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .trim_end_matches(['-', '_', '.']);
    if stem.is_empty() {
        name.to_string()
    } else {
        stem.to_string()
    }
}

impl Prefixes {
    /// The services root with exactly one trailing `/`, ready for a prefix
    /// query: `/services/`.
    pub fn services_dir(&self) -> String {
        dir(&self.services)
    }

    /// The pointsman root with exactly one trailing `/`: `/pointsman/`.
    pub fn pointsman_dir(&self) -> String {
        dir(&self.pointsman)
    }

    /// One key range `[start, end)` that covers both roots, so a single etcd
    /// watch sees every key of a revision at once. It may also cover keys
    /// between the roots that are not ours; [`parse_entry`] ignores those.
    pub fn watch_range(&self) -> (Vec<u8>, Vec<u8>) {
        let a = self.services_dir().into_bytes();
        let b = self.pointsman_dir().into_bytes();
        let (ea, eb) = (prefix_range_end(&a), prefix_range_end(&b));
        let start = a.clone().min(b.clone());
        // `\0` as an end means "to the end of the key space"; it wins.
        let end = if ea == [0] || eb == [0] {
            vec![0]
        } else {
            ea.max(eb)
        };
        (start, end)
    }
}

fn dir(root: &str) -> String {
    format!("{}/", root.trim_end_matches('/'))
}

/// The smallest key greater than every key starting with `prefix`, as etcd
/// computes it for `--prefix`; `\0` when there is none (all `0xff`).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A key or value that belongs to the contract but is wrong.
///
/// Each message starts with the key (or file path) and says what to write
/// instead, so a log line alone is enough to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{key}: malformed key: {reason}")]
    Key { key: String, reason: String },
    #[error("{key}: value is empty: expected {expected}")]
    Empty { key: String, expected: &'static str },
    #[error("{key}: value is not UTF-8 text: expected {expected}")]
    NotUtf8 { key: String, expected: &'static str },
    #[error("{key}: {reason}")]
    Address { key: String, reason: AddressError },
    #[error("{key}: invalid {what} JSON: {reason}")]
    Json {
        key: String,
        what: &'static str,
        reason: String,
    },
    #[error("{key}: weight {weight} is out of range: expected 0 to {max}", max = MAX_WEIGHT)]
    Weight { key: String, weight: u64 },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl ParseError {
    /// The key (or file path) the error is about.
    pub fn key(&self) -> &str {
        match self {
            ParseError::Key { key, .. }
            | ParseError::Empty { key, .. }
            | ParseError::NotUtf8 { key, .. }
            | ParseError::Address { key, .. }
            | ParseError::Json { key, .. }
            | ParseError::Weight { key, .. }
            | ParseError::Invalid { key, .. } => key,
        }
    }
}

const INSTANCE_VALUE: &str =
    "host:port or a JSON object such as {\"address\":\"10.0.0.5:8080\",\"weight\":10}";
const ROUTE_VALUE: &str =
    "a JSON route such as {\"host\":\"example.com\",\"path_prefix\":\"/\",\"service\":\"web\"}";
const MAP_VALUE: &str = "the map value as text, e.g. a service name such as web-green";
const OVERRIDE_VALUE: &str = "a JSON override such as {\"state\":\"drain\",\"weight\":10}";
const PAUSE_VALUE: &str = "a JSON pause such as {\"timeout\":\"30s\"}";
const MAINTENANCE_VALUE: &str = "the maintenance page's HTML, as UTF-8 text";
const PAGE_VALUE: &str = "the page's HTML, as UTF-8 text";

/// Parses one registry key and its value.
///
/// Returns `Ok(None)` for keys that are not part of the contract: outside
/// both prefixes, directory-like keys (ending in `/`, or a bare section such
/// as `/pointsman/routes`), and sections written by others
/// (`/pointsman/proxies/...` and any section this version does not know).
/// Returns `Err` for keys inside the contract whose shape or value is wrong.
pub fn parse_entry(
    prefixes: &Prefixes,
    key: &str,
    value: &[u8],
) -> Result<Option<Entry>, ParseError> {
    let Some(entry_key) = classify(prefixes, key)? else {
        return Ok(None);
    };
    let entry = match entry_key {
        EntryKey::Instance { service, id } => {
            Entry::Instance(parse_instance(key, &service, &id, value)?)
        }
        EntryKey::Route { name } => Entry::Route {
            name,
            spec: parse_route(key, value)?,
        },
        EntryKey::MapEntry { map, key: map_key } => Entry::MapEntry {
            map,
            key: map_key,
            value: text(key, value, MAP_VALUE)?.to_string(),
        },
        EntryKey::Override { service, id } => Entry::Override {
            service,
            id,
            spec: parse_override(key, value)?,
        },
        EntryKey::Pause { service } => Entry::Pause {
            service,
            spec: parse_pause(key, value)?,
        },
        EntryKey::Maintenance { service } => Entry::Maintenance {
            service,
            page: maintenance_page(key, value)?,
        },
        EntryKey::Page { service, status } => Entry::Page {
            service,
            status,
            page: {
                // Sent as written; a blank page is no page.
                text(key, value, PAGE_VALUE)?;
                String::from_utf8_lossy(value).into_owned()
            },
        },
    };
    Ok(Some(entry))
}

/// The identity a key stands for, for deletes (which carry no value).
///
/// `None` for keys outside the contract and for malformed keys: neither can
/// have produced an entry, so there is nothing to remove.
pub fn parse_key(prefixes: &Prefixes, key: &str) -> Option<EntryKey> {
    classify(prefixes, key).ok().flatten()
}

/// Whether `key` lies under one of our roots at all. Keys for which this is
/// false are never reported, not even as malformed.
pub fn is_ours(prefixes: &Prefixes, key: &[u8]) -> bool {
    key.starts_with(prefixes.services_dir().as_bytes())
        || key.starts_with(prefixes.pointsman_dir().as_bytes())
}

fn classify(p: &Prefixes, key: &str) -> Result<Option<EntryKey>, ParseError> {
    let (services, pointsman) = (p.services_dir(), p.pointsman_dir());
    // When one root lies inside the other, the inner (longer) one wins.
    let in_pointsman = key.starts_with(&pointsman)
        && !(services.len() > pointsman.len() && key.starts_with(&services));
    if !in_pointsman {
        let Some(rest) = key.strip_prefix(&services) else {
            return Ok(None);
        };
        let shape = "expected <services>/<service>/<instance-id>";
        if !rest.is_empty() && !rest.contains('/') {
            if !p.flat_keys {
                return Err(key_error(
                    key,
                    format!(
                        "an instance directly under the services root: {shape}, e.g. {services}web/web-1; for one key per container there (such as {services}webapp1:49153), run with --flat-keys"
                    ),
                ));
            }
            check_name(key, "instance id", rest, shape)?;
            return Ok(Some(EntryKey::Instance {
                service: flat_service(rest),
                id: rest.to_string(),
            }));
        }
        return Ok(pair(key, rest, "service", "instance id", shape)?
            .map(|(service, id)| EntryKey::Instance { service, id }));
    }
    let Some(rest) = key.strip_prefix(&pointsman) else {
        return Ok(None);
    };
    // `/pointsman/routes` on its own is a directory marker, not an entry.
    let Some((section, rest)) = rest.split_once('/') else {
        return Ok(None);
    };
    match section {
        keys::ROUTES => {
            if rest.is_empty() || rest.ends_with('/') {
                return Ok(None);
            }
            let shape = "expected <pointsman>/routes/<name>";
            if rest.contains('/') {
                return Err(key_error(
                    key,
                    format!("route name must not contain '/': {shape}"),
                ));
            }
            check_name(key, "route name", rest, shape)?;
            Ok(Some(EntryKey::Route {
                name: rest.to_string(),
            }))
        }
        keys::MAPS => {
            if rest.is_empty() || rest.ends_with('/') {
                return Ok(None);
            }
            let shape = "expected <pointsman>/maps/<map>/<key>";
            // The map key is everything after the map name, so keys that are
            // paths (`/blog`) or contain slashes work.
            let Some((map, map_key)) = rest.split_once('/') else {
                return Err(key_error(key, format!("map {rest:?} has no key: {shape}")));
            };
            check_name(key, "map name", map, shape)?;
            if map_key.is_empty() {
                return Err(key_error(key, format!("map key is empty: {shape}")));
            }
            Ok(Some(EntryKey::MapEntry {
                map: map.to_string(),
                key: map_key.to_string(),
            }))
        }
        keys::OVERRIDES => {
            let shape = "expected <pointsman>/overrides/<service>/<instance-id>";
            Ok(pair(key, rest, "service", "instance id", shape)?
                .map(|(service, id)| EntryKey::Override { service, id }))
        }
        keys::PAUSES | keys::MAINTENANCE => {
            if rest.is_empty() || rest.ends_with('/') {
                return Ok(None);
            }
            let shape = format!("expected <pointsman>/{section}/<service>");
            if rest.contains('/') {
                return Err(key_error(
                    key,
                    format!("service name must not contain '/': {shape}"),
                ));
            }
            check_name(key, "service name", rest, &shape)?;
            let service = rest.to_string();
            Ok(Some(if section == keys::PAUSES {
                EntryKey::Pause { service }
            } else {
                EntryKey::Maintenance { service }
            }))
        }
        keys::PAGES => {
            let shape = "expected <pointsman>/pages/<service>/<502|503|504>";
            let Some((service, status)) = pair(key, rest, "service", "status", shape)? else {
                return Ok(None);
            };
            match status.parse::<u16>() {
                Ok(status @ 502..=504) => Ok(Some(EntryKey::Page { service, status })),
                _ => Err(key_error(
                    key,
                    format!("{status:?} is not a status the proxy answers for a service: {shape}"),
                )),
            }
        }
        // `proxies` holds each proxy's own heartbeat; other sections belong
        // to tools or versions that know them.
        _ => Ok(None),
    }
}

/// `<a>/<b>` below a root: `None` for directory-like keys, an error for any
/// other shape.
fn pair(
    key: &str,
    rest: &str,
    first: &str,
    second: &str,
    shape: &str,
) -> Result<Option<(String, String)>, ParseError> {
    if rest.is_empty() || rest.ends_with('/') {
        return Ok(None);
    }
    let Some((a, b)) = rest.split_once('/') else {
        return Err(key_error(
            key,
            format!("{first} {rest:?} has no {second}: {shape}"),
        ));
    };
    check_name(key, first, a, shape)?;
    if b.contains('/') {
        return Err(key_error(
            key,
            format!("{second} {b:?} must not contain '/': {shape}"),
        ));
    }
    check_name(key, second, b, shape)?;
    Ok(Some((a.to_string(), b.to_string())))
}

/// Names end up in runtime commands (`disable server web/a1`), log lines and
/// metrics labels, so they may not be empty or contain blanks.
fn check_name(key: &str, what: &str, name: &str, shape: &str) -> Result<(), ParseError> {
    if name.is_empty() {
        return Err(key_error(key, format!("{what} is empty: {shape}")));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(key_error(
            key,
            format!("{what} {name:?} contains whitespace or control characters: use letters, digits and -._:"),
        ));
    }
    Ok(())
}

fn key_error(key: &str, reason: String) -> ParseError {
    ParseError::Key {
        key: key.to_string(),
        reason,
    }
}

/// The value as trimmed, non-empty UTF-8 text.
fn text<'v>(key: &str, value: &'v [u8], expected: &'static str) -> Result<&'v str, ParseError> {
    let s = maybe_empty(key, value, expected)?;
    if s.is_empty() {
        return Err(ParseError::Empty {
            key: key.to_string(),
            expected,
        });
    }
    Ok(s)
}

/// A maintenance page as written (a page is sent byte for byte); blank
/// means the service's 503 page.
fn maintenance_page(key: &str, value: &[u8]) -> Result<String, ParseError> {
    let page = std::str::from_utf8(value).map_err(|_| ParseError::NotUtf8 {
        key: key.to_string(),
        expected: MAINTENANCE_VALUE,
    })?;
    Ok(if page.trim().is_empty() {
        String::new()
    } else {
        page.to_string()
    })
}

/// [`text`] for values that may be empty: trimmed UTF-8.
fn maybe_empty<'v>(
    key: &str,
    value: &'v [u8],
    expected: &'static str,
) -> Result<&'v str, ParseError> {
    std::str::from_utf8(value)
        .map(str::trim)
        .map_err(|_| ParseError::NotUtf8 {
            key: key.to_string(),
            expected,
        })
}

/// The JSON form of a registration.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceJson {
    address: String,
    #[serde(default = "default_weight")]
    weight: u64,
    #[serde(default)]
    state: AdminState,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    #[serde(default)]
    check: Option<CheckSpec>,
    #[serde(default)]
    backup: bool,
}

fn default_weight() -> u64 {
    u64::from(DEFAULT_WEIGHT)
}

/// Parses the value of one registration, `host:port` or JSON.
///
/// `key` only labels errors: the etcd key, or the file path for the file
/// registry. `service` and `id` must be non-empty and free of `/` and
/// blanks, as in a key.
pub fn parse_instance(
    key: &str,
    service: &str,
    id: &str,
    value: &[u8],
) -> Result<Registration, ParseError> {
    let shape = "expected <service>/<instance-id>";
    for (what, name) in [("service", service), ("instance id", id)] {
        if name.contains('/') {
            return Err(key_error(
                key,
                format!("{what} {name:?} must not contain '/': {shape}"),
            ));
        }
        check_name(key, what, name, shape)?;
    }
    let raw = text(key, value, INSTANCE_VALUE)?;
    let address_of = |s: &str| {
        s.parse::<Address>().map_err(|reason| ParseError::Address {
            key: key.to_string(),
            reason,
        })
    };
    if !raw.starts_with('{') {
        return Ok(Registration::new(service, id, address_of(raw)?));
    }
    let json: InstanceJson = serde_json::from_str(raw).map_err(|e| ParseError::Json {
        key: key.to_string(),
        what: "registration",
        reason: shorten(e.to_string()),
    })?;
    let weight = checked_weight(key, json.weight)?;
    if let Some(check) = &json.check {
        check.validate().map_err(|reason| ParseError::Invalid {
            key: key.to_string(),
            reason,
        })?;
    }
    Ok(Registration {
        service: service.to_string(),
        id: id.to_string(),
        address: address_of(&json.address)?,
        weight,
        state: json.state,
        tags: json.tags,
        meta: json.meta,
        check: json.check,
        backup: json.backup,
    })
}

fn checked_weight(key: &str, weight: u64) -> Result<u16, ParseError> {
    match u16::try_from(weight) {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(ParseError::Weight {
            key: key.to_string(),
            weight,
        }),
    }
}

fn parse_route(key: &str, value: &[u8]) -> Result<RouteSpec, ParseError> {
    let raw = text(key, value, ROUTE_VALUE)?;
    let spec: RouteSpec = serde_json::from_str(raw).map_err(|e| ParseError::Json {
        key: key.to_string(),
        what: "route",
        reason: shorten(e.to_string()),
    })?;
    spec.target().map_err(|reason| ParseError::Invalid {
        key: key.to_string(),
        reason,
    })?;
    Ok(spec)
}

fn parse_override(key: &str, value: &[u8]) -> Result<Override, ParseError> {
    let raw = text(key, value, OVERRIDE_VALUE)?;
    let spec: Override = serde_json::from_str(raw).map_err(|e| ParseError::Json {
        key: key.to_string(),
        what: "override",
        reason: shorten(e.to_string()),
    })?;
    if let Some(w) = spec.weight {
        checked_weight(key, u64::from(w))?;
    }
    Ok(spec)
}

/// A pause: `{"timeout":"30s"}`, or empty (`{}` or nothing) for the
/// default timeout.
fn parse_pause(key: &str, value: &[u8]) -> Result<PauseSpec, ParseError> {
    let raw = maybe_empty(key, value, PAUSE_VALUE)?;
    if raw.is_empty() {
        return Ok(PauseSpec::default());
    }
    let spec: PauseSpec = serde_json::from_str(raw).map_err(|e| ParseError::Json {
        key: key.to_string(),
        what: "pause",
        reason: shorten(e.to_string()),
    })?;
    if spec.timeout.is_zero() {
        return Err(ParseError::Invalid {
            key: key.to_string(),
            reason: "pause timeout is 0: expected a duration such as \"30s\"".into(),
        });
    }
    Ok(spec)
}

#[cfg(test)]
mod tests;
