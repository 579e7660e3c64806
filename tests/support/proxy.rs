//! The proxy under test: the real `pointsman` binary started on free
//! loopback ports with a config in a temporary directory, its config
//! rewritten and reloaded, its admin API and stderr read back; and
//! `pointsman <args>` run to completion for the command-line tests.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::plain_client;
use super::host::{accepts, free_addr};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pointsman");

/// How long a process gets to become ready.
pub const START_DEADLINE: Duration = Duration::from_secs(15);
/// How long a config reload gets to be applied (or refused).
pub const RELOAD_DEADLINE: Duration = Duration::from_secs(10);
/// When a config change has had no effect yet, it is written again once.
const REWRITE_AFTER: Duration = Duration::from_secs(2);
/// Start attempts when a picked free port was taken in the meantime.
pub(super) const START_ATTEMPTS: usize = 3;

/// A running `pointsman run` with its config in a temporary directory.
/// Killed when dropped.
pub struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    stderr_path: PathBuf,
    /// The admin listener (passed with `--admin`).
    pub admin: SocketAddr,
    /// Listener name -> address, from the config's `[[listeners]]`.
    pub listeners: BTreeMap<String, SocketAddr>,
    /// Connections the start-up probe opened (and closed at once) to see
    /// that the listeners accept; a TCP listener forwards each of them.
    pub probes: usize,
}

impl Proxy {
    /// Starts the proxy with the config `make` writes. `make` is called
    /// again (to pick new ports with [`free_addr`]) if a port it picked was
    /// taken before the proxy could bind it. Returns once `/readyz` answers
    /// 200 and every listener accepts.
    pub async fn start(make: impl Fn() -> String) -> Proxy {
        Proxy::start_with_args(make, &[]).await
    }

    /// [`Proxy::start`] with extra arguments for `pointsman run`.
    pub async fn start_with_args(make: impl Fn() -> String, extra: &[&str]) -> Proxy {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match Proxy::try_start(&make(), extra).await {
                Ok(p) => return p,
                Err(stderr) if is_bind_race(&stderr) => last = stderr,
                Err(stderr) => panic!("pointsman did not start; its stderr:\n{stderr}"),
            }
        }
        panic!(
            "pointsman could not bind its ports in {START_ATTEMPTS} attempts; last stderr:\n{last}"
        )
    }

    async fn try_start(config: &str, extra: &[&str]) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let config_path = dir.path().join("pointsman.toml");
        std::fs::write(&config_path, config).expect("write the config");
        let stderr_path = dir.path().join("stderr.log");
        // A free admin address, unless the test passes its own `--admin`.
        let own_admin = extra
            .iter()
            .position(|a| *a == "--admin")
            .and_then(|i| extra.get(i + 1))
            .map(|a| a.parse::<SocketAddr>().expect("--admin takes an address"));
        let admin = own_admin.unwrap_or_else(free_addr);
        let admin_arg = admin.to_string();
        let admin_args = ["--admin", admin_arg.as_str()];
        let listeners = listener_addrs(config, extra);
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(if own_admin.is_some() {
                &[][..]
            } else {
                &admin_args[..]
            })
            // Two event loops unless the test asks for something else.
            .args(if extra.contains(&"--threads") {
                &[][..]
            } else {
                &["--threads", "2"][..]
            })
            .args(extra)
            .env("NO_COLOR", "1")
            .env("POINTSMAN_LOG", "info")
            .env_remove("POINTSMAN_CONFIG")
            .env_remove("POINTSMAN_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).expect("create the stderr file"))
            .spawn()
            .expect("spawn pointsman");
        let mut proxy = Proxy {
            child,
            dir,
            config_path,
            stderr_path,
            admin,
            listeners,
            probes: 0,
        };
        let end = Instant::now() + START_DEADLINE;
        let probe = plain_client();
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                return Err(format!("(exited with {status})\n{}", proxy.stderr()));
            }
            let ready = match probe.get(proxy.admin_url("/readyz")).send().await {
                Ok(r) => r.status() == 200,
                Err(_) => false,
            };
            let mut all = ready;
            for addr in proxy.listeners.values() {
                all = all && accepts(*addr).await;
                proxy.probes += usize::from(all);
            }
            if all {
                return Ok(proxy);
            }
            if Instant::now() >= end {
                panic!(
                    "pointsman was not ready within {START_DEADLINE:?} (admin {}, listeners {:?}); its stderr:\n{}",
                    proxy.admin,
                    proxy.listeners,
                    proxy.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The address of a listener named in the config.
    pub fn listener(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no listener {name:?} in {:?}", self.listeners))
    }

    /// The first listener (by name) of the config.
    pub fn addr(&self) -> SocketAddr {
        *self
            .listeners
            .values()
            .next()
            .expect("the config has a listener")
    }

    /// `http://<first listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// What the proxy has written to stderr so far.
    pub fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    /// Writes a new config over the watched file atomically (a rename, as
    /// editors do).
    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.path().join(".pointsman.toml.new");
        std::fs::write(&tmp, text).expect("write the new config");
        std::fs::rename(&tmp, &self.config_path).expect("rename the new config into place");
    }

    /// Writes a new config and waits until the proxy says it applied it.
    pub async fn reload(&self, text: &str) {
        let before = self.stderr().matches("config applied").count();
        self.write_and_wait(
            text,
            "the proxy logs `config applied` for the new config",
            |err| err.matches("config applied").count() > before,
        )
        .await;
    }

    /// Writes a config that must be refused; waits for the refusal and
    /// returns the stderr lines it added.
    pub async fn reload_refused(&self, text: &str) -> String {
        let before = self.stderr();
        let refusals = before.matches("reload refused").count();
        self.write_and_wait(text, "the proxy refuses the new config", |err| {
            err.matches("reload refused").count() > refusals
        })
        .await;
        let err = self.stderr();
        err.get(before.len()..).unwrap_or(&err).to_string()
    }

    /// Writes `text` as the config and waits until `done(stderr)`.
    ///
    /// The file is written a second time if nothing happened after
    /// [`REWRITE_AFTER`]: `/readyz` answers 200 before the config watcher
    /// is installed (see `App::start`), so a change made right after start
    /// can go unseen. The second write is reported on stderr.
    pub async fn write_and_wait(&self, text: &str, what: &str, done: impl Fn(&str) -> bool) {
        self.write_config(text);
        let start = Instant::now();
        let mut rewritten = false;
        loop {
            let err = self.stderr();
            if done(&err) {
                return;
            }
            if !rewritten && start.elapsed() >= REWRITE_AFTER {
                eprintln!(
                    "note: no reaction to the config change after {REWRITE_AFTER:?}; writing it again \
                     (the watcher may have started after /readyz said ready)"
                );
                self.write_config(text);
                rewritten = true;
            }
            if start.elapsed() >= RELOAD_DEADLINE {
                panic!("timed out after {RELOAD_DEADLINE:?} waiting until {what}; stderr:\n{err}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of one series of `/metrics`, e.g.
    /// `pointsman_registry_malformed_total{source="etcd"}`; `None` when the
    /// scrape fails or the series is not there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = plain_client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// `/api/services` as JSON.
    pub async fn services(&self) -> Value {
        let resp = plain_client()
            .get(self.admin_url("/api/services"))
            .send()
            .await
            .expect("GET /api/services");
        assert_eq!(resp.status(), 200, "GET /api/services");
        resp.json().await.expect("/api/services is JSON")
    }

    /// One endpoint's view in `/api/services`.
    pub async fn endpoint(&self, service: &str, id: &str) -> Value {
        let all = self.services().await;
        endpoint_in(&all, service, id)
            .unwrap_or_else(|| panic!("no endpoint {service}/{id} in /api/services: {all:#}"))
    }
}

/// Finds `service`/`id` in an `/api/services` answer.
pub fn endpoint_in(services: &Value, service: &str, id: &str) -> Option<Value> {
    services.as_array()?.iter().find(|s| s["name"] == service)?["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["id"] == id)
        .cloned()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_bind_race(stderr: &str) -> bool {
    stderr.contains("cannot bind") || stderr.contains("Address already in use")
}

/// Listener name -> bind address, read from a config's `[[listeners]]`,
/// with `--listen` in `args` applied as `pointsman run` applies it: it
/// replaces the first HTTP listener's address, or adds one named "web".
fn listener_addrs(config: &str, args: &[&str]) -> BTreeMap<String, SocketAddr> {
    let value: toml::Value = toml::from_str(config)
        .unwrap_or_else(|e| panic!("the test's config is not TOML: {e}\n{config}"));
    let listen: Option<SocketAddr> = args
        .iter()
        .position(|a| *a == "--listen")
        .and_then(|i| args.get(i + 1))
        .map(|a| a.parse().expect("--listen takes an address"));
    let mut out = BTreeMap::new();
    let mut replaced = false;
    for l in value
        .get("listeners")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        let name = l["name"].as_str().expect("listener name").to_string();
        let mut bind: SocketAddr = l["bind"]
            .as_str()
            .expect("listener bind")
            .parse()
            .expect("listener bind is an address");
        let http = l.get("mode").and_then(|m| m.as_str()).unwrap_or("http") == "http";
        if let (Some(addr), true, false) = (listen, http, replaced) {
            bind = addr;
            replaced = true;
        }
        out.insert(name, bind);
    }
    if let (Some(addr), false) = (listen, replaced) {
        out.insert("web".to_string(), addr);
    }
    out
}

/// Runs `pointsman <args>` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("POINTSMAN_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run pointsman");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes ANSI colour sequences (in case the log writer adds them).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
