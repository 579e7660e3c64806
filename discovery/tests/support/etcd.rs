//! The throwaway etcd of `pointsman-testkit`, under the name `fleet.rs` and
//! `registrar.rs` include (`#[path = "support/etcd.rs"]`) until they move to
//! deploy/tests and use `pointsman_testkit::etcd` directly; then this file
//! goes.

pub use pointsman_testkit::etcd::EtcdServer;
