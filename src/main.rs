//! The `pointsman` command line.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use pointsman::app::{stop_signals, App};
use pointsman::config::{Config, Listener, ListenerMode};
use pointsman::registry::RegistryOptions;
use pointsman_discovery::{EtcdOptions, EtcdTls, Prefixes};
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
    /// Run the demo: upstreams on 127.0.0.1:9101-9106, registered in a file
    /// registry, and the proxy on 127.0.0.1:8080 with the embedded demo
    /// config.
    Demo(RunArgs),
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
}

#[derive(clap::Args, Clone, Default)]
struct RunArgs {
    /// The config file (TOML); watched, and reloaded when it changes.
    #[arg(long, short, env = "POINTSMAN_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the HTTP listener; replaces the first HTTP listener's
    /// address, or adds a listener named "web".
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address of the admin listener (API, stats page).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Threads serving clients, each its own event loop [default: all
    /// cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Follow etcd: client URLs of the cluster, comma-separated
    /// (http://127.0.0.1:2379,http://10.0.0.2:2379).
    #[arg(long, value_delimiter = ',', env = "POINTSMAN_ETCD")]
    etcd: Vec<String>,
    /// Key prefix of service registrations in etcd.
    #[arg(long, default_value = "/services")]
    etcd_prefix: String,
    /// Key prefix of routes, maps, overrides and proxies in etcd.
    #[arg(long, default_value = "/pointsman")]
    etcd_config_prefix: String,
    /// etcd user name (with --etcd-password, or POINTSMAN_ETCD_PASSWORD).
    #[arg(long)]
    etcd_user: Option<String>,
    /// etcd password.
    #[arg(long, env = "POINTSMAN_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// PEM CA certificate for etcd over TLS.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key).
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Follow a directory of registration files: <dir>/<service>/<instance-id>
    /// holding `host:port` or JSON, as in etcd.
    #[arg(long)]
    registry_dir: Option<PathBuf>,
    /// Keep the last good registry state here and serve it at start when
    /// the registry cannot be reached.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve the HAProxy-compatible runtime API on this Unix socket (mode
    /// 0600): `echo "show stat" | socat stdio unix-connect:PATH`.
    #[arg(long, value_name = "PATH")]
    runtime_socket: Option<PathBuf>,
    /// Serve the HAProxy-compatible runtime API on this loopback TCP
    /// address (e.g. 127.0.0.1:9999).
    #[arg(long, value_name = "ADDR")]
    runtime_api: Option<SocketAddr>,
}

impl RunArgs {
    fn registries(&self) -> anyhow::Result<RegistryOptions> {
        let etcd = if self.etcd.is_empty() {
            None
        } else {
            let mut o = EtcdOptions::new(self.etcd.iter().cloned());
            o.prefixes = Prefixes {
                services: self.etcd_prefix.clone(),
                pointsman: self.etcd_config_prefix.clone(),
            };
            o.user = match (&self.etcd_user, &self.etcd_password) {
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                (None, None) => None,
                _ => anyhow::bail!("--etcd-user and --etcd-password go together"),
            };
            o.tls = self.etcd_ca.as_ref().map(|ca| EtcdTls {
                ca: ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
                domain: None,
            });
            Some(o)
        };
        Ok(RegistryOptions {
            etcd,
            dir: self.registry_dir.clone(),
            state_dir: self.state_dir.clone(),
        })
    }

    /// The overrides the flags make to any config, including reloaded ones.
    fn overrides(&self) -> Arc<dyn Fn(&mut Config) + Send + Sync> {
        let (listen, admin) = (self.listen, self.admin);
        let (runtime_socket, runtime_api) = (self.runtime_socket.clone(), self.runtime_api);
        Arc::new(move |c: &mut Config| {
            if let Some(path) = &runtime_socket {
                c.global.runtime_socket = Some(path.clone());
            }
            if let Some(addr) = runtime_api {
                c.global.runtime_api = Some(addr);
            }
            if let Some(addr) = listen {
                match c
                    .listeners
                    .iter_mut()
                    .find(|l| l.mode == ListenerMode::Http)
                {
                    Some(l) => l.bind = addr,
                    None => c.listeners.push(Listener {
                        name: "web".into(),
                        bind: addr,
                        mode: ListenerMode::Http,
                        default_service: None,
                    }),
                }
            }
            if let Some(addr) = admin {
                c.global.admin = addr;
            }
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
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
            Err(e) => Err(anyhow::anyhow!(e)),
        },
        Command::Run(args) => serve(args, false),
        Command::Demo(args) => serve(args, true),
        Command::Upstream { listen, name } => runtime(Some(1)).and_then(|rt| {
            rt.block_on(async {
                let stop = CancellationToken::new();
                let signals = stop_signals()?;
                pointsman::upstream::start_all(&[(name, listen)], stop.clone())
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
        return control.block_on(run(args, demo, Vec::new()));
    }
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
                .spawn(move || rt.block_on(stop.cancelled()))?,
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
        (None, false) => anyhow::bail!(
            "no config: pass --config FILE (or run `pointsman demo` for the built-in demo)"
        ),
    };
    overrides(&mut config);
    let upstreams_stop = CancellationToken::new();
    let mut registries = args.registries()?;
    let own_demo_dir = demo && registries.dir.is_none();
    let demo_dir = if demo {
        let dir = demo_registry(registries.dir.clone())?;
        let instances: Vec<(String, SocketAddr)> = DEMO_INSTANCES
            .iter()
            .map(|(_, id, addr, _)| (id.to_string(), addr.parse().expect("demo address")))
            .collect();
        pointsman::upstream::start_all(&instances, upstreams_stop.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        registries.dir = Some(dir.clone());
        Some(dir)
    } else {
        None
    };
    let app = App::start(config, overrides, registries, workers).await?;
    if let Some(dir) = &demo_dir {
        print_demo_help(&app, dir);
    }
    signals.await;
    tracing::info!("stop signal received: draining");
    app.drain().await;
    upstreams_stop.cancel();
    if let (true, Some(dir)) = (own_demo_dir, &demo_dir) {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
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
