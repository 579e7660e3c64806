//! A plain HTTP/1.1 client for the tools beside the proxies: a proxy's
//! admin API (the fleet's probes and drain notices, canary, `pointsman
//! ctl`) and `pointsman register`'s HTTP health check. A request has a
//! time limit and its answer a size limit, so a stuck or runaway peer
//! cannot hold a rollout; one [`HttpConn`] carries a few requests in a row
//! on one connection.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Request};

pub use hyper::Method;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Answers larger than this are refused.
const MAX_BODY: usize = 32 * 1024 * 1024;

/// The answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl HttpAnswer {
    /// The body as text, trimmed, for an error message.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {limit:?}")]
    Timeout { addr: String, limit: Duration },
    #[error("{request}: {reason}")]
    Exchange { request: String, reason: String },
    #[error("{request}: status {status}: {body}")]
    Status {
        request: String,
        status: u16,
        body: String,
    },
    #[error("{request}: not the expected JSON: {reason}")]
    Json { request: String, reason: String },
}

impl HttpError {
    /// Nothing listens at the address: the connection was refused (not
    /// timed out, not unreachable).
    pub fn refused(&self) -> bool {
        matches!(self, HttpError::Connect { source, .. }
            if source.kind() == std::io::ErrorKind::ConnectionRefused)
    }
}

/// GET `http://<addr><path>` on a fresh connection, within `limit`: what
/// `pointsman register`'s HTTP health check sends.
pub async fn http_get(addr: &str, path: &str, limit: Duration) -> Result<HttpAnswer, HttpError> {
    within(addr, limit, async {
        let mut conn = HttpConn::open(addr).await?;
        conn.get(path).await
    })
    .await
}

/// `fut`, or [`HttpError::Timeout`] after `limit`.
pub async fn within<T>(
    addr: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    timeout(limit, fut).await.map_err(|_| HttpError::Timeout {
        addr: addr.to_string(),
        limit,
    })?
}

/// One HTTP/1.1 connection, for a few requests in a row.
pub struct HttpConn {
    addr: String,
    /// Sent as `Authorization: Bearer <token>` on every request.
    token: Option<String>,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl HttpConn {
    /// Connects to `addr` (`host:port`).
    pub async fn open(addr: &str) -> Result<HttpConn, HttpError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| HttpError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| HttpError::Exchange {
                request: format!("http://{addr}"),
                reason: e.to_string(),
            })?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConn {
            addr: addr.to_string(),
            token: None,
            sender,
            driver,
        })
    }

    /// Sends `token` as a bearer token with every request from now on.
    pub fn with_token(mut self, token: Option<&str>) -> HttpConn {
        self.token = token.map(str::to_string);
        self
    }

    /// GET `path`, the whole answer.
    pub async fn get(&mut self, path: &str) -> Result<HttpAnswer, HttpError> {
        self.send(Method::GET, path, None).await
    }

    /// `method` on `path`, with `body` when given; any method but GET and
    /// HEAD is sent as JSON. The whole answer, whatever its status.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<HttpAnswer, HttpError> {
        let request = format!("{method} http://{}{path}", self.addr);
        let failed = |reason: String| HttpError::Exchange {
            request: request.clone(),
            reason,
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, self.addr.as_str())
            .header(header::USER_AGENT, "pointsman");
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        // Changes are JSON (and said so even without a body: the admin
        // API refuses a change of any other type).
        if body.is_some() || !matches!(method, Method::GET | Method::HEAD) {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| failed(e.to_string()))?;
        self.sender
            .ready()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| failed(format!("reading the body: {e}")))?
            .to_bytes();
        Ok(HttpAnswer {
            status,
            headers,
            body,
        })
    }

    /// `method` on `path` with `body` as JSON, which must answer 2xx.
    pub async fn send_ok(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<HttpAnswer, HttpError> {
        let request = format!("{method} http://{}{path}", self.addr);
        let answer = self.send(method, path, body).await?;
        if !(200..300).contains(&answer.status) {
            return Err(HttpError::Status {
                request,
                status: answer.status,
                body: answer.text(),
            });
        }
        Ok(answer)
    }

    /// GET `path`, which must answer 200 with `T` as JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
    ) -> Result<T, HttpError> {
        let answer = self.send_ok(Method::GET, path, None).await?;
        serde_json::from_slice(&answer.body).map_err(|e| HttpError::Json {
            request: format!("GET http://{}{path}", self.addr),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_told_apart_from_a_silent_one() {
        // Bound, then closed: nothing listens there now.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .to_string();
        let err = http_get(&addr, "/", Duration::from_secs(2))
            .await
            .expect_err("nothing listens");
        assert!(err.refused(), "{err}");

        // Listening but never answering: a timeout, not a refusal.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr").to_string();
        let err = http_get(&addr, "/", Duration::from_millis(300))
            .await
            .expect_err("no answer");
        assert!(!err.refused(), "{err}");
        assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
    }
}
