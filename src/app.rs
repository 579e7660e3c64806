//! Starting and stopping a proxy: bind listeners from the config, start the
//! control task, the admin listener and the config watcher, then wait for
//! SIGTERM/SIGINT and drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::Config;
use crate::control::{Command, Control, SharedTable};
use crate::listener::Listeners;
use crate::proxy::http::HttpProxy;
use crate::proxy::ClientLimits;
use crate::reload::{self, Overrides, ReloadStats};
use crate::routing::RoutingTable;

/// A running proxy.
pub struct App {
    pub table: SharedTable,
    pub commands: mpsc::Sender<Command>,
    pub admin_addr: SocketAddr,
    pub listeners: HashMap<String, SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: std::time::Duration,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl App {
    /// Binds everything the config asks for and starts serving.
    pub async fn start(config: Config, overrides: Overrides) -> anyhow::Result<App> {
        let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
        let limits = Arc::new(ArcSwap::from_pointee(ClientLimits::from(&config.global)));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let proxy = Arc::new(HttpProxy {
            table: table.clone(),
            limits,
        });
        let listeners = Listeners::new(proxy, table.clone(), shutdown.clone(), tracker.clone());
        let bound = listeners.bound();
        let admin_listener = crate::admin::bind(config.global.admin)
            .await
            .map_err(anyhow::Error::msg)?;
        let admin_addr = admin_listener.local_addr()?;
        let drain_timeout = config.global.drain_timeout;
        let file = config.file();
        let initial = config.clone();

        let mut control = Control::new(config, table.clone(), Box::new(listeners));
        control.start().map_err(anyhow::Error::msg)?;
        let (commands, rx) = mpsc::channel(1024);
        tokio::spawn(control.run(rx));

        let ready = Arc::new(AtomicBool::new(true));
        let admin = Arc::new(Admin {
            table: table.clone(),
            ready: ready.clone(),
        });
        tokio::spawn(admin.serve(admin_listener, shutdown.clone()));
        tracing::info!(addr = %admin_addr, "admin listening (stats at /stats)");

        let watcher = match file {
            Some(path) => {
                let stats = Arc::new(ReloadStats::default());
                match reload::watch(path.clone(), initial, overrides, commands.clone(), stats) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "cannot watch the config file; reload is off");
                        None
                    }
                }
            }
            None => None,
        };
        ready.store(true, Ordering::Release);
        let listeners = bound.lock().map(|b| b.clone()).unwrap_or_default();
        Ok(App {
            table,
            commands,
            admin_addr,
            listeners,
            shutdown,
            tracker,
            drain_timeout,
            _watcher: watcher,
        })
    }

    /// Stops accepting, lets in-flight requests finish within the drain
    /// timeout, closes idle keep-alive connections. Returns whether every
    /// connection finished in time.
    pub async fn drain(self) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        let finished = tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_ok();
        if finished {
            tracing::info!("drained: every connection finished");
        } else {
            tracing::warn!(timeout = ?self.drain_timeout, "drain timeout passed with connections still open");
        }
        finished
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
