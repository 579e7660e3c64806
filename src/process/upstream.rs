//! A small HTTP server to put behind pointsman: the demo's upstreams, the
//! compose stack's app instances, and a real server for tests. It answers
//! every request with a JSON description of what it received, plus a few
//! paths that make it slow, big, or failing on purpose:
//!
//! - `/slow?ms=N`: answers after N milliseconds.
//! - `/bytes?n=N`: streams N bytes.
//! - `/upload`: reads the whole body, answers with its length.
//! - `/status/NNN`: answers with that status.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the server says about a request.
#[derive(Serialize)]
struct Echo<'a> {
    server: &'a str,
    method: &'a str,
    path: &'a str,
    /// The request target as sent: origin form (`/a?b`) or absolute form.
    target: String,
    headers: BTreeMap<String, String>,
}

/// Serves on `listener` until `stop`; `name` identifies the instance.
pub async fn serve(listener: TcpListener, name: Arc<str>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(answer(&name, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type UpBody = http_body_util::Either<http_body_util::Full<Bytes>, Zeros>;

async fn answer(name: &str, req: Request<Incoming>) -> Response<UpBody> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let param = |key: &str| -> Option<u64> {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
    };
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(param("ms").unwrap_or(1000))).await;
    }
    if path == "/bytes" {
        let n = param("n").unwrap_or(0);
        let mut r = Response::new(UpBody::Right(Zeros { left: n }));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/octet-stream"),
        );
        return r;
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut total: u64 = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => total += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                Err(_) => break,
            }
        }
        return text(
            StatusCode::OK,
            format!("{{\"server\":\"{name}\",\"received\":{total}}}\n"),
        );
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let echo = Echo {
        server: name,
        method: req.method().as_str(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/"),
        target: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .fold(BTreeMap::new(), |mut m, (k, v)| {
                m.entry(k)
                    .and_modify(|old: &mut String| {
                        old.push_str(", ");
                        old.push_str(&v);
                    })
                    .or_insert(v);
                m
            }),
    };
    let body = serde_json::to_string(&echo).unwrap_or_default() + "\n";
    text(status, body)
}

fn text(status: StatusCode, body: String) -> Response<UpBody> {
    let mut r = Response::new(UpBody::Left(http_body_util::Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A body of `left` zero bytes, produced 64 KiB at a time.
pub struct Zeros {
    left: u64,
}

const CHUNK: Bytes = Bytes::from_static(&[0u8; 64 * 1024]);

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let n = this.left.min(CHUNK.len() as u64) as usize;
        this.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(CHUNK.slice(..n)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// Starts one upstream per `(name, address)` on the current runtime.
pub async fn start_all(
    instances: &[(String, SocketAddr)],
    stop: CancellationToken,
) -> Result<(), String> {
    for (name, addr) in instances {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("demo upstream {name}: cannot bind {addr}: {e}"))?;
        tokio::spawn(serve(listener, name.as_str().into(), stop.clone()));
    }
    Ok(())
}
