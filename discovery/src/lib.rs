//! pointsman-discovery: how backends become known.
//!
//! This crate holds the registration contract (the types every registry
//! source produces, their parsers, and `SCHEMA.md`) and the watchers that
//! turn a registry into a stream of [`Update`]s for the proxy's one writer
//! task. Data flows one way: registry -> watcher -> `Update` -> routing table.
#![forbid(unsafe_code)]

pub mod address;
pub mod registration;
pub mod route;
pub mod update;

pub use address::{Address, AddressError};
pub use registration::{AdminState, CheckSpec, Override, Registration};
pub use route::{RouteSpec, RouteTarget, SplitSpec};
pub use update::{Change, Entry, EntryKey, Source, Update, UpdateKind};
