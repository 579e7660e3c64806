//! pointsman: a reverse proxy whose backends come from a service registry.
//!
//! The proxy process, layered so that each part imports only those below
//! it: [`engine`] (the data plane: table, balance, endpoints, HTTP and TCP
//! forwarding) <- [`control`] (the one writer and its inputs: config,
//! registries, health, local changes) <- [`ops`] (admin API, stats, metrics,
//! runtime API) <- [`process`] (wiring, listeners, takeover). The tools that
//! write the registry (`register`, `ctl`, `deploy`) live in the
//! `pointsman-deploy` crate. See ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod control;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod ops;
pub mod process;
