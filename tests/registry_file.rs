//! End to end with the file registry (`--registry-dir`): registration files
//! created, edited (address and weight), deleted, broken and replaced the
//! way editors save, with the real proxy routing to real upstreams.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// How long a file change gets to reach the routing table.
const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

/// One HTTP listener whose unrouted requests go to the service `web`.
fn config(listen: SocketAddr) -> String {
    format!("[[listeners]]\nname = \"web\"\nbind = \"{listen}\"\ndefault_service = \"web\"\n")
}

/// Starts the proxy following the registry directory `dir`.
async fn start_proxy(dir: &Path) -> Proxy {
    let dir = dir.to_str().expect("a UTF-8 path");
    Proxy::start_with_args(|| config(free_addr()), &["--registry-dir", dir]).await
}

/// Writes a registration file in place (creating its service directory).
fn write(dir: &Path, service: &str, id: &str, value: &str) {
    std::fs::create_dir_all(dir.join(service)).expect("create the service directory");
    std::fs::write(dir.join(service).join(id), value).expect("write a registration file");
}

/// Saves like an editor: the new content goes to `tmp_name` in the same
/// directory, which is then renamed over the registration file.
fn replace(dir: &Path, service: &str, id: &str, tmp_name: &str, value: &str) {
    let tmp = dir.join(service).join(tmp_name);
    std::fs::write(&tmp, value).expect("write the temporary file");
    std::fs::rename(&tmp, dir.join(service).join(id)).expect("rename it into place");
}

/// One GET that never panics: the status (0 when no answer) and the
/// upstream's name, or, when the body is not an echo, the body (or the
/// error) in brackets, which names no upstream but tells a failing test
/// what happened.
async fn answer(client: &reqwest::Client, url: &str) -> (u16, String) {
    match client.get(url).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.bytes().await.unwrap_or_default();
            let echo: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            match echo["server"].as_str() {
                Some(server) => (status, server.to_string()),
                None => (
                    status,
                    format!("[{}]", String::from_utf8_lossy(&body).trim()),
                ),
            }
        }
        Err(e) => (0, format!("[{e}]")),
    }
}

async fn wait_served_by(client: &reqwest::Client, url: &str, name: &str) {
    wait_for(
        CHANGE_DEADLINE,
        &format!("GET {url} is answered by {name}"),
        || async { answer(client, url).await == (200, name.to_string()) },
    )
    .await;
}

/// Sends `n` GETs and asserts every one is a 200 from one of `allowed`;
/// returns the count per upstream.
async fn tally_only(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    allowed: &[&str],
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let (status, server) = answer(client, url).await;
        assert!(
            status == 200 && allowed.contains(&server.as_str()),
            "request {i} of {n} to {url}: status {status} from {server:?}, expected 200 from one of {allowed:?}"
        );
        *counts.entry(server).or_insert(0) += 1;
    }
    counts
}

/// `service`'s endpoints in `/api/services`: id -> (address, weight).
async fn endpoints(proxy: &Proxy, service: &str) -> BTreeMap<String, (String, u64)> {
    let all = proxy.services().await;
    all.as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .and_then(|s| s["endpoints"].as_array())
        .map(|eps| {
            eps.iter()
                .map(|e| {
                    (
                        e["id"].as_str().unwrap_or("").to_string(),
                        (
                            e["address"].as_str().unwrap_or("").to_string(),
                            e["weight"].as_u64().unwrap_or(0),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `service` has exactly `want`: (id, address, weight).
async fn wait_endpoints(proxy: &Proxy, service: &str, want: &[(&str, &Upstream, u64)]) {
    let want: BTreeMap<String, (String, u64)> = want
        .iter()
        .map(|(id, u, w)| (id.to_string(), (u.addr.to_string(), *w)))
        .collect();
    wait_for(
        CHANGE_DEADLINE,
        &format!("service {service} has exactly {want:?}"),
        || async { endpoints(proxy, service).await == want },
    )
    .await;
}

const MALFORMED: &str = "pointsman_registry_malformed_total{source=\"file\"}";

async fn wait_malformed(proxy: &Proxy, want: f64) {
    wait_for(
        CHANGE_DEADLINE,
        &format!("/metrics shows {MALFORMED} {want}"),
        || async { proxy.metric(MALFORMED).await == Some(want) },
    )
    .await;
}

/// Creating a file registers an instance; editing it changes the address
/// and then the weight; deleting files deregisters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_register_edit_and_deregister_instances() {
    let ups = Upstream::start_many(&["a", "b", "c"]).await;
    let (a, b, c) = (&ups[0], &ups[1], &ups[2]);
    let registry = tempfile::tempdir().expect("a registry dir");
    let dir = registry.path();
    let proxy = start_proxy(dir).await;
    let client = client();
    let url = proxy.url("/");
    // No service `web` yet.
    assert_eq!(answer(&client, &url).await.0, 503);

    write(dir, "web", "one", &format!("{}\n", a.addr));
    wait_served_by(&client, &url, "a").await;
    tally_only(&client, &url, 10, &["a"]).await;

    // Address change, in place.
    write(dir, "web", "one", &format!("{}\n", b.addr));
    wait_endpoints(&proxy, "web", &[("one", b, 1)]).await;
    tally_only(&client, &url, 20, &["b"]).await;

    // A second instance, then a weight change of the first (JSON form).
    write(dir, "web", "two", &format!(r#"{{"address":"{}"}}"#, c.addr));
    write(
        dir,
        "web",
        "one",
        &format!(r#"{{"address":"{}","weight":3}}"#, b.addr),
    );
    wait_endpoints(&proxy, "web", &[("one", b, 3), ("two", c, 1)]).await;
    let counts = tally_only(&client, &url, 40, &["b", "c"]).await;
    let (nb, nc) = (counts["b"], counts["c"]);
    assert!(
        (28..=32).contains(&nb) && (8..=12).contains(&nc),
        "weights 3:1 over 40 requests gave {counts:?}"
    );

    std::fs::remove_file(dir.join("web").join("two")).expect("delete two");
    wait_endpoints(&proxy, "web", &[("one", b, 3)]).await;
    tally_only(&client, &url, 100, &["b"]).await;

    std::fs::remove_file(dir.join("web").join("one")).expect("delete one");
    wait_for(
        CHANGE_DEADLINE,
        "the last instance is gone (503)",
        || async { answer(&client, &url).await.0 == 503 },
    )
    .await;
}

/// A file whose new content does not parse keeps the last good
/// registration read from it, is counted, and a fix applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_file_keeps_the_last_good_registration() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let registry = tempfile::tempdir().expect("a registry dir");
    let dir = registry.path();
    write(dir, "web", "one", &a.addr.to_string());
    let proxy = start_proxy(dir).await;
    let client = client();
    let url = proxy.url("/");
    wait_served_by(&client, &url, "a").await;
    assert_eq!(proxy.metric(MALFORMED).await, Some(0.0));

    // Each bad save lands whole (written aside, then renamed), so the
    // counter moves by exactly one: a plain write could be read between
    // its truncation and its bytes and count an empty file too.
    replace(dir, "web", "one", ".one.tmp", "nonsense");
    wait_malformed(&proxy, 1.0).await;
    tally_only(&client, &url, 40, &["a"]).await;
    assert_eq!(
        endpoints(&proxy, "web").await["one"],
        (a.addr.to_string(), 1)
    );

    // A typo in the JSON form: still the last good registration.
    replace(
        dir,
        "web",
        "one",
        ".one.tmp",
        &format!(r#"{{"address":"{}","wieght":2}}"#, b.addr),
    );
    wait_malformed(&proxy, 2.0).await;
    tally_only(&client, &url, 20, &["a"]).await;

    // A new file that never parsed registers nothing.
    replace(dir, "web", "two", ".two.tmp", "127.0.0.1");
    wait_malformed(&proxy, 3.0).await;
    wait_endpoints(&proxy, "web", &[("one", a, 1)]).await;

    write(dir, "web", "one", &format!("{}\n", b.addr));
    wait_endpoints(&proxy, "web", &[("one", b, 1)]).await;
    tally_only(&client, &url, 20, &["b"]).await;
}

/// Saving by writing a temporary file and renaming it over the old one
/// applies, and the instance never disappears in between: two clients
/// running throughout see only 200s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editor_style_replace_applies_without_a_gap() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let registry = tempfile::tempdir().expect("a registry dir");
    let dir = registry.path();
    write(dir, "web", "one", &ups[0].addr.to_string());
    let proxy = start_proxy(dir).await;
    let client = client();
    let url = proxy.url("/");
    wait_served_by(&client, &url, "a").await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (stop, client, url) = (stop.clone(), support::client(), url.clone());
        clients.push(tokio::spawn(async move {
            let (mut ok, mut bad) = (0usize, Vec::new());
            let end = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                match answer(&client, &url).await {
                    (200, s) if s == "a" || s == "b" => ok += 1,
                    other => bad.push(other),
                }
            }
            (ok, bad)
        }));
    }

    for i in 0..10 {
        let u = &ups[(i + 1) % 2];
        // Both kinds of temporary name the registry ignores.
        let tmp = if i % 2 == 0 { ".one.new" } else { "one.tmp" };
        replace(dir, "web", "one", tmp, &format!("{}\n", u.addr));
        wait_endpoints(&proxy, "web", &[("one", u, 1)]).await;
        wait_served_by(&client, &url, &u.name).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, bad) = c.await.expect("client task");
        assert!(
            bad.is_empty(),
            "{} answers were not a 200 from a or b while the file was replaced: {:?}",
            bad.len(),
            &bad[..bad.len().min(10)]
        );
        total += ok;
    }
    assert!(total > 0, "the clients sent nothing");
    // Neither temporary file was taken for an instance.
    assert_eq!(endpoints(&proxy, "web").await.len(), 1);
    assert_eq!(proxy.metric(MALFORMED).await, Some(0.0));
}
