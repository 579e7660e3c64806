//! Errors a watcher cannot work around by retrying: a registry it was told
//! to use that does not exist or cannot be watched, or options that can
//! never connect. Everything transient (a lost connection, a malformed
//! value) is logged, counted in [`SourceStatus`](crate::SourceStatus) and
//! retried instead.

use std::path::PathBuf;

/// Why a watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "file registry {path}: directory does not exist: create it, or point the file registry at an existing directory"
    )]
    DirMissing { path: PathBuf },
    #[error(
        "file registry {path}: not a directory: expected a directory holding <service>/<instance-id> files"
    )]
    NotADir { path: PathBuf },
    #[error(
        "file registry {path}: cannot watch for changes: {reason}: check read permission and the inotify limits (fs.inotify.max_user_watches, max_user_instances)"
    )]
    Watch { path: PathBuf, reason: String },
    #[error("file registry {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd: no endpoints given: pass at least one, e.g. http://127.0.0.1:2379")]
    NoEndpoints,
    #[error("etcd: endpoint {endpoint:?} is not a URL or host:port: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("etcd TLS: cannot read {what} {path}: {source}: check the path and its permissions")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd TLS: {0}")]
    Tls(String),
    #[error("etcd: no member answered: {0}")]
    Unreachable(String),
}
