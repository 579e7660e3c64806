//! Step 1, proxy side: the registries that feed the control task. Each
//! configured source (etcd, a watched directory) runs its watcher from
//! `pointsman-discovery`; a relay task per source passes its updates to the
//! control task and keeps a mirror of what the source holds, which it saves
//! to `--state-dir` (at most once a second) so that a proxy started while
//! its registry is unreachable serves the last good state (fail static).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pointsman_discovery::consul::ConsulError;
use pointsman_discovery::{
    load_state, save_state, state_path, Change, ConsulOptions, DiscoveryError, Entry, EntryKey,
    EtcdOptions, Source, SourceStatus, Update, UpdateKind,
};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::control::Command;

/// How long a proxy with a state dir waits for its registry's first sync
/// before it serves the saved state instead.
pub const FIRST_SYNC_WAIT: Duration = Duration::from_secs(2);
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
}

/// A source's view for the admin API.
#[derive(Serialize)]
pub struct FollowedView {
    #[serde(flatten)]
    pub status: pointsman_discovery::SourceStatusSnapshot,
    pub serving_saved_state: bool,
}

impl Followed {
    pub fn view(&self) -> FollowedView {
        FollowedView {
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
pub fn start(
    opts: &RegistryOptions,
    commands: mpsc::Sender<Command>,
) -> Result<Vec<Followed>, RegistryError> {
    let mut followed = Vec::new();
    if let Some(etcd) = &opts.etcd {
        etcd.check().map_err(RegistryError::Etcd)?;
        let status = Arc::new(SourceStatus::new(Source::Etcd));
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(pointsman_discovery::etcd::run(
            etcd.clone(),
            tx,
            status.clone(),
        ));
        followed.push(relay(
            Source::Etcd,
            rx,
            status,
            opts.state_dir.clone(),
            commands.clone(),
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
) -> Followed {
    let has_data = Arc::new(AtomicBool::new(false));
    let from_saved = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let followed = Followed {
        status,
        has_data: has_data.clone(),
        from_saved_state: from_saved.clone(),
        updates: counted.clone(),
    };
    tokio::spawn(async move {
        let mut mirror = Mirror::default();
        // Fail static at start: no sync in time -> serve the saved state.
        let first = match &state_dir {
            Some(dir) => match tokio::time::timeout(FIRST_SYNC_WAIT, updates.recv()).await {
                Ok(first) => first,
                Err(_) => {
                    if let Some(update) = saved_state(dir, source) {
                        mirror.apply(&update);
                        if commands.send(Command::Discovery(update)).await.is_err() {
                            return;
                        }
                        has_data.store(true, Ordering::Release);
                        from_saved.store(true, Ordering::Release);
                    }
                    updates.recv().await
                }
            },
            None => updates.recv().await,
        };
        let mut next = first;
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
            if commands.send(Command::Discovery(update)).await.is_err() {
                return;
            }
            if synced {
                has_data.store(true, Ordering::Release);
                from_saved.store(false, Ordering::Release);
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

fn saved_state(dir: &std::path::Path, source: Source) -> Option<Update> {
    match load_state(dir, source) {
        Ok(Some(state)) => {
            let (revision, entries) = state;
            tracing::warn!(
                source = source.as_str(),
                file = %state_path(dir, source).display(),
                entries = entries.len(),
                ?revision,
                "registry not synced in time: serving the saved state"
            );
            Some(Update {
                source,
                revision,
                kind: UpdateKind::Reset(entries),
            })
        }
        Ok(None) => {
            tracing::warn!(
                source = source.as_str(),
                "registry not synced in time and no saved state yet"
            );
            None
        }
        Err(e) => {
            tracing::error!(source = source.as_str(), error = %e, "saved state unusable; waiting for the registry");
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
