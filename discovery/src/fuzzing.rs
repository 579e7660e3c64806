//! Fuzz harnesses for the registry parsers: each takes arbitrary bytes,
//! runs them through the same functions the watchers use, and panics only
//! when an invariant breaks. `fuzz/` runs them under libFuzzer (`make
//! fuzz`); `tests/fuzz_corpus.rs` replays every corpus file and every
//! crash found through them on the stable toolchain (`make test`).
//!
//! Not an API: the input layouts are described on each function.

use std::collections::BTreeMap;

use crate::consul::view::{decode_catalog, decode_health, derive, diff, ServiceEntries};
use crate::consul::DEFAULT_TAG_PREFIX;
use crate::{keys, parse_entry, parse_key, Address, Change, Entry, Prefixes};

/// The prefix layouts every entry is parsed under: the default roots, and
/// one root nested inside the other (the longer one wins).
fn layouts() -> [Prefixes; 2] {
    [
        Prefixes::default(),
        Prefixes {
            services: "/stage".into(),
            pointsman: "/stage/pointsman/".into(),
            ..Prefixes::default()
        },
    ]
}

/// One registry key and its value: `<key>\n<value>` (the value is the
/// rest, any bytes). Checks, under each prefix layout:
/// - parsing never panics, and an error names the key it is about;
/// - an entry's key is built back exactly by [`keys::entry_key`] and read
///   back by [`parse_key`] (writers and the parser agree);
/// - an entry's value, written back in `SCHEMA.md`'s form, parses to the
///   same entry.
pub fn registry_entry(data: &[u8]) {
    let (key, value) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    for p in layouts() {
        let entry = match parse_entry(&p, key, value) {
            Ok(Some(entry)) => entry,
            Ok(None) => continue,
            Err(e) => {
                assert_eq!(e.key(), key, "an error names its key: {e}");
                assert!(!e.to_string().is_empty());
                continue;
            }
        };
        let entry_key = entry.key();
        assert_eq!(keys::entry_key(&p, &entry_key), key, "key built back");
        assert_eq!(parse_key(&p, key), Some(entry_key), "key read back");
        let again = parse_entry(&p, key, schema_value(&entry).as_bytes());
        assert_eq!(again, Ok(Some(entry)), "value written back and read again");
    }
}

/// An entry's value as `SCHEMA.md` spells it (and `pointsman register`,
/// `ctl` and the rollouts write it).
fn schema_value(entry: &Entry) -> String {
    let json = |v: serde_json::Value| v.to_string();
    match entry {
        Entry::Instance(r) => {
            let mut v = serde_json::json!({
                "address": r.address,
                "weight": r.weight,
                "state": r.state,
                "tags": r.tags,
                "meta": r.meta,
            });
            if let Some(check) = &r.check {
                v["check"] = serde_json::json!(check);
            }
            json(v)
        }
        Entry::Route { spec, .. } => json(serde_json::json!(spec)),
        Entry::MapEntry { value, .. } => value.clone(),
        Entry::Override { spec, .. } => json(serde_json::json!(spec)),
        Entry::Pause { spec, .. } => json(serde_json::json!(spec)),
        Entry::Maintenance { page, .. } | Entry::Page { page, .. } => page.clone(),
    }
}

/// Consul's answers: a `/v1/catalog/services` body, then one
/// `/v1/health/service/<name>` body per catalog name in name order, each
/// on the lines after a line `---` (which no JSON text contains). A name
/// without a body of its own gets `[]`. Checks:
/// - decoding and deriving never panic, with and without a last good view;
/// - every derived instance is routable as announced: its address reads
///   back to itself, its weight is in range;
/// - every derived route is one the routing table accepts;
/// - the changes between two views turn the first into the second.
pub fn consul_answers(data: &[u8]) {
    let mut parts = split_parts(data);
    let Some(catalog) = parts.next() else {
        return;
    };
    let Ok(names) = decode_catalog(catalog) else {
        return;
    };
    let mut services: BTreeMap<String, ServiceEntries> = BTreeMap::new();
    for name in names {
        let body = parts.next().unwrap_or(b"[]");
        if let Ok(entries) = decode_health(body) {
            services.insert(name, entries);
        }
    }
    let first = derive(&services, DEFAULT_TAG_PREFIX, &BTreeMap::new());
    for (key, entry) in &first.entries {
        assert_eq!(&entry.key(), key, "an entry is filed under its own key");
        match entry {
            Entry::Instance(r) => {
                let shown = r.address.to_string();
                assert_eq!(shown.parse::<Address>().as_ref(), Ok(&r.address), "{shown}");
                assert!(r.weight <= crate::registration::MAX_WEIGHT);
            }
            Entry::Route { name, spec } => {
                assert!(spec.target().is_ok(), "route {name} is accepted: {spec:?}");
            }
            Entry::MapEntry { .. }
            | Entry::Override { .. }
            | Entry::Pause { .. }
            | Entry::Maintenance { .. }
            | Entry::Page { .. } => {
                panic!("Consul derives only instances and routes: {entry:?}")
            }
        }
    }
    // The same answers again, holding the first view as the last good one,
    // and then with every other service gone.
    let second = derive(&services, DEFAULT_TAG_PREFIX, &first.entries);
    let fewer: BTreeMap<String, ServiceEntries> = services.into_iter().step_by(2).collect();
    let third = derive(&fewer, DEFAULT_TAG_PREFIX, &second.entries);
    for (old, new) in [(&first, &second), (&second, &third)] {
        let mut applied = old.entries.clone();
        for change in diff(&old.entries, &new.entries) {
            match change {
                Change::Remove(key) => {
                    assert!(applied.remove(&key).is_some(), "removes what is there");
                }
                Change::Upsert(entry) => {
                    applied.insert(entry.key(), entry);
                }
            }
        }
        assert_eq!(
            applied, new.entries,
            "the changes turn one view into the next"
        );
    }
}

/// The bodies of a multi-part input, split at lines `---`.
fn split_parts(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    const SEP: &[u8] = b"\n---\n";
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                rest = Some(&r[i + SEP.len()..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}
