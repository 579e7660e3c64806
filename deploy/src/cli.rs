//! Command-line options shared by `run`, `ctl`, `register` and `deploy`:
//! how to reach etcd and Consul, and how the tools wait for the fleet.

use std::path::PathBuf;

use pointsman_discovery::{EtcdApi, EtcdOptions, EtcdTls, Prefixes};

pub use crate::fleet::OnUnconfirmed;

/// How `register` and `deploy` wait for the proxies (see
/// [`crate::fleet`]).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct FleetArgs {
    /// The proxies' admin token, sent with the drain notices that tell a
    /// proxy cut off from etcd of a drain directly.
    #[arg(
        long,
        global = true,
        env = "POINTSMAN_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// When a drain is not confirmed by every proxy within the drain
    /// timeout: fail (name them, stop, leave the instance serving) or
    /// proceed (name them and go on).
    #[arg(long, global = true, value_enum, default_value = "fail")]
    pub on_unconfirmed: OnUnconfirmed,
    /// No proxy is expected: waits end at once when no proxy is known,
    /// instead of failing with "no proxy is known".
    #[arg(long, global = true)]
    pub empty_fleet_ok: bool,
}

impl FleetArgs {
    /// Sets up `fleet` as these flags ask.
    pub fn apply(&self, fleet: &mut crate::fleet::Fleet) {
        fleet.token = self.admin_token.clone().filter(|t| !t.trim().is_empty());
        fleet.allow_empty = self.empty_fleet_ok;
        fleet.on_unconfirmed = self.on_unconfirmed;
    }
}

/// How to reach etcd; shared by `run`, `ctl`, `register` and `deploy`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct EtcdArgs {
    /// etcd client URLs of the cluster, comma-separated
    /// (http://127.0.0.1:2379,http://10.0.0.2:2379).
    #[arg(long, value_delimiter = ',', env = "POINTSMAN_ETCD")]
    pub etcd: Vec<String>,
    /// Key prefix of service registrations in etcd.
    #[arg(long, default_value = "/services")]
    pub etcd_prefix: String,
    /// Key prefix of routes, maps, overrides and proxies in etcd.
    #[arg(long, default_value = "/pointsman")]
    pub etcd_config_prefix: String,
    /// etcd user name (with --etcd-password, or POINTSMAN_ETCD_PASSWORD).
    #[arg(long)]
    pub etcd_user: Option<String>,
    /// etcd password.
    #[arg(long, env = "POINTSMAN_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// PEM CA certificate for etcd over TLS.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key).
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// The keyspace `run` follows: v3, or v2 (`/v2/keys`, as CoreOS-era
    /// containers and registrator write; etcd 3.x serves it with
    /// --enable-v2=true). The tools always write v3.
    #[arg(long, value_enum, default_value = "v3", env = "POINTSMAN_ETCD_API")]
    pub etcd_api: EtcdApiArg,
    /// Keys directly under --etcd-prefix are instances too, one key per
    /// container (/services/webapp1:49153, the CoreOS layout); the service
    /// is the name without its :port and trailing digits (webapp).
    #[arg(long)]
    pub flat_keys: bool,
}

/// `--etcd-api`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EtcdApiArg {
    #[default]
    V3,
    V2,
}

/// Registry flags that do not make a usable configuration.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("--etcd-user and --etcd-password go together")]
    UserWithoutPassword,
    #[error("--etcd {url}: give the member's address only (http://host:port), no path; for the v2 keyspace (/v2/keys) add --etcd-api v2")]
    EtcdPath { url: String },
    #[error("etcd: {0}")]
    Etcd(pointsman_discovery::DiscoveryError),
    #[error("consul: {0}")]
    Consul(pointsman_discovery::consul::ConsulError),
}

impl EtcdArgs {
    /// The options, or `None` when no --etcd was given.
    pub fn options(&self) -> Result<Option<EtcdOptions>, ArgsError> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        for url in &self.etcd {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"))
                .unwrap_or(url);
            if rest
                .split_once('/')
                .is_some_and(|(_, path)| !path.is_empty())
            {
                return Err(ArgsError::EtcdPath { url: url.clone() });
            }
        }
        let mut o = EtcdOptions::new(
            self.etcd
                .iter()
                .map(|u| u.trim_end_matches('/').to_string()),
        );
        o.api = match self.etcd_api {
            EtcdApiArg::V3 => EtcdApi::V3,
            EtcdApiArg::V2 => EtcdApi::V2,
        };
        o.prefixes = Prefixes {
            services: self.etcd_prefix.clone(),
            pointsman: self.etcd_config_prefix.clone(),
            flat_keys: self.flat_keys,
        };
        o.user = match (&self.etcd_user, &self.etcd_password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => return Err(ArgsError::UserWithoutPassword),
        };
        o.tls = self.etcd_ca.as_ref().map(|ca| EtcdTls {
            ca: ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            domain: None,
        });
        o.check().map_err(ArgsError::Etcd)?;
        Ok(Some(o))
    }
}

/// How to reach Consul.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConsulArgs {
    /// Consul HTTP API URLs (an agent or servers), comma-separated
    /// (http://127.0.0.1:8500); tried one at a time.
    #[arg(long, value_delimiter = ',', env = "POINTSMAN_CONSUL")]
    pub consul: Vec<String>,
    /// Consul ACL token (sent as X-Consul-Token).
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub consul_token: Option<String>,
    /// Consul datacenter to read [default: the agent's].
    #[arg(long)]
    pub consul_datacenter: Option<String>,
    /// How long one blocking query may wait for a change.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub consul_wait: std::time::Duration,
}

impl ConsulArgs {
    pub fn options(&self) -> Result<Option<pointsman_discovery::ConsulOptions>, ArgsError> {
        if self.consul.is_empty() {
            return Ok(None);
        }
        let mut o = pointsman_discovery::ConsulOptions::new(self.consul.iter().cloned());
        o.token = self.consul_token.clone();
        o.datacenter = self.consul_datacenter.clone();
        o.wait = self.consul_wait;
        o.check().map_err(ArgsError::Consul)?;
        Ok(Some(o))
    }
}
