//! The servers pointsman's tests run against, shared by every crate's tests
//! as a dev-dependency: [`consul::ConsulDouble`], the one double of a real
//! server in the tests, [`etcd::EtcdServer`], a real etcd started for
//! one test, and [`relay::CutRelay`], a TCP relay a test can cut to take a
//! client off its server. A test starts one, points the code under test at its URL, and
//! drops it at the end.
#![forbid(unsafe_code)]

pub mod consul;
pub mod etcd;
pub mod relay;
