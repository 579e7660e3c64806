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

use pointsman_discovery::{
    Address, AdminState, Change, CheckSpec, Entry, EntryKey, Override, PauseSpec, Registration,
    RouteSpec, Source, SourceStatus, Update, UpdateKind,
};
use tokio::sync::{mpsc, oneshot};

use crate::control::config::{
    Config, ServiceConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT,
};
use crate::control::health::HealthChecks;
use crate::control::local::{LocalChange, LocalError, LocalLayer};
use crate::engine::balance::Balancer;
use crate::engine::endpoint::EndpointState;
use crate::engine::table::SharedTable;
use crate::engine::table::{
    Endpoint, RetryPolicy, RouteIndex, RoutingTable, Service, ServiceSettings, ServiceState,
    WEIGHT_SCALE,
};
use std::time::{Duration, Instant};

/// A change for the control task.
#[derive(Debug)]
pub enum Command {
    /// A new config (start-up or reload); the reply says whether the
    /// listeners it asks for could be bound.
    Config(Box<Config>, Option<oneshot::Sender<Result<(), String>>>),
    /// Registrations, routes, maps or overrides from a registry.
    Discovery(Update),
    /// An active check flipped an endpoint up or down.
    Health {
        service: String,
        id: Arc<str>,
        up: bool,
    },
    /// A change made on this proxy only (runtime or admin API). The reply
    /// comes once a table with the change is published, or says why it was
    /// refused.
    Local(LocalChange, oneshot::Sender<Result<(), LocalError>>),
}

/// Sends local changes to the control task and waits for their tables.
#[derive(Clone)]
pub struct ControlHandle {
    commands: mpsc::Sender<Command>,
    table: SharedTable,
}

impl ControlHandle {
    /// A handle on the control task that reads `commands` and publishes
    /// `table`.
    pub fn new(commands: mpsc::Sender<Command>, table: SharedTable) -> Self {
        ControlHandle { commands, table }
    }

    /// The table the control task publishes.
    pub fn table(&self) -> &SharedTable {
        &self.table
    }

    /// Applies a local change; returns once requests see it.
    pub async fn change(&self, change: LocalChange) -> Result<(), LocalError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Local(change, tx))
            .await
            .map_err(|_| LocalError::Stopped)?;
        rx.await.map_err(|_| LocalError::Stopped)?
    }
}

/// Default time a deregistered endpoint may keep draining.
pub const DEFAULT_ENDPOINT_DRAIN: Duration = Duration::from_secs(30);
/// How often draining and slow-starting endpoints are looked at.
const TICK: Duration = Duration::from_millis(100);

/// An endpoint that left its registry but still has requests in flight.
struct Departing {
    address: Address,
    live: Arc<EndpointState>,
    deadline: Instant,
}

/// What one instance of a service should be, after every source, override
/// and local change had its say.
struct Wanted {
    id: Arc<str>,
    address: Address,
    check: Option<CheckSpec>,
    state: AdminState,
    /// The registry's weight (after overrides), before local changes.
    initial_weight: u32,
    weight: u32,
    /// A drain notice holds it in drain until this etcd revision.
    drain_notice: Option<i64>,
    /// State and weight set on this proxy.
    local_state: bool,
    local_weight: bool,
    backup: bool,
}

/// A service's registered endpoints as one rebuild leaves them.
struct Registered {
    endpoints: Vec<Endpoint>,
    /// id -> live state, for the next rebuild.
    live: HashMap<Arc<str>, Arc<EndpointState>>,
    /// What the health checks of the service must now probe.
    checks: Vec<CheckTarget>,
}

/// An endpoint as the health checks see it: id, address, check (if any)
/// and the live state a check result goes to.
type CheckTarget = (Arc<str>, Address, Option<CheckSpec>, Arc<EndpointState>);

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
    /// Services paused fleet-wide.
    pauses: HashMap<String, PauseSpec>,
    /// Services in maintenance fleet-wide, with their pages.
    maintenance: HashMap<String, String>,
    /// service -> status -> the page of the proxy's own answer.
    pages: HashMap<String, BTreeMap<u16, String>>,
}

/// What a batch of commands touched.
struct Dirty {
    /// The batch's clock: drains and slow starts are judged against it.
    now: Instant,
    services: BTreeSet<String>,
    routes: bool,
    maps: BTreeSet<String>,
    defaults: bool,
    /// The newest registry revision each source brought in this batch.
    revisions: BTreeMap<Source, i64>,
    /// Local changes that wait for this batch's table.
    replies: Vec<oneshot::Sender<Result<(), LocalError>>>,
}

impl Dirty {
    /// Nothing touched yet, in a batch that runs at `now`.
    fn at(now: Instant) -> Self {
        Dirty {
            now,
            services: BTreeSet::new(),
            routes: false,
            maps: BTreeSet::new(),
            defaults: false,
            revisions: BTreeMap::new(),
            replies: Vec::new(),
        }
    }
}

/// The state the control task owns.
pub struct Control {
    config: Arc<Config>,
    sources: BTreeMap<Source, SourceEntries>,
    /// service -> instance id -> live state.
    live: HashMap<String, HashMap<Arc<str>, Arc<EndpointState>>>,
    table: SharedTable,
    listeners: Box<dyn ListenerControl>,
    version: u64,
    /// service -> live service-wide counters.
    service_live: HashMap<String, Arc<ServiceState>>,
    /// Where to report the registry revision a published table holds.
    statuses: HashMap<Source, Arc<SourceStatus>>,
    /// service -> id -> endpoints draining after deregistration.
    departing: HashMap<String, HashMap<Arc<str>, Departing>>,
    /// (service, id) -> when its slow start began.
    ramping: HashMap<(String, Arc<str>), Instant>,
    checks: HealthChecks,
    /// Live-state mirrors to update once the table being built is
    /// published: state and weight as that table has them.
    published: Vec<(Arc<EndpointState>, AdminState, u32)>,
    /// Changes made on this proxy through its runtime or admin API.
    local: LocalLayer,
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
            service_live: HashMap::new(),
            statuses: HashMap::new(),
            departing: HashMap::new(),
            ramping: HashMap::new(),
            checks: HealthChecks::new(None),
            published: Vec::new(),
            local: LocalLayer::default(),
        }
    }

    /// Applies the initial config (binding its listeners) and publishes the
    /// first table.
    pub fn start(&mut self) -> Result<(), String> {
        let config = (*self.config).clone();
        let mut dirty = Dirty::at(Instant::now());
        self.apply_config(config, &mut dirty)?;
        self.publish(dirty);
        Ok(())
    }

    /// Runs until every command sender is gone.
    /// Runs health checks, reporting their flips on `commands`.
    pub fn enable_health_checks(&mut self, commands: mpsc::Sender<Command>) {
        self.checks = HealthChecks::new(Some(commands));
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let busy = !self.departing.is_empty() || !self.ramping.is_empty();
            let cmd = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => Some(cmd),
                    None => return,
                },
                _ = tokio::time::sleep(TICK), if busy => None,
            };
            let mut dirty = Dirty::at(Instant::now());
            if let Some(cmd) = cmd {
                self.handle(cmd, &mut dirty);
            }
            self.revisit_timed(&mut dirty);
            // Whatever queued up meanwhile lands in the same table.
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd, &mut dirty);
            }
            self.publish(dirty);
        }
    }

    /// Applies commands as one batch and publishes one table, in the
    /// caller's task (for tools and benchmarks; the proxy uses `run`).
    pub fn apply_batch(&mut self, cmds: impl IntoIterator<Item = Command>) {
        self.apply_batch_at(Instant::now(), cmds);
    }

    /// [`Control::apply_batch`] with the batch's clock given: what `run`
    /// does on each command or tick, so drains and slow starts can be
    /// stepped through without waiting for them.
    pub fn apply_batch_at(&mut self, now: Instant, cmds: impl IntoIterator<Item = Command>) {
        let mut dirty = Dirty::at(now);
        for cmd in cmds {
            self.handle(cmd, &mut dirty);
        }
        self.revisit_timed(&mut dirty);
        self.publish(dirty);
    }

    /// Draining and slow-starting services change with time alone, so each
    /// batch looks at them again.
    fn revisit_timed(&self, dirty: &mut Dirty) {
        dirty.services.extend(self.departing.keys().cloned());
        dirty
            .services
            .extend(self.ramping.keys().map(|(s, _)| s.clone()));
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
            Command::Health { service, id, up } => {
                if up && self.slow_start(&service).is_some() {
                    self.ramping.insert((service.clone(), id), dirty.now);
                    dirty.services.insert(service);
                }
            }
            Command::Local(change, reply) => match self.apply_local(change, dirty) {
                Ok(()) => dirty.replies.push(reply),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
    }

    /// Checks a local change against what exists and applies it.
    fn apply_local(&mut self, change: LocalChange, dirty: &mut Dirty) -> Result<(), LocalError> {
        match &change {
            LocalChange::ServerState { service, id, .. }
            | LocalChange::ServerWeight { service, id, .. }
            | LocalChange::ServerEnable { service, id }
            | LocalChange::ServerReset { service, id } => {
                self.check_server(service, id)?;
                dirty.services.insert(service.clone());
            }
            LocalChange::MapSet { map, key, .. } | LocalChange::MapDel { map, key } => {
                if !self.effective_map(map)?.contains_key(key) {
                    return Err(LocalError::NoSuchKey {
                        map: map.clone(),
                        key: key.clone(),
                    });
                }
                dirty.maps.insert(map.clone());
            }
            LocalChange::MapAdd { map, key, .. } => {
                if self.effective_map(map)?.contains_key(key) {
                    return Err(LocalError::KeyExists {
                        map: map.clone(),
                        key: key.clone(),
                    });
                }
                dirty.maps.insert(map.clone());
            }
            LocalChange::DrainNotice {
                service, revision, ..
            } => {
                // The instance need not be known yet: a registration this
                // proxy has not seen may arrive before the revision does.
                if self.applied_etcd_revision().is_some_and(|a| a >= *revision) {
                    return Ok(());
                }
                dirty.services.insert(service.clone());
            }
            LocalChange::MapClear { map } => {
                self.effective_map(map)?;
                dirty.maps.insert(map.clone());
            }
            LocalChange::Pause { service, .. } => {
                if self.table.load().service(service).is_none() {
                    return Err(LocalError::NoSuchService(service.clone()));
                }
                dirty.services.insert(service.clone());
            }
            LocalChange::Reset => {
                let (services, maps) = self.local.touched();
                dirty.services.extend(services);
                dirty.maps.extend(maps);
            }
        }
        tracing::info!(?change, "local change");
        match change {
            LocalChange::ServerState { service, id, state } => {
                self.local.set_state(&service, &id, state)
            }
            LocalChange::ServerWeight {
                service,
                id,
                weight,
            } => self.local.set_weight(&service, &id, weight),
            LocalChange::MapSet { map, key, value } | LocalChange::MapAdd { map, key, value } => {
                self.local.put(&map, &key, &value)
            }
            LocalChange::ServerReset { service, id } => self.local.reset_server(&service, &id),
            LocalChange::ServerEnable { service, id } => {
                self.local.clear_state(&service, &id);
                if self.registry_state(&service, &id) != Some(AdminState::Ready) {
                    self.local.set_state(&service, &id, AdminState::Ready);
                }
            }
            LocalChange::MapDel { map, key } => self.local.delete(&map, &key),
            LocalChange::MapClear { map } => self.local.clear(&map),
            LocalChange::DrainNotice {
                service,
                id,
                revision,
            } => self.local.add_notice(&service, &id, revision),
            LocalChange::Pause {
                service,
                timeout: Some(t),
            } => {
                self.local.pauses.insert(service, t);
            }
            LocalChange::Pause {
                service,
                timeout: None,
            } => {
                self.local.pauses.remove(&service);
            }
            LocalChange::Reset => self.local.reset(),
        }
        Ok(())
    }

    /// Whether `service` has a registered instance `id`.
    fn check_server(&self, service: &str, id: &str) -> Result<(), LocalError> {
        let mut known = false;
        for entries in self.sources.values() {
            if let Some(m) = entries.instances.get(service) {
                known = true;
                if m.contains_key(id) {
                    return Ok(());
                }
            }
        }
        if known || self.config.services.contains_key(service) {
            Err(LocalError::NoSuchServer {
                service: service.to_string(),
                id: id.to_string(),
            })
        } else {
            Err(LocalError::NoSuchService(service.to_string()))
        }
    }

    /// A map as requests see it, or an error if no route uses it and it
    /// has no entries.
    fn effective_map(&self, name: &str) -> Result<HashMap<String, Arc<str>>, LocalError> {
        let merged = self.merged_map(name);
        let used = self.sources.values().any(|e| {
            e.maps.contains_key(name) || e.routes.values().any(|r| r.map.as_deref() == Some(name))
        });
        if merged.is_empty() && !used && !self.local.maps.contains_key(name) {
            return Err(LocalError::NoSuchMap(name.to_string()));
        }
        Ok(merged)
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

    /// The instances of `name` as the registries (and the config) have
    /// them: the latest source's registration of each, and the sources'
    /// overrides merged field by field (a later source's state leaves an
    /// earlier one's weight in force). Local changes are not in it.
    fn registered(&self, name: &str) -> (BTreeMap<&str, &Registration>, BTreeMap<&str, Override>) {
        let mut instances: BTreeMap<&str, &Registration> = BTreeMap::new();
        let mut overrides: BTreeMap<&str, Override> = BTreeMap::new();
        for entries in self.sources.values() {
            if let Some(m) = entries.instances.get(name) {
                instances.extend(m.iter().map(|(id, r)| (id.as_str(), r)));
            }
            if let Some(m) = entries.overrides.get(name) {
                for (id, o) in m {
                    let merged = overrides.entry(id.as_str()).or_default();
                    merged.state = o.state.or(merged.state);
                    merged.weight = o.weight.or(merged.weight);
                }
            }
        }
        (instances, overrides)
    }

    /// What the registries say of an instance's state (local changes
    /// aside).
    fn registry_state(&self, service: &str, id: &str) -> Option<AdminState> {
        let (instances, overrides) = self.registered(service);
        overrides
            .get(id)
            .and_then(|o| o.state)
            .or_else(|| instances.get(id).map(|r| r.state))
    }

    /// The etcd revision the published table holds, if this proxy follows
    /// etcd.
    fn applied_etcd_revision(&self) -> Option<i64> {
        self.statuses.get(&Source::Etcd)?.applied_revision()
    }

    /// Reports, once each table is published, which revision of `status`'s
    /// source it holds.
    pub fn follow(&mut self, status: Arc<SourceStatus>) {
        self.statuses.insert(status.source(), status);
    }

    fn apply_update(&mut self, update: Update, dirty: &mut Dirty) {
        if let Some(rev) = update.revision {
            dirty.revisions.insert(update.source, rev);
            if update.source == Source::Etcd {
                dirty.services.extend(self.local.expire_notices(rev));
            }
        }
        let entries = self.sources.entry(update.source).or_default();
        match update.kind {
            UpdateKind::Reset(all) => {
                let old = std::mem::take(entries);
                dirty.services.extend(old.instances.keys().cloned());
                dirty.services.extend(old.overrides.keys().cloned());
                dirty.services.extend(old.pauses.keys().cloned());
                dirty.services.extend(old.maintenance.keys().cloned());
                dirty.services.extend(old.pages.keys().cloned());
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
            match self.build_service(name, dirty.now) {
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
        // Only now that requests see the new table: mirror its states into
        // the live state, and close idle connections of endpoints that take
        // no new requests.
        for (live, state, weight) in self.published.drain(..) {
            live.set_admin_state(state);
            live.set_weight(weight);
            if state != AdminState::Ready {
                live.pool.clear();
            }
        }
        for (source, rev) in dirty.revisions {
            if let Some(status) = self.statuses.get(&source) {
                status.set_applied_revision(rev);
            }
        }
        for reply in dirty.replies {
            let _ = reply.send(Ok(()));
        }
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
        if let Some(local) = self.local.maps.get(name) {
            local.apply(&mut out);
        }
        out
    }

    /// Builds a service from every source's instances of it, or `None` when
    /// nothing defines it any more.
    fn build_service(&mut self, name: &str, now: Instant) -> Option<Service> {
        let configured = self.config.services.get(name).cloned();
        let defaults = configured.clone().unwrap_or_default();
        let settings = self.service_settings(name, &defaults);
        let wanted = self.wanted_instances(name, defaults.check.as_ref());
        let registered_none = wanted.is_empty();
        let mut departing = self.departing.remove(name).unwrap_or_default();
        // A paused service stays, with no endpoint: its requests wait for
        // the resume instead of finding no service.
        if registered_none
            && configured.is_none()
            && settings.paused.is_none()
            && settings.maintenance.is_none()
            && departing.is_empty()
            && !self.live.contains_key(name)
        {
            self.service_live.remove(name);
            return None;
        }

        let slow_start = defaults.slow_start.map(|d| d.0);
        let drain_timeout = defaults
            .drain_timeout
            .map(|d| d.0)
            .unwrap_or(DEFAULT_ENDPOINT_DRAIN);
        let mut old_live = self.live.remove(name).unwrap_or_default();
        let registered =
            self.registered_endpoints(name, wanted, &mut old_live, &mut departing, slow_start, now);
        // Whatever live state is left belongs to endpoints that just left
        // their registry.
        self.start_departures(name, old_live, &mut departing, now + drain_timeout);
        expire_departures(name, &mut departing, now);
        let mut endpoints = registered.endpoints;
        endpoints.extend(self.draining_endpoints(&departing));
        for e in &endpoints {
            e.live
                .set_max_conn_config(settings.endpoint_max_connections);
        }
        self.checks.sync(
            name,
            registered
                .checks
                .iter()
                .map(|(id, a, c, l)| (id, a, c.as_ref(), l)),
        );
        if registered_none
            && configured.is_none()
            && settings.paused.is_none()
            && settings.maintenance.is_none()
            && departing.is_empty()
        {
            self.service_live.remove(name);
            return None;
        }
        if !departing.is_empty() {
            self.departing.insert(name.to_string(), departing);
        }
        self.live.insert(name.to_string(), registered.live);
        let mut balancer = Balancer::build(settings.algorithm, &endpoints);
        if settings.sticky.is_some() {
            balancer = balancer.sticky(&endpoints);
        }
        Some(Service {
            name: name.into(),
            endpoints,
            balancer,
            settings,
        })
    }

    /// The pages of the proxy's own answers for `name`: the config's
    /// files, then the registries' pages over them; `None` without any.
    fn error_pages(
        &self,
        name: &str,
        defaults: &ServiceConfig,
    ) -> Option<Arc<BTreeMap<u16, bytes::Bytes>>> {
        let registered = self.sources.values().filter_map(|e| e.pages.get(name));
        let pages: BTreeMap<u16, bytes::Bytes> = defaults
            .error_page_bodies
            .iter()
            .map(|(s, page)| (*s, bytes::Bytes::from(page.to_string())))
            .chain(registered.flat_map(|m| {
                m.iter()
                    .map(|(s, page)| (*s, bytes::Bytes::from(page.clone())))
            }))
            .collect();
        (!pages.is_empty()).then(|| Arc::new(pages))
    }

    /// A service's settings: its own, else the global ones, else the
    /// defaults; with its live counters, which outlive every rebuild.
    fn service_settings(&mut self, name: &str, defaults: &ServiceConfig) -> ServiceSettings {
        let global = &self.config.global;
        let connect_timeout = defaults
            .connect_timeout
            .or(global.connect_timeout)
            .map(|d| d.0)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let request_timeout = defaults
            .request_timeout
            .or(global.request_timeout)
            .map(|d| d.0)
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        ServiceSettings {
            algorithm: defaults.balance,
            connect_timeout,
            request_timeout,
            sticky: defaults.sticky_cookie(),
            retry: RetryPolicy {
                attempts: defaults.retry.attempts.max(1),
                per_try_timeout: defaults
                    .retry
                    .per_try_timeout
                    .map(|d| d.0)
                    .unwrap_or(request_timeout),
                on_status: defaults.retry.on_status.clone().into(),
                budget_percent: defaults.retry.budget_percent,
                replay_limit: defaults.retry.replay_limit,
                idempotent_after_send: defaults.retry.idempotent_after_send,
            },
            passive: defaults.passive.clone(),
            upstream_idle_timeout: global.upstream_idle_timeout,
            h2c_upgrade: defaults.h2c_upgrade,
            hold_timeout: defaults.hold_timeout.map(|d| d.0).filter(|d| !d.is_zero()),
            error_pages: self.error_pages(name, defaults),
            maintenance: self
                .sources
                .values()
                .find_map(|e| e.maintenance.get(name))
                .map(|page| bytes::Bytes::from(page.clone())),
            endpoint_max_connections: defaults.endpoint_max_connections.unwrap_or(0),
            queue_timeout: defaults
                .queue_timeout
                .map(|d| d.0)
                .unwrap_or(connect_timeout),
            // Paused here, or by the fleet.
            paused: self.local.pauses.get(name).copied().or_else(|| {
                self.sources
                    .values()
                    .find_map(|e| e.pauses.get(name))
                    .map(|p| p.timeout)
            }),
            live: self
                .service_live
                .entry(name.to_string())
                .or_default()
                .clone(),
        }
    }

    /// What each registered instance of `name` should be, in id order: the
    /// latest source's registration (config < file < etcd < consul), then
    /// the sources' overrides field by field, then this proxy's local
    /// changes, which win over both.
    fn wanted_instances(&self, name: &str, default_check: Option<&CheckSpec>) -> Vec<Wanted> {
        let (instances, overrides) = self.registered(name);
        instances
            .into_iter()
            .map(|(id, reg)| {
                let ov = overrides.get(id);
                let local = self.local.server(name, id).copied().unwrap_or_default();
                let initial_weight = u32::from(ov.and_then(|o| o.weight).unwrap_or(reg.weight));
                let drain_notice = self.local.notice(name, id);
                let state = local
                    .state
                    .or(ov.and_then(|o| o.state))
                    .unwrap_or(reg.state);
                Wanted {
                    id: id.into(),
                    address: reg.address.clone(),
                    check: reg.check.as_ref().or(default_check).cloned(),
                    // A notice wins over every other say but maint, which
                    // already sends the instance nothing.
                    state: match (drain_notice, state) {
                        (Some(_), AdminState::Ready) => AdminState::Drain,
                        _ => state,
                    },
                    initial_weight,
                    weight: local.weight.map(u32::from).unwrap_or(initial_weight),
                    drain_notice,
                    local_state: local.state.is_some(),
                    local_weight: local.weight.is_some(),
                    backup: reg.backup,
                }
            })
            .collect()
    }

    /// The endpoints of the wanted instances, each keeping the live state
    /// it had (also when it comes back while draining), and starting or
    /// going on with its slow start.
    fn registered_endpoints(
        &mut self,
        name: &str,
        wanted: Vec<Wanted>,
        old_live: &mut HashMap<Arc<str>, Arc<EndpointState>>,
        departing: &mut HashMap<Arc<str>, Departing>,
        slow_start: Option<Duration>,
        now: Instant,
    ) -> Registered {
        let mut out = Registered {
            endpoints: Vec::with_capacity(wanted.len()),
            live: HashMap::with_capacity(wanted.len()),
            checks: Vec::new(),
        };
        for w in wanted {
            let (live, is_new) = match old_live
                .remove(&w.id)
                .or_else(|| departing.remove(&w.id).map(|d| d.live))
            {
                Some(live) => (live, false),
                None => (Arc::new(EndpointState::default()), true),
            };
            if is_new && w.check.is_some() {
                // Traffic only after the first passing check.
                live.set_healthy(false);
            }
            let was = live.admin_state();
            self.published.push((live.clone(), w.state, w.weight));
            let key = (name.to_string(), w.id.clone());
            if slow_start.is_some()
                && (is_new || (was != AdminState::Ready && w.state == AdminState::Ready))
            {
                self.ramping.insert(key.clone(), now);
            }
            out.live.insert(w.id.clone(), live.clone());
            match Endpoint::new(
                w.id.clone(),
                w.address.clone(),
                live.clone(),
                w.state,
                w.weight,
            ) {
                Ok(mut ep) => {
                    ep.initial_weight = w.initial_weight;
                    ep.checked = w.check.is_some();
                    ep.drain_notice = w.drain_notice;
                    ep.local_state = w.local_state;
                    ep.local_weight = w.local_weight;
                    ep.backup = w.backup;
                    ep.balance_weight = ramped(
                        w.weight * WEIGHT_SCALE,
                        slow_start,
                        &mut self.ramping,
                        &key,
                        now,
                    );
                    out.checks.push((w.id, w.address, w.check, live));
                    out.endpoints.push(ep);
                }
                Err(why) => tracing::warn!(service = name, error = %why, "endpoint skipped"),
            }
        }
        out
    }

    /// Endpoints that just left their registry: those still answering
    /// requests drain (no new requests, sticky sessions go on) until their
    /// last request ends or `deadline` passes; the others leave now.
    fn start_departures(
        &mut self,
        name: &str,
        gone: HashMap<Arc<str>, Arc<EndpointState>>,
        departing: &mut HashMap<Arc<str>, Departing>,
        deadline: Instant,
    ) {
        let previous = self.table.load().services.get(name).cloned();
        for (id, live) in gone {
            self.ramping.remove(&(name.to_string(), id.clone()));
            let address = previous
                .as_ref()
                .and_then(|s| s.endpoints.iter().find(|e| e.id == id))
                .map(|e| e.address.clone());
            match address {
                Some(address) if live.in_flight() > 0 => {
                    tracing::info!(service = name, %id, in_flight = live.in_flight(), "endpoint deregistered: draining");
                    departing.insert(
                        id,
                        Departing {
                            address,
                            live,
                            deadline,
                        },
                    );
                }
                _ => live.pool.clear(),
            }
        }
    }

    /// The draining endpoints as table entries: state `Drain`, and no share
    /// of new requests.
    fn draining_endpoints(&mut self, departing: &HashMap<Arc<str>, Departing>) -> Vec<Endpoint> {
        let mut out = Vec::with_capacity(departing.len());
        for (id, d) in departing {
            let weight = d.live.weight();
            self.published
                .push((d.live.clone(), AdminState::Drain, weight));
            if let Ok(mut ep) = Endpoint::new(
                id.clone(),
                d.address.clone(),
                d.live.clone(),
                AdminState::Drain,
                weight,
            ) {
                ep.balance_weight = 0;
                out.push(ep);
            }
        }
        out
    }

    fn slow_start(&self, service: &str) -> Option<Duration> {
        self.config
            .services
            .get(service)
            .and_then(|s| s.slow_start)
            .map(|d| d.0)
    }

    /// A copy of the current config.
    pub fn config(&self) -> Arc<Config> {
        self.config.clone()
    }
}

/// Ends the drains that are over: the endpoint's last request ended, or
/// its deadline passed with requests still in flight.
fn expire_departures(name: &str, departing: &mut HashMap<Arc<str>, Departing>, now: Instant) {
    departing.retain(|id, d| {
        let keep = d.live.in_flight() > 0 && now < d.deadline;
        if !keep {
            d.live.pool.clear();
            if d.live.in_flight() > 0 {
                tracing::warn!(service = name, %id, in_flight = d.live.in_flight(), "drain timeout: endpoint leaves with requests in flight");
            } else {
                tracing::info!(service = name, %id, "endpoint drained and removed");
            }
        }
        keep
    });
}

/// A slow-starting endpoint's balance weight: its share of `full` grows
/// with the time since its ramp began; the ramp ends after `window`.
fn ramped(
    full: u32,
    window: Option<Duration>,
    ramping: &mut HashMap<(String, Arc<str>), Instant>,
    key: &(String, Arc<str>),
    now: Instant,
) -> u32 {
    let (Some(window), Some(start)) = (window, ramping.get(key)) else {
        ramping.remove(key);
        return full;
    };
    let elapsed = now.saturating_duration_since(*start);
    if elapsed >= window || full == 0 {
        ramping.remove(key);
        return full;
    }
    let share = elapsed.as_secs_f64() / window.as_secs_f64();
    ((f64::from(full) * share).ceil() as u32).clamp(1, full)
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
        Entry::Pause { service, spec } => {
            dirty.services.insert(service.clone());
            entries.pauses.insert(service, spec);
        }
        Entry::Maintenance { service, page } => {
            dirty.services.insert(service.clone());
            entries.maintenance.insert(service, page);
        }
        Entry::Page {
            service,
            status,
            page,
        } => {
            dirty.services.insert(service.clone());
            entries
                .pages
                .entry(service)
                .or_default()
                .insert(status, page);
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
        EntryKey::Pause { service } => {
            entries.pauses.remove(&service);
            dirty.services.insert(service);
        }
        EntryKey::Maintenance { service } => {
            entries.maintenance.remove(&service);
            dirty.services.insert(service);
        }
        EntryKey::Page { service, status } => {
            if let Some(m) = entries.pages.get_mut(&service) {
                m.remove(&status);
                if m.is_empty() {
                    entries.pages.remove(&service);
                }
            }
            dirty.services.insert(service);
        }
    }
}

#[cfg(test)]
mod tests;
