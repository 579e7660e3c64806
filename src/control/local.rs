//! Changes made on one proxy: the runtime API (`disable server`, `set map`,
//! ...) and the admin API write here. Like HAProxy's runtime changes they
//! are local to the process, last until it stops, and win over every
//! registry and the config file. Fleet-wide changes go to the registry
//! instead (`pointsman ctl --etcd`).
//!
//! The layer holds what was changed, not a copy of the result: a server
//! whose state was never set locally keeps following its registry.
//!
//! Drain notices are the one kind of local change that ends by itself. A
//! tool that drained an instance in etcd at revision `R` and finds a proxy
//! that has not applied `R` (cut off from etcd, say) tells that proxy
//! directly: hold the instance in drain until you have applied `R`. From
//! then on the registry says the same or more (the instance drained, or
//! gone), so the notice is dropped. Nothing else removes one, not even
//! `DELETE /api/local`: the instance is on its way out.

use std::collections::{BTreeMap, HashMap};

use pointsman_discovery::AdminState;

/// One local change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalChange {
    /// `set server <service>/<id> state ...`, `enable/disable server`.
    ServerState {
        service: String,
        id: String,
        state: AdminState,
    },
    /// `set server <service>/<id> weight <n>`.
    ServerWeight {
        service: String,
        id: String,
        weight: u16,
    },
    /// `set map`: changes an existing key.
    MapSet {
        map: String,
        key: String,
        value: String,
    },
    /// `add map`: adds a key that is not there yet.
    MapAdd {
        map: String,
        key: String,
        value: String,
    },
    /// `del map`.
    MapDel { map: String, key: String },
    /// `clear map`: removes every key.
    MapClear { map: String },
    /// Forgets a server's local state and weight.
    ServerReset { service: String, id: String },
    /// `enable server`: forgets a server's local state, so its registry's
    /// applies; if that is not `ready`, sets `ready` locally (HAProxy's
    /// meaning: the server takes traffic).
    ServerEnable { service: String, id: String },
    /// A drain notice: `service`/`id` takes no new requests until this
    /// proxy has applied etcd revision `revision`.
    DrainNotice {
        service: String,
        id: String,
        revision: i64,
    },
    /// Pauses `service` on this proxy (each request waits up to
    /// `timeout`), or with `None` resumes it.
    Pause {
        service: String,
        timeout: Option<std::time::Duration>,
    },
    /// Forgets every local change: the registries' values apply again.
    Reset,
}

/// Why a local change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    #[error("no such service (backend): {0}")]
    NoSuchService(String),
    #[error("no such instance (server) {id} in service {service}")]
    NoSuchServer { service: String, id: String },
    #[error("unknown map {0}: a map exists once a route uses it or it has entries")]
    NoSuchMap(String),
    #[error("map {map} has no key {key}")]
    NoSuchKey { map: String, key: String },
    #[error("map {map} already has key {key}: use `set map` to change its value")]
    KeyExists { map: String, key: String },
    #[error("the proxy is shutting down")]
    Stopped,
}

/// A server's locally set state and weight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerOverride {
    pub state: Option<AdminState>,
    pub weight: Option<u16>,
}

/// One map's local changes.
#[derive(Clone, Debug, Default)]
pub struct MapOverride {
    /// `clear map` hides every key that came from elsewhere.
    pub cleared: bool,
    /// key -> `Some(value)` set locally, `None` deleted locally.
    pub keys: BTreeMap<String, Option<String>>,
}

impl MapOverride {
    /// Applies this layer to a merged map.
    pub fn apply<V: From<String>>(&self, base: &mut HashMap<String, V>) {
        if self.cleared {
            base.clear();
        }
        for (k, v) in &self.keys {
            match v {
                Some(v) => {
                    base.insert(k.clone(), V::from(v.clone()));
                }
                None => {
                    base.remove(k);
                }
            }
        }
    }
}

/// Every local change in force.
#[derive(Debug, Default)]
pub struct LocalLayer {
    /// service -> id -> override.
    pub servers: HashMap<String, BTreeMap<String, ServerOverride>>,
    /// map -> its changes.
    pub maps: BTreeMap<String, MapOverride>,
    /// service -> id -> the etcd revision a drain notice holds it until.
    pub notices: HashMap<String, BTreeMap<String, i64>>,
    /// Services paused on this proxy, with each request's longest wait.
    pub pauses: HashMap<String, std::time::Duration>,
}

impl LocalLayer {
    pub fn server(&self, service: &str, id: &str) -> Option<&ServerOverride> {
        self.servers.get(service)?.get(id)
    }

    pub fn set_state(&mut self, service: &str, id: &str, state: AdminState) {
        self.entry(service, id).state = Some(state);
    }

    pub fn reset_server(&mut self, service: &str, id: &str) {
        if let Some(m) = self.servers.get_mut(service) {
            m.remove(id);
            if m.is_empty() {
                self.servers.remove(service);
            }
        }
    }

    /// The revision a drain notice holds `service`/`id` until, if any.
    pub fn notice(&self, service: &str, id: &str) -> Option<i64> {
        self.notices.get(service)?.get(id).copied()
    }

    /// Holds `service`/`id` in drain until `revision` (the later of two
    /// notices wins).
    pub fn add_notice(&mut self, service: &str, id: &str, revision: i64) {
        let held = self
            .notices
            .entry(service.to_string())
            .or_default()
            .entry(id.to_string())
            .or_insert(revision);
        *held = (*held).max(revision);
    }

    /// Drops the notices that etcd revision `applied` has made true; the
    /// services whose endpoints they held.
    pub fn expire_notices(&mut self, applied: i64) -> Vec<String> {
        let mut touched = Vec::new();
        self.notices.retain(|service, ids| {
            let before = ids.len();
            ids.retain(|_, until| *until > applied);
            if ids.len() != before {
                touched.push(service.clone());
            }
            !ids.is_empty()
        });
        touched
    }

    /// Forgets every local change but the drain notices.
    pub fn reset(&mut self) {
        self.servers.clear();
        self.maps.clear();
        self.pauses.clear();
    }

    /// Forgets a server's local state, keeping its local weight.
    pub fn clear_state(&mut self, service: &str, id: &str) {
        if let Some(o) = self.servers.get_mut(service).and_then(|m| m.get_mut(id)) {
            o.state = None;
            if o.weight.is_none() {
                self.reset_server(service, id);
            }
        }
    }

    pub fn set_weight(&mut self, service: &str, id: &str, weight: u16) {
        self.entry(service, id).weight = Some(weight);
    }

    fn entry(&mut self, service: &str, id: &str) -> &mut ServerOverride {
        self.servers
            .entry(service.to_string())
            .or_default()
            .entry(id.to_string())
            .or_default()
    }

    /// Sets `key` in `map` (set and add, once checked).
    pub fn put(&mut self, map: &str, key: &str, value: &str) {
        self.maps
            .entry(map.to_string())
            .or_default()
            .keys
            .insert(key.to_string(), Some(value.to_string()));
    }

    pub fn delete(&mut self, map: &str, key: &str) {
        self.maps
            .entry(map.to_string())
            .or_default()
            .keys
            .insert(key.to_string(), None);
    }

    pub fn clear(&mut self, map: &str) {
        let m = self.maps.entry(map.to_string()).or_default();
        m.cleared = true;
        m.keys.clear();
    }

    /// Service names and map names that any local change touches.
    pub fn touched(&self) -> (Vec<String>, Vec<String>) {
        (
            self.servers
                .keys()
                .chain(self.pauses.keys())
                .cloned()
                .collect(),
            self.maps.keys().cloned().collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_layer_sets_deletes_and_clears() {
        let mut base: HashMap<String, String> = [("a", "1"), ("b", "2")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut layer = LocalLayer::default();
        layer.put("m", "a", "x");
        layer.delete("m", "b");
        layer.maps["m"].apply(&mut base);
        assert_eq!(base.get("a").map(String::as_str), Some("x"));
        assert!(!base.contains_key("b"));

        layer.clear("m");
        layer.put("m", "c", "3");
        layer.maps["m"].apply(&mut base);
        assert_eq!(base.len(), 1);
        assert_eq!(base.get("c").map(String::as_str), Some("3"));
    }

    #[test]
    fn drain_notices_last_until_their_revision_is_applied() {
        let mut layer = LocalLayer::default();
        layer.add_notice("web", "a1", 10);
        layer.add_notice("web", "a1", 7);
        layer.add_notice("web", "a2", 12);
        layer.set_weight("web", "a3", 5);
        assert_eq!(layer.notice("web", "a1"), Some(10), "the later one wins");
        assert!(layer.expire_notices(9).is_empty());
        layer.reset();
        assert_eq!(layer.notice("web", "a1"), Some(10), "kept by a reset");
        assert_eq!(layer.server("web", "a3"), None);
        assert_eq!(layer.expire_notices(10), vec!["web".to_string()]);
        assert_eq!(layer.notice("web", "a1"), None);
        assert_eq!(layer.notice("web", "a2"), Some(12));
        layer.expire_notices(20);
        assert!(layer.notices.is_empty());
    }

    #[test]
    fn server_overrides_keep_unset_fields_empty() {
        let mut layer = LocalLayer::default();
        layer.set_weight("web", "a1", 5);
        let o = layer.server("web", "a1").copied().unwrap_or_default();
        assert_eq!(o.weight, Some(5));
        assert_eq!(o.state, None);
        layer.set_state("web", "a1", AdminState::Drain);
        assert_eq!(
            layer.server("web", "a1").and_then(|o| o.state),
            Some(AdminState::Drain)
        );
    }
}
