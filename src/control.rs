//! Step 2 of the flow: the one writer. A single task owns every piece of
//! mutable routing state (the config, each source's registrations, routes,
//! maps and overrides), applies [`Command`]s in batches, and publishes one
//! immutable [`RoutingTable`] per batch. Config reloads, registry updates and
//! runtime changes all arrive here, so they meet in one place.
//!
//! Only what a batch touched is rebuilt: a registration change rebuilds its
//! service, a route change the route index, a map change that map.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pointsman_discovery::{
    Change, Entry, EntryKey, Override, Registration, RouteSpec, Source, Update, UpdateKind,
};
use tokio::sync::{mpsc, oneshot};

use crate::balance::Balancer;
use crate::config::{BalanceAlgorithm, Config, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
use crate::endpoint::EndpointState;
use crate::proxy::http::{upstream_client, UpstreamClient};
use crate::routing::{Endpoint, RouteIndex, RoutingTable, Service, ServiceSettings};
use std::time::Duration;

/// The table readers load; swapped whole by the control task.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

/// A change for the control task.
#[derive(Debug)]
pub enum Command {
    /// A new config (start-up or reload); the reply says whether the
    /// listeners it asks for could be bound.
    Config(Box<Config>, Option<oneshot::Sender<Result<(), String>>>),
    /// Registrations, routes, maps or overrides from a registry.
    Discovery(Update),
}

/// Something the control task must do beyond building tables: (re)binding
/// listeners when the config changes them.
pub trait ListenerControl: Send {
    /// Makes the running listeners match the config; says what failed.
    fn reconcile(&mut self, config: &Config) -> Result<(), String>;
}

/// What one source currently holds.
#[derive(Default, Debug)]
struct SourceEntries {
    /// service -> id -> registration.
    instances: HashMap<String, BTreeMap<String, Registration>>,
    routes: BTreeMap<String, RouteSpec>,
    /// map -> key -> value.
    maps: BTreeMap<String, BTreeMap<String, String>>,
    /// service -> id -> override.
    overrides: HashMap<String, BTreeMap<String, Override>>,
}

/// What a batch of commands touched.
#[derive(Default)]
struct Dirty {
    services: BTreeSet<String>,
    routes: bool,
    maps: BTreeSet<String>,
    defaults: bool,
}

type EndpointKey = (Arc<str>, Arc<str>);

/// The state the control task owns.
pub struct Control {
    config: Arc<Config>,
    sources: BTreeMap<Source, SourceEntries>,
    live: HashMap<EndpointKey, Arc<EndpointState>>,
    table: SharedTable,
    listeners: Box<dyn ListenerControl>,
    version: u64,
    /// One upstream connection pool per connect timeout in use.
    clients: HashMap<Duration, UpstreamClient>,
}

impl Control {
    /// Starts from a config; nothing is published until [`Control::run`] or
    /// [`Control::apply_config`].
    pub fn new(config: Config, table: SharedTable, listeners: Box<dyn ListenerControl>) -> Self {
        Control {
            config: Arc::new(config),
            sources: BTreeMap::new(),
            live: HashMap::new(),
            table,
            listeners,
            version: 0,
            clients: HashMap::new(),
        }
    }

    /// Applies the initial config (binding its listeners) and publishes the
    /// first table.
    pub fn start(&mut self) -> Result<(), String> {
        let config = (*self.config).clone();
        let mut dirty = Dirty::default();
        self.apply_config(config, &mut dirty)?;
        self.publish(dirty);
        Ok(())
    }

    /// Runs until every command sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            let mut dirty = Dirty::default();
            self.handle(cmd, &mut dirty);
            // Whatever queued up meanwhile lands in the same table.
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd, &mut dirty);
            }
            self.publish(dirty);
        }
    }

    fn handle(&mut self, cmd: Command, dirty: &mut Dirty) {
        match cmd {
            Command::Config(config, reply) => {
                let origin = config.origin.clone();
                let result = self.apply_config(*config, dirty);
                match &result {
                    Ok(()) => tracing::info!(config = %origin, "config applied"),
                    Err(e) => {
                        tracing::error!(config = %origin, error = %e, "config refused; the previous config keeps serving")
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Discovery(update) => self.apply_update(update, dirty),
        }
    }

    fn apply_config(&mut self, config: Config, dirty: &mut Dirty) -> Result<(), String> {
        self.listeners.reconcile(&config)?;
        // Service settings may have changed for any service.
        dirty.services.extend(self.config.services.keys().cloned());
        dirty.services.extend(config.services.keys().cloned());
        dirty.defaults = true;
        let entries = config.entries();
        self.config = Arc::new(config);
        self.apply_update(
            Update {
                source: Source::Config,
                revision: None,
                kind: UpdateKind::Reset(entries),
            },
            dirty,
        );
        Ok(())
    }

    fn apply_update(&mut self, update: Update, dirty: &mut Dirty) {
        let entries = self.sources.entry(update.source).or_default();
        match update.kind {
            UpdateKind::Reset(all) => {
                let old = std::mem::take(entries);
                dirty.services.extend(old.instances.keys().cloned());
                dirty.services.extend(old.overrides.keys().cloned());
                dirty.maps.extend(old.maps.keys().cloned());
                dirty.routes |= !old.routes.is_empty();
                for entry in all {
                    upsert(entries, entry, dirty);
                }
            }
            UpdateKind::Changes(changes) => {
                for change in changes {
                    match change {
                        Change::Upsert(entry) => upsert(entries, entry, dirty),
                        Change::Remove(key) => remove(entries, key, dirty),
                    }
                }
            }
        }
    }

    /// Rebuilds what the batch touched and publishes the new table.
    fn publish(&mut self, dirty: Dirty) {
        let old = self.table.load_full();
        let mut services = old.services.clone();
        for name in &dirty.services {
            match self.build_service(name) {
                Some(svc) => {
                    services.insert(svc.name.clone(), Arc::new(svc));
                }
                None => {
                    services.remove(name.as_str());
                }
            }
        }
        let routes = if dirty.routes || self.version == 0 {
            let merged = self.merged_routes();
            let (index, rejected) = RouteIndex::build(merged.iter().map(|(n, s)| (n.as_str(), *s)));
            for (name, why) in rejected {
                tracing::warn!(route = %name, error = %why, "route skipped");
            }
            Arc::new(index)
        } else {
            old.routes.clone()
        };
        let mut maps = old.maps.clone();
        for name in &dirty.maps {
            let merged = self.merged_map(name);
            if merged.is_empty() {
                maps.remove(name.as_str());
            } else {
                maps.insert(name.as_str().into(), Arc::new(merged));
            }
        }
        let defaults = if dirty.defaults {
            self.config
                .listeners
                .iter()
                .filter_map(|l| {
                    Some((l.name.as_str().into(), l.default_service.as_deref()?.into()))
                })
                .collect()
        } else {
            old.defaults.clone()
        };
        self.version += 1;
        self.table.store(Arc::new(RoutingTable {
            version: self.version,
            services,
            routes,
            maps,
            defaults,
        }));
    }

    fn merged_routes(&self) -> BTreeMap<String, &RouteSpec> {
        let mut out = BTreeMap::new();
        for entries in self.sources.values() {
            for (name, spec) in &entries.routes {
                out.insert(name.clone(), spec);
            }
        }
        out
    }

    fn merged_map(&self, name: &str) -> HashMap<String, Arc<str>> {
        let mut out = HashMap::new();
        for entries in self.sources.values() {
            if let Some(m) = entries.maps.get(name) {
                for (k, v) in m {
                    out.insert(k.clone(), v.as_str().into());
                }
            }
        }
        out
    }

    /// Builds a service from every source's instances of it, or `None` when
    /// nothing defines it any more.
    fn build_service(&mut self, name: &str) -> Option<Service> {
        let configured = self.config.services.get(name).cloned();
        let defaults = configured.clone().unwrap_or_default();
        let global = &self.config.global;
        let connect_timeout = defaults
            .connect_timeout
            .or(global.connect_timeout)
            .map(|d| d.0)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let settings = ServiceSettings {
            algorithm: defaults.balance,
            connect_timeout,
            request_timeout: defaults
                .request_timeout
                .or(global.request_timeout)
                .map(|d| d.0)
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT),
            cookie: (defaults.balance == BalanceAlgorithm::Cookie)
                .then(|| defaults.cookie.as_deref().unwrap_or("SERVERID").into()),
            client: self.client_for(connect_timeout),
        };
        // Later sources win: config < file < etcd < consul.
        let mut instances: BTreeMap<&str, &Registration> = BTreeMap::new();
        let mut overrides: BTreeMap<&str, &Override> = BTreeMap::new();
        for entries in self.sources.values() {
            if let Some(m) = entries.instances.get(name) {
                instances.extend(m.iter().map(|(id, r)| (id.as_str(), r)));
            }
            if let Some(m) = entries.overrides.get(name) {
                overrides.extend(m.iter().map(|(id, o)| (id.as_str(), o)));
            }
        }
        if instances.is_empty() && configured.is_none() {
            self.live.retain(|(s, _), _| &**s != name);
            return None;
        }

        let service: Arc<str> = name.into();
        let mut endpoints = Vec::with_capacity(instances.len());
        let mut keep = std::collections::HashSet::new();
        for (id, reg) in &instances {
            let key: EndpointKey = (service.clone(), (*id).into());
            let live = self.live.entry(key.clone()).or_default().clone();
            let ov = overrides.get(id);
            live.set_admin_state(ov.and_then(|o| o.state).unwrap_or(reg.state));
            live.set_weight(u32::from(ov.and_then(|o| o.weight).unwrap_or(reg.weight)));
            match Endpoint::new(key.1.clone(), reg.address.clone(), live) {
                Ok(ep) => endpoints.push(ep),
                Err(why) => tracing::warn!(service = name, id, error = %why, "endpoint skipped"),
            }
            keep.insert(key);
        }
        self.live.retain(|k, _| &*k.0 != name || keep.contains(k));
        let balancer = Balancer::build(settings.algorithm, &endpoints);
        Some(Service {
            name: service,
            endpoints,
            balancer,
            settings,
        })
    }

    fn client_for(&mut self, connect_timeout: Duration) -> UpstreamClient {
        let idle = self.config.global.upstream_idle_timeout;
        self.clients
            .entry(connect_timeout)
            .or_insert_with(|| upstream_client(connect_timeout, idle))
            .clone()
    }

    /// A copy of the current config.
    pub fn config(&self) -> Arc<Config> {
        self.config.clone()
    }
}

fn upsert(entries: &mut SourceEntries, entry: Entry, dirty: &mut Dirty) {
    match entry {
        Entry::Instance(reg) => {
            dirty.services.insert(reg.service.clone());
            entries
                .instances
                .entry(reg.service.clone())
                .or_default()
                .insert(reg.id.clone(), reg);
        }
        Entry::Route { name, spec } => {
            dirty.routes = true;
            entries.routes.insert(name, spec);
        }
        Entry::MapEntry { map, key, value } => {
            dirty.maps.insert(map.clone());
            entries.maps.entry(map).or_default().insert(key, value);
        }
        Entry::Override { service, id, spec } => {
            dirty.services.insert(service.clone());
            entries
                .overrides
                .entry(service)
                .or_default()
                .insert(id, spec);
        }
    }
}

fn remove(entries: &mut SourceEntries, key: EntryKey, dirty: &mut Dirty) {
    fn remove_nested<V>(m: &mut HashMap<String, BTreeMap<String, V>>, outer: &str, inner: &str) {
        if let Some(inner_map) = m.get_mut(outer) {
            inner_map.remove(inner);
            if inner_map.is_empty() {
                m.remove(outer);
            }
        }
    }
    match key {
        EntryKey::Instance { service, id } => {
            remove_nested(&mut entries.instances, &service, &id);
            dirty.services.insert(service);
        }
        EntryKey::Route { name } => {
            dirty.routes |= entries.routes.remove(&name).is_some();
        }
        EntryKey::MapEntry { map, key } => {
            if let Some(m) = entries.maps.get_mut(&map) {
                m.remove(&key);
                if m.is_empty() {
                    entries.maps.remove(&map);
                }
            }
            dirty.maps.insert(map);
        }
        EntryKey::Override { service, id } => {
            remove_nested(&mut entries.overrides, &service, &id);
            dirty.services.insert(service);
        }
    }
}
