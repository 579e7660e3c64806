//! Hitless restart: a new pointsman process takes the listening sockets
//! over from the running one (`pointsman run --takeover SOCKET`).
//!
//! The running process serves a Unix socket at SOCKET (mode 0600, peers of
//! another user are refused). A new process started with the same SOCKET
//! connects to it and:
//!
//! 1. sends `hello` (protocol version, its pid);
//! 2. receives `sockets` (one entry per listener and one for the admin
//!    listener: role, name, mode, configured and bound address, socket
//!    count), then the file descriptors themselves in `fds` messages
//!    (SCM_RIGHTS, at most [`FDS_PER_MESSAGE`] per message): every
//!    `SO_REUSEPORT` socket of every listener, since closing one member of a
//!    reuseport group drops the connections queued on it;
//! 3. checks each descriptor (a listening TCP socket bound to the announced
//!    address), starts serving on them (binding whatever its config has
//!    that was not passed), and only then sends `stop`;
//! 4. the old process answers `stopping`, drops its copies of the sockets
//!    (the new process holds them, so they stay open and nothing queued on
//!    them is lost), stops accepting, drains and exits 0;
//! 5. the new process serves SOCKET itself (bound beside it, then renamed
//!    over it) for the next takeover.
//!
//! Messages are JSON, each preceded by its length (4 bytes, big endian; at
//! most [`MAX_FRAME`] bytes). A takeover that fails before `stop` (the new
//! process dies, or cannot use the sockets) leaves the old process serving
//! as before; it logs why. Nothing answering on SOCKET (first start, or a
//! socket file left by a process that is gone) means a normal start.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use socket2::{Socket, Type};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::control::config::{Listener, ListenerMode};

/// The protocol version both processes must speak.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;
/// Descriptors per `fds` message (the kernel allows 253).
pub const FDS_PER_MESSAGE: usize = 64;
/// Most sockets one takeover passes.
pub const MAX_SOCKETS: usize = 4096;
/// Time for one exchange (hello to the last descriptor, or stop to
/// stopping).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new process keeps asking while the running one is busy
/// (another takeover in progress, or already stopping).
const BUSY_DEADLINE: Duration = Duration::from_secs(60);
const BUSY_RETRY: Duration = Duration::from_millis(200);
/// How long a new process waits for its registries' first data before it
/// takes traffic over; past it the takeover is given up.
pub const SYNC_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    /// New -> old: asks for the listening sockets.
    Hello { version: u32, pid: u32 },
    /// Old -> new: what follows in `fds` messages, in this order.
    Sockets {
        version: u32,
        pid: u32,
        sockets: Vec<SocketInfo>,
    },
    /// Old -> new: carries `count` descriptors.
    Fds { count: usize },
    /// New -> old: serving now; stop accepting and drain.
    Stop,
    /// Old -> new: stopped accepting, draining.
    Stopping,
    /// Old -> new: no takeover now; `retry` says whether asking again later
    /// may work.
    Refused { reason: String, retry: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    Listener,
    Admin,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SocketInfo {
    role: Role,
    /// The listener's name ("admin" for the admin listener).
    name: String,
    /// "http", "tcp" or "admin"; for the logs.
    mode: String,
    /// The address in the config (it may have port 0).
    bind: SocketAddr,
    /// The address the sockets are bound to.
    local: SocketAddr,
    /// How many descriptors belong to it.
    count: usize,
}

fn mode_name(mode: ListenerMode) -> &'static str {
    match mode {
        ListenerMode::Http => "http",
        ListenerMode::Tcp => "tcp",
    }
}

// ---------------------------------------------------------------------------
// The sockets a process can hand over

struct Held {
    info: SocketInfo,
    fds: Vec<OwnedFd>,
}

/// Copies (duplicated descriptors) of the sockets this process accepts on,
/// kept current as listeners come and go, so a successor can be handed
/// them. Cleared when the process stops accepting: a copy kept after that
/// would hold a socket open that nobody accepts on.
#[derive(Default)]
pub struct HeldSockets {
    inner: Mutex<HeldInner>,
}

#[derive(Default)]
struct HeldInner {
    listeners: BTreeMap<String, Held>,
    admin: Option<Held>,
    closed: bool,
}

impl HeldSockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a listener's sockets (replacing what it had).
    pub fn set_listener(
        &self,
        spec: &Listener,
        local: SocketAddr,
        sockets: &[std::net::TcpListener],
    ) -> io::Result<()> {
        let fds = sockets
            .iter()
            .map(|s| s.as_fd().try_clone_to_owned())
            .collect::<io::Result<Vec<_>>>()?;
        let info = SocketInfo {
            role: Role::Listener,
            name: spec.name.clone(),
            mode: mode_name(spec.mode).into(),
            bind: spec.bind,
            local,
            count: fds.len(),
        };
        let mut inner = self.lock();
        if !inner.closed {
            inner
                .listeners
                .insert(spec.name.clone(), Held { info, fds });
        }
        Ok(())
    }

    /// Forgets a listener that stopped.
    pub fn remove_listener(&self, name: &str) {
        self.lock().listeners.remove(name);
    }

    /// Records the admin listener.
    pub fn set_admin(&self, bind: SocketAddr, socket: &impl AsFd) -> io::Result<()> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        let local = socket2::SockRef::from(&fd)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("the admin socket has no IP address"))?;
        let info = SocketInfo {
            role: Role::Admin,
            name: "admin".into(),
            mode: "admin".into(),
            bind,
            local,
            count: 1,
        };
        let mut inner = self.lock();
        if !inner.closed {
            inner.admin = Some(Held {
                info,
                fds: vec![fd],
            });
        }
        Ok(())
    }

    /// Drops every copy; nothing is recorded or handed over afterwards.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.listeners.clear();
        inner.admin = None;
    }

    /// What to hand over: the descriptions and fresh copies of the
    /// descriptors, in the same order. `None` once cleared.
    fn snapshot(&self) -> io::Result<Option<(Vec<SocketInfo>, Vec<OwnedFd>)>> {
        let inner = self.lock();
        if inner.closed {
            return Ok(None);
        }
        let mut infos = Vec::new();
        let mut fds = Vec::new();
        for held in inner.listeners.values().chain(inner.admin.iter()) {
            for fd in &held.fds {
                fds.push(fd.try_clone()?);
            }
            infos.push(held.info.clone());
        }
        Ok(Some((infos, fds)))
    }
}

// ---------------------------------------------------------------------------
// The sockets a process received

/// One listener's sockets received from the previous process.
pub struct InheritedListener {
    pub name: String,
    pub bind: SocketAddr,
    pub local: SocketAddr,
    pub sockets: Vec<std::net::TcpListener>,
}

/// The sockets received from the previous process, waiting to be used.
#[derive(Default)]
pub struct Inherited {
    pub listeners: Vec<InheritedListener>,
    admin: Option<(SocketAddr, std::net::TcpListener)>,
}

impl InheritedListener {
    /// Takes from `passed` the sockets for a listener of the new config:
    /// the passed listener bound where this one asks to bind (its
    /// configured address, or the address it ended up on when that was
    /// port 0), preferring one of the same name.
    pub fn take_for(passed: &mut Vec<InheritedListener>, l: &Listener) -> Option<Self> {
        let matches = |i: &InheritedListener| i.bind == l.bind || i.local == l.bind;
        let at = passed
            .iter()
            .position(|i| matches(i) && i.name == l.name)
            .or_else(|| passed.iter().position(matches))?;
        Some(passed.swap_remove(at))
    }
}

impl Inherited {
    /// The admin socket, if it was bound where `addr` asks.
    pub fn take_admin(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let (bind, socket) = self.admin.take()?;
        let local = socket.local_addr().ok()?;
        if bind == addr || local == addr {
            Some(socket)
        } else {
            tracing::info!(%local, wanted = %addr, "the admin address changed: the passed admin socket is closed");
            None
        }
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.admin.is_none()
    }
}

/// Checks that a received descriptor is what it was announced as: a
/// listening TCP socket bound to `local`.
fn listening_socket(fd: OwnedFd, local: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::from(fd);
    if socket.r#type()? != Type::STREAM {
        return Err(io::Error::other("not a stream socket"));
    }
    if !socket.is_listener()? {
        return Err(io::Error::other("not a listening socket"));
    }
    let at = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))?;
    if at != local {
        return Err(io::Error::other(format!(
            "bound to {at}, announced as {local}"
        )));
    }
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

// ---------------------------------------------------------------------------
// Messages with descriptors over a Unix stream socket

struct Wire {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Wire {
    fn new(stream: UnixStream) -> Self {
        Wire {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    /// Sends one message, with `fds` attached to its first byte.
    async fn send(&mut self, msg: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
        if body.len() > MAX_FRAME {
            return Err(io::Error::other("message too large"));
        }
        if fds.len() > FDS_PER_MESSAGE {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        let mut sent = 0;
        if !fds.is_empty() {
            let mut space =
                [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
            let stream = &self.stream;
            sent = stream
                .async_io(Interest::WRITABLE, || {
                    let mut control = SendAncillaryBuffer::new(&mut space);
                    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                        return Err(io::Error::other("descriptors do not fit the message"));
                    }
                    rustix::net::sendmsg(
                        stream,
                        &[io::IoSlice::new(&frame)],
                        &mut control,
                        SendFlags::NOSIGNAL,
                    )
                    .map_err(io::Error::from)
                })
                .await?;
            if sent == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        self.stream.write_all(&frame[sent..]).await
    }

    /// Reads what is there, with any descriptors that came along.
    async fn fill(&mut self) -> io::Result<()> {
        let mut data = [0u8; 4096];
        let mut space =
            [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let stream = &self.stream;
        let (n, fds) = stream
            .async_io(Interest::READABLE, || {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    stream,
                    &mut [io::IoSliceMut::new(&mut data)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                let mut fds = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = m {
                        fds.extend(received);
                    }
                }
                if msg.flags.contains(ReturnFlags::CTRUNC) {
                    return Err(io::Error::other("descriptors were truncated"));
                }
                Ok((msg.bytes, fds))
            })
            .await?;
        if n == 0 && fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process closed the connection",
            ));
        }
        self.buf.extend_from_slice(&data[..n]);
        self.fds.extend(fds);
        if self.fds.len() > MAX_SOCKETS {
            return Err(io::Error::other("too many descriptors"));
        }
        Ok(())
    }

    async fn recv(&mut self) -> io::Result<Message> {
        loop {
            if let Some((msg, used)) = next_frame(&self.buf)? {
                self.buf.drain(..used);
                return msg;
            }
            self.fill().await?;
        }
    }

    /// The next `n` descriptors received.
    fn take_fds(&mut self, n: usize) -> io::Result<Vec<OwnedFd>> {
        if self.fds.len() < n {
            return Err(io::Error::other(format!(
                "{n} descriptors announced, {} received",
                self.fds.len()
            )));
        }
        Ok(self.fds.drain(..n).collect())
    }
}

/// The first message in `buf` and the bytes it takes, once it is all
/// there: `None` while more bytes are needed. The outer `Err` is a frame
/// too large to wait for (the connection is given up), the inner one a
/// frame that is not a message.
fn next_frame(buf: &[u8]) -> io::Result<Option<(io::Result<Message>, usize)>> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "message of {len} bytes is too large"
        )));
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let msg = serde_json::from_slice(body)
        .map_err(|e| io::Error::other(format!("malformed message: {e}")));
    Ok(Some((msg, 4 + len)))
}

fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The peer's pid, when it runs as the same user as this process.
fn same_user(stream: &UnixStream) -> io::Result<Option<i32>> {
    let cred = stream.peer_cred()?;
    if cred.uid() != own_uid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "peer runs as uid {}, this process as {}",
                cred.uid(),
                own_uid()
            ),
        ));
    }
    Ok(cred.pid())
}

// ---------------------------------------------------------------------------
// Errors

/// Why a takeover failed, on either side. The running process logs it and
/// keeps serving; a new process exits with it.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// Reading or writing the takeover socket, or reading the sockets to
    /// pass.
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("takeover socket {}: the path exists and is not a socket", .path.display())]
    NotASocket { path: PathBuf },
    #[error("takeover socket {}: {} is not a directory", .path.display(), .dir.display())]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("takeover socket {}", .path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to takeover socket {}", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The process at the other end runs as another user (or cannot be
    /// asked).
    #[error("takeover socket")]
    Peer(#[source] io::Error),
    #[error("takeover via {} refused: {reason}", .path.display())]
    Refused { path: PathBuf, reason: String },
    /// The exchange with the running process failed. The cause is part of
    /// the message (not a `source`) so that it comes before the note that
    /// the running process keeps serving.
    #[error(
        "takeover via {} failed: {} (the running process keeps serving)",
        .path.display(),
        Causes(.cause.as_ref())
    )]
    Failed {
        path: PathBuf,
        cause: Box<TakeoverError>,
    },
    #[error("no answer within {EXCHANGE_TIMEOUT:?}")]
    NoAnswer,
    /// `message` is the message's debug form.
    #[error("unexpected message {message}")]
    Unexpected { message: String },
    #[error("the running process speaks protocol version {version}, this one {PROTOCOL_VERSION}")]
    Version { version: u32 },
    #[error("{total} sockets announced; at most {MAX_SOCKETS} are taken")]
    TooManySockets { total: usize },
    #[error("expected descriptors, got {message}")]
    NotDescriptors { message: String },
    /// A passed descriptor is not the listening socket announced.
    #[error("socket of {mode} {name:?} from pid {pid}")]
    Socket {
        mode: String,
        name: String,
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("a new process asked for the sockets with protocol version {version} is not {PROTOCOL_VERSION}")]
    HelloVersion { version: u32 },
    #[error("no hello within {EXCHANGE_TIMEOUT:?}")]
    NoHello,
    #[error("sending the sockets took over {EXCHANGE_TIMEOUT:?}")]
    SendTimeout,
    #[error("new process {pid} sent {message} instead of stop")]
    NotStop { pid: u32, message: String },
    /// The cause is part of the message: the running process logs only the
    /// message.
    #[error("new process {pid} went away before taking over: {cause}")]
    Gone { pid: u32, cause: io::Error },
}

/// An error followed by its causes, `: `-separated: the form `main`
/// prints, so a cause nested in a message reads the same as at the top.
struct Causes<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            write!(f, ": {cause}")?;
            next = cause.source();
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The new process

/// The registries gave the new process no data in time.
#[derive(Debug, thiserror::Error)]
#[error("takeover given up: the registries gave no data within {SYNC_DEADLINE:?} (the running process keeps serving)")]
pub struct NotSynced;

/// A takeover started at start-up: connected to the previous process (or
/// nothing was there), waiting for this process to serve.
pub struct Takeover {
    path: Option<PathBuf>,
    old: Option<(Wire, u32)>,
}

/// Connects to the process serving `path`, receives its sockets, and
/// returns them with the [`Takeover`] to complete once they are in use.
/// Nothing answering (no file, or a socket file nobody listens on) is a
/// normal start. `None`: no takeover socket at all.
pub async fn begin(path: Option<&Path>) -> Result<(Takeover, Inherited), TakeoverError> {
    let Some(path) = path else {
        return Ok((
            Takeover {
                path: None,
                old: None,
            },
            Inherited::default(),
        ));
    };
    let fresh = |why: &str| {
        tracing::info!(socket = %path.display(), "{why}: starting without a takeover");
        Ok((
            Takeover {
                path: Some(path.to_path_buf()),
                old: None,
            },
            Inherited::default(),
        ))
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(TakeoverError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(dir) = dir {
                if !dir.is_dir() {
                    return Err(TakeoverError::NoDirectory {
                        path: path.to_path_buf(),
                        dir: dir.to_path_buf(),
                    });
                }
            }
            return fresh("no process serves the takeover socket yet");
        }
        Err(source) => {
            return Err(TakeoverError::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let deadline = Instant::now() + BUSY_DEADLINE;
    loop {
        let stream = match UnixStream::connect(path).await {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return fresh("the takeover socket is stale (no process answers on it)")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return fresh("no process serves the takeover socket")
            }
            Err(source) => {
                return Err(TakeoverError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        same_user(&stream).map_err(TakeoverError::Peer)?;
        let mut wire = Wire::new(stream);
        let received = tokio::time::timeout(EXCHANGE_TIMEOUT, receive(&mut wire))
            .await
            .map_err(|_| TakeoverError::NoAnswer)
            .and_then(|r| r);
        match received {
            Ok(Received::Sockets { pid, inherited }) => {
                return Ok((
                    Takeover {
                        path: Some(path.to_path_buf()),
                        old: Some((wire, pid)),
                    },
                    inherited,
                ))
            }
            Ok(Received::Refused { reason, retry }) if retry && Instant::now() < deadline => {
                tracing::info!(%reason, "the running process cannot hand over now; asking again");
                tokio::time::sleep(BUSY_RETRY).await;
            }
            Ok(Received::Refused { reason, .. }) => {
                return Err(TakeoverError::Refused {
                    path: path.to_path_buf(),
                    reason,
                })
            }
            Err(cause) => {
                return Err(TakeoverError::Failed {
                    path: path.to_path_buf(),
                    cause: Box::new(cause),
                })
            }
        }
    }
}

enum Received {
    Sockets { pid: u32, inherited: Inherited },
    Refused { reason: String, retry: bool },
}

async fn receive(wire: &mut Wire) -> Result<Received, TakeoverError> {
    wire.send(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
        },
        &[],
    )
    .await?;
    let (version, pid, sockets) = match wire.recv().await? {
        Message::Sockets {
            version,
            pid,
            sockets,
        } => (version, pid, sockets),
        Message::Refused { reason, retry } => return Ok(Received::Refused { reason, retry }),
        other => {
            return Err(TakeoverError::Unexpected {
                message: format!("{other:?}"),
            })
        }
    };
    if version != PROTOCOL_VERSION {
        return Err(TakeoverError::Version { version });
    }
    // Saturating: the counts come from the other process.
    let total = sockets
        .iter()
        .fold(0usize, |n, s| n.saturating_add(s.count));
    if total > MAX_SOCKETS || sockets.len() > MAX_SOCKETS {
        return Err(TakeoverError::TooManySockets { total });
    }
    let mut fds = Vec::with_capacity(total);
    while fds.len() < total {
        match wire.recv().await? {
            Message::Fds { count } if count <= total - fds.len() => {
                fds.extend(wire.take_fds(count)?)
            }
            other => {
                return Err(TakeoverError::NotDescriptors {
                    message: format!("{other:?}"),
                })
            }
        }
    }
    let mut fds = fds.into_iter();
    let mut inherited = Inherited::default();
    for info in sockets {
        let mut sockets = Vec::with_capacity(info.count);
        for fd in fds.by_ref().take(info.count) {
            let socket =
                listening_socket(fd, info.local).map_err(|source| TakeoverError::Socket {
                    mode: info.mode.clone(),
                    name: info.name.clone(),
                    pid,
                    source,
                })?;
            sockets.push(socket);
        }
        tracing::info!(
            listener = %info.name,
            mode = %info.mode,
            addr = %info.local,
            sockets = sockets.len(),
            old_pid = pid,
            "received listening sockets"
        );
        match info.role {
            Role::Listener => inherited.listeners.push(InheritedListener {
                name: info.name,
                bind: info.bind,
                local: info.local,
                sockets,
            }),
            Role::Admin => {
                if let Some(s) = sockets.pop() {
                    inherited.admin = Some((info.bind, s));
                }
            }
        }
    }
    Ok(Received::Sockets { pid, inherited })
}

impl Takeover {
    /// This process serves now: tells the previous one to stop accepting
    /// and drain, then serves the takeover socket for the next process.
    /// `held` is what this process hands over then.
    pub async fn complete(self, held: Arc<HeldSockets>) -> Server {
        if let Some((mut wire, pid)) = self.old {
            let stopped = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
                wire.send(&Message::Stop, &[]).await?;
                match wire.recv().await? {
                    Message::Stopping => Ok(()),
                    other => Err(io::Error::other(format!("unexpected message {other:?}"))),
                }
            })
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
            match stopped {
                Ok(()) => tracing::info!(
                    old_pid = pid,
                    "took the listening sockets over: the previous process stopped accepting and drains"
                ),
                Err(e) => tracing::error!(
                    old_pid = pid,
                    error = %e,
                    "the previous process did not confirm that it stops; it may still accept on the shared sockets (stop it with SIGTERM)"
                ),
            }
        }
        let Some(path) = self.path else {
            return Server::none();
        };
        match Server::bind(&path, held).await {
            Ok(server) => {
                tracing::info!(socket = %path.display(), "serving the takeover socket");
                server
            }
            Err(e) => {
                tracing::error!(socket = %path.display(), error = %e, "cannot serve the takeover socket: this process cannot be taken over");
                Server::none()
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The running process

/// The takeover socket this process serves. Removed when dropped, unless a
/// successor has put its own there.
pub struct Server {
    path: Option<PathBuf>,
    /// (device, inode) of the socket file this process created.
    id: Option<(u64, u64)>,
    taken_over: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    fn none() -> Server {
        Server {
            path: None,
            id: None,
            taken_over: CancellationToken::new(),
            task: None,
        }
    }

    /// Binds beside `path` and renames over it, so the path always leads to
    /// a process that answers.
    async fn bind(path: &Path, held: Arc<HeldSockets>) -> io::Result<Server> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.new", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path))
            .and_then(|()| std::fs::symlink_metadata(path));
        let meta = match placed {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let taken_over = CancellationToken::new();
        let task = tokio::spawn(serve(listener, held, taken_over.clone()));
        Ok(Server {
            path: Some(path.to_path_buf()),
            id: Some((meta.dev(), meta.ino())),
            taken_over,
            task: Some(task),
        })
    }

    /// Resolves when a new process has taken the sockets over and asked
    /// this one to stop (never, without a takeover socket).
    pub async fn taken_over(&self) {
        self.taken_over.cancelled().await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let (Some(path), Some(id)) = (&self.path, self.id) {
            let ours = std::fs::symlink_metadata(path)
                .map(|m| (m.dev(), m.ino()) == id)
                .unwrap_or(false);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

async fn serve(listener: UnixListener, held: Arc<HeldSockets>, taken_over: CancellationToken) {
    let busy = Arc::new(AtomicBool::new(false));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "takeover socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (held, busy, taken_over) = (held.clone(), busy.clone(), taken_over.clone());
        tokio::spawn(async move {
            if let Err(e) = hand_over(stream, &held, &busy, &taken_over).await {
                tracing::warn!(error = %e, "takeover aborted: this process keeps serving");
            }
        });
    }
}

/// Clears `busy` when dropped.
struct BusyGuard<'a>(&'a AtomicBool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Answers one new process: hands it the sockets, then waits for `stop`.
async fn hand_over(
    stream: UnixStream,
    held: &HeldSockets,
    busy: &AtomicBool,
    taken_over: &CancellationToken,
) -> Result<(), TakeoverError> {
    let peer_pid = same_user(&stream)?;
    let mut wire = Wire::new(stream);
    let refuse = |reason: &str, retry: bool| Message::Refused {
        reason: reason.into(),
        retry,
    };
    let pid = match tokio::time::timeout(EXCHANGE_TIMEOUT, wire.recv()).await {
        Ok(Ok(Message::Hello { version, pid })) if version == PROTOCOL_VERSION => pid,
        Ok(Ok(Message::Hello { version, .. })) => {
            let why = format!("protocol version {version} is not {PROTOCOL_VERSION}");
            wire.send(&refuse(&why, false), &[]).await?;
            return Err(TakeoverError::HelloVersion { version });
        }
        Ok(Ok(other)) => {
            return Err(TakeoverError::Unexpected {
                message: format!("{other:?}"),
            })
        }
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(TakeoverError::NoHello),
    };
    if taken_over.is_cancelled() {
        wire.send(&refuse("this process is stopping", true), &[])
            .await?;
        return Ok(());
    }
    if busy.swap(true, Ordering::AcqRel) {
        wire.send(&refuse("another takeover is in progress", true), &[])
            .await?;
        return Ok(());
    }
    let _busy = BusyGuard(busy);
    let Some((sockets, fds)) = held.snapshot()? else {
        wire.send(&refuse("this process is stopping", true), &[])
            .await?;
        return Ok(());
    };
    tracing::info!(
        new_pid = pid,
        peer_pid = ?peer_pid,
        sockets = fds.len(),
        "handing the listening sockets to a new process"
    );
    let exchange = async {
        wire.send(
            &Message::Sockets {
                version: PROTOCOL_VERSION,
                pid: std::process::id(),
                sockets,
            },
            &[],
        )
        .await?;
        for chunk in fds.chunks(FDS_PER_MESSAGE) {
            let borrowed: Vec<BorrowedFd<'_>> = chunk.iter().map(|f| f.as_fd()).collect();
            wire.send(&Message::Fds { count: chunk.len() }, &borrowed)
                .await?;
        }
        io::Result::Ok(())
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| TakeoverError::SendTimeout)??;
    drop(fds);
    // The new process starts serving now; it may take a while (config,
    // registries), or die: either way this process serves until `stop`.
    match wire.recv().await {
        Ok(Message::Stop) => {
            held.clear();
            taken_over.cancel();
            if let Err(e) = wire.send(&Message::Stopping, &[]).await {
                tracing::warn!(error = %e, "could not confirm the stop to the new process");
            }
            tracing::info!(
                new_pid = pid,
                "the new process took the listening sockets over: stopping accepting and draining"
            );
            Ok(())
        }
        Ok(other) => Err(TakeoverError::NotStop {
            pid,
            message: format!("{other:?}"),
        }),
        Err(cause) => Err(TakeoverError::Gone { pid, cause }),
    }
}

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, bind: SocketAddr) -> Listener {
        Listener {
            name: name.into(),
            bind,
            mode: ListenerMode::Http,
            default_service: None,
            tls: false,
        }
    }

    fn passed(name: &str, bind: &str, local: &str) -> InheritedListener {
        InheritedListener {
            name: name.into(),
            bind: bind.parse().unwrap(),
            local: local.parse().unwrap(),
            sockets: Vec::new(),
        }
    }

    #[test]
    fn a_listener_takes_the_sockets_bound_where_it_asks() {
        let mut list = vec![
            passed("a", "127.0.0.1:0", "127.0.0.1:4000"),
            passed("b", "127.0.0.1:5000", "127.0.0.1:5000"),
            passed("c", "127.0.0.1:5000", "127.0.0.1:5000"),
        ];
        // Same address, preferring the same name.
        let got =
            InheritedListener::take_for(&mut list, &spec("c", "127.0.0.1:5000".parse().unwrap()));
        assert_eq!(got.map(|l| l.name).as_deref(), Some("c"));
        // A renamed listener keeps its address's sockets.
        let got =
            InheritedListener::take_for(&mut list, &spec("x", "127.0.0.1:5000".parse().unwrap()));
        assert_eq!(got.map(|l| l.name).as_deref(), Some("b"));
        // Port 0 in both configs: the same listener.
        let got =
            InheritedListener::take_for(&mut list, &spec("a", "127.0.0.1:0".parse().unwrap()));
        assert_eq!(got.map(|l| l.local.port()), Some(4000));
        assert!(list.is_empty());
        assert!(
            InheritedListener::take_for(&mut list, &spec("a", "127.0.0.1:1".parse().unwrap()))
                .is_none()
        );
    }

    /// A socket bound to a loopback port, listening or not.
    fn tcp_socket(listen: bool) -> std::net::TcpListener {
        let s = Socket::new(socket2::Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        if listen {
            s.listen(16).unwrap();
        }
        s.into()
    }

    struct Old {
        held: Arc<HeldSockets>,
        taken_over: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), TakeoverError>>,
    }

    /// An "old process" answering on one end of a socket pair.
    fn old_process(stream: UnixStream, held: HeldSockets) -> Old {
        let held = Arc::new(held);
        let taken_over = CancellationToken::new();
        let (h, t) = (held.clone(), taken_over.clone());
        let task = tokio::spawn(async move {
            let busy = AtomicBool::new(false);
            hand_over(stream, &h, &busy, &t).await
        });
        Old {
            held,
            taken_over,
            task,
        }
    }

    #[tokio::test]
    async fn sockets_pass_with_their_descriptions_and_stop_is_confirmed() {
        let web = tcp_socket(true);
        let local = web.local_addr().unwrap();
        let admin = tcp_socket(true);
        let admin_local = admin.local_addr().unwrap();
        let held = HeldSockets::default();
        held.set_listener(&spec("web", "127.0.0.1:0".parse().unwrap()), local, &[web])
            .unwrap();
        held.set_admin(admin_local, &admin).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let old = old_process(a, held);

        let mut wire = Wire::new(b);
        let Received::Sockets { pid, mut inherited } = receive(&mut wire).await.unwrap() else {
            panic!("refused")
        };
        assert_eq!(pid, std::process::id());
        let got = InheritedListener::take_for(
            &mut inherited.listeners,
            &spec("web", "127.0.0.1:0".parse().unwrap()),
        )
        .expect("the web listener");
        assert_eq!(got.local, local);
        assert_eq!(got.sockets.len(), 1);
        assert_eq!(got.sockets[0].local_addr().unwrap(), local);
        let admin = inherited.take_admin(admin_local).expect("the admin socket");
        assert_eq!(admin.local_addr().unwrap(), admin_local);
        // A connection queued on the passed socket is accepted here.
        let _client = std::net::TcpStream::connect(local).unwrap();
        let accepted = tokio::net::TcpListener::from_std(got.sockets.into_iter().next().unwrap())
            .unwrap()
            .accept()
            .await;
        assert!(accepted.is_ok());

        assert!(
            !old.taken_over.is_cancelled(),
            "nothing stops before `stop`"
        );
        wire.send(&Message::Stop, &[]).await.unwrap();
        assert!(matches!(wire.recv().await.unwrap(), Message::Stopping));
        old.task.await.unwrap().unwrap();
        assert!(old.taken_over.is_cancelled());
        assert!(
            old.held.snapshot().unwrap().is_none(),
            "the old copies are dropped"
        );
    }

    #[tokio::test]
    async fn a_socket_that_is_not_listening_is_refused_and_the_old_process_keeps_its_own() {
        let not_listening = tcp_socket(false);
        let local = not_listening.local_addr().unwrap();
        let held = HeldSockets::default();
        held.set_listener(&spec("web", local), local, &[not_listening])
            .unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let old = old_process(a, held);

        let mut wire = Wire::new(b);
        let err = match receive(&mut wire).await {
            Err(e) => Causes(&e).to_string(),
            Ok(_) => panic!("a socket that does not listen was accepted"),
        };
        assert!(err.contains("not a listening socket"), "{err}");
        drop(wire);
        let aborted = old.task.await.unwrap();
        assert!(aborted.is_err(), "the old process notices the abort");
        assert!(
            !old.taken_over.is_cancelled(),
            "the old process keeps serving"
        );
        assert!(old.held.snapshot().unwrap().is_some());
    }

    #[test]
    fn a_failed_takeover_names_every_cause_before_the_note() {
        let err = TakeoverError::Failed {
            path: "/run/pointsman.takeover".into(),
            cause: Box::new(TakeoverError::Socket {
                mode: "http".into(),
                name: "web".into(),
                pid: 7,
                source: io::Error::other("not a listening socket"),
            }),
        };
        assert_eq!(
            Causes(&err).to_string(),
            "takeover via /run/pointsman.takeover failed: socket of http \"web\" from pid 7: \
             not a listening socket (the running process keeps serving)"
        );
        let err = TakeoverError::Inspect {
            path: "/run/x".into(),
            source: io::Error::other("denied"),
        };
        assert_eq!(Causes(&err).to_string(), "takeover socket /run/x: denied");
    }

    #[tokio::test]
    async fn a_second_takeover_at_once_is_asked_to_retry() {
        let l = tcp_socket(true);
        let local = l.local_addr().unwrap();
        let held = Arc::new(HeldSockets::default());
        held.set_listener(&spec("web", local), local, &[l]).unwrap();
        let busy = Arc::new(AtomicBool::new(true));
        let taken = CancellationToken::new();
        let (a, b) = UnixStream::pair().unwrap();
        let (h, bz, t) = (held.clone(), busy.clone(), taken.clone());
        let task = tokio::spawn(async move { hand_over(a, &h, &bz, &t).await });
        let mut wire = Wire::new(b);
        match receive(&mut wire).await.unwrap() {
            Received::Refused { retry, reason } => {
                assert!(retry);
                assert!(reason.contains("in progress"), "{reason}");
            }
            Received::Sockets { .. } => panic!("a second takeover got the sockets"),
        }
        task.await.unwrap().unwrap();
        assert!(
            busy.load(Ordering::Acquire),
            "the first takeover is still in progress"
        );
    }
}
