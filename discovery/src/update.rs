//! The stream a watcher produces: what changed, from which source, at which
//! registry revision.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Override, PauseSpec, Registration, RouteSpec};

/// Which registry an update came from. Entries from different sources are
/// kept apart, so a `Reset` from one never removes another's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    File,
    Etcd,
    Consul,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::File => "file",
            Source::Etcd => "etcd",
            Source::Consul => "consul",
        }
    }
}

/// One thing a registry knows about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    Instance(Registration),
    Route {
        name: String,
        spec: RouteSpec,
    },
    MapEntry {
        map: String,
        key: String,
        value: String,
    },
    Override {
        service: String,
        id: String,
        spec: Override,
    },
    Pause {
        service: String,
        spec: PauseSpec,
    },
    /// A service in maintenance on every proxy: `page` is the HTML its
    /// requests get with the 503 (empty: the service's 503 page).
    Maintenance {
        service: String,
        page: String,
    },
    /// The HTML body of the proxy's own `status` answers (502, 503 or 504)
    /// for `service`, over any `error_pages` file.
    Page {
        service: String,
        status: u16,
        page: String,
    },
}

/// The identity of an [`Entry`], for removals.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKey {
    Instance { service: String, id: String },
    Route { name: String },
    MapEntry { map: String, key: String },
    Override { service: String, id: String },
    Pause { service: String },
    Maintenance { service: String },
    Page { service: String, status: u16 },
}

impl Entry {
    pub fn key(&self) -> EntryKey {
        match self {
            Entry::Instance(r) => EntryKey::Instance {
                service: r.service.clone(),
                id: r.id.clone(),
            },
            Entry::Route { name, .. } => EntryKey::Route { name: name.clone() },
            Entry::MapEntry { map, key, .. } => EntryKey::MapEntry {
                map: map.clone(),
                key: key.clone(),
            },
            Entry::Pause { service, .. } => EntryKey::Pause {
                service: service.clone(),
            },
            Entry::Maintenance { service, .. } => EntryKey::Maintenance {
                service: service.clone(),
            },
            Entry::Page {
                service, status, ..
            } => EntryKey::Page {
                service: service.clone(),
                status: *status,
            },
            Entry::Override { service, id, .. } => EntryKey::Override {
                service: service.clone(),
                id: id.clone(),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for EntryKey {
    /// `instance web/a1`, `route blog`, `map colour/www.example.com`,
    /// `override web/a1`: short enough for a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryKey::Instance { service, id } => write!(f, "instance {service}/{id}"),
            EntryKey::Route { name } => write!(f, "route {name}"),
            EntryKey::MapEntry { map, key } => write!(f, "map {map}/{key}"),
            EntryKey::Override { service, id } => write!(f, "override {service}/{id}"),
            EntryKey::Pause { service } => write!(f, "pause of {service}"),
            EntryKey::Maintenance { service } => write!(f, "maintenance of {service}"),
            EntryKey::Page { service, status } => write!(f, "{status} page of {service}"),
        }
    }
}

/// A single change inside an [`Update`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// Most changes are upserts, so boxing the entry would allocate once more
// per change and save nothing; the few removals waste the bytes instead.
#[allow(clippy::large_enum_variant)]
pub enum Change {
    Upsert(Entry),
    Remove(EntryKey),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    /// Everything the source holds now; whatever it held before and is not
    /// listed is gone.
    Reset(Vec<Entry>),
    /// Changes that belong together (one etcd revision): applied as one.
    Changes(Vec<Change>),
}

/// What a watcher sends to the writer task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub source: Source,
    /// The registry revision this update brings the source to, if it has one.
    pub revision: Option<i64>,
    pub kind: UpdateKind,
}
