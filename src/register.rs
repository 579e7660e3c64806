//! `pointsman register`: the sidekick that makes an app safe to stop.
//!
//! It registers the app in etcd (under a lease, kept alive) only once the
//! app passes its check, and takes it out of rotation before it stops:
//!
//! 1. start the app (`-- CMD ARGS`) as a child, if given; wait until it
//!    passes its check (TCP connect by default, or `--check-http PATH`),
//!    giving up after `--check-timeout`;
//! 2. register `<services>/<service>/<id>`; keep the lease alive, register
//!    again under a new lease if etcd loses it; keep checking, and set the
//!    instance to `maint` while the check keeps failing;
//! 3. on SIGTERM or SIGINT: rewrite the registration with state `drain`
//!    (revision R), wait until every live proxy has applied R and has no
//!    request in flight to the instance (bounded by `--drain-timeout`),
//!    delete the registration, then pass the signal to the app and exit
//!    with its exit code. SIGHUP, SIGUSR1 and SIGUSR2 are passed on as they
//!    come. If the app exits on its own, the registration is deleted at
//!    once and its exit code is ours.
//!
//! Without a command, the sidekick registers an app that runs elsewhere
//! (a systemd unit beside it) and does the same on SIGTERM, exiting 0.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use pointsman_discovery::fleet::{http_get, FleetCheck};
use pointsman_discovery::{
    Address, AdminState, EtcdOptions, Expectation, Fleet, FleetError, LeaseState, Registrar,
    Registration,
};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
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

const EXAMPLES: &str = "Examples:
  # the app as a child (a container entrypoint):
  pointsman register --etcd http://etcd:2379 --service web --address 10.0.0.5:8080 \\
      --check-http /healthz -- /app/server --port 8080
  # an app that runs beside it (a systemd unit of its own):
  pointsman register --etcd http://127.0.0.1:2379 --service web --address 10.0.0.5:8080";

/// `pointsman register`'s flags.
#[derive(clap::Args, Clone, Debug)]
#[command(after_help = EXAMPLES)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub etcd: crate::cli::EtcdArgs,
    /// Service to register the app in.
    #[arg(long, env = "POINTSMAN_SERVICE")]
    pub service: String,
    /// Where proxies reach the app (host:port); also where it is checked.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_address, env = "POINTSMAN_ADDRESS")]
    pub address: Address,
    /// Instance id [default: <host name>:<port of --address>].
    #[arg(long, env = "POINTSMAN_ID")]
    pub id: Option<String>,
    /// Lease TTL: how long the registration outlives a sidekick killed
    /// without a chance to deregister.
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
    /// [default: a TCP connect check].
    #[arg(long, value_name = "PATH", conflicts_with = "check_tcp")]
    pub check_http: Option<String>,
    /// Check the app by connecting to its address (the default).
    #[arg(long)]
    pub check_tcp: bool,
    /// Give up (and stop the app) if it has not passed its check this long
    /// after start.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub check_timeout: Duration,
    /// Time between checks once registered.
    #[arg(long, default_value = "2s", value_parser = positive_duration)]
    pub check_interval: Duration,
    /// Failed checks in a row, once registered, that set the instance to
    /// `maint` (no traffic) until it passes twice in a row.
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
        Check::Tcp => match timeout(CHECK_LIMIT, tokio::net::TcpStream::connect(&target)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot connect to {target}: {e}")),
            Err(_) => Err(format!("no connection to {target} within {CHECK_LIMIT:?}")),
        },
        Check::Http(path) => {
            let answer = http_get(&target, path, CHECK_LIMIT).await?;
            if (200..400).contains(&answer.status) {
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

struct Sidekick {
    args: RegisterArgs,
    etcd: EtcdOptions,
    check: Check,
    key: String,
    service: String,
    id: String,
    /// Taken when deregistering.
    registrar: Option<Registrar>,
}

impl Sidekick {
    fn new(args: RegisterArgs) -> Result<Sidekick, Exit> {
        let etcd = args
            .etcd
            .options()
            .map_err(|e| usage(e.to_string()))?
            .ok_or_else(|| usage("say where to register: --etcd URL".to_string()))?;
        let id = args.id.clone().unwrap_or_else(|| {
            format!("{}:{}", crate::heartbeat::host_name(), args.address.port())
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
        let registrar = Registrar::new(etcd.clone(), args.ttl, registration)
            .map_err(|e| usage(e.to_string()))?;
        Ok(Sidekick {
            args,
            etcd,
            check,
            key: registrar.key().to_string(),
            service,
            id,
            registrar: Some(registrar),
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
        let Some(registrar) = self.registrar.as_ref() else {
            return 1;
        };
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
        let mut lease_followed = true;
        let mut health_tick = tokio::time::interval(self.args.check_interval);
        health_tick.reset();
        let (mut fails, mut passes, mut maint) = (0u32, 0u32, false);
        let stop = loop {
            tokio::select! {
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
                changed = lease.changed(), if lease_followed => {
                    match changed {
                        Ok(()) => log_lease(&key, &lease),
                        Err(_) => lease_followed = false,
                    }
                }
                _ = health_tick.tick() => {
                    match check_once(&self.args.address, &self.check).await {
                        Ok(()) => {
                            fails = 0;
                            passes += 1;
                            if maint && passes >= RISE {
                                maint = false;
                                tracing::info!(key = %key, "the app passes its check again: state ready");
                                if let Err(e) = self.set_state(AdminState::Ready).await {
                                    tracing::warn!(key = %key, error = %e, "cannot set state ready yet; retrying in the background");
                                }
                            }
                        }
                        Err(e) => {
                            passes = 0;
                            fails += 1;
                            tracing::warn!(key = %key, failures = fails, "check failed: {e}");
                            if !maint && fails >= self.args.check_fall {
                                maint = true;
                                tracing::warn!(key = %key, "the app failed its check {fails} times in a row: state maint (no traffic) until it passes again");
                                if let Err(e) = self.set_state(AdminState::Maint).await {
                                    tracing::warn!(key = %key, error = %e, "cannot set state maint yet; retrying in the background");
                                }
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

    /// Sets state drain and waits for the fleet to stop sending.
    async fn drain(&mut self, key: &str, signals: &mut Signals, app: &mut Option<App>) -> Drained {
        let deadline = Instant::now() + self.args.drain_timeout;
        let revision = tokio::select! {
            r = self.set_state(AdminState::Drain) => r,
            status = exited(app) => return Drained::AppExited(status),
        };
        let revision = match revision {
            Ok(rev) => rev,
            Err(e) => {
                tracing::error!(key = %key, error = %e, "cannot mark the instance draining; the proxies keep sending to it until it is deregistered");
                return Drained::Done;
            }
        };
        tracing::info!(key = %key, revision, "state drain written; waiting for every proxy to apply it and finish its requests");
        let mut fleet = match Fleet::new(self.etcd.clone()) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "cannot ask the proxies");
                return Drained::Done;
            }
        };
        let (service, id) = (self.service.clone(), self.id.clone());
        let mut progress = Progress::default();
        let mut wait = std::pin::pin!(confirmed_twice(
            &mut fleet,
            &service,
            &id,
            revision,
            deadline,
            &mut progress
        ));
        loop {
            tokio::select! {
                result = &mut wait => {
                    match result {
                        Ok(check) => tracing::info!("every proxy stopped sending to the instance: {}", check.summary()),
                        Err(e) => tracing::warn!(
                            "drain timeout ({:?}) passed: {e}; going on",
                            self.args.drain_timeout
                        ),
                    }
                    return Drained::Done;
                }
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

    async fn set_state(
        &mut self,
        state: AdminState,
    ) -> Result<i64, pointsman_discovery::EtcdError> {
        match self.registrar.as_mut() {
            Some(r) => r.set_state(state).await,
            None => Err(pointsman_discovery::EtcdError::Config(
                "already deregistered".to_string(),
            )),
        }
    }

    async fn deregister(&mut self, key: &str) {
        let Some(registrar) = self.registrar.take() else {
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
}

enum Drained {
    Done,
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
    fn exit_codes_as_a_shell_reports_them() {
        let code = |raw: i32| exit_code(&Ok(ExitStatus::from_raw(raw)));
        assert_eq!(code(0), 0);
        assert_eq!(code(3 << 8), 3);
        assert_eq!(code(15), 143); // killed by SIGTERM
        assert_eq!(code(9), 137); // killed by SIGKILL
    }
}
