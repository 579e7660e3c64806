//! A small HTTP/1.1 client for Consul's HTTP API: GET with the
//! `X-Consul-Index` of the answer, PUT with a JSON body, the ACL token on
//! every request, a time limit on every request and a size limit on every
//! answer.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Listings of a large catalog can be big; an answer larger than this is
/// refused rather than buffered.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// How much of an error body is quoted in an error message.
const MAX_ERROR_QUOTE: usize = 300;

/// Why one request to Consul failed. Every variant is retried by the
/// watcher; the registrar returns them to its caller.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{method} {url}: {reason}")]
    Request {
        method: Method,
        url: String,
        reason: String,
    },
    #[error("{method} {url}: no answer within {limit:?}")]
    Timeout {
        method: Method,
        url: String,
        limit: Duration,
    },
    #[error("{method} {url}: Consul answered {status}: {body}{hint}")]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        body: String,
        hint: &'static str,
    },
    #[error("{method} {url}: reading the answer: {reason}")]
    Body {
        method: Method,
        url: String,
        reason: String,
    },
}

impl HttpError {
    /// The HTTP status Consul answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A successful answer.
#[derive(Debug)]
pub struct Answer {
    pub body: Bytes,
    /// `X-Consul-Index`, when the answer carries one.
    pub index: Option<u64>,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token could not see
    /// everything.
    pub filtered: bool,
}

/// A client for one Consul agent or server (the URL is per request).
#[derive(Clone)]
pub struct ConsulHttp {
    client: Client<HttpConnector, Full<Bytes>>,
    token: Option<HeaderValue>,
}

impl ConsulHttp {
    /// A client that connects within `connect_timeout` and sends `token`
    /// (already checked to be a valid header value) as `X-Consul-Token`.
    pub fn new(connect_timeout: Duration, token: Option<HeaderValue>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        ConsulHttp { client, token }
    }

    /// GET `url`, failing if the whole exchange takes longer than `limit`.
    pub async fn get(&self, url: &str, limit: Duration) -> Result<Answer, HttpError> {
        self.send(Method::GET, url, None, limit).await
    }

    /// PUT `url` with an optional JSON body.
    pub async fn put(
        &self,
        url: &str,
        json: Option<Vec<u8>>,
        limit: Duration,
    ) -> Result<Answer, HttpError> {
        self.send(Method::PUT, url, json, limit).await
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        json: Option<Vec<u8>>,
        limit: Duration,
    ) -> Result<Answer, HttpError> {
        let request_error = |reason: String| HttpError::Request {
            method: method.clone(),
            url: url.to_string(),
            reason,
        };
        let mut builder = Request::builder().method(method.clone()).uri(url);
        if let Some(token) = &self.token {
            builder = builder.header("x-consul-token", token.clone());
        }
        let body = match json {
            Some(bytes) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder
            .body(body)
            .map_err(|e| request_error(e.to_string()))?;

        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| request_error(error_chain(&e)))?;
            let status = response.status();
            let index = response
                .headers()
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let filtered = response
                .headers()
                .get("x-consul-results-filtered-by-acls")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| HttpError::Body {
                    method: method.clone(),
                    url: url.to_string(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            if !status.is_success() {
                return Err(HttpError::Status {
                    method: method.clone(),
                    url: url.to_string(),
                    status,
                    body: quote(&body),
                    hint: hint(status),
                });
            }
            Ok(Answer {
                body,
                index,
                filtered,
            })
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout {
                method,
                url: url.to_string(),
                limit,
            }),
        }
    }
}

/// What to do about a refusal, for the statuses that have one answer.
fn hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::FORBIDDEN => {
            " (the ACL token is missing, unknown or lacks a permission: check the token and its policy)"
        }
        StatusCode::UNAUTHORIZED => " (check the ACL token)",
        _ => "",
    }
}

/// The start of an error body, on one line.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_string();
    }
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_QUOTE)
        .collect();
    if text.chars().count() > MAX_ERROR_QUOTE {
        line.push('…');
    }
    line
}

/// An error and its causes, `: `-separated: hyper-util's own message is
/// only "client error (Connect)".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a
/// path segment or a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A duration as Go's `time.ParseDuration` reads it: `30s`, `1m30s` is
/// written `90s`, sub-second values in milliseconds (`500ms`).
pub fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis().max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_path_segments_and_query_values() {
        assert_eq!(encode("web-1.v2_x~"), "web-1.v2_x~");
        assert_eq!(encode("a b/c?d&e"), "a%20b%2Fc%3Fd%26e");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn durations_are_written_as_go_reads_them() {
        assert_eq!(go_duration(Duration::from_secs(30)), "30s");
        assert_eq!(go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_micros(10)), "1ms");
    }

    #[test]
    fn error_bodies_are_quoted_on_one_line() {
        assert_eq!(quote(b""), "(empty body)");
        assert_eq!(quote(b"ACL not found\n"), "ACL not found");
        assert_eq!(quote(b"a\nb"), "a b");
        assert_eq!(quote("x".repeat(400).as_bytes()).chars().count(), 301);
    }
}
