//! Routes: which requests go to which service. The same shape comes from the
//! config file (`[[routes]]`) and from `/pointsman/routes/<name>`.

use serde::{Deserialize, Serialize};

/// A route as written by a person (config file or registry).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// `example.com` (exact) or `*.example.com` (any subdomain); absent
    /// matches every host.
    #[serde(default)]
    pub host: Option<String>,
    /// Matches paths that start with it; `/` matches all.
    #[serde(default = "root")]
    pub path_prefix: String,
    /// Remove `path_prefix` from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Target: one service.
    #[serde(default)]
    pub service: Option<String>,
    /// Target: the service named by `map[map_key]`, read per request.
    #[serde(default)]
    pub map: Option<String>,
    /// A literal key, or `req.host`, `req.path`, `req.hdr(<name>)`,
    /// `req.cookie(<name>)`.
    #[serde(default)]
    pub map_key: Option<String>,
    /// Service used when the map has no entry for the key.
    #[serde(default)]
    pub map_default: Option<String>,
    /// Target: a weighted split across services (canary).
    #[serde(default)]
    pub split: Vec<SplitSpec>,
    /// Requests that come in the clear get a 308 to the same URL over
    /// https (on `https_port`, else the default port).
    #[serde(default)]
    pub https_redirect: bool,
    #[serde(default)]
    pub https_port: Option<u16>,
    /// Responses over TLS carry `Strict-Transport-Security: max-age=N`.
    #[serde(default)]
    pub hsts_max_age: Option<u64>,
}

fn root() -> String {
    "/".to_string()
}

/// One arm of a weighted split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    pub service: String,
    pub weight: u32,
}

/// What a route sends its requests to, once validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteTarget {
    Service(String),
    Map {
        map: String,
        key: String,
        default: Option<String>,
    },
    Split(Vec<SplitSpec>),
}

impl RouteSpec {
    /// Checks the spec and returns its target, or says what to fix.
    pub fn target(&self) -> Result<RouteTarget, String> {
        if !self.path_prefix.starts_with('/') {
            return Err(format!(
                "path_prefix {:?} must start with '/'",
                self.path_prefix
            ));
        }
        if let Some(host) = &self.host {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty() || bare.contains('*') || bare.contains('/') {
                return Err(format!(
                    "host {host:?} is not a host name: expected example.com or *.example.com"
                ));
            }
        }
        let kinds = [
            self.service.is_some(),
            self.map.is_some(),
            !self.split.is_empty(),
        ]
        .iter()
        .filter(|k| **k)
        .count();
        if kinds != 1 {
            return Err(
                "a route needs exactly one target: `service`, `map` with `map_key`, or `split`"
                    .to_string(),
            );
        }
        if let Some(service) = &self.service {
            return Ok(RouteTarget::Service(service.clone()));
        }
        if let Some(map) = &self.map {
            let key = self
                .map_key
                .clone()
                .ok_or_else(|| format!("route uses map {map:?} but has no `map_key`"))?;
            MapKey::parse(&key)?;
            return Ok(RouteTarget::Map {
                map: map.clone(),
                key,
                default: self.map_default.clone(),
            });
        }
        if self.split.iter().all(|s| s.weight == 0) {
            return Err("every arm of `split` has weight 0: give at least one a weight".into());
        }
        Ok(RouteTarget::Split(self.split.clone()))
    }
}

/// How a map route computes its key from a request, with HAProxy's fetch
/// names: a literal, `req.host`, `req.path`, `req.hdr(<name>)` or
/// `req.cookie(<name>)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapKey {
    Literal(String),
    Host,
    Path,
    /// A header name, lower-cased.
    Header(String),
    Cookie(String),
}

impl MapKey {
    /// Parses a `map_key`, or says what is expected.
    pub fn parse(s: &str) -> Result<MapKey, String> {
        let arg = |prefix: &str| {
            s.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(')'))
                .filter(|a| !a.is_empty())
        };
        Ok(match s {
            "req.host" => MapKey::Host,
            "req.path" => MapKey::Path,
            _ if s.starts_with("req.hdr(") => {
                let name =
                    arg("req.hdr(").ok_or_else(|| format!("map_key {s:?}: expected req.hdr(<name>)"))?;
                // A header name is an HTTP token.
                if !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                {
                    return Err(format!("map_key {s:?}: {name:?} is not a header name"));
                }
                MapKey::Header(name.to_ascii_lowercase())
            }
            _ if s.starts_with("req.cookie(") => {
                let name = arg("req.cookie(")
                    .ok_or_else(|| format!("map_key {s:?}: expected req.cookie(<name>)"))?;
                MapKey::Cookie(name.to_string())
            }
            _ if s.starts_with("req.") => {
                return Err(format!(
                    "map_key {s:?} is not known: use a literal key, req.host, req.path, req.hdr(<name>) or req.cookie(<name>)"
                ))
            }
            _ => MapKey::Literal(s.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keys_parse_haproxy_fetches() {
        assert_eq!(
            MapKey::parse("STATIC"),
            Ok(MapKey::Literal("STATIC".into()))
        );
        assert_eq!(MapKey::parse("req.host"), Ok(MapKey::Host));
        assert_eq!(
            MapKey::parse("req.hdr(X-User)"),
            Ok(MapKey::Header("x-user".into()))
        );
        assert_eq!(
            MapKey::parse("req.cookie(v)"),
            Ok(MapKey::Cookie("v".into()))
        );
        assert!(MapKey::parse("req.nope").is_err());
        assert!(MapKey::parse("req.hdr()").is_err());
        assert!(MapKey::parse("req.hdr(a b)").is_err());
    }

    #[test]
    fn a_route_with_an_unknown_fetch_is_refused() {
        let spec = RouteSpec {
            path_prefix: "/".into(),
            map: Some("release".into()),
            map_key: Some("req.nope".into()),
            ..Default::default()
        };
        let err = spec.target().unwrap_err();
        assert!(
            err.contains("req.nope") && err.contains("req.hdr(<name>)"),
            "{err}"
        );
    }
}
