//! Step 1, proxy side: the registries that feed the control task. Each
//! configured source (etcd, a watched directory) runs its watcher from
//! `pointsman-discovery`; a relay task per source passes its updates to the
//! control task and keeps a mirror of what the source holds, which it saves
//! to `--state-dir` (at most once a second) so that a proxy started while
//! its registry is unreachable serves the last good state (fail static).
//! With a state dir, the saved state is put in the table first thing at
//! start, before any client is accepted; the registry's first sync replaces
//! it when it comes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pointsman_discovery::admin_api::SourceView;
use pointsman_discovery::consul::ConsulError;
use pointsman_discovery::EtcdApi;
use pointsman_discovery::{
    load_state, save_state, state_path, Change, ConsulOptions, DiscoveryError, Entry, EntryKey,
    EtcdOptions, Source, SourceStatus, Update, UpdateKind,
};
use tokio::sync::{mpsc, watch};

use crate::control::Command;
use crate::engine::table::SharedTable;

/// Saved state is rewritten at most this often while changes stream in.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Which registries to follow.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    pub etcd: Option<EtcdOptions>,
    pub consul: Option<ConsulOptions>,
    /// A directory of registration files.
    pub dir: Option<PathBuf>,
    /// Where the last good state of each registry is kept.
    pub state_dir: Option<PathBuf>,
}

/// One followed registry, as the admin API and `/readyz` see it.
pub struct Followed {
    pub status: Arc<SourceStatus>,
    /// Set when the routing table holds this source's entries, from a sync
    /// or from saved state.
    pub has_data: Arc<AtomicBool>,
    /// Set when what is served came from saved state and no sync happened
    /// since.
    pub from_saved_state: Arc<AtomicBool>,
    /// Updates received from the watcher.
    pub updates: Arc<AtomicU64>,
    /// Turns true once a published routing table holds this source's
    /// entries (from a sync or from saved state): what a start waits for
    /// before it accepts clients.
    pub in_table: watch::Receiver<bool>,
}

impl Followed {
    /// The source as `/api/discovery` shows it.
    pub fn view(&self) -> SourceView {
        SourceView {
            status: self.status.snapshot(),
            serving_saved_state: self.from_saved_state.load(Ordering::Relaxed),
        }
    }
}

/// Why the registries could not be followed: options that do not hold up.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd: {0}")]
    Etcd(DiscoveryError),
    #[error("consul: {0}")]
    Consul(ConsulError),
}

/// Starts a watcher and a relay per configured registry.
/// `table` is the one the control task publishes: each relay watches it to
/// tell when its source's first data is served.
pub fn start(
    opts: &RegistryOptions,
    commands: mpsc::Sender<Command>,
    table: &SharedTable,
) -> Result<Vec<Followed>, RegistryError> {
    let mut followed = Vec::new();
    if let Some(etcd) = &opts.etcd {
        etcd.check().map_err(RegistryError::Etcd)?;
        let status = Arc::new(SourceStatus::new(Source::Etcd));
        let (tx, rx) = mpsc::channel(256);
        match etcd.api {
            EtcdApi::V3 => tokio::spawn(pointsman_discovery::etcd::run(
                etcd.clone(),
                tx,
                status.clone(),
            )),
            EtcdApi::V2 => tokio::spawn(pointsman_discovery::etcd2::run(
                etcd.clone(),
                tx,
                status.clone(),
            )),
        };
        followed.push(relay(
            Source::Etcd,
            rx,
            status,
            opts.state_dir.clone(),
            commands.clone(),
            table.clone(),
        ));
        tracing::info!(endpoints = ?etcd.endpoints, "following etcd");
    }
    if let Some(consul) = &opts.consul {
        consul.check().map_err(RegistryError::Consul)?;
        let status = Arc::new(SourceStatus::new(Source::Consul));
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(pointsman_discovery::consul::run(
            consul.clone(),
            tx,
            status.clone(),
        ));
        followed.push(relay(
            Source::Consul,
            rx,
            status,
            opts.state_dir.clone(),
            commands.clone(),
            table.clone(),
        ));
        tracing::info!(urls = ?consul.urls, "following consul");
    }
    if let Some(dir) = &opts.dir {
        let status = Arc::new(SourceStatus::new(Source::File));
        let (tx, rx) = mpsc::channel(256);
        let (dir, watch_status) = (dir.clone(), status.clone());
        tokio::spawn(async move {
            if let Err(e) =
                pointsman_discovery::watch_dir(dir.clone(), tx, watch_status.clone()).await
            {
                watch_status.set_error(e.to_string());
                tracing::error!(dir = %dir.display(), error = %e, "file registry stopped");
            }
        });
        followed.push(relay(
            Source::File,
            rx,
            status,
            opts.state_dir.clone(),
            commands.clone(),
            table.clone(),
        ));
        tracing::info!(dir = %opts.dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default(), "following the file registry");
    }
    Ok(followed)
}

fn relay(
    source: Source,
    mut updates: mpsc::Receiver<Update>,
    status: Arc<SourceStatus>,
    state_dir: Option<PathBuf>,
    commands: mpsc::Sender<Command>,
    table: SharedTable,
) -> Followed {
    let has_data = Arc::new(AtomicBool::new(false));
    let from_saved = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let (served, in_table) = watch::channel(false);
    let followed = Followed {
        status,
        has_data: has_data.clone(),
        from_saved_state: from_saved.clone(),
        updates: counted.clone(),
        in_table,
    };
    tokio::spawn(async move {
        let mut mirror = Mirror::default();
        // Fail static at start: the saved state serves until the first sync
        // replaces it, from the first client on.
        if let Some(dir) = &state_dir {
            if let Some(update) = saved_state(dir, source).await {
                mirror.apply(&update);
                if !send_and_wait_published(&commands, &table, update).await {
                    return;
                }
                has_data.store(true, Ordering::Release);
                from_saved.store(true, Ordering::Release);
                served.send_replace(true);
            }
        }
        let mut next = updates.recv().await;
        let mut dirty = false;
        let mut save_tick = tokio::time::interval(SAVE_EVERY);
        save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some(update) = next.take() else { return };
            counted.fetch_add(1, Ordering::Relaxed);
            if state_dir.is_some() {
                mirror.apply(&update);
                dirty = true;
            }
            let synced = matches!(update.kind, UpdateKind::Reset(_));
            let sent = if synced && !*served.borrow() {
                send_and_wait_published(&commands, &table, update).await
            } else {
                commands.send(Command::Discovery(update)).await.is_ok()
            };
            if !sent {
                return;
            }
            if synced {
                has_data.store(true, Ordering::Release);
                from_saved.store(false, Ordering::Release);
                served.send_replace(true);
            }
            // Wait for the next update, saving on the way when due.
            while next.is_none() {
                tokio::select! {
                    u = updates.recv() => match u {
                        Some(u) => next = Some(u),
                        None => return,
                    },
                    _ = save_tick.tick(), if dirty => {
                        if let Some(dir) = &state_dir {
                            save(dir, source, &mirror).await;
                        }
                        dirty = false;
                    }
                }
            }
        }
    });
    followed
}

/// Sends `update` to the control task and returns once a published table
/// holds it; false if the control task is gone.
///
/// The control task publishes one table per batch, and a batch takes
/// everything queued when it starts. Once `update` is queued and the
/// table's version read as `v`, at most one batch without it can still be
/// under way (it publishes `v + 1`); every later batch holds it or comes
/// after the one that did. So the table `v + 2` holds it; an empty update
/// queued after `v + 1` is out makes sure that table is published.
async fn send_and_wait_published(
    commands: &mpsc::Sender<Command>,
    table: &SharedTable,
    update: Update,
) -> bool {
    let source = update.source;
    if commands.send(Command::Discovery(update)).await.is_err() {
        return false;
    }
    let v = table.load().version;
    if !wait_version(commands, table, v + 1).await {
        return false;
    }
    let nothing = Update {
        source,
        revision: None,
        kind: UpdateKind::Changes(Vec::new()),
    };
    if commands.send(Command::Discovery(nothing)).await.is_err() {
        return false;
    }
    wait_version(commands, table, v + 2).await
}

/// Waits until the published table's version reaches `version`. Tables
/// carry no notification; this runs once per source at start, for the few
/// milliseconds the control task takes.
async fn wait_version(commands: &mpsc::Sender<Command>, table: &SharedTable, version: u64) -> bool {
    while table.load().version < version {
        if commands.is_closed() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// The saved state of `source` as a `Reset`, read off the runtime's
/// threads; `None` (logged) when there is none or it is unusable.
async fn saved_state(dir: &std::path::Path, source: Source) -> Option<Update> {
    let file = state_path(dir, source);
    let read = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || load_state(&dir, source)).await
    };
    match read {
        Ok(Ok(Some(state))) => {
            let (revision, entries) = state;
            tracing::info!(
                source = source.as_str(),
                file = %file.display(),
                entries = entries.len(),
                ?revision,
                "serving the saved state until the registry syncs"
            );
            Some(Update {
                source,
                revision,
                kind: UpdateKind::Reset(entries),
            })
        }
        Ok(Ok(None)) => {
            tracing::info!(
                source = source.as_str(),
                file = %file.display(),
                "no saved state yet: waiting for the registry's first sync"
            );
            None
        }
        Ok(Err(e)) => {
            tracing::error!(source = source.as_str(), error = %e, "saved state unusable; waiting for the registry");
            None
        }
        Err(e) => {
            tracing::error!(source = source.as_str(), error = %e, "reading the saved state failed; waiting for the registry");
            None
        }
    }
}

async fn save(dir: &std::path::Path, source: Source, mirror: &Mirror) {
    let entries: Vec<Entry> = mirror.entries.values().cloned().collect();
    let (dir, revision) = (dir.to_path_buf(), mirror.revision);
    let saved =
        tokio::task::spawn_blocking(move || save_state(&dir, source, revision, &entries)).await;
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(source = source.as_str(), error = %e, "cannot save registry state")
        }
        Err(e) => {
            tracing::warn!(source = source.as_str(), error = %e, "saving registry state failed")
        }
    }
}

/// What a source holds, kept to be saved.
#[derive(Default)]
struct Mirror {
    entries: BTreeMap<EntryKey, Entry>,
    revision: Option<i64>,
}

impl Mirror {
    fn apply(&mut self, update: &Update) {
        match &update.kind {
            UpdateKind::Reset(all) => {
                self.entries = all.iter().map(|e| (e.key(), e.clone())).collect();
            }
            UpdateKind::Changes(changes) => {
                for change in changes {
                    match change {
                        Change::Upsert(e) => {
                            self.entries.insert(e.key(), e.clone());
                        }
                        Change::Remove(k) => {
                            self.entries.remove(k);
                        }
                    }
                }
            }
        }
        if update.revision.is_some() {
            self.revision = update.revision;
        }
    }
}
