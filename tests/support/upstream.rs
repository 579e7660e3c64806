//! What the proxy forwards to: real `pointsman upstream` echo processes,
//! and small in-process servers for the behaviours an echo upstream cannot
//! show (a handler of the test's own, WebSocket and TCP echoes, a listener
//! that never answers).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::host::{accepts, free_addr};
use super::proxy::{BIN, START_ATTEMPTS, START_DEADLINE};

/// A running `pointsman upstream`: a real HTTP echo server. Killed when
/// dropped.
pub struct Upstream {
    child: Child,
    pub name: String,
    pub addr: SocketAddr,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Upstream::start_many(&[name]).await.remove(0)
    }

    /// Starts one upstream per name, all at once, and waits for each.
    pub async fn start_many(names: &[&str]) -> Vec<Upstream> {
        let mut out: Vec<Upstream> = names.iter().map(|n| Upstream::spawn(n)).collect();
        for u in &mut out {
            u.wait_ready().await;
        }
        out
    }

    fn spawn(name: &str) -> Upstream {
        let addr = free_addr();
        let child = Command::new(BIN)
            .arg("upstream")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--name")
            .arg(name)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pointsman upstream");
        Upstream {
            child,
            name: name.to_string(),
            addr,
        }
    }

    async fn wait_ready(&mut self) {
        let end = Instant::now() + START_DEADLINE;
        for _ in 0..START_ATTEMPTS {
            loop {
                if let Ok(Some(_)) = self.child.try_wait() {
                    // Most likely the port was taken meanwhile: another one.
                    *self = Upstream::spawn(&self.name);
                    break;
                }
                if accepts(self.addr).await {
                    return;
                }
                assert!(
                    Instant::now() < end,
                    "upstream {} did not listen on {} within {START_DEADLINE:?}",
                    self.name,
                    self.addr
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("upstream {} could not start", self.name);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A task serving on a loopback port; aborted when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// An HTTP/1.1 server on the test's runtime answering with `handler`.
pub async fn http_server<F, Fut>(handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, task }
}

/// A WebSocket server that echoes every text and binary message, and
/// greets each client with `hello from <name>` first.
pub async fn ws_echo_server(name: &str) -> Server {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let greeting = format!("hello from {name}");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let greeting = greeting.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                if ws.send(Message::text(greeting)).await.is_err() {
                    return;
                }
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(_) | Message::Binary(_) => msg,
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Server { addr, task }
}

/// A TCP server that echoes bytes as they arrive and, once the client has
/// shut down its write side, sends `<name> saw EOF after <n> bytes` and
/// closes.
pub async fn tcp_echo_server(name: &str) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let name = name.to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let mut total = 0usize;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            total += n;
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let bye = format!("{name} saw EOF after {total} bytes");
                let _ = stream.write_all(bye.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Server { addr, task }
}

/// A TCP listener that accepts and never answers (for timeouts).
pub async fn silent_server() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    Server { addr, task }
}
