//! The sockets pointsman accepts clients on. A config (at start or on
//! reload) says which listeners should run; [`Listeners::reconcile`] binds
//! the new ones before stopping any old one, so a reload that asks for an
//! address that cannot be bound changes nothing.
//!
//! After a takeover (see [`crate::process::takeover`]) the first reconcile serves
//! the sockets passed by the previous process instead of binding them; and
//! every running listener's sockets are recorded in [`HeldSockets`] for the
//! next takeover.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::config::{Config, Listener, ListenerMode};
use crate::control::ListenerControl;
use crate::engine::conn::{accept_loop, ConnLimit};
use crate::engine::frontend::{frontends_for, FrontendCounters};
use crate::engine::http::HttpProxy;
use crate::engine::spread::{OnWorker, Workers};
use crate::engine::table::SharedTable;
use crate::engine::tls::{self, CertStore};
use crate::engine::{tcp, ClientLimits};
use crate::process::takeover::{HeldSockets, Inherited, InheritedListener};
use tokio_rustls::TlsAcceptor;

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
    workers: Workers,
    /// Sockets passed by the previous process, used by the first
    /// reconcile; what it does not use is closed then.
    inherited: Vec<InheritedListener>,
    /// Copies of the running listeners' sockets, for the next takeover.
    held: Arc<HeldSockets>,
    /// Accept loops wait for this at start, so no client is served before
    /// every followed registry's data is in the table (see `app`): clients
    /// wait in the backlog meanwhile, or are accepted by the previous
    /// process.
    open: CancellationToken,
    /// TLS listeners' certificates: the directory, its acceptor, and the
    /// token that stops the directory's watcher.
    tls: Option<(PathBuf, TlsAcceptor, CancellationToken)>,
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
            workers: Workers::new(workers),
            inherited: Vec::new(),
            held: Arc::new(HeldSockets::default()),
            open: CancellationToken::new(),
            tls: None,
        }
    }

    /// Cancelling it lets the accept loops start.
    pub fn opener(&self) -> CancellationToken {
        self.open.clone()
    }

    /// Where each listener is bound, by name.
    pub fn bound(&self) -> Arc<std::sync::Mutex<HashMap<String, SocketAddr>>> {
        self.bound.clone()
    }

    /// Serves the listeners the previous process passed (those the config
    /// still has) instead of binding them.
    pub fn inherit(&mut self, inherited: &mut Inherited) {
        self.inherited = std::mem::take(&mut inherited.listeners);
    }

    /// The running listeners' sockets, for the next takeover.
    pub fn held(&self) -> Arc<HeldSockets> {
        self.held.clone()
    }

    /// The sockets of a new listener: the ones passed by the previous
    /// process for its address (topped up to one per worker), or fresh
    /// ones.
    fn sockets_for(&mut self, l: &Listener) -> std::io::Result<Vec<std::net::TcpListener>> {
        let wanted = self.workers.len().max(1);
        let taken = self.inherited_for(l);
        let Some(mut sockets) = taken else {
            return bind(l.bind, wanted);
        };
        if sockets.len() < wanted {
            // They listen only once this process serves: until then the
            // kernel would queue connections on them that nobody accepts.
            if let Some(at) = sockets.first().and_then(|s| s.local_addr().ok()) {
                match bind_sockets(at, wanted - sockets.len(), false) {
                    Ok(more) => sockets.extend(more),
                    // The passed sockets serve; some threads do not accept
                    // on this listener.
                    Err(e) => {
                        tracing::warn!(listener = %l.name, addr = %at, error = %e, "cannot bind more sockets beside the passed ones")
                    }
                }
            }
        }
        Ok(sockets)
    }

    fn inherited_for(&mut self, l: &Listener) -> Option<Vec<std::net::TcpListener>> {
        let found = InheritedListener::take_for(&mut self.inherited, l)?;
        tracing::info!(listener = %l.name, addr = %found.local, sockets = found.sockets.len(), "serving the sockets passed by the previous process");
        Some(found.sockets).filter(|s| !s.is_empty())
    }

    /// Starts accepting on each socket, on its own worker runtime.
    /// Several sockets (passed by a process with more threads) share the
    /// workers round robin.
    fn spawn(&self, spec: &Listener, sockets: Vec<std::net::TcpListener>, stop: CancellationToken) {
        for (i, socket) in sockets.into_iter().enumerate() {
            let worker = (!self.workers.is_empty()).then(|| i % self.workers.len());
            let accept = self.accept(spec, socket, stop.clone(), worker);
            let tracked = self.tracker.track_future(accept);
            match worker.and_then(|w| self.workers.handle(w)) {
                Some(handle) => drop(handle.spawn(tracked)),
                None => drop(tokio::spawn(tracked)),
            }
        }
    }

    /// The accept loop of one socket; it runs on the runtime it is spawned
    /// on (worker `worker`), and so do the connections it accepts, unless
    /// another worker serves fewer (see [`Workers::place`]).
    fn accept(
        &self,
        spec: &Listener,
        socket: std::net::TcpListener,
        stop: CancellationToken,
        worker: Option<usize>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let name: Arc<str> = spec.name.as_str().into();
        let limit = self.conn_limit.clone();
        let tracker = self.tracker.clone();
        let workers = self.workers.clone();
        let open = self.open.clone();
        let tls = self
            .tls
            .as_ref()
            .filter(|_| spec.tls)
            .map(|(_, acceptor, _)| acceptor.clone());
        let serve = Serve {
            mode: spec.mode,
            tls,
            proxy: self.proxy.clone(),
            table: self.table.clone(),
            frontend: frontends_for(&self.table).get(&name),
            listener: name.clone(),
            // The connections' own token: each waits on it, so one per
            // accept loop keeps its lock on this thread.
            stop: stop.child_token(),
        };
        async move {
            tokio::select! {
                _ = open.cancelled() => {}
                _ = stop.cancelled() => return,
            }
            let sock = socket2::SockRef::from(&socket);
            if !sock.is_listener().unwrap_or(true) {
                if let Err(e) = sock.listen(BACKLOG as i32) {
                    tracing::error!(listener = %name, error = %e, "cannot listen on the socket");
                    return;
                }
            }
            let socket = match TcpListener::from_std(socket) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(listener = %name, error = %e, "cannot serve the listening socket");
                    return;
                }
            };
            accept_loop(socket, limit, stop, move |stream, peer, permit| {
                let placed = worker.map(|w| workers.place(w));
                let elsewhere = placed
                    .as_ref()
                    .filter(|p| Some(p.index()) != worker)
                    .and_then(|p| workers.handle(p.index()));
                match elsewhere {
                    None => drop(tracker.spawn(serve.clone().run(
                        Accepted::Here(stream),
                        peer,
                        permit,
                        placed,
                    ))),
                    Some(handle) => match stream.into_std() {
                        Ok(moved) => {
                            let run = serve
                                .clone()
                                .run(Accepted::Moved(moved), peer, permit, placed);
                            drop(handle.spawn(tracker.track_future(run)));
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "cannot hand a connection to another thread")
                        }
                    },
                }
            })
            .await
        }
    }

    fn resize(&mut self, max: usize) {
        self.conn_limit.resize(self.max_connections, max);
        self.max_connections = max;
    }
}

/// What serving one accepted connection needs.
#[derive(Clone)]
struct Serve {
    mode: ListenerMode,
    /// The TLS handshake, on a TLS listener.
    tls: Option<TlsAcceptor>,
    proxy: Arc<HttpProxy>,
    table: SharedTable,
    listener: Arc<str>,
    /// The listener's counters, kept across reloads by its name.
    frontend: Arc<FrontendCounters>,
    stop: CancellationToken,
}

/// A connection accepted on this thread, or handed over by another.
enum Accepted {
    Here(TcpStream),
    Moved(std::net::TcpStream),
}

impl Serve {
    async fn run(
        self,
        accepted: Accepted,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        placed: Option<OnWorker>,
    ) {
        let stream = match accepted {
            Accepted::Here(s) => s,
            Accepted::Moved(s) => match TcpStream::from_std(s) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot serve a connection handed over by another thread");
                    return;
                }
            },
        };
        match self.mode {
            ListenerMode::Http => {
                self.proxy
                    .serve_connection(
                        self.listener,
                        self.frontend,
                        stream,
                        self.tls,
                        peer,
                        permit,
                        self.stop,
                    )
                    .await
            }
            ListenerMode::Tcp => {
                let session = self.frontend.open_session();
                tcp::serve_connection(self.table, self.listener, session, stream, peer, permit)
                    .await
            }
        }
        drop(placed);
    }
}

/// Binds `count` sockets to `addr` with SO_REUSEPORT, so that several
/// event loops each accept on their own (a port 0 request binds a free port
/// once, then the others to the same one).
fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    bind_sockets(addr, count, true)
}

/// [`bind`], listening or not: a socket that does not listen yet takes no
/// connection from its reuseport group (its accept loop listens once open).
fn bind_sockets(
    addr: SocketAddr,
    count: usize,
    listen: bool,
) -> std::io::Result<Vec<std::net::TcpListener>> {
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
        if listen {
            socket.listen(BACKLOG as i32)?;
        }
        socket.set_nonblocking(true)?;
        out.push(socket.into());
    }
    Ok(out)
}

impl Listeners {
    /// Opens `tls_dir` when a TLS listener needs it and it is not the one
    /// open already (then its certificates are watched); true when the
    /// acceptor changed, so TLS listeners start again with it.
    fn use_tls_dir(&mut self, config: &Config) -> Result<bool, String> {
        let wanted = config
            .listeners
            .iter()
            .any(|l| l.tls)
            .then_some(config.global.tls_dir.as_ref())
            .flatten();
        let Some(dir) = wanted else {
            return Ok(false);
        };
        if self.tls.as_ref().is_some_and(|(open, _, _)| open == dir) {
            return Ok(false);
        }
        let store = CertStore::open(dir)?;
        for (file, names) in store.names() {
            tracing::info!(dir = %dir.display(), certificate = %file, names = %names.join(","), "certificate loaded");
        }
        let stop = self.shutdown.child_token();
        store.clone().watch(stop.clone());
        let acceptor = TlsAcceptor::from(tls::server_config(store));
        if let Some((_, _, old)) = self.tls.replace((dir.clone(), acceptor, stop)) {
            old.cancel();
        }
        Ok(true)
    }
}

impl ListenerControl for Listeners {
    fn reconcile(&mut self, config: &Config) -> Result<(), String> {
        let wanted: HashMap<&str, &Listener> = config
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l))
            .collect();
        // Certificates first: a directory that gives none refuses the
        // config before anything changes.
        let tls_changed = self.use_tls_dir(config)?;
        // A listener needs a new socket only when its address, mode or
        // TLS changes; its default service lives in the routing table.
        let same_socket = |r: &Running, l: &Listener| {
            r.spec.bind == l.bind
                && r.spec.mode == l.mode
                && r.spec.tls == l.tls
                && !(l.tls && tls_changed)
        };
        // Bind everything new before touching what runs: a bind that fails
        // changes nothing. SO_REUSEPORT lets a changed listener bind the
        // address its old socket still holds.
        let mut fresh = Vec::new();
        for l in &config.listeners {
            if self.running.get(&l.name).is_some_and(|r| same_socket(r, l)) {
                continue;
            }
            match self.sockets_for(l) {
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
                self.held.remove_listener(name);
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
        for unused in self.inherited.drain(..) {
            tracing::info!(listener = %unused.name, addr = %unused.local, "the new config has no listener at this address: its passed sockets are closed (the previous process closes its own when it stops)");
        }
        for (spec, socket) in fresh {
            let local = socket
                .first()
                .and_then(|s| s.local_addr().ok())
                .unwrap_or(spec.bind);
            let stop = self.shutdown.child_token();
            tracing::info!(listener = %spec.name, addr = %local, mode = ?spec.mode, "listening");
            if let Err(e) = self.held.set_listener(&spec, local, &socket) {
                tracing::warn!(listener = %spec.name, error = %e, "cannot keep a copy of the listening sockets: a takeover will bind this listener afresh");
            }
            self.spawn(&spec, socket, stop.clone());
            bound.insert(spec.name.clone(), local);
            self.running
                .insert(spec.name.clone(), Running { spec, local, stop });
        }
        Ok(())
    }
}
