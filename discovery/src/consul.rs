//! The Consul watcher and registrar.
//!
//! [`run`] follows Consul's catalog with blocking queries and sends what it
//! holds as [`Update`]s, like the etcd watcher:
//!
//! 1. **List.** `GET /v1/catalog/services` for the service names, then
//!    `GET /v1/health/service/<name>` for every one of them. Only when all
//!    of them have answered is the whole view sent, as one `Reset`.
//! 2. **Follow.** One blocking query per service plus one for the catalog,
//!    each with the `X-Consul-Index` of its last answer (`index=`, `wait=`).
//!    An answer that changes something is diffed against the view already
//!    sent and delivered as one `Changes`; answers that arrive together are
//!    delivered together. A service that appears in the catalog gets its
//!    own query; one that leaves it is removed.
//! 3. **Trouble.** Any failed query (Consul down, a refusal, a timeout)
//!    marks the source disconnected and ends the session; the watcher backs
//!    off (exponential, with jitter, failing over to the next URL first if
//!    there are several) and lists everything again, sending a fresh
//!    `Reset` once the listing is complete. Until then the proxy keeps
//!    serving the last view: nothing is sent while Consul is unreachable,
//!    and never an empty `Reset` for that reason.
//!
//! Consul's rules for blocking queries are followed: an index that goes
//! backwards (a snapshot restore, a rebuilt cluster) resets the query's
//! index to 0 — and since that means everything the watcher holds may be
//! from another history, the whole view is listed again and sent as a
//! `Reset` whose revision may be lower than before; an index of 0 is taken
//! as 1; consecutive queries of one kind start at least
//! [`ConsulOptions::min_query_interval`] apart, so a busy catalog cannot
//! make the watcher spin. The client waits `wait + wait/16` (Consul's
//! jitter) plus `request_timeout` for a blocking answer.
//!
//! What each instance and tag becomes is in `SCHEMA.md` ("Consul"): only
//! instances whose checks all pass are routable; weight and state come from
//! the meta keys `pointsman-weight` and `pointsman-state`; routes come from
//! Fabio-style `urlprefix-` tags. A malformed instance or tag is skipped,
//! logged and counted once per distinct problem, never stopping the
//! watcher.
//!
//! The revision of an update is Consul's `X-Consul-Index`: the highest
//! index among the answers the source's view is built from. Consul keeps
//! one index per query, so it says "nothing older than this", not that
//! every service is current up to it.
//!
//! [`Agent`] registers an instance with the local agent
//! (`PUT /v1/agent/service/register`, `.../deregister/<id>`,
//! `.../check/pass/<check-id>`) for `pointsman register --consul`.
//!
//! # Why not rs-consul
//!
//! The `rs-consul` crate (0.15) was examined for each use and fits none,
//! so this module speaks Consul's HTTP API with hyper directly:
//!
//! - health (`get_service_nodes`): its `ServiceNode` carries no `Meta` and
//!   no check list, and pointsman needs both (weight and state, and which
//!   checks fail);
//! - catalog (`get_all_registered_service_names`) and blocking queries in
//!   general: `wait` is sent in whole seconds, so a sub-second wait becomes
//!   `wait=0s`, which Consul takes as its 5-minute default; and the
//!   default 5 s request timeout fails any longer wait unless raised on
//!   every call;
//! - registration: it has no agent API (service register and deregister,
//!   TTL check updates), only the catalog's `register_entity`, which is
//!   for external services: the agent's anti-entropy removes catalog
//!   entries on its node that it does not know itself;
//! - it also builds its own rustls client with the `ring` provider, which
//!   makes any binary that enables `aws-lc-rs` elsewhere install a process
//!   default provider first or panic.
//!
//! Only plain `http://` is spoken: the client talks to the local agent, as
//! Consul recommends.
//!
//! # Limits
//!
//! Each followed service holds one HTTP/1.1 connection for its blocking
//! query (Consul's HTTP API has no HTTP/2 without TLS), so the watcher
//! keeps one connection per service plus one for the catalog. Consul allows
//! 200 HTTP connections per client address by default
//! (`limits.http_max_conns_per_client`): raise it on the agents pointsman
//! reads from when the catalog holds more services than that.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::{Entry, EntryKey, Source, SourceStatus, Update, UpdateKind};

mod agent;
mod client;
mod tags;
pub(crate) mod view;

pub use self::agent::{Agent, AgentCheck, AgentService, TtlStatus};
pub use self::client::HttpError;

use self::client::{encode, go_duration, Answer, ConsulHttp};
use self::view::{decode_catalog, decode_health, derive, diff, ServiceEntries};

/// Meta key holding an instance's weight, 0..=256 (default 1).
pub const META_WEIGHT: &str = "pointsman-weight";
/// Meta key holding an instance's state: ready, drain or maint.
pub const META_STATE: &str = "pointsman-state";
/// The tag that makes an instance a backup (used only while no other
/// instance of its service takes traffic).
pub const BACKUP_TAG: &str = "backup";
/// The tag prefix of routes, as Fabio's.
pub const DEFAULT_TAG_PREFIX: &str = "urlprefix-";
/// Consul's longest wait; longer ones are cut to it by Consul.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Health queries sent at once while listing.
const LIST_CONCURRENCY: usize = 8;

/// How to reach Consul and how hard to try.
#[derive(Clone)]
pub struct ConsulOptions {
    /// HTTP addresses of Consul agents (`http://127.0.0.1:8500`, or
    /// `host:port`). One is used at a time; the next when it fails. The
    /// registrar uses the first.
    pub urls: Vec<String>,
    /// ACL token, sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// Datacenter to read (`dc=`); the agent's own when `None`.
    pub datacenter: Option<String>,
    /// Longest time a blocking query waits for a change (`wait=`); up to
    /// 10 minutes, sub-second values allowed. Also bounds how stale the
    /// status's "last sync" may look while nothing changes.
    pub wait: Duration,
    /// Tags starting with this are routes (Fabio's `urlprefix-`).
    pub tag_prefix: String,
    /// Limit for establishing a TCP connection.
    pub connect_timeout: Duration,
    /// Limit for a non-blocking request; added to `wait` for blocking ones.
    pub request_timeout: Duration,
    /// Least time between the starts of two queries for the same thing
    /// (rate limit of a busy catalog).
    pub min_query_interval: Duration,
    /// First reconnect delay; doubles on each failure up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ConsulOptions {
    fn default() -> Self {
        ConsulOptions {
            urls: vec!["http://127.0.0.1:8500".to_string()],
            token: None,
            datacenter: None,
            wait: Duration::from_secs(30),
            tag_prefix: DEFAULT_TAG_PREFIX.to_string(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            min_query_interval: Duration::from_millis(50),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for ConsulOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulOptions")
            .field("urls", &self.urls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("wait", &self.wait)
            .field("tag_prefix", &self.tag_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("min_query_interval", &self.min_query_interval)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// What went wrong with Consul options, a registration, or a request.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("consul: no URL given: pass at least one, e.g. http://127.0.0.1:8500")]
    NoUrls,
    #[error("consul: URL {url:?} {reason}")]
    BadUrl { url: String, reason: String },
    #[error("consul: option {what}: {reason}")]
    BadOption { what: &'static str, reason: String },
    #[error("consul: invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("consul: {0}")]
    Http(#[from] HttpError),
}

/// Checked options, ready to use.
struct Config {
    /// `http://host:port`, no trailing slash.
    bases: Vec<String>,
    token: Option<HeaderValue>,
}

impl ConsulOptions {
    /// Default options for `urls`.
    pub fn new(urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ConsulOptions {
            urls: urls.into_iter().map(Into::into).collect(),
            ..ConsulOptions::default()
        }
    }

    /// Checks what retrying cannot fix — no URL, a URL that is not
    /// `http://host:port`, a token that cannot be a header, a wait or
    /// backoff that makes no sense — so a caller can refuse to start.
    /// [`run`] works without it, logging the same error on every attempt.
    pub fn check(&self) -> Result<(), ConsulError> {
        self.config().map(|_| ())
    }

    fn config(&self) -> Result<Config, ConsulError> {
        if self.urls.is_empty() {
            return Err(ConsulError::NoUrls);
        }
        let bases = self
            .urls
            .iter()
            .map(|u| base_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        let bad = |what: &'static str, reason: &str| ConsulError::BadOption {
            what,
            reason: reason.to_string(),
        };
        let token = match &self.token {
            None => None,
            Some(t) if t.trim().is_empty() => None,
            Some(t) => {
                let mut value = HeaderValue::from_str(t.trim()).map_err(|_| {
                    bad(
                        "token",
                        "contains characters an HTTP header cannot carry (a newline?)",
                    )
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        if let Some(dc) = &self.datacenter {
            if dc.trim().is_empty() || dc.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    "datacenter",
                    "must be a datacenter name such as dc1 (no blanks)",
                ));
            }
        }
        if self.wait.is_zero() {
            return Err(bad(
                "wait",
                "is 0: expected a duration such as 30s or 500ms",
            ));
        }
        if self.wait > MAX_WAIT {
            return Err(bad("wait", "is longer than Consul's limit of 10 minutes"));
        }
        if self.tag_prefix.is_empty() || self.tag_prefix.chars().any(char::is_whitespace) {
            return Err(bad(
                "tag prefix",
                "must be non-empty, without blanks, e.g. urlprefix-",
            ));
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(bad("timeouts", "must not be 0"));
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(bad(
                "backoff",
                "the minimum must be above 0 and at most the maximum",
            ));
        }
        Ok(Config { bases, token })
    }
}

/// `http://host:port` from a URL or `host:port`.
fn base_url(raw: &str) -> Result<String, ConsulError> {
    let bad = |reason: &str| ConsulError::BadUrl {
        url: raw.to_string(),
        reason: reason.to_string(),
    };
    let s = raw.trim();
    if s.is_empty() {
        return Err(bad(
            "is empty: expected http://host:port, e.g. http://127.0.0.1:8500",
        ));
    }
    if s.starts_with("https://") {
        return Err(bad(
            "uses https, which this client does not speak: point it at the local agent's HTTP address, e.g. http://127.0.0.1:8500",
        ));
    }
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|_| bad("is not a URL: expected http://host:port, e.g. http://127.0.0.1:8500"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("must start with http:// (or be host:port)"));
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("has no host: expected http://host:port"));
    };
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err(bad("has no usable host: expected http://host:port"));
    }
    if authority.port_u16().is_none_or(|p| p == 0) {
        return Err(bad(
            "has no port: expected http://host:port (Consul's HTTP port is usually 8500)",
        ));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad(
            "must not have a path or query: expected http://host:port",
        ));
    }
    Ok(format!("http://{authority}"))
}

/// Watches Consul and sends its services and routes to `tx`.
///
/// Runs until `tx` is closed; errors are logged, recorded in `status` and
/// retried, never returned. See the module documentation for what happens
/// on each kind of failure.
pub async fn run(opts: ConsulOptions, tx: mpsc::Sender<Update>, status: Arc<SourceStatus>) {
    let backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
    let relist_backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
    let mut watcher = Watcher {
        relist_backoff,
        opts,
        tx,
        status,
        http: None,
        view: BTreeMap::new(),
        revision: None,
        reported: BTreeMap::new(),
        backoff,
        failures: 0,
        relists: 0,
        url_idx: 0,
        streak_start: 0,
        serial: 0,
    };
    watcher.run().await;
}

/// Why a session ended without an error.
enum Ended {
    ReceiverGone,
    /// An index went backwards: list everything again, from index 0.
    Relist(String),
}

/// Why a session failed; all of these are retried.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Config(#[from] ConsulError),
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("{url}: Consul answered without X-Consul-Index")]
    NoIndex { url: String },
    #[error("{url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("{0}")]
    Internal(String),
}

/// One thing followed with blocking queries.
#[derive(Clone, Debug)]
enum Query {
    Catalog,
    Health { name: String, serial: u64 },
}

/// What a follower reports to the session.
enum Event {
    Answer {
        query: Query,
        url: String,
        /// The index the query was sent with.
        sent: u64,
        /// The answer's index, already at least 1.
        index: u64,
        answer: Answer,
    },
    Failed(SessionError),
}

/// What the first step of a session found.
struct Listing {
    /// The catalog's index, where its follower starts.
    catalog_index: u64,
    followed: BTreeMap<String, Followed>,
    /// Whether an ACL hid part of an answer.
    filtered: bool,
}

/// One session's followers: one blocking query each, all ended when the
/// session ends (their set is dropped).
struct Followers {
    tasks: JoinSet<()>,
    http: ConsulHttp,
    base: String,
    datacenter: Option<String>,
    timing: Timing,
    events: mpsc::Sender<Event>,
}

impl Followers {
    fn spawn(&mut self, query: Query, index: u64, path: String) -> AbortHandle {
        let url = query_url(&self.base, &path, self.datacenter.as_deref());
        self.tasks.spawn(follow(
            self.http.clone(),
            url,
            query,
            index,
            self.timing,
            self.events.clone(),
        ))
    }
}

/// One service being followed.
struct Followed {
    index: u64,
    entries: ServiceEntries,
    serial: u64,
    task: Option<AbortHandle>,
}

struct Watcher {
    opts: ConsulOptions,
    tx: mpsc::Sender<Update>,
    status: Arc<SourceStatus>,
    http: Option<ConsulHttp>,
    /// Everything delivered so far.
    view: BTreeMap<EntryKey, Entry>,
    /// Revision of the last update delivered; `None` before the first and
    /// after an index went backwards.
    revision: Option<i64>,
    /// Problems already logged and counted: subject -> reason.
    reported: BTreeMap<String, String>,
    backoff: Backoff,
    /// Paces relists for an index that keeps going backwards.
    relist_backoff: Backoff,
    /// Failed sessions in a row.
    failures: u32,
    /// Relists for a backwards index in a row, without a normal answer in
    /// between.
    relists: u32,
    url_idx: usize,
    streak_start: usize,
    /// Tells a service's follower from the one before it.
    serial: u64,
}

impl Watcher {
    async fn run(&mut self) {
        loop {
            match self.session().await {
                Ok(Ended::ReceiverGone) => return,
                Ok(Ended::Relist(why)) => {
                    tracing::warn!(reason = %why, "consul: index went backwards; listing everything again");
                    self.revision = None;
                    self.relists = self.relists.saturating_add(1);
                    let delay = if self.relists > 1 {
                        self.relist_backoff.next()
                    } else {
                        self.opts.min_query_interval
                    };
                    tokio::select! {
                        _ = self.tx.closed() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    self.failures = self.failures.saturating_add(1);
                    self.status.set_connected(false);
                    self.status.record_reconnect();
                    let url = self.url().to_string();
                    self.status.set_error(format!("consul {url}: {e}"));
                    let n = self.opts.urls.len().max(1);
                    let delay = if n > 1 {
                        if self.failures == 1 {
                            self.streak_start = self.url_idx;
                        }
                        self.url_idx = (self.url_idx + 1) % n;
                        if self.url_idx == self.streak_start {
                            self.backoff.next()
                        } else {
                            self.opts.backoff_min
                        }
                    } else {
                        self.backoff.next()
                    };
                    tracing::warn!(
                        error = %e,
                        url = %url,
                        retry_in = ?delay,
                        next_url = %self.url(),
                        "consul: lost; serving the last good view and listing again"
                    );
                    tokio::select! {
                        _ = self.tx.closed() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn url(&self) -> &str {
        self.opts
            .urls
            .get(self.url_idx)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// List, then follow, until something fails or ends.
    async fn session(&mut self) -> Result<Ended, SessionError> {
        let config = self.opts.config()?;
        let http = match &self.http {
            Some(h) => h.clone(),
            None => {
                let h = ConsulHttp::new(self.opts.connect_timeout, config.token.clone());
                self.http = Some(h.clone());
                h
            }
        };
        let base = config
            .bases
            .get(self.url_idx)
            .cloned()
            .ok_or(ConsulError::NoUrls)?;
        let mut listing = self.list(&http, &base).await?;
        if !self.deliver_listing(&listing, &base).await {
            return Ok(Ended::ReceiverGone);
        }
        let (events_tx, events) = mpsc::channel::<Event>(64);
        let mut followers = Followers {
            tasks: JoinSet::new(),
            http,
            base,
            datacenter: self.opts.datacenter.clone(),
            timing: Timing {
                wait: self.opts.wait,
                request_timeout: self.opts.request_timeout,
                min_interval: self.opts.min_query_interval,
            },
            events: events_tx,
        };
        followers.spawn(
            Query::Catalog,
            listing.catalog_index,
            "/v1/catalog/services".to_string(),
        );
        for (name, f) in listing.followed.iter_mut() {
            let query = Query::Health {
                name: name.clone(),
                serial: f.serial,
            };
            f.task = Some(followers.spawn(query, f.index, health_path(name)));
        }
        self.follow(&mut listing.followed, &mut followers, events)
            .await
    }

    /// Step 1: the catalog, then every service's health, a few at a time.
    async fn list(&mut self, http: &ConsulHttp, base: &str) -> Result<Listing, SessionError> {
        let dc = self.opts.datacenter.clone();
        let catalog_url = query_url(base, "/v1/catalog/services", dc.as_deref());
        let answer = http.get(&catalog_url, self.opts.request_timeout).await?;
        let catalog_index = index_of(&catalog_url, &answer)?;
        let names = decode_catalog(&answer.body).map_err(|reason| SessionError::Decode {
            url: catalog_url.clone(),
            reason,
        })?;
        let mut filtered = answer.filtered;
        let mut followed: BTreeMap<String, Followed> = BTreeMap::new();
        let mut pending = names.into_iter();
        let mut listing = JoinSet::new();
        loop {
            while listing.len() < LIST_CONCURRENCY {
                let Some(name) = pending.next() else { break };
                let url = query_url(base, &health_path(&name), dc.as_deref());
                let http = http.clone();
                let limit = self.opts.request_timeout;
                listing.spawn(async move {
                    let result = http.get(&url, limit).await;
                    (name, url, result)
                });
            }
            let Some(joined) = listing.join_next().await else {
                break;
            };
            // A listing task that did not finish would leave a hole in the
            // Reset: fail the session instead.
            let (name, url, result) =
                joined.map_err(|e| SessionError::Internal(format!("listing a service: {e}")))?;
            let answer = result?;
            let index = index_of(&url, &answer)?;
            filtered |= answer.filtered;
            let entries = decode_health(&answer.body)
                .map_err(|reason| SessionError::Decode { url, reason })?;
            self.serial += 1;
            followed.insert(
                name,
                Followed {
                    index,
                    entries,
                    serial: self.serial,
                    task: None,
                },
            );
        }
        Ok(Listing {
            catalog_index,
            followed,
            filtered,
        })
    }

    /// Sends what the listing means as one Reset; false once the receiver
    /// is gone.
    async fn deliver_listing(&mut self, listing: &Listing, base: &str) -> bool {
        let listed_max = listing
            .followed
            .values()
            .map(|f| f.index)
            .chain([listing.catalog_index])
            .max()
            .unwrap_or(1);
        let rev = to_revision(listed_max).max(self.revision.unwrap_or(0));
        let next = self.derive(&listing.followed);
        let entries: Vec<Entry> = next.values().cloned().collect();
        tracing::info!(
            revision = rev,
            services = listing.followed.len(),
            entries = entries.len(),
            url = %base,
            "consul: listed"
        );
        let update = Update {
            source: Source::Consul,
            revision: Some(rev),
            kind: UpdateKind::Reset(entries),
        };
        if self.tx.send(update).await.is_err() {
            return false;
        }
        self.view = next;
        self.revision = Some(rev);
        self.status.record_reset(Some(rev));
        self.status.set_connected(true);
        self.status.mark_synced();
        self.backoff.reset();
        self.failures = 0;
        self.acl_filtered(listing.filtered);
        true
    }

    /// Step 2: the followers' answers, a batch at a time, each batch that
    /// changes the view sent as one Changes update.
    async fn follow(
        &mut self,
        followed: &mut BTreeMap<String, Followed>,
        followers: &mut Followers,
        mut events: mpsc::Receiver<Event>,
    ) -> Result<Ended, SessionError> {
        loop {
            let first = tokio::select! {
                _ = self.tx.closed() => return Ok(Ended::ReceiverGone),
                ev = events.recv() => ev,
            };
            let Some(first) = first else {
                // Cannot happen: `followers` holds a sender.
                return Ok(Ended::Relist("the followers stopped".to_string()));
            };
            let mut batch = vec![first];
            while let Ok(ev) = events.try_recv() {
                batch.push(ev);
            }
            let mut changed = false;
            let mut newest = 0;
            let mut filtered = false;
            for ev in batch {
                let (query, url, sent, index, answer) = match ev {
                    Event::Failed(e) => return Err(e),
                    Event::Answer {
                        query,
                        url,
                        sent,
                        index,
                        answer,
                    } => (query, url, sent, index, answer),
                };
                if index < sent {
                    return Ok(Ended::Relist(format!(
                        "{url}: X-Consul-Index {index} is below the {sent} already seen (restored snapshot or rebuilt cluster?)"
                    )));
                }
                filtered |= answer.filtered;
                match query {
                    Query::Catalog => {
                        let names = decode_catalog(&answer.body).map_err(|reason| {
                            SessionError::Decode {
                                url: url.clone(),
                                reason,
                            }
                        })?;
                        newest = newest.max(index);
                        changed |= self.follow_catalog(followed, followers, names);
                    }
                    Query::Health { name, serial } => {
                        let Some(f) = followed.get_mut(&name) else {
                            continue; // left the catalog meanwhile
                        };
                        if f.serial != serial {
                            continue; // from an earlier follower
                        }
                        let entries = decode_health(&answer.body)
                            .map_err(|reason| SessionError::Decode { url, reason })?;
                        f.index = index;
                        newest = newest.max(index);
                        if entries != f.entries {
                            f.entries = entries;
                            changed = true;
                        }
                    }
                }
            }
            if self.relists > 0 {
                self.relists = 0;
                self.relist_backoff.reset();
            }
            self.status.mark_synced();
            self.acl_filtered(filtered);
            if changed && !self.deliver_changes(followed, newest).await {
                return Ok(Ended::ReceiverGone);
            }
        }
    }

    /// Makes the followed services match a new catalog: stops following
    /// those that left it, starts on those that joined (from index 0, so
    /// their first answer is immediate). True if a service with entries
    /// left.
    fn follow_catalog(
        &mut self,
        followed: &mut BTreeMap<String, Followed>,
        followers: &mut Followers,
        names: Vec<String>,
    ) -> bool {
        let mut changed = false;
        let gone: Vec<String> = followed
            .keys()
            .filter(|n| names.binary_search(n).is_err())
            .cloned()
            .collect();
        for name in gone {
            if let Some(f) = followed.remove(&name) {
                if let Some(task) = f.task {
                    task.abort();
                }
                changed |= !f.entries.is_empty();
            }
        }
        for name in names {
            if followed.contains_key(&name) {
                continue;
            }
            self.serial += 1;
            let query = Query::Health {
                name: name.clone(),
                serial: self.serial,
            };
            let task = followers.spawn(query, 0, health_path(&name));
            followed.insert(
                name,
                Followed {
                    index: 0,
                    entries: Vec::new(),
                    serial: self.serial,
                    task: Some(task),
                },
            );
        }
        changed
    }

    /// Sends how the view changed, if it did, at the newest index seen;
    /// false once the receiver is gone.
    async fn deliver_changes(
        &mut self,
        followed: &BTreeMap<String, Followed>,
        newest: u64,
    ) -> bool {
        let next = self.derive(followed);
        let changes = diff(&self.view, &next);
        if changes.is_empty() {
            return true;
        }
        let rev = to_revision(newest).max(self.revision.unwrap_or(0));
        let update = Update {
            source: Source::Consul,
            revision: Some(rev),
            kind: UpdateKind::Changes(changes),
        };
        if self.tx.send(update).await.is_err() {
            return false;
        }
        self.view = next;
        self.revision = Some(rev);
        self.status.set_seen_revision(rev);
        true
    }

    /// The entries `followed` means, with its problems logged and counted
    /// once each.
    fn derive(&mut self, followed: &BTreeMap<String, Followed>) -> BTreeMap<EntryKey, Entry> {
        let services: BTreeMap<String, ServiceEntries> = followed
            .iter()
            .map(|(name, f)| (name.clone(), f.entries.clone()))
            .collect();
        let derived = derive(&services, &self.opts.tag_prefix, &self.view);
        for (subject, reason) in &derived.problems {
            if self.reported.get(subject) != Some(reason) {
                tracing::warn!(subject = %subject, reason = %reason, "consul: malformed registration; skipping it");
                self.status.record_malformed();
                self.status.set_error(reason.clone());
            }
        }
        self.reported = derived.problems;
        derived.entries
    }

    /// Says so when Consul hid results from the token: an empty catalog
    /// may then be a missing permission, not an empty registry.
    fn acl_filtered(&self, filtered: bool) {
        if filtered {
            let msg = "consul: some results were filtered by ACLs: the token (or the anonymous token, when none is set) lacks service:read or node:read for part of the catalog";
            if self.status.last_error().as_deref() != Some(msg) {
                tracing::warn!("{msg}");
                self.status.set_error(msg);
            }
        }
    }
}

/// `<base><path>`, with `?dc=` when a datacenter is set.
fn query_url(base: &str, path: &str, datacenter: Option<&str>) -> String {
    match datacenter {
        Some(dc) => format!("{base}{path}?dc={}", encode(dc)),
        None => format!("{base}{path}"),
    }
}

fn health_path(name: &str) -> String {
    format!("/v1/health/service/{}", encode(name))
}

/// An answer's index, at least 1 (Consul's rule for an index of 0).
fn index_of(url: &str, answer: &Answer) -> Result<u64, SessionError> {
    answer
        .index
        .map(|i| i.max(1))
        .ok_or_else(|| SessionError::NoIndex {
            url: url.to_string(),
        })
}

fn to_revision(index: u64) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}

/// How a follower paces its blocking queries.
#[derive(Clone, Copy)]
struct Timing {
    wait: Duration,
    request_timeout: Duration,
    min_interval: Duration,
}

/// Follows one query with blocking requests from `index`, reporting every
/// answer, until a request fails (reported too) or the session is gone.
async fn follow(
    http: ConsulHttp,
    url: String,
    query: Query,
    mut index: u64,
    timing: Timing,
    events: mpsc::Sender<Event>,
) {
    let Timing {
        wait,
        request_timeout,
        min_interval,
    } = timing;
    let sep = if url.contains('?') { '&' } else { '?' };
    let limit = wait + wait / 16 + request_timeout;
    loop {
        let started = Instant::now();
        let request = format!("{url}{sep}index={index}&wait={}", go_duration(wait));
        let event = match http.get(&request, limit).await {
            Ok(answer) => match index_of(&request, &answer) {
                Ok(new) => Event::Answer {
                    query: query.clone(),
                    url: request,
                    sent: index,
                    index: new,
                    answer,
                },
                Err(e) => Event::Failed(e),
            },
            Err(e) => Event::Failed(e.into()),
        };
        let next = match &event {
            Event::Answer { index, .. } => Some(*index),
            Event::Failed(_) => None,
        };
        if events.send(event).await.is_err() {
            return;
        }
        let Some(next) = next else { return };
        index = next;
        tokio::time::sleep_until(started + min_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_normalised() {
        assert_eq!(
            base_url("http://127.0.0.1:8500").unwrap(),
            "http://127.0.0.1:8500"
        );
        assert_eq!(base_url(" consul:8500/ ").unwrap(), "http://consul:8500");
        assert_eq!(base_url("[::1]:8500").unwrap(), "http://[::1]:8500");
        for (url, needle) in [
            ("", "is empty"),
            ("https://consul:8501", "uses https"),
            ("ftp://consul:21", "must start with http://"),
            ("http://consul", "has no port"),
            ("http://consul:0", "has no port"),
            ("http://consul:8500/v1", "must not have a path"),
            ("http://u:p@consul:8500", "no usable host"),
            ("http://con sul:8500", "is not a URL"),
        ] {
            let err = base_url(url).expect_err(url).to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn options_are_checked_before_connecting() {
        assert!(ConsulOptions::default().check().is_ok());
        assert!(matches!(
            ConsulOptions::new(Vec::<String>::new()).check(),
            Err(ConsulError::NoUrls)
        ));
        let cases: Vec<(ConsulOptions, &str)> = vec![
            (
                ConsulOptions {
                    token: Some("a\nb".into()),
                    ..Default::default()
                },
                "option token",
            ),
            (
                ConsulOptions {
                    datacenter: Some("dc 1".into()),
                    ..Default::default()
                },
                "option datacenter",
            ),
            (
                ConsulOptions {
                    wait: Duration::ZERO,
                    ..Default::default()
                },
                "option wait: is 0",
            ),
            (
                ConsulOptions {
                    wait: Duration::from_secs(601),
                    ..Default::default()
                },
                "10 minutes",
            ),
            (
                ConsulOptions {
                    tag_prefix: String::new(),
                    ..Default::default()
                },
                "tag prefix",
            ),
            (
                ConsulOptions {
                    backoff_min: Duration::from_secs(9),
                    ..Default::default()
                },
                "option backoff",
            ),
        ];
        for (opts, needle) in cases {
            let err = opts.check().expect_err(needle).to_string();
            assert!(err.contains(needle), "{err}");
        }
        let ok = ConsulOptions {
            wait: Duration::from_millis(200),
            token: Some("  ".into()),
            datacenter: Some("dc2".into()),
            ..ConsulOptions::new(["127.0.0.1:8500", "http://10.0.0.2:8500"])
        };
        assert!(ok.check().is_ok());
    }

    #[test]
    fn an_index_of_zero_is_one_and_a_missing_one_is_an_error() {
        let answer = |index| Answer {
            body: bytes::Bytes::new(),
            index,
            filtered: false,
        };
        assert_eq!(index_of("u", &answer(Some(0))).unwrap(), 1);
        assert_eq!(index_of("u", &answer(Some(42))).unwrap(), 42);
        let err = index_of("http://c:8500/v1/catalog/services", &answer(None)).unwrap_err();
        assert!(err.to_string().contains("without X-Consul-Index"), "{err}");
    }

    #[test]
    fn query_urls_carry_the_encoded_datacenter() {
        assert_eq!(
            query_url("http://c:8500", &health_path("my web"), Some("dc 2")),
            "http://c:8500/v1/health/service/my%20web?dc=dc%202"
        );
        assert_eq!(
            query_url("http://c:8500", "/v1/catalog/services", None),
            "http://c:8500/v1/catalog/services"
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let o = ConsulOptions {
            token: Some("s3cret".into()),
            ..ConsulOptions::default()
        };
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("redacted"),
            "{shown}"
        );
    }

    #[test]
    fn agent_payload_carries_meta_and_check() {
        let mut svc = AgentService::from_registration(
            &crate::Registration::new("web", "web-1", crate::Address::new("10.0.0.5", 8080)),
            Some(AgentCheck::Ttl {
                ttl: Duration::from_secs(10),
                deregister_critical_after: Some(Duration::from_secs(90)),
            }),
        );
        svc.weight = 20;
        let p = svc.payload().unwrap();
        assert_eq!(p["ID"], "web-1");
        assert_eq!(p["Name"], "web");
        assert_eq!(p["Address"], "10.0.0.5");
        assert_eq!(p["Port"], 8080);
        assert_eq!(p["Meta"][META_WEIGHT], "20");
        assert_eq!(p["Meta"][META_STATE], "ready");
        assert_eq!(p["Check"]["TTL"], "10s");
        assert_eq!(p["Check"]["DeregisterCriticalServiceAfter"], "90s");
        assert_eq!(svc.check_id(), "service:web-1");
        svc.check = Some(AgentCheck::Http {
            url: "http://10.0.0.5:8080/healthz".into(),
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            deregister_critical_after: None,
        });
        let p = svc.payload().unwrap();
        assert_eq!(p["Check"]["HTTP"], "http://10.0.0.5:8080/healthz");
        assert_eq!(p["Check"]["Interval"], "500ms");
        assert_eq!(p["Check"]["Timeout"], "1s");
        assert!(p["Check"].get("DeregisterCriticalServiceAfter").is_none());
        svc.weight = 300;
        assert!(svc
            .payload()
            .unwrap_err()
            .to_string()
            .contains("weight 300"));
        svc.weight = 1;
        svc.id = "a/b".into();
        assert!(svc
            .payload()
            .unwrap_err()
            .to_string()
            .contains("service id"));
    }
}
