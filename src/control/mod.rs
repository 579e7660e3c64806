//! Step 2 of the flow: the one writer and everything that feeds it. The
//! config file ([`config`], watched by [`reload`]), the registries
//! ([`registry`]), active health checks ([`health`]) and changes made on
//! this proxy ([`local`]) all arrive at [`writer::Control`] as
//! [`Command`]s; it applies them in batches and publishes one immutable
//! routing table per batch. Imports `engine` only.

pub mod config;
pub mod health;
pub mod import;
pub mod local;
pub mod registry;
pub mod reload;
pub mod writer;

pub use writer::{Command, Control, ControlHandle, ListenerControl, DEFAULT_ENDPOINT_DRAIN};
