//! The admin API's JSON, defined once for the proxy that writes it and for
//! every tool that reads it (`pointsman register`, `ctl`, rollouts, the
//! fleet client).
//!
//! A drain, a rollout step or a canary verdict is decided from these
//! fields, so a reader never fills a missing one in: a renamed `in_flight`
//! on the proxy must fail the read, naming the field, instead of making
//! every proxy look drained. Fields only shown to people may be absent
//! from answers written by older proxies; none that a decision reads can
//! be.
//!
//! - `GET /api/services`, `GET /api/services/<name>`: [`ServiceView`];
//! - `GET /api/discovery`: [`SourceView`] per followed registry;
//! - `<pointsman>/proxies/<id>` in etcd: [`ProxyRecord`], how the tools
//!   find each proxy's admin API.
//!
//! [`ProxyView`] is the part of one proxy's answers that the fleet's
//! judgements read.

use serde::{Deserialize, Deserializer, Serialize};

use crate::{AdminState, Source, SourceStatusSnapshot};

/// A service in `/api/services`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    /// The balancing algorithm's name.
    pub balance: String,
    /// Retries made for the service's requests, since start.
    pub retries: u64,
    /// Passive-check ejections of its endpoints, since start.
    pub ejections: u64,
    /// Responses and their total time to the response head, since start
    /// (mean latency = sum / count; canaries compare these).
    pub latency_count: u64,
    pub latency_sum_seconds: f64,
    pub endpoints: Vec<EndpointView>,
}

/// An endpoint in `/api/services`: the registry's view of it and its live
/// counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub id: String,
    pub address: String,
    /// The registry's weight, before local changes.
    pub initial_weight: u32,
    /// Takes new requests now (ready, healthy, not ejected, weight > 0).
    pub accepting: bool,
    pub state: AdminState,
    /// The weight in effect, local changes included.
    pub weight: u32,
    pub healthy: bool,
    pub in_flight: u64,
    pub requests: u64,
    /// Responses by status class, 1xx to 5xx.
    pub responses: [u64; 5],
    /// Requests that got no answer from the endpoint.
    pub failures: u64,
    /// Unix seconds of the last state change.
    pub last_change: u64,
    /// Ejected by passive checks right now.
    pub ejected: bool,
    pub ejections: u32,
    /// The last active check, if the endpoint has checks.
    pub check: Option<CheckView>,
    /// Idle upstream keep-alive connections.
    pub idle_connections: u64,
    /// Held in drain on a tool's notice until this proxy has applied this
    /// etcd revision (`POST /api/drains`); `null` when none is in force.
    /// Absent from older proxies' answers, which then read as no notice:
    /// the safe side, since a drain is confirmed only with one.
    #[serde(default)]
    pub drain_notice: Option<i64>,
    /// The state, and the weight, come from a change made on this proxy
    /// (runtime or admin API), which wins over the registries until it is
    /// cleared (`DELETE /api/services/<s>/endpoints/<id>`).
    #[serde(default)]
    pub local_state: bool,
    #[serde(default)]
    pub local_weight: bool,
}

/// The last active check of an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    pub passed: bool,
    /// The HTTP status seen (0 for TCP checks and failures to connect).
    pub status: u16,
    /// Unix seconds.
    pub at: u64,
}

/// A followed registry in `/api/discovery`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceView {
    #[serde(flatten)]
    pub status: SourceStatusSnapshot,
    /// What is served came from saved state and no sync happened since.
    pub serving_saved_state: bool,
}

/// What a proxy writes about itself under `<pointsman>/proxies/<id>`
/// (see [`crate::keys::proxy_key`]), leased so that it vanishes with its
/// proxy. Only `admin` is acted on: what a proxy has applied is asked of
/// its admin API, never taken from this record, so the record's other
/// fields may be absent (older proxies, hand-written records).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRecord {
    /// The proxy's id (`--proxy-id`), also the last segment of its key.
    pub id: String,
    /// `host:port` of its admin API, as others reach it.
    pub admin: String,
    /// The etcd revision its routing table holds; `None` before the first
    /// sync. Shown by `ctl status`.
    #[serde(default)]
    pub applied_revision: Option<i64>,
    #[serde(default)]
    pub pid: u32,
    /// When it started, in seconds since the Unix epoch.
    #[serde(default)]
    pub started: u64,
}

/// What one proxy's admin API says, the parts the fleet judges.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyView {
    /// Whether the proxy follows etcd at all.
    pub follows_etcd: bool,
    /// The etcd revision it has applied.
    pub applied_revision: Option<i64>,
    pub services: Vec<ServiceView>,
}

impl ProxyView {
    /// The view from one proxy's `/api/discovery` and `/api/services`.
    pub fn new(sources: &[SourceView], services: Vec<ServiceView>) -> ProxyView {
        let etcd = sources.iter().find(|s| s.status.source == Source::Etcd);
        ProxyView {
            follows_etcd: etcd.is_some(),
            applied_revision: etcd.and_then(|s| s.status.applied_revision),
            services,
        }
    }

    /// The endpoint `id` of `service`, if the proxy has it.
    pub fn endpoint(&self, service: &str, id: &str) -> Option<&EndpointView> {
        self.services
            .iter()
            .find(|s| s.name == service)?
            .endpoints
            .iter()
            .find(|e| e.id == id)
    }
}

/// Deserializes an `Option` that must be present (as `null` when empty):
/// serde would otherwise read a missing `Option` field as `None`, and a
/// missing revision is not the same as "none applied yet".
pub(crate) fn required<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str) -> EndpointView {
        EndpointView {
            id: id.into(),
            address: "127.0.0.1:8081".into(),
            initial_weight: 100,
            accepting: false,
            state: AdminState::Drain,
            weight: 10,
            healthy: true,
            in_flight: 3,
            requests: 42,
            responses: [0, 30, 1, 2, 4],
            failures: 5,
            last_change: 1_700_000_000,
            ejected: false,
            ejections: 1,
            check: Some(CheckView {
                passed: true,
                status: 200,
                at: 1_700_000_001,
            }),
            idle_connections: 2,
            drain_notice: Some(11),
            local_state: true,
            local_weight: false,
        }
    }

    fn etcd_source(applied: Option<i64>) -> SourceView {
        SourceView {
            status: SourceStatusSnapshot {
                source: Source::Etcd,
                connected: true,
                seen_revision: Some(12),
                applied_revision: applied,
                last_sync_unix_ms: Some(1_700_000_000_000),
                staleness_secs: Some(0.5),
                malformed: 1,
                reconnects: 2,
                resets: 3,
                last_error: Some("lost the stream".into()),
            },
            serving_saved_state: false,
        }
    }

    #[test]
    fn what_the_proxy_writes_reads_back_equal() {
        let services = vec![ServiceView {
            name: "web".into(),
            balance: "roundrobin".into(),
            retries: 1,
            ejections: 2,
            latency_count: 3,
            latency_sum_seconds: 0.25,
            endpoints: vec![
                endpoint("a"),
                EndpointView {
                    check: None,
                    ..endpoint("b")
                },
            ],
        }];
        let json = serde_json::to_string_pretty(&services).unwrap();
        let read: Vec<ServiceView> = serde_json::from_str(&json).unwrap();
        assert_eq!(read, services);

        let sources = vec![etcd_source(Some(12))];
        let json = serde_json::to_string_pretty(&sources).unwrap();
        let read: Vec<SourceView> = serde_json::from_str(&json).unwrap();
        assert_eq!(read, sources);
        let view = ProxyView::new(&read, services);
        assert_eq!((view.follows_etcd, view.applied_revision), (true, Some(12)));
        assert_eq!(view.endpoint("web", "a").map(|e| e.in_flight), Some(3));
    }

    #[test]
    fn the_field_names_stay_as_the_tools_read_them() {
        let json = serde_json::to_value(endpoint("a")).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for field in [
            "id",
            "state",
            "healthy",
            "in_flight",
            "requests",
            "responses",
            "failures",
        ] {
            assert!(keys.contains(&field), "{field} missing from {json}");
        }
        let source = serde_json::to_value(etcd_source(None)).unwrap();
        assert_eq!(source["source"], "etcd");
        assert_eq!(source["applied_revision"], serde_json::Value::Null);
    }

    /// Takes `field` out of every endpoint (or source) of `json`.
    fn without(mut json: serde_json::Value, field: &str) -> String {
        fn strip(v: &mut serde_json::Value, field: &str) {
            match v {
                serde_json::Value::Object(m) => {
                    m.remove(field);
                    m.values_mut().for_each(|v| strip(v, field));
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(|v| strip(v, field)),
                _ => {}
            }
        }
        strip(&mut json, field);
        json.to_string()
    }

    #[test]
    fn a_missing_safety_field_is_refused_by_name() {
        let services = serde_json::to_value(vec![ServiceView {
            name: "web".into(),
            endpoints: vec![endpoint("a")],
            ..ServiceView::default()
        }])
        .unwrap();
        for field in ["in_flight", "healthy", "state", "responses", "failures"] {
            let body = without(services.clone(), field);
            let err = serde_json::from_str::<Vec<ServiceView>>(&body)
                .expect_err(&format!("{field} missing, yet read"));
            assert!(
                err.to_string()
                    .contains(&format!("missing field `{field}`")),
                "{field}: {err}"
            );
        }
        let sources = serde_json::to_value(vec![etcd_source(Some(7))]).unwrap();
        let body = without(sources, "applied_revision");
        let err = serde_json::from_str::<Vec<SourceView>>(&body)
            .expect_err("applied_revision missing, yet read as none applied");
        assert!(err.to_string().contains("applied_revision"), "{err}");
    }

    #[test]
    fn proxy_records_need_only_an_id_and_an_admin_address() {
        let r: ProxyRecord = serde_json::from_str(
            r#"{"id":"edge-1","admin":"10.0.0.1:8404","applied_revision":42,"pid":7,"started":1700000000}"#,
        )
        .unwrap();
        assert_eq!(r.applied_revision, Some(42));
        let minimal: ProxyRecord = serde_json::from_str(r#"{"id":"x","admin":"h:1"}"#).unwrap();
        assert_eq!(minimal.applied_revision, None);
        assert!(serde_json::from_str::<ProxyRecord>(r#"{"id":"x"}"#).is_err());
    }
}
