//! The clients the tests send requests with: reqwest (kept alive, one
//! connection per request, or from a chosen source address), a few
//! judgements on the echo upstream's answers, and HTTP/2 with prior
//! knowledge (h2c) through hyper's client.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpStream;

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .connect_timeout(Duration::from_secs(5))
}

/// A client that keeps connections alive and reuses them.
pub fn client() -> reqwest::Client {
    builder().build().expect("build a reqwest client")
}

/// A client that opens a new connection for every request.
pub fn plain_client() -> reqwest::Client {
    builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("build a reqwest client")
}

/// A keep-alive client whose connections come from `ip` (any 127.0.0.0/8
/// address works on Linux loopback).
pub fn client_from(ip: IpAddr) -> reqwest::Client {
    builder()
        .local_address(ip)
        .build()
        .expect("build a reqwest client")
}

/// GET `url` with `headers`; the status and the upstream's JSON echo (or
/// `Value::Null` when the body is not JSON).
pub async fn get_echo(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// GET `url` and return which upstream answered (its `server` name);
/// panics unless the answer is a 200 echo.
pub async fn server_of(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> String {
    let (status, echo) = get_echo(client, url, headers).await;
    assert_eq!(status, 200, "GET {url} {headers:?}: {echo}");
    echo["server"]
        .as_str()
        .unwrap_or_else(|| panic!("GET {url}: no server in {echo}"))
        .to_string()
}

/// Counts answers by upstream name over `n` GETs.
pub async fn tally(client: &reqwest::Client, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts.entry(server_of(client, url, &[]).await).or_insert(0) += 1;
    }
    counts
}

/// Sends GET `path` over h2c to `addr`; the response's version, status and
/// body.
pub async fn h2c_get(addr: SocketAddr, path: &str) -> (hyper::Version, u16, Bytes) {
    let stream = TcpStream::connect(addr).await.expect("connect for h2c");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake with the proxy");
    let driver = tokio::spawn(conn);
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("build an h2 request");
    let resp = sender.send_request(req).await.expect("h2c request");
    let version = resp.version();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("h2c body")
        .to_bytes();
    driver.abort();
    (version, status, body)
}
