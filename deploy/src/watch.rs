//! Waiting for the fleet, with progress on the terminal.
//!
//! Every rollout step writes to etcd and then waits until every live proxy
//! confirms — through its admin API — that it applied the write and does
//! what the step needs (an instance drained, healthy, a service idle). This
//! module holds that loop and the progress lines a person watches.

use std::time::Duration;

use pointsman_discovery::fleet::{probe, Fleet, ProxyView};
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

/// Requests in flight to any endpoint of `service` on this proxy.
pub fn service_in_flight(view: &ProxyView, service: &str) -> u64 {
    view.services
        .iter()
        .filter(|s| s.name == service)
        .flat_map(|s| &s.endpoints)
        .map(|e| e.in_flight)
        .sum()
}
