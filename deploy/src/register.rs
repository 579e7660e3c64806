//! `pointsman register`: the sidekick that makes an app safe to stop.
//!
//! It registers the app in etcd (under a lease, kept alive) or with the
//! local Consul agent (with a check) only once the app passes its check,
//! and takes it out of rotation before it stops:
//!
//! 1. start the app (`-- CMD ARGS`) as a child, if given; wait until it
//!    passes its check (TCP connect by default, or `--check-http PATH`),
//!    giving up after `--check-timeout`;
//! 2. etcd: register `<services>/<service>/<id>`; keep the lease alive,
//!    register again under a new lease if etcd loses it; keep checking,
//!    and set the instance to `maint` while the check keeps failing.
//!    Consul: register through the agent API with an HTTP check that the
//!    agent runs (`--check-http`) or a TTL check that the sidekick passes
//!    every TTL/3 while the app passes its check and fails while the check
//!    keeps failing; register again if the agent forgets the instance;
//! 3. on SIGTERM or SIGINT: rewrite the registration with state `drain`
//!    (etcd: at revision R; Consul: meta `pointsman-state: drain`), wait
//!    until every proxy has stopped sending to the instance and has no
//!    request in flight to it (bounded by `--drain-timeout`), delete the
//!    registration, then pass the signal to the app and exit with its exit
//!    code. With etcd the proxies are the live records under
//!    `<pointsman>/proxies/`, and each must have applied R; with Consul
//!    they are the `--proxy-admin` addresses, each asked until it shows the
//!    instance gone or not ready with nothing in flight twice in a row, or,
//!    with none given, the proxies following Consul get [`CONSUL_GRACE`]
//!    to see the drain. SIGHUP, SIGUSR1 and SIGUSR2 are passed on as they
//!    come. If the app exits on its own, the registration is deleted at
//!    once and its exit code is ours.
//!
//! Without a command, the sidekick registers an app that runs elsewhere
//! (a systemd unit beside it) and does the same on SIGTERM, exiting 0.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use crate::fleet::{ask_all, judge_drained, FleetCheck};
use crate::fleet::{Expectation, Fleet, FleetError, OnUnconfirmed};
use crate::registrar::Registrar;
use pointsman_discovery::backoff::Backoff;
use pointsman_discovery::check::{self, ConnectFailure, RiseFall, DEFAULT_EXPECT_STATUS};
use pointsman_discovery::consul::{Agent, AgentCheck, AgentService, ConsulError, TtlStatus};
use pointsman_discovery::http::http_get;
use pointsman_discovery::{Address, AdminState, ConsulOptions, LeaseState, Registration};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Mutex};
use tokio::time::{sleep, timeout, Instant};

/// Time between checks while waiting for the app to become healthy.
const START_POLL: Duration = Duration::from_millis(200);
/// Limit of one check.
const CHECK_LIMIT: Duration = Duration::from_secs(2);
/// Passes in a row that bring an app set to `maint` back to `ready`.
const RISE: u32 = 2;
/// How long an app that failed to start gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// How often the drain's progress is logged while nothing changes.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Time between two rounds of asking the `--proxy-admin` proxies.
const PROXY_POLL: Duration = Duration::from_millis(100);
/// Limit of one proxy's answer while draining.
const PROXY_LIMIT: Duration = Duration::from_secs(2);
/// The exit code when a drain is not confirmed (EX_TEMPFAIL).
const UNCONFIRMED_EXIT: u8 = 75;
/// How often the proxies in etcd are listed while the app runs, so that a
/// drain also waits for a proxy whose record expired before it started.
const FLEET_REFRESH: Duration = Duration::from_secs(5);
/// With Consul and no `--proxy-admin`: how long the proxies following
/// Consul get to see the drain (a blocking query wakes on the change, so
/// they normally see it within milliseconds) before the instance is
/// deregistered.
pub const CONSUL_GRACE: Duration = Duration::from_secs(2);
/// Consul removes an instance whose check has been critical this long: a
/// sidekick killed without deregistering leaves nothing behind for good.
const CONSUL_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
/// Attempts at deregistering from Consul, and the pause between them.
const CONSUL_DEREGISTER_TRIES: u32 = 3;
const CONSUL_DEREGISTER_PAUSE: Duration = Duration::from_millis(300);

const EXAMPLES: &str = "Examples:
  # the app as a child (a container entrypoint):
  pointsman register --etcd http://etcd:2379 --service web --address 10.0.0.5:8080 \\
      --check-http /healthz -- /app/server --port 8080
  # an app that runs beside it (a systemd unit of its own):
  pointsman register --etcd http://127.0.0.1:2379 --service web --address 10.0.0.5:8080
  # with the local Consul agent, waiting for two proxies on SIGTERM:
  pointsman register --consul http://127.0.0.1:8500 --service web --address 10.0.0.5:8080 \\
      --proxy-admin 10.0.0.1:8404 --proxy-admin 10.0.0.2:8404 -- /app/server --port 8080";

/// `pointsman register`'s flags.
#[derive(clap::Args, Clone, Debug)]
#[command(after_help = EXAMPLES)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub etcd: crate::cli::EtcdArgs,
    /// Register with the Consul agent instead of etcd (give exactly one of
    /// --etcd and --consul; with several URLs, the first is the agent).
    #[command(flatten)]
    pub consul: crate::cli::ConsulArgs,
    #[command(flatten)]
    pub fleet: crate::cli::FleetArgs,
    /// The admin address of a proxy (repeatable) to ask, on SIGTERM, until
    /// it has stopped sending to the app. With --etcd the proxies are found
    /// in etcd and these are asked as well; with --consul only these are
    /// asked [default: none: the proxies get 2s to see the drain].
    #[arg(long = "proxy-admin", value_name = "HOST:PORT", value_parser = parse_address)]
    pub proxy_admin: Vec<Address>,
    /// Service to register the app in.
    #[arg(long, env = "POINTSMAN_SERVICE")]
    pub service: String,
    /// Where proxies reach the app (host:port); also where it is checked.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_address, env = "POINTSMAN_ADDRESS")]
    pub address: Address,
    /// Instance id [default: <host name>:<port of --address>].
    #[arg(long, env = "POINTSMAN_ID")]
    pub id: Option<String>,
    /// etcd: the lease TTL, how long the registration outlives a sidekick
    /// killed without a chance to deregister. Consul (without
    /// --check-http): the TTL of the check the sidekick passes every TTL/3;
    /// the instance is unroutable this long after the sidekick stopped, and
    /// removed by Consul a minute later.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub ttl: Duration,
    /// Weight, 0 to 256.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub weight: u16,
    /// A tag (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Metadata KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// Check the app with GET http://<address><PATH>: 2xx and 3xx pass
    /// [default: a TCP connect check]. With --consul, the agent then runs
    /// this check (an HTTP check) once the app is registered.
    #[arg(long, value_name = "PATH", conflicts_with = "check_tcp")]
    pub check_http: Option<String>,
    /// Check the app by connecting to its address (the default).
    #[arg(long)]
    pub check_tcp: bool,
    /// Give up (and stop the app) if it has not passed its check this long
    /// after start.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub check_timeout: Duration,
    /// Time between checks once registered (with --consul and
    /// --check-http, the interval of the agent's HTTP check).
    #[arg(long, default_value = "2s", value_parser = positive_duration)]
    pub check_interval: Duration,
    /// Failed checks in a row, once registered, that set the instance to
    /// `maint` (etcd) or fail its TTL check (Consul), so it gets no
    /// traffic until it passes twice in a row.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub check_fall: u32,
    /// Longest wait, on SIGTERM, for every proxy to stop sending to the app
    /// before it gets the signal anyway.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// The app to run as a child, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_address(s: &str) -> Result<Address, String> {
    let a: Address = s
        .parse()
        .map_err(|e: pointsman_discovery::AddressError| e.to_string())?;
    match a.host().parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => Err(format!(
            "{s} is not an address proxies can reach: give the app's own address, e.g. 10.0.0.5:{}",
            a.port()
        )),
        _ => Ok(a),
    }
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0, e.g. 10s".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e}: expected a duration such as 500ms or 10s")),
    }
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE, e.g. version=2")),
    }
}

/// How the app is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Tcp,
    Http(String),
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Tcp => f.write_str("TCP connect"),
            Check::Http(path) => write!(f, "GET {path}"),
        }
    }
}

/// Checks the app at `address` once.
pub async fn check_once(address: &Address, check: &Check) -> Result<(), String> {
    let target = address.to_string();
    match check {
        Check::Tcp => match check::tcp_connect(address, CHECK_LIMIT).await {
            Ok(()) => Ok(()),
            Err(ConnectFailure::Failed(e)) => Err(format!("cannot connect to {target}: {e}")),
            Err(ConnectFailure::TimedOut) => {
                Err(format!("no connection to {target} within {CHECK_LIMIT:?}"))
            }
        },
        Check::Http(path) => {
            let answer = http_get(&target, path, CHECK_LIMIT)
                .await
                .map_err(|e| e.to_string())?;
            if check::status_passes(answer.status, DEFAULT_EXPECT_STATUS) {
                Ok(())
            } else {
                Err(format!(
                    "GET http://{target}{path}: status {}",
                    answer.status
                ))
            }
        }
    }
}

/// Runs the sidekick; the process's exit code.
pub fn main(args: RegisterArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pointsman register: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        match Sidekick::new(args) {
            Ok(s) => s.run().await,
            Err(Exit { code, message }) => {
                eprintln!("pointsman register: {message}");
                code
            }
        }
    });
    ExitCode::from(code)
}

/// An early exit with a message.
struct Exit {
    code: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Exit {
    Exit {
        code: 2,
        message: message.into(),
    }
}

/// A signal the sidekick handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sig {
    Term,
    Int,
    Hup,
    Usr1,
    Usr2,
}

impl Sig {
    fn name(self) -> &'static str {
        match self {
            Sig::Term => "SIGTERM",
            Sig::Int => "SIGINT",
            Sig::Hup => "SIGHUP",
            Sig::Usr1 => "SIGUSR1",
            Sig::Usr2 => "SIGUSR2",
        }
    }

    fn stops(self) -> bool {
        matches!(self, Sig::Term | Sig::Int)
    }

    fn rustix(self) -> rustix::process::Signal {
        use rustix::process::Signal;
        match self {
            Sig::Term => Signal::TERM,
            Sig::Int => Signal::INT,
            Sig::Hup => Signal::HUP,
            Sig::Usr1 => Signal::USR1,
            Sig::Usr2 => Signal::USR2,
        }
    }
}

/// The signals handled, registered before the app starts so none is lost.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.term.recv() => Sig::Term,
            _ = self.int.recv() => Sig::Int,
            _ = self.hup.recv() => Sig::Hup,
            _ = self.usr1.recv() => Sig::Usr1,
            _ = self.usr2.recv() => Sig::Usr2,
        }
    }
}

/// The app, when the sidekick runs it.
struct App {
    child: Child,
    name: String,
}

impl App {
    fn start(command: &[String]) -> Result<App, Exit> {
        let Some((program, args)) = command.split_first() else {
            return Err(usage("no command after `--`"));
        };
        let child = Command::new(program).args(args).spawn().map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            Exit {
                code,
                message: format!("cannot start {program}: {e}"),
            }
        })?;
        tracing::info!(app = %program, pid = ?child.id(), "app started");
        Ok(App {
            child,
            name: program.clone(),
        })
    }

    fn signal(&self, sig: Sig) {
        let Some(pid) = self
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw)
        else {
            return;
        };
        if let Err(e) = rustix::process::kill_process(pid, sig.rustix()) {
            tracing::warn!(app = %self.name, signal = sig.name(), error = %e, "cannot signal the app");
        }
    }

    /// Stops an app that never became healthy: SIGTERM, then SIGKILL.
    async fn stop(&mut self) {
        self.signal(Sig::Term);
        if timeout(KILL_GRACE, self.child.wait()).await.is_err() {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// Waits for the app to exit; never resolves when there is none.
async fn exited(app: &mut Option<App>) -> std::io::Result<ExitStatus> {
    match app {
        Some(app) => app.child.wait().await,
        None => std::future::pending().await,
    }
}

/// The exit code an exit status stands for, as a shell reports it.
fn exit_code(status: &std::io::Result<ExitStatus>) -> u8 {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
            (None, Some(sig)) => u8::try_from(128 + (sig & 0x7f)).unwrap_or(1),
            _ => 1,
        },
        Err(_) => 1,
    }
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("cannot be waited for: {e}"),
    }
}

/// Where the instance is registered.
enum Registry {
    Etcd {
        /// Every proxy seen since start: a drain waits for each of them
        /// (see [`crate::fleet`]).
        fleet: Box<Fleet>,
        /// Taken when deregistering.
        registrar: Option<Registrar>,
    },
    Consul(ConsulRegistration),
}

/// What the registry was told when draining started.
enum Marked {
    /// etcd: the revision of the write.
    Etcd(i64),
    Consul,
}

struct Sidekick {
    args: RegisterArgs,
    check: Check,
    /// The registration in logs: its etcd key, or `<service>/<id>` with
    /// Consul.
    key: String,
    service: String,
    id: String,
    registry: Registry,
}

impl Sidekick {
    fn new(args: RegisterArgs) -> Result<Sidekick, Exit> {
        let etcd = args.etcd.options().map_err(|e| usage(e.to_string()))?;
        let consul = args.consul.options().map_err(|e| usage(e.to_string()))?;
        let id = args.id.clone().unwrap_or_else(|| {
            format!(
                "{}:{}",
                pointsman_discovery::host_name(),
                args.address.port()
            )
        });
        let mut registration = Registration::new(&args.service, id, args.address.clone());
        registration.weight = args.weight;
        registration.tags = args.tags.clone();
        registration.meta = args.meta.iter().cloned().collect();
        let check = match &args.check_http {
            Some(path) if !path.starts_with('/') => {
                return Err(usage(format!(
                    "--check-http {path:?}: expected a path starting with '/', e.g. /healthz"
                )))
            }
            Some(path) => Check::Http(path.clone()),
            None => Check::Tcp,
        };
        let (service, id) = (registration.service.clone(), registration.id.clone());
        let (key, registry) = match (etcd, consul) {
            (Some(_), Some(_)) => {
                return Err(usage(
                    "give one registry: --etcd URL or --consul URL (or POINTSMAN_ETCD or POINTSMAN_CONSUL), not both",
                ))
            }
            (None, None) => {
                return Err(usage(
                    "say where to register: --etcd URL or --consul URL",
                ))
            }
            (Some(options), None) => {
                let registrar = Registrar::new(options.clone(), args.ttl, registration)
                    .map_err(|e| usage(e.to_string()))?;
                let key = registrar.key().to_string();
                let mut fleet = Fleet::new(options).map_err(|e| usage(e.to_string()))?;
                args.fleet.apply(&mut fleet);
                for admin in &args.proxy_admin {
                    fleet.name(&admin.to_string());
                }
                let registry = Registry::Etcd {
                    fleet: Box::new(fleet),
                    registrar: Some(registrar),
                };
                (key, registry)
            }
            (None, Some(options)) => {
                let consul = ConsulRegistration::new(
                    &options,
                    &registration,
                    &check,
                    args.ttl,
                    args.check_interval,
                )
                .map_err(usage)?;
                (format!("{service}/{id}"), Registry::Consul(consul))
            }
        };
        Ok(Sidekick {
            args,
            check,
            key,
            service,
            id,
            registry,
        })
    }

    async fn run(mut self) -> u8 {
        let mut signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("pointsman register: cannot handle signals: {e}");
                return 1;
            }
        };
        let mut app = if self.args.command.is_empty() {
            None
        } else {
            match App::start(&self.args.command) {
                Ok(a) => Some(a),
                Err(Exit { code, message }) => {
                    tracing::error!("{message}");
                    return code;
                }
            }
        };

        // 1. Healthy before anything is registered.
        let key = self.key.clone();
        let address = self.args.address.to_string();
        tracing::info!(address = %address, check = %self.check, "waiting for the app to pass its check");
        let deadline = Instant::now() + self.args.check_timeout;
        let mut last = String::from("not checked yet");
        loop {
            tokio::select! {
                sig = signals.next() => match (sig.stops(), &app) {
                    (true, Some(a)) => {
                        tracing::info!(signal = sig.name(), "stop signal before the app became healthy: passing it on");
                        a.signal(sig);
                        let status = exited(&mut app).await;
                        return exit_code(&status);
                    }
                    (true, None) => return 0,
                    (false, Some(a)) => a.signal(sig),
                    (false, None) => {}
                },
                status = exited(&mut app) => {
                    tracing::error!(status = %describe(&status), "the app exited before it passed its check; nothing was registered");
                    return exit_code(&status);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::error!(
                        address = %address,
                        check = %self.check,
                        "the app did not pass its check within {:?} (last: {last}); giving up",
                        self.args.check_timeout
                    );
                    if let Some(a) = app.as_mut() {
                        a.stop().await;
                    }
                    return 1;
                }
                result = check_once(&self.args.address, &self.check) => match result {
                    Ok(()) => break,
                    Err(e) => {
                        last = e;
                        tokio::select! {
                            _ = sleep(START_POLL) => {}
                            _ = tokio::time::sleep_until(deadline) => {}
                        }
                    }
                }
            }
        }
        tracing::info!(address = %address, "the app passed its check: registering");

        // 2. Registered: keep it so, follow the check, wait for a signal.
        let mut lease = self.register(&key).await;
        let mut lease_followed = lease.is_some();
        // With Consul's HTTP check, the agent checks the app.
        let follow_check = !matches!(&self.registry, Registry::Consul(c) if c.ttl.is_none());
        let mut health_tick = tokio::time::interval(self.args.check_interval);
        health_tick.reset();
        // The app passed its check before it was registered: it starts up.
        let mut rise_fall = RiseFall::new(RISE, self.args.check_fall, true);
        let mut failing = false;
        let mut fleet_tick = tokio::time::interval(FLEET_REFRESH);
        let stop = loop {
            tokio::select! {
                _ = fleet_tick.tick() => self.refresh_fleet().await,
                sig = signals.next() => {
                    if sig.stops() {
                        break sig;
                    }
                    if let Some(a) = &app {
                        a.signal(sig);
                    }
                }
                status = exited(&mut app) => {
                    tracing::warn!(status = %describe(&status), "the app exited: deregistering at once");
                    self.deregister(&key).await;
                    return exit_code(&status);
                }
                changed = lease_changed(&mut lease), if lease_followed => {
                    match (changed, &lease) {
                        (Ok(()), Some(l)) => log_lease(&key, l),
                        _ => lease_followed = false,
                    }
                }
                _ = health_tick.tick(), if follow_check => {
                    let result = check_once(&self.args.address, &self.check).await;
                    let flip = rise_fall.record(result.is_ok(), !failing);
                    match result {
                        Ok(()) => {
                            if flip == Some(true) {
                                failing = false;
                                self.set_failing(&key, None).await;
                            }
                        }
                        Err(e) => {
                            let fails = rise_fall.fails();
                            tracing::warn!(key = %key, failures = fails, "check failed: {e}");
                            if flip == Some(false) {
                                failing = true;
                                self.set_failing(&key, Some((fails, e))).await;
                            }
                        }
                    }
                }
            }
        };

        // 3. Drain, deregister, pass the signal on.
        tracing::info!(signal = stop.name(), key = %key, "stop signal: taking the instance out of rotation");
        match self.drain(&key, &mut signals, &mut app).await {
            Drained::AppExited(status) => {
                tracing::warn!(status = %describe(&status), "the app exited while draining: deregistering at once");
                self.deregister(&key).await;
                return exit_code(&status);
            }
            Drained::Unconfirmed(why) => match self.args.fleet.on_unconfirmed {
                OnUnconfirmed::Fail => {
                    tracing::error!(
                        key = %key,
                        "the drain is not confirmed: {why}; the app is not signalled and the instance stays registered in state drain until its lease expires (--on-unconfirmed proceed would go on)"
                    );
                    return UNCONFIRMED_EXIT;
                }
                OnUnconfirmed::Proceed => tracing::warn!(
                    key = %key,
                    "the drain is not confirmed: {why}; going on as --on-unconfirmed proceed asks"
                ),
            },
            Drained::Done => {}
        }
        self.deregister(&key).await;
        let Some(a) = app else {
            return 0;
        };
        tracing::info!(signal = stop.name(), app = %a.name, "passing the signal to the app");
        a.signal(stop);
        let mut app = Some(a);
        loop {
            tokio::select! {
                status = exited(&mut app) => {
                    tracing::info!(status = %describe(&status), "the app exited");
                    return exit_code(&status);
                }
                sig = signals.next() => {
                    if let Some(a) = &app {
                        a.signal(sig);
                    }
                }
            }
        }
    }

    /// Registers the instance; with etcd, the lease to follow.
    async fn register(&mut self, key: &str) -> Option<watch::Receiver<LeaseState>> {
        match &mut self.registry {
            Registry::Etcd { registrar, .. } => {
                let registrar = registrar.as_ref()?;
                match registrar.register().await {
                    Ok(rev) => {
                        tracing::info!(key = %key, revision = rev, ttl = ?self.args.ttl, "registered")
                    }
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "not registered yet; retrying in the background")
                    }
                }
                let mut lease = registrar.lease_state();
                lease.mark_unchanged();
                Some(lease)
            }
            Registry::Consul(consul) => {
                consul.start(key);
                None
            }
        }
    }

    /// Takes the instance out of rotation while the app keeps failing its
    /// check (`Some((failures, last error))`), or puts it back (`None`).
    async fn set_failing(&mut self, key: &str, failing: Option<(u32, String)>) {
        match &mut self.registry {
            Registry::Etcd { registrar, .. } => {
                let state = match &failing {
                    Some((fails, _)) => {
                        tracing::warn!(key = %key, "the app failed its check {fails} times in a row: state maint (no traffic) until it passes again");
                        AdminState::Maint
                    }
                    None => {
                        tracing::info!(key = %key, "the app passes its check again: state ready");
                        AdminState::Ready
                    }
                };
                if let Some(r) = registrar.as_mut() {
                    if let Err(e) = r.set_state(state).await {
                        tracing::warn!(key = %key, error = %e, "cannot set state {state} yet; retrying in the background");
                    }
                }
            }
            Registry::Consul(consul) => {
                match &failing {
                    Some((fails, _)) => {
                        tracing::warn!(key = %key, "the app failed its check {fails} times in a row: TTL check failing (no traffic) until it passes again")
                    }
                    None => {
                        tracing::info!(key = %key, "the app passes its check again: TTL check passing")
                    }
                }
                consul.set_health(
                    failing
                        .map(|(fails, e)| format!("failed its check {fails} times in a row: {e}")),
                );
            }
        }
    }

    /// Sets state drain and waits for the proxies to stop sending.
    async fn drain(&mut self, key: &str, signals: &mut Signals, app: &mut Option<App>) -> Drained {
        let deadline = Instant::now() + self.args.drain_timeout;
        let marked = tokio::select! {
            m = self.mark_draining(key) => m,
            status = exited(app) => return Drained::AppExited(status),
        };
        let marked = match marked {
            Ok(m) => m,
            Err(why) => return Drained::Unconfirmed(why),
        };
        let this = &mut *self;
        let mut wait = std::pin::pin!(async move {
            match marked {
                Marked::Etcd(revision) => this.wait_for_etcd_proxies(revision, deadline).await,
                Marked::Consul => this.wait_for_consul_proxies(deadline).await,
            }
        });
        loop {
            tokio::select! {
                waited = &mut wait => return match waited {
                    Ok(()) => Drained::Done,
                    Err(why) => Drained::Unconfirmed(why),
                },
                status = exited(app) => return Drained::AppExited(status),
                sig = signals.next() => {
                    if sig.stops() {
                        tracing::warn!(signal = sig.name(), "second stop signal: not waiting for the proxies any longer");
                        return Drained::Done;
                    }
                    if let Some(a) = app.as_ref() {
                        a.signal(sig);
                    }
                }
            }
        }
    }

    /// Lists the proxies in etcd, so a later drain also waits for those
    /// whose record has expired since (cut off from etcd, or frozen).
    async fn refresh_fleet(&mut self) {
        if let Registry::Etcd { fleet, .. } = &mut self.registry {
            if let Err(e) = fleet.refresh().await {
                tracing::debug!(error = %e, "cannot list the proxies now; keeping the ones known");
            }
        }
    }

    /// Writes state drain; why not (logged) when it could not be written.
    async fn mark_draining(&mut self, key: &str) -> Result<Marked, String> {
        let written = match &mut self.registry {
            Registry::Etcd { registrar, .. } => match registrar.as_mut() {
                Some(r) => r
                    .set_state(AdminState::Drain)
                    .await
                    .map(Marked::Etcd)
                    .map_err(|e| e.to_string()),
                None => Err("already deregistered".to_string()),
            },
            Registry::Consul(consul) => consul
                .set_state(AdminState::Drain)
                .await
                .map(|()| Marked::Consul)
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(Marked::Etcd(revision)) => {
                tracing::info!(key = %key, revision, "state drain written; waiting for every proxy to apply it and finish its requests");
                Ok(Marked::Etcd(revision))
            }
            Ok(Marked::Consul) => {
                tracing::info!(key = %key, "state drain written to Consul; waiting for the proxies to stop sending to the instance and finish its requests");
                Ok(Marked::Consul)
            }
            Err(e) => Err(format!(
                "cannot mark the instance draining ({e}): the proxies keep sending to it"
            )),
        }
    }

    /// Waits until every proxy of the fleet (see [`crate::fleet`]) sends
    /// nothing to the instance and will not before it applies `revision`,
    /// or `deadline`; then why not.
    async fn wait_for_etcd_proxies(
        &mut self,
        revision: i64,
        deadline: Instant,
    ) -> Result<(), String> {
        let Registry::Etcd { fleet, .. } = &mut self.registry else {
            return Ok(());
        };
        let mut progress = Progress::default();
        match confirmed_twice(
            fleet,
            &self.service,
            &self.id,
            revision,
            deadline,
            &mut progress,
        )
        .await
        {
            Ok(check) => {
                tracing::info!(
                    "every proxy stopped sending to the instance: {}",
                    check.summary()
                );
                Ok(())
            }
            Err(e) => Err(format!(
                "drain timeout ({:?}) passed: {e}",
                self.args.drain_timeout
            )),
        }
    }

    /// Waits until every `--proxy-admin` proxy sends nothing to the
    /// instance, or `deadline`; without any, gives the proxies following
    /// Consul [`CONSUL_GRACE`] to see the drain.
    async fn wait_for_consul_proxies(&self, deadline: Instant) -> Result<(), String> {
        let proxies: Vec<String> = self
            .args
            .proxy_admin
            .iter()
            .map(|a| a.to_string())
            .collect();
        if proxies.is_empty() {
            let grace = CONSUL_GRACE.min(deadline.saturating_duration_since(Instant::now()));
            tracing::info!("no proxies to ask (no --proxy-admin): giving the proxies that follow Consul {grace:?} to see the drain");
            sleep(grace).await;
            return Ok(());
        }
        let mut progress = Progress::default();
        match proxies_drained(&proxies, &self.service, &self.id, deadline, &mut progress).await {
            Ok(check) => {
                tracing::info!(
                    "every proxy stopped sending to the instance: {}",
                    check.summary()
                );
                Ok(())
            }
            Err(last) => Err(format!(
                "drain timeout ({:?}) passed: not confirmed: {}",
                self.args.drain_timeout,
                last.summary()
            )),
        }
    }

    async fn deregister(&mut self, key: &str) {
        match &mut self.registry {
            Registry::Etcd { registrar, .. } => {
                let Some(registrar) = registrar.take() else {
                    return;
                };
                match registrar.deregister().await {
                    Ok(rev) => tracing::info!(key = %key, revision = rev, "deregistered"),
                    Err(e) => tracing::warn!(
                        key = %key,
                        error = %e,
                        "cannot delete the registration; it expires with its lease within {:?}",
                        self.args.ttl
                    ),
                }
            }
            Registry::Consul(consul) => consul.deregister(key).await,
        }
    }
}

/// Waits for `lease` to change; never resolves without one.
async fn lease_changed(
    lease: &mut Option<watch::Receiver<LeaseState>>,
) -> Result<(), watch::error::RecvError> {
    match lease {
        Some(l) => l.changed().await,
        None => std::future::pending().await,
    }
}

/// The instance as registered with the local Consul agent. Once started, a
/// task of its own keeps it registered: it registers (retrying with backoff
/// while the agent is unreachable), passes the TTL check every TTL/3 (or
/// fails it while the app fails its check), and registers again if the
/// agent forgets the instance.
struct ConsulRegistration {
    agent: Agent,
    /// What is registered; locked while being written.
    service: Arc<Mutex<AgentService>>,
    /// The TTL check's TTL; `None` when the agent runs an HTTP check.
    ttl: Option<Duration>,
    /// `None` while the app passes the sidekick's check; why not otherwise.
    health: watch::Sender<Option<String>>,
    keeper: Option<tokio::task::JoinHandle<()>>,
    backoff: (Duration, Duration),
}

impl ConsulRegistration {
    /// Checks what can be checked before anything is written: options, and
    /// a registration the proxies and Consul would accept.
    fn new(
        options: &ConsulOptions,
        registration: &Registration,
        check: &Check,
        ttl: Duration,
        interval: Duration,
    ) -> Result<ConsulRegistration, String> {
        let key = pointsman_discovery::keys::instance_key(
            &pointsman_discovery::Prefixes::default(),
            &registration.service,
            &registration.id,
        );
        pointsman_discovery::parse_instance(
            &key,
            &registration.service,
            &registration.id,
            crate::registrar::registration_value(registration).as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        let agent = Agent::new(options).map_err(|e| e.to_string())?;
        let (agent_check, ttl) = match check {
            Check::Http(path) => (
                AgentCheck::Http {
                    url: format!("http://{}{path}", registration.address),
                    interval,
                    timeout: CHECK_LIMIT,
                    deregister_critical_after: Some(CONSUL_DEREGISTER_AFTER),
                },
                None,
            ),
            Check::Tcp => (
                AgentCheck::Ttl {
                    ttl,
                    deregister_critical_after: Some(CONSUL_DEREGISTER_AFTER),
                },
                Some(ttl),
            ),
        };
        let service = AgentService::from_registration(registration, Some(agent_check));
        service.payload().map_err(|e| e.to_string())?;
        Ok(ConsulRegistration {
            agent,
            service: Arc::new(Mutex::new(service)),
            ttl,
            health: watch::channel(None).0,
            keeper: None,
            backoff: (options.backoff_min, options.backoff_max),
        })
    }

    /// Starts the task that registers the instance and keeps it so.
    fn start(&mut self, key: &str) {
        if self.keeper.is_none() {
            self.keeper = Some(tokio::spawn(keep_registered(
                self.agent.clone(),
                self.service.clone(),
                self.ttl,
                self.health.subscribe(),
                retry_delay(self.backoff.0, self.backoff.1),
                key.to_string(),
            )));
        }
    }

    /// Whether the TTL check is to pass (`None`) or fail (with why).
    fn set_health(&self, failing: Option<String>) {
        self.health.send_if_modified(|now| {
            if now.is_some() == failing.is_some() {
                return false;
            }
            *now = failing;
            true
        });
    }

    async fn set_state(&self, state: AdminState) -> Result<(), ConsulError> {
        let mut service = self.service.lock().await;
        self.agent.set_state(&mut service, state).await
    }

    /// Stops keeping the instance registered and deregisters it.
    async fn deregister(&mut self, key: &str) {
        let Some(keeper) = self.keeper.take() else {
            return;
        };
        keeper.abort();
        let _ = keeper.await;
        let id = self.service.lock().await.id.clone();
        for attempt in 1..=CONSUL_DEREGISTER_TRIES {
            match self.agent.deregister(&id).await {
                Ok(()) => {
                    tracing::info!(key = %key, agent = %self.agent.url(), "deregistered");
                    return;
                }
                Err(e) if status_of(&e) == Some(404) => {
                    tracing::info!(key = %key, "deregistered (the agent no longer had it)");
                    return;
                }
                Err(e) if attempt < CONSUL_DEREGISTER_TRIES => {
                    tracing::warn!(key = %key, error = %e, "cannot deregister yet; trying again");
                    sleep(CONSUL_DEREGISTER_PAUSE).await;
                }
                Err(e) => {
                    let leftover = match self.ttl {
                        Some(ttl) => format!(
                            "its TTL check turns critical (no traffic) within {ttl:?} and Consul removes it {CONSUL_DEREGISTER_AFTER:?} later"
                        ),
                        None => format!(
                            "Consul removes it once its HTTP check has been critical for {CONSUL_DEREGISTER_AFTER:?}"
                        ),
                    };
                    tracing::warn!(key = %key, error = %e, "cannot deregister; {leftover}");
                }
            }
        }
    }
}

/// The HTTP status Consul refused a request with, if it answered.
fn status_of(e: &ConsulError) -> Option<u16> {
    match e {
        ConsulError::Http(h) => h.status().map(|s| s.as_u16()),
        _ => None,
    }
}

/// Whether a refused TTL update means the agent does not have the check
/// (any more): Consul answers 404, or 500 "does not have associated TTL"
/// before 1.11.
fn check_unknown(e: &ConsulError) -> bool {
    match e {
        ConsulError::Http(h @ pointsman_discovery::consul::HttpError::Status { body, .. }) => {
            h.status().map(|s| s.as_u16()) == Some(404)
                || body.contains("does not have associated TTL")
        }
        _ => false,
    }
}

/// What went wrong talking to the agent, for a log line.
fn trouble(agent: &Agent, what: &str, e: &ConsulError) -> String {
    match status_of(e) {
        Some(_) => format!("the Consul agent at {} refused {what}: {e}", agent.url()),
        None => format!("Consul agent at {} unreachable: {e}", agent.url()),
    }
}

/// The delay between attempts to register with the Consul agent: the
/// watchers' backoff, never under 10 ms.
fn retry_delay(min: Duration, max: Duration) -> Backoff {
    Backoff::new(min.max(Duration::from_millis(10)), max)
}

/// The task behind [`ConsulRegistration::start`]; runs until aborted.
async fn keep_registered(
    agent: Agent,
    service: Arc<Mutex<AgentService>>,
    ttl: Option<Duration>,
    mut health: watch::Receiver<Option<String>>,
    mut delay: Backoff,
    key: String,
) {
    let check_id = service.lock().await.check_id();
    loop {
        // Registered (again), retrying while the agent is away.
        loop {
            let written = {
                let s = service.lock().await;
                agent.register(&s).await.map(|()| s.state)
            };
            match written {
                Ok(state) => {
                    tracing::info!(key = %key, agent = %agent.url(), state = %state, check = %match ttl {
                        Some(ttl) => format!("TTL {ttl:?}"),
                        None => "HTTP".to_string(),
                    }, "registered");
                    delay.reset();
                    break;
                }
                Err(e) => {
                    let wait = delay.next();
                    tracing::warn!(
                        key = %key,
                        "{}; retrying in {:.1}s",
                        trouble(&agent, "the registration", &e),
                        wait.as_secs_f64()
                    );
                    sleep(wait).await;
                }
            }
        }
        // With an HTTP check, the agent checks the app from now on.
        let Some(ttl) = ttl else {
            return;
        };
        let beat = ttl / 3;
        let mut failed_updates = 0u32;
        loop {
            let failing = health.borrow_and_update().clone();
            let (status, note) = match &failing {
                None => (TtlStatus::Pass, "the app passes its check".to_string()),
                Some(why) => (TtlStatus::Fail, why.clone()),
            };
            let mut wait = beat;
            match agent.update_ttl(&check_id, status, Some(&note)).await {
                Ok(()) => {
                    if failed_updates > 0 {
                        tracing::info!(key = %key, "the TTL check is updated again");
                    }
                    failed_updates = 0;
                    delay.reset();
                }
                Err(e) if check_unknown(&e) => {
                    tracing::warn!(key = %key, error = %e, "the Consul agent does not have the instance's check: registering again");
                    break;
                }
                Err(e) => {
                    failed_updates += 1;
                    wait = delay.next().min(beat);
                    tracing::warn!(
                        key = %key,
                        "{}; retrying in {:.1}s",
                        trouble(&agent, "the TTL check update", &e),
                        wait.as_secs_f64()
                    );
                }
            }
            tokio::select! {
                _ = sleep(wait) => {}
                changed = health.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

enum Drained {
    Done,
    /// Not every proxy confirmed (or the drain could not be written): why.
    Unconfirmed(String),
    AppExited(std::io::Result<ExitStatus>),
}

/// Waits until the fleet confirms the drain twice in a row: a request that
/// picked the instance just before the proxy applied `drain` is counted in
/// flight only once its upstream connection is up, so one round could miss
/// it.
async fn confirmed_twice(
    fleet: &mut Fleet,
    service: &str,
    id: &str,
    revision: i64,
    deadline: Instant,
    progress: &mut Progress,
) -> Result<FleetCheck, FleetError> {
    let expect = Expectation::Drained {
        service: service.to_string(),
        id: id.to_string(),
        revision,
    };
    loop {
        fleet
            .wait_until(&expect, deadline, |c| progress.log(c))
            .await?;
        sleep(fleet.poll_interval).await;
        let again = fleet.check(&expect).await;
        if again.confirmed() {
            return Ok(again);
        }
        progress.log(&again);
    }
}

/// Asks the `--proxy-admin` proxies every [`PROXY_POLL`] until each one
/// sends nothing to `service`/`id` in two rounds in a row, or `deadline`
/// passes (then the last round is the error). With Consul there is no
/// revision to compare: a proxy that has not seen the drain yet still shows
/// the instance ready.
async fn proxies_drained(
    proxies: &[String],
    service: &str,
    id: &str,
    deadline: Instant,
    progress: &mut Progress,
) -> Result<FleetCheck, FleetCheck> {
    let mut confirmed_before = false;
    loop {
        let limit = PROXY_LIMIT.min(deadline.saturating_duration_since(Instant::now()));
        let round = ask_proxies(proxies, service, id, limit).await;
        progress.log(&round);
        if round.confirmed() {
            if confirmed_before {
                return Ok(round);
            }
            confirmed_before = true;
        } else {
            confirmed_before = false;
        }
        if Instant::now() + PROXY_POLL >= deadline {
            return Err(round);
        }
        sleep(PROXY_POLL).await;
    }
}

/// One round: every proxy asked at once, each within `limit`.
async fn ask_proxies(proxies: &[String], service: &str, id: &str, limit: Duration) -> FleetCheck {
    let named = proxies
        .iter()
        .enumerate()
        .map(|(i, admin)| (format!("proxy {}", i + 1), admin.clone()))
        .collect();
    let (service, id) = (service.to_string(), id.to_string());
    FleetCheck {
        proxies: ask_all(named, limit, move |view| judge_drained(view, &service, &id)).await,
        ..FleetCheck::default()
    }
}

/// Logs the drain's progress when who is waited for changes, and every few
/// seconds otherwise.
#[derive(Default)]
struct Progress {
    last: Option<(Vec<String>, Instant)>,
}

impl Progress {
    fn log(&mut self, check: &FleetCheck) {
        if check.confirmed() {
            return;
        }
        let mut waiting: Vec<String> = check.pending().map(|p| p.id.clone()).collect();
        if let Some(e) = &check.error {
            waiting.push(e.clone());
        }
        let due = match &self.last {
            None => true,
            Some((before, at)) => *before != waiting || at.elapsed() >= PROGRESS_EVERY,
        };
        if due {
            tracing::info!("draining: {}", check.summary());
            for m in &check.malformed {
                tracing::warn!("ignoring a malformed proxy record: {m}");
            }
            self.last = Some((waiting, Instant::now()));
        }
    }
}

fn log_lease(key: &str, lease: &watch::Receiver<LeaseState>) {
    match &*lease.borrow() {
        LeaseState::Held { lease, revision } => {
            tracing::info!(key = %key, lease = format!("{lease:x}"), revision, "registration written")
        }
        LeaseState::Lost => {
            tracing::warn!(key = %key, "the lease was lost: registering again")
        }
        LeaseState::Pending => {
            tracing::warn!(key = %key, "etcd is not answering; the registration is retried")
        }
        LeaseState::Released => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_meta() {
        assert!(parse_address("10.0.0.5:8080").is_ok());
        assert!(parse_address("app:8080").is_ok());
        let err = parse_address("10.0.0.5").unwrap_err();
        assert!(err.contains("expected host:port"), "{err}");
        let err = parse_address("0.0.0.0:8080").unwrap_err();
        assert!(err.contains("not an address proxies can reach"), "{err}");
        assert_eq!(
            parse_meta("version=2").unwrap(),
            ("version".to_string(), "2".to_string())
        );
        assert!(parse_meta("=2").is_err());
        assert!(parse_meta("version").is_err());
    }

    #[test]
    fn drained_in_consul_terms_needs_no_revision() {
        use pointsman_discovery::admin_api::{EndpointView, ProxyView, ServiceView};
        let view = |state: AdminState, in_flight: u64| ProxyView {
            follows_etcd: false,
            applied_revision: None,
            services: vec![ServiceView {
                name: "web".into(),
                endpoints: vec![EndpointView {
                    id: "x".into(),
                    address: "127.0.0.1:1".into(),
                    state,
                    healthy: true,
                    in_flight,
                    ..EndpointView::default()
                }],
                ..ServiceView::default()
            }],
        };
        let ready = judge_drained(&view(AdminState::Ready, 0), "web", "x");
        assert!(ready.is_err_and(|e| e.contains("still sends new requests")));
        assert_eq!(
            judge_drained(&view(AdminState::Drain, 1), "web", "x"),
            Err("1 request in flight to web/x".to_string())
        );
        assert_eq!(
            judge_drained(&view(AdminState::Drain, 0), "web", "x"),
            Ok(())
        );
        assert_eq!(
            judge_drained(&view(AdminState::Maint, 0), "web", "x"),
            Ok(())
        );
        assert_eq!(
            judge_drained(&view(AdminState::Ready, 3), "web", "y"),
            Ok(())
        );
    }

    #[test]
    fn retry_delays_grow_to_the_limit_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(400));
        let mut d = retry_delay(min, max);
        let steps: Vec<Duration> = (0..5).map(|_| d.next()).collect();
        for (step, cap) in steps.iter().zip([100u64, 200, 400, 400, 400]) {
            let cap = Duration::from_millis(cap);
            assert!(*step >= cap / 2 && *step <= cap, "{steps:?}");
        }
        d.reset();
        assert!(d.next() <= min);
    }

    #[test]
    fn exit_codes_as_a_shell_reports_them() {
        let code = |raw: i32| exit_code(&Ok(ExitStatus::from_raw(raw)));
        assert_eq!(code(0), 0);
        assert_eq!(code(3 << 8), 3);
        assert_eq!(code(15), 143); // killed by SIGTERM
        assert_eq!(code(9), 137); // killed by SIGKILL
    }
}
