//! The sockets pointsman accepts clients on. A config (at start or on
//! reload) says which listeners should run; [`Listeners::reconcile`] binds
//! the new ones before stopping any old one, so a reload that asks for an
//! address that cannot be bound changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Listener, ListenerMode};
use crate::control::{ListenerControl, SharedTable};
use crate::proxy::conn::accept_loop;
use crate::proxy::http::HttpProxy;
use crate::proxy::{tcp, ClientLimits};

const BACKLOG: u32 = 1024;

struct Running {
    spec: Listener,
    local: SocketAddr,
    stop: CancellationToken,
}

/// The running listeners and what they need to serve.
pub struct Listeners {
    running: HashMap<String, Running>,
    proxy: Arc<HttpProxy>,
    table: SharedTable,
    /// Open client connections across all listeners.
    conn_limit: Arc<Semaphore>,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Where each listener ended up (port 0 binds a free port).
    bound: Arc<std::sync::Mutex<HashMap<String, SocketAddr>>>,
}

impl Listeners {
    pub fn new(
        proxy: Arc<HttpProxy>,
        table: SharedTable,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Listeners {
            running: HashMap::new(),
            proxy,
            table,
            conn_limit: Arc::new(Semaphore::new(0)),
            max_connections: 0,
            shutdown,
            tracker,
            bound: Default::default(),
        }
    }

    /// Where each listener is bound, by name.
    pub fn bound(&self) -> Arc<std::sync::Mutex<HashMap<String, SocketAddr>>> {
        self.bound.clone()
    }

    fn spawn(&self, spec: &Listener, socket: TcpListener, stop: CancellationToken) {
        let name: Arc<str> = spec.name.as_str().into();
        let limit = self.conn_limit.clone();
        let tracker = self.tracker.clone();
        match spec.mode {
            ListenerMode::Http => {
                let proxy = self.proxy.clone();
                let conn_stop = stop.clone();
                self.tracker.spawn(accept_loop(
                    socket,
                    limit,
                    stop,
                    move |stream, peer, permit| {
                        let serve = proxy.clone().serve_connection(
                            name.clone(),
                            stream,
                            peer,
                            permit,
                            conn_stop.clone(),
                        );
                        tracker.spawn(serve);
                    },
                ));
            }
            ListenerMode::Tcp => {
                let table = self.table.clone();
                self.tracker.spawn(accept_loop(
                    socket,
                    limit,
                    stop,
                    move |stream, peer, permit| {
                        tracker.spawn(tcp::serve_connection(
                            table.clone(),
                            name.clone(),
                            stream,
                            peer,
                            permit,
                        ));
                    },
                ));
            }
        }
    }

    fn resize(&mut self, max: usize) {
        if max > self.max_connections {
            self.conn_limit.add_permits(max - self.max_connections);
        } else {
            // Permits in use are given back later and then forgotten lazily;
            // forget what is free now.
            self.conn_limit.forget_permits(self.max_connections - max);
        }
        self.max_connections = max;
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

impl ListenerControl for Listeners {
    fn reconcile(&mut self, config: &Config) -> Result<(), String> {
        let wanted: HashMap<&str, &Listener> = config
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l))
            .collect();
        // Listeners to stop: gone, or changed.
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| wanted.get(name.as_str()) != Some(&&r.spec))
            .map(|(name, _)| name.clone())
            .collect();
        // A changed listener that keeps its address must let go of it first.
        let mut stopped_early = Vec::new();
        for name in &stale {
            if let (Some(r), Some(w)) = (self.running.get(name), wanted.get(name.as_str())) {
                if r.spec.bind == w.bind {
                    stopped_early.push(name.clone());
                }
            }
        }
        for name in &stopped_early {
            if let Some(r) = self.running.remove(name) {
                r.stop.cancel();
            }
        }
        // Bind everything new before touching the rest.
        let mut fresh = Vec::new();
        for l in &config.listeners {
            if self.running.get(&l.name).is_some_and(|r| r.spec == *l) {
                continue;
            }
            match bind(l.bind) {
                Ok(socket) => fresh.push((l.clone(), socket)),
                Err(e) => {
                    return Err(format!(
                        "listener {:?}: cannot bind {}: {e} (is another process using it?)",
                        l.name, l.bind
                    ))
                }
            }
        }
        for name in &stale {
            if let Some(r) = self.running.remove(name) {
                tracing::info!(listener = %name, addr = %r.local, "listener stopped");
                r.stop.cancel();
            }
        }
        self.resize(config.global.max_connections);
        self.proxy
            .limits
            .store(Arc::new(ClientLimits::from(&config.global)));
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound.retain(|name, _| wanted.contains_key(name.as_str()));
        for (spec, socket) in fresh {
            let local = socket.local_addr().unwrap_or(spec.bind);
            let stop = self.shutdown.child_token();
            tracing::info!(listener = %spec.name, addr = %local, mode = ?spec.mode, "listening");
            self.spawn(&spec, socket, stop.clone());
            bound.insert(spec.name.clone(), local);
            self.running
                .insert(spec.name.clone(), Running { spec, local, stop });
        }
        Ok(())
    }
}
