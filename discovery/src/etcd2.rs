//! Following etcd's v2 keyspace (`--etcd-api v2`): what CoreOS-era
//! containers and registrator's etcd backend write, through
//! `/v2/keys/...`. etcd 3.x keeps v2 keys apart from v3 ones (served with
//! `--enable-v2=true`), so a proxy reading v3 never sees them.
//!
//! The same keys and values as v3 (`<services>/<service>/<id>`, routes,
//! maps and overrides under `<pointsman>/`), read over etcd's v2 HTTP API
//! with the tools' plain HTTP client:
//!
//! - list: `GET /v2/keys<root>?recursive=true` for both roots; the
//!   answer's `X-Etcd-Index` is where the watch resumes;
//! - watch: `GET /v2/keys/?wait=true&recursive=true&waitIndex=N`, one event
//!   per answer, each moving `N` past it; keys outside both roots are
//!   skipped, a deleted or expired directory removes every entry under it;
//! - an index etcd no longer keeps (`errorCode` 401, "the event in
//!   requested index is outdated and cleared": more than 1,000 changes
//!   since) lists everything again, as a compacted v3 watch does.
//!
//! As with v3 the last good view keeps serving while etcd is away, a
//! malformed value keeps its last good value, and the proxy's status shows
//! the connection, the error and the staleness. v2 has no revisions that
//! v3 tools can compare, so no revision is reported as applied: the
//! fleet's drain confirmations (which write v3) do not apply to a proxy
//! following v2. Plain HTTP only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::http::{within, HttpConn, HttpError};
use crate::parse::{parse_entry, parse_key};
use crate::{Change, Entry, EtcdOptions, ParseError, Source, SourceStatus, Update, UpdateKind};

/// How long one watch request may wait for an event before it is asked
/// again (etcd keeps it open until an event comes).
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// One node of a v2 answer.
#[derive(Debug, Default, Deserialize)]
struct Node {
    key: Option<String>,
    #[serde(default)]
    dir: bool,
    value: Option<String>,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(rename = "modifiedIndex", default)]
    modified_index: u64,
}

/// A v2 answer: a listing, an event, or an error.
#[derive(Debug, Default, Deserialize)]
struct Answer {
    #[serde(default)]
    action: String,
    node: Option<Node>,
    #[serde(rename = "errorCode")]
    error_code: Option<u32>,
    message: Option<String>,
    /// etcd's index: the `X-Etcd-Index` of the answer (or an error's own).
    index: Option<u64>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum V2Error {
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("{what}: not an etcd v2 answer: {reason}")]
    Json { what: String, reason: String },
    #[error("{what}: etcd answered error {code}: {message}")]
    Etcd {
        what: String,
        code: u32,
        message: String,
        /// etcd's index at the time.
        index: Option<u64>,
    },
    #[error("{0}: is the v2 API on? (etcd 3.x serves it with --enable-v2=true)")]
    NoV2(String),
}

/// Follows etcd's v2 keyspace until `tx` is closed; see the module docs.
pub async fn run(opts: EtcdOptions, tx: mpsc::Sender<Update>, status: Arc<SourceStatus>) {
    let mut w = Watcher {
        backoff: Backoff::new(opts.backoff_min, opts.backoff_max),
        opts,
        tx,
        status,
        view: BTreeMap::new(),
        endpoint: 0,
    };
    loop {
        // A session ends by itself once the receiver is gone (its sends
        // fail), and a wait is bounded by WAIT_LIMIT.
        let Err(e) = w.session().await else { return };
        if w.tx.is_closed() {
            return;
        }
        w.status.set_connected(false);
        w.status.record_reconnect();
        w.status.set_error(format!("etcd v2 {}: {e}", w.addr()));
        let delay = w.backoff.next();
        tracing::warn!(error = %e, endpoint = %w.addr(), retry_in = ?delay, "etcd v2: watch lost; serving the last good view and reconnecting");
        w.endpoint = (w.endpoint + 1) % w.opts.endpoints.len().max(1);
        tokio::select! {
            _ = w.tx.closed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

struct Watcher {
    opts: EtcdOptions,
    tx: mpsc::Sender<Update>,
    status: Arc<SourceStatus>,
    /// etcd key -> the last good entry it holds.
    view: BTreeMap<String, Entry>,
    endpoint: usize,
    backoff: Backoff,
}

impl Watcher {
    /// `host:port` of the member in use.
    fn addr(&self) -> String {
        let url = self
            .opts
            .endpoints
            .get(self.endpoint)
            .map(String::as_str)
            .unwrap_or("127.0.0.1:2379");
        url.trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string()
    }

    /// Lists, then follows events until something fails; `Ok` once the
    /// receiver is gone.
    async fn session(&mut self) -> Result<(), V2Error> {
        let mut index = match self.list().await? {
            Some(index) => index,
            None => return Ok(()),
        };
        self.status.set_connected(true);
        self.backoff.reset();
        loop {
            if self.tx.is_closed() {
                return Ok(());
            }
            let path = format!("/v2/keys/?wait=true&recursive=true&waitIndex={}", index + 1);
            let answer = match self.get(&path, WAIT_LIMIT).await {
                Ok(a) => a,
                // Nothing happened for a while: ask again.
                Err(V2Error::Http(HttpError::Timeout { .. })) => {
                    self.status.mark_synced();
                    continue;
                }
                Err(V2Error::Etcd { code: 401, .. }) => {
                    tracing::info!("etcd v2: index {} was cleared (over 1,000 changes since): listing everything again", index + 1);
                    index = match self.list().await? {
                        Some(i) => i,
                        None => return Ok(()),
                    };
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(node) = answer.node else { continue };
            index = index.max(node.modified_index);
            if !self.apply(&answer.action, node).await {
                return Ok(());
            }
            self.status.mark_synced();
        }
    }

    /// GET `path` on the member in use, as an etcd v2 answer (an error
    /// answer becomes [`V2Error::Etcd`]), with its `X-Etcd-Index`.
    async fn get(&self, path: &str, limit: Duration) -> Result<Answer, V2Error> {
        let addr = self.addr();
        let reply = within(&addr, limit, async {
            let mut conn = HttpConn::open(&addr).await?;
            conn.get(path).await
        })
        .await?;
        let what = format!("GET http://{addr}{path}");
        if reply.status == 404 && !reply.headers.contains_key("x-etcd-index") {
            return Err(V2Error::NoV2(what));
        }
        let mut answer: Answer =
            serde_json::from_slice(&reply.body).map_err(|e| V2Error::Json {
                what: what.clone(),
                reason: e.to_string(),
            })?;
        let header_index = reply
            .headers
            .get("x-etcd-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        answer.index = header_index.or(answer.index);
        match answer.error_code {
            Some(code) => Err(V2Error::Etcd {
                what,
                code,
                message: answer.message.unwrap_or_default(),
                index: answer.index,
            }),
            None => Ok(answer),
        }
    }

    /// Lists both roots and sends them as one `Reset`; the etcd index to
    /// watch from, or `None` once the receiver is gone.
    async fn list(&mut self) -> Result<Option<u64>, V2Error> {
        let prefixes = self.opts.prefixes.clone();
        let mut leaves = Vec::new();
        let mut index = 0;
        for root in [prefixes.services_dir(), prefixes.pointsman_dir()] {
            let path = format!("/v2/keys{}?recursive=true", root.trim_end_matches('/'));
            match self.get(&path, self.opts.request_timeout).await {
                Ok(answer) => {
                    index = index.max(answer.index.unwrap_or(0));
                    if let Some(node) = answer.node {
                        index = index.max(node.modified_index);
                        collect(node, &mut leaves);
                    }
                }
                // Key not found: nothing under this root yet.
                Err(V2Error::Etcd {
                    code: 100,
                    message,
                    index: at,
                    ..
                }) => {
                    index = index.max(at.unwrap_or(0));
                    tracing::debug!(root = %root, %message, "etcd v2: nothing under this root");
                }
                Err(e) => return Err(e),
            }
        }
        let mut next = BTreeMap::new();
        for (key, value) in leaves {
            match parse_entry(&prefixes, &key, value.as_bytes()) {
                Ok(Some(entry)) => {
                    next.insert(key, entry);
                }
                Ok(None) => {}
                Err(e) => {
                    let kept = self.view.get(&key).cloned();
                    self.malformed(&e, kept.is_some());
                    if let Some(last) = kept {
                        next.insert(key, last);
                    }
                }
            }
        }
        let entries: Vec<Entry> = next.values().cloned().collect();
        tracing::info!(index, entries = entries.len(), "etcd v2: listed");
        self.view = next;
        let update = Update {
            source: Source::Etcd,
            revision: None,
            kind: UpdateKind::Reset(entries),
        };
        if self.tx.send(update).await.is_err() {
            return Ok(None);
        }
        self.status.record_reset(None);
        self.status.mark_synced();
        Ok(Some(index))
    }

    /// Applies one event; false once the receiver is gone.
    async fn apply(&mut self, action: &str, node: Node) -> bool {
        let prefixes = self.opts.prefixes.clone();
        let Some(key) = node.key.clone() else {
            return true;
        };
        let mut changes = Vec::new();
        match action {
            "delete" | "expire" | "compareAndDelete" => {
                let dir = format!("{}/", key.trim_end_matches('/'));
                let gone: Vec<String> = self
                    .view
                    .keys()
                    .filter(|k| **k == key || k.starts_with(&dir))
                    .cloned()
                    .collect();
                for k in gone {
                    if let Some(entry) = self.view.remove(&k) {
                        changes.push(Change::Remove(entry.key()));
                    }
                }
            }
            _ => {
                let mut leaves = Vec::new();
                collect(node, &mut leaves);
                for (k, value) in leaves {
                    match parse_entry(&prefixes, &k, value.as_bytes()) {
                        Ok(Some(entry)) => {
                            self.view.insert(k, entry.clone());
                            changes.push(Change::Upsert(entry));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let kept = self.view.contains_key(&k);
                            self.malformed(&e, kept);
                            if !kept {
                                if let Some(entry_key) = parse_key(&prefixes, &k) {
                                    changes.push(Change::Remove(entry_key));
                                }
                            }
                        }
                    }
                }
            }
        }
        if changes.is_empty() {
            return true;
        }
        let update = Update {
            source: Source::Etcd,
            revision: None,
            kind: UpdateKind::Changes(changes),
        };
        self.tx.send(update).await.is_ok()
    }

    fn malformed(&self, e: &ParseError, kept: bool) {
        self.status.malformed_value(e, kept);
    }
}

/// Whether etcd at `endpoint` (a plain-HTTP client URL) holds keys under
/// `root` in its v2 keyspace; false when it does not answer v2 at all.
/// The v3 watcher asks this once when it finds no registration, to say
/// where they went.
pub async fn has_keys(endpoint: &str, root: &str, limit: Duration) -> bool {
    if endpoint.starts_with("https://") {
        return false;
    }
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let path = format!("/v2/keys{}", root.trim_end_matches('/'));
    let reply = within(addr, limit, async {
        let mut conn = HttpConn::open(addr).await?;
        conn.get(&path).await
    })
    .await;
    let Ok(reply) = reply else { return false };
    serde_json::from_slice::<Answer>(&reply.body)
        .ok()
        .and_then(|a| a.node)
        .is_some_and(|n| !n.dir || !n.nodes.is_empty())
}

/// The leaves (key, value) under `node`, itself included when it is one.
fn collect(node: Node, out: &mut Vec<(String, String)>) {
    if node.dir {
        for child in node.nodes {
            collect(child, out);
        }
        return;
    }
    if let (Some(key), Some(value)) = (node.key, node.value) {
        out.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_of_a_recursive_listing() {
        let answer: Answer = serde_json::from_str(
            r#"{"action":"get","node":{"key":"/services","dir":true,"nodes":[
                {"key":"/services/web","dir":true,"nodes":[
                    {"key":"/services/web/a1","value":"10.0.0.5:8080","modifiedIndex":7},
                    {"key":"/services/web/a2","value":"10.0.0.6:8080","modifiedIndex":9}]},
                {"key":"/services/flat","value":"x","modifiedIndex":3}]}}"#,
        )
        .expect("a v2 listing");
        let mut leaves = Vec::new();
        collect(answer.node.expect("a node"), &mut leaves);
        let keys: Vec<&str> = leaves.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["/services/web/a1", "/services/web/a2", "/services/flat"]
        );
        let err: Answer = serde_json::from_str(
            r#"{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [5/1]","index":2000}"#,
        )
        .expect("a v2 error");
        assert_eq!(err.error_code, Some(401));
    }
}
