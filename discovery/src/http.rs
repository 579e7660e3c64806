//! A plain HTTP/1.1 client for the tools beside the proxies: a proxy's
//! admin API (the fleet's probes, canary) and `pointsman register`'s HTTP
//! health check. A request has a time limit and its answer a size limit,
//! so a stuck or runaway peer cannot hold a rollout; one [`HttpConn`]
//! carries a few requests in a row on one connection.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{header, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Answers larger than this are refused.
const MAX_BODY: usize = 32 * 1024 * 1024;

/// The answer to a plain HTTP/1.1 GET.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: Bytes,
}

/// GET `http://<addr><path>` on a fresh connection, within `limit`: what
/// `pointsman register`'s HTTP health check and the fleet's probes send.
pub async fn http_get(addr: &str, path: &str, limit: Duration) -> Result<HttpAnswer, String> {
    let ask = async {
        let mut conn = HttpConn::open(addr).await?;
        conn.get(addr, path).await
    };
    timeout(limit, ask)
        .await
        .map_err(|_| format!("no answer from {addr} within {limit:?}"))?
}

/// One HTTP/1.1 connection, for a few GETs in a row.
pub struct HttpConn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl HttpConn {
    /// Connects to `addr` (`host:port`).
    pub async fn open(addr: &str) -> Result<HttpConn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn { sender, driver })
    }

    /// GET `path`, the whole answer.
    pub async fn get(&mut self, addr: &str, path: &str) -> Result<HttpAnswer, String> {
        let req = Request::get(path)
            .header(header::HOST, addr)
            .header(header::USER_AGENT, "pointsman")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("GET {path}: {e}"))?;
        self.sender
            .ready()
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("GET http://{addr}{path}: reading the body: {e}"))?
            .to_bytes();
        Ok(HttpAnswer { status, body })
    }

    /// GET `path`, which must answer 200 with `T` as JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &mut self,
        addr: &str,
        path: &str,
    ) -> Result<T, String> {
        let answer = self.get(addr, path).await?;
        if answer.status != 200 {
            return Err(format!(
                "GET http://{addr}{path}: status {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body).trim()
            ));
        }
        serde_json::from_slice(&answer.body)
            .map_err(|e| format!("GET http://{addr}{path}: not the expected JSON: {e}"))
    }
}
