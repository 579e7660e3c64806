//! The sockets pointsman accepts clients on. A config (at start or on
//! reload) says which listeners should run; [`Listeners::reconcile`] binds
//! the new ones before stopping any old one, so a reload that asks for an
//! address that cannot be bound changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Listener, ListenerMode};
use crate::control::{ListenerControl, SharedTable};
use crate::proxy::conn::{accept_loop, ConnLimit};
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
    conn_limit: Arc<ConnLimit>,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Where each listener ended up (port 0 binds a free port).
    bound: Arc<std::sync::Mutex<HashMap<String, SocketAddr>>>,
    /// Runtimes that serve clients, one event loop per thread, each with
    /// its own socket per listener (SO_REUSEPORT spreads connections over
    /// them). Empty: serve on the runtime that runs the control task.
    workers: Vec<Handle>,
}

impl Listeners {
    pub fn new(
        proxy: Arc<HttpProxy>,
        table: SharedTable,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        workers: Vec<Handle>,
    ) -> Self {
        Listeners {
            running: HashMap::new(),
            proxy,
            table,
            conn_limit: ConnLimit::new(),
            max_connections: 0,
            shutdown,
            tracker,
            bound: Default::default(),
            workers,
        }
    }

    /// Where each listener is bound, by name.
    pub fn bound(&self) -> Arc<std::sync::Mutex<HashMap<String, SocketAddr>>> {
        self.bound.clone()
    }

    /// Starts accepting on each socket, on its own worker runtime.
    fn spawn(&self, spec: &Listener, sockets: Vec<std::net::TcpListener>, stop: CancellationToken) {
        for (i, socket) in sockets.into_iter().enumerate() {
            let accept = self.accept(spec, socket, stop.clone());
            let tracked = self.tracker.track_future(accept);
            match self.workers.get(i) {
                Some(worker) => drop(worker.spawn(tracked)),
                None => drop(tokio::spawn(tracked)),
            }
        }
    }

    /// The accept loop of one socket; it runs on the runtime it is spawned
    /// on, and so do the connections it accepts.
    fn accept(
        &self,
        spec: &Listener,
        socket: std::net::TcpListener,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let name: Arc<str> = spec.name.as_str().into();
        let limit = self.conn_limit.clone();
        let tracker = self.tracker.clone();
        let mode = spec.mode;
        let proxy = self.proxy.clone();
        let table = self.table.clone();
        async move {
            let socket = match TcpListener::from_std(socket) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(listener = %name, error = %e, "cannot serve the listening socket");
                    return;
                }
            };
            let conn_stop = stop.clone();
            accept_loop(
                socket,
                limit,
                stop,
                move |stream, peer, permit| match mode {
                    ListenerMode::Http => {
                        let serve = proxy.clone().serve_connection(
                            name.clone(),
                            stream,
                            peer,
                            permit,
                            conn_stop.clone(),
                        );
                        tracker.spawn(serve);
                    }
                    ListenerMode::Tcp => {
                        tracker.spawn(tcp::serve_connection(
                            table.clone(),
                            name.clone(),
                            stream,
                            peer,
                            permit,
                        ));
                    }
                },
            )
            .await
        }
    }

    fn resize(&mut self, max: usize) {
        self.conn_limit.resize(self.max_connections, max);
        self.max_connections = max;
    }
}

/// Binds `count` sockets to `addr` with SO_REUSEPORT, so that several
/// event loops each accept on their own (a port 0 request binds a free port
/// once, then the others to the same one).
fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(count.max(1));
    for _ in 0..count.max(1) {
        let at = match out.first() {
            Some(first) => first.local_addr()?,
            None => addr,
        };
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        socket.set_reuse_port(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&at.into())?;
        socket.listen(BACKLOG as i32)?;
        socket.set_nonblocking(true)?;
        out.push(socket.into());
    }
    Ok(out)
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
            match bind(l.bind, self.workers.len()) {
                Ok(sockets) => fresh.push((l.clone(), sockets)),
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
            let local = socket
                .first()
                .and_then(|s| s.local_addr().ok())
                .unwrap_or(spec.bind);
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
