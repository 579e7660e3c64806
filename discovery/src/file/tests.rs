use std::fs;

use tokio::sync::mpsc::Receiver;
use tokio::task::JoinHandle;

use super::*;
use crate::Address;

const DEADLINE: Duration = Duration::from_secs(10);

struct Fixture {
    dir: tempfile::TempDir,
    rx: Receiver<Update>,
    status: Arc<SourceStatus>,
    task: JoinHandle<Result<(), DiscoveryError>>,
}

impl Fixture {
    /// Writes `files` (relative path, content), starts the watcher and
    /// returns the entries of its first `Reset`.
    /// Batches with a 100 ms gap rather than the production 20 ms, so an
    /// in-place write (truncate, then write) on a loaded machine is never
    /// read half-done and counted as malformed.
    async fn start(files: &[(&str, &str)]) -> (Fixture, Vec<Entry>) {
        Fixture::start_batching(files, Duration::from_millis(100)).await
    }

    async fn start_batching(files: &[(&str, &str)], quiet: Duration) -> (Fixture, Vec<Entry>) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (rel, content) in files {
            write(dir.path(), rel, content);
        }
        let (tx, mut rx) = mpsc::channel(16);
        let status = Arc::new(SourceStatus::new(Source::File));
        let task = tokio::spawn(watch_dir_batching(
            dir.path().to_path_buf(),
            tx,
            status.clone(),
            quiet,
        ));
        let first = next(&mut rx).await;
        assert_eq!(first.source, Source::File);
        assert_eq!(first.revision, None);
        let UpdateKind::Reset(entries) = first.kind else {
            panic!("first update is not a Reset: {first:?}")
        };
        assert!(status.has_synced() && status.is_connected());
        (
            Fixture {
                dir,
                rx,
                status,
                task,
            },
            entries,
        )
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    async fn changes(&mut self) -> Vec<Change> {
        let u = next(&mut self.rx).await;
        match u.kind {
            UpdateKind::Changes(c) => c,
            other => panic!("expected Changes, got {other:?}"),
        }
    }

    async fn wait_malformed(&self, n: u64) {
        let start = Instant::now();
        while self.status.malformed() < n {
            assert!(
                start.elapsed() < DEADLINE,
                "malformed count stayed at {} (want {n})",
                self.status.malformed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn write(dir: &Path, rel: &str, content: &str) {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(&path, content).expect("write");
}

async fn next(rx: &mut Receiver<Update>) -> Update {
    match tokio::time::timeout(DEADLINE, rx.recv()).await {
        Ok(Some(u)) => u,
        Ok(None) => panic!("watcher ended"),
        Err(_) => panic!("no update within {DEADLINE:?}"),
    }
}

fn instance(service: &str, id: &str, host: &str, port: u16) -> Entry {
    Entry::Instance(Registration::new(service, id, Address::new(host, port)))
}

fn upsert(service: &str, id: &str, host: &str, port: u16) -> Change {
    Change::Upsert(instance(service, id, host, port))
}

fn remove(service: &str, id: &str) -> Change {
    Change::Remove(EntryKey::Instance {
        service: service.into(),
        id: id.into(),
    })
}

fn sorted(mut entries: Vec<Entry>) -> Vec<Entry> {
    entries.sort_by_key(Entry::key);
    entries
}

#[tokio::test]
async fn initial_listing_ignores_temp_files_and_reads_both_forms() {
    let (fx, entries) = Fixture::start(&[
        ("web/a1", "127.0.0.1:8081\n"),
        ("web/a2", r#"{"address":"127.0.0.1:8082","weight":5}"#),
        ("web/.a3.swp", "junk"),
        ("web/a4~", "junk"),
        ("web/a5.tmp", "junk"),
        ("web/a6.swp", "junk"),
        (".git/config", "junk"),
        ("api/b1", "10.0.0.1:80"),
    ])
    .await;
    let mut a2 = Registration::new("web", "a2", Address::new("127.0.0.1", 8082));
    a2.weight = 5;
    assert_eq!(
        sorted(entries),
        vec![
            instance("api", "b1", "10.0.0.1", 80),
            instance("web", "a1", "127.0.0.1", 8081),
            Entry::Instance(a2),
        ]
    );
    assert_eq!(fx.status.malformed(), 0);
}

#[tokio::test]
async fn add_edit_delete() {
    // The production batching.
    let (mut fx, entries) = Fixture::start_batching(&[("web/a1", "127.0.0.1:8081")], QUIET).await;
    assert_eq!(entries.len(), 1);

    write(fx.dir.path(), "web/a2", "127.0.0.1:8082");
    assert_eq!(
        fx.changes().await,
        vec![upsert("web", "a2", "127.0.0.1", 8082)]
    );

    write(fx.dir.path(), "web/a2", "127.0.0.1:9092");
    assert_eq!(
        fx.changes().await,
        vec![upsert("web", "a2", "127.0.0.1", 9092)]
    );

    fs::remove_file(fx.path("web/a2")).expect("rm");
    assert_eq!(fx.changes().await, vec![remove("web", "a2")]);

    // A new service directory with files in it.
    write(fx.dir.path(), "api/b1", "10.0.0.1:80");
    assert_eq!(
        fx.changes().await,
        vec![upsert("api", "b1", "10.0.0.1", 80)]
    );

    // Removing a whole service directory removes its instances.
    fs::remove_dir_all(fx.path("api")).expect("rm -r");
    assert_eq!(fx.changes().await, vec![remove("api", "b1")]);
}

#[tokio::test]
async fn malformed_file_keeps_last_good_and_is_counted_once() {
    let (mut fx, _) = Fixture::start(&[("web/a1", "127.0.0.1:8081")]).await;

    write(
        fx.dir.path(),
        "web/a1",
        r#"{"address":"127.0.0.1:8081","wieght":2}"#,
    );
    fx.wait_malformed(1).await;
    assert!(fx
        .status
        .last_error()
        .is_some_and(|e| e.contains("web/a1") && e.contains("unknown field `wieght`")));

    // Nothing was sent for a1: the next update is about a2 only.
    write(fx.dir.path(), "web/a2", "127.0.0.1:8082");
    assert_eq!(
        fx.changes().await,
        vec![upsert("web", "a2", "127.0.0.1", 8082)]
    );
    assert_eq!(fx.status.malformed(), 1);

    // A brand-new malformed file is skipped too.
    write(fx.dir.path(), "web/a3", "no-port");
    fx.wait_malformed(2).await;

    // Fixing it brings the new value.
    write(fx.dir.path(), "web/a1", r#"{"address":"127.0.0.1:8091"}"#);
    assert_eq!(
        fx.changes().await,
        vec![upsert("web", "a1", "127.0.0.1", 8091)]
    );

    // Deleting a file that was malformed all along sends nothing; deleting
    // one with a good registration removes it.
    fs::remove_file(fx.path("web/a3")).expect("rm");
    fs::remove_file(fx.path("web/a2")).expect("rm");
    assert_eq!(fx.changes().await, vec![remove("web", "a2")]);
}

#[tokio::test]
async fn misplaced_files_are_malformed() {
    let (fx, entries) = Fixture::start(&[("web", "127.0.0.1:1"), ("a/b/c", "127.0.0.1:2")]).await;
    assert!(entries.is_empty());
    assert_eq!(fx.status.malformed(), 2);
}

#[tokio::test]
async fn rename_over_is_one_upsert_without_removal() {
    // The production gap is 20 ms; a wider one keeps this test independent
    // of scheduling delays on a loaded machine.
    let (mut fx, _) =
        Fixture::start_batching(&[("web/a1", "127.0.0.1:8081")], Duration::from_millis(300)).await;

    // Atomic save: write a temp file, rename it over the original.
    write(fx.dir.path(), "web/.a1.tmp", "127.0.0.1:8082");
    fs::rename(fx.path("web/.a1.tmp"), fx.path("web/a1")).expect("rename");
    assert_eq!(
        fx.changes().await,
        vec![upsert("web", "a1", "127.0.0.1", 8082)]
    );

    // Vim with backups: move the original away, write a new file.
    fs::rename(fx.path("web/a1"), fx.path("web/a1~")).expect("rename");
    write(fx.dir.path(), "web/a1", "127.0.0.1:8083");
    fs::remove_file(fx.path("web/a1~")).expect("rm backup");
    assert_eq!(
        fx.changes().await,
        vec![upsert("web", "a1", "127.0.0.1", 8083)]
    );

    // Renaming a registration to another id moves it.
    fs::rename(fx.path("web/a1"), fx.path("web/a9")).expect("rename");
    let mut changes = fx.changes().await;
    changes.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        changes,
        vec![remove("web", "a1"), upsert("web", "a9", "127.0.0.1", 8083)]
    );
}

#[tokio::test]
async fn replaced_directory_is_listed_again() {
    let (mut fx, _) = Fixture::start(&[("web/a1", "127.0.0.1:8081")]).await;
    let parent = tempfile::tempdir().expect("tempdir");
    write(parent.path(), "next/web/b1", "127.0.0.1:8082");
    write(parent.path(), "next/web/b2", "bad");
    // Swap the whole directory, as a deploy tool would.
    fs::rename(fx.dir.path(), parent.path().join("old")).expect("mv dir old");
    fs::rename(parent.path().join("next"), fx.dir.path()).expect("mv next dir");
    let u = next(&mut fx.rx).await;
    assert_eq!(
        u.kind,
        UpdateKind::Reset(vec![instance("web", "b1", "127.0.0.1", 8082)])
    );
    assert_eq!(fx.status.resets(), 2);
    assert_eq!(fx.status.malformed(), 1);
}

#[tokio::test]
async fn vanished_directory_keeps_the_last_registrations() {
    let (mut fx, _) = Fixture::start(&[("web/a1", "127.0.0.1:8081")]).await;
    fs::remove_dir_all(fx.dir.path()).expect("rm -r dir");
    let start = Instant::now();
    while fx.status.is_connected() {
        assert!(start.elapsed() < DEADLINE, "still connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(fx
        .status
        .last_error()
        .is_some_and(|e| e.contains("directory is gone")));
    // Nothing was removed: the next update is the listing once it is back
    // (moved into place whole, so the listing cannot catch it half-made).
    let parent = tempfile::tempdir().expect("tempdir");
    write(parent.path(), "next/web/a2", "127.0.0.1:8082");
    fs::rename(parent.path().join("next"), fx.dir.path()).expect("mv next dir");
    let u = next(&mut fx.rx).await;
    assert_eq!(
        u.kind,
        UpdateKind::Reset(vec![instance("web", "a2", "127.0.0.1", 8082)])
    );
    assert!(fx.status.is_connected());
}

#[tokio::test]
async fn ends_when_the_receiver_is_dropped() {
    let (fx, _) = Fixture::start(&[]).await;
    let Fixture { rx, task, dir, .. } = fx;
    drop(rx);
    let res = tokio::time::timeout(DEADLINE, task)
        .await
        .expect("watcher did not stop")
        .expect("watcher panicked");
    assert!(res.is_ok(), "{res:?}");
    drop(dir);
}

#[tokio::test]
async fn missing_directory_is_an_error_that_says_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, _rx) = mpsc::channel(1);
    let status = Arc::new(SourceStatus::new(Source::File));
    let missing = dir.path().join("nope");
    let err = watch_dir(missing.clone(), tx.clone(), status.clone())
        .await
        .expect_err("must fail");
    assert!(matches!(err, DiscoveryError::DirMissing { .. }), "{err}");
    assert!(err.to_string().contains("create it"), "{err}");

    let file = dir.path().join("f");
    fs::write(&file, "x").expect("write");
    let err = watch_dir(file, tx, status).await.expect_err("must fail");
    assert!(matches!(err, DiscoveryError::NotADir { .. }), "{err}");
}
