//! Fail static across restarts: the last good view of a source, on disk.
//!
//! When the registry is unreachable a running proxy keeps its last table;
//! this module lets a *restarted* proxy do the same. After applying an
//! update the proxy saves the source's entries with [`save_state`]; at start
//! it loads them with [`load_state`] and serves them until the watcher's
//! first `Reset` replaces them.
//!
//! One JSON file per source (`<dir>/<source>.state.json`), replaced
//! atomically: written to a temporary file, flushed to disk, renamed over
//! the old one, and the directory flushed, so a crash leaves either the old
//! or the new file, never half of one. These functions block; call them
//! from `spawn_blocking` on an async runtime.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Entry, Source};

/// Bumped when the document changes incompatibly.
const FORMAT_VERSION: u32 = 1;

/// The saved state of one source.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    source: Source,
    revision: Option<i64>,
    saved_unix_ms: u64,
    entries: Vec<Entry>,
}

/// Why state could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("state {path}: cannot {action}: {source}: check that the state directory exists and is writable")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("state {path} is corrupt ({reason}): delete it; it is rebuilt from the registry on the next sync")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state {path} was written by an incompatible version (format {found}, expected {FORMAT_VERSION}): delete it; it is rebuilt from the registry on the next sync")]
    Version { path: PathBuf, found: u32 },
    #[error(
        "state {path} holds source {found}, not {expected}: delete it or fix the state directory"
    )]
    WrongSource {
        path: PathBuf,
        found: Source,
        expected: Source,
    },
    #[error("state {path}: cannot encode: {reason}")]
    Encode { path: PathBuf, reason: String },
}

/// What [`load_state`] returns: the registry revision the entries reflect
/// (if the source has revisions) and the entries.
pub type SavedState = (Option<i64>, Vec<Entry>);

/// The file a source's state lives in.
pub fn state_path(dir: &Path, source: Source) -> PathBuf {
    dir.join(format!("{}.state.json", source.as_str()))
}

/// Saves `entries` (and the registry `revision` they reflect) as the last
/// good state of `source`, replacing the previous one atomically. Creates
/// `dir` if needed.
pub fn save_state(
    dir: &Path,
    source: Source,
    revision: Option<i64>,
    entries: &[Entry],
) -> Result<(), PersistError> {
    let path = state_path(dir, source);
    let io = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| PersistError::Io {
            path: p,
            action,
            source,
        }
    };
    fs::create_dir_all(dir).map_err(io("create its directory", dir))?;
    let doc = StateFile {
        version: FORMAT_VERSION,
        source,
        revision,
        saved_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        entries: entries.to_vec(),
    };
    let bytes = serde_json::to_vec(&doc).map_err(|e| PersistError::Encode {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // A name per process, so two proxies sharing a directory by mistake do
    // not interleave writes into one temporary file.
    let tmp = dir.join(format!(
        ".{}.state.json.{}.tmp",
        source.as_str(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io("write a temporary file", &tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(io("replace", &path)(e));
    }
    // The rename is durable only once the directory is on disk too.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("flush its directory", dir))?;
    Ok(())
}

/// Loads the last saved state of `source`: `Ok(None)` if none was saved,
/// otherwise the revision it reflects and its entries.
pub fn load_state(dir: &Path, source: Source) -> Result<Option<SavedState>, PersistError> {
    let path = state_path(dir, source);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PersistError::Io {
                path,
                action: "read",
                source,
            })
        }
    };
    // Look at the version first, so an old or future format says so rather
    // than failing on some field.
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let version: Version = serde_json::from_slice(&bytes).map_err(|e| PersistError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if version.version != FORMAT_VERSION {
        return Err(PersistError::Version {
            path,
            found: version.version,
        });
    }
    let doc: StateFile = serde_json::from_slice(&bytes).map_err(|e| PersistError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if doc.source != source {
        return Err(PersistError::WrongSource {
            path,
            found: doc.source,
            expected: source,
        });
    }
    Ok(Some((doc.revision, doc.entries)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Address, AdminState, Override, Registration, RouteSpec};

    fn entries() -> Vec<Entry> {
        let mut r = Registration::new("web", "a1", Address::new("10.0.0.5", 8080));
        r.weight = 7;
        r.tags = vec!["green".into()];
        r.check = serde_json::from_str(r#"{"http":"/healthz","interval":"3s"}"#).ok();
        vec![
            Entry::Instance(r),
            Entry::Route {
                name: "blog".into(),
                spec: RouteSpec {
                    path_prefix: "/blog".into(),
                    service: Some("blog".into()),
                    ..RouteSpec::default()
                },
            },
            Entry::MapEntry {
                map: "colour".into(),
                key: "example.com".into(),
                value: "green".into(),
            },
            Entry::Override {
                service: "web".into(),
                id: "a1".into(),
                spec: Override {
                    state: Some(AdminState::Drain),
                    weight: None,
                },
            },
        ]
    }

    #[test]
    fn round_trips_and_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        assert!(load_state(&state, Source::Etcd).expect("load").is_none());

        save_state(&state, Source::Etcd, Some(41), &entries()).expect("save");
        save_state(&state, Source::Etcd, Some(42), &entries()).expect("save again");
        let (rev, loaded) = load_state(&state, Source::Etcd)
            .expect("load")
            .expect("present");
        assert_eq!(rev, Some(42));
        assert_eq!(loaded, entries());
        // Sources are kept apart, and no temporary file is left behind.
        assert!(load_state(&state, Source::File).expect("load").is_none());
        let names: Vec<_> = fs::read_dir(&state)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("etcd.state.json")]);
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = state_path(dir.path(), Source::Etcd);

        fs::write(&path, b"{\"version\":1,\"source\":\"etcd\",\"revis").expect("write");
        let err = load_state(dir.path(), Source::Etcd).expect_err("truncated");
        assert!(matches!(err, PersistError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("delete it"), "{err}");

        fs::write(&path, b"\x00\x01binary").expect("write");
        assert!(matches!(
            load_state(dir.path(), Source::Etcd),
            Err(PersistError::Corrupt { .. })
        ));

        fs::write(&path, br#"{"version":99}"#).expect("write");
        assert!(matches!(
            load_state(dir.path(), Source::Etcd),
            Err(PersistError::Version { found: 99, .. })
        ));

        save_state(dir.path(), Source::File, None, &[]).expect("save");
        fs::copy(state_path(dir.path(), Source::File), &path).expect("cp");
        assert!(matches!(
            load_state(dir.path(), Source::Etcd),
            Err(PersistError::WrongSource { .. })
        ));
    }
}
