//! End to end: a proxy following etcd's v2 keyspace (`--etcd-api v2`),
//! written the way CoreOS-era containers and registrator write it: PUT
//! `/v2/keys/services/<service>/<host>:<container>:<port>` with a TTL,
//! against a real etcd 3.4 serving v2 (`--enable-v2=true`).
//!
//! What is covered: registrator's layout becomes routable, follows a
//! change, vanishes when its TTL expires, and a deleted service directory
//! takes its instances with it; a route written through v2 routes; and an
//! `--etcd` URL with a path is refused saying what to give instead.

mod support;

use std::time::Duration;

use support::etcd::EtcdServer;
use support::registry::{endpoints, listener_config};
use support::*;

/// PUT `key` = `value` in etcd's v2 keyspace, with a TTL in seconds.
async fn v2_put(etcd: &EtcdServer, key: &str, value: &str, ttl: Option<u32>) {
    let mut form = vec![("value", value.to_string())];
    if let Some(ttl) = ttl {
        form.push(("ttl", ttl.to_string()));
    }
    let resp = plain_client()
        .put(format!("{}/v2/keys{key}", etcd.endpoint()))
        .form(&form)
        .send()
        .await
        .expect("a v2 PUT");
    assert!(
        resp.status().is_success(),
        "PUT /v2/keys{key}: {}",
        resp.text().await.unwrap_or_default()
    );
}

async fn v2_delete_dir(etcd: &EtcdServer, dir: &str) {
    let resp = plain_client()
        .delete(format!(
            "{}/v2/keys{dir}?recursive=true&dir=true",
            etcd.endpoint()
        ))
        .send()
        .await
        .expect("a v2 DELETE");
    assert!(resp.status().is_success(), "DELETE /v2/keys{dir}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrator_keys_written_through_v2_route_and_expire() {
    let etcd = EtcdServer::start_with_args(&["--enable-v2=true"]);
    let ups = Upstream::start_many(&["web1", "web2", "api1"]).await;
    // Written before the proxy starts (the listing) and after (the watch).
    v2_put(
        &etcd,
        "/services/web/host1:web1:8080",
        &ups[0].addr.to_string(),
        None,
    )
    .await;
    let endpoint = etcd.endpoint();
    let proxy = Proxy::start_with_args(
        || listener_config(free_addr(), Some("web")),
        &["--etcd", &endpoint, "--etcd-api", "v2", "--threads", "1"],
    )
    .await;
    let deadline = Duration::from_secs(10);
    wait_for(deadline, "web1 from the v2 listing", || async {
        endpoints(&proxy, "web")
            .await
            .contains_key("host1:web1:8080")
    })
    .await;
    // registrator refreshes its keys with a TTL.
    v2_put(
        &etcd,
        "/services/web/host1:web2:8080",
        &ups[1].addr.to_string(),
        Some(3),
    )
    .await;
    wait_for(deadline, "web2 from the v2 watch", || async {
        endpoints(&proxy, "web")
            .await
            .contains_key("host1:web2:8080")
    })
    .await;
    let counts = tally(&client(), &proxy.url("/"), 20).await;
    assert_eq!(
        (counts.get("web1"), counts.get("web2")),
        (Some(&10), Some(&10)),
        "{counts:?}"
    );

    // A route through v2 too.
    v2_put(
        &etcd,
        "/services/api/host1:api1:9000",
        &ups[2].addr.to_string(),
        None,
    )
    .await;
    v2_put(
        &etcd,
        "/pointsman/routes/api",
        r#"{"path_prefix":"/api","service":"api"}"#,
        None,
    )
    .await;
    wait_for(deadline, "the api route", || async {
        let (status, echo) = get_echo(&client(), &proxy.url("/api/x"), &[]).await;
        status == 200 && echo["server"] == "api1"
    })
    .await;

    // The TTL passes with no refresh: gone.
    wait_for(Duration::from_secs(15), "web2 expired", || async {
        !endpoints(&proxy, "web")
            .await
            .contains_key("host1:web2:8080")
    })
    .await;
    // A service directory deleted takes its instances with it.
    v2_delete_dir(&etcd, "/services/web").await;
    wait_for(deadline, "web emptied", || async {
        endpoints(&proxy, "web").await.is_empty()
    })
    .await;
    let (status, _) = get_echo(&client(), &proxy.url("/"), &[]).await;
    assert_eq!(status, 503);
}

#[test]
fn an_etcd_url_with_a_path_is_refused_with_the_fix() {
    let (code, _, err) = run_cli(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        "http://127.0.0.1:2379/v2/keys",
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("no path") && err.contains("--etcd-api v2"),
        "{err}"
    );
}

/// Seed 004's CoreOS units write one key per container directly under
/// `/services` through v2 (`/services/docker-container-webapp1:49153`):
/// with `--flat-keys` each is an instance of the service its name gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_004_flat_keys_through_v2() {
    let etcd = EtcdServer::start_with_args(&["--enable-v2=true"]);
    let ups = Upstream::start_many(&["webapp1", "webapp2"]).await;
    for (name, u) in [
        ("docker-container-webapp1:49153", &ups[0]),
        ("docker-container-webapp2:49154", &ups[1]),
    ] {
        v2_put(
            &etcd,
            &format!("/services/{name}"),
            &u.addr.to_string(),
            Some(60),
        )
        .await;
    }
    let endpoint = etcd.endpoint();
    let proxy = Proxy::start_with_args(
        || listener_config(free_addr(), Some("docker-container-webapp")),
        &[
            "--etcd",
            &endpoint,
            "--etcd-api",
            "v2",
            "--flat-keys",
            "--threads",
            "1",
        ],
    )
    .await;
    wait_for(Duration::from_secs(10), "both containers", || async {
        endpoints(&proxy, "docker-container-webapp").await.len() == 2
    })
    .await;
    let counts = tally(&client(), &proxy.url("/"), 20).await;
    assert_eq!(
        (counts.get("webapp1"), counts.get("webapp2")),
        (Some(&10), Some(&10)),
        "{counts:?}"
    );
}
