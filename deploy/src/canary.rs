//! Canary: a route's traffic moves from one service to another in weight
//! steps. Between steps the new service's error rate and mean latency,
//! counted by the proxies themselves, are compared with the old one's; a
//! new service that does worse beyond the thresholds ends the canary and
//! puts the route back as it was.

use std::time::Duration;

use crate::fleet::Fleet;
use pointsman_discovery::admin_api::ServiceView;
use pointsman_discovery::http::http_get;
use pointsman_discovery::{RouteSpec, RouteTarget, SplitSpec};

use crate::watch::{self, Interrupt, Progress};
use crate::{CanarySteps, DeployError, Store};

/// A canary of route `route` from service `from` to service `to`.
#[derive(Clone, Debug)]
pub struct Canary {
    pub route: String,
    pub from: String,
    pub to: String,
    pub steps: CanarySteps,
    /// Time at each step before the comparison.
    pub interval: Duration,
    /// The new service's error rate may exceed the old one's by this much
    /// (0.02 = two percentage points).
    pub max_error_increase: f64,
    /// The new service's mean latency may be this many times the old one's
    /// (and at least `latency_floor` more before it counts).
    pub max_latency_ratio: f64,
    pub latency_floor: Duration,
    /// Fewer requests than this to the new service in an interval: no
    /// verdict on it, the canary goes on.
    pub min_requests: u64,
    /// Limit for each wait for the fleet.
    pub timeout: Duration,
}

/// What the proxies counted for one service, summed over the fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    /// 5xx answers and requests that got no answer.
    pub errors: u64,
    pub latency_count: u64,
    pub latency_sum: f64,
}

impl Totals {
    fn since(&self, before: &Totals) -> Totals {
        Totals {
            requests: self.requests.saturating_sub(before.requests),
            errors: self.errors.saturating_sub(before.errors),
            latency_count: self.latency_count.saturating_sub(before.latency_count),
            latency_sum: (self.latency_sum - before.latency_sum).max(0.0),
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    pub fn mean_latency(&self) -> f64 {
        if self.latency_count == 0 {
            0.0
        } else {
            self.latency_sum / self.latency_count as f64
        }
    }
}

/// Sums the counters of services `names` over every proxy of the fleet
/// (those whose record expired too: they still serve).
pub async fn totals(fleet: &mut Fleet, names: [&str; 2]) -> Result<[Totals; 2], DeployError> {
    fleet.refresh().await.map_err(|e| DeployError::Registry {
        what: "list the proxies".into(),
        reason: e.to_string(),
    })?;
    let mut out = [Totals::default(); 2];
    for (id, admin) in fleet.members() {
        let answer = http_get(&admin, "/api/services", fleet.probe_timeout)
            .await
            .map_err(|e| DeployError::Failed(format!("proxy {id} ({admin}): {e}")))?;
        let services: Vec<ServiceView> = serde_json::from_slice(&answer.body).map_err(|e| {
            DeployError::Failed(format!("proxy {id}: /api/services did not parse: {e}"))
        })?;
        for s in services {
            let Some(i) = names.iter().position(|n| *n == s.name) else {
                continue;
            };
            let t = &mut out[i];
            t.latency_count += s.latency_count;
            t.latency_sum += s.latency_sum_seconds;
            for e in s.endpoints {
                t.requests += e.requests;
                t.errors += e.responses[4] + e.failures;
            }
        }
    }
    Ok(out)
}

/// Why the new service is worse than the old one, if it is.
pub fn verdict(plan: &Canary, old: &Totals, new: &Totals) -> Option<String> {
    if new.requests < plan.min_requests {
        return None;
    }
    let (eo, en) = (old.error_rate(), new.error_rate());
    if en > eo + plan.max_error_increase {
        return Some(format!(
            "{} answered {:.1}% errors ({} of {}) against {:.1}% for {} (allowed: +{:.1} points)",
            plan.to,
            en * 100.0,
            new.errors,
            new.requests,
            eo * 100.0,
            plan.from,
            plan.max_error_increase * 100.0
        ));
    }
    let (lo, ln) = (old.mean_latency(), new.mean_latency());
    if old.latency_count > 0
        && ln > lo * plan.max_latency_ratio
        && ln - lo > plan.latency_floor.as_secs_f64()
    {
        return Some(format!(
            "{} took {:.1} ms on average against {:.1} ms for {} (allowed: {}x)",
            plan.to,
            ln * 1000.0,
            lo * 1000.0,
            plan.from,
            plan.max_latency_ratio
        ));
    }
    None
}

/// The route with `pct` percent of its traffic on `to`.
fn at_step(original: &RouteSpec, plan: &Canary, pct: u8) -> RouteSpec {
    let mut spec = original.clone();
    spec.map = None;
    spec.map_key = None;
    spec.map_default = None;
    if pct >= 100 {
        spec.service = Some(plan.to.clone());
        spec.split = Vec::new();
    } else {
        spec.service = None;
        spec.split = vec![
            SplitSpec {
                service: plan.from.clone(),
                weight: u32::from(100 - pct),
            },
            SplitSpec {
                service: plan.to.clone(),
                weight: u32::from(pct),
            },
        ];
    }
    spec
}

/// How a canary ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Promoted,
    RolledBack(String),
}

/// What a route sends traffic to, in words.
fn describe(spec: &RouteSpec) -> String {
    match spec.target() {
        Ok(RouteTarget::Service(s)) => format!("sends everything to {s}"),
        Ok(RouteTarget::Split(arms)) => {
            let arms: Vec<String> = arms
                .iter()
                .map(|a| format!("{} {}", a.service, a.weight))
                .collect();
            format!("splits between {}", arms.join(", "))
        }
        Ok(RouteTarget::Map { map, key, .. }) => format!("looks its service up in {map}[{key}]"),
        Err(why) => format!("has no valid target ({why})"),
    }
}

/// A canary starts from a route that sends everything to `from`: the
/// route it restores on abort is then the one the plan says it starts
/// from.
fn check_start(original: &RouteSpec, plan: &Canary) -> Result<(), DeployError> {
    if plan.from == plan.to {
        return Err(DeployError::Failed(format!(
            "--from and --to are both {}: nothing to move",
            plan.to
        )));
    }
    match original.target() {
        Ok(RouteTarget::Service(s)) if s == plan.from => Ok(()),
        _ => Err(DeployError::Failed(format!(
            "route {} {}, not everything to {}: a canary moves a route from one service to another",
            plan.route,
            describe(original),
            plan.from
        ))),
    }
}

/// How the steps ended, before the route is restored or left.
enum Steps {
    Promoted,
    Worse(String),
}

/// Moves the route step by step, judging `to` between steps.
async fn steps(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Canary,
    progress: &Progress,
    original: &RouteSpec,
) -> Result<Steps, DeployError> {
    // Steps observed, and whether any saw enough requests to `to` to
    // judge it. A plan of `100` alone observes nothing and asks for none.
    let (mut observed, mut judged) = (0, false);
    for &pct in plan.steps.steps() {
        if pct >= 100 && observed > 0 && !judged {
            return Ok(Steps::Worse(format!(
                "fewer than {} requests reached {} at every step: not enough to judge it, so it is not promoted (a lower --min-requests promotes on less traffic)",
                plan.min_requests, plan.to
            )));
        }
        let rev = store
            .put_route(&plan.route, &at_step(original, plan, pct))
            .await?;
        progress.say(format!("{pct}% to {} (revision {rev})", plan.to));
        watch::until_applied(fleet, progress, rev, plan.timeout)
            .await
            .map_err(|why| DeployError::Failed(format!("step {pct}% not confirmed: {why}")))?;
        if pct >= 100 {
            break;
        }
        let before = totals(fleet, [&plan.from, &plan.to]).await?;
        progress.say(format!("observing for {:?}", plan.interval));
        tokio::time::sleep(plan.interval).await;
        let after = totals(fleet, [&plan.from, &plan.to]).await?;
        observed += 1;
        let (old, new) = (after[0].since(&before[0]), after[1].since(&before[1]));
        progress.say(format!(
            "  {}: {} requests, {:.1}% errors, {:.1} ms mean; {}: {} requests, {:.1}% errors, {:.1} ms mean",
            plan.from,
            old.requests,
            old.error_rate() * 100.0,
            old.mean_latency() * 1000.0,
            plan.to,
            new.requests,
            new.error_rate() * 100.0,
            new.mean_latency() * 1000.0
        ));
        if new.requests < plan.min_requests {
            progress.say(format!(
                "  fewer than {} requests reached {}: no verdict at this step",
                plan.min_requests, plan.to
            ));
        } else {
            judged = true;
        }
        if let Some(why) = verdict(plan, &old, &new) {
            return Ok(Steps::Worse(why));
        }
        // The new service may have lost its instances meanwhile: requests
        // that find none are not counted on any of its endpoints.
        watch::until(
            fleet,
            progress,
            &format!(
                "every proxy still has a ready, healthy instance of {}",
                plan.to
            ),
            plan.timeout,
            |v| watch::serves(v, &plan.to),
        )
        .await
        .map_err(|why| {
            DeployError::Failed(format!("{} cannot take more traffic: {why}", plan.to))
        })?;
    }
    Ok(Steps::Promoted)
}

/// Writes the original route back and waits until every proxy applied it.
async fn restore(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Canary,
    progress: &Progress,
    original: &RouteSpec,
) -> Result<(), String> {
    let rev = store
        .put_route(&plan.route, original)
        .await
        .map_err(|e| e.to_string())?;
    progress.say(format!("route {} restored (revision {rev})", plan.route));
    watch::until_applied(fleet, progress, rev, plan.timeout)
        .await
        .map(|_| ())
        .map_err(|w| format!("the restored route is written but not confirmed: {w}"))
}

pub async fn canary(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Canary,
    progress: &Progress,
    interrupt: &Interrupt,
) -> Result<Outcome, DeployError> {
    let Some(original) = store.route(&plan.route).await? else {
        return Err(DeployError::Failed(format!(
            "route {} is not in the registry (<pointsman>/routes/{}): a canary moves a registry route",
            plan.route, plan.route
        )));
    };
    let original = original.value;
    check_start(&original, plan)?;
    progress.say(format!(
        "canary on route {}: {} -> {} in steps {}",
        plan.route, plan.from, plan.to, plan.steps
    ));
    // No traffic for a service some proxy cannot send it to: its requests
    // would fail without being counted on any of its instances.
    watch::until_serving(fleet, progress, &plan.to, plan.timeout)
        .await
        .map_err(|why| {
            DeployError::Failed(format!(
                "not starting the canary: {why}; route {} is unchanged",
                plan.route
            ))
        })?;

    let moved = tokio::select! {
        r = steps(store, fleet, plan, progress, &original) => r,
        _ = interrupt.fired() => Err(DeployError::Failed("interrupted".into())),
    };
    match moved {
        Ok(Steps::Promoted) => {
            progress.say(format!(
                "promoted: route {} sends everything to {}",
                plan.route, plan.to
            ));
            Ok(Outcome::Promoted)
        }
        Ok(Steps::Worse(why)) => {
            progress.say(format!("abort: {why}"));
            restore(store, fleet, plan, progress, &original)
                .await
                .map_err(|w| DeployError::Failed(format!("aborted ({why}), but {w}")))?;
            Ok(Outcome::RolledBack(why))
        }
        // Whatever stopped the canary half way, the route goes back to
        // where it started rather than staying split.
        Err(e) => {
            progress.say(format!(
                "canary stopped: {e}; putting route {} back",
                plan.route
            ));
            match restore(store, fleet, plan, progress, &original).await {
                Ok(()) => Err(DeployError::Failed(format!(
                    "canary stopped and rolled back: {e}"
                ))),
                Err(w) => Err(DeployError::Failed(format!(
                    "canary stopped: {e}; putting route {} back failed: {w}",
                    plan.route
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Canary {
        Canary {
            route: "api".into(),
            from: "v1".into(),
            to: "v2".into(),
            steps: CanarySteps::parse("10,50,100").expect("steps"),
            interval: Duration::from_secs(1),
            max_error_increase: 0.02,
            max_latency_ratio: 2.0,
            latency_floor: Duration::from_millis(5),
            min_requests: 10,
            timeout: Duration::from_secs(5),
        }
    }

    fn t(requests: u64, errors: u64, mean_ms: f64) -> Totals {
        Totals {
            requests,
            errors,
            latency_count: requests,
            latency_sum: requests as f64 * mean_ms / 1000.0,
        }
    }

    #[test]
    fn errors_beyond_the_threshold_abort() {
        let p = plan();
        assert_eq!(verdict(&p, &t(100, 0, 1.0), &t(100, 1, 1.0)), None);
        let why = verdict(&p, &t(100, 0, 1.0), &t(100, 30, 1.0)).expect("abort");
        assert!(why.contains("30.0% errors"), "{why}");
        // Too few requests to judge.
        assert_eq!(verdict(&p, &t(100, 0, 1.0), &t(5, 5, 1.0)), None);
    }

    #[test]
    fn slowness_beyond_ratio_and_floor_aborts() {
        let p = plan();
        // 3x slower but only 2 ms more: under the floor.
        assert_eq!(verdict(&p, &t(100, 0, 1.0), &t(100, 0, 3.0)), None);
        let why = verdict(&p, &t(100, 0, 10.0), &t(100, 0, 40.0)).expect("abort");
        assert!(why.contains("40.0 ms"), "{why}");
    }

    #[test]
    fn a_canary_starts_only_from_a_route_on_the_old_service() {
        let p = plan();
        let on = |service: &str| RouteSpec {
            path_prefix: "/".into(),
            service: Some(service.into()),
            ..RouteSpec::default()
        };
        assert!(check_start(&on("v1"), &p).is_ok());
        let err = check_start(&on("v0"), &p).expect_err("another service");
        assert!(
            err.to_string()
                .contains("route api sends everything to v0, not everything to v1"),
            "{err}"
        );
        // Half way through an earlier canary: restoring "the original"
        // would restore the split.
        let split = at_step(&on("v1"), &p, 10);
        let err = check_start(&split, &p).expect_err("a split");
        assert!(
            err.to_string().contains("splits between v1 90, v2 10"),
            "{err}"
        );
        let mapped = RouteSpec {
            path_prefix: "/".into(),
            map: Some("colour".into()),
            map_key: Some("live".into()),
            ..RouteSpec::default()
        };
        let err = check_start(&mapped, &p).expect_err("a map");
        assert!(err.to_string().contains("colour[live]"), "{err}");
        let mut same = plan();
        same.to = "v1".into();
        assert!(check_start(&on("v1"), &same).is_err());
    }

    #[test]
    fn steps_split_then_point_at_the_new_service() {
        let p = plan();
        let original = RouteSpec {
            path_prefix: "/api".into(),
            service: Some("v1".into()),
            ..RouteSpec::default()
        };
        let s = at_step(&original, &p, 10);
        assert_eq!(s.service, None);
        assert_eq!(s.split.len(), 2);
        assert_eq!((s.split[0].weight, s.split[1].weight), (90, 10));
        assert!(s.target().is_ok());
        let s = at_step(&original, &p, 100);
        assert_eq!(s.service.as_deref(), Some("v2"));
        assert!(s.split.is_empty());
        assert_eq!(s.path_prefix, "/api");
    }
}
