//! One proxy process: wiring the steps together ([`app`]), the client
//! listeners ([`listener`]), the proxy's leased record in etcd
//! ([`heartbeat`]), hitless restarts ([`takeover`]), and the small echo
//! upstream of `pointsman upstream` and the demo ([`upstream`]).

pub mod app;
pub mod heartbeat;
pub mod listener;
pub mod takeover;
pub mod upstream;
