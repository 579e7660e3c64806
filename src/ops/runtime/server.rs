//! The runtime API's listeners (a Unix socket with mode 0600, loopback
//! TCP) and its client connections: bounded lines in, answers out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{looks_like_http, Runtime, Session, MAX_LINE};
use crate::control::config::{check_admin_token, check_loopback};
use crate::control::config::{Config, Global};
use crate::control::ListenerControl;

/// Clients connected at once, over both listeners.
const MAX_CLIENTS: usize = 64;
/// Time a client gets to send its command (HAProxy's default `stats
/// timeout`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client gets to read an answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The runtime API's sockets, bound but not yet serving.
pub struct RuntimeListeners {
    unix: Option<(std::os::unix::net::UnixListener, SocketFile)>,
    tcp: Option<std::net::TcpListener>,
}

/// The socket file of the Unix listener; removed when dropped, unless
/// another process has put its own socket there since.
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// What keeps the runtime API's socket file; the listeners stop with the
/// shutdown token.
pub struct Serving {
    _socket: Option<SocketFile>,
}

/// Binds what `global` asks for (`runtime_socket`, `runtime_api`).
pub fn bind(global: &Global) -> Result<RuntimeListeners, String> {
    let unix = match &global.runtime_socket {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let tcp = match global.runtime_api {
        Some(addr) => {
            check_loopback(addr)?;
            let l = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| format!("runtime API: cannot bind {addr}: {e}"))?;
            Some(l)
        }
        None => None,
    };
    Ok(RuntimeListeners { unix, tcp })
}

/// Binds a Unix socket at `path` with mode 0600. A socket file nobody
/// listens on (left by a process that died) is replaced; a live one, or a
/// file that is not a socket, is an error.
fn bind_unix(path: &Path) -> Result<(std::os::unix::net::UnixListener, SocketFile), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::os::unix::net::{UnixListener, UnixStream};
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "runtime socket {shown}: another process is serving on it (another \
                     pointsman, or HAProxy?); stop it or choose another path"
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| {
                    format!("runtime socket {shown}: cannot remove the stale socket file: {e}")
                })?;
                tracing::info!(path = %shown, "removed a stale runtime socket file");
            }
            Err(e) => {
                return Err(format!(
                    "runtime socket {shown}: cannot tell whether it is in use: {e}"
                ))
            }
        },
        Ok(_) => {
            return Err(format!(
                "runtime socket {shown}: the path exists and is not a socket; refusing to \
                 replace it"
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("runtime socket {shown}: {e}")),
    }
    let owner_only = || std::fs::Permissions::from_mode(0o600);
    // Bound under a temporary name and moved into place once it is 0600,
    // so the path never names a socket others may use.
    let tmp = path.with_file_name(format!(".pointsman-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = match UnixListener::bind(&tmp) {
        Ok(l) => {
            let placed = std::fs::set_permissions(&tmp, owner_only())
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = placed {
                let _ = std::fs::remove_file(&tmp);
                return Err(format!("runtime socket {shown}: {e}"));
            }
            l
        }
        // The temporary name may not fit in a socket address where the
        // path does: bind the path itself and restrict it at once.
        Err(_) => {
            let l = UnixListener::bind(path)
                .map_err(|e| format!("runtime socket {shown}: cannot bind: {e}"))?;
            std::fs::set_permissions(path, owner_only())
                .map_err(|e| format!("runtime socket {shown}: cannot set mode 0600: {e}"))?;
            l
        }
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("runtime socket {shown}: {e}"))?;
    let meta =
        std::fs::symlink_metadata(path).map_err(|e| format!("runtime socket {shown}: {e}"))?;
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

impl RuntimeListeners {
    /// Starts accepting clients on the current tokio runtime.
    pub fn serve(self, runtime: Arc<Runtime>, shutdown: CancellationToken) -> Serving {
        let limit = Arc::new(Semaphore::new(MAX_CLIENTS));
        let mut socket = None;
        if let Some((listener, file)) = self.unix {
            match tokio::net::UnixListener::from_std(listener) {
                Ok(l) => {
                    tracing::info!(path = %file.path.display(), "runtime API listening on a Unix socket (mode 0600)");
                    let (rt, limit, stop) = (runtime.clone(), limit.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        loop {
                            let stream = tokio::select! {
                                a = l.accept() => a.map(|(s, _)| s),
                                _ = stop.cancelled() => return,
                            };
                            match stream {
                                Ok(s) => {
                                    client(s, Session::unix(), rt.clone(), &limit, stop.clone())
                                }
                                Err(e) => accept_failed(e).await,
                            }
                        }
                    });
                }
                Err(e) => tracing::error!(error = %e, "cannot serve the runtime socket"),
            }
            socket = Some(file);
        }
        if let Some(listener) = self.tcp {
            let local = listener.local_addr().ok();
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    if let Some(addr) = local {
                        tracing::info!(%addr, "runtime API listening");
                    }
                    tokio::spawn(async move {
                        loop {
                            let stream = tokio::select! {
                                a = l.accept() => a.map(|(s, _)| s),
                                _ = shutdown.cancelled() => return,
                            };
                            match stream {
                                Ok(s) => client(
                                    s,
                                    Session::tcp(),
                                    runtime.clone(),
                                    &limit,
                                    shutdown.clone(),
                                ),
                                Err(e) => accept_failed(e).await,
                            }
                        }
                    });
                }
                Err(e) => tracing::error!(error = %e, "cannot serve the runtime API address"),
            }
        }
        Serving { _socket: socket }
    }
}

async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "runtime API accept failed");
    // Out of file descriptors, most likely: give others a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serves one client in its own task, if the client limit allows.
fn client<S>(
    stream: S,
    session: Session,
    runtime: Arc<Runtime>,
    limit: &Arc<Semaphore>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match limit.clone().try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(async move {
                serve_client(stream, session, &runtime, stop).await;
                drop(permit);
            });
        }
        Err(_) => {
            tokio::spawn(async move {
                let mut stream = stream;
                let msg = format!(
                    "Too many runtime API clients (at most {MAX_CLIENTS}); try again later.\n\n"
                );
                let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(msg.as_bytes())).await;
            });
        }
    }
}

/// One client: lines in, answers out. Without `prompt`, the line received
/// (and any already sent after it) is answered and the connection closed;
/// with it, the connection stays open until `quit`, EOF or idleness. A
/// line that looks like an HTTP request closes the connection unanswered:
/// a browser page posting to the port, whose body lines would otherwise be
/// read as commands.
pub async fn serve_client<S>(
    stream: S,
    mut session: Session,
    runtime: &Runtime,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf: Vec<u8> = Vec::new();
    let mut answered = false;
    loop {
        let line = loop {
            if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                break Some(line);
            }
            if buf.len() > MAX_LINE {
                let msg = format!("Line too long: at most {MAX_LINE} bytes.\n\n");
                let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(msg.as_bytes())).await;
                return;
            }
            if answered && !session.interactive {
                break None;
            }
            let wait = if session.interactive {
                session.idle_timeout
            } else {
                COMMAND_TIMEOUT
            };
            let mut chunk = [0u8; 4096];
            let read = tokio::select! {
                r = tokio::time::timeout(wait, rd.read(&mut chunk)) => r,
                _ = stop.cancelled() => break None,
            };
            match read {
                Ok(Ok(0)) => break (!buf.is_empty()).then(|| std::mem::take(&mut buf)),
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(Err(_)) | Err(_) => break None,
            }
        };
        let Some(line) = line else { break };
        answered = true;
        let text = String::from_utf8_lossy(&line);
        if looks_like_http(&text) {
            tracing::warn!("runtime API: an HTTP request arrived (a browser page posting to this port?); connection closed unanswered");
            return;
        }
        let (out, quit) = runtime.run_line(&text, &mut session).await;
        let sent = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(out.as_bytes())).await;
        if !matches!(sent, Ok(Ok(()))) || quit {
            break;
        }
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
}

/// Passes each config to the real listeners and keeps the last applied
/// one for the runtime API (its FRONTEND rows and `show info`).
pub struct ObservedListeners {
    inner: Box<dyn ListenerControl>,
    applied: Arc<ArcSwap<Config>>,
    started_with: (Option<PathBuf>, Option<SocketAddr>),
    /// The admin listener is bound once; a reload may change its token
    /// but not leave it unprotected.
    admin: SocketAddr,
}

impl ObservedListeners {
    pub fn new(inner: Box<dyn ListenerControl>, applied: Arc<ArcSwap<Config>>) -> Self {
        let g = &applied.load().global;
        let started_with = (g.runtime_socket.clone(), g.runtime_api);
        let admin = g.admin;
        ObservedListeners {
            inner,
            applied,
            started_with,
            admin,
        }
    }
}

impl ListenerControl for ObservedListeners {
    fn reconcile(&mut self, config: &Config) -> Result<(), String> {
        check_admin_token(&config.global, self.admin).map_err(|e| e.to_string())?;
        self.inner.reconcile(config)?;
        let g = &config.global;
        if (&g.runtime_socket, &g.runtime_api) != (&self.started_with.0, &self.started_with.1) {
            tracing::warn!(
                "runtime_socket and runtime_api are read at start only: restart the proxy to change them"
            );
        }
        self.applied.store(Arc::new(config.clone()));
        Ok(())
    }
}
