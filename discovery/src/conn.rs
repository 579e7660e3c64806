//! A connection to etcd for the writers (the lease, `pointsman_deploy`'s
//! registrar, fleet queries and registry store): one member at
//! a time, every request bounded by `request_timeout`, and on a failure the
//! client is dropped and the next member is tried, as the watcher does (see
//! [`crate::etcd`] for why one pinned member beats tonic's balancer).

use std::future::Future;
use std::time::Duration;

use etcd_client::Client;
use tokio::time::timeout;

use crate::EtcdOptions;

/// What went wrong talking to etcd. Each message names the member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// Options that can never work (no endpoints, unreadable TLS files).
    #[error("{0}")]
    Config(String),
    #[error("etcd at {endpoint} unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("etcd at {endpoint}: {what}: {reason}")]
    Request {
        endpoint: String,
        what: &'static str,
        reason: String,
    },
    /// The member answered but could not serve the request now: its
    /// cluster is electing a leader ("etcdserver: leader changed", "no
    /// leader") or the request timed out inside the cluster. Another try,
    /// on this member or the next, can succeed.
    #[error("etcd at {endpoint}: {what}: {reason}")]
    Unavailable {
        endpoint: String,
        what: &'static str,
        reason: String,
    },
    #[error("etcd at {endpoint}: {what}: no answer within {limit:?}")]
    Timeout {
        endpoint: String,
        what: &'static str,
        limit: Duration,
    },
    /// A write named a lease etcd no longer has: it expired (a pause longer
    /// than its TTL) or was revoked.
    #[error("etcd at {endpoint}: the lease was not found (expired or revoked)")]
    LeaseNotFound { endpoint: String },
}

impl EtcdError {
    /// Whether the error says nothing about etcd's state, only that it could
    /// not be asked: unreachable, no answer in time, or no leader to answer.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            EtcdError::Unreachable { .. }
                | EtcdError::Timeout { .. }
                | EtcdError::Unavailable { .. }
        )
    }
}

/// A client pinned to one member, rebuilt on the next one after a failure.
pub struct EtcdConn {
    opts: EtcdOptions,
    client: Option<Client>,
    idx: usize,
}

impl EtcdConn {
    /// Checks what retrying cannot fix; connects lazily.
    pub fn new(opts: EtcdOptions) -> Result<EtcdConn, EtcdError> {
        opts.check().map_err(|e| EtcdError::Config(e.to_string()))?;
        Ok(EtcdConn {
            opts,
            client: None,
            idx: 0,
        })
    }

    pub fn opts(&self) -> &EtcdOptions {
        &self.opts
    }

    /// The member in use.
    pub fn endpoint(&self) -> &str {
        self.opts
            .endpoints
            .get(self.idx)
            .map(String::as_str)
            .unwrap_or("")
    }

    async fn client(&mut self) -> Result<Client, EtcdError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let options = self
            .opts
            .connect_options()
            .map_err(|e| EtcdError::Config(e.to_string()))?;
        let endpoint = self.endpoint().to_string();
        let limit = self.opts.connect_timeout + self.opts.request_timeout;
        let client = match timeout(limit, Client::connect([endpoint.clone()], Some(options))).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.failed();
                return Err(EtcdError::Unreachable {
                    endpoint,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                self.failed();
                return Err(EtcdError::Unreachable {
                    endpoint,
                    reason: format!("no connection within {limit:?}"),
                });
            }
        };
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Drops the client and moves on to the next member.
    pub fn failed(&mut self) {
        self.client = None;
        let n = self.opts.endpoints.len().max(1);
        self.idx = (self.idx + 1) % n;
    }

    /// Runs one request with the client, bounded by `request_timeout`. A
    /// failure other than a missing lease moves on to the next member.
    pub async fn call<T, F, Fut>(&mut self, what: &'static str, f: F) -> Result<T, EtcdError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client().await?;
        let endpoint = self.endpoint().to_string();
        let limit = self.opts.request_timeout;
        match timeout(limit, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let reason = e.to_string();
                if reason.contains("lease not found") {
                    return Err(EtcdError::LeaseNotFound { endpoint });
                }
                self.failed();
                Err(if is_connection_error(&e) {
                    EtcdError::Unreachable { endpoint, reason }
                } else if is_unavailable(&e) {
                    EtcdError::Unavailable {
                        endpoint,
                        what,
                        reason,
                    }
                } else {
                    EtcdError::Request {
                        endpoint,
                        what,
                        reason,
                    }
                })
            }
            Err(_) => {
                self.failed();
                Err(EtcdError::Timeout {
                    endpoint,
                    what,
                    limit,
                })
            }
        }
    }
}

fn is_connection_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            // tonic reports a refused or broken connection as a status
            // whose message names the transport.
            m.contains("transport")
                || m.contains("connect")
                || m.contains("connection")
                || m.contains("unavailable")
        }
        _ => false,
    }
}

/// gRPC's status code UNAVAILABLE, which etcd gives to "leader changed",
/// "no leader" and "request timed out" (tonic's `Code` is not re-exported
/// by etcd_client, so the number is compared).
const GRPC_UNAVAILABLE: i32 = 14;

/// Whether the member could not serve the request for now (see
/// [`EtcdError::Unavailable`]).
fn is_unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            status_is_unavailable(i32::from(s.code()), s.message())
        }
        _ => false,
    }
}

fn status_is_unavailable(code: i32, message: &str) -> bool {
    code == GRPC_UNAVAILABLE
        || message.contains("leader changed")
        || message.contains("no leader")
        || message.contains("request timed out")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_election_or_a_timeout_inside_the_cluster_is_unavailable() {
        assert!(status_is_unavailable(14, "etcdserver: leader changed"));
        assert!(status_is_unavailable(14, "etcdserver: no leader"));
        assert!(status_is_unavailable(14, "etcdserver: request timed out"));
        // A different code, as some etcd versions give an election.
        assert!(status_is_unavailable(2, "etcdserver: leader changed"));
        assert!(!status_is_unavailable(
            9,
            "etcdserver: mvcc: required revision has been compacted"
        ));
        assert!(!status_is_unavailable(3, "etcdserver: key is not provided"));
    }

    #[test]
    fn only_unreachable_timed_out_and_unavailable_are_transient() {
        let endpoint = "http://127.0.0.1:2379".to_string();
        let unavailable = EtcdError::Unavailable {
            endpoint: endpoint.clone(),
            what: "read",
            reason: "etcdserver: leader changed".into(),
        };
        assert!(unavailable.is_transient());
        assert_eq!(
            unavailable.to_string(),
            "etcd at http://127.0.0.1:2379: read: etcdserver: leader changed"
        );
        let refused = EtcdError::Request {
            endpoint: endpoint.clone(),
            what: "read",
            reason: "permission denied".into(),
        };
        assert!(!refused.is_transient());
        assert!(!EtcdError::LeaseNotFound { endpoint }.is_transient());
    }
}
