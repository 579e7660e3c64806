//! Routes from Consul tags, in Fabio's `urlprefix-` format.
//!
//! A tag `urlprefix-<host><path> [option ...]` says "send requests for
//! `<host><path>` to this service". Supported:
//!
//! - `urlprefix-/path` (any host), `urlprefix-example.com/path`,
//!   `urlprefix-*.example.com/path`;
//! - `strip=<path>` where `<path>` is the route's own path: the path prefix
//!   is removed before forwarding;
//! - `weight=<fraction>` (0 to 1): this service's share of a route that
//!   several services claim;
//! - `proto=http`, the default.
//!
//! Everything else is refused with a reason: TCP routes (`urlprefix-:3306
//! proto=tcp`), other protocols, redirects, access rules, and a `strip=`
//! that is not the route's path (pointsman strips the whole prefix or
//! nothing).

use std::collections::BTreeMap;

use crate::{RouteSpec, SplitSpec};

/// Split weights are integers; fractions are kept to this resolution.
pub const WEIGHT_SCALE: u32 = 10_000;

/// One parsed `urlprefix-` tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTag {
    pub host: Option<String>,
    pub path: String,
    pub strip: bool,
    /// `weight=` in units of 1/[`WEIGHT_SCALE`].
    pub weight: Option<u32>,
}

/// Parses `tag`: `None` if it does not start with `prefix` (not a route
/// tag), `Some(Err(reason))` if it does but cannot be honoured.
pub fn parse_tag(prefix: &str, tag: &str) -> Option<Result<RouteTag, String>> {
    let rest = tag.strip_prefix(prefix)?;
    Some(parse_rest(rest))
}

fn parse_rest(rest: &str) -> Result<RouteTag, String> {
    let mut words = rest.split_whitespace();
    let target = words.next().unwrap_or("");
    if target.is_empty() {
        return Err("no route after the prefix: expected e.g. urlprefix-/path or urlprefix-example.com/path".to_string());
    }
    let Some(slash) = target.find('/') else {
        if target.starts_with(':') {
            return Err(format!(
                "{target:?} is a TCP route, which pointsman does not take from Consul tags: only HTTP routes (urlprefix-[host]/path)"
            ));
        }
        return Err(format!(
            "{target:?} has no path: expected [host]/path, e.g. example.com/ or /api"
        ));
    };
    let (host, path) = target.split_at(slash);
    let host = if host.is_empty() {
        None
    } else {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        let ok = !bare.is_empty()
            && bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c));
        if !ok {
            return Err(format!(
                "host {host:?} is not a host name: expected example.com or *.example.com"
            ));
        }
        Some(host.to_ascii_lowercase())
    };
    let mut tag = RouteTag {
        host,
        path: path.to_string(),
        strip: false,
        weight: None,
    };
    for word in words {
        let (name, value) = word.split_once('=').unwrap_or((word, ""));
        match name {
            "strip" => {
                if value != tag.path {
                    return Err(format!(
                        "strip={value} must equal the route's path {}: pointsman strips the whole path prefix or nothing",
                        tag.path
                    ));
                }
                tag.strip = true;
            }
            "weight" => tag.weight = Some(parse_weight(value)?),
            "proto" if value == "http" => {}
            "proto" => {
                return Err(format!(
                    "proto={value} is not supported: pointsman takes HTTP routes (proto=http) from Consul tags"
                ))
            }
            _ => {
                return Err(format!(
                    "option {word:?} is not supported: use strip=<path>, weight=<0..1> or proto=http"
                ))
            }
        }
    }
    Ok(tag)
}

fn parse_weight(value: &str) -> Result<u32, String> {
    let w: f64 = value.parse().map_err(|_| {
        format!("weight={value} is not a number: expected a fraction from 0 to 1, e.g. weight=0.25")
    })?;
    if !w.is_finite() || !(0.0..=1.0).contains(&w) {
        return Err(format!(
            "weight={value} is out of range: expected a fraction from 0 to 1, e.g. weight=0.25"
        ));
    }
    // In range, so the product fits.
    Ok((w * f64::from(WEIGHT_SCALE)).round() as u32)
}

/// A service's claim on one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub service: String,
    pub strip: bool,
    pub weight: Option<u32>,
}

/// The deterministic route name for `host` + `path`: `consul:` followed by
/// the host (nothing for any host) and the path, with `%`, `/`, blanks and
/// control characters percent-encoded so the name is one path segment:
/// `consul:example.com%2Fblog`, `consul:%2Fapi`.
pub fn route_name(host: Option<&str>, path: &str) -> String {
    let mut name = String::from("consul:");
    for c in host.unwrap_or("").chars().chain(path.chars()) {
        if c == '%' || c == '/' || c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                name.push_str(&format!("%{b:02X}"));
            }
        } else {
            name.push(c);
        }
    }
    name
}

/// Builds the route for one host + path from the claims of every service
/// on it (one claim per service, any order).
///
/// - One service: a route to that service; a `weight=` changes nothing.
/// - Several: a split. Services with `weight=` get that fraction of the
///   traffic; the rest is shared equally by the services without one (the
///   first ones by name take the rounding remainder). If the fractions add
///   up to 1 or more, they are scaled to add up to 1 and the services
///   without one get nothing.
/// - Every service on a route must agree on `strip`: the first one by name
///   decides, and a service that disagrees is left out, with a reason.
///
/// Returns the route (or why there is none) and the services left out.
pub fn build_route(
    host: Option<&str>,
    path: &str,
    claims: &[Claim],
) -> (Result<RouteSpec, String>, Vec<(String, String)>) {
    let mut sorted: Vec<&Claim> = claims.iter().collect();
    sorted.sort_by(|a, b| a.service.cmp(&b.service));
    sorted.dedup_by(|a, b| a.service == b.service);
    let mut left_out = Vec::new();
    let Some(first) = sorted.first() else {
        return (Err("no service claims this route".to_string()), left_out);
    };
    let strip = first.strip;
    let mut arms: Vec<&Claim> = Vec::new();
    for c in &sorted {
        if c.strip == strip {
            arms.push(c);
        } else {
            left_out.push((
                c.service.clone(),
                format!(
                    "route {}{path}: service {:?} {} strip but {:?} {}; every service on a route must agree, so {:?} is left out of it",
                    host.unwrap_or(""),
                    c.service,
                    if c.strip { "asks for" } else { "does not ask for" },
                    first.service,
                    if strip { "does" } else { "does not" },
                    c.service,
                ),
            ));
        }
    }
    let mut spec = RouteSpec {
        host: host.map(str::to_string),
        path_prefix: path.to_string(),
        strip_prefix: strip,
        ..RouteSpec::default()
    };
    if let [only] = arms.as_slice() {
        spec.service = Some(only.service.clone());
    } else {
        spec.split = split_weights(&arms);
    }
    let result = spec.target().map(|_| spec);
    (result, left_out)
}

fn split_weights(arms: &[&Claim]) -> Vec<SplitSpec> {
    let fixed: u32 = arms.iter().filter_map(|c| c.weight).sum();
    let free = arms.iter().filter(|c| c.weight.is_none()).count();
    let mut weights: BTreeMap<&str, u32> = BTreeMap::new();
    if free == 0 || fixed >= WEIGHT_SCALE {
        // Only fixed shares (or more than everything): relative weights,
        // scaled so they add up to WEIGHT_SCALE when they exceed it.
        for c in arms {
            let w = c.weight.unwrap_or(0);
            let w = if fixed > WEIGHT_SCALE {
                // w <= fixed, so the result is <= WEIGHT_SCALE.
                u32::try_from(u64::from(w) * u64::from(WEIGHT_SCALE) / u64::from(fixed))
                    .unwrap_or(WEIGHT_SCALE)
            } else {
                w
            };
            weights.insert(&c.service, w);
        }
    } else {
        let rest = WEIGHT_SCALE - fixed;
        let n = u32::try_from(free).unwrap_or(u32::MAX);
        let (each, mut extra) = (rest / n, rest % n);
        for c in arms {
            let w = match c.weight {
                Some(w) => w,
                None => {
                    let bonus = u32::from(extra > 0);
                    extra = extra.saturating_sub(1);
                    each + bonus
                }
            };
            weights.insert(&c.service, w);
        }
    }
    weights
        .into_iter()
        .map(|(service, weight)| SplitSpec {
            service: service.to_string(),
            weight,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "urlprefix-";

    fn tag(s: &str) -> RouteTag {
        match parse_tag(P, s) {
            Some(Ok(t)) => t,
            other => panic!("{s}: expected a route tag, got {other:?}"),
        }
    }

    fn refused(s: &str) -> String {
        match parse_tag(P, s) {
            Some(Err(reason)) => reason,
            other => panic!("{s}: expected a refusal, got {other:?}"),
        }
    }

    fn claim(service: &str, strip: bool, weight: Option<u32>) -> Claim {
        Claim {
            service: service.to_string(),
            strip,
            weight,
        }
    }

    fn split(spec: &RouteSpec) -> Vec<(String, u32)> {
        spec.split
            .iter()
            .map(|s| (s.service.clone(), s.weight))
            .collect()
    }

    #[test]
    fn other_tags_are_not_routes() {
        assert_eq!(parse_tag(P, "green"), None);
        assert_eq!(parse_tag(P, "weight=3"), None);
        assert_eq!(parse_tag(P, "urlprefix"), None);
        assert_eq!(parse_tag("route-", "urlprefix-/a"), None);
    }

    #[test]
    fn host_and_path_forms() {
        assert_eq!(
            tag("urlprefix-/api"),
            RouteTag {
                host: None,
                path: "/api".into(),
                strip: false,
                weight: None
            }
        );
        let t = tag("urlprefix-Example.com/blog");
        assert_eq!(t.host.as_deref(), Some("example.com"));
        assert_eq!(t.path, "/blog");
        assert_eq!(tag("urlprefix-example.com/").path, "/");
        assert_eq!(
            tag("urlprefix-*.example.com/").host.as_deref(),
            Some("*.example.com")
        );
    }

    #[test]
    fn strip_weight_and_proto_options() {
        let t = tag("urlprefix-/api strip=/api");
        assert!(t.strip);
        let t = tag("urlprefix-example.com/canary weight=0.25 proto=http");
        assert_eq!(t.weight, Some(2500));
        assert!(!t.strip);
        assert_eq!(tag("urlprefix-/a weight=0").weight, Some(0));
        assert_eq!(tag("urlprefix-/a weight=1").weight, Some(WEIGHT_SCALE));
        assert_eq!(tag("urlprefix-/a  weight=0.33333").weight, Some(3333));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_with_a_reason() {
        assert!(refused("urlprefix-").contains("no route"));
        assert!(refused("urlprefix-:3306 proto=tcp").contains("TCP route"));
        assert!(refused("urlprefix-example.com").contains("has no path"));
        assert!(refused("urlprefix-exa mple.com/").contains("has no path"));
        assert!(refused("urlprefix-ex@mple.com/").contains("not a host name"));
        assert!(refused("urlprefix-/api/v1 strip=/api").contains("must equal the route's path"));
        assert!(refused("urlprefix-/a weight=1.5").contains("out of range"));
        assert!(refused("urlprefix-/a weight=-0.1").contains("out of range"));
        assert!(refused("urlprefix-/a weight=NaN").contains("out of range"));
        assert!(refused("urlprefix-/a weight=half").contains("not a number"));
        assert!(refused("urlprefix-/a proto=https").contains("proto=https"));
        assert!(refused("urlprefix-/a redirect=301,https://x/").contains("not supported"));
        assert!(refused("urlprefix-/a tlsskipverify=true").contains("not supported"));
    }

    #[test]
    fn route_names_are_one_path_segment_and_distinct() {
        assert_eq!(route_name(None, "/"), "consul:%2F");
        assert_eq!(
            route_name(Some("example.com"), "/blog"),
            "consul:example.com%2Fblog"
        );
        assert_ne!(route_name(None, "/a-b"), route_name(None, "/a/b"));
        assert_ne!(route_name(None, "/a%2Fb"), route_name(None, "/a/b"));
        for name in [
            route_name(Some("*.x.org"), "/a b/\t%"),
            route_name(None, "/"),
        ] {
            assert!(
                !name.contains('/') && !name.chars().any(char::is_whitespace),
                "{name}"
            );
        }
    }

    #[test]
    fn one_service_gets_a_plain_route() {
        let (spec, left_out) =
            build_route(Some("example.com"), "/blog", &[claim("blog", true, None)]);
        let spec = spec.unwrap();
        assert_eq!(spec.service.as_deref(), Some("blog"));
        assert_eq!(spec.host.as_deref(), Some("example.com"));
        assert_eq!(spec.path_prefix, "/blog");
        assert!(spec.strip_prefix);
        assert!(spec.split.is_empty());
        assert!(left_out.is_empty());
        // A weight alone changes nothing.
        let (spec, _) = build_route(None, "/", &[claim("web", false, Some(2500))]);
        assert_eq!(spec.unwrap().service.as_deref(), Some("web"));
    }

    #[test]
    fn several_services_share_equally() {
        let (spec, _) = build_route(
            None,
            "/shop",
            &[
                claim("shop-b", false, None),
                claim("shop-a", false, None),
                claim("shop-c", false, None),
            ],
        );
        let spec = spec.unwrap();
        assert_eq!(spec.service, None);
        assert_eq!(
            split(&spec),
            vec![
                ("shop-a".into(), 3334),
                ("shop-b".into(), 3333),
                ("shop-c".into(), 3333)
            ]
        );
    }

    #[test]
    fn weights_take_their_share_and_the_rest_is_shared() {
        let (spec, _) = build_route(
            None,
            "/",
            &[claim("v1", false, None), claim("v2", false, Some(2500))],
        );
        assert_eq!(
            split(&spec.unwrap()),
            vec![("v1".into(), 7500), ("v2".into(), 2500)]
        );
        // Fractions over 1 are scaled down; the unweighted get nothing.
        let (spec, _) = build_route(
            None,
            "/",
            &[
                claim("a", false, Some(10_000)),
                claim("b", false, Some(10_000)),
                claim("c", false, None),
            ],
        );
        assert_eq!(
            split(&spec.unwrap()),
            vec![("a".into(), 5000), ("b".into(), 5000), ("c".into(), 0)]
        );
        // Only weighted services: relative weights.
        let (spec, _) = build_route(
            None,
            "/",
            &[claim("a", false, Some(1000)), claim("b", false, Some(3000))],
        );
        assert_eq!(
            split(&spec.unwrap()),
            vec![("a".into(), 1000), ("b".into(), 3000)]
        );
        // All zero: no route, with a reason.
        let (spec, _) = build_route(
            None,
            "/",
            &[claim("a", false, Some(0)), claim("b", false, Some(0))],
        );
        assert!(spec.unwrap_err().contains("weight 0"));
    }

    #[test]
    fn services_that_disagree_on_strip_are_left_out() {
        let (spec, left_out) = build_route(
            None,
            "/api",
            &[
                claim("b", false, None),
                claim("a", true, None),
                claim("c", true, None),
            ],
        );
        let spec = spec.unwrap();
        assert!(spec.strip_prefix);
        assert_eq!(split(&spec), vec![("a".into(), 5000), ("c".into(), 5000)]);
        assert_eq!(left_out.len(), 1);
        assert_eq!(left_out[0].0, "b");
        assert!(left_out[0].1.contains("must agree"), "{}", left_out[0].1);
    }
}
