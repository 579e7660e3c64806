//! Every fuzz input kept in the repository replays here, on the stable
//! toolchain: the seeds and the crashes found so far (`fuzz/corpus/<target>/`,
//! crashes renamed `crash-*` once fixed), and any new crash `make fuzz` has
//! left in `fuzz/artifacts/<target>/`. Each goes through the same harness
//! the fuzz target runs, so a crash found once stays fixed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The inputs of one target: its corpus and its new crashes, by name.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let Ok(listing) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in listing.flatten() {
            let path = entry.path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs every input of `target` through `harness`; fails naming each
/// input that panicked.
fn replay(target: &str, harness: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("/corpus/")),
        "fuzz/corpus/{target}/ holds no input: its seeds are missing"
    );
    let mut failed = Vec::new();
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| harness(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs of {target} fail (the panics are above; reproduce one with \
         `cargo +nightly fuzz run {target} <file>` in fuzz/):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn registry_entries_replay() {
    replay(
        "registry_entry",
        pointsman_discovery::fuzzing::registry_entry,
    );
}

#[test]
fn consul_answers_replay() {
    replay(
        "consul_answers",
        pointsman_discovery::fuzzing::consul_answers,
    );
}

#[test]
fn config_files_replay() {
    replay("config_file", pointsman::fuzzing::config_file);
}

#[test]
fn runtime_lines_replay() {
    replay("runtime_line", pointsman::fuzzing::runtime_line);
}

#[test]
fn takeover_messages_replay() {
    replay(
        "takeover_wire",
        pointsman::process::takeover::fuzzing::takeover_wire,
    );
}

#[test]
fn request_paths_replay() {
    replay("request_path", pointsman::fuzzing::request_path);
}

#[test]
fn request_heads_replay() {
    replay("request_head", pointsman::fuzzing::request_head);
}

/// The smuggling bound counts what could be a request, generously.
#[test]
fn heads_are_counted_by_their_ends() {
    use pointsman::fuzzing::heads_in;
    assert_eq!(heads_in(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 1);
    assert_eq!(
        heads_in(b"GET / HTTP/1.1\nHost: a\n\nGET / HTTP/1.1\r\n\r\n"),
        2
    );
    assert_eq!(heads_in(b"GET / HTTP/1.1\r\nHost: a\r\n"), 0);
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut h2 = preface.to_vec();
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
    h2.extend_from_slice(&[0, 0, 1, 1, 5, 0, 0, 0, 1, 0x82]); // HEADERS
    assert_eq!(heads_in(&h2), 1);
}

/// The request-head harness reaches its upstream: a plain request, and
/// each of a pipelined three, arrive once.
#[test]
fn the_recording_upstream_sees_what_the_proxy_forwards() {
    use pointsman::fuzzing::forwarded;
    assert_eq!(forwarded(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 1);
    let three = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\n\
        Content-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_eq!(forwarded(three), 3);
    assert_eq!(
        forwarded(b"GET / HTTP/1.1\r\nHost: a\r\n"),
        0,
        "an incomplete head"
    );
}
