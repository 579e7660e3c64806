//! One key kept in etcd under a lease for as long as its owner lives: an
//! instance's registration (`pointsman register`, through
//! `pointsman_deploy::registrar`) and each proxy's record under
//! `<pointsman>/proxies/` (read by `pointsman_deploy::fleet`).
//!
//! A [`LeasedKey`] is a handle on a task that owns the lease:
//!
//! - [`put`](LeasedKey::put) writes the value under the lease, granting one
//!   first if there is none, and returns the etcd revision of the write;
//! - the task keeps the lease alive every third of its TTL, counted from
//!   the last renewal: rewriting the value (which etcd does not count as a
//!   renewal) never puts a keep-alive off;
//! - if etcd says the lease is gone (it expired during a pause longer than
//!   the TTL, etcd lost its data, someone revoked it), or no keep-alive was
//!   answered for a whole TTL, the task grants a new lease and writes the
//!   latest value again, retrying with backoff while etcd is unreachable;
//! - [`delete`](LeasedKey::delete) deletes the key and revokes the lease.
//!
//! If the owner dies without deleting, etcd deletes the key when the lease
//! expires, at most one TTL later.

use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{timeout, Instant};

use crate::backoff::Backoff;
use crate::conn::{EtcdConn, EtcdError};
use crate::EtcdOptions;

/// Where a [`LeasedKey`] stands, as its task last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Nothing written yet, or the last write failed and is being retried.
    Pending,
    /// The latest value is in etcd under `lease`, written at `revision`.
    Held { lease: i64, revision: i64 },
    /// etcd no longer has the lease; a new one is being granted.
    Lost,
    /// Deleted on request; the key is no longer kept.
    Released,
}

enum Command {
    Put {
        value: Vec<u8>,
        reply: oneshot::Sender<Result<i64, EtcdError>>,
    },
    Delete {
        reply: oneshot::Sender<Result<i64, EtcdError>>,
    },
}

/// A key kept alive in etcd; see the module documentation.
///
/// Dropping the handle revokes the lease (best effort: if the runtime stops
/// first, the lease expires on its own).
pub struct LeasedKey {
    key: String,
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<LeaseState>,
}

impl LeasedKey {
    /// Starts keeping `key` with a lease of `ttl` (whole seconds, rounded
    /// up; etcd raises very short TTLs to its minimum). Nothing is written
    /// until the first [`put`](Self::put). Fails only on options that can
    /// never work. Spawns the keeping task: call it within a Tokio runtime.
    pub fn start(
        etcd: EtcdOptions,
        key: impl Into<String>,
        ttl: Duration,
    ) -> Result<LeasedKey, EtcdError> {
        let key = key.into();
        let conn = EtcdConn::new(etcd)?;
        let backoff = Backoff::new(conn.opts().backoff_min, conn.opts().backoff_max);
        let (state_tx, state) = watch::channel(LeaseState::Pending);
        let (commands, rx) = mpsc::channel(16);
        let keeper = Keeper {
            conn,
            key: key.clone(),
            ttl: ttl.max(Duration::from_secs(1)),
            value: None,
            lease: None,
            written: false,
            backoff,
            next: Instant::now(),
            state: state_tx,
        };
        tokio::spawn(keeper.run(rx));
        Ok(LeasedKey {
            key,
            commands,
            state,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Follows the lease's state (held, lost, pending...).
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Writes `value` under the lease and returns the revision of the write.
    /// The value is kept even when the write fails: the task retries it,
    /// and writes it again under a new lease whenever one is needed.
    pub async fn put(&self, value: impl Into<Vec<u8>>) -> Result<i64, EtcdError> {
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Put {
            value: value.into(),
            reply,
        };
        self.ask(cmd, answer).await
    }

    /// Deletes the key and revokes the lease; returns the revision of the
    /// delete. On an error the key is no longer kept alive, so it vanishes
    /// when the lease expires.
    pub async fn delete(self) -> Result<i64, EtcdError> {
        let (reply, answer) = oneshot::channel();
        self.ask(Command::Delete { reply }, answer).await
    }

    async fn ask(
        &self,
        cmd: Command,
        answer: oneshot::Receiver<Result<i64, EtcdError>>,
    ) -> Result<i64, EtcdError> {
        let stopped = || EtcdError::Config("the lease keeper has stopped".to_string());
        self.commands.send(cmd).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

struct Held {
    id: i64,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    last_ok: Instant,
}

struct Keeper {
    conn: EtcdConn,
    key: String,
    ttl: Duration,
    /// The value to keep; `None` until the first put.
    value: Option<Vec<u8>>,
    lease: Option<Held>,
    /// Whether `value` is in etcd under `lease`.
    written: bool,
    backoff: Backoff,
    /// When to act next: keep the lease alive, or retry a write.
    next: Instant,
    state: watch::Sender<LeaseState>,
}

impl Keeper {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None => {
                        if self.lease.is_some() {
                            let _ = self.release().await;
                        }
                        return;
                    }
                    Some(Command::Put { value, reply }) => {
                        self.value = Some(value);
                        self.written = false;
                        let written = self.write().await;
                        if let Err(e) = &written {
                            self.retry_later(e);
                        }
                        let _ = reply.send(written);
                    }
                    Some(Command::Delete { reply }) => {
                        let _ = reply.send(self.release().await);
                        return;
                    }
                },
                _ = tokio::time::sleep_until(self.next), if self.value.is_some() => {
                    if self.lease.is_some() && self.written {
                        self.keep_alive().await;
                    } else if let Err(e) = self.write().await {
                        self.retry_later(&e);
                    }
                }
            }
        }
    }

    fn keep_alive_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(500))
    }

    fn ttl_secs(&self) -> i64 {
        let secs = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
    }

    fn retry_later(&mut self, e: &EtcdError) {
        let delay = self.backoff.next();
        self.next = Instant::now() + delay;
        if !matches!(self.state.borrow().clone(), LeaseState::Lost) {
            self.state.send_replace(LeaseState::Pending);
        }
        tracing::warn!(key = %self.key, "{e}; retrying in {:.1}s", delay.as_secs_f64());
    }

    /// Writes the value under the lease, granting one if needed.
    async fn write(&mut self) -> Result<i64, EtcdError> {
        let Some(value) = self.value.clone() else {
            return Err(EtcdError::Config("nothing to write".to_string()));
        };
        let mut last = None;
        // A lease that vanished between the grant and the put: once more.
        for _ in 0..2 {
            let lease = match &self.lease {
                Some(held) => held.id,
                None => {
                    let ttl = self.ttl_secs();
                    let granted = self
                        .conn
                        .call("granting a lease", move |mut c| async move {
                            c.lease_grant(ttl, None).await
                        })
                        .await?;
                    self.lease = Some(Held {
                        id: granted.id(),
                        stream: None,
                        last_ok: Instant::now(),
                    });
                    granted.id()
                }
            };
            let (key, v) = (self.key.clone(), value.clone());
            let put = self
                .conn
                .call("writing", move |mut c| async move {
                    c.put(key, v, Some(PutOptions::new().with_lease(lease)))
                        .await
                })
                .await;
            match put {
                Ok(resp) => {
                    let revision =
                        resp.header()
                            .map(|h| h.revision())
                            .ok_or_else(|| EtcdError::Request {
                                endpoint: self.conn.endpoint().to_string(),
                                what: "writing",
                                reason: "the answer has no header".to_string(),
                            })?;
                    self.written = true;
                    self.backoff.reset();
                    // A put under a lease does not renew it: the next
                    // keep-alive is due a third of the TTL after the last
                    // renewal, however often the value is rewritten.
                    let renewed = self
                        .lease
                        .as_ref()
                        .map(|h| h.last_ok)
                        .unwrap_or_else(Instant::now);
                    self.next = renewed + self.keep_alive_every();
                    self.state
                        .send_replace(LeaseState::Held { lease, revision });
                    return Ok(revision);
                }
                Err(e @ EtcdError::LeaseNotFound { .. }) => {
                    self.lost();
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::Config("lease not granted".to_string())))
    }

    /// etcd no longer has the lease: grant a new one and write again, now.
    fn lost(&mut self) {
        if let Some(held) = self.lease.take() {
            tracing::warn!(
                key = %self.key,
                lease = format!("{:x}", held.id),
                "etcd no longer has the lease (expired during a pause longer than its TTL, etcd lost its data, or revoked): writing the key again under a new lease"
            );
        }
        self.written = false;
        self.next = Instant::now();
        self.state.send_replace(LeaseState::Lost);
    }

    async fn keep_alive(&mut self) {
        let Some(held) = self.lease.as_mut() else {
            return;
        };
        let (id, stream) = (held.id, held.stream.take());
        match keep_alive_once(&mut self.conn, id, stream).await {
            Ok((ttl, stream)) if ttl > 0 => {
                if let Some(held) = self.lease.as_mut() {
                    held.stream = Some(stream);
                    held.last_ok = Instant::now();
                }
                self.next = Instant::now() + self.keep_alive_every();
            }
            Ok(_) | Err(EtcdError::LeaseNotFound { .. }) => self.lost(),
            Err(e) => {
                let silent = self
                    .lease
                    .as_ref()
                    .map(|h| h.last_ok.elapsed())
                    .unwrap_or_default();
                if silent >= self.ttl {
                    tracing::warn!(key = %self.key, "no keep-alive answered for {silent:?}, longer than the lease's TTL: {e}");
                    self.lost();
                    // Not at once: etcd is not answering.
                    self.next = Instant::now() + self.backoff.next();
                } else {
                    let delay = self.backoff.next().min(self.keep_alive_every());
                    tracing::warn!(key = %self.key, "keeping the lease alive failed: {e}; retrying in {:.1}s", delay.as_secs_f64());
                    self.next = Instant::now() + delay;
                }
            }
        }
    }

    /// Deletes the key and revokes the lease.
    async fn release(&mut self) -> Result<i64, EtcdError> {
        self.value = None;
        let key = self.key.clone();
        let deleted = self
            .conn
            .call(
                "deleting",
                move |mut c| async move { c.delete(key, None).await },
            )
            .await;
        if let Some(held) = self.lease.take() {
            let _ = self
                .conn
                .call("revoking the lease", move |mut c| async move {
                    c.lease_revoke(held.id).await
                })
                .await;
        }
        self.state.send_replace(LeaseState::Released);
        let resp = deleted?;
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| EtcdError::Request {
                endpoint: self.conn.endpoint().to_string(),
                what: "deleting",
                reason: "the answer has no header".to_string(),
            })
    }
}

/// One keep-alive round trip on `stream` (opened if `None`); the TTL etcd
/// answers with (0: the lease is gone) and the stream to reuse.
async fn keep_alive_once(
    conn: &mut EtcdConn,
    id: i64,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<(i64, (LeaseKeeper, LeaseKeepAliveStream)), EtcdError> {
    let (mut keeper, mut responses) = match stream {
        Some(s) => s,
        None => {
            conn.call("opening the keep-alive stream", move |mut c| async move {
                c.lease_keep_alive(id).await
            })
            .await?
        }
    };
    let limit = conn.opts().request_timeout;
    let endpoint = conn.endpoint().to_string();
    let round_trip = async {
        keeper.keep_alive().await?;
        responses.message().await
    };
    let fail = |conn: &mut EtcdConn, reason: String| {
        conn.failed();
        EtcdError::Unreachable {
            endpoint: endpoint.clone(),
            reason,
        }
    };
    let answered = timeout(limit, round_trip).await;
    match answered {
        Ok(Ok(Some(resp))) => Ok((resp.ttl(), (keeper, responses))),
        Ok(Ok(None)) => Err(fail(conn, "the keep-alive stream closed".to_string())),
        Ok(Err(e)) if e.to_string().contains("lease not found") => {
            Err(EtcdError::LeaseNotFound { endpoint })
        }
        Ok(Err(e)) => Err(fail(conn, e.to_string())),
        Err(_) => Err(fail(conn, format!("no keep-alive answer within {limit:?}"))),
    }
}
