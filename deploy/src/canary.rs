//! Canary: a route's traffic moves from one service to another in weight
//! steps. Between steps the new service's error rate and mean latency,
//! counted by the proxies themselves, are compared with the old one's; a
//! new service that does worse beyond the thresholds ends the canary and
//! puts the route back as it was.

use std::time::Duration;

use pointsman_discovery::fleet::{http_get, Fleet};
use pointsman_discovery::{RouteSpec, SplitSpec};
use serde::Deserialize;

use crate::watch::{self, Progress};
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

#[derive(Deserialize)]
struct ServiceCounters {
    name: String,
    #[serde(default)]
    latency_count: u64,
    #[serde(default)]
    latency_sum_seconds: f64,
    #[serde(default)]
    endpoints: Vec<EndpointCounters>,
}

#[derive(Deserialize)]
struct EndpointCounters {
    #[serde(default)]
    requests: u64,
    #[serde(default)]
    responses: [u64; 5],
    #[serde(default)]
    failures: u64,
}

/// Sums the counters of services `names` over every live proxy.
pub async fn totals(fleet: &mut Fleet, names: [&str; 2]) -> Result<[Totals; 2], DeployError> {
    let (records, _) = fleet.proxies().await.map_err(|e| DeployError::Registry {
        what: "list the proxies".into(),
        reason: e.to_string(),
    })?;
    let mut out = [Totals::default(); 2];
    for r in records {
        let answer = http_get(&r.admin, "/api/services", fleet.probe_timeout)
            .await
            .map_err(|e| DeployError::Failed(format!("proxy {} ({}): {e}", r.id, r.admin)))?;
        let services: Vec<ServiceCounters> = serde_json::from_slice(&answer.body).map_err(|e| {
            DeployError::Failed(format!("proxy {}: /api/services did not parse: {e}", r.id))
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

pub async fn canary(
    store: &mut Store,
    fleet: &mut Fleet,
    plan: &Canary,
    progress: &Progress,
) -> Result<Outcome, DeployError> {
    let Some(original) = store.route(&plan.route).await? else {
        return Err(DeployError::Failed(format!(
            "route {} is not in the registry (<pointsman>/routes/{}): a canary moves a registry route",
            plan.route, plan.route
        )));
    };
    let original = original.value;
    progress.say(format!(
        "canary on route {}: {} -> {} in steps {}",
        plan.route, plan.from, plan.to, plan.steps
    ));
    for &pct in plan.steps.steps() {
        let rev = store
            .put_route(&plan.route, &at_step(&original, plan, pct))
            .await?;
        progress.say(format!("{pct}% to {} (revision {rev})", plan.to));
        watch::until(
            fleet,
            progress,
            &format!("every proxy applied revision {rev}"),
            plan.timeout,
            |v| watch::applied(v, rev),
        )
        .await
        .map_err(|why| DeployError::Failed(format!("step {pct}% not confirmed: {why}")))?;
        if pct >= 100 {
            break;
        }
        let before = totals(fleet, [&plan.from, &plan.to]).await?;
        progress.say(format!("observing for {:?}", plan.interval));
        tokio::time::sleep(plan.interval).await;
        let after = totals(fleet, [&plan.from, &plan.to]).await?;
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
        }
        if let Some(why) = verdict(plan, &old, &new) {
            progress.say(format!("abort: {why}"));
            let rev = store.put_route(&plan.route, &original).await?;
            progress.say(format!("route {} restored (revision {rev})", plan.route));
            watch::until(
                fleet,
                progress,
                &format!("every proxy applied revision {rev}"),
                plan.timeout,
                |v| watch::applied(v, rev),
            )
            .await
            .map_err(|w| DeployError::Failed(format!("rollback written but not confirmed: {w}")))?;
            return Ok(Outcome::RolledBack(why));
        }
    }
    progress.say(format!(
        "promoted: route {} sends everything to {}",
        plan.route, plan.to
    ));
    Ok(Outcome::Promoted)
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
