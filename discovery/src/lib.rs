//! pointsman-discovery: how backends become known.
//!
//! This crate holds the registration contract (the types every registry
//! source produces, their parsers, and `SCHEMA.md`) and the watchers that
//! turn a registry into a stream of [`Update`]s for the proxy's one writer
//! task. Data flows one way: registry -> watcher -> `Update` -> routing table.
//!
//! - [`keys`]: the etcd key names, for writers and the parser alike.
//! - [`parse`]: one key and value -> [`Entry`], for every source.
//! - [`etcd`]: the fleet-wide registry, listed at one revision then watched.
//! - [`consul`]: Consul's catalog and health, followed with blocking
//!   queries; and the agent registrar.
//! - [`mod@file`]: a directory of registration files, for a single proxy.
//! - [`check`]: how an active check judges an endpoint (pass rule,
//!   rise/fall), for the proxy and `pointsman register` alike.
//! - [`status`]: how each watcher is doing, for the admin API.
//! - [`persist`]: the last good view on disk, so a restarted proxy can serve
//!   while its registry is away.
//! - [`lease`]: a key kept alive under an etcd lease, for the writers (the
//!   proxy's own record, `pointsman_deploy`'s registrar).
//! - [`admin_api`]: the proxy admin API's JSON, for the proxy and for the
//!   tools that read it.
//! - [`http`]: the HTTP/1.1 client of the tools that ask proxies and apps.
#![forbid(unsafe_code)]

pub mod address;
pub mod admin_api;
pub mod backoff;
pub mod check;
pub mod conn;
pub mod consul;
pub mod error;
pub mod etcd;
pub mod etcd2;
pub mod excerpt;
pub mod file;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod keys;
pub mod lease;
pub mod parse;
pub mod persist;
pub mod registration;
pub mod route;
pub mod status;
pub mod update;

pub use address::{host_name, Address, AddressError};
pub use admin_api::ProxyRecord;
pub use conn::EtcdError;
pub use consul::ConsulOptions;
pub use error::DiscoveryError;
pub use etcd::{EtcdApi, EtcdOptions, EtcdTls};
pub use file::watch_dir;
pub use lease::{LeaseState, LeasedKey};
pub use parse::{flat_service, parse_entry, parse_instance, parse_key, ParseError, Prefixes};
pub use persist::{load_state, save_state, state_path, PersistError, SavedState};
pub use registration::{AdminState, CheckSpec, Override, PauseSpec, Registration};
pub use route::{MapKey, RouteSpec, RouteTarget, SplitSpec};
pub use status::{SourceStatus, SourceStatusSnapshot};
pub use update::{Change, Entry, EntryKey, Source, Update, UpdateKind};
