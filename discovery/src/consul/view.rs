//! From Consul's answers to entries: what `/v1/health/service/<name>`
//! returns, for every service in the catalog, becomes instances and routes.
//! Pure functions; the watcher owns the state and reports the problems.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::tags::{build_route, parse_tag, route_name, Claim};
use super::{BACKUP_TAG, META_STATE, META_WEIGHT};
use crate::registration::{DEFAULT_WEIGHT, MAX_WEIGHT};
use crate::{Address, AddressError, AdminState, Change, Entry, EntryKey, ParseError, Registration};

/// One element of `/v1/health/service/<name>`: an instance, its node and
/// its checks. Only the fields pointsman reads; Consul sends many more.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthEntry {
    pub node: NodeInfo,
    pub service: ServiceInfo,
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks: Vec<CheckInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeInfo {
    #[serde(default, deserialize_with = "null_as_default")]
    pub node: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceInfo {
    #[serde(rename = "ID", default, deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
    /// Signed and wide, so that a bad port is reported, not a decode error.
    #[serde(default)]
    pub port: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub meta: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckInfo {
    #[serde(rename = "CheckID", default, deserialize_with = "null_as_default")]
    pub check_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: String,
    #[serde(rename = "ServiceID", default, deserialize_with = "null_as_default")]
    pub service_id: String,
}

/// Consul writes `null` for empty lists and maps in some versions.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One service's answer, element by element: an element that does not
/// decode is kept as its reason, so one odd instance cannot hide the rest.
pub type ServiceEntries = Vec<Result<HealthEntry, String>>;

/// Decodes a `/v1/health/service/<name>` body.
pub fn decode_health(body: &[u8]) -> Result<ServiceEntries, String> {
    let raw: Vec<serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON list of instances: {e}"))?;
    let mut entries: ServiceEntries = raw
        .into_iter()
        .map(|v| serde_json::from_value::<HealthEntry>(v).map_err(|e| e.to_string()))
        .collect();
    // Consul's order is by node; by instance id is stabler.
    entries.sort_by(|a, b| match (a, b) {
        (Ok(a), Ok(b)) => a.service.id.cmp(&b.service.id),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(a), Err(b)) => a.cmp(b),
    });
    Ok(entries)
}

/// Decodes a `/v1/catalog/services` body: the service names.
pub fn decode_catalog(body: &[u8]) -> Result<Vec<String>, String> {
    let map: BTreeMap<String, Option<Vec<String>>> = serde_json::from_slice(body)
        .map_err(|e| format!("not a JSON object of service names: {e}"))?;
    Ok(map.into_keys().collect())
}

/// Whether every check of the entry (the node's and the instance's) is
/// `passing`, as Consul's own `?passing` filter decides. An instance with
/// no checks at all is passing.
pub fn is_passing(e: &HealthEntry) -> bool {
    e.checks.iter().all(|c| c.status == "passing")
}

/// What a set of answers means, and what was wrong in it.
#[derive(Debug, Default)]
pub struct Derived {
    pub entries: BTreeMap<EntryKey, Entry>,
    /// Subject (instance, tag or route) -> the reason, ready to log.
    pub problems: BTreeMap<String, String>,
}

/// Turns every service's entries into instances and routes.
///
/// - An instance is an entry when it decodes and all its checks pass.
/// - An instance that does not decode is a problem; if it passes and had a
///   good value in `last`, that value is kept (as for any registry value).
/// - Routes come from the tags of every instance Consul lists, passing or
///   not, so a service whose instances all fail keeps its route (and
///   answers 503) instead of its traffic falling through to another route.
pub fn derive(
    services: &BTreeMap<String, ServiceEntries>,
    tag_prefix: &str,
    last: &BTreeMap<EntryKey, Entry>,
) -> Derived {
    let mut out = Derived::default();
    let mut claims = Claims::new();
    for (name, entries) in services {
        for (i, entry) in entries.iter().enumerate() {
            let e = match entry {
                Ok(e) => e,
                Err(reason) => {
                    out.problems.insert(
                        format!("consul {name}: instance #{i}"),
                        format!("consul {name}: an instance does not decode: {reason}"),
                    );
                    continue;
                }
            };
            let label = format!("consul {name}/{}", e.service.id);
            out.add_instance(name, &label, e, last);
            out.claim_routes(&mut claims, name, &label, e, tag_prefix);
        }
    }
    for ((host, path), by_service) in claims {
        out.add_route(host.as_deref(), &path, by_service, last);
    }
    out
}

/// (host, path) -> service -> (claim, the instance it came from).
type Claims = BTreeMap<(Option<String>, String), BTreeMap<String, (Claim, String)>>;

impl Derived {
    /// An instance that decodes and passes becomes an entry; one that does
    /// not decode is a problem, and keeps its last good value if it passes.
    fn add_instance(
        &mut self,
        name: &str,
        label: &str,
        e: &HealthEntry,
        last: &BTreeMap<EntryKey, Entry>,
    ) {
        let passing = is_passing(e);
        match instance(name, label, e) {
            Ok(reg) => {
                if passing {
                    self.entries.insert(
                        EntryKey::Instance {
                            service: reg.service.clone(),
                            id: reg.id.clone(),
                        },
                        Entry::Instance(reg),
                    );
                }
            }
            Err(err) => {
                let key = EntryKey::Instance {
                    service: name.to_string(),
                    id: e.service.id.clone(),
                };
                let mut reason = err.to_string();
                if passing {
                    if let Some(good) = last.get(&key) {
                        self.entries.insert(key, good.clone());
                        reason.push_str("; keeping its last good value");
                    }
                }
                self.problems.insert(label.to_string(), reason);
            }
        }
    }

    /// The routes an instance's tags claim, passing or not; the first
    /// instance by id decides a service's options on a route.
    fn claim_routes(
        &mut self,
        claims: &mut Claims,
        name: &str,
        label: &str,
        e: &HealthEntry,
        tag_prefix: &str,
    ) {
        for tag in &e.service.tags {
            match parse_tag(tag_prefix, tag) {
                None => {}
                Some(Err(reason)) => {
                    self.problems.insert(
                        format!("{label}: tag {tag:?}"),
                        format!("{label}: tag {tag:?} is ignored: {reason}"),
                    );
                }
                Some(Ok(t)) => {
                    let claim = Claim {
                        service: name.to_string(),
                        strip: t.strip,
                        weight: t.weight,
                    };
                    let on_route = claims.entry((t.host.clone(), t.path.clone())).or_default();
                    match on_route.get(name) {
                        None => {
                            on_route.insert(name.to_string(), (claim, e.service.id.clone()));
                        }
                        Some((first, from)) if *first != claim => {
                            self.problems.insert(
                                format!("{label}: tag {tag:?}"),
                                format!(
                                    "{label}: tag {tag:?} has other options than the same route on instance {from:?}; using {from:?}'s (the first by id)"
                                ),
                            );
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }

    /// One route from every service's claim on (host, path); a route that
    /// cannot be built is a problem and keeps its last good value.
    fn add_route(
        &mut self,
        host: Option<&str>,
        path: &str,
        by_service: BTreeMap<String, (Claim, String)>,
        last: &BTreeMap<EntryKey, Entry>,
    ) {
        let name = route_name(host, path);
        let list: Vec<Claim> = by_service.into_values().map(|(c, _)| c).collect();
        let (route, left_out) = build_route(host, path, &list);
        for (service, reason) in left_out {
            self.problems
                .insert(format!("route {name}: service {service}"), reason);
        }
        let key = EntryKey::Route { name: name.clone() };
        match route {
            Ok(spec) => {
                self.entries.insert(key, Entry::Route { name, spec });
            }
            Err(reason) => {
                let mut reason = format!("route {name} ({}{path}): {reason}", host.unwrap_or(""));
                if let Some(good) = last.get(&key) {
                    self.entries.insert(key, good.clone());
                    reason.push_str("; keeping its last good value");
                }
                self.problems.insert(format!("route {name}"), reason);
            }
        }
    }
}

/// One Consul instance as a registration.
fn instance(name: &str, label: &str, e: &HealthEntry) -> Result<Registration, ParseError> {
    let invalid = |reason: String| ParseError::Invalid {
        key: label.to_string(),
        reason,
    };
    for (what, value) in [
        ("service name", name),
        ("service id", e.service.id.as_str()),
    ] {
        if value.is_empty() {
            return Err(invalid(format!("{what} is empty")));
        }
        if value.contains('/') || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(format!(
                "{what} {value:?} contains '/', whitespace or control characters: use letters, digits and -._:"
            )));
        }
    }
    let host = if e.service.address.trim().is_empty() {
        e.node.address.trim()
    } else {
        e.service.address.trim()
    };
    let address_error = |reason: AddressError| ParseError::Address {
        key: label.to_string(),
        reason,
    };
    let shown = if host.contains(':') {
        format!("[{host}]:{}", e.service.port)
    } else {
        format!("{host}:{}", e.service.port)
    };
    if host.is_empty() {
        return Err(address_error(AddressError::Empty(crate::excerpt::quote(
            &shown,
        ))));
    }
    let port = u16::try_from(e.service.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| address_error(AddressError::BadPort(crate::excerpt::quote(&shown))))?;
    let address: Address = shown.parse().map_err(address_error)?;
    debug_assert_eq!(address.port(), port);

    let weight = match e.service.meta.get(META_WEIGHT) {
        None => DEFAULT_WEIGHT,
        Some(raw) => match raw.trim().parse::<u64>() {
            Ok(w) if w <= u64::from(MAX_WEIGHT) => u16::try_from(w).unwrap_or(MAX_WEIGHT),
            Ok(_) => {
                return Err(invalid(format!(
                    "meta {META_WEIGHT} {raw:?} is out of range: expected 0 to {MAX_WEIGHT}"
                )))
            }
            Err(_) => {
                return Err(invalid(format!(
                    "meta {META_WEIGHT} {raw:?} is not a number: expected 0 to {MAX_WEIGHT}"
                )))
            }
        },
    };
    let state = match e.service.meta.get(META_STATE) {
        None => AdminState::Ready,
        Some(raw) => raw
            .trim()
            .parse::<AdminState>()
            .map_err(|reason| invalid(format!("meta {META_STATE}: {reason}")))?,
    };
    Ok(Registration {
        service: name.to_string(),
        id: e.service.id.clone(),
        address,
        weight,
        state,
        tags: e.service.tags.clone(),
        meta: e.service.meta.clone(),
        check: None,
        backup: e.service.tags.iter().any(|t| t == BACKUP_TAG),
    })
}

/// What turns `old` into `new`: removals, then upserts, by key.
pub fn diff(old: &BTreeMap<EntryKey, Entry>, new: &BTreeMap<EntryKey, Entry>) -> Vec<Change> {
    let mut changes: Vec<Change> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| Change::Remove(k.clone()))
        .collect();
    changes.extend(
        new.iter()
            .filter(|(k, e)| old.get(*k) != Some(*e))
            .map(|(_, e)| Change::Upsert(e.clone())),
    );
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(
        id: &str,
        address: &str,
        port: i64,
        tags: &[&str],
        meta: &[(&str, &str)],
        status: &str,
    ) -> serde_json::Value {
        let meta: BTreeMap<&str, &str> = meta.iter().copied().collect();
        json!({
            "Node": {"ID": "n", "Node": "node1", "Address": "10.0.0.1", "Datacenter": "dc1"},
            "Service": {"ID": id, "Service": "web", "Address": address, "Port": port,
                        "Tags": tags, "Meta": meta},
            "Checks": [
                {"CheckID": "serfHealth", "Status": "passing", "ServiceID": ""},
                {"CheckID": format!("service:{id}"), "Status": status, "ServiceID": id}
            ]
        })
    }

    fn services(list: Vec<serde_json::Value>) -> BTreeMap<String, ServiceEntries> {
        let body = serde_json::to_vec(&list).unwrap();
        BTreeMap::from([("web".to_string(), decode_health(&body).unwrap())])
    }

    fn instance_of(d: &Derived, id: &str) -> Option<Registration> {
        match d.entries.get(&EntryKey::Instance {
            service: "web".into(),
            id: id.into(),
        }) {
            Some(Entry::Instance(r)) => Some(r.clone()),
            _ => None,
        }
    }

    #[test]
    fn passing_instances_become_registrations() {
        let d = derive(
            &services(vec![
                entry(
                    "a1",
                    "10.0.0.5",
                    8080,
                    &["green"],
                    &[("version", "2"), (META_WEIGHT, "10"), (META_STATE, "drain")],
                    "passing",
                ),
                entry("a2", "", 8081, &[], &[], "passing"),
                entry("a3", "fd00::7", 80, &[], &[], "passing"),
            ]),
            "urlprefix-",
            &BTreeMap::new(),
        );
        let a1 = instance_of(&d, "a1").unwrap();
        assert_eq!(a1.address, Address::new("10.0.0.5", 8080));
        assert_eq!(a1.weight, 10);
        assert_eq!(a1.state, AdminState::Drain);
        assert_eq!(a1.tags, vec!["green".to_string()]);
        assert_eq!(a1.meta.get("version").map(String::as_str), Some("2"));
        // Empty service address: the node's.
        assert_eq!(
            instance_of(&d, "a2").unwrap().address,
            Address::new("10.0.0.1", 8081)
        );
        assert_eq!(
            instance_of(&d, "a3").unwrap().address.to_string(),
            "[fd00::7]:80"
        );
        assert_eq!(instance_of(&d, "a3").unwrap().weight, DEFAULT_WEIGHT);
        assert!(d.problems.is_empty(), "{:?}", d.problems);
    }

    #[test]
    fn failing_checks_are_not_routable_but_keep_their_routes() {
        for status in ["critical", "warning", "maintenance"] {
            let d = derive(
                &services(vec![entry(
                    "a1",
                    "10.0.0.5",
                    80,
                    &["urlprefix-/web"],
                    &[],
                    status,
                )]),
                "urlprefix-",
                &BTreeMap::new(),
            );
            assert_eq!(instance_of(&d, "a1"), None, "{status}");
            let route = d.entries.get(&EntryKey::Route {
                name: "consul:%2Fweb".into(),
            });
            assert!(
                matches!(route, Some(Entry::Route { spec, .. }) if spec.service.as_deref() == Some("web")),
                "{status}: {route:?}"
            );
        }
    }

    #[test]
    fn malformed_instances_are_problems_and_keep_their_last_good_value() {
        let list = vec![
            entry(
                "a1",
                "10.0.0.5",
                8080,
                &[],
                &[(META_WEIGHT, "300")],
                "passing",
            ),
            entry("a2", "10.0.0.5", 0, &[], &[], "passing"),
            entry("a3", "10.0.0.5", 70000, &[], &[], "passing"),
            entry(
                "a4",
                "10.0.0.5",
                80,
                &[],
                &[(META_STATE, "down")],
                "passing",
            ),
            entry(
                "a5",
                "10.0.0.5",
                80,
                &[],
                &[(META_WEIGHT, "ten")],
                "passing",
            ),
            entry("a 6", "10.0.0.5", 80, &[], &[], "passing"),
            entry("a7", "bad host!", 80, &[], &[], "passing"),
        ];
        let d = derive(&services(list.clone()), "urlprefix-", &BTreeMap::new());
        assert!(d.entries.is_empty(), "{:?}", d.entries);
        let reasons: Vec<&String> = d.problems.values().collect();
        assert_eq!(reasons.len(), 7, "{reasons:?}");
        let all = reasons
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        for needle in [
            "consul web/a1: meta pointsman-weight \"300\" is out of range: expected 0 to 256",
            "consul web/a2: address \"10.0.0.5:0\" has an invalid port",
            "consul web/a3: address \"10.0.0.5:70000\" has an invalid port",
            "consul web/a4: meta pointsman-state: unknown state \"down\"",
            "consul web/a5: meta pointsman-weight \"ten\" is not a number",
            "service id \"a 6\" contains '/', whitespace",
            "consul web/a7: address \"bad host!:80\" has an invalid host",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in\n{all}");
        }
        // With a good value delivered before, a passing instance keeps it.
        let good = Registration::new("web", "a1", Address::new("10.0.0.5", 8080));
        let last = BTreeMap::from([(
            EntryKey::Instance {
                service: "web".into(),
                id: "a1".into(),
            },
            Entry::Instance(good.clone()),
        )]);
        let d = derive(&services(list), "urlprefix-", &last);
        assert_eq!(instance_of(&d, "a1"), Some(good));
        assert!(d
            .problems
            .values()
            .any(|r| r.contains("keeping its last good value")));
    }

    #[test]
    fn routes_from_tags_merge_across_services() {
        let body = |svc: &str, id: &str, tags: &[&str]| {
            json!([{
                "Node": {"Node": "node1", "Address": "10.0.0.1"},
                "Service": {"ID": id, "Service": svc, "Address": "", "Port": 80, "Tags": tags, "Meta": null},
                "Checks": null
            }])
        };
        let mut services = BTreeMap::new();
        for (svc, id, tags) in [
            (
                "blog",
                "b1",
                vec!["urlprefix-example.com/blog strip=/blog", "urlprefix-/shop"],
            ),
            ("shop", "s1", vec!["urlprefix-/shop weight=0.1"]),
            ("shop", "s2", vec!["urlprefix-/shop weight=0.2"]),
            ("tcp", "t1", vec!["urlprefix-:3306 proto=tcp"]),
        ] {
            let mut list: ServiceEntries = services.remove(svc).unwrap_or_default();
            list.extend(
                decode_health(&serde_json::to_vec(&body(svc, id, &tags)).unwrap()).unwrap(),
            );
            services.insert(svc.to_string(), list);
        }
        let d = derive(&services, "urlprefix-", &BTreeMap::new());
        let route = |name: &str| match d.entries.get(&EntryKey::Route { name: name.into() }) {
            Some(Entry::Route { spec, .. }) => spec.clone(),
            other => panic!("route {name}: {other:?}"),
        };
        let blog = route("consul:example.com%2Fblog");
        assert_eq!(blog.service.as_deref(), Some("blog"));
        assert!(blog.strip_prefix);
        let shop = route("consul:%2Fshop");
        let arms: Vec<(String, u32)> = shop
            .split
            .iter()
            .map(|s| (s.service.clone(), s.weight))
            .collect();
        // s1 (first by id) decides shop's weight; s2's other weight is a problem.
        assert_eq!(arms, vec![("blog".into(), 9000), ("shop".into(), 1000)]);
        assert!(
            d.problems.keys().any(|k| k.contains("shop/s2")),
            "{:?}",
            d.problems
        );
        assert!(
            d.problems.values().any(|r| r.contains("TCP route")),
            "{:?}",
            d.problems
        );
        assert_eq!(d.entries.len(), 2 + 4, "{:?}", d.entries.keys());
    }

    #[test]
    fn diff_removes_then_upserts() {
        let a = Entry::Instance(Registration::new("web", "a", Address::new("h", 1)));
        let b = Entry::Instance(Registration::new("web", "b", Address::new("h", 2)));
        let mut b2 = Registration::new("web", "b", Address::new("h", 3));
        b2.weight = 5;
        let old = BTreeMap::from([(a.key(), a.clone()), (b.key(), b.clone())]);
        let new = BTreeMap::from([(b.key(), Entry::Instance(b2.clone()))]);
        assert_eq!(
            diff(&old, &new),
            vec![Change::Remove(a.key()), Change::Upsert(Entry::Instance(b2))]
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn odd_json_is_reported_not_fatal() {
        assert!(decode_health(b"{}").is_err());
        let list = decode_health(br#"[{"Node":{},"Service":{"ID":"x","Port":"eighty"}}]"#).unwrap();
        assert!(list[0].is_err());
        assert_eq!(
            decode_catalog(br#"{"web":["a"],"consul":null}"#).unwrap(),
            vec!["consul", "web"]
        );
    }
}
