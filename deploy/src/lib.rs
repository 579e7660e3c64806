//! pointsman-deploy: how backends change safely. Everything that writes the
//! registry and waits on the fleet of proxies lives here; the `pointsman`
//! binary dispatches its `register`, `ctl` and `deploy` commands to it.
//!
//! - [`register`]: the sidekick that registers an app once it is healthy,
//!   keeps its lease, and on SIGTERM drains it fleet-wide before passing
//!   the signal on;
//! - [`ctl`]: instance state, weight and maps, fleet-wide or on one proxy;
//! - [`rollout`]: the `pointsman deploy` command over the rollouts below;
//! - [`cli`]: the registry flags the commands share;
//! - [`registrar`]: one instance's registration kept in etcd under a lease;
//! - [`fleet`]: the proxies that follow etcd, and whether every one of them
//!   has applied a revision and stopped sending to an instance.
//!
//! Rollouts drive registry state and wait for every proxy replica to
//! confirm each step through its admin API:
//!
//! - [`switch`]: blue/green, one map entry in one write, and its rollback;
//! - [`rolling`]: one instance at a time drained, stopped, started,
//!   confirmed healthy everywhere, put back;
//! - [`canary`]: a route's weight moved step by step, judged on the
//!   proxies' own error and latency counters;
//! - [`store`]: the registry as these tools write it;
//! - [`watch`]: the wait-for-the-fleet loop and the progress lines.
#![forbid(unsafe_code)]

use std::fmt;

pub mod canary;
pub mod cli;
pub mod ctl;
pub mod fleet;
pub mod register;
pub mod registrar;
pub mod replace;
pub mod rolling;
pub mod rollout;
pub mod store;
pub mod switch;
pub mod watch;

pub use store::{Store, Versioned};

/// Why a rollout step or a registry write failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("registry: cannot {what}: {reason}")]
    Registry { what: String, reason: String },
    #[error("registry: {key} holds a value that does not parse: {reason}")]
    Malformed { key: String, reason: String },
    #[error("registry: {0} kept changing under us; try again")]
    Contended(String),
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("{0}")]
    Failed(String),
}

/// The weight steps of a canary: percentages of traffic for the new target,
/// strictly increasing, ending at 100.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanarySteps(Vec<u8>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("canary steps are empty: give percentages like 1,5,25,50,100")]
    Empty,
    #[error("canary step {0:?} is not a whole percentage from 1 to 100")]
    NotAPercentage(String),
    #[error("canary steps must increase: {prev} is followed by {next}")]
    NotIncreasing { prev: u8, next: u8 },
    #[error("the last canary step is {0}: it must be 100, so the rollout finishes")]
    DoesNotFinish(u8),
}

impl CanarySteps {
    /// Parses `1,5,25,50,100`.
    pub fn parse(s: &str) -> Result<CanarySteps, PlanError> {
        let mut steps = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let pct: u8 = part
                .trim_end_matches('%')
                .parse()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| PlanError::NotAPercentage(part.to_string()))?;
            if let Some(&prev) = steps.last() {
                if pct <= prev {
                    return Err(PlanError::NotIncreasing { prev, next: pct });
                }
            }
            steps.push(pct);
        }
        match steps.last() {
            None => Err(PlanError::Empty),
            Some(&last) if last != 100 => Err(PlanError::DoesNotFinish(last)),
            Some(_) => Ok(CanarySteps(steps)),
        }
    }

    pub fn steps(&self) -> &[u8] {
        &self.0
    }

    /// The split weights (old, new) for each step, out of 100.
    pub fn weights(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.0.iter().map(|&p| (100 - u32::from(p), u32::from(p)))
    }
}

impl fmt::Display for CanarySteps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|p| format!("{p}%")).collect();
        f.write_str(&parts.join(" -> "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_increasing_steps_to_100() {
        let s = CanarySteps::parse("1,5,25, 50,100").expect("valid");
        assert_eq!(s.steps(), &[1, 5, 25, 50, 100]);
        assert_eq!(s.weights().next(), Some((99, 1)));
        assert_eq!(s.to_string(), "1% -> 5% -> 25% -> 50% -> 100%");
    }

    #[test]
    fn refuses_plans_that_do_not_finish_or_go_back() {
        assert_eq!(CanarySteps::parse(""), Err(PlanError::Empty));
        assert_eq!(
            CanarySteps::parse("5,50"),
            Err(PlanError::DoesNotFinish(50))
        );
        assert_eq!(
            CanarySteps::parse("5,1,100"),
            Err(PlanError::NotIncreasing { prev: 5, next: 1 })
        );
        assert!(matches!(
            CanarySteps::parse("0,100"),
            Err(PlanError::NotAPercentage(_))
        ));
        assert!(matches!(
            CanarySteps::parse("x"),
            Err(PlanError::NotAPercentage(_))
        ));
    }
}
