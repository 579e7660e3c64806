//! Rolling replacement: one instance at a time is drained fleet-wide,
//! stopped, started again, confirmed healthy on every proxy, and put back
//! in rotation.

use std::time::Duration;

use crate::fleet::Fleet;
use pointsman_discovery::{AdminState, Override};
use tokio::time::Instant;

use crate::watch::{self, Interrupt, Progress};
use crate::{DeployError, Store};

/// A rolling deploy of every instance of `service`.
#[derive(Clone, Debug)]
pub struct Rolling {
    pub service: String,
    /// Shell commands; `{id}`, `{address}` and `{service}` are replaced.
    /// The start command must return once the instance is started (run the
    /// app in the background, or through a service manager).
    pub stop_cmd: String,
    pub start_cmd: String,
    /// Limit for an instance's drain; when it passes the rollout goes on.
    pub drain_timeout: Duration,
    /// Limit for a new instance to register and be healthy everywhere.
    pub health_timeout: Duration,
}

/// Replaces `{id}`, `{address}` and `{service}`.
pub fn substitute(cmd: &str, service: &str, id: &str, address: &str) -> String {
    cmd.replace("{id}", id)
        .replace("{address}", address)
        .replace("{service}", service)
}

async fn run_cmd(what: &str, cmd: &str, progress: &Progress) -> Result<(), DeployError> {
    progress.say(format!("{what}: sh -c {cmd:?}"));
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| DeployError::Failed(format!("{what}: cannot run sh: {e}")))?;
    if !status.success() {
        return Err(DeployError::Failed(format!(
            "{what} failed ({status}): {cmd}"
        )));
    }
    Ok(())
}

pub async fn rolling(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Rolling,
    progress: &Progress,
    interrupt: &Interrupt,
) -> Result<(), DeployError> {
    let instances = store.instances(&plan.service).await?;
    if instances.is_empty() {
        return Err(DeployError::Failed(format!(
            "service {} has no registered instance under {}: nothing to roll",
            plan.service,
            store.instance_key(&plan.service, "")
        )));
    }
    let ids: Vec<String> = instances.iter().map(|i| i.value.id.clone()).collect();
    progress.say(format!(
        "rolling {}: {} instances ({})",
        plan.service,
        ids.len(),
        ids.join(", ")
    ));
    if ids.len() < 2 {
        progress.say(format!(
            "warning: {} has a single instance: it gets no traffic while it is replaced",
            plan.service
        ));
    }
    for (n, inst) in instances.iter().enumerate() {
        let (svc, id) = (plan.service.as_str(), inst.value.id.as_str());
        if interrupt.is_fired() {
            return Err(DeployError::Failed(format!(
                "rolling deploy of {svc} interrupted before {id} ({n} of {} done)",
                ids.len()
            )));
        }
        let address = inst.value.address.to_string();
        progress.say(format!("[{}/{}] {svc}/{id} at {address}", n + 1, ids.len()));
        let before = store.override_of(svc, id).await?;
        // An interrupt drops the step where it is (a command under way is
        // killed) and puts the instance's previous state back below.
        let step = tokio::select! {
            r = replace_one(store, fleet, plan, progress, id, &address, before.clone()) => r,
            _ = interrupt.fired() => Err(DeployError::Failed("interrupted".into())),
        };
        if let Err(e) = step {
            progress.say(format!("{svc}/{id}: {e}; putting its previous state back"));
            match store.restore_override(svc, id, before).await {
                Ok(rev) => progress.say(format!(
                    "{svc}/{id}: previous state restored at revision {rev}"
                )),
                Err(re) => progress.say(format!(
                    "{svc}/{id}: could not restore its previous state: {re}"
                )),
            }
            return Err(DeployError::Failed(format!(
                "rolling deploy of {svc} stopped at {id} ({} of {} done): {e}",
                n,
                ids.len()
            )));
        }
    }
    progress.say(format!(
        "rolled {} instances of {}",
        ids.len(),
        plan.service
    ));
    Ok(())
}

async fn replace_one(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Rolling,
    progress: &Progress,
    id: &str,
    address: &str,
    before: Option<Override>,
) -> Result<(), DeployError> {
    let svc = plan.service.as_str();
    let rev = store
        .set_override(svc, id, Some(AdminState::Drain), None)
        .await?;
    progress.say(format!("{svc}/{id}: drain (revision {rev})"));
    let drained = watch::until(
        fleet,
        progress,
        &format!("no proxy sends to {svc}/{id}"),
        plan.drain_timeout,
        |v| {
            watch::applied(v, rev)?;
            match v.endpoint(svc, id) {
                Some(e) if e.state == AdminState::Ready => Err("still sends new requests".into()),
                Some(e) if e.in_flight > 0 => Err(format!("{} in flight", e.in_flight)),
                _ => Ok(()),
            }
        },
    )
    .await;
    if let Err(why) = drained {
        // Requests still in flight are given up on; new ones are not: a
        // proxy that has not applied the drain, or still picks the
        // instance (a local override, say), would send requests to it
        // after it stopped.
        let round = watch::ask_all(fleet).await?;
        let still_sending = not_draining(&round, svc, id, rev);
        if !still_sending.is_empty() {
            return Err(DeployError::Failed(format!(
                "not drained on every proxy after {:?}, so it is not stopped: {}",
                plan.drain_timeout,
                still_sending.join("; ")
            )));
        }
        progress.say(format!(
            "{svc}/{id}: drain timeout ({:?}) passed with requests in flight, going on: {why}",
            plan.drain_timeout
        ));
    }

    run_cmd(
        &format!("{svc}/{id}: stop"),
        &substitute(&plan.stop_cmd, svc, id, address),
        progress,
    )
    .await?;
    let stopped_at = store.revision().await?;
    run_cmd(
        &format!("{svc}/{id}: start"),
        &substitute(&plan.start_cmd, svc, id, address),
        progress,
    )
    .await?;

    // Registered again (a write after the stop), then healthy everywhere.
    let deadline = Instant::now() + plan.health_timeout;
    progress.say(format!("{svc}/{id}: waiting for its new registration"));
    let registered = loop {
        if let Some(reg) = store.instance(svc, id).await? {
            if reg.mod_revision > stopped_at {
                break reg;
            }
        }
        if Instant::now() >= deadline {
            return Err(DeployError::Failed(format!(
                "the new {svc}/{id} did not register within {:?}",
                plan.health_timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    progress.say(format!(
        "{svc}/{id}: registered at {} (revision {})",
        registered.value.address, registered.mod_revision
    ));
    watch::until(
        fleet,
        progress,
        &format!("every proxy sees the new {svc}/{id} healthy"),
        deadline.saturating_duration_since(Instant::now()),
        |v| {
            watch::applied(v, registered.mod_revision)?;
            match v.endpoint(svc, id) {
                None => Err("does not have it yet".into()),
                Some(e) if !e.healthy => Err("sees it down".into()),
                Some(_) => Ok(()),
            }
        },
    )
    .await
    .map_err(|why| {
        DeployError::Failed(format!(
            "the new {svc}/{id} never became healthy everywhere: {why}"
        ))
    })?;

    let rev = store.restore_override(svc, id, before.clone()).await?;
    let back = before.and_then(|o| o.state).unwrap_or(AdminState::Ready);
    progress.say(format!("{svc}/{id}: back to {back} (revision {rev})"));
    watch::until(
        fleet,
        progress,
        &format!("every proxy applied revision {rev}"),
        plan.health_timeout,
        |v| {
            watch::applied(v, rev)?;
            match v.endpoint(svc, id) {
                Some(e) if back == AdminState::Ready && e.state != AdminState::Ready => {
                    Err(format!("has it in state {}", e.state))
                }
                _ => Ok(()),
            }
        },
    )
    .await
    .map_err(|why| DeployError::Failed(format!("{svc}/{id} is back but not confirmed: {why}")))?;
    Ok(())
}

/// The proxies of `round` that would still send new requests to
/// `svc`/`id` once it is stopped (drained at revision `rev`), with why.
fn not_draining(round: &[watch::Answer], svc: &str, id: &str, rev: i64) -> Vec<String> {
    round
        .iter()
        .filter_map(|a| {
            let why = match &a.view {
                Err(e) => format!("admin API did not answer: {e}"),
                Ok(v) => match watch::applied(v, rev) {
                    Err(why) => why,
                    Ok(()) => match v.endpoint(svc, id) {
                        Some(e) if e.state == AdminState::Ready => {
                            "still sends it new requests (state ready)".to_string()
                        }
                        _ => return None,
                    },
                },
            };
            Some(format!("{} ({}): {why}", a.id, a.admin))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pointsman_discovery::admin_api::{EndpointView, ProxyView, ServiceView};

    fn answer(proxy: &str, view: Result<ProxyView, String>) -> watch::Answer {
        watch::Answer {
            id: proxy.into(),
            admin: "127.0.0.1:1".into(),
            view,
        }
    }

    fn with_a1(applied: i64, state: AdminState, in_flight: u64) -> Result<ProxyView, String> {
        Ok(ProxyView {
            follows_etcd: true,
            applied_revision: Some(applied),
            services: vec![ServiceView {
                name: "web".into(),
                endpoints: vec![EndpointView {
                    id: "a1".into(),
                    address: "127.0.0.1:2".into(),
                    state,
                    healthy: true,
                    in_flight,
                    ..EndpointView::default()
                }],
                ..ServiceView::default()
            }],
        })
    }

    #[test]
    fn only_requests_in_flight_are_left_behind_after_a_drain_timeout() {
        let round = vec![
            answer("p1", with_a1(7, AdminState::Drain, 3)),
            answer("p2", with_a1(7, AdminState::Maint, 0)),
            answer("p3", with_a1(9, AdminState::Ready, 0)),
            answer("p4", with_a1(6, AdminState::Drain, 0)),
            answer("p5", Err("connection refused".into())),
        ];
        let left = not_draining(&round, "web", "a1", 7);
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(left[0].starts_with("p3") && left[0].contains("state ready"));
        assert!(left[1].starts_with("p4") && left[1].contains("applied revision 6"));
        assert!(left[2].starts_with("p5") && left[2].contains("connection refused"));
        // A proxy without the instance sends nothing to it.
        let gone = vec![answer(
            "p1",
            Ok(ProxyView {
                follows_etcd: true,
                applied_revision: Some(7),
                services: vec![],
            }),
        )];
        assert!(not_draining(&gone, "web", "a1", 7).is_empty());
    }

    #[test]
    fn placeholders_are_replaced() {
        assert_eq!(
            substitute(
                "kill $(cat /run/{service}-{id}.pid) # {address}",
                "web",
                "a1",
                "10.0.0.5:80"
            ),
            "kill $(cat /run/web-a1.pid) # 10.0.0.5:80"
        );
    }
}
