//! What the tests of proxies following a registry (etcd or Consul) share:
//! a config with nothing but a listener, and a proxy's view of a service's
//! endpoints as its admin API shows them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::{plain_client, wait_for, Proxy};

/// How long a registry change gets to reach the proxies.
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

/// One HTTP listener, `web` at `listen`, and nothing else: every service
/// comes from the registry. With `default_service`, requests no route
/// takes go to it.
pub fn listener_config(listen: SocketAddr, default_service: Option<&str>) -> String {
    let mut config = format!("[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\n");
    if let Some(service) = default_service {
        config.push_str(&format!("default_service = \"{service}\"\n"));
    }
    config
}

/// A service's endpoints on a proxy: id -> (state, requests, in flight);
/// empty when the admin API does not answer.
pub async fn endpoints(proxy: &Proxy, service: &str) -> BTreeMap<String, (String, u64, u64)> {
    let Ok(resp) = plain_client()
        .get(proxy.admin_url("/api/services"))
        .send()
        .await
    else {
        return BTreeMap::new();
    };
    let all: Value = resp.json().await.unwrap_or(Value::Null);
    let mut out = BTreeMap::new();
    if let Some(eps) = all
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .and_then(|s| s["endpoints"].as_array())
    {
        for e in eps {
            out.insert(
                e["id"].as_str().unwrap_or("").to_string(),
                (
                    e["state"].as_str().unwrap_or("").to_string(),
                    e["requests"].as_u64().unwrap_or(0),
                    e["in_flight"].as_u64().unwrap_or(0),
                ),
            );
        }
    }
    out
}

/// Waits until every proxy has exactly the `ready` endpoints `ids` in
/// `service`.
pub async fn wait_ready(proxies: &[&Proxy], service: &str, ids: &[&str]) {
    for p in proxies {
        wait_for(
            CHANGE_DEADLINE,
            &format!(
                "proxy {} has exactly the ready endpoints {service}/{ids:?}",
                p.admin
            ),
            || async {
                let eps = endpoints(p, service).await;
                eps.len() == ids.len()
                    && ids
                        .iter()
                        .all(|id| eps.get(*id).is_some_and(|(s, _, _)| s == "ready"))
            },
        )
        .await;
    }
}

/// Waits until `proxy` shows a request in flight to `service`/`id`.
pub async fn wait_in_flight(proxy: &Proxy, service: &str, id: &str) {
    wait_for(
        CHANGE_DEADLINE,
        &format!(
            "proxy {} has a request in flight to {service}/{id}",
            proxy.admin
        ),
        || async {
            endpoints(proxy, service)
                .await
                .get(id)
                .is_some_and(|(_, _, n)| *n >= 1)
        },
    )
    .await;
}
