//! A TCP relay a test can cut, to take a client off a server (etcd) while
//! the test keeps talking to the server directly, and later let it back.
//!
//! ```ignore
//! let relay = CutRelay::start(etcd.client_port()).await;
//! // point the code under test at relay.endpoint()
//! relay.cut(); // open connections are dropped, new ones refused
//! relay.heal();
//! ```
//!
//! Runs on the caller's tokio runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Relays loopback connections to one port until cut.
pub struct CutRelay {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CutRelay {
    /// Listens on a free loopback port and relays to `127.0.0.1:target`.
    pub async fn start(target: u16) -> CutRelay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind a loopback port for the relay: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the relay's listener has no address: {e}"))
            .port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, conns) = (cut.clone(), conns.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped at once: refused, in effect
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    let mut conns = conns.lock().unwrap_or_else(|e| e.into_inner());
                    conns.retain(|c| !c.is_finished());
                    conns.push(relay);
                }
            }
        });
        CutRelay {
            port,
            cut,
            conns,
            accept,
        }
    }

    /// `http://127.0.0.1:<relay port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for relay in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            relay.abort();
        }
    }

    /// Relays new connections again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for CutRelay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
