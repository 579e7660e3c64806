//! One instance replaced by another: `deploy replace` registers the new
//! target, waits until every proxy sends it requests, then drains and
//! deregisters the old instances, so a service that runs one instance
//! changes versions with no failed request. With `pause`, for an app that
//! cannot run two copies at once, the service is paused instead (every
//! proxy holds its new requests), the old instance drained and stopped,
//! the new one started and confirmed, and the service resumed.

use std::time::Duration;

use pointsman_discovery::{AdminState, PauseSpec};

use crate::fleet::Fleet;
use crate::rolling::{drain_everywhere, run_cmd, substitute};
use crate::watch::{self, Progress};
use crate::{DeployError, Store, Versioned};
use pointsman_discovery::Registration;

/// A replacement of every instance of `service` by one at `target`.
#[derive(Clone, Debug)]
pub struct Replace {
    pub service: String,
    /// The new instance's address and id.
    pub target: String,
    pub id: String,
    /// Pause the service instead of running the old and the new at once.
    pub pause: bool,
    /// Shell commands: `start_cmd` starts the new instance (`{id}`,
    /// `{address}`, `{service}` replaced), `stop_cmd` stops each old one
    /// once nothing is sent to it.
    pub start_cmd: Option<String>,
    pub stop_cmd: Option<String>,
    pub drain_timeout: Duration,
    pub health_timeout: Duration,
}

pub async fn replace(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Replace,
    progress: &Progress,
) -> Result<(), DeployError> {
    let svc = plan.service.as_str();
    let old: Vec<Versioned<Registration>> = store
        .instances(svc)
        .await?
        .into_iter()
        .filter(|i| i.value.id != plan.id)
        .collect();
    let names: Vec<&str> = old.iter().map(|o| o.value.id.as_str()).collect();
    progress.say(format!(
        "replacing {svc} ({}) by {} at {}{}",
        if names.is_empty() {
            "no instance yet".to_string()
        } else {
            names.join(", ")
        },
        plan.id,
        plan.target,
        if plan.pause { ", paused meanwhile" } else { "" }
    ));
    if !plan.pause {
        start_new(store, fleet, plan, progress).await?;
        for o in &old {
            retire(store, fleet, plan, progress, o).await?;
        }
        progress.say(format!("{svc}: now served by {} alone", plan.id));
        return Ok(());
    }

    // Paused: each request waits on its proxy, for at most as long as the
    // whole replacement may take.
    let spec = PauseSpec {
        timeout: plan.drain_timeout + plan.health_timeout,
    };
    let rev = store.set_pause(svc, &spec).await?;
    progress.say(format!("{svc}: paused (revision {rev})"));
    let step = async {
        watch::until_applied(fleet, progress, rev, plan.drain_timeout)
            .await
            .map_err(|why| {
                DeployError::Failed(format!("the pause was not applied everywhere: {why}"))
            })?;
        for o in &old {
            retire(store, fleet, plan, progress, o).await?;
        }
        start_new(store, fleet, plan, progress).await
    }
    .await;
    // Resumed whatever happened: a paused service answers nobody.
    let rev = store.delete_pause(svc).await?;
    progress.say(format!("{svc}: resumed (revision {rev})"));
    step?;
    watch::until_applied(fleet, progress, rev, plan.health_timeout)
        .await
        .map_err(|why| {
            DeployError::Failed(format!("the resume was not applied everywhere: {why}"))
        })?;
    progress.say(format!("{svc}: now served by {} alone", plan.id));
    Ok(())
}

/// Starts and registers the new instance; returns once every proxy sends
/// it requests (ready and healthy). If it never gets there, its
/// registration is taken back and the old instances keep serving.
async fn start_new(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Replace,
    progress: &Progress,
) -> Result<(), DeployError> {
    let (svc, id) = (plan.service.as_str(), plan.id.as_str());
    if let Some(cmd) = &plan.start_cmd {
        let cmd = substitute(cmd, svc, id, &plan.target);
        run_cmd(&format!("{svc}/{id}: start"), &cmd, progress).await?;
    }
    let rev = store.put_instance(svc, id, &plan.target).await?;
    progress.say(format!(
        "{svc}/{id}: registered at {} (revision {rev})",
        plan.target
    ));
    let serving = watch::until(
        fleet,
        progress,
        &format!("every proxy sends to {svc}/{id}"),
        plan.health_timeout,
        |v| {
            watch::applied(v, rev)?;
            match v.endpoint(svc, id) {
                None => Err("does not have it yet".into()),
                Some(e) if !e.healthy => Err("sees it down".into()),
                Some(e) if e.state != AdminState::Ready => Err(format!("has it {}", e.state)),
                Some(_) => Ok(()),
            }
        },
    )
    .await;
    if let Err(why) = serving {
        let rev = store.delete_instance(svc, id).await?;
        progress.say(format!(
            "{svc}/{id}: deregistered again (revision {rev}); the old instances keep serving"
        ));
        return Err(DeployError::Failed(format!(
            "the new {svc}/{id} never served on every proxy within {:?}: {why}",
            plan.health_timeout
        )));
    }
    Ok(())
}

/// Drains an old instance on every proxy, stops it once nothing is sent
/// to it, and deregisters it (with any override of it).
async fn retire(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Replace,
    progress: &Progress,
    old: &Versioned<Registration>,
) -> Result<(), DeployError> {
    let (svc, id) = (plan.service.as_str(), old.value.id.as_str());
    let before = store.override_of(svc, id).await?;
    if let Err(e) = drain_everywhere(store, fleet, progress, svc, id, plan.drain_timeout).await {
        let rev = store.restore_override(svc, id, before).await?;
        progress.say(format!("{svc}/{id}: put back (revision {rev})"));
        return Err(DeployError::Failed(format!("{svc}/{id}: {e}")));
    }
    if let Some(cmd) = &plan.stop_cmd {
        let address = old.value.address.to_string();
        let cmd = substitute(cmd, svc, id, &address);
        run_cmd(&format!("{svc}/{id}: stop"), &cmd, progress).await?;
    }
    store.restore_override(svc, id, None).await?;
    let rev = store.delete_instance(svc, id).await?;
    progress.say(format!("{svc}/{id}: deregistered (revision {rev})"));
    Ok(())
}
