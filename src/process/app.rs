//! Starting and stopping a proxy: bind listeners from the config, start the
//! control task, the admin listener and the config watcher, then wait for
//! SIGTERM/SIGINT and drain.
//!
//! The client listeners are bound (and listen) at once but accept only once
//! every followed registry's data is in the routing table, from its first
//! sync or from `--state-dir`: until then clients wait in the listen
//! backlog rather than get a 503 from a table that is still empty. A fresh
//! start waits at most [`FIRST_SYNC_WAIT`] and then serves what it has; a
//! takeover keeps the previous process serving meanwhile.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::config::Config;
use crate::control::registry::{self, RegistryOptions};
use crate::control::reload::{self, Overrides, ReloadStats};
use crate::control::{Command, Control, ControlHandle};
use crate::engine::http::HttpProxy;
use crate::engine::table::RoutingTable;
use crate::engine::table::SharedTable;
use crate::engine::ClientLimits;
use crate::ops::admin::Admin;
use crate::process::listener::Listeners;
use crate::process::takeover::{HeldSockets, Inherited, NotSynced, SYNC_DEADLINE};

/// How long a fresh start holds clients (in the listen backlog) for the
/// registries' first sync. Past it, requests get what the table holds
/// (503 for services it does not know yet) rather than waiting longer.
pub const FIRST_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A running proxy.
pub struct App {
    pub table: SharedTable,
    pub commands: mpsc::Sender<Command>,
    /// For local changes (runtime and admin API).
    pub control: ControlHandle,
    pub admin_addr: SocketAddr,
    pub listeners: HashMap<String, SocketAddr>,
    /// Copies of the listening sockets, for a takeover by a new process.
    pub sockets: Arc<HeldSockets>,
    /// The status of each followed registry (etcd's carries the applied
    /// revision the proxy's heartbeat reports).
    pub sources: Vec<Arc<pointsman_discovery::SourceStatus>>,
    shutdown: CancellationToken,
    /// Stops the admin API, after the drain.
    admin_stop: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: std::time::Duration,
    _watcher: Option<notify::RecommendedWatcher>,
    /// The runtime API; removes its socket file when the app goes.
    _runtime: crate::ops::runtime::Serving,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    AdminToken(#[from] crate::control::config::AdminTokenError),
    /// A listener (admin, runtime API or the config's) could not be bound;
    /// the text says which and why.
    #[error("{0}")]
    Bind(String),
    #[error(transparent)]
    Registry(#[from] crate::control::registry::RegistryError),
    #[error(transparent)]
    Takeover(#[from] crate::process::takeover::NotSynced),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl App {
    /// Binds everything the config asks for and starts serving.
    pub async fn start(
        config: Config,
        overrides: Overrides,
        registries: RegistryOptions,
        workers: Vec<tokio::runtime::Handle>,
    ) -> Result<App, AppError> {
        Self::start_inheriting(config, overrides, registries, workers, Inherited::default()).await
    }

    /// [`App::start`] serving the sockets a previous process passed
    /// (see `takeover`) where the config asks for their addresses.
    pub async fn start_inheriting(
        config: Config,
        overrides: Overrides,
        registries: RegistryOptions,
        workers: Vec<tokio::runtime::Handle>,
        mut inherited: Inherited,
    ) -> Result<App, AppError> {
        let taking_over = !inherited.is_empty();
        let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
        let threads = workers.len().max(1);
        let limits = Arc::new(ArcSwap::from_pointee(ClientLimits::from(&config.global)));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let proxy = Arc::new(HttpProxy {
            table: table.clone(),
            limits,
        });
        let mut listeners = Listeners::new(
            proxy,
            table.clone(),
            shutdown.clone(),
            tracker.clone(),
            workers,
        );
        listeners.inherit(&mut inherited);
        let sockets = listeners.held();
        let open = listeners.opener();
        let bound = listeners.bound();
        crate::control::config::check_admin_token(&config.global, config.global.admin)?;
        let admin_listener = match inherited.take_admin(config.global.admin) {
            Some(l) => tokio::net::TcpListener::from_std(l)?,
            None => crate::ops::admin::bind(config.global.admin)
                .await
                .map_err(AppError::Bind)?,
        };
        if let Err(e) = sockets.set_admin(config.global.admin, &admin_listener) {
            tracing::warn!(error = %e, "cannot keep a copy of the admin socket: a takeover will bind it afresh");
        }
        let admin_addr = admin_listener.local_addr()?;
        let runtime_listeners =
            crate::ops::runtime::bind(&config.global).map_err(AppError::Bind)?;
        let drain_timeout = config.global.drain_timeout;
        let file = config.file();
        let initial = config.clone();

        let applied = Arc::new(ArcSwap::from_pointee(config.clone()));
        let listeners =
            crate::ops::runtime::ObservedListeners::new(Box::new(listeners), applied.clone());
        let mut control = Control::new(config, table.clone(), Box::new(listeners));
        let (commands, rx) = mpsc::channel(1024);
        control.enable_health_checks(commands.clone());
        control.start().map_err(AppError::Bind)?;
        let followed = registry::start(&registries, commands.clone(), &table)?;
        for f in &followed {
            control.follow(f.status.clone());
        }
        let mut served: Vec<_> = followed.iter().map(|f| f.in_table.clone()).collect();
        tokio::spawn(control.run(rx));
        let sources = followed.iter().map(|f| f.status.clone()).collect();
        let handle = ControlHandle::new(commands.clone(), table.clone());
        let runtime = Arc::new(crate::ops::runtime::Runtime::new(
            handle.clone(),
            applied.clone(),
            threads,
            shutdown.clone(),
        ));
        let runtime = runtime_listeners.serve(runtime, shutdown.clone());

        let ready = Arc::new(AtomicBool::new(false));
        let reloads = Arc::new(ReloadStats::default());
        let admin = Arc::new(Admin {
            table: table.clone(),
            ready: ready.clone(),
            followed,
            reloads: reloads.clone(),
            control: ControlHandle::new(commands.clone(), table.clone()),
            applied,
            started: crate::engine::endpoint::unix_now(),
        });
        // The admin API outlives the listeners: while requests drain, the
        // tools still ask this proxy what it has in flight, and an admin
        // address that refuses connections means the proxy sends nothing.
        let admin_stop = CancellationToken::new();
        tokio::spawn(admin.serve(admin_listener, admin_stop.clone()));
        tokio::spawn(expire_idle_upstreams(table.clone(), shutdown.clone()));
        tracing::info!(addr = %admin_addr, "admin listening (stats at /stats)");

        let watcher = match file {
            Some(path) => {
                match reload::watch(path.clone(), initial, overrides, commands.clone(), reloads) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "cannot watch the config file; reload is off");
                        None
                    }
                }
            }
            None => None,
        };
        if taking_over {
            // The previous process serves until this one has what it
            // needs: the registries' data too.
            if !wait_served(&mut served, SYNC_DEADLINE).await {
                return Err(NotSynced.into());
            }
            open.cancel();
            ready.store(true, Ordering::Release);
        } else {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    in_time = wait_served(&mut served, FIRST_SYNC_WAIT) => if !in_time {
                        tracing::warn!(wait = ?FIRST_SYNC_WAIT, "not every registry synced in time: accepting clients with what the table holds (its services answer 503 until their registry syncs)");
                    },
                    _ = stop.cancelled() => return,
                }
                open.cancel();
                ready.store(true, Ordering::Release);
            });
        }
        let listeners = bound.lock().map(|b| b.clone()).unwrap_or_default();
        Ok(App {
            control: handle,
            table,
            commands,
            admin_addr,
            listeners,
            sockets,
            sources,
            shutdown,
            admin_stop,
            tracker,
            drain_timeout,
            _watcher: watcher,
            _runtime: runtime,
        })
    }

    /// Stops accepting, lets in-flight requests finish within the drain
    /// timeout, and closes keep-alive connections without racing their
    /// clients (see `proxy::conn`). The admin API answers until then,
    /// unless the proxy was `handed_over` (the new process answers at the
    /// same address). Returns whether every connection finished in time.
    pub async fn drain(self, handed_over: bool) -> bool {
        // A kept copy would hold the listening sockets open with nobody
        // accepting on them.
        self.sockets.clear();
        self.shutdown.cancel();
        if handed_over {
            self.admin_stop.cancel();
        }
        self.tracker.close();
        let finished = tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_ok();
        if finished {
            tracing::info!("drained: every connection finished");
        } else {
            tracing::warn!(timeout = ?self.drain_timeout, "drain timeout passed with connections still open");
        }
        self.admin_stop.cancel();
        finished
    }
}

/// Waits until every followed registry's data is in a published table;
/// false if `within` passes first.
async fn wait_served(served: &mut [watch::Receiver<bool>], within: std::time::Duration) -> bool {
    let all = async {
        for rx in served.iter_mut() {
            // A relay that stopped (the control task is gone) never serves.
            if rx.wait_for(|in_table| *in_table).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::time::timeout(within, all).await.is_ok()
}

/// Closes pooled upstream connections that stayed idle longer than their
/// service's `upstream_idle_timeout`.
async fn expire_idle_upstreams(table: SharedTable, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let table = table.load_full();
        for service in table.services.values() {
            for endpoint in &service.endpoints {
                if endpoint.live.pool.idle() > 0 {
                    endpoint
                        .live
                        .pool
                        .expire(service.settings.upstream_idle_timeout);
                }
            }
        }
    }
}

/// Registers for SIGTERM and SIGINT now (so a signal that arrives during
/// start-up is not lost) and returns a future that resolves on either.
pub fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
