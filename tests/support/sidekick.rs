//! `pointsman register` sidekicks and the apps they run, for the tests of
//! registration in etcd and in Consul, and the load those tests drain
//! under.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;

use super::registry::CHANGE_DEADLINE;
use super::{client, get_echo, now_ns, plain_client, signal, wait_exit, wait_until, Proxy, BIN};

/// The app the sidekicks run: `pointsman upstream` behind a shell that
/// notes its pids and, on SIGTERM, the time it came (ns since the epoch)
/// before passing it on and exiting 7.
const APP: &str = r#"
dir=$4
echo $$ > "$dir/app.pid"
trap 'date +%s%N > "$dir/term"; kill -TERM "$child" 2>/dev/null; wait "$child"; exit 7' TERM
"$1" upstream --listen "$2" --name "$3" &
child=$!
echo "$child" > "$dir/upstream.pid"
wait "$child"
"#;

/// Is the process `pid` still there?
pub fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running `pointsman register` of an instance of `web`, with its app's
/// files in a temporary directory. Kills the sidekick and its app when
/// dropped.
pub struct Sidekick {
    pub child: Child,
    dir: tempfile::TempDir,
    stderr_path: PathBuf,
    pub id: String,
}

impl Sidekick {
    /// `pointsman register <registry> <url> --service web --id <id>
    /// --address <addr> <extra> -- <APP>` (no app when `with_app` is
    /// false), `registry` being `--etcd` or `--consul`. None of the
    /// environment variables that could name another registry or instance
    /// is passed on.
    pub fn start(
        registry: &str,
        url: &str,
        id: &str,
        addr: SocketAddr,
        extra: &[&str],
        with_app: bool,
    ) -> Sidekick {
        let dir = tempfile::tempdir().expect("a temp dir");
        let stderr_path = dir.path().join("stderr.log");
        let mut cmd = Command::new(BIN);
        cmd.args(["register", registry, url, "--service", "web", "--id", id])
            .arg("--address")
            .arg(addr.to_string())
            .args(extra);
        if with_app {
            cmd.args(["--", "sh", "-c", APP, "app", BIN])
                .arg(addr.to_string())
                .arg(id)
                .arg(dir.path());
        }
        let child = cmd
            .env("NO_COLOR", "1")
            .env("POINTSMAN_LOG", "info")
            .env_remove("POINTSMAN_ETCD")
            .env_remove("POINTSMAN_CONSUL")
            .env_remove("CONSUL_HTTP_TOKEN")
            .env_remove("POINTSMAN_SERVICE")
            .env_remove("POINTSMAN_ADDRESS")
            .env_remove("POINTSMAN_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).expect("create the stderr file"))
            .spawn()
            .expect("spawn pointsman register");
        Sidekick {
            child,
            dir,
            stderr_path,
            id: id.to_string(),
        }
    }

    /// The instance's key in etcd.
    pub fn key(&self) -> String {
        format!("/services/web/{}", self.id)
    }

    /// The id of the instance's check in Consul.
    pub fn check_id(&self) -> String {
        format!("service:{}", self.id)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// A number the app wrote to `file` in its directory.
    fn read_number<T: FromStr>(&self, file: &str) -> Option<T> {
        std::fs::read_to_string(self.dir.path().join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// A pid the app noted: `app.pid` (the shell) or `upstream.pid`.
    pub fn read_pid(&self, file: &str) -> Option<u32> {
        self.read_number(file)
    }

    /// When the app got its SIGTERM, in ns since the epoch.
    pub fn term_ns(&self) -> Option<u128> {
        self.read_number("term")
    }

    /// Panics unless the sidekick logged the steps of a drain before the
    /// app is signalled, in order: the drain state written, every proxy
    /// stopped sending, deregistered, the signal passed on.
    pub fn assert_logged_drain_steps(&self) {
        let log = self.stderr();
        let order = [
            "state drain written",
            "every proxy stopped sending",
            "deregistered",
            "passing the signal to the app",
        ];
        let at: Vec<Option<usize>> = order.iter().map(|m| log.find(m)).collect();
        assert!(
            at.iter().all(Option::is_some) && at.windows(2).all(|w| w[0] < w[1]),
            "the sidekick logs {order:?} in that order:\n{log}"
        );
    }

    /// Waits, at most `deadline`, until the sidekick exits; prints its
    /// stderr.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let status = wait_exit(&mut self.child, deadline, "the sidekick").await;
        eprintln!("--- sidekick {} stderr ---\n{}", self.id, self.stderr());
        status
    }
}

impl Drop for Sidekick {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in ["upstream.pid", "app.pid"] {
            if let Some(pid) = self.read_pid(f) {
                signal(pid, "KILL");
            }
        }
    }
}

/// A `pointsman upstream` at `addr`, killed when dropped: an app that runs
/// beside its sidekick.
pub struct App(Child);

impl App {
    pub fn start(addr: SocketAddr, name: &str) -> App {
        App(Command::new(BIN)
            .args(["upstream", "--listen", &addr.to_string(), "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pointsman upstream"))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends GET `url` on a new connection in a task that returns the status,
/// who answered (its `server` name) and when the answer came (ns since the
/// epoch): a long request to drain an instance with.
pub fn spawn_long_request(url: String) -> JoinHandle<(u16, String, u128)> {
    tokio::spawn(async move {
        let (status, echo) = get_echo(&plain_client(), &url, &[]).await;
        (
            status,
            echo["server"].as_str().unwrap_or("").to_string(),
            now_ns(),
        )
    })
}

/// Load to drain one instance under, and a watch on that instance: keep-
/// alive clients on the proxies in turn (client `i` on proxy `i % n`),
/// every answer counted by who answered, and a monitor polling every
/// proxy's `/api/services` for the instance `watched` of `web`. Runs until
/// [`DrainLoad::finish`], or 45 s.
pub struct DrainLoad {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    served: Arc<Mutex<BTreeMap<String, usize>>>,
    /// The last time (µs since the epoch) a proxy showed a request in
    /// flight to the watched instance.
    last_busy: Arc<AtomicU64>,
    saw_drain: Arc<AtomicBool>,
    load: Vec<JoinHandle<()>>,
    monitor: JoinHandle<()>,
}

/// What a [`DrainLoad`] saw.
pub struct Drained {
    /// The requests that failed, in full.
    pub failures: Vec<String>,
    /// 200 answers by the upstream's `server` name.
    pub served: BTreeMap<String, usize>,
    /// The last time (ns since the epoch) a proxy showed a request in
    /// flight to the watched instance, 0 if none ever did.
    pub last_busy_ns: u128,
    /// Whether a proxy showed the watched instance draining.
    pub saw_drain: bool,
}

impl DrainLoad {
    pub fn start(proxies: &[&Proxy], clients: usize, watched: &str) -> DrainLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let served: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let mut load = Vec::new();
        for i in 0..clients {
            let url = proxies[i % proxies.len()].url("/");
            let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
            load.push(tokio::spawn(async move {
                let client = client();
                let end = Instant::now() + Duration::from_secs(45);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            let echo: Value = r.json().await.unwrap_or(Value::Null);
                            let server = echo["server"].as_str().unwrap_or("?").to_string();
                            *served.lock().unwrap().entry(server).or_insert(0) += 1;
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{url}: status {}", r.status())),
                        Err(e) => failures.lock().unwrap().push(format!("{url}: {e}")),
                    }
                }
            }));
        }
        let last_busy = Arc::new(AtomicU64::new(0));
        let saw_drain = Arc::new(AtomicBool::new(false));
        let monitor = {
            let (stop, last_busy, saw_drain) = (stop.clone(), last_busy.clone(), saw_drain.clone());
            let admins: Vec<String> = proxies
                .iter()
                .map(|p| p.admin_url("/api/services"))
                .collect();
            let watched = watched.to_string();
            tokio::spawn(async move {
                let client = plain_client();
                let end = Instant::now() + Duration::from_secs(45);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    for url in &admins {
                        let before = now_ns();
                        let Ok(r) = client.get(url).send().await else {
                            continue;
                        };
                        let all: Value = r.json().await.unwrap_or(Value::Null);
                        let seen: Vec<Value> = all
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|s| s["name"] == "web")
                            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                            .filter(|e| e["id"] == watched.as_str())
                            .collect();
                        if seen
                            .iter()
                            .any(|e| e["in_flight"].as_u64().unwrap_or(0) > 0)
                        {
                            // Seen busy at some time at or after `before`.
                            last_busy.fetch_max((before / 1000) as u64, Ordering::Relaxed);
                        }
                        if seen.iter().any(|e| e["state"] == "drain") {
                            saw_drain.store(true, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        DrainLoad {
            stop,
            failures,
            served,
            last_busy,
            saw_drain,
            load,
            monitor,
        }
    }

    /// 200 answers so far by the upstream's `server` name.
    pub fn served(&self) -> BTreeMap<String, usize> {
        self.served.lock().unwrap().clone()
    }

    /// Waits until each of the instances `ids` has answered 20 requests.
    pub async fn wait_reaches(&self, ids: &[&str]) {
        wait_until(
            CHANGE_DEADLINE,
            &format!("the load reaches {ids:?}"),
            || {
                let s = self.served();
                ids.iter().all(|id| s.get(*id).copied().unwrap_or(0) >= 20)
            },
        )
        .await;
    }

    /// Stops the clients and the monitor and returns what they saw.
    pub async fn finish(self) -> Drained {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.load {
            t.await.expect("a load task");
        }
        self.monitor.await.expect("the monitor");
        let failures = self.failures.lock().unwrap().clone();
        let served = self.served.lock().unwrap().clone();
        Drained {
            failures,
            served,
            last_busy_ns: u128::from(self.last_busy.load(Ordering::Relaxed)) * 1000,
            saw_drain: self.saw_drain.load(Ordering::Relaxed),
        }
    }
}

impl Drained {
    /// Panics unless no request failed and at least 200 were answered.
    pub fn assert_no_failures(&self) {
        let (failures, served) = (&self.failures, &self.served);
        assert!(
            failures.is_empty(),
            "{} of {} requests failed; first: {:?}",
            failures.len(),
            failures.len() + served.values().sum::<usize>(),
            &failures[..failures.len().min(5)]
        );
        assert!(
            served.values().sum::<usize>() >= 200,
            "too little load: {served:?}"
        );
    }

    /// Panics unless the app got its SIGTERM (at `term_ns`) after the long
    /// request was answered (at `long_done_ns`) and after the last time a
    /// proxy showed a request in flight to it (which the monitor saw).
    pub fn assert_signalled_after(&self, term_ns: u128, long_done_ns: u128) {
        assert!(
            self.last_busy_ns > 0,
            "the monitor saw the long request in flight"
        );
        assert!(
            term_ns > long_done_ns,
            "the app got SIGTERM {} ms before the long request finished",
            (long_done_ns - term_ns) / 1_000_000
        );
        assert!(
            term_ns > self.last_busy_ns,
            "the app got SIGTERM while a proxy still showed a request in flight to it"
        );
    }
}
