//! The etcd watcher: step 1 of the flow for the fleet-wide registry.
//!
//! [`run`] lists both prefixes at one revision `R` and sends them as one
//! `Reset`, then watches a single key range covering both prefixes from
//! `R + 1`, turning each watch response — everything etcd committed in one
//! revision, such as a blue/green switch done in a transaction — into one
//! `Changes` update. A listing is read in pages of at most
//! [`PAGE_KEYS`] keys, each page continuing after the last key of the one
//! before at the first page's revision, so no single answer has to fit the
//! message cap however much the prefixes hold. It never gives up:
//!
//! - a broken stream (etcd stopped, network cut, keepalive timeout) marks
//!   the source disconnected and is re-established with exponential backoff
//!   and jitter, resuming after the last revision delivered, so nothing
//!   committed meanwhile is lost. With several endpoints the watcher uses
//!   one member at a time and fails over to the next at once, backing off
//!   only after all of them failed in a row;
//! - if that revision has been compacted away, etcd cancels the watch with
//!   a `compact_revision`, and the watcher lists everything again (a new
//!   `Reset`);
//! - a watch answer over the message cap (resuming across a lot of history
//!   written meanwhile: etcd sends up to 1,000 revisions in one answer)
//!   cannot be read, and asking again would get the same answer: the
//!   watcher lists everything again, page by page, at a newer revision
//!   and watches from there. A page over the cap is asked again with half
//!   as many keys;
//! - a frozen etcd is noticed by gRPC keepalive and by a liveness probe (a
//!   progress request on the watch stream every second);
//! - a value that does not parse is logged with its key and reason, counted,
//!   and skipped; the last good value of that key stays in force.
//!
//! Staleness ([`SourceStatus::staleness`]) counts from the last progress:
//! a listing or a revision delivered, or a progress answer saying etcd is
//! at no newer revision than the one delivered. An answer that only shows
//! etcd is there (a created watch, a progress answer while etcd is ahead,
//! an answer that cannot be read) is not progress: etcd before 3.4.24 and
//! 3.5.8 answers a progress request even while events are still to come
//! (etcd-io/etcd#15220). From those versions on, a progress answer comes
//! only once everything up to its revision was sent, so it counts even
//! when etcd is ahead through writes outside the prefixes.
//!
//! The watch does not ask etcd to split big answers (`fragment`): the
//! client library does not show which answer is the last fragment of a
//! revision, and applying a revision half would break the rule above that
//! a transaction lands whole. Listing again covers the same case.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
    WatchResponse,
};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant, MissedTickBehavior};

use crate::backoff::Backoff;
use crate::parse::{is_ours, parse_entry, parse_key, Prefixes};
use crate::{Change, DiscoveryError, Entry, EntryKey, ParseError, Source, SourceStatus};
use crate::{Update, UpdateKind};

/// Cap on one answer from etcd. Listings are paged and an oversized watch
/// answer makes the watcher list again, so this only bounds memory; gRPC's
/// 4 MiB default would turn every batch of a few large values into a
/// re-listing.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Keys asked for in one page of a listing. A registration is a few hundred
/// bytes, so a page is well under the cap; a page that is not (values near
/// etcd's request limit) is asked again with half as many keys.
pub const PAGE_KEYS: i64 = 500;
/// After this many failed sessions in a row the client (and its channel)
/// is rebuilt from scratch, in case its connections are wedged.
const REBUILD_CLIENT_AFTER: u32 = 3;

/// TLS for the etcd connection (rustls). etcd clusters use a private CA,
/// so the CA is required; the certificate and key are for client
/// authentication and go together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM file of the CA that signed the etcd servers' certificates.
    pub ca: PathBuf,
    /// PEM client certificate, when etcd requires client certificates.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against, when it differs from
    /// the endpoint's host.
    pub domain: Option<String>,
}

/// Which of etcd's keyspaces the proxy follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EtcdApi {
    /// The v3 keyspace, over gRPC (what `etcdctl` 3.x writes).
    #[default]
    V3,
    /// The v2 keyspace, over `/v2/keys` (CoreOS-era containers,
    /// registrator); see [`crate::etcd2`].
    V2,
}

/// How to reach etcd and how hard to try.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Client URLs of the cluster members (`http://10.0.0.1:2379`, or
    /// `host:port`, which takes `https` when `tls` is set). One is used at
    /// a time; the next is tried when it fails.
    pub endpoints: Vec<String>,
    /// User name and password, when etcd has authentication enabled.
    pub user: Option<(String, String)>,
    pub tls: Option<EtcdTls>,
    pub prefixes: Prefixes,
    /// The keyspace followed (the tools always write v3).
    pub api: EtcdApi,
    /// HTTP/2 ping interval, sent even when idle.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// Limit for establishing a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Limit for one listing request or for creating the watch.
    pub request_timeout: Duration,
    /// How often the watch is probed (progress request) while idle.
    pub liveness_interval: Duration,
    /// Silence on the watch stream longer than this counts as a stall.
    pub liveness_timeout: Duration,
    /// First reconnect delay; doubles on each failure up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            user: None,
            tls: None,
            prefixes: Prefixes::default(),
            api: EtcdApi::V3,
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            liveness_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field(
                "user",
                &self.user.as_ref().map(|(name, _)| (name, "<redacted>")),
            )
            .field("tls", &self.tls)
            .field("prefixes", &self.prefixes)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("liveness_interval", &self.liveness_interval)
            .field("liveness_timeout", &self.liveness_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

impl EtcdOptions {
    /// Default options for `endpoints`.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..EtcdOptions::default()
        }
    }

    /// Checks what retrying cannot fix — no endpoints, a scheme that
    /// contradicts the TLS setting, unreadable TLS files — so a caller can
    /// refuse to start instead of retrying forever. [`run`] works without
    /// it, logging the same errors on every attempt.
    pub fn check(&self) -> Result<(), DiscoveryError> {
        self.connect_options().map(|_| ())
    }

    pub(crate) fn connect_options(&self) -> Result<ConnectOptions, DiscoveryError> {
        if self.endpoints.is_empty() {
            return Err(DiscoveryError::NoEndpoints);
        }
        for e in &self.endpoints {
            let reason = if e.trim().is_empty() {
                Some("it is empty")
            } else if self.tls.is_some() && e.starts_with("http://") {
                Some("TLS is configured, so use https:// (or plain host:port)")
            } else if self.tls.is_none() && e.starts_with("https://") {
                Some("https:// needs the TLS options (at least the CA file)")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(DiscoveryError::BadEndpoint {
                    endpoint: e.clone(),
                    reason: reason.to_string(),
                });
            }
        }
        let mut opts = ConnectOptions::new()
            .with_keep_alive(self.keepalive_interval, self.keepalive_timeout)
            .with_keep_alive_while_idle(true)
            .with_connect_timeout(self.connect_timeout)
            // A member cut off from its cluster answers with stale data;
            // with this, it fails the watch instead and we move on.
            .with_require_leader(true);
        if let Some((name, password)) = &self.user {
            opts = opts
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls_options(tls)?);
        }
        Ok(opts)
    }
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, DiscoveryError> {
    let read = |what: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|source| DiscoveryError::TlsFile {
            what,
            path: path.clone(),
            source,
        })
    };
    let mut opts =
        TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA file", &tls.ca)?));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            opts = opts.identity(Identity::from_pem(
                read("client certificate", cert)?,
                read("client key", key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(DiscoveryError::Tls(
                "a client certificate needs its key and a key needs its certificate: give both or neither".to_string(),
            ))
        }
    }
    if let Some(domain) = &tls.domain {
        opts = opts.domain_name(domain.clone());
    }
    Ok(opts)
}

/// Watches etcd and sends what it holds under `opts.prefixes` to `tx`.
///
/// Runs until `tx` is closed; errors are logged, recorded in `status` and
/// retried, never returned. See the module documentation for what happens
/// on each kind of failure.
pub async fn run(opts: EtcdOptions, tx: mpsc::Sender<Update>, status: Arc<SourceStatus>) {
    let backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
    let mut watcher = EtcdWatcher {
        opts,
        tx,
        status,
        client: None,
        view: BTreeMap::new(),
        revision: None,
        backoff,
        failures: 0,
        endpoint_idx: 0,
        streak_start: 0,
        trust_progress: false,
        page_keys: PAGE_KEYS,
        v2_hint_checked: false,
    };
    watcher.run().await;
}

/// Why a watch session ended without an error.
enum Ended {
    /// The receiver is gone: the proxy is shutting down.
    ReceiverGone,
    /// The revision to resume from is no longer available: list again.
    Relist(String),
}

/// Why a watch session failed; all of these are retried.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Config(#[from] DiscoveryError),
    #[error("{what}: {source}")]
    Etcd {
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{what}: no answer within {limit:?}")]
    Timeout { what: &'static str, limit: Duration },
    #[error("etcd closed the watch stream")]
    StreamClosed,
    #[error("etcd canceled the watch: {0}")]
    Canceled(String),
    #[error("the watch stream was silent for {0:?} (etcd frozen or unreachable)")]
    Stalled(Duration),
    #[error("etcd answered without a response header")]
    NoHeader,
    #[error("etcd said more keys follow {after:?} but sent none")]
    EmptyPage { after: String },
}

struct EtcdWatcher {
    /// Whether the first listing was checked for registrations that went
    /// to etcd's v2 keyspace instead.
    v2_hint_checked: bool,
    opts: EtcdOptions,
    tx: mpsc::Sender<Update>,
    status: Arc<SourceStatus>,
    client: Option<Client>,
    /// The last good entry of every key, as delivered. A re-list keeps a
    /// malformed key at its value from here instead of dropping it.
    view: BTreeMap<EntryKey, Entry>,
    /// Highest revision delivered; the watch resumes after it. `None`
    /// means "list first".
    revision: Option<i64>,
    backoff: Backoff,
    /// Failed sessions in a row.
    failures: u32,
    /// Index into `opts.endpoints` of the member in use.
    endpoint_idx: usize,
    /// The member the current run of failures started on: coming back to
    /// it means every member failed.
    streak_start: usize,
    /// Whether the member in use answers a progress request only once the
    /// watch has caught up (see the module documentation).
    trust_progress: bool,
    /// Keys per listing page: [`PAGE_KEYS`], halved for as long as pages
    /// come back over the cap, and kept for the next listing.
    page_keys: i64,
}

impl EtcdWatcher {
    async fn run(&mut self) {
        loop {
            match self.session().await {
                Ok(Ended::ReceiverGone) => return,
                Ok(Ended::Relist(why)) => {
                    tracing::info!(reason = %why, "etcd: listing everything again");
                    self.revision = None;
                }
                Err(e) => {
                    self.failures = self.failures.saturating_add(1);
                    self.status.set_connected(false);
                    self.status.record_reconnect();
                    let endpoint = self.endpoint().to_string();
                    self.status.set_error(format!("etcd {endpoint}: {e}"));
                    let n = self.opts.endpoints.len().max(1);
                    let delay = if n > 1 {
                        // Fail over to the next member at once; back off
                        // only after every member has failed in a row.
                        if self.failures == 1 {
                            self.streak_start = self.endpoint_idx;
                        }
                        self.client = None;
                        self.endpoint_idx = (self.endpoint_idx + 1) % n;
                        if self.endpoint_idx == self.streak_start {
                            self.backoff.next()
                        } else {
                            self.opts.backoff_min
                        }
                    } else {
                        // One member: its channel reconnects by itself, but
                        // rebuild it if that keeps failing.
                        if self.failures >= REBUILD_CLIENT_AFTER {
                            self.client = None;
                        }
                        self.backoff.next()
                    };
                    tracing::warn!(
                        error = %e,
                        endpoint = %endpoint,
                        resume_after = ?self.revision,
                        retry_in = ?delay,
                        next_endpoint = %self.endpoint(),
                        "etcd: watch lost; serving the last good view and reconnecting"
                    );
                    tokio::select! {
                        _ = self.tx.closed() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn endpoint(&self) -> &str {
        self.opts
            .endpoints
            .get(self.endpoint_idx)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// A client pinned to the current endpoint.
    ///
    /// One member at a time, not all of them behind tonic's balancer:
    /// measured with one member down, the balancer kept sending requests to
    /// the dead member and a watch took up to 10 s to establish; pinning
    /// with failover takes one failed connect.
    async fn client(&mut self) -> Result<Client, SessionError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let opts = self.opts.connect_options()?;
        let endpoint = self.endpoint().to_string();
        let mut client = self
            .limit(
                "connecting",
                self.opts.connect_timeout + self.opts.request_timeout,
                Client::connect([endpoint], Some(opts)),
            )
            .await?;
        // Only to know how far a progress answer can be trusted; a member
        // that does not say is trusted as little as the oldest.
        self.trust_progress = match timeout(self.opts.request_timeout, client.status()).await {
            Ok(Ok(s)) => progress_waits_for_sync(s.version()),
            _ => false,
        };
        self.client = Some(client.clone());
        Ok(client)
    }

    async fn limit<T>(
        &self,
        what: &'static str,
        limit: Duration,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, SessionError> {
        match timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(SessionError::Etcd { what, source }),
            Err(_) => Err(SessionError::Timeout { what, limit }),
        }
    }

    /// One list-and-watch (or resume-and-watch) until it fails or ends.
    async fn session(&mut self) -> Result<Ended, SessionError> {
        let client = self.client().await?;
        let from = match self.revision {
            Some(rev) => rev,
            None => match self.list(&client).await? {
                Some(rev) => rev,
                None => return Ok(Ended::ReceiverGone),
            },
        };

        let (start, end) = self.opts.prefixes.watch_range();
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(from + 1)
            .with_progress_notify();
        let mut watch_client = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let stream = self
            .limit(
                "starting the watch",
                self.opts.request_timeout,
                watch_client.watch(start, Some(options)),
            )
            .await?;
        let (mut requests, mut responses) = stream.split();

        let mut probe = tokio::time::interval(self.opts.liveness_interval);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                _ = self.tx.closed() => return Ok(Ended::ReceiverGone),
                msg = responses.message() => {
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return Err(SessionError::StreamClosed),
                        Err(source) if too_large(&source) => {
                            // Asking again from the same revision gets the
                            // same answer: start from a newer one instead.
                            let why = format!(
                                "a watch answer from revision {} was over the {} MiB cap ({source}); listing everything again at a newer revision",
                                from + 1,
                                MAX_MESSAGE_BYTES >> 20
                            );
                            self.status.set_error(format!("etcd {}: {why}", self.endpoint()));
                            return Ok(Ended::Relist(why));
                        }
                        Err(source) => return Err(SessionError::Etcd { what: "watching", source }),
                    };
                    if let Some(ended) = self.on_response(resp, from).await? {
                        return Ok(ended);
                    }
                    // Also after a slow send to a full channel, so waiting
                    // on the proxy is not mistaken for a silent etcd.
                    last_heard = Instant::now();
                }
                _ = probe.tick() => {
                    let silent = last_heard.elapsed();
                    if silent > self.opts.liveness_timeout {
                        return Err(SessionError::Stalled(silent));
                    }
                    requests
                        .request_progress()
                        .await
                        .map_err(|source| SessionError::Etcd { what: "probing the watch", source })?;
                }
            }
        }
    }

    /// Handles one watch response; `Some` ends the session.
    async fn on_response(
        &mut self,
        resp: WatchResponse,
        from: i64,
    ) -> Result<Option<Ended>, SessionError> {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Ok(Some(Ended::Relist(format!(
                    "revision {} was compacted (oldest kept: {})",
                    from + 1,
                    resp.compact_revision()
                ))));
            }
            return Err(SessionError::Canceled(resp.cancel_reason().to_string()));
        }
        if resp.created() {
            let head = resp.header().map(|h| h.revision()).unwrap_or(0);
            if head > 0 && head < from {
                // etcd was restored from an older backup: the revisions
                // we hold mean nothing there any more.
                return Ok(Some(Ended::Relist(format!(
                    "etcd is at revision {head}, behind the {from} already seen (restored from a backup?)"
                ))));
            }
            tracing::info!(from = from + 1, endpoint = %self.endpoint(), "etcd: watching");
            self.status.set_connected(true);
            self.backoff.reset();
            self.failures = 0;
            // A created watch is not progress: what it will deliver may
            // not fit (see `session`).
            return Ok(None);
        }
        if resp.events().is_empty() {
            let head = resp.header().map(|h| h.revision()).unwrap_or(0);
            let delivered = self.revision.unwrap_or(0);
            if progress_confirms(head, delivered, self.trust_progress) {
                self.status.mark_synced();
            }
            return Ok(None);
        }
        if !self.apply_events(&resp).await {
            return Ok(Some(Ended::ReceiverGone));
        }
        Ok(None)
    }

    /// Lists both prefixes at one revision and sends the result as a
    /// `Reset`. Returns the revision, or `None` once the receiver is gone.
    async fn list(&mut self, client: &Client) -> Result<Option<i64>, SessionError> {
        let prefixes = self.opts.prefixes.clone();
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut next = BTreeMap::new();
        let mut rev = None;
        let mut limit = self.page_keys;
        let mut pages = 0u32;
        for dir in [prefixes.services_dir(), prefixes.pointsman_dir()] {
            let mut cursor = Some(Cursor::prefix(dir.as_bytes()));
            while let Some(at) = cursor.take() {
                let mut options = GetOptions::new()
                    .with_range(at.end.clone())
                    .with_limit(limit);
                if let Some(rev) = rev {
                    // Every page at the first one's revision: one
                    // consistent view, however long the listing takes.
                    options = options.with_revision(rev);
                }
                let page = match timeout(
                    self.opts.request_timeout,
                    kv.get(at.from.clone(), Some(options)),
                )
                .await
                {
                    Ok(Ok(page)) => page,
                    Ok(Err(source)) if too_large(&source) && limit > 1 => {
                        limit = (limit / 2).max(1);
                        self.page_keys = limit;
                        tracing::info!(
                            limit,
                            "etcd: a page of the listing was over the cap; asking for fewer keys"
                        );
                        cursor = Some(at);
                        continue;
                    }
                    Ok(Err(source)) => {
                        return Err(SessionError::Etcd {
                            what: "listing the registry",
                            source,
                        })
                    }
                    Err(_) => {
                        return Err(SessionError::Timeout {
                            what: "listing the registry",
                            limit: self.opts.request_timeout,
                        })
                    }
                };
                pages += 1;
                if rev.is_none() {
                    rev = Some(
                        page.header()
                            .map(|h| h.revision())
                            .ok_or(SessionError::NoHeader)?,
                    );
                }
                for kv in page.kvs() {
                    self.list_one(&prefixes, kv.key(), kv.value(), &mut next);
                }
                cursor = at.after(page.kvs().last().map(|kv| kv.key()), page.more())?;
            }
        }
        let rev = rev.ok_or(SessionError::NoHeader)?;
        let entries: Vec<Entry> = next.values().cloned().collect();
        tracing::info!(
            revision = rev,
            entries = entries.len(),
            pages,
            "etcd: listed"
        );
        self.view = next;
        self.revision = Some(rev);
        let update = Update {
            source: Source::Etcd,
            revision: Some(rev),
            kind: UpdateKind::Reset(entries),
        };
        if self.tx.send(update).await.is_err() {
            return Ok(None);
        }
        self.status.record_reset(Some(rev));
        self.status.set_connected(true);
        self.status.mark_synced();
        if !self.v2_hint_checked {
            self.v2_hint_checked = true;
            let no_instances = !self.view.values().any(|e| matches!(e, Entry::Instance(_)));
            if no_instances {
                let endpoint = self.endpoint().to_string();
                let root = self.opts.prefixes.services_dir();
                let limit = self.opts.request_timeout;
                if crate::etcd2::has_keys(&endpoint, &root, limit).await {
                    let message = format!(
                        "etcd's v3 keyspace has no registration under {root}, but its v2 keyspace has keys there (written through /v2/keys, as registrator and CoreOS-era containers do): follow them with --etcd-api v2"
                    );
                    tracing::warn!("{message}");
                    self.status.set_error(message);
                }
            }
        }
        Ok(Some(rev))
    }

    /// Adds one listed key to `next`, or keeps its last good value if it
    /// does not parse.
    fn list_one(
        &self,
        prefixes: &Prefixes,
        key: &[u8],
        value: &[u8],
        next: &mut BTreeMap<EntryKey, Entry>,
    ) {
        let Some(key) = self.key_of(key) else {
            return;
        };
        match parse_entry(prefixes, key, value) {
            Ok(Some(entry)) => {
                next.insert(entry.key(), entry);
            }
            Ok(None) => {}
            Err(e) => {
                let kept = parse_key(prefixes, key)
                    .and_then(|k| self.view.get(&k).map(|last| (k, last.clone())));
                self.malformed(&e, kept.is_some());
                if let Some((k, last)) = kept {
                    next.insert(k, last);
                }
            }
        }
    }

    /// Turns the events of one watch response into one `Changes` update.
    /// Returns false once the receiver is gone.
    async fn apply_events(&mut self, resp: &WatchResponse) -> bool {
        let prefixes = self.opts.prefixes.clone();
        let mut changes = Vec::new();
        let mut rev = self.revision.unwrap_or(0);
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            rev = rev.max(kv.mod_revision());
            let Some(key) = self.key_of(kv.key()) else {
                continue;
            };
            match ev.event_type() {
                EventType::Put => match parse_entry(&prefixes, key, kv.value()) {
                    Ok(Some(entry)) => {
                        self.view.insert(entry.key(), entry.clone());
                        changes.push(Change::Upsert(entry));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let kept =
                            parse_key(&prefixes, key).is_some_and(|k| self.view.contains_key(&k));
                        self.malformed(&e, kept);
                    }
                },
                EventType::Delete => {
                    if let Some(k) = parse_key(&prefixes, key) {
                        self.view.remove(&k);
                        changes.push(Change::Remove(k));
                    }
                }
            }
        }
        // Only events carry the revision to resume from: a watch response
        // header may be ahead of events still to come on this stream.
        self.revision = Some(rev);
        self.status.set_seen_revision(rev);
        if !changes.is_empty() {
            let update = Update {
                source: Source::Etcd,
                revision: Some(rev),
                kind: UpdateKind::Changes(changes),
            };
            if self.tx.send(update).await.is_err() {
                return false;
            }
        }
        // A whole revision is delivered (one revision never spans answers).
        self.status.mark_synced();
        true
    }

    /// The key as text if it is under one of our prefixes; a key there that
    /// is not UTF-8 is malformed.
    fn key_of<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        if !is_ours(&self.opts.prefixes, key) {
            return None;
        }
        match std::str::from_utf8(key) {
            Ok(k) => Some(k),
            Err(_) => {
                let e = ParseError::Key {
                    key: String::from_utf8_lossy(key).into_owned(),
                    reason: "key is not UTF-8: use UTF-8 names".to_string(),
                };
                self.malformed(&e, false);
                None
            }
        }
    }

    fn malformed(&self, e: &ParseError, kept: bool) {
        self.status.malformed_value(e, kept);
    }
}

/// Where the next page of a listing starts, and where the range ends.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cursor {
    from: Vec<u8>,
    /// Exclusive end of the range.
    end: Vec<u8>,
}

impl Cursor {
    /// The whole of `prefix`.
    fn prefix(prefix: &[u8]) -> Cursor {
        Cursor {
            from: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    /// The cursor after a page whose last key is `last`; `None` when etcd
    /// said nothing more follows (`more`).
    fn after(&self, last: Option<&[u8]>, more: bool) -> Result<Option<Cursor>, SessionError> {
        if !more {
            return Ok(None);
        }
        match last {
            // The smallest key after `last`: the page starts there, so
            // `last` is not listed twice and nothing between is skipped.
            Some(last) => {
                let mut from = last.to_vec();
                from.push(0);
                Ok(Some(Cursor {
                    from,
                    end: self.end.clone(),
                }))
            }
            None => Err(SessionError::EmptyPage {
                after: String::from_utf8_lossy(&self.from).into_owned(),
            }),
        }
    }
}

/// The end of the range of keys starting with `prefix` (what etcd's
/// `--prefix` computes): the prefix with its last byte below 0xff raised
/// by one; `\0` (every key) if there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Whether `e` is an answer over [`MAX_MESSAGE_BYTES`], which the same
/// request will get again.
fn too_large(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.message().contains("message length too large")
        }
        _ => false,
    }
}

/// Whether a progress answer saying etcd is at `head` shows that the
/// watcher, having delivered up to `delivered`, is current: always when
/// etcd is at no newer revision; when it is ahead, only from a member that
/// answers progress requests once the watch has caught up (`trusted`).
fn progress_confirms(head: i64, delivered: i64, trusted: bool) -> bool {
    head > 0 && (head <= delivered || trusted)
}

/// Whether etcd `version` answers a progress request only once every
/// event up to the revision it names was sent (3.4.24, 3.5.8, 3.6 on).
fn progress_waits_for_sync(version: &str) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    match (major, minor) {
        (3, 4) => patch >= 24,
        (3, 5) => patch >= 8,
        (3, m) => m >= 6,
        (m, _) => m > 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_before_connecting() {
        assert!(matches!(
            EtcdOptions::new(Vec::<String>::new()).check(),
            Err(DiscoveryError::NoEndpoints)
        ));
        let mut o = EtcdOptions::new(["https://127.0.0.1:2379"]);
        let err = o.check().expect_err("https without tls");
        assert!(err.to_string().contains("needs the TLS options"), "{err}");
        o.tls = Some(EtcdTls {
            ca: PathBuf::from("/nonexistent/ca.pem"),
            cert: None,
            key: None,
            domain: None,
        });
        let err = o.check().expect_err("missing CA");
        assert!(
            err.to_string()
                .contains("cannot read CA file /nonexistent/ca.pem"),
            "{err}"
        );
        o.endpoints = vec!["http://127.0.0.1:2379".into()];
        let err = o.check().expect_err("http with tls");
        assert!(err.to_string().contains("use https://"), "{err}");
        assert!(EtcdOptions::default().check().is_ok());
    }

    #[test]
    fn debug_hides_the_password() {
        let o = EtcdOptions {
            user: Some(("root".into(), "s3cret".into())),
            ..EtcdOptions::default()
        };
        let shown = format!("{o:?}");
        assert!(
            shown.contains("root") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn pages_continue_after_the_last_key_to_the_prefix_end() {
        let first = Cursor::prefix(b"/services/");
        assert_eq!(first.from, b"/services/");
        assert_eq!(first.end, b"/services0");
        let second = first
            .after(Some(b"/services/web/a1"), true)
            .expect("a next page")
            .expect("more follows");
        assert_eq!(second.from, b"/services/web/a1\0");
        assert_eq!(second.end, first.end, "the range end never moves");
        // The continuation sorts after the last key and before any other.
        assert!(second.from.as_slice() > b"/services/web/a1".as_slice());
        assert!(second.from.as_slice() < b"/services/web/a1\x01".as_slice());
        assert!(second.from.as_slice() < b"/services/web/a2".as_slice());
        assert_eq!(
            second.after(Some(b"/services/web/b"), false).expect("last"),
            None
        );
        let err = second.after(None, true).expect_err("more, yet no keys");
        assert!(err.to_string().contains("/services/web/a1"), "{err}");
    }

    #[test]
    fn prefix_end_is_what_etcd_computes_for_a_prefix() {
        assert_eq!(prefix_end(b"/pointsman/"), b"/pointsman0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn a_progress_answer_counts_only_when_it_proves_the_view_current() {
        // etcd at the revision delivered: current, whatever its version.
        assert!(progress_confirms(42, 42, false));
        assert!(progress_confirms(41, 42, false));
        // Ahead: events may still be on their way, unless the member only
        // answers once they were sent.
        assert!(!progress_confirms(43, 42, false));
        assert!(progress_confirms(43, 42, true));
        // No header: proves nothing.
        assert!(!progress_confirms(0, 0, true));
    }

    #[test]
    fn progress_is_trusted_from_the_fixed_etcd_versions_on() {
        for (version, trusted) in [
            ("3.4.23", false),
            ("3.4.24", true),
            ("3.5.7", false),
            ("3.5.8", true),
            ("3.5.17", true),
            ("3.6.0", true),
            ("3.6.0-rc.1", true),
            ("4.0.0", true),
            ("3.3.27", false),
            ("", false),
            ("unknown", false),
        ] {
            assert_eq!(progress_waits_for_sync(version), trusted, "{version}");
        }
    }
}
