//! The etcd key names of the contract, built in one place for everyone who
//! writes them (the register sidekick, `ctl`, rollouts, the proxy's own
//! record) and matched by the same section names in `parse.rs`, so a
//! key written here always reads back as the entry it was meant to be.
//! `SCHEMA.md` describes the layout:
//!
//! ```text
//! <services>/<service>/<instance-id>      an instance's registration
//! <pointsman>/routes/<name>               a route
//! <pointsman>/maps/<map>/<key>            a map entry
//! <pointsman>/overrides/<service>/<id>    a state or weight override
//! <pointsman>/pauses/<service>            a service paused on every proxy
//! <pointsman>/maintenance/<service>       a service in maintenance (its page)
//! <pointsman>/pages/<service>/<status>    a service's 502, 503 or 504 page
//! <pointsman>/proxies/<proxy-id>          a proxy's own record (not an entry)
//! <pointsman>/history/maps/<map>/<key>    rollouts' previous map values
//! ```

use crate::{EntryKey, Prefixes};

/// The section of routes under the pointsman root.
pub const ROUTES: &str = "routes";
/// The section of map entries.
pub const MAPS: &str = "maps";
/// The section of overrides.
pub const OVERRIDES: &str = "overrides";
/// The section of paused services.
pub const PAUSES: &str = "pauses";
/// The section of services in maintenance.
pub const MAINTENANCE: &str = "maintenance";
/// The section of error pages.
pub const PAGES: &str = "pages";
/// The section of proxy records; the watcher ignores it.
pub const PROXIES: &str = "proxies";
/// The section where rollouts keep what they replaced; the watcher ignores
/// it.
pub const HISTORY: &str = "history";

/// `<services>/<service>/<id>`.
pub fn instance_key(p: &Prefixes, service: &str, id: &str) -> String {
    format!("{}{id}", service_dir(p, service))
}

/// `<services>/<service>/`: every instance of a service.
pub fn service_dir(p: &Prefixes, service: &str) -> String {
    format!("{}{service}/", p.services_dir())
}

/// `<pointsman>/<section>/`.
pub fn section_dir(p: &Prefixes, section: &str) -> String {
    format!("{}{section}/", p.pointsman_dir())
}

/// `<pointsman>/routes/<name>`.
pub fn route_key(p: &Prefixes, name: &str) -> String {
    format!("{}{name}", section_dir(p, ROUTES))
}

/// `<pointsman>/maps/<map>/<key>`; the key may contain `/`.
pub fn map_key(p: &Prefixes, map: &str, key: &str) -> String {
    format!("{}{map}/{key}", section_dir(p, MAPS))
}

/// `<pointsman>/overrides/<service>/<id>`.
pub fn override_key(p: &Prefixes, service: &str, id: &str) -> String {
    format!("{}{service}/{id}", section_dir(p, OVERRIDES))
}

/// `<pointsman>/pauses/<service>`.
pub fn pause_key(p: &Prefixes, service: &str) -> String {
    format!("{}{service}", section_dir(p, PAUSES))
}

/// `<pointsman>/maintenance/<service>`.
pub fn maintenance_key(p: &Prefixes, service: &str) -> String {
    format!("{}{service}", section_dir(p, MAINTENANCE))
}

/// `<pointsman>/pages/<service>/<status>`.
pub fn page_key(p: &Prefixes, service: &str, status: u16) -> String {
    format!("{}{service}/{status}", section_dir(p, PAGES))
}

/// `<pointsman>/proxies/`.
pub fn proxies_dir(p: &Prefixes) -> String {
    section_dir(p, PROXIES)
}

/// `<pointsman>/proxies/<id>`.
pub fn proxy_key(p: &Prefixes, id: &str) -> String {
    format!("{}{id}", proxies_dir(p))
}

/// `<pointsman>/history/maps/<map>/<key>`: the value a rollout replaced.
pub fn map_history_key(p: &Prefixes, map: &str, key: &str) -> String {
    format!("{}{MAPS}/{map}/{key}", section_dir(p, HISTORY))
}

/// The key an entry is stored under: the inverse of [`crate::parse_key`].
pub fn entry_key(p: &Prefixes, key: &EntryKey) -> String {
    match key {
        EntryKey::Instance { service, id } => instance_key(p, service, id),
        EntryKey::Route { name } => route_key(p, name),
        EntryKey::MapEntry { map, key } => map_key(p, map, key),
        EntryKey::Override { service, id } => override_key(p, service, id),
        EntryKey::Pause { service } => pause_key(p, service),
        EntryKey::Maintenance { service } => maintenance_key(p, service),
        EntryKey::Page { service, status } => page_key(p, service, *status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_key;

    fn prefixes() -> Vec<Prefixes> {
        vec![
            Prefixes::default(),
            Prefixes {
                services: "/stage/services/".into(),
                pointsman: "/stage/pointsman".into(),
                ..Prefixes::default()
            },
        ]
    }

    #[test]
    fn every_built_key_parses_back_to_what_it_names() {
        for p in prefixes() {
            let cases = [
                (
                    instance_key(&p, "web", "host1:8080"),
                    EntryKey::Instance {
                        service: "web".into(),
                        id: "host1:8080".into(),
                    },
                ),
                (
                    route_key(&p, "blog"),
                    EntryKey::Route {
                        name: "blog".into(),
                    },
                ),
                (
                    map_key(&p, "colour", "/blog/live"),
                    EntryKey::MapEntry {
                        map: "colour".into(),
                        key: "/blog/live".into(),
                    },
                ),
                (
                    override_key(&p, "web", "a1"),
                    EntryKey::Override {
                        service: "web".into(),
                        id: "a1".into(),
                    },
                ),
                (
                    pause_key(&p, "web"),
                    EntryKey::Pause {
                        service: "web".into(),
                    },
                ),
                (
                    maintenance_key(&p, "web"),
                    EntryKey::Maintenance {
                        service: "web".into(),
                    },
                ),
                (
                    page_key(&p, "web", 503),
                    EntryKey::Page {
                        service: "web".into(),
                        status: 503,
                    },
                ),
            ];
            for (key, expected) in cases {
                assert_eq!(parse_key(&p, &key).as_ref(), Some(&expected), "{key}");
                assert_eq!(entry_key(&p, &expected), key);
            }
            // Records and history are not entries: the watcher skips them.
            assert_eq!(parse_key(&p, &proxy_key(&p, "edge-1")), None);
            assert_eq!(parse_key(&p, &map_history_key(&p, "colour", "live")), None);
        }
    }

    #[test]
    fn keys_are_as_the_schema_spells_them() {
        let p = Prefixes::default();
        assert_eq!(instance_key(&p, "web", "a1"), "/services/web/a1");
        assert_eq!(service_dir(&p, "web"), "/services/web/");
        assert_eq!(route_key(&p, "blog"), "/pointsman/routes/blog");
        assert_eq!(map_key(&p, "m", "k"), "/pointsman/maps/m/k");
        assert_eq!(override_key(&p, "web", "a1"), "/pointsman/overrides/web/a1");
        assert_eq!(pause_key(&p, "web"), "/pointsman/pauses/web");
        assert_eq!(proxies_dir(&p), "/pointsman/proxies/");
        assert_eq!(proxy_key(&p, "edge-1"), "/pointsman/proxies/edge-1");
        assert_eq!(map_history_key(&p, "m", "k"), "/pointsman/history/maps/m/k");
    }
}
