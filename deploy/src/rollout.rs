//! `pointsman deploy`: the rollouts of `pointsman-deploy` on the command
//! line. Each one writes to etcd and waits until every proxy registered
//! under `<pointsman>/proxies/` confirms each step, printing progress.
//!
//! SIGINT or SIGTERM stops a rollout cleanly: the step under way is undone
//! (a drained instance put back, a canary's route restored) and the
//! command exits non-zero; a second signal exits at once.

use std::time::Duration;

use crate::canary::{self, Canary, Outcome};
use crate::fleet::Fleet;
use crate::replace::{self, Replace};
use crate::rolling::{self, Rolling};
use crate::switch::{self, Switch};
use crate::watch::{Interrupt, Progress};
use crate::{CanarySteps, DeployError, PlanError, Store};

use crate::cli::{ArgsError, EtcdArgs, FleetArgs};
use pointsman_discovery::EtcdError;

/// `pointsman deploy`'s arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct DeployArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(subcommand)]
    pub command: DeployCommand,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 500ms, 30s, 2m)"))
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum DeployCommand {
    /// Replace every instance of a service, one at a time: drain it on
    /// every proxy, stop it, start it, wait until every proxy sees it
    /// healthy, put it back. `{id}`, `{address}` and `{service}` are
    /// replaced in the commands; the start command must return once the
    /// instance is started.
    Rolling {
        #[arg(long)]
        service: String,
        #[arg(long)]
        stop_cmd: String,
        #[arg(long)]
        start_cmd: String,
        /// Longest wait for an instance's drain on every proxy; then the
        /// rollout stops with the instance serving (or goes on with
        /// --on-unconfirmed proceed).
        #[arg(long, value_parser = duration, default_value = "30s")]
        drain_timeout: Duration,
        /// Longest wait for a new instance to register and be healthy
        /// everywhere; then the rollout stops and restores its state.
        #[arg(long, value_parser = duration, default_value = "60s")]
        health_timeout: Duration,
    },
    /// Replace a service's instances by one at --target: register it,
    /// wait until every proxy sends it requests, then drain and
    /// deregister the old ones. With --pause (for an app that cannot run
    /// twice), pause the service, drain and stop the old instance, start
    /// and confirm the new one, resume: requests wait instead of failing.
    Replace {
        #[arg(long)]
        service: String,
        /// The new instance's address (host:port).
        #[arg(long)]
        target: String,
        /// The new instance's id [default: the target].
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        pause: bool,
        /// Starts the new instance before it is registered; `{id}`,
        /// `{address}`, `{service}` are replaced.
        #[arg(long)]
        start_cmd: Option<String>,
        /// Stops each old instance once no proxy sends to it.
        #[arg(long)]
        stop_cmd: Option<String>,
        #[arg(long, value_parser = duration, default_value = "30s")]
        drain_timeout: Duration,
        #[arg(long, value_parser = duration, default_value = "60s")]
        health_timeout: Duration,
    },
    /// Blue/green: point a map entry at another service in one write and
    /// wait until every proxy applied it.
    Switch {
        #[arg(long)]
        map: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        to: String,
        /// Then wait until no proxy has a request in flight to the previous
        /// target.
        #[arg(long)]
        drain_old: bool,
        #[arg(long, value_parser = duration, default_value = "60s")]
        timeout: Duration,
    },
    /// Switch a map entry back to the value its last `deploy switch`
    /// replaced.
    Rollback {
        #[arg(long)]
        map: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        drain_old: bool,
        #[arg(long, value_parser = duration, default_value = "60s")]
        timeout: Duration,
    },
    /// Move a route's traffic from one service to another in steps,
    /// comparing the new service's errors and latency with the old one's
    /// between steps; roll back when it does worse.
    Canary {
        /// The route's name (`<pointsman>/routes/<name>`).
        #[arg(long)]
        route: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Percentages of traffic for the new service, ending at 100.
        #[arg(long, default_value = "1,5,25,50,100")]
        steps: String,
        /// Time at each step before the comparison.
        #[arg(long, value_parser = duration, default_value = "30s")]
        interval: Duration,
        /// How much higher the new service's error rate may be (0.02 = two
        /// percentage points).
        #[arg(long, default_value_t = 0.02)]
        max_error_increase: f64,
        /// How many times the old service's mean latency the new one may
        /// take (and at least 5 ms more before it counts).
        #[arg(long, default_value_t = 2.0)]
        max_latency_ratio: f64,
        /// Fewer requests than this to the new service at a step: no
        /// verdict at that step; with no verdict at any step the new
        /// service is not promoted.
        #[arg(long, default_value_t = 20)]
        min_requests: u64,
        #[arg(long, value_parser = duration, default_value = "60s")]
        timeout: Duration,
    },
}

/// Why `pointsman deploy` stopped; each message says what happened and,
/// where there is one, what to do.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("deploy works through etcd: give --etcd URL")]
    NoEtcd,
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error("etcd")]
    Fleet(#[source] EtcdError),
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error("interrupted: if the switch was written (see above), it stays; undo it with `deploy rollback`")]
    SwitchInterrupted,
    #[error("interrupted: if the rollback was written (see above), it stays")]
    RollbackInterrupted,
    #[error("interrupted: check the service's instances with `pointsman ctl status`")]
    ReplaceInterrupted,
    #[error("canary aborted and rolled back: {0}")]
    CanaryRolledBack(String),
    #[error("cannot handle {signal}")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl From<PlanError> for RolloutError {
    fn from(e: PlanError) -> Self {
        RolloutError::Deploy(DeployError::Plan(e))
    }
}

pub async fn run(args: DeployArgs) -> Result<(), RolloutError> {
    let Some(etcd) = args.etcd.options()? else {
        return Err(RolloutError::NoEtcd);
    };
    let mut store = Store::connect(&etcd).await?;
    let mut fleet = Fleet::new(etcd).map_err(RolloutError::Fleet)?;
    args.fleet.apply(&mut fleet);
    let progress = Progress::new();
    let interrupt = Interrupt::new();
    watch_signals(interrupt.clone())?;
    match args.command {
        DeployCommand::Rolling {
            service,
            stop_cmd,
            start_cmd,
            drain_timeout,
            health_timeout,
        } => {
            let plan = Rolling {
                service,
                stop_cmd,
                start_cmd,
                drain_timeout,
                health_timeout,
            };
            rolling::rolling(&mut store, &mut fleet, &plan, &progress, &interrupt).await?;
        }
        DeployCommand::Replace {
            service,
            target,
            id,
            pause,
            start_cmd,
            stop_cmd,
            drain_timeout,
            health_timeout,
        } => {
            target
                .parse::<pointsman_discovery::Address>()
                .map_err(|e| DeployError::Failed(format!("--target: {e}")))?;
            let plan = Replace {
                service,
                id: id.unwrap_or_else(|| target.clone()),
                target,
                pause,
                start_cmd,
                stop_cmd,
                drain_timeout,
                health_timeout,
            };
            let interrupted = tokio::select! {
                r = replace::replace(&mut store, &mut fleet, &plan, &progress) => { r?; false }
                _ = interrupt.fired() => true,
            };
            if interrupted {
                // A paused service answers nobody: resume it on the way out.
                if plan.pause {
                    let rev = store.delete_pause(&plan.service).await?;
                    progress.say(format!("{}: resumed (revision {rev})", plan.service));
                }
                return Err(RolloutError::ReplaceInterrupted);
            }
        }
        DeployCommand::Switch {
            map,
            key,
            to,
            drain_old,
            timeout,
        } => {
            let plan = Switch {
                map,
                key,
                to,
                drain_old,
                timeout,
            };
            tokio::select! {
                r = switch::switch(&mut store, &mut fleet, &plan, &progress) => { r?; }
                _ = interrupt.fired() => return Err(RolloutError::SwitchInterrupted),
            }
        }
        DeployCommand::Rollback {
            map,
            key,
            drain_old,
            timeout,
        } => {
            tokio::select! {
                r = switch::rollback(
                    &mut store, &mut fleet, &map, &key, drain_old, timeout, &progress,
                ) => { r?; }
                _ = interrupt.fired() => return Err(RolloutError::RollbackInterrupted),
            }
        }
        DeployCommand::Canary {
            route,
            from,
            to,
            steps,
            interval,
            max_error_increase,
            max_latency_ratio,
            min_requests,
            timeout,
        } => {
            let plan = Canary {
                route,
                from,
                to,
                steps: CanarySteps::parse(&steps)?,
                interval,
                max_error_increase,
                max_latency_ratio,
                latency_floor: Duration::from_millis(5),
                min_requests,
                timeout,
            };
            match canary::canary(&mut store, &mut fleet, &plan, &progress, &interrupt).await? {
                Outcome::Promoted => {}
                Outcome::RolledBack(why) => return Err(RolloutError::CanaryRolledBack(why)),
            }
        }
    }
    Ok(())
}

/// Fires `interrupt` on the first SIGINT or SIGTERM, so the rollout undoes
/// its step under way; exits at once on the second.
fn watch_signals(interrupt: Interrupt) -> Result<(), RolloutError> {
    use tokio::signal::unix::{signal, SignalKind};
    let handle = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|source| RolloutError::Signal {
            signal: name,
            source,
        })
    };
    let mut int = handle(SignalKind::interrupt(), "SIGINT")?;
    let mut term = handle(SignalKind::terminate(), "SIGTERM")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        eprintln!("pointsman deploy: {name}: undoing the step under way (again to quit at once)");
        interrupt.fire();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("pointsman deploy: second signal: quitting; the registry may be left mid-step");
        std::process::exit(130);
    });
    Ok(())
}
