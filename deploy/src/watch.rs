//! Waiting for the fleet, with progress on the terminal.
//!
//! Every rollout step writes to etcd and then waits until every live proxy
//! confirms — through its admin API — that it applied the write and does
//! what the step needs (an instance drained, healthy, a service idle). This
//! module holds that loop and the progress lines a person watches.

use std::sync::Arc;
use std::time::Duration;

pub use crate::fleet::applied;
use crate::fleet::{DrainNotice, Fleet};
use pointsman_discovery::admin_api::ProxyView;
use pointsman_discovery::AdminState;
use tokio::time::Instant;

/// Prints each step and what it waits for, with the time since the start.
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            start: Instant::now(),
            quiet: false,
        }
    }

    /// No output (for tests that drive rollouts as a library).
    pub fn quiet() -> Self {
        Progress {
            start: Instant::now(),
            quiet: true,
        }
    }

    pub fn say(&self, line: impl AsRef<str>) {
        if !self.quiet {
            println!(
                "[{:>7.1}s] {}",
                self.start.elapsed().as_secs_f64(),
                line.as_ref()
            );
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// Tells a rollout to stop (`pointsman deploy` fires it on SIGINT and
/// SIGTERM). A rollout that sees it undoes the step under way — a drained
/// instance is put back, a canary's route restored — and returns an error.
/// Clones share one state.
#[derive(Clone, Debug)]
pub struct Interrupt(Arc<tokio::sync::watch::Sender<bool>>);

impl Interrupt {
    /// An interrupt that has not fired.
    pub fn new() -> Self {
        Interrupt(Arc::new(tokio::sync::watch::channel(false).0))
    }

    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once the interrupt has fired (at once if it already has).
    pub async fn fired(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: the wait ends only by firing.
        let _ = rx.wait_for(|fired| *fired).await;
    }
}

impl Default for Interrupt {
    fn default() -> Self {
        Interrupt::new()
    }
}

/// Asks every proxy of the fleet until `judge` accepts each one's view or
/// `limit` passes; with a `notice`, proxies that have not applied its
/// revision are told of the drain directly (see [`Fleet`]). `what` names
/// the wait in progress lines; who is still pending is printed at most
/// once a second, and every proxy that leaves the set at once. Returns how
/// many proxies confirmed, or the last round's summary.
pub async fn until_noticed<J>(
    fleet: &mut Fleet,
    progress: &Progress,
    what: &str,
    limit: Duration,
    judge: J,
    notice: Option<DrainNotice>,
) -> Result<usize, String>
where
    J: Fn(&ProxyView) -> Result<(), String> + Sync,
{
    let started = Instant::now();
    let deadline = started + limit;
    let mut last_report = started;
    progress.say(format!("waiting until {what}"));
    loop {
        let round = fleet.check_with(&judge, notice.clone()).await;
        for d in &round.left {
            progress.say(format!(
                "  {} ({}) left the set of proxies: {}",
                d.id, d.admin, d.why
            ));
        }
        if round.confirmed() {
            progress.say(format!(
                "  {} in {:.1}s",
                round.summary(),
                started.elapsed().as_secs_f64()
            ));
            return Ok(round.proxies.len());
        }
        // No proxy to ask is not worth waiting on: nothing will change it.
        if round.empty || Instant::now() >= deadline {
            return Err(round.summary());
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress.say(format!("  {}", round.summary()));
        }
        tokio::time::sleep(fleet.poll_interval).await;
    }
}

/// [`until_noticed`] without a drain to tell.
pub async fn until<J>(
    fleet: &mut Fleet,
    progress: &Progress,
    what: &str,
    limit: Duration,
    judge: J,
) -> Result<usize, String>
where
    J: Fn(&ProxyView) -> Result<(), String> + Sync,
{
    until_noticed(fleet, progress, what, limit, judge, None).await
}

/// [`until`] every proxy has applied `revision`.
pub async fn until_applied(
    fleet: &mut Fleet,
    progress: &Progress,
    revision: i64,
    limit: Duration,
) -> Result<usize, String> {
    let what = format!("every proxy applied revision {revision}");
    until(fleet, progress, &what, limit, |v| applied(v, revision)).await
}

/// [`until`] every proxy has a ready, healthy instance of `service`.
pub async fn until_serving(
    fleet: &mut Fleet,
    progress: &Progress,
    service: &str,
    limit: Duration,
) -> Result<usize, String> {
    let what = format!("every proxy has a ready, healthy instance of {service}");
    until(fleet, progress, &what, limit, |v| serves(v, service)).await
}

/// The proxy has an instance of `service` it sends new requests to: ready
/// and healthy.
pub fn serves(view: &ProxyView, service: &str) -> Result<(), String> {
    let endpoints: Vec<_> = view
        .services
        .iter()
        .filter(|s| s.name == service)
        .flat_map(|s| &s.endpoints)
        .collect();
    if endpoints
        .iter()
        .any(|e| e.state == AdminState::Ready && e.healthy)
    {
        return Ok(());
    }
    if endpoints.is_empty() {
        return Err(format!("has no instance of {service}"));
    }
    let seen: Vec<String> = endpoints
        .iter()
        .map(|e| {
            let health = if e.healthy { "healthy" } else { "down" };
            format!("{} {}, {health}", e.id, e.state)
        })
        .collect();
    Err(format!(
        "has no ready, healthy instance of {service} ({})",
        seen.join("; ")
    ))
}

/// Requests in flight to any endpoint of `service` on this proxy.
pub fn service_in_flight(view: &ProxyView, service: &str) -> u64 {
    view.services
        .iter()
        .filter(|s| s.name == service)
        .flat_map(|s| &s.endpoints)
        .map(|e| e.in_flight)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pointsman_discovery::admin_api::{EndpointView, ServiceView};

    fn ep(id: &str, state: AdminState, healthy: bool, in_flight: u64) -> EndpointView {
        EndpointView {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            state,
            healthy,
            in_flight,
            ..EndpointView::default()
        }
    }

    fn view(applied: Option<i64>, services: Vec<(&str, Vec<EndpointView>)>) -> ProxyView {
        ProxyView {
            follows_etcd: true,
            applied_revision: applied,
            services: services
                .into_iter()
                .map(|(name, endpoints)| ServiceView {
                    name: name.into(),
                    endpoints,
                    ..ServiceView::default()
                })
                .collect(),
        }
    }

    #[test]
    fn a_service_is_served_only_with_a_ready_healthy_instance() {
        let v = view(
            Some(1),
            vec![
                (
                    "green",
                    vec![
                        ep("g1", AdminState::Drain, true, 0),
                        ep("g2", AdminState::Ready, false, 0),
                    ],
                ),
                ("blue", vec![ep("b1", AdminState::Ready, true, 0)]),
            ],
        );
        assert_eq!(serves(&v, "blue"), Ok(()));
        let why = serves(&v, "green").expect_err("no ready, healthy green");
        assert!(
            why.contains("g1 drain, healthy") && why.contains("g2 ready, down"),
            "{why}"
        );
        assert_eq!(serves(&v, "red"), Err("has no instance of red".to_string()));
    }

    #[test]
    fn applied_needs_etcd_and_the_revision() {
        assert!(applied(&view(Some(5), vec![]), 5).is_ok());
        assert!(applied(&view(Some(4), vec![]), 5)
            .expect_err("behind")
            .contains("applied revision 4"));
        assert!(applied(&view(None, vec![]), 5).is_err());
        let mut v = view(Some(9), vec![]);
        v.follows_etcd = false;
        assert!(applied(&v, 5).is_err());
    }

    #[test]
    fn in_flight_sums_a_service() {
        let v = view(
            Some(1),
            vec![
                (
                    "blue",
                    vec![
                        ep("b1", AdminState::Ready, true, 2),
                        ep("b2", AdminState::Drain, true, 3),
                    ],
                ),
                ("green", vec![ep("g1", AdminState::Ready, true, 7)]),
            ],
        );
        assert_eq!(service_in_flight(&v, "blue"), 5);
        assert_eq!(service_in_flight(&v, "red"), 0);
    }

    #[tokio::test]
    async fn an_interrupt_wakes_every_clone_once_fired() {
        let i = Interrupt::new();
        assert!(!i.is_fired());
        let waiting = tokio::spawn({
            let i = i.clone();
            async move { i.fired().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        i.fire();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("the task");
        assert!(i.is_fired());
        // Fired already: returns at once.
        tokio::time::timeout(Duration::from_secs(5), i.fired())
            .await
            .expect("at once");
    }
}
