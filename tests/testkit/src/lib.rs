//! The servers pointsman's tests run against, shared by every crate's tests
//! as a dev-dependency: [`consul::ConsulDouble`], the one double of a real
//! server in the tests, and [`etcd::EtcdServer`], a real etcd started for
//! one test. A test starts one, points the code under test at its URL, and
//! drops it at the end.
#![forbid(unsafe_code)]

pub mod consul;
pub mod etcd;
