//! A connection to etcd for the writers (the lease, `pointsman_deploy`'s
//! registrar and fleet queries): one member at
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
    /// not be asked: unreachable, or no answer in time.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            EtcdError::Unreachable { .. } | EtcdError::Timeout { .. }
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
