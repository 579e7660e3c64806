//! The proxy's own record in etcd, so that whoever is about to stop an
//! instance knows which proxies to ask first: `<pointsman>/proxies/<id>`,
//! written under a lease (it vanishes with the proxy), naming the admin
//! address others reach it at and the etcd revision its routing table
//! holds, rewritten whenever that revision changes. Deleted on a clean
//! shutdown, after the proxy has drained.
//!
//! `pointsman register` and rollouts read these records and ask each
//! proxy's admin API what it has applied and what it still has in flight
//! (`pointsman_deploy::fleet`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pointsman_discovery::admin_api::ProxyRecord;
use pointsman_discovery::keys::proxy_key;
use pointsman_discovery::{host_name, EtcdOptions, LeasedKey, SourceStatus};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The record's lease.
pub const TTL: Duration = Duration::from_secs(10);
/// How often the applied revision is looked at; a change is written at
/// once.
pub const POLL: Duration = Duration::from_millis(50);
/// How long a clean shutdown waits for the record to be deleted.
const DELETE_WAIT: Duration = Duration::from_secs(3);

/// What the record says and where it goes.
#[derive(Clone, Debug)]
pub struct HeartbeatOptions {
    pub etcd: EtcdOptions,
    /// The proxy's id: one key segment.
    pub id: String,
    /// `host:port` of the admin API, as other hosts reach it.
    pub admin: String,
    pub ttl: Duration,
    pub poll: Duration,
}

/// Why this proxy's record cannot be kept in etcd.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error(
        "--proxy-id {0:?}: expected one key segment: not empty, no '/', no spaces (e.g. edge-1)"
    )]
    BadProxyId(String),
    #[error("--advertise-admin: {0}")]
    BadAdvertise(pointsman_discovery::AddressError),
    #[error("proxy record: {0}")]
    Record(String),
}

impl HeartbeatOptions {
    /// Options from `pointsman run`'s flags: `id` defaults to
    /// [`default_proxy_id`], `advertise` to [`advertised_admin`].
    pub fn new(
        etcd: EtcdOptions,
        id: Option<String>,
        advertise: Option<String>,
        admin: SocketAddr,
    ) -> Result<HeartbeatOptions, HeartbeatError> {
        let id = id.unwrap_or_else(|| default_proxy_id(admin));
        if id.is_empty()
            || id
                .chars()
                .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            return Err(HeartbeatError::BadProxyId(id));
        }
        let admin = match advertise {
            Some(a) => {
                a.parse::<pointsman_discovery::Address>()
                    .map_err(HeartbeatError::BadAdvertise)?;
                a
            }
            None => advertised_admin(admin),
        };
        Ok(HeartbeatOptions {
            etcd,
            id,
            admin,
            ttl: TTL,
            poll: POLL,
        })
    }
}

/// `<host name>:<admin port>`: stable across restarts, distinct for every
/// proxy of a host (they cannot share an admin port).
pub fn default_proxy_id(admin: SocketAddr) -> String {
    format!("{}:{}", host_name(), admin.port())
}

/// The admin address to advertise for the one bound: itself, unless it is
/// the unspecified address (`0.0.0.0`, `::`), which others cannot reach;
/// then the host name.
pub fn advertised_admin(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        format!("{}:{}", host_name(), bound.port())
    } else {
        bound.to_string()
    }
}

/// The record is written again this often even when nothing changed, so a
/// record lost to a stale writer (the process this one took over from)
/// comes back.
const REFRESH: Duration = Duration::from_secs(5);

/// The running heartbeat.
pub struct Heartbeat {
    stop: CancellationToken,
    keep_record: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Heartbeat {
    /// Writes the record now and keeps it current; `status` is the etcd
    /// source's status, whose applied revision the record carries.
    pub fn start(
        opts: HeartbeatOptions,
        status: Arc<SourceStatus>,
    ) -> Result<Heartbeat, HeartbeatError> {
        let key = proxy_key(&opts.etcd.prefixes, &opts.id);
        let lease = LeasedKey::start(opts.etcd.clone(), key.clone(), opts.ttl)
            .map_err(|e| HeartbeatError::Record(e.to_string()))?;
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let record = ProxyRecord {
            id: opts.id.clone(),
            admin: opts.admin.clone(),
            applied_revision: None,
            pid: std::process::id(),
            started,
        };
        tracing::info!(key = %key, admin = %opts.admin, "registering this proxy in etcd");
        let stop = CancellationToken::new();
        let keep_record = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(beat(
            lease,
            record,
            status,
            opts.poll,
            stop.clone(),
            keep_record.clone(),
        ));
        Ok(Heartbeat {
            stop,
            keep_record,
            task,
        })
    }

    /// Deletes the record (waiting a few seconds at most) and stops.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Stops writing and leaves the record alone: after a takeover the new
    /// process, with the same id and admin address, owns it.
    pub async fn hand_over(self) {
        self.keep_record
            .store(true, std::sync::atomic::Ordering::Release);
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn beat(
    lease: LeasedKey,
    mut record: ProxyRecord,
    status: Arc<SourceStatus>,
    poll: Duration,
    stop: CancellationToken,
    keep_record: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut written: Option<Option<i64>> = None;
    let mut last_write = tokio::time::Instant::now();
    loop {
        let applied = status.applied_revision();
        if written != Some(applied) || last_write.elapsed() >= REFRESH {
            last_write = tokio::time::Instant::now();
            record.applied_revision = applied;
            match serde_json::to_vec(&record) {
                Ok(value) => {
                    // A failed write is retried by the lease's task with
                    // the latest value; no need to retry here.
                    tokio::select! {
                        _ = lease.put(value) => {}
                        _ = stop.cancelled() => break,
                    }
                    written = Some(applied);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode the proxy record");
                    written = Some(applied);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.cancelled() => break,
        }
    }
    let key = lease.key().to_string();
    if keep_record.load(std::sync::atomic::Ordering::Acquire) {
        tracing::info!(key = %key, "proxy record left to the process that took over");
        return;
    }
    match tokio::time::timeout(DELETE_WAIT, lease.delete()).await {
        Ok(Ok(_)) => tracing::info!(key = %key, "proxy record deleted"),
        Ok(Err(e)) => {
            tracing::warn!(key = %key, error = %e, "cannot delete the proxy record; it expires with its lease")
        }
        Err(_) => {
            tracing::warn!(key = %key, "deleting the proxy record took too long; it expires with its lease")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_advertised_addresses() {
        let any: SocketAddr = "0.0.0.0:8404".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8404".parse().unwrap();
        assert_eq!(advertised_admin(local), "127.0.0.1:8404");
        assert_eq!(advertised_admin(any), format!("{}:8404", host_name()));
        assert!(default_proxy_id(local).ends_with(":8404"));
        let etcd = EtcdOptions::default();
        let o = HeartbeatOptions::new(etcd.clone(), Some("edge-1".into()), None, local).unwrap();
        assert_eq!(
            (o.id.as_str(), o.admin.as_str()),
            ("edge-1", "127.0.0.1:8404")
        );
        let err = HeartbeatOptions::new(etcd.clone(), Some("a/b".into()), None, local)
            .err()
            .unwrap();
        assert!(err.to_string().contains("one key segment"), "{err}");
        let err = HeartbeatOptions::new(etcd, None, Some("nope".into()), local)
            .err()
            .unwrap();
        assert!(err.to_string().contains("--advertise-admin"), "{err}");
    }
}
