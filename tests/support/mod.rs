//! The harness every end-to-end test shares: the real `pointsman` binary
//! started on free loopback ports with a config in a temporary directory,
//! real `pointsman upstream` processes, small in-process servers for the
//! behaviours an echo upstream cannot show, and a few clients (reqwest, raw
//! sockets, HTTP/2 prior knowledge).
//!
//! Nothing here sleeps for a fixed time when a condition can be awaited:
//! every wait is [`wait_until`] or [`wait_for`] with a deadline, and a
//! failed wait panics with what was awaited and, for a proxy, its stderr.
//!
//! `use support::*` brings in the proxy, upstreams, configs, clients, raw
//! HTTP and waits; the registry tests name [`etcd`], [`registry`] and
//! [`sidekick`] themselves.
#![allow(dead_code, unused_imports)]

/// reqwest clients, answers judged by the echo upstream, h2c.
pub mod client;
/// The `web` config most tests write.
pub mod config;
/// A real etcd, `etcdctl` and proxies following etcd.
pub mod etcd;
/// Free ports, process memory, signals, the clock.
pub mod host;
/// The `pointsman` binary under test: `pointsman run` and one-shot commands.
pub mod proxy;
/// A raw upstream that records every byte and answers as scripted.
pub mod recorder;
/// A proxy's view of a registry's services: listener config, endpoints, waits.
pub mod registry;
/// `pointsman register` sidekicks, their apps and the load they drain under.
pub mod sidekick;
/// `pointsman upstream` processes and in-process servers.
pub mod upstream;
/// Polling a condition until a deadline.
pub mod wait;
/// Raw HTTP/1.1 over a socket.
pub mod wire;

pub use client::*;
pub use config::*;
pub use host::*;
pub use proxy::*;
pub use upstream::*;
pub use wait::*;
pub use wire::*;
