//! The `pointsman` command line.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use pointsman::control::config::{Config, Listener, ListenerMode, RuntimeIdentity};
use pointsman::control::registry::RegistryOptions;
use pointsman::process::app::{stop_signals, App};
use pointsman_deploy::cli::{ConsulArgs, EtcdArgs};
use pointsman_discovery::EtcdOptions;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "pointsman",
    version,
    about = "A reverse proxy and load balancer whose backends come from a service registry",
    long_about = "A reverse proxy and load balancer whose backends come from a service registry.\n\n\
                  Start with `pointsman demo` (a proxy on 127.0.0.1:8080 in front of local demo \
                  upstreams) or `pointsman run --config pointsman.toml`."
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "POINTSMAN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Check a config file and exit: 0 if valid, 1 with the error if not.
    Check {
        /// The config file to check.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Translate an haproxy.cfg into a pointsman config (TOML on stdout, or
    /// --output). Lines that do not translate stay in it as comments that
    /// say why; map files named by the cfg are read from beside it.
    Import {
        /// The haproxy.cfg to translate.
        haproxy_cfg: PathBuf,
        /// Write the config to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Run the demo: upstreams on 127.0.0.1:9101-9106, registered in a file
    /// registry, and the proxy on 127.0.0.1:8080 with the embedded demo
    /// config.
    Demo(RunArgs),
    /// Change instance state, weight and maps fleet-wide (--etcd) or on
    /// one proxy (--admin), and show what the proxies serve.
    Ctl(CtlArgs),
    /// Zero-downtime deploys confirmed by every proxy: rolling, blue/green
    /// switch and rollback, canary.
    Deploy(pointsman_deploy::rollout::DeployArgs),
    /// Run a small HTTP upstream that echoes what it receives (for demos,
    /// the compose stack and tests).
    Upstream {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Name it reports in its answers.
        #[arg(long, default_value = "upstream")]
        name: String,
    },
    /// Register an app in etcd or Consul once it is healthy, keep it registered, and
    /// on SIGTERM take it out of rotation and wait until every proxy has
    /// stopped sending to it before passing the signal on.
    Register(Box<pointsman_deploy::register::RegisterArgs>),
}

#[derive(clap::Args, Clone, Default)]
struct RunArgs {
    /// The config file (TOML); watched, and reloaded when it changes.
    #[arg(long, short, env = "POINTSMAN_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the HTTP listener; replaces the first HTTP listener's
    /// address, or adds a listener named "web". With no --config, the
    /// proxy serves this listener alone.
    #[arg(long, env = "POINTSMAN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Where requests to the --listen listener that match no route go (a
    /// service name), e.g. the one service a sidecar fronts.
    #[arg(long, env = "POINTSMAN_DEFAULT_SERVICE", requires = "listen")]
    default_service: Option<String>,
    /// Address of the admin listener (API, stats page).
    #[arg(long, env = "POINTSMAN_ADMIN")]
    admin: Option<SocketAddr>,
    /// Token that admin API changes must carry (`Authorization: Bearer
    /// <token>`); required when --admin is not a loopback address.
    #[arg(long, env = "POINTSMAN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Log one JSON line per request (with --log-format json, the whole
    /// log is JSON lines).
    #[arg(long, env = "POINTSMAN_ACCESS_LOG")]
    access_log: bool,
    /// Threads serving clients, each its own event loop [default: all
    /// cores].
    #[arg(long, env = "POINTSMAN_THREADS")]
    threads: Option<usize>,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    consul: ConsulArgs,
    /// Follow a directory of registration files: <dir>/<service>/<instance-id>
    /// holding `host:port` or JSON, as in etcd.
    #[arg(long, env = "POINTSMAN_REGISTRY_DIR")]
    registry_dir: Option<PathBuf>,
    /// Keep the last good registry state here and serve it at start when
    /// the registry cannot be reached.
    #[arg(long, env = "POINTSMAN_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Hitless restart: take the listening sockets over from the pointsman
    /// serving this Unix socket (it then drains and exits), and serve it
    /// for the next one. Nothing there: a normal start.
    #[arg(long, value_name = "SOCKET", env = "POINTSMAN_TAKEOVER")]
    takeover: Option<PathBuf>,
    /// Serve the HAProxy-compatible runtime API on this Unix socket (mode
    /// 0600): `echo "show stat" | socat stdio unix-connect:PATH`.
    #[arg(long, value_name = "PATH", env = "POINTSMAN_RUNTIME_SOCKET")]
    runtime_socket: Option<PathBuf>,
    /// Serve the HAProxy-compatible runtime API on this loopback TCP
    /// address (e.g. 127.0.0.1:9999).
    #[arg(long, value_name = "ADDR", env = "POINTSMAN_RUNTIME_API")]
    runtime_api: Option<SocketAddr>,
    /// Address of the HTTPS listener: replaces the first TLS listener's
    /// address, or adds one named "websecure" (with --default-service as
    /// its default too). Needs --tls-dir.
    #[arg(
        long,
        value_name = "ADDR",
        env = "POINTSMAN_LISTEN_TLS",
        requires = "tls_dir"
    )]
    listen_tls: Option<SocketAddr>,
    /// The TLS listeners' certificates: a directory of NAME.crt + NAME.key
    /// or NAME.pem files, chosen by SNI and looked at again every 2 s.
    #[arg(long, value_name = "DIR", env = "POINTSMAN_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// What the runtime API's `show info` names the process: haproxy (the
    /// default, which HAProxy's clients need) or pointsman.
    #[arg(long, value_name = "NAME", env = "POINTSMAN_RUNTIME_IDENTITY")]
    runtime_identity: Option<RuntimeIdentity>,
    /// This proxy's id in etcd (<prefix>/proxies/<id>) [default: <host
    /// name>:<admin port>].
    #[arg(long, env = "POINTSMAN_PROXY_ID")]
    proxy_id: Option<String>,
    /// The admin address other hosts reach this proxy at, written to its
    /// record in etcd [default: the admin address, or <host name>:<port>
    /// when it binds all interfaces].
    #[arg(long, value_name = "HOST:PORT", env = "POINTSMAN_ADVERTISE_ADMIN")]
    advertise_admin: Option<String>,
}

/// `pointsman ctl`'s arguments.
#[derive(clap::Args, Clone)]
struct CtlArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Change one proxy through its admin API instead of the whole fleet
    /// through etcd (host:port or http://host:port).
    #[arg(long, conflicts_with = "etcd")]
    admin: Option<String>,
    /// The proxy's admin token (with --admin).
    #[arg(long, env = "POINTSMAN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(subcommand)]
    command: pointsman_deploy::ctl::CtlCommand,
}

impl RunArgs {
    fn registries(&self) -> anyhow::Result<RegistryOptions> {
        let etcd = self.etcd.options()?;
        Ok(RegistryOptions {
            etcd,
            consul: self.consul.options()?,
            dir: self.registry_dir.clone(),
            state_dir: self.state_dir.clone(),
        })
    }

    /// The overrides the flags make to any config, including reloaded ones.
    fn overrides(&self) -> Arc<dyn Fn(&mut Config) + Send + Sync> {
        let (listen, admin) = (self.listen, self.admin);
        let default_service = self.default_service.clone();
        let (token, access_log) = (self.admin_token.clone(), self.access_log);
        let (runtime_socket, runtime_api) = (self.runtime_socket.clone(), self.runtime_api);
        let runtime_identity = self.runtime_identity;
        let (tls_dir, listen_tls) = (self.tls_dir.clone(), self.listen_tls);
        Arc::new(move |c: &mut Config| {
            if let Some(t) = &token {
                c.global.admin_token = Some(t.clone());
            }
            c.global.access_log |= access_log;
            if let Some(path) = &runtime_socket {
                c.global.runtime_socket = Some(path.clone());
            }
            if let Some(addr) = runtime_api {
                c.global.runtime_api = Some(addr);
            }
            if let Some(identity) = runtime_identity {
                c.global.runtime_identity = identity;
            }
            if let Some(addr) = listen {
                match c
                    .listeners
                    .iter_mut()
                    .find(|l| l.mode == ListenerMode::Http && !l.tls)
                {
                    Some(l) => {
                        l.bind = addr;
                        if default_service.is_some() {
                            l.default_service.clone_from(&default_service);
                        }
                    }
                    None => c.listeners.push(Listener {
                        name: "web".into(),
                        bind: addr,
                        mode: ListenerMode::Http,
                        default_service: default_service.clone(),
                        tls: false,
                    }),
                }
            }
            if let Some(dir) = &tls_dir {
                c.global.tls_dir = Some(dir.clone());
            }
            if let Some(addr) = listen_tls {
                match c.listeners.iter_mut().find(|l| l.tls) {
                    Some(l) => {
                        l.bind = addr;
                        if default_service.is_some() {
                            l.default_service.clone_from(&default_service);
                        }
                    }
                    None => c.listeners.push(Listener {
                        name: "websecure".into(),
                        bind: addr,
                        mode: ListenerMode::Http,
                        default_service: default_service.clone(),
                        tls: true,
                    }),
                }
            }
            if let Some(addr) = admin {
                c.global.admin = addr;
            }
        })
    }
}

fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    let target = match (args.etcd.options()?, args.admin) {
        (Some(etcd), None) => pointsman_deploy::ctl::Target::Fleet(Box::new(etcd)),
        (None, Some(admin)) => pointsman_deploy::ctl::Target::Proxy {
            admin,
            token: args.admin_token,
        },
        _ => anyhow::bail!(
            "say where: --etcd URL (every proxy, through the registry) or --admin HOST:PORT (one proxy)"
        ),
    };
    Ok(runtime(Some(1))?.block_on(pointsman_deploy::ctl::run(target, args.command))?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Register(args) => return pointsman_deploy::register::main(*args),
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listeners, {} services, {} routes)",
                    config.display(),
                    c.listeners.len(),
                    c.services.len(),
                    c.routes.len()
                );
                Ok(())
            }
            Err(e) => Err(haproxy_hint(&config).unwrap_or_else(|| anyhow::anyhow!(e))),
        },
        Command::Import {
            haproxy_cfg,
            output,
        } => import(&haproxy_cfg, output.as_deref()),
        Command::Run(args) => serve(args, false),
        Command::Ctl(args) => ctl(args),
        Command::Deploy(args) => {
            runtime(Some(1)).and_then(|rt| Ok(rt.block_on(pointsman_deploy::rollout::run(args))?))
        }
        Command::Demo(args) => serve(args, true),
        Command::Upstream { listen, name } => runtime(Some(1)).and_then(|rt| {
            rt.block_on(async {
                let stop = CancellationToken::new();
                let signals = stop_signals()?;
                pointsman::process::upstream::start_all(&[(name, listen)], stop.clone())
                    .await
                    .map_err(anyhow::Error::msg)?;
                signals.await;
                stop.cancel();
                Ok(())
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pointsman: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// When a config that does not parse is an haproxy.cfg, the error that says
/// how to translate it.
fn haproxy_hint(config: &std::path::Path) -> Option<anyhow::Error> {
    let text = std::fs::read_to_string(config).ok()?;
    pointsman::control::import::looks_like_haproxy(&text).then(|| {
        anyhow::anyhow!(
            "{0} is an HAProxy config, not a pointsman one: translate it with `pointsman import {0}` \
             (or `pointsman import {0} --output pointsman.toml`)",
            config.display()
        )
    })
}

/// `pointsman import`: the translated config on stdout or in `output`, and
/// a summary on stderr.
fn import(cfg: &std::path::Path, output: Option<&std::path::Path>) -> anyhow::Result<()> {
    use pointsman::control::import::{import_file, ImportError};
    let imported = import_file(cfg)?;
    match output {
        Some(path) => {
            std::fs::write(path, &imported.toml).map_err(|reason| ImportError::Write {
                path: path.display().to_string(),
                reason,
            })?
        }
        None => print!("{}", imported.toml),
    }
    let c = &imported.config;
    eprintln!(
        "pointsman import: {}: {} listeners, {} services, {} routes, {} maps; {} lines not translated \
         and {} partly (each is a comment in the output that says why)",
        cfg.display(),
        c.listeners.len(),
        c.services.len(),
        c.routes.len(),
        imported.maps,
        imported.not_translated(),
        imported
            .notes
            .iter()
            .filter(|n| n.kind == pointsman::control::import::NoteKind::Partly)
            .count(),
    );
    Ok(())
}

/// Runs the proxy. One thread: one event loop for everything. N threads:
/// N event loops that serve clients, one per thread, each accepting on its
/// own SO_REUSEPORT socket (as HAProxy's threads do), beside a small event
/// loop for the control task, the registries and the admin listener.
fn serve(args: RunArgs, demo: bool) -> anyhow::Result<()> {
    let threads = match args.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    let control = runtime(Some(1))?;
    if threads == 1 {
        return control.block_on(async {
            tokio::spawn(keep_timers_near(CancellationToken::new()));
            run(args, demo, Vec::new()).await
        });
    }
    pointsman::engine::pool::set_threads(threads);
    let stop = CancellationToken::new();
    let mut handles = Vec::with_capacity(threads);
    let mut joins = Vec::with_capacity(threads);
    for i in 0..threads {
        let rt = runtime(Some(1))?;
        handles.push(rt.handle().clone());
        let stop = stop.clone();
        joins.push(
            std::thread::Builder::new()
                .name(format!("pointsman-worker-{i}"))
                .spawn(move || {
                    pointsman::engine::pool::enter_thread(i);
                    rt.block_on(keep_timers_near(stop))
                })?,
        );
    }
    let result = control.block_on(run(args, demo, handles));
    // The workers ran the drained connections; now they may end.
    stop.cancel();
    for j in joins {
        let _ = j.join();
    }
    result
}

/// Keeps a timer due on this event loop at least every 100 ms until
/// `stop`. tokio wakes a parked event loop (an eventfd write, then an
/// extra trip through epoll) whenever a new timer is due before every
/// timer it already has; each client connection arms its idle and header
/// timers 250 ms or more ahead, so with this tick they never do.
async fn keep_timers_near(stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
    }
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = match threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        // One worker: an event loop on this thread, without the
        // work-stealing machinery a single worker does not need.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    Ok(b.enable_all().build()?)
}

async fn run(
    args: RunArgs,
    demo: bool,
    workers: Vec<tokio::runtime::Handle>,
) -> anyhow::Result<()> {
    let signals = stop_signals()?;
    let overrides = args.overrides();
    let mut config = match (&args.config, demo) {
        (Some(path), _) => Config::load(path)?,
        (None, true) => Config::embedded_demo(),
        // A sidecar needs nothing mounted: flags and environment alone.
        (None, false) => Config::parse("<flags>", "")?,
    };
    overrides(&mut config);
    if config.listeners.is_empty() {
        anyhow::bail!(
            "nothing to serve: pass --listen ADDR (or POINTSMAN_LISTEN) or --config FILE \
             (or run `pointsman demo` for the built-in demo)"
        );
    }
    let upstreams_stop = CancellationToken::new();
    let mut registries = args.registries()?;
    let own_demo_dir = demo && registries.dir.is_none();
    let demo_dir = if demo {
        let dir = demo_registry(registries.dir.clone())?;
        let instances: Vec<(String, SocketAddr)> = DEMO_INSTANCES
            .iter()
            .map(|(_, id, addr, _)| (id.to_string(), addr.parse().expect("demo address")))
            .collect();
        pointsman::process::upstream::start_all(&instances, upstreams_stop.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        registries.dir = Some(dir.clone());
        Some(dir)
    } else {
        None
    };
    let etcd = registries.etcd.clone();
    let takeover_path = args
        .takeover
        .clone()
        .or_else(|| config.global.takeover_socket.clone());
    let (takeover, inherited) =
        pointsman::process::takeover::begin(takeover_path.as_deref()).await?;
    let app = App::start_inheriting(config, overrides, registries, workers, inherited).await?;
    let handover = takeover.complete(app.sockets.clone()).await;
    let heartbeat = heartbeat(&args, etcd, &app)?;
    if let Some(dir) = &demo_dir {
        print_demo_help(&app, dir);
    }
    let taken_over = tokio::select! {
        _ = signals => {
            tracing::info!("stop signal received: draining");
            false
        }
        _ = handover.taken_over() => {
            tracing::info!("taken over by a new process: draining");
            true
        }
    };
    // The new process has the same id and admin address: the record is
    // its own from now on.
    let heartbeat = match heartbeat {
        Some(h) if taken_over => {
            h.hand_over().await;
            None
        }
        h => h,
    };
    app.drain(taken_over).await;
    if let Some(h) = heartbeat {
        h.stop().await;
    }
    drop(handover);
    upstreams_stop.cancel();
    if let (true, Some(dir)) = (own_demo_dir, &demo_dir) {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// With etcd, the proxy's record under `<prefix>/proxies/<id>`.
fn heartbeat(
    args: &RunArgs,
    etcd: Option<EtcdOptions>,
    app: &App,
) -> anyhow::Result<Option<pointsman::process::heartbeat::Heartbeat>> {
    use pointsman::process::heartbeat::{Heartbeat, HeartbeatOptions};
    let Some(etcd) = etcd else { return Ok(None) };
    let status = app
        .sources
        .iter()
        .find(|s| s.source() == pointsman_discovery::Source::Etcd)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("etcd is configured but not followed"))?;
    let opts = HeartbeatOptions::new(
        etcd,
        args.proxy_id.clone(),
        args.advertise_admin.clone(),
        app.admin_addr,
    )?;
    Ok(Some(Heartbeat::start(opts, status)?))
}

/// The demo's instances: (service, id, address, registered at start).
const DEMO_INSTANCES: [(&str, &str, &str, bool); 6] = [
    ("web", "web1", "127.0.0.1:9101", true),
    ("web", "web2", "127.0.0.1:9102", true),
    ("web", "web3", "127.0.0.1:9103", true),
    ("blue", "blue1", "127.0.0.1:9104", true),
    ("green", "green1", "127.0.0.1:9105", true),
    ("web", "web4", "127.0.0.1:9106", false),
];

/// Writes the demo's registrations into `dir` (or a fresh directory).
fn demo_registry(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pointsman-demo-{}", std::process::id()))
    });
    for (service, id, addr, registered) in DEMO_INSTANCES {
        let path = dir.join(service).join(id);
        std::fs::create_dir_all(dir.join(service))?;
        if !registered {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let value = if id == "web3" {
            format!("{{\"address\": \"{addr}\", \"weight\": 2}}\n")
        } else {
            format!("{addr}\n")
        };
        std::fs::write(&path, value)?;
    }
    Ok(dir)
}

fn print_demo_help(app: &App, dir: &std::path::Path) {
    let web = app
        .listeners
        .values()
        .next()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    println!(
        "\npointsman demo is running. Try:\n\
         \n  curl -s http://{web}/             # round robin over web1, web2, web3 (weight 2)\
         \n  curl -s http://{web}/app/         # blue or green, chosen by the map \"release\"\
         \n  curl -s http://{web}/canary/      # 90% blue, 10% green\
         \n  curl -s http://{admin}/api/services\
         \n\nThe endpoints come from the file registry in {dir}:\
         \n  echo 127.0.0.1:9106 > {dir}/web/web4   # registers web4 (its upstream is running)\
         \n  rm {dir}/web/web1                      # deregisters web1\
         \n\nStats page: http://{admin}/stats\nStop with Ctrl-C.\n",
        admin = app.admin_addr,
        dir = dir.display()
    );
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("POINTSMAN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
