//! A raw upstream that records every byte each connection sent it and
//! answers with the bytes a test scripts, for the cases a real HTTP server
//! would refuse to produce: a malformed status line, conflicting framing,
//! a body cut short, an answer nobody asked for.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::wait::wait_for;

/// What the recorder does once a request (head and body) is complete.
#[derive(Clone, Debug)]
pub enum Script {
    /// Writes these bytes, then closes the connection.
    AnswerClose(Vec<u8>),
    /// Writes these bytes and waits for the next request.
    Answer(Vec<u8>),
    /// Writes this head, then zeros until a write fails (a body without
    /// end, for a client that stops reading).
    Flood(Vec<u8>),
    /// Closes without answering.
    Close,
    /// Answers nothing and keeps the connection open.
    Hold,
}

/// One connection as the recorder saw it.
#[derive(Default, Debug)]
pub struct Seen {
    /// Every byte received, in order.
    pub bytes: Vec<u8>,
    /// The peer closed it (or a read or write failed).
    pub closed: bool,
}

/// A recording upstream on a loopback port; stopped when dropped.
pub struct Recorder {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>>,
    task: JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the request that starts at `at` ends in `buf`, once it is there:
/// its head, and its body by Content-Length or chunked framing.
fn request_end(buf: &[u8], at: usize) -> Option<usize> {
    let rest = &buf[at..];
    let head = rest.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&rest[..head]).to_ascii_lowercase();
    let length = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(len) = length {
        return (rest.len() >= head + len).then_some(at + head + len);
    }
    if text.contains("transfer-encoding: chunked") {
        let end = rest[head..].windows(5).position(|w| w == b"0\r\n\r\n")?;
        return Some(at + head + end + 5);
    }
    Some(at + head)
}

impl Recorder {
    /// A recorder that answers the `n`th request of every connection
    /// (from 0) with `script(n)`.
    pub async fn start(script: impl Fn(usize) -> Script + Send + Sync + 'static) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let conns: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>> = Arc::default();
        let all = conns.clone();
        let script = Arc::new(script);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = Arc::new(Mutex::new(Seen::default()));
                all.lock().expect("recorder lock").push(seen.clone());
                let script = script.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.into_split();
                    let arrived = Arc::new(Notify::new());
                    // Reads and records everything, whatever the writer does.
                    let reader = {
                        let (seen, arrived) = (seen.clone(), arrived.clone());
                        tokio::spawn(async move {
                            let mut chunk = vec![0u8; 64 * 1024];
                            loop {
                                match r.read(&mut chunk).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        seen.lock().expect("seen").bytes.extend(&chunk[..n]);
                                        arrived.notify_one();
                                    }
                                }
                            }
                            seen.lock().expect("seen").closed = true;
                            arrived.notify_one();
                        })
                    };
                    let mut at = 0;
                    for n in 0.. {
                        let end = loop {
                            let (end, closed) = {
                                let s = seen.lock().expect("seen");
                                (request_end(&s.bytes, at), s.closed)
                            };
                            if let Some(end) = end {
                                break end;
                            }
                            if closed {
                                return;
                            }
                            arrived.notified().await;
                        };
                        at = end;
                        match script(n) {
                            Script::Answer(bytes) => {
                                if w.write_all(&bytes).await.is_err() {
                                    break;
                                }
                            }
                            Script::AnswerClose(bytes) => {
                                let _ = w.write_all(&bytes).await;
                                break;
                            }
                            Script::Flood(head) => {
                                if w.write_all(&head).await.is_ok() {
                                    let zeros = vec![0u8; 64 * 1024];
                                    while w.write_all(&zeros).await.is_ok() {}
                                }
                                seen.lock().expect("seen").closed = true;
                                break;
                            }
                            Script::Close => break,
                            Script::Hold => {
                                let _ = reader.await;
                                return;
                            }
                        }
                    }
                    // Closing both halves: the reader ends with them.
                    drop(w);
                    reader.abort();
                });
            }
        });
        Recorder { addr, conns, task }
    }

    /// The bytes each connection sent so far, in accept order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.conns
            .lock()
            .expect("recorder lock")
            .iter()
            .map(|c| c.lock().expect("seen").bytes.clone())
            .collect()
    }

    /// The connections the peer closed, by accept order.
    pub fn closed(&self) -> Vec<bool> {
        self.conns
            .lock()
            .expect("recorder lock")
            .iter()
            .map(|c| c.lock().expect("seen").closed)
            .collect()
    }

    /// How many request heads arrived, over all connections (a request
    /// line ends in ` HTTP/1.1`).
    pub fn requests(&self) -> usize {
        self.received()
            .iter()
            .map(|b| b.windows(11).filter(|w| w == b" HTTP/1.1\r\n").count())
            .sum()
    }

    /// Waits until the recorder has seen `n` connections and all were closed
    /// by the proxy.
    pub async fn wait_all_closed(&self, n: usize, within: Duration) {
        wait_for(
            within,
            "the proxy closes its upstream connections",
            || async {
                let closed = self.closed();
                closed.len() == n && closed.iter().all(|c| *c)
            },
        )
        .await;
    }
}
