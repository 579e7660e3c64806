//! Rolling replacement: one instance at a time is drained fleet-wide,
//! stopped, started again, confirmed healthy on every proxy, and put back
//! in rotation.

use std::time::Duration;

use crate::fleet::{Expectation, Fleet, OnUnconfirmed};
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
    /// Limit for an instance's drain; when it passes, the fleet's
    /// `on_unconfirmed` decides.
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

pub(crate) async fn run_cmd(what: &str, cmd: &str, progress: &Progress) -> Result<(), DeployError> {
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

/// Drains `service`/`id` fleet-wide (an override) and waits until no
/// proxy sends to it. Not confirmed within `limit`: an error, unless the
/// fleet's `--on-unconfirmed proceed` says to go on. Putting the previous
/// state back after an error is the caller's.
pub(crate) async fn drain_everywhere(
    store: &mut Store,
    fleet: &mut Fleet,
    progress: &Progress,
    service: &str,
    id: &str,
    limit: Duration,
) -> Result<(), DeployError> {
    let rev = store
        .set_override(service, id, Some(AdminState::Drain), None)
        .await?;
    progress.say(format!("{service}/{id}: drain (revision {rev})"));
    let expect = Expectation::Drained {
        service: service.to_string(),
        id: id.to_string(),
        revision: rev,
    };
    let drained = watch::until_noticed(
        fleet,
        progress,
        &format!("no proxy sends to {service}/{id}"),
        limit,
        |v| expect.judge(v),
        expect.notice(),
    )
    .await;
    match (drained, fleet.on_unconfirmed) {
        (Ok(_), _) => Ok(()),
        (Err(why), OnUnconfirmed::Fail) => Err(DeployError::Failed(format!(
            "not drained on every proxy within {limit:?}, so it is not stopped: {why} (--on-unconfirmed proceed stops it anyway)"
        ))),
        (Err(why), OnUnconfirmed::Proceed) => {
            progress.say(format!(
                "{service}/{id}: drain not confirmed within {limit:?}; stopping it anyway (--on-unconfirmed proceed): {why}"
            ));
            Ok(())
        }
    }
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
    drain_everywhere(store, fleet, progress, svc, id, plan.drain_timeout).await?;

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

#[cfg(test)]
mod tests {
    use super::*;

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
