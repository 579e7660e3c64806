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
        } else if max < self.max_connections {
            // Forget what is free now; the rest is taken back as open
            // connections close.
            let owed = self.max_connections - max;
            let forgotten = self.conn_limit.forget_permits(owed);
            if let Ok(owed) = u32::try_from(owed - forgotten) {
                if owed > 0 {
                    let limit = self.conn_limit.clone();
                    tokio::spawn(async move {
                        if let Ok(permits) = limit.acquire_many_owned(owed).await {
                            permits.forget();
                        }
                    });
                }
            }
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
    #[cfg(unix)]
    socket.set_reuseport(true)?;
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
        // A listener needs a new socket only when its address or mode
        // changes; its default service lives in the routing table.
        let same_socket =
            |r: &Running, l: &Listener| r.spec.bind == l.bind && r.spec.mode == l.mode;
        // Bind everything new before touching what runs: a bind that fails
        // changes nothing. SO_REUSEPORT lets a changed listener bind the
        // address its old socket still holds.
        let mut fresh = Vec::new();
        for l in &config.listeners {
            if self.running.get(&l.name).is_some_and(|r| same_socket(r, l)) {
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
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| !wanted.get(name.as_str()).is_some_and(|l| same_socket(r, l)))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &stale {
            if let Some(r) = self.running.remove(name) {
                tracing::info!(listener = %name, addr = %r.local, "listener stopped");
                r.stop.cancel();
            }
        }
        for (name, r) in self.running.iter_mut() {
            if let Some(l) = wanted.get(name.as_str()) {
                r.spec = (*l).clone();
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
