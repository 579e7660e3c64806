//! A real, throwaway etcd for tests: one member on free loopback ports, its
//! data in a temporary directory, killed when dropped.
//!
//! A test crate takes it as a dev-dependency on `pointsman-testkit`:
//!
//! ```ignore
//! use pointsman_testkit::etcd::EtcdServer;
//! let etcd = EtcdServer::start();
//! let endpoint = etcd.endpoint(); // http://127.0.0.1:<port>
//! ```
//!
//! A missing `etcd` binary fails the test loudly: a registry test that
//! silently skips proves nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const START_DEADLINE: Duration = Duration::from_secs(20);
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// One etcd process and everything needed to start it again identically.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    frozen: bool,
    /// More flags for etcd, kept for restarts.
    extra_args: Vec<String>,
}

impl EtcdServer {
    /// Starts etcd and waits until it reports healthy.
    ///
    /// Panics if `etcd` is not on PATH or does not become healthy in time.
    pub fn start() -> EtcdServer {
        EtcdServer::start_with_args(&[])
    }

    /// [`start`](Self::start) with more flags for etcd, such as
    /// `--max-request-bytes=2097152` for values over etcd's 1.5 MiB default
    /// request limit. They are given again on [`restart`](Self::restart).
    pub fn start_with_args(args: &[&str]) -> EtcdServer {
        let dir = tempfile::Builder::new()
            .prefix("pointsman-etcd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory for etcd: {e}"));
        let (client_port, peer_port) = free_ports();
        let mut server = EtcdServer {
            child: None,
            dir,
            client_port,
            peer_port,
            frozen: false,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
        };
        server.spawn();
        server
    }

    /// `http://127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// etcd's own log, for a failing test to point at.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `etcdctl` pointed at this server (API v3), for tests that prefer the
    /// command line to a client library.
    pub fn etcdctl(&self) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint());
        cmd
    }

    /// Stops etcd gracefully (SIGTERM), killing it if it lingers. Its data
    /// stays for [`restart`](Self::restart).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.frozen {
            // A stopped process cannot act on SIGTERM.
            signal(child.id(), "CONT");
            self.frozen = false;
        }
        signal(child.id(), "TERM");
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops etcd (if running) and starts it again on the same ports with
    /// the same data, as after a crash or an upgrade.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes etcd (SIGSTOP): connections stay open but nothing answers,
    /// like a hung host.
    pub fn freeze(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
            self.frozen = true;
        }
    }

    /// Undoes [`freeze`](Self::freeze) (SIGCONT).
    pub fn thaw(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
            self.frozen = false;
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path().display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path().display()));
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let spawned = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("etcd not found on PATH: install Debian's etcd-server (make test does this)")
            }
            Err(e) => panic!("cannot start etcd: {e}"),
        };
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(exit)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "etcd exited during start-up ({exit}); its log: {}\n{}",
                        self.log_path().display(),
                        tail(&self.log_path())
                    );
                }
            }
            if healthy(addr) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "etcd did not become healthy on {addr} within {START_DEADLINE:?}; its log: {}\n{}",
                    self.log_path().display(),
                    tail(&self.log_path())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL works on a frozen process too
            let _ = child.wait();
        }
    }
}

/// Two distinct free loopback ports. Both listeners are held until both
/// ports are known, so the two cannot be the same.
fn free_ports() -> (u16, u16) {
    let bind = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind a loopback port for etcd: {e}"))
    };
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| {
        l.local_addr()
            .unwrap_or_else(|e| panic!("cannot read a bound port: {e}"))
            .port()
    };
    (port(&a), port(&b))
}

/// etcd's `/health` over plain HTTP/1.0: healthy means it has a leader and
/// serves requests.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill -{sig} {pid}: {e}"));
    assert!(status.success(), "kill -{sig} {pid} failed: {status}");
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
