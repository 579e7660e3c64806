//! A TCP relay the tests put between a proxy and etcd, and cut: the
//! proxy's only route to etcd goes through it, so cutting it isolates that
//! proxy alone while its clients still reach it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A relay from a free loopback port to `target`.
pub struct Relay {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let pipes: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let held = pipes.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let pipe = tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                if let Ok(mut p) = held.lock() {
                    p.push(pipe);
                }
            }
        });
        Relay {
            addr,
            accept,
            pipes,
        }
    }

    /// `http://<relay>`, an etcd endpoint for the proxy behind it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops relaying: every connection through it is dropped and its port
    /// refuses new ones.
    pub fn cut(&self) {
        self.accept.abort();
        if let Ok(mut p) = self.pipes.lock() {
            for pipe in p.drain(..) {
                pipe.abort();
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}
