//! The `pointsman` command line.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use pointsman::app::{stop_signal, App};
use pointsman::config::{Config, Listener, ListenerMode};
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
    /// Run the demo: upstreams on 127.0.0.1:9101-9105 and the proxy on
    /// 127.0.0.1:8080 with the embedded demo config.
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
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
}

impl RunArgs {
    /// The overrides the flags make to any config, including reloaded ones.
    fn overrides(&self) -> Arc<dyn Fn(&mut Config) + Send + Sync> {
        let (listen, admin) = (self.listen, self.admin);
        Arc::new(move |c: &mut Config| {
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
        Command::Run(args) => runtime(args.threads).and_then(|rt| rt.block_on(run(args, false))),
        Command::Demo(args) => runtime(args.threads).and_then(|rt| rt.block_on(run(args, true))),
        Command::Upstream { listen, name } => runtime(Some(1)).and_then(|rt| {
            rt.block_on(async {
                let stop = CancellationToken::new();
                pointsman::upstream::start_all(&[(name, listen)], stop.clone())
                    .await
                    .map_err(anyhow::Error::msg)?;
                stop_signal().await;
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

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        b.worker_threads(n);
    }
    Ok(b.enable_all().build()?)
}

async fn run(args: RunArgs, demo: bool) -> anyhow::Result<()> {
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
    if demo {
        let instances: Vec<(String, SocketAddr)> = config
            .services
            .values()
            .flat_map(|s| s.endpoints.iter())
            .filter_map(|e| {
                let addr = format!("{}:{}", e.address.host(), e.address.port())
                    .parse()
                    .ok()?;
                Some((e.id.clone(), addr))
            })
            .collect();
        pointsman::upstream::start_all(&instances, upstreams_stop.clone())
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let app = App::start(config, overrides).await?;
    if demo {
        print_demo_help(&app);
    }
    stop_signal().await;
    tracing::info!("stop signal received: draining");
    app.drain().await;
    upstreams_stop.cancel();
    Ok(())
}

fn print_demo_help(app: &App) {
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
         \n\nStats page: http://{admin}/stats\nStop with Ctrl-C.\n",
        admin = app.admin_addr
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
