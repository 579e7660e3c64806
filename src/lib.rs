//! pointsman: a reverse proxy whose backends come from a service registry.
//!
//! The flow, one module per step: [`config`] -> [`control`] (the one
//! writer) -> [`routing`] (the published table) -> [`balance`] -> [`proxy`]
//! (HTTP and TCP engines), with live per-endpoint state in [`endpoint`] and
//! the operator's view in [`admin`]. See ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod endpoint;
pub mod health;
pub mod heartbeat;
pub mod listener;
pub mod local;
pub mod metrics;
pub mod proxy;
pub mod register;
pub mod registry;
pub mod reload;
pub mod rollout;
pub mod routing;
pub mod runtime;
pub mod takeover;
pub mod upstream;
