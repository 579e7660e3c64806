//! `pointsman ctl`: the runtime changes, fleet-wide or on one proxy.
//!
//! With `--etcd`, a change is written to the registry (`/pointsman/overrides`,
//! `/pointsman/maps`), so every proxy replica follows it and it survives
//! restarts. With `--admin URL`, it goes to one proxy's admin API and lasts
//! until that proxy stops, like an HAProxy runtime command.

use std::time::Duration;

use crate::fleet::Fleet;
use crate::Store;
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pointsman_discovery::admin_api::ServiceView;
use pointsman_discovery::registration::MAX_WEIGHT;
use pointsman_discovery::{AdminState, EtcdOptions};
use serde_json::Value;

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
}

/// Where `ctl` sends its changes.
pub enum Target {
    Fleet(Box<EtcdOptions>),
    Proxy {
        admin: String,
        token: Option<String>,
    },
}

fn split_server(s: &str) -> anyhow::Result<(&str, &str)> {
    match s.split_once('/') {
        Some((svc, id)) if !svc.is_empty() && !id.is_empty() && !id.contains('/') => Ok((svc, id)),
        _ => bail!("{s:?}: expected <service>/<instance-id>, e.g. web/a1"),
    }
}

pub async fn run(target: Target, cmd: CtlCommand) -> anyhow::Result<()> {
    if let CtlCommand::Weight { weight, .. } = &cmd {
        if *weight > MAX_WEIGHT {
            bail!("weight {weight} is out of range: expected 0 to {MAX_WEIGHT}");
        }
    }
    match target {
        Target::Fleet(opts) => fleet(*opts, cmd).await,
        Target::Proxy { admin, token } => proxy(&admin, token.as_deref(), cmd).await,
    }
}

async fn fleet(opts: EtcdOptions, cmd: CtlCommand) -> anyhow::Result<()> {
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
                bail!("map {map} has no key {key} in the registry");
            }
            store.delete_map(&map, &key).await?
        }
    };
    println!("written at revision {rev}");
    Ok(())
}

/// Refuses overrides for instances nobody registered (a typo would
/// otherwise wait silently for an instance that never comes).
async fn known(store: &mut Store, service: &str, id: &str) -> anyhow::Result<()> {
    if store.instance(service, id).await?.is_none() {
        bail!(
            "{service}/{id} is not registered (no key {}): check the service and instance id",
            store.instance_key(service, id)
        );
    }
    Ok(())
}

/// The proxies' records (the fleet library reads them, as rollouts do),
/// then what the first proxy serves.
async fn fleet_status(opts: EtcdOptions) -> anyhow::Result<()> {
    let dir = pointsman_discovery::keys::proxies_dir(&opts.prefixes);
    let mut fleet = Fleet::new(opts).context("etcd")?;
    let (proxies, malformed) = fleet.proxies().await.context("list the proxies")?;
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

async fn proxy(admin: &str, token: Option<&str>, cmd: CtlCommand) -> anyhow::Result<()> {
    let (method, path, body) = match cmd {
        CtlCommand::Status => return print_services(admin).await,
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
    let (status, body) = request(admin, method, &path, token, body).await?;
    if !status.is_success() {
        let why = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("{admin}: {status}: {why}");
    }
    println!("applied on {admin}");
    Ok(())
}

async fn print_services(admin: &str) -> anyhow::Result<()> {
    let (status, body) = request(admin, Method::GET, "/api/services", None, String::new()).await?;
    if !status.is_success() {
        bail!("{admin}/api/services: {status}");
    }
    let services: Vec<ServiceView> = serde_json::from_slice(&body)
        .with_context(|| format!("{admin}/api/services is not the JSON expected"))?;
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

/// One request to an admin API (`host:port` or `http://host:port`).
pub async fn request(
    admin: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: String,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let base = if admin.starts_with("http://") {
        admin.trim_end_matches('/').to_string()
    } else if admin.starts_with("https://") {
        bail!("{admin}: the admin API speaks plain HTTP; use http://");
    } else {
        format!("http://{admin}")
    };
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| anyhow!("{admin}: cannot build the request: {e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| anyhow!("{admin}: no answer within 10s"))?
        .with_context(|| format!("{admin}: cannot reach the admin API"))?;
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .map_err(|_| anyhow!("{admin}: the answer did not finish within 10s"))?
        .with_context(|| format!("{admin}: reading the answer"))?
        .to_bytes();
    Ok((status, body))
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
