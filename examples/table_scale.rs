//! Routing-table scale: 10,000 services x 10 instances (by default).
//! Measures the initial sync (one `Reset` with every registration), the
//! process's RSS after it, and the time to apply one registration change
//! at that size (p50/p99 over many changes).
//!
//!     cargo run --release --example table_scale -- [services] [instances] [changes]

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use pointsman::control::config::Config;
use pointsman::control::{Command, Control, ListenerControl};
use pointsman::engine::table::RoutingTable;
use pointsman::engine::table::SharedTable;
use pointsman_discovery::{Address, Change, Entry, Registration, Source, Update, UpdateKind};

struct NoListeners;

impl ListenerControl for NoListeners {
    fn reconcile(&mut self, _: &Config) -> Result<(), String> {
        Ok(())
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn reg(s: usize, i: usize, port: u16) -> Entry {
    Entry::Instance(Registration::new(
        format!("svc{s}"),
        format!("i{i}"),
        Address::new(
            format!("10.{}.{}.{}", s / 256 % 256, s % 256, i % 256),
            port,
        ),
    ))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let services = args.first().copied().unwrap_or(10_000);
    let instances = args.get(1).copied().unwrap_or(10);
    let changes = args.get(2).copied().unwrap_or(2_000);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
    let config = Config::parse("<bench>", "").expect("empty config");
    let mut control = Control::new(config, table.clone(), Box::new(NoListeners));
    control.start().expect("start");
    let rss_before = rss_kib();

    let entries: Vec<Entry> = (0..services)
        .flat_map(|s| (0..instances).map(move |i| reg(s, i, 8080)))
        .collect();
    let t = Instant::now();
    control.apply_batch([Command::Discovery(Update {
        source: Source::Etcd,
        revision: Some(1),
        kind: UpdateKind::Reset(entries),
    })]);
    let sync = t.elapsed();
    let rss_after = rss_kib();
    assert_eq!(table.load().services.len(), services);

    let mut times = Vec::with_capacity(changes);
    for n in 0..changes {
        let s = fastrand::usize(..services);
        let change = Change::Upsert(reg(
            s,
            fastrand::usize(..instances),
            9000 + (n % 1000) as u16,
        ));
        let t = Instant::now();
        control.apply_batch([Command::Discovery(Update {
            source: Source::Etcd,
            revision: Some(2 + n as i64),
            kind: UpdateKind::Changes(vec![change]),
        })]);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "services={services} instances={instances} endpoints={} initial_sync_ms={:.0} rss_mib={:.1} (table: {:.1}) \
         change_p50_ms={:.3} change_p99_ms={:.3} changes={changes}",
        services * instances,
        sync.as_secs_f64() * 1e3,
        rss_after as f64 / 1024.0,
        rss_after.saturating_sub(rss_before) as f64 / 1024.0,
        percentile(&times, 0.5),
        percentile(&times, 0.99),
    );
}
