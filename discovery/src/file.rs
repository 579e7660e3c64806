//! The file registry: registrations as files, for a single proxy that runs
//! without etcd. The directory mirrors the services key space —
//! `<dir>/<service>/<instance-id>` holds exactly what
//! `/services/<service>/<instance-id>` would hold in etcd (`host:port` or the
//! JSON form) — and [`watch_dir`] turns it into the same [`Update`] stream
//! the etcd watcher produces: one `Reset`, then `Changes` as files come, go
//! and change.
//!
//! Editors save by writing a temporary file and renaming it over the old
//! one, so the watch is recursive and every event re-reads the paths it
//! names. Hidden files (`.x`) and editor leftovers (`x~`, `x.swp`, `x.tmp`)
//! are ignored. A file that does not parse is logged and counted, and the
//! last good registration read from it stays in force.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant, MissedTickBehavior};

use crate::parse::parse_instance;
use crate::{Change, DiscoveryError, Entry, EntryKey, Registration, Source, SourceStatus};
use crate::{Update, UpdateKind};

/// Events closer together than this are applied as one batch, so an
/// editor's remove-then-create never shows up as a removal.
const QUIET: Duration = Duration::from_millis(20);
/// A steady stream of events still gets applied this often.
const MAX_BATCH: Duration = Duration::from_millis(250);
/// How often the watcher checks that its directory is still the one it
/// watches, and confirms its view to [`SourceStatus`].
const TICK: Duration = Duration::from_secs(1);
/// A registration is a line of text or a small JSON object; anything
/// larger is a mistake (a log file dropped in the wrong place).
const MAX_FILE_BYTES: u64 = 64 * 1024;

type NotifyEvent = notify::Result<notify::Event>;

/// Watches `dir` and sends its registrations to `tx` until `tx` is closed.
///
/// Sends one `UpdateKind::Reset` (source [`Source::File`], no revision) with
/// every registration, then one `UpdateKind::Changes` per batch of file
/// events. Returns `Ok(())` once the receiver is dropped, and an error only
/// if `dir` cannot be watched at start. If the directory later disappears
/// the last registrations stay in force (fail static) and the status reads
/// disconnected until it is back, when it is listed afresh.
pub async fn watch_dir(
    dir: PathBuf,
    tx: mpsc::Sender<Update>,
    status: Arc<SourceStatus>,
) -> Result<(), DiscoveryError> {
    watch_dir_batching(dir, tx, status, QUIET).await
}

/// [`watch_dir`] with the quiet gap as a parameter, so tests of batching do
/// not depend on how promptly a loaded machine schedules them.
async fn watch_dir_batching(
    dir: PathBuf,
    tx: mpsc::Sender<Update>,
    status: Arc<SourceStatus>,
    quiet: Duration,
) -> Result<(), DiscoveryError> {
    let dir = existing_dir(dir)?;
    let (events_tx, mut events) = mpsc::unbounded_channel::<NotifyEvent>();
    // The watch starts before the first scan so nothing written in between
    // is missed; events for files the scan already saw change nothing.
    let mut watch = DirWatch {
        watcher: Some(start_watcher(&dir, events_tx.clone())?),
        identity: dir_identity(&dir),
        registry: FileRegistry::new(dir.clone(), status.clone()),
        dir,
        events_tx,
        status,
    };

    if !watch.registry.reset(&tx).await {
        return Ok(());
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = tick.tick() => {
                if !watch.recheck_dir(&tx).await {
                    return Ok(());
                }
            }
            first = events.recv() => {
                // `watch.events_tx` is held, so the channel never closes.
                let Some(first) = first else { return Ok(()) };
                let batch = collect_batch(first, &mut events, quiet).await;
                if watch.watcher.is_none() || dir_identity(&watch.dir) != watch.identity {
                    continue; // the tick re-lists
                }
                if !watch.registry.apply_batch(batch, &tx).await {
                    return Ok(());
                }
            }
        }
    }
}

/// `dir` made absolute, once it is known to be a directory. Absolute but
/// not canonical: if `dir` is a symlink, swapping it to another directory
/// must count as "replaced", as with a rename.
fn existing_dir(dir: PathBuf) -> Result<PathBuf, DiscoveryError> {
    let dir = std::path::absolute(&dir).map_err(|source| DiscoveryError::Io {
        path: dir.clone(),
        source,
    })?;
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(DiscoveryError::NotADir { path: dir }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(DiscoveryError::DirMissing { path: dir })
        }
        Err(source) => Err(DiscoveryError::Io { path: dir, source }),
    }
}

/// A watched registry directory and what tells whether it is still the
/// same one.
struct DirWatch {
    dir: PathBuf,
    events_tx: mpsc::UnboundedSender<NotifyEvent>,
    /// `None` while the directory is gone or could not be watched again.
    watcher: Option<RecommendedWatcher>,
    identity: Option<(u64, u64)>,
    registry: FileRegistry,
    status: Arc<SourceStatus>,
}

impl DirWatch {
    /// Looks at the directory itself: gone (keep the last registrations),
    /// replaced or back (watch and list it again), or the same. False once
    /// the receiver is gone.
    async fn recheck_dir(&mut self, tx: &mpsc::Sender<Update>) -> bool {
        let dir = &self.dir;
        let now = dir_identity(dir);
        if now.is_none() {
            if self.status.is_connected() {
                tracing::warn!(dir = %dir.display(), "file registry directory is gone; keeping the last registrations until it is back");
                self.status.set_error(format!(
                    "file registry {}: directory is gone; keeping the last registrations",
                    dir.display()
                ));
                self.status.set_connected(false);
            }
            self.watcher = None;
        } else if now != self.identity || self.watcher.is_none() {
            // Replaced (e.g. `mv new dir`) or back after removal: the old
            // watch follows the old inode, so start over.
            tracing::info!(dir = %dir.display(), "file registry directory replaced; watching and listing it again");
            match start_watcher(dir, self.events_tx.clone()) {
                Ok(w) => {
                    self.watcher = Some(w);
                    self.identity = now;
                    return self.registry.reset(tx).await;
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "file registry: cannot watch the directory again; will retry");
                    self.status.set_error(e.to_string());
                }
            }
        } else {
            self.status.mark_synced();
        }
        true
    }
}

fn start_watcher(
    dir: &Path,
    events: mpsc::UnboundedSender<NotifyEvent>,
) -> Result<RecommendedWatcher, DiscoveryError> {
    let watch_error = |e: notify::Error| DiscoveryError::Watch {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let mut watcher = notify::recommended_watcher(move |ev: NotifyEvent| {
        // The receiver is gone only when the watch task ended.
        let _ = events.send(ev);
    })
    .map_err(watch_error)?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .map_err(watch_error)?;
    Ok(watcher)
}

/// Device and inode of the directory, to notice it being replaced.
fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

/// Takes every event already queued, then keeps taking while they arrive
/// less than `quiet` apart (bounded by [`MAX_BATCH`]).
async fn collect_batch(
    first: NotifyEvent,
    events: &mut mpsc::UnboundedReceiver<NotifyEvent>,
    quiet: Duration,
) -> Vec<NotifyEvent> {
    let deadline = Instant::now() + MAX_BATCH;
    let mut batch = vec![first];
    loop {
        while let Ok(ev) = events.try_recv() {
            batch.push(ev);
        }
        if Instant::now() >= deadline {
            return batch;
        }
        match timeout(quiet, events.recv()).await {
            Ok(Some(ev)) => batch.push(ev),
            Ok(None) | Err(_) => return batch,
        }
    }
}

/// What the watcher knows about the directory between batches.
struct FileRegistry {
    dir: PathBuf,
    status: Arc<SourceStatus>,
    /// The last good registration read from each file.
    known: BTreeMap<PathBuf, Registration>,
    /// The current error of each malformed file, so one bad save is logged
    /// and counted once, not once per event.
    bad: HashMap<PathBuf, String>,
}

impl FileRegistry {
    fn new(dir: PathBuf, status: Arc<SourceStatus>) -> Self {
        FileRegistry {
            dir,
            status,
            known: BTreeMap::new(),
            bad: HashMap::new(),
        }
    }

    /// Lists the whole directory and sends it as a `Reset`. Malformed files
    /// keep their last good registration. Returns false once `tx` is closed.
    async fn reset(&mut self, tx: &mpsc::Sender<Update>) -> bool {
        let found = scan(self.dir.clone(), vec![self.dir.clone()]).await;
        let mut next = BTreeMap::new();
        for (path, outcome) in found {
            match outcome {
                Found::Good(reg) => {
                    self.bad.remove(&path);
                    next.insert(path, *reg);
                }
                Found::Bad(reason) => {
                    self.note_bad(&path, reason);
                    if let Some(last) = self.known.remove(&path) {
                        next.insert(path, last);
                    }
                }
            }
        }
        self.bad.retain(|p, _| next.contains_key(p) || p.exists());
        self.known = next;
        let entries = self.known.values().cloned().map(Entry::Instance).collect();
        let update = Update {
            source: Source::File,
            revision: None,
            kind: UpdateKind::Reset(entries),
        };
        if tx.send(update).await.is_err() {
            return false;
        }
        self.status.record_reset(None);
        self.status.set_connected(true);
        self.status.mark_synced();
        true
    }

    /// Re-reads the paths a batch of events names and sends what changed as
    /// one `Changes` update. Returns false once `tx` is closed.
    async fn apply_batch(&mut self, batch: Vec<NotifyEvent>, tx: &mpsc::Sender<Update>) -> bool {
        let mut affected = BTreeSet::new();
        let mut rescan = false;
        for ev in batch {
            match ev {
                Ok(ev) => {
                    // The kernel dropped events (queue overflow): only a
                    // full listing is trustworthy now.
                    rescan |= ev.need_rescan();
                    for path in ev.paths {
                        // A hidden entry at the top changing is how
                        // Kubernetes swaps a mounted volume (`..data`).
                        rescan |= path.parent() == Some(self.dir.as_path())
                            && path
                                .file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with('.'));
                        affected.insert(path);
                    }
                }
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "file registry: watch error; listing the directory again");
                    self.status.set_error(format!(
                        "file registry {}: watch error: {e}",
                        self.dir.display()
                    ));
                    rescan = true;
                }
            }
        }
        if rescan {
            affected = BTreeSet::from([self.dir.clone()]);
        }
        // Paths outside the directory cannot be ours.
        affected.retain(|p| p.starts_with(&self.dir));
        if affected.is_empty() {
            return true;
        }
        let targets: Vec<PathBuf> = affected.iter().cloned().collect();
        let found = scan(self.dir.clone(), targets).await;
        let changes = self.diff(&affected, found);
        self.status.mark_synced();
        if changes.is_empty() {
            return true;
        }
        let update = Update {
            source: Source::File,
            revision: None,
            kind: UpdateKind::Changes(changes),
        };
        tx.send(update).await.is_ok()
    }

    /// Folds what a scan of `affected` found into `known`, returning the
    /// changes. A known file under an affected path that the scan did not
    /// find is gone.
    fn diff(&mut self, affected: &BTreeSet<PathBuf>, found: Vec<(PathBuf, Found)>) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut present = BTreeSet::new();
        for (path, outcome) in found {
            present.insert(path.clone());
            match outcome {
                Found::Good(reg) => {
                    self.bad.remove(&path);
                    if self.known.get(&path) != Some(&*reg) {
                        changes.push(Change::Upsert(Entry::Instance((*reg).clone())));
                        self.known.insert(path, *reg);
                    }
                }
                Found::Bad(reason) => self.note_bad(&path, reason),
            }
        }
        let under_affected = |p: &Path| affected.iter().any(|a| p.starts_with(a));
        let gone: Vec<PathBuf> = self
            .known
            .keys()
            .filter(|p| !present.contains(*p) && under_affected(p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(reg) = self.known.remove(&path) {
                changes.push(Change::Remove(EntryKey::Instance {
                    service: reg.service,
                    id: reg.id,
                }));
            }
        }
        self.bad
            .retain(|p, _| present.contains(p) || !under_affected(p));
        changes
    }

    fn note_bad(&mut self, path: &Path, reason: String) {
        if self.bad.get(path) == Some(&reason) {
            return;
        }
        let kept = if self.known.contains_key(path) {
            "keeping its last good registration"
        } else {
            "skipping it"
        };
        tracing::warn!(path = %path.display(), %reason, "file registry: malformed registration file; {kept}");
        self.status.record_malformed();
        self.status.set_error(reason.clone());
        self.bad.insert(path.to_path_buf(), reason);
    }
}

/// What one file turned out to hold.
#[derive(Debug)]
enum Found {
    Good(Box<Registration>),
    Bad(String),
}

/// Reads `targets` (files or directories, recursively) off the async
/// threads. Ignored and missing files are simply absent from the result.
async fn scan(root: PathBuf, targets: Vec<PathBuf>) -> Vec<(PathBuf, Found)> {
    let task = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for target in targets {
            visit(&root, &target, &mut out);
        }
        out
    });
    match task.await {
        Ok(found) => found,
        Err(e) => {
            // Only a panic in the scan gets here; treat it as "saw nothing
            // new" rather than take the watcher down.
            tracing::error!(error = %e, "file registry: scan failed");
            Vec::new()
        }
    }
}

fn visit(root: &Path, path: &Path, out: &mut Vec<(PathBuf, Found)>) {
    let Ok(rel) = path.strip_prefix(root) else {
        return;
    };
    if rel
        .components()
        .any(|c| is_ignored_name(&c.as_os_str().to_string_lossy()))
    {
        return;
    }
    let Ok(meta) = std::fs::metadata(path) else {
        return; // gone, or a dangling symlink: both mean "no registration"
    };
    if meta.is_dir() {
        // <root>/<service>/ holds files; anything deeper is flagged by
        // `read_registration`, but do not wander into deep trees or loops.
        if rel.components().count() >= 3 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.flatten() {
            visit(root, &entry.path(), out);
        }
        return;
    }
    if meta.is_file() {
        if let Some(found) = read_registration(rel, path, meta.len()) {
            out.push((path.to_path_buf(), found));
        }
    }
}

/// Hidden files and editor leftovers are not registrations.
fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~') || name.ends_with(".swp") || name.ends_with(".tmp")
}

/// `None` if the file vanished while being read (the event for that
/// follows).
fn read_registration(rel: &Path, path: &Path, len: u64) -> Option<Found> {
    let label = path.display().to_string();
    let parts: Vec<Option<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    let (service, id) = match parts.as_slice() {
        [Some(service), Some(id)] => (*service, *id),
        [_, _] => {
            return Some(Found::Bad(format!(
                "{label}: file name is not UTF-8: rename it"
            )))
        }
        _ => {
            return Some(Found::Bad(format!(
                "{label}: not where a registration belongs: expected <dir>/<service>/<instance-id>"
            )))
        }
    };
    if len > MAX_FILE_BYTES {
        return Some(Found::Bad(format!(
            "{label}: file is {len} bytes; a registration is at most {MAX_FILE_BYTES}: expected host:port or a JSON object"
        )));
    }
    let mut value = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut value));
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Found::Bad(format!("{label}: cannot read: {e}"))),
    }
    Some(match parse_instance(&label, service, id, &value) {
        Ok(reg) => Found::Good(Box::new(reg)),
        Err(e) => Found::Bad(e.to_string()),
    })
}

#[cfg(test)]
mod tests;
