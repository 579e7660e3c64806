//! `/metrics` in Prometheus text format. Everything here is read at scrape
//! time from the atomics the proxy already keeps (endpoint state, registry
//! status, reload counts), so the request path pays nothing for metrics.

use std::sync::atomic::Ordering;

use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::control::registry::Followed;
use crate::control::reload::ReloadStats;
use crate::engine::latency::{LatencyHistogram, BUCKETS};
use crate::engine::table::RoutingTable;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One Prometheus histogram sample of `h` with `labels`.
fn histogram_metric(h: &LatencyHistogram, labels: &[(&str, &str)]) -> prometheus::proto::Metric {
    use prometheus::proto::{Bucket, Histogram, LabelPair, Metric};
    let (counts, sum) = h.snapshot();
    let mut cumulative = 0;
    let mut buckets = Vec::with_capacity(BUCKETS.len());
    for (bound, count) in BUCKETS.iter().zip(&counts) {
        cumulative += count;
        let mut b = Bucket::default();
        b.set_upper_bound(*bound);
        b.set_cumulative_count(cumulative);
        buckets.push(b);
    }
    cumulative += counts[BUCKETS.len()];
    let mut hist = Histogram::default();
    hist.set_sample_count(cumulative);
    hist.set_sample_sum(sum);
    hist.set_bucket(buckets);
    let mut m = Metric::default();
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect(),
    );
    m.set_histogram(hist);
    m
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // Names and labels are constants of this module; a failure here is a
    // programming error caught by the unit test below.
    IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

/// Renders every metric as Prometheus text.
pub fn render(table: &RoutingTable, followed: &[Followed], reloads: &ReloadStats) -> String {
    let requests = counter(
        "pointsman_endpoint_requests_total",
        "Requests (HTTP) or connections (TCP) sent to an endpoint.",
        &["service", "endpoint"],
    );
    let responses = counter(
        "pointsman_endpoint_responses_total",
        "Responses from an endpoint by status class.",
        &["service", "endpoint", "code_class"],
    );
    let failures = counter(
        "pointsman_endpoint_failures_total",
        "Requests that got no response from an endpoint (connect failure, reset, timeout).",
        &["service", "endpoint"],
    );
    let in_flight = gauge(
        "pointsman_endpoint_in_flight",
        "Requests in flight to an endpoint.",
        &["service", "endpoint"],
    );
    let weight = gauge(
        "pointsman_endpoint_weight",
        "Effective weight of an endpoint.",
        &["service", "endpoint"],
    );
    let state = gauge(
        "pointsman_endpoint_state",
        "1 for the endpoint's administrative state (ready, drain, maint), 0 for the others.",
        &["service", "endpoint", "state"],
    );
    let healthy = gauge(
        "pointsman_endpoint_healthy",
        "1 if the endpoint passes its active checks (or has none) and is not ejected by passive checks.",
        &["service", "endpoint"],
    );
    let up = gauge(
        "pointsman_endpoint_accepting",
        "1 if the endpoint takes new requests (ready, healthy, weight > 0).",
        &["service", "endpoint"],
    );
    let retries = counter(
        "pointsman_service_retries_total",
        "Requests tried again on another endpoint.",
        &["service"],
    );
    let ejections = counter(
        "pointsman_service_ejections_total",
        "Endpoints ejected by passive checks.",
        &["service"],
    );
    let held = gauge(
        "pointsman_service_requests_held",
        "Requests waiting now for an endpoint to take them (hold_timeout).",
        &["service"],
    );
    let held_total = counter(
        "pointsman_service_requests_held_total",
        "Requests that waited for an endpoint (hold_timeout), since start.",
        &["service"],
    );
    let queued = gauge(
        "pointsman_service_queue_length",
        "Requests waiting now for a slot, every endpoint being at its endpoint_max_connections.",
        &["service"],
    );
    let queued_total = counter(
        "pointsman_service_queued_total",
        "Requests that waited for a slot (endpoint_max_connections), since start.",
        &["service"],
    );
    for svc in table.services.values() {
        let live = &svc.settings.live;
        queued
            .with_label_values(&[&*svc.name])
            .set(i64::from(live.queued.load(Ordering::Relaxed)));
        queued_total
            .with_label_values(&[&*svc.name])
            .inc_by(live.queued_total.load(Ordering::Relaxed));
        retries
            .with_label_values(&[&*svc.name])
            .inc_by(live.retries.load(Ordering::Relaxed));
        held.with_label_values(&[&*svc.name])
            .set(i64::from(live.held.load(Ordering::Relaxed)));
        held_total
            .with_label_values(&[&*svc.name])
            .inc_by(live.held_total.load(Ordering::Relaxed));
        ejections
            .with_label_values(&[&*svc.name])
            .inc_by(live.ejections.load(Ordering::Relaxed));
        for ep in &svc.endpoints {
            let l = [&*svc.name, &*ep.id];
            let c = ep.live.snapshot();
            requests.with_label_values(&l).inc_by(c.requests);
            failures.with_label_values(&l).inc_by(c.failures);
            for (class, n) in CLASSES.iter().zip(c.responses) {
                if n > 0 {
                    responses.with_label_values(&[l[0], l[1], class]).inc_by(n);
                }
            }
            in_flight.with_label_values(&l).set(i64::from(c.in_flight));
            weight.with_label_values(&l).set(i64::from(c.weight));
            for s in ["ready", "drain", "maint"] {
                state
                    .with_label_values(&[l[0], l[1], s])
                    .set(i64::from(c.state.as_str() == s));
            }
            healthy
                .with_label_values(&l)
                .set(i64::from(c.healthy && !c.ejected));
            up.with_label_values(&l).set(i64::from(ep.accepts_new()));
        }
    }

    let connected = gauge(
        "pointsman_registry_connected",
        "1 while the registry is reachable.",
        &["source"],
    );
    let staleness = GaugeVec::new(
        Opts::new(
            "pointsman_registry_staleness_seconds",
            "Seconds since the registry watcher last made progress (delivered a view or a change, or the registry confirmed the view is current); counts from start until the first sync.",
        ),
        &["source"],
    )
    .unwrap_or_else(|e| panic!("staleness metric: {e}"));
    let applied = gauge(
        "pointsman_registry_applied_revision",
        "Registry revision of the routing table being served.",
        &["source"],
    );
    let malformed = counter(
        "pointsman_registry_malformed_total",
        "Registry values skipped because they did not parse.",
        &["source"],
    );
    let reconnects = counter(
        "pointsman_registry_reconnects_total",
        "Registry reconnections.",
        &["source"],
    );
    let updates = counter(
        "pointsman_registry_updates_total",
        "Updates (full listings and batches of changes) received from the registry.",
        &["source"],
    );
    let saved = gauge(
        "pointsman_registry_serving_saved_state",
        "1 while the proxy serves state loaded from --state-dir because the registry has not synced.",
        &["source"],
    );
    for f in followed {
        let s = f.status.snapshot();
        let l = [f.status.source().as_str()];
        connected.with_label_values(&l).set(i64::from(s.connected));
        if let Some(st) = s.staleness_secs {
            staleness.with_label_values(&l).set(st);
        }
        if let Some(rev) = f.status.applied_revision() {
            applied.with_label_values(&l).set(rev);
        }
        malformed.with_label_values(&l).inc_by(s.malformed);
        reconnects.with_label_values(&l).inc_by(s.reconnects);
        updates
            .with_label_values(&l)
            .inc_by(f.updates.load(Ordering::Relaxed));
        saved
            .with_label_values(&l)
            .set(i64::from(f.from_saved_state.load(Ordering::Relaxed)));
    }

    let reload = counter(
        "pointsman_config_reloads_total",
        "Config reloads by result.",
        &["result"],
    );
    reload
        .with_label_values(&["applied"])
        .inc_by(reloads.applied.load(Ordering::Relaxed));
    reload
        .with_label_values(&["failed"])
        .inc_by(reloads.failed.load(Ordering::Relaxed));
    let version = IntGauge::new(
        "pointsman_table_version",
        "Version of the routing table being served.",
    )
    .unwrap_or_else(|e| panic!("version metric: {e}"));
    version.set(i64::try_from(table.version).unwrap_or(i64::MAX));

    let (open, parked, accepted) = crate::engine::conn::CLIENT_CONNS.snapshot();
    let clients = IntGauge::new(
        "pointsman_client_connections",
        "Client connections open now (HTTP and TCP listeners).",
    )
    .unwrap_or_else(|e| panic!("client connections metric: {e}"));
    clients.set(i64::try_from(open).unwrap_or(i64::MAX));
    let clients_parked = IntGauge::new(
        "pointsman_client_connections_parked",
        "Idle HTTP/1 keep-alive client connections waiting for a request without buffers.",
    )
    .unwrap_or_else(|e| panic!("parked connections metric: {e}"));
    clients_parked.set(i64::try_from(parked).unwrap_or(i64::MAX));
    let clients_total = prometheus::IntCounter::new(
        "pointsman_client_connections_total",
        "Client connections accepted since the process started.",
    )
    .unwrap_or_else(|e| panic!("accepted connections metric: {e}"));
    clients_total.inc_by(accepted);

    let registry = Registry::new();
    let collectors: Vec<Box<dyn Collector>> = vec![
        Box::new(requests),
        Box::new(responses),
        Box::new(failures),
        Box::new(in_flight),
        Box::new(weight),
        Box::new(state),
        Box::new(healthy),
        Box::new(up),
        Box::new(retries),
        Box::new(ejections),
        Box::new(held),
        Box::new(held_total),
        Box::new(queued),
        Box::new(queued_total),
        Box::new(connected),
        Box::new(staleness),
        Box::new(applied),
        Box::new(malformed),
        Box::new(reconnects),
        Box::new(updates),
        Box::new(saved),
        Box::new(reload),
        Box::new(version),
        Box::new(clients),
        Box::new(clients_parked),
        Box::new(clients_total),
    ];
    for c in collectors {
        if let Err(e) = registry.register(c) {
            tracing::error!(error = %e, "metric registration failed");
        }
    }
    let mut families = registry.gather();
    families.push(latency_family(table));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

fn latency_family(table: &RoutingTable) -> prometheus::proto::MetricFamily {
    use prometheus::proto::{MetricFamily, MetricType};
    let mut f = MetricFamily::default();
    f.set_name("pointsman_service_response_seconds".into());
    f.set_help("Time from a request's arrival to its response head, by service.".into());
    f.set_field_type(MetricType::HISTOGRAM);
    let mut services: Vec<_> = table.services.values().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    f.set_metric(
        services
            .iter()
            .map(|s| histogram_metric(&s.settings.live.latency, &[("service", &s.name)]))
            .collect(),
    );
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renders_an_empty_table() {
        let text = render(&RoutingTable::default(), &[], &ReloadStats::default());
        assert!(text.contains("pointsman_table_version 0"), "{text}");
        assert!(
            text.contains("pointsman_config_reloads_total{result=\"failed\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(20));
        let m = histogram_metric(&h, &[("service", "web")]);
        let hist = m.get_histogram();
        assert_eq!(hist.get_sample_count(), 3);
        let counts: Vec<u64> = hist
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect();
        assert_eq!(counts[0], 1, "{counts:?}");
        assert_eq!(counts[6], 2, "{counts:?}");
        assert_eq!(*counts.last().unwrap_or(&0), 2, "{counts:?}");
        assert!((hist.get_sample_sum() - 20.0303).abs() < 1e-6);
    }
}
