//! The operator's surfaces on one proxy: the admin HTTP API and stats page
//! ([`admin`]), Prometheus metrics ([`metrics`]) and the HAProxy-compatible
//! runtime API ([`runtime`]). They read the published table and send
//! changes to the one writer; they import `control` and `engine`, and
//! nothing imports them but `process`.

pub mod admin;
pub mod haproxy_metrics;
pub mod metrics;
pub mod runtime;
