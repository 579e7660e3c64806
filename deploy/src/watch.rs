//! Waiting for the fleet, with progress on the terminal.
//!
//! Every rollout step writes to etcd and then waits until every live proxy
//! confirms — through its admin API — that it applied the write and does
//! what the step needs (an instance drained, healthy, a service idle). This
//! module holds that loop and the progress lines a person watches.

use std::sync::Arc;
use std::time::Duration;

use crate::fleet::{probe, Fleet};
use pointsman_discovery::admin_api::ProxyView;
use pointsman_discovery::AdminState;
use tokio::time::Instant;

use crate::DeployError;

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

/// What one proxy answers: its view, or why it did not answer.
pub struct Answer {
    pub id: String,
    pub admin: String,
    pub view: Result<ProxyView, String>,
}

/// Asks every live proxy once, all at the same time.
pub async fn ask_all(fleet: &mut Fleet) -> Result<Vec<Answer>, DeployError> {
    let (records, malformed) = fleet.proxies().await.map_err(|e| DeployError::Registry {
        what: "list the proxies".into(),
        reason: e.to_string(),
    })?;
    for m in malformed {
        tracing::warn!(record = %m, "proxy record does not parse; it is not asked");
    }
    let mut probes = tokio::task::JoinSet::new();
    for r in records {
        let limit = fleet.probe_timeout;
        probes.spawn(async move {
            let view = probe(&r.admin, limit).await;
            Answer {
                id: r.id,
                admin: r.admin,
                view,
            }
        });
    }
    let mut out = Vec::new();
    while let Some(done) = probes.join_next().await {
        if let Ok(a) = done {
            out.push(a);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Asks every proxy until `judge` accepts each one's view or `limit`
/// passes. `what` names the wait in progress lines; who is still pending
/// is printed at most once a second. Returns how many proxies confirmed,
/// or the last round's reasons.
pub async fn until(
    fleet: &mut Fleet,
    progress: &Progress,
    what: &str,
    limit: Duration,
    judge: impl Fn(&ProxyView) -> Result<(), String>,
) -> Result<usize, String> {
    let started = Instant::now();
    let deadline = started + limit;
    let mut last_report = started;
    progress.say(format!("waiting until {what}"));
    loop {
        let round = match ask_all(fleet).await {
            Ok(r) => r,
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(e.to_string());
                }
                tokio::time::sleep(fleet.poll_interval).await;
                continue;
            }
        };
        let pending: Vec<String> = round
            .iter()
            .filter_map(|a| {
                let why = match &a.view {
                    Ok(v) => judge(v).err()?,
                    Err(e) => format!("admin API did not answer: {e}"),
                };
                Some(format!("{} ({}): {why}", a.id, a.admin))
            })
            .collect();
        if pending.is_empty() {
            if round.is_empty() {
                progress.say(format!(
                    "  no proxy is registered under <pointsman>/proxies: nothing to confirm ({what})"
                ));
            } else {
                progress.say(format!(
                    "  {} of {} proxies confirmed in {:.1}s",
                    round.len(),
                    round.len(),
                    started.elapsed().as_secs_f64()
                ));
            }
            return Ok(round.len());
        }
        if Instant::now() >= deadline {
            return Err(pending.join("; "));
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress.say(format!(
                "  {} of {} proxies confirmed; waiting for {}",
                round.len() - pending.len(),
                round.len(),
                pending.join("; ")
            ));
        }
        tokio::time::sleep(fleet.poll_interval).await;
    }
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

/// The proxy's applied etcd revision is at least `revision`.
pub fn applied(view: &ProxyView, revision: i64) -> Result<(), String> {
    if !view.follows_etcd {
        return Err("does not follow etcd".into());
    }
    match view.applied_revision {
        Some(a) if a >= revision => Ok(()),
        Some(a) => Err(format!("applied revision {a}, waiting for {revision}")),
        None => Err(format!("applied no revision yet, waiting for {revision}")),
    }
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
