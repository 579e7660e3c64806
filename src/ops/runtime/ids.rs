//! Stable proxy and server ids for `show stat`, `show servers state|conn`
//! and the stats CSV. HAProxy gives every proxy and server an id once, and
//! scripts keep using it (`show stat 3 4 2`); here a backend keeps its
//! `iid` and a server its `sid` for as long as it exists, and a new one
//! takes the lowest id that is free, as HAProxy's `add server` does.
//!
//! The ids are learnt from the tables the read commands see, so the first
//! listing numbers everything in name order, as before. One registry
//! serves every reader of the same routing table (the runtime API and the
//! admin listener's `/stats;csv`), so both print the same ids.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use arc_swap::ArcSwap;

use super::show::Frontend;
use crate::engine::table::RoutingTable;

/// The ids in force.
#[derive(Debug, Default)]
pub struct IdRegistry {
    /// Frontends and backends share one sequence, as HAProxy's proxies do;
    /// the key says which kind (`true` for a frontend) and its name.
    proxies: HashMap<(bool, Arc<str>), usize>,
    /// Per backend: server id -> sid.
    servers: HashMap<Arc<str>, HashMap<Arc<str>, usize>>,
    /// What the ids were last fitted to: the table version and listeners.
    seen: Option<(u64, Vec<String>)>,
}

/// The lowest id of 1 or more that `used` does not hold.
fn lowest_free(used: &BTreeSet<usize>) -> usize {
    let mut id = 1;
    for u in used {
        if *u == id {
            id += 1;
        } else if *u > id {
            break;
        }
    }
    id
}

impl IdRegistry {
    /// Forgets what no longer exists and numbers what is new (listeners
    /// first, then services, in name order; servers in table order).
    pub fn fit(&mut self, frontends: &[Frontend], table: &RoutingTable) {
        let names: Vec<String> = frontends.iter().map(|f| f.name.clone()).collect();
        if self
            .seen
            .as_ref()
            .is_some_and(|(v, n)| *v == table.version && *n == names)
        {
            return;
        }
        let mut backends: Vec<&Arc<str>> = table.services.values().map(|s| &s.name).collect();
        backends.sort();
        let wanted: Vec<(bool, Arc<str>)> = frontends
            .iter()
            .map(|f| (true, Arc::from(f.name.as_str())))
            .chain(backends.iter().map(|b| (false, (*b).clone())))
            .collect();
        let present: HashSet<&(bool, Arc<str>)> = wanted.iter().collect();
        self.proxies.retain(|k, _| present.contains(k));
        let mut used: BTreeSet<usize> = self.proxies.values().copied().collect();
        for key in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.proxies.entry(key) {
                let id = lowest_free(&used);
                used.insert(id);
                slot.insert(id);
            }
        }
        self.servers
            .retain(|name, _| table.services.contains_key(&**name));
        for svc in table.services.values() {
            let ids = self.servers.entry(svc.name.clone()).or_default();
            let present: HashSet<&Arc<str>> = svc.endpoints.iter().map(|e| &e.id).collect();
            ids.retain(|id, _| present.contains(id));
            let mut used: BTreeSet<usize> = ids.values().copied().collect();
            for e in svc.endpoints.iter() {
                if let std::collections::hash_map::Entry::Vacant(slot) = ids.entry(e.id.clone()) {
                    let id = lowest_free(&used);
                    used.insert(id);
                    slot.insert(id);
                }
            }
        }
        self.seen = Some((table.version, names));
    }

    /// A frontend's proxy id.
    pub fn frontend(&self, name: &str) -> usize {
        self.proxies
            .get(&(true, Arc::from(name)))
            .copied()
            .unwrap_or(0)
    }

    /// A backend's proxy id.
    pub fn backend(&self, name: &str) -> usize {
        self.proxies
            .get(&(false, Arc::from(name)))
            .copied()
            .unwrap_or(0)
    }

    /// A server's id in its backend.
    pub fn server(&self, backend: &str, id: &str) -> usize {
        self.servers
            .get(backend)
            .and_then(|ids| ids.get(id))
            .copied()
            .unwrap_or(0)
    }
}

/// The registries, one per routing table (a process has one; tests that
/// run several proxies in one process have one each).
type Registries = Vec<(Weak<ArcSwap<RoutingTable>>, Arc<Mutex<IdRegistry>>)>;
static REGISTRIES: Mutex<Registries> = Mutex::new(Vec::new());

/// The id registry of the routing table `table`.
pub fn registry_for(table: &Arc<ArcSwap<RoutingTable>>) -> Arc<Mutex<IdRegistry>> {
    let mut all = REGISTRIES.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|(t, _)| t.strong_count() > 0);
    let weak = Arc::downgrade(table);
    if let Some((_, r)) = all.iter().find(|(t, _)| t.ptr_eq(&weak)) {
        return r.clone();
    }
    let r = Arc::new(Mutex::new(IdRegistry::default()));
    all.push((weak, r.clone()));
    r
}

/// Locks a registry; a panic elsewhere while it was held leaves ids that
/// are still valid, so a poisoned lock is used as it is.
pub fn lock(r: &Mutex<IdRegistry>) -> MutexGuard<'_, IdRegistry> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_id_is_taken() {
        assert_eq!(lowest_free(&BTreeSet::new()), 1);
        assert_eq!(lowest_free(&[1, 2, 4].into()), 3);
        assert_eq!(lowest_free(&[2, 3].into()), 1);
        assert_eq!(lowest_free(&[1, 2, 3].into()), 4);
    }
}
