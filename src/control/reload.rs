//! Config hot reload. The config file's directory is watched (editors
//! replace a file by renaming a new one over it, which a watch on the file
//! itself would miss). A valid change is sent to the control task; an
//! invalid one is logged with its precise error and the running config
//! keeps serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot};

use crate::control::config::Config;
use crate::control::Command;

/// Counts of reload outcomes, for the admin API and metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub applied: AtomicU64,
    pub failed: AtomicU64,
}

/// Applies the overrides given on the command line to every loaded config.
pub type Overrides = Arc<dyn Fn(&mut Config) + Send + Sync>;

/// Watches `path` until `commands` closes. Returns the watcher, which must
/// be kept alive.
pub fn watch(
    path: PathBuf,
    current: Config,
    overrides: Overrides,
    commands: mpsc::Sender<Command>,
    stats: Arc<ReloadStats>,
) -> notify::Result<RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = path.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event.kind.is_access() {
                return;
            }
            if event
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
            {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;

    tokio::spawn(async move {
        let mut current = current;
        while rx.recv().await.is_some() {
            // An editor's save is several events (truncate, write, rename):
            // take the ones already queued or arriving right behind.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while rx.try_recv().is_ok() {}
            let mut config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "config reload refused; the previous config keeps serving");
                    continue;
                }
            };
            overrides(&mut config);
            if config == current {
                continue;
            }
            let (reply, result) = oneshot::channel();
            if commands
                .send(Command::Config(Box::new(config.clone()), Some(reply)))
                .await
                .is_err()
            {
                return;
            }
            match result.await {
                Ok(Ok(())) => {
                    stats.applied.fetch_add(1, Ordering::Relaxed);
                    current = config;
                }
                _ => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    Ok(watcher)
}
