//! Blue/green: one map entry changes in one etcd write; the switch is done
//! when every proxy applied it, and (with `drain_old`) when none of them
//! has a request in flight to the previous target any more.

use std::time::Duration;

use crate::fleet::Fleet;

use crate::fleet::OnUnconfirmed;
use crate::watch::{self, Progress};
use crate::{DeployError, Store};

/// A blue/green switch of `map[key]` to `to`.
#[derive(Clone, Debug)]
pub struct Switch {
    pub map: String,
    pub key: String,
    pub to: String,
    /// Wait until the previous target has nothing in flight anywhere.
    pub drain_old: bool,
    /// Limit for each wait.
    pub timeout: Duration,
}

/// What a switch did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switched {
    pub revision: i64,
    pub previous: Option<String>,
    pub proxies: usize,
}

pub async fn switch(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Switch,
    progress: &Progress,
) -> Result<Switched, DeployError> {
    // Every proxy must be able to serve the new target before all of its
    // traffic goes there: a switch to a service without a ready instance
    // would answer every request with 503.
    watch::until_serving(fleet, progress, &plan.to, plan.timeout)
        .await
        .map_err(|why| {
            DeployError::Failed(format!(
                "not switching {}[{}] to {}: {why}",
                plan.map, plan.key, plan.to
            ))
        })?;
    let (revision, previous) = store.switch_map(&plan.map, &plan.key, &plan.to).await?;
    progress.say(format!(
        "map {}[{}]: {} -> {} (etcd revision {revision})",
        plan.map,
        plan.key,
        previous.as_deref().unwrap_or("(none)"),
        plan.to
    ));
    let proxies = watch::until_applied(fleet, progress, revision, plan.timeout)
        .await
        .map_err(|why| {
            DeployError::Failed(format!("the switch is written but not confirmed: {why}"))
        })?;
    if plan.drain_old {
        match previous.as_deref() {
            Some(old) if old != plan.to => {
                let idle = watch::until(
                    fleet,
                    progress,
                    &format!("no proxy has a request in flight to {old}"),
                    plan.timeout,
                    |v| match watch::service_in_flight(v, old) {
                        0 => Ok(()),
                        n => Err(format!("{n} in flight to {old}")),
                    },
                )
                .await;
                match (idle, fleet.on_unconfirmed) {
                    (Ok(_), _) => {}
                    (Err(why), OnUnconfirmed::Fail) => {
                        return Err(DeployError::Failed(format!(
                            "switched, but {old} still had requests in flight when the wait ended: {why} (--on-unconfirmed proceed ends the switch anyway)"
                        )))
                    }
                    (Err(why), OnUnconfirmed::Proceed) => progress.say(format!(
                        "{old} not drained within {:?}; done anyway (--on-unconfirmed proceed): {why}",
                        plan.timeout
                    )),
                }
            }
            Some(_) => progress.say(format!(
                "nothing to drain: {}[{}] was already {}",
                plan.map, plan.key, plan.to
            )),
            None => progress.say("nothing to drain: there was no previous target"),
        }
    }
    progress.say(format!(
        "switched {}[{}] to {}",
        plan.map, plan.key, plan.to
    ));
    Ok(Switched {
        revision,
        previous,
        proxies,
    })
}

/// Switches `map[key]` back to the value its last switch replaced.
pub async fn rollback(
    store: &mut Store,
    fleet: &mut Fleet,
    map: &str,
    key: &str,
    drain_old: bool,
    timeout: Duration,
    progress: &Progress,
) -> Result<Switched, DeployError> {
    let Some(to) = store.switched_from(map, key).await? else {
        return Err(DeployError::Failed(format!(
            "map {map}[{key}] has no recorded previous value: nothing to roll back to (was it switched with `deploy switch`?)"
        )));
    };
    progress.say(format!("rolling {map}[{key}] back to {to}"));
    switch(
        store,
        fleet,
        &Switch {
            map: map.to_string(),
            key: key.to_string(),
            to,
            drain_old,
            timeout,
        },
        progress,
    )
    .await
}
