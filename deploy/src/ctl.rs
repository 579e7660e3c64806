//! `pointsman ctl`: the runtime changes, fleet-wide or on one proxy.
//!
//! With `--etcd`, a change is written to the registry (`/pointsman/overrides`,
//! `/pointsman/maps`), so every proxy replica follows it and it survives
//! restarts. With `--admin URL`, it goes to one proxy's admin API and lasts
//! until that proxy stops, like an HAProxy runtime command.

use std::time::Duration;

use crate::fleet::Fleet;
use crate::watch::{self, Progress};
use crate::{DeployError, Store};
use bytes::Bytes;
use pointsman_discovery::admin_api::ServiceView;
use pointsman_discovery::conn::EtcdError;
use pointsman_discovery::http::{within, HttpAnswer, HttpConn, HttpError, Method};
use pointsman_discovery::registration::MAX_WEIGHT;
use pointsman_discovery::{AdminState, EtcdOptions, PauseSpec};
use serde_json::Value;

/// The longest `ctl` waits for a proxy's admin API.
const ADMIN_LIMIT: Duration = Duration::from_secs(10);
/// The longest `ctl pause` and `resume` wait for every proxy to apply.
const CONFIRM_LIMIT: Duration = Duration::from_secs(30);

/// Why a `ctl` command did not apply.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0:?}: expected <service>/<instance-id>, e.g. web/a1")]
    BadServer(String),
    #[error("weight {0} is out of range: expected 0 to {MAX_WEIGHT}")]
    BadWeight(u16),
    #[error("{0}: the admin API speaks plain HTTP; use http://")]
    Https(String),
    #[error("{service}/{id} is not registered (no key {key}): check the service and instance id")]
    NotRegistered {
        service: String,
        id: String,
        key: String,
    },
    #[error("map {map} has no key {key} in the registry")]
    NoMapKey { map: String, key: String },
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error("etcd: {0}")]
    Etcd(#[from] EtcdError),
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("{admin}: {status}: {why}")]
    Refused {
        admin: String,
        status: u16,
        why: String,
    },
    #[error("{admin}/api/services is not the JSON expected: {reason}")]
    Services { admin: String, reason: String },
    #[error("{0}: run `pointsman ctl --etcd URL` so that every proxy follows it")]
    FleetOnly(&'static str),
    #[error("the proxies did not all apply it: {0}")]
    Unconfirmed(String),
    #[error("cannot read the page {path}: {reason}")]
    Page { path: String, reason: String },
}

/// What `ctl` does.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum CtlCommand {
    /// Lists proxies (with --etcd), services, endpoints and their state.
    Status,
    /// Sets an instance's state: ready, drain (no new requests) or maint
    /// (no traffic).
    State {
        /// <service>/<instance-id>
        server: String,
        state: AdminState,
    },
    /// Sets an instance's weight (0 to 256; 0 takes no new requests).
    Weight {
        /// <service>/<instance-id>
        server: String,
        weight: u16,
    },
    /// Drops the state and weight set by `ctl` for an instance: its
    /// registration's own values apply again.
    Reset {
        /// <service>/<instance-id>
        server: String,
    },
    /// Sets a map entry (a blue/green switch is one of these).
    MapSet {
        map: String,
        key: String,
        value: String,
    },
    /// Deletes a map entry.
    MapDel { map: String, key: String },
    /// Pauses a service: its new requests wait, up to --timeout each,
    /// until `ctl resume`; requests in flight finish. With --etcd, on every
    /// proxy (returns once every one applied it); with --admin, on that
    /// proxy only.
    Pause {
        service: String,
        /// How long one request may wait before it gets 503.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Resumes a paused service (where `pause` paused it): the waiting
    /// requests go on.
    Resume { service: String },
    /// Puts a service in maintenance on every proxy (--etcd only): each
    /// request gets 503 with the page; --off ends it. Returns once every
    /// proxy applied it.
    Maintenance {
        service: String,
        /// An HTML file to answer with (default: the service's 503 page).
        #[arg(long, conflicts_with = "off")]
        page: Option<std::path::PathBuf>,
        /// End the maintenance.
        #[arg(long)]
        off: bool,
    },
}

/// Where `ctl` sends its changes.
pub enum Target {
    Fleet(Box<EtcdOptions>),
    Proxy {
        admin: String,
        token: Option<String>,
    },
}

fn split_server(s: &str) -> Result<(&str, &str), CtlError> {
    match s.split_once('/') {
        Some((svc, id)) if !svc.is_empty() && !id.is_empty() && !id.contains('/') => Ok((svc, id)),
        _ => Err(CtlError::BadServer(s.to_string())),
    }
}

pub async fn run(target: Target, cmd: CtlCommand) -> Result<(), CtlError> {
    if let CtlCommand::Weight { weight, .. } = &cmd {
        if *weight > MAX_WEIGHT {
            return Err(CtlError::BadWeight(*weight));
        }
    }
    match target {
        Target::Fleet(opts) => fleet(*opts, cmd).await,
        Target::Proxy { admin, token } => proxy(&admin, token.as_deref(), cmd).await,
    }
}

async fn fleet(opts: EtcdOptions, cmd: CtlCommand) -> Result<(), CtlError> {
    let mut store = Store::connect(&opts).await?;
    let rev = match cmd {
        CtlCommand::Status => return fleet_status(opts).await,
        CtlCommand::State { server, state } => {
            let (svc, id) = split_server(&server)?;
            known(&mut store, svc, id).await?;
            store.set_override(svc, id, Some(state), None).await?
        }
        CtlCommand::Weight { server, weight } => {
            let (svc, id) = split_server(&server)?;
            known(&mut store, svc, id).await?;
            store.set_override(svc, id, None, Some(weight)).await?
        }
        CtlCommand::Reset { server } => {
            let (svc, id) = split_server(&server)?;
            store.restore_override(svc, id, None).await?
        }
        CtlCommand::MapSet { map, key, value } => store.set_map(&map, &key, &value).await?,
        CtlCommand::MapDel { map, key } => {
            if store.map_entry(&map, &key).await?.is_none() {
                return Err(CtlError::NoMapKey { map, key });
            }
            store.delete_map(&map, &key).await?
        }
        CtlCommand::Pause { service, timeout } => {
            unregistered_warning(&mut store, &service).await?;
            let rev = store.set_pause(&service, &PauseSpec { timeout }).await?;
            println!("{service}: paused at revision {rev}");
            return confirm(opts, rev).await;
        }
        CtlCommand::Resume { service } => {
            let rev = store.delete_pause(&service).await?;
            println!("{service}: resumed at revision {rev}");
            return confirm(opts, rev).await;
        }
        CtlCommand::Maintenance {
            service, off: true, ..
        } => {
            let rev = store.delete_maintenance(&service).await?;
            println!("{service}: maintenance ended at revision {rev}");
            return confirm(opts, rev).await;
        }
        CtlCommand::Maintenance { service, page, .. } => {
            unregistered_warning(&mut store, &service).await?;
            let page = match page {
                Some(path) => std::fs::read_to_string(&path).map_err(|e| CtlError::Page {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?,
                None => String::new(),
            };
            let rev = store.set_maintenance(&service, page).await?;
            println!("{service}: in maintenance at revision {rev}");
            return confirm(opts, rev).await;
        }
    };
    println!("written at revision {rev}");
    Ok(())
}

/// Waits until every proxy in etcd applied `revision` (a pause or a
/// resume takes effect on each proxy as it applies it).
async fn confirm(opts: EtcdOptions, revision: i64) -> Result<(), CtlError> {
    let mut fleet = Fleet::new(opts)?;
    watch::until_applied(&mut fleet, &Progress::new(), revision, CONFIRM_LIMIT)
        .await
        .map(|_| ())
        .map_err(CtlError::Unconfirmed)
}

/// A pause or maintenance may be set before a service's first instance
/// (or for one only in the proxies' config), so a name with no instance
/// is not refused; it is said, since it may be a typo.
async fn unregistered_warning(store: &mut Store, service: &str) -> Result<(), CtlError> {
    if store.instances(service).await?.is_empty() {
        eprintln!(
            "note: no instance of {service} is registered under {}: check the name if you meant a registered service",
            store.instance_key(service, "")
        );
    }
    Ok(())
}

/// Refuses overrides for instances nobody registered (a typo would
/// otherwise wait silently for an instance that never comes).
async fn known(store: &mut Store, service: &str, id: &str) -> Result<(), CtlError> {
    if store.instance(service, id).await?.is_none() {
        return Err(CtlError::NotRegistered {
            service: service.to_string(),
            id: id.to_string(),
            key: store.instance_key(service, id),
        });
    }
    Ok(())
}

/// The proxies' records (the fleet library reads them, as rollouts do),
/// then what the first proxy serves.
async fn fleet_status(opts: EtcdOptions) -> Result<(), CtlError> {
    let dir = pointsman_discovery::keys::proxies_dir(&opts.prefixes);
    let mut fleet = Fleet::new(opts)?;
    let (proxies, malformed) = fleet.proxies().await?;
    println!("proxies ({}):", proxies.len());
    for p in &proxies {
        let applied = p
            .applied_revision
            .map(|r| r.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<24} admin {:<22} applied revision {applied}",
            p.id, p.admin
        );
    }
    for m in malformed {
        println!("  (unreadable record: {m})");
    }
    match proxies.first() {
        Some(p) => print_services(&p.admin).await,
        None => {
            println!("no proxy has registered under {dir}");
            Ok(())
        }
    }
}

async fn proxy(admin: &str, token: Option<&str>, cmd: CtlCommand) -> Result<(), CtlError> {
    let (method, path, body) = match cmd {
        CtlCommand::Status => return print_services(admin).await,
        // On this proxy only, until `resume` or its restart.
        CtlCommand::Pause { service, timeout } => (
            Method::POST,
            format!("/api/services/{}/pause", enc(&service)),
            serde_json::json!({ "timeout": humantime::format_duration(timeout).to_string() })
                .to_string(),
        ),
        CtlCommand::Resume { service } => (
            Method::DELETE,
            format!("/api/services/{}/pause", enc(&service)),
            String::new(),
        ),
        CtlCommand::Maintenance { .. } => {
            return Err(CtlError::FleetOnly("a maintenance is fleet-wide"))
        }
        CtlCommand::State { server, state } => {
            let (s, id) = split_server(&server)?;
            (
                Method::POST,
                format!("/api/services/{}/endpoints/{}", enc(s), enc(id)),
                serde_json::json!({ "state": state }).to_string(),
            )
        }
        CtlCommand::Weight { server, weight } => {
            let (s, id) = split_server(&server)?;
            (
                Method::POST,
                format!("/api/services/{}/endpoints/{}", enc(s), enc(id)),
                serde_json::json!({ "weight": weight }).to_string(),
            )
        }
        CtlCommand::Reset { server } => {
            let (s, id) = split_server(&server)?;
            (
                Method::DELETE,
                format!("/api/services/{}/endpoints/{}", enc(s), enc(id)),
                String::new(),
            )
        }
        CtlCommand::MapSet { map, key, value } => (
            Method::PUT,
            format!("/api/maps/{}/{}", enc(&map), enc(&key)),
            value,
        ),
        CtlCommand::MapDel { map, key } => (
            Method::DELETE,
            format!("/api/maps/{}/{}", enc(&map), enc(&key)),
            String::new(),
        ),
    };
    let answer = request(admin, method, &path, token, body).await?;
    if !(200..300).contains(&answer.status) {
        let why = serde_json::from_slice::<Value>(&answer.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| answer.text());
        return Err(CtlError::Refused {
            admin: admin.to_string(),
            status: answer.status,
            why,
        });
    }
    println!("applied on {admin}");
    Ok(())
}

async fn print_services(admin: &str) -> Result<(), CtlError> {
    let answer = request(admin, Method::GET, "/api/services", None, String::new()).await?;
    if answer.status != 200 {
        return Err(CtlError::Refused {
            admin: admin.to_string(),
            status: answer.status,
            why: answer.text(),
        });
    }
    let services: Vec<ServiceView> =
        serde_json::from_slice(&answer.body).map_err(|e| CtlError::Services {
            admin: admin.to_string(),
            reason: e.to_string(),
        })?;
    for s in services {
        // The balance is shown as JSON (quoted), and the numbers unpadded,
        // as they have always been.
        println!("{} ({})", s.name, Value::from(s.balance));
        for e in s.endpoints {
            println!(
                "  {:<20} {:<22} {:<6} weight {} {:<9} in flight {} requests {}",
                e.id,
                e.address,
                e.state.as_str(),
                e.weight,
                if e.healthy { "healthy" } else { "unhealthy" },
                e.in_flight,
                e.requests,
            );
        }
    }
    Ok(())
}

/// Percent-encodes a path segment.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One request to an admin API (`host:port` or `http://host:port`), with
/// `body` as JSON unless it is empty; the answer whatever its status.
pub async fn request(
    admin: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: String,
) -> Result<HttpAnswer, CtlError> {
    if admin.starts_with("https://") {
        return Err(CtlError::Https(admin.to_string()));
    }
    let addr = admin.trim_start_matches("http://").trim_end_matches('/');
    let body = (!body.is_empty()).then(|| Bytes::from(body));
    let answer = within(addr, ADMIN_LIMIT, async {
        let mut conn = HttpConn::open(addr).await?.with_token(token);
        conn.send(method, path, body).await
    })
    .await?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_service_slash_id() {
        assert_eq!(split_server("web/a1").ok(), Some(("web", "a1")));
        for bad in ["web", "/a1", "web/", "web/a/b"] {
            assert!(split_server(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(enc("/blog"), "%2Fblog");
        assert_eq!(enc("host1:web-1:8080"), "host1:web-1:8080");
    }
}
