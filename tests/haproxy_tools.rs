//! End to end: the tools HAProxy operators already run, against the
//! runtime API's Unix socket and the admin listener's `/stats;csv`, as
//! they are packaged (`make deps-test` installs them): hatop driven in
//! tmux, haproxyadmin and haproxytool from PyPI, and
//! prometheus-haproxy-exporter over the socket and over HTTP. Then the
//! commands scripts send, with their formats compared to a real HAProxy
//! 2.6's answers; stable server ids; and the stats page's admin form.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use support::*;

/// How long one tool call may take.
const STEP: Duration = Duration::from_secs(15);
const TOKEN: &str = "tools-test-token";

/// Fails with what to install when `program` is not on this machine.
fn need(program: &str, how: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{program}` is not installed: run `make deps-test` (it installs {how})"
    );
}

/// Fails with what to install when python3 lacks the PyPI clients.
fn need_python_clients() {
    need("python3", "python3");
    let ok = std::process::Command::new("python3")
        .args(["-c", "import haproxyadmin, haproxytool"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 cannot import haproxyadmin and haproxytool: run `make deps-test` \
         (it runs `python3 -m pip install haproxyadmin==0.2.4 haproxytool==0.5.7`)"
    );
}

/// Runs `program args` with `input` on stdin; (success, stdout + stderr).
async fn run(program: &str, args: &[&str], input: &str) -> (bool, String) {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(input.as_bytes())
        .await
        .expect("write stdin");
    drop(stdin);
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {STEP:?}"))
        .expect("wait");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// `echo "<line>" | socat stdio unix-connect:<sock>`.
async fn cli(sock: &Path, line: &str) -> String {
    let target = format!("unix-connect:{}", sock.display());
    let (ok, out) = run("socat", &["stdio", &target], &format!("{line}\n")).await;
    assert!(ok, "socat {target}: {out}");
    out
}

/// A proxy with the services blue (blue1, blue2, actively checked) and
/// green (green1), its runtime socket and the admin token.
struct Rig {
    proxy: Proxy,
    sock: PathBuf,
    _sockets: tempfile::TempDir,
    _ups: Vec<Upstream>,
}

fn config(listen: std::net::SocketAddr, ups: &[Upstream], blue: &[&str]) -> String {
    let line = |name: &str| {
        let u = ups.iter().find(|u| u.name == name).expect("an upstream");
        endpoint_line(u, "")
    };
    let blue: Vec<String> = blue.iter().map(|n| line(n)).collect();
    format!(
        r#"[[listeners]]
name = "web"
bind = "{listen}"

[services.blue]
check = {{ interval = "100ms", timeout = "500ms" }}
endpoints = [{}]

[services.green]
endpoints = [{}]

[routes.app]
path_prefix = "/"
map = "hosts"
map_key = "STATIC"

[maps.hosts]
STATIC = "blue"
OTHER = "green"
"#,
        blue.join(", "),
        line("green1"),
    )
}

impl Rig {
    async fn start() -> Rig {
        Rig::start_with(&["blue1", "blue2"]).await
    }

    async fn start_with(blue: &[&str]) -> Rig {
        let ups = Upstream::start_many(&["blue1", "blue2", "blue3", "green1"]).await;
        let sockets = tempfile::tempdir().expect("temp dir");
        let sock = sockets.path().join("runtime.sock");
        let sock_arg = sock.to_str().expect("UTF-8 path").to_string();
        let blue: Vec<String> = blue.iter().map(|s| s.to_string()).collect();
        let proxy = Proxy::start_with_args(
            || {
                let names: Vec<&str> = blue.iter().map(String::as_str).collect();
                config(free_addr(), &ups, &names)
            },
            &["--admin-token", TOKEN, "--runtime-socket", &sock_arg],
        )
        .await;
        let rig = Rig {
            proxy,
            sock,
            _sockets: sockets,
            _ups: ups,
        };
        let sock = rig.sock.clone();
        wait_for(Duration::from_secs(10), "blue's servers are UP", || {
            let sock = sock.clone();
            async move {
                let csv = cli(&sock, "show stat blue 4 -1").await;
                let up = csv.lines().filter(|l| l.contains(",UP,")).count();
                up == csv.lines().filter(|l| l.starts_with("blue,")).count() && up > 0
            }
        })
        .await;
        rig
    }

    /// Sends `n` requests; how many each server answered.
    async fn traffic(&self, n: usize) -> std::collections::BTreeMap<String, usize> {
        tally(&client(), &self.proxy.url("/"), n).await
    }

    async fn cli(&self, line: &str) -> String {
        cli(&self.sock, line).await
    }

    fn sock_str(&self) -> &str {
        self.sock.to_str().expect("UTF-8 path")
    }
}

/// Field `name` of the `show stat` row `pxname,svname`.
fn stat(csv: &str, pxname: &str, svname: &str, name: &str) -> String {
    let header: Vec<&str> = csv
        .lines()
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .unwrap_or_else(|| panic!("no header in:\n{csv}"))
        .split(',')
        .collect();
    let i = header
        .iter()
        .position(|h| *h == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    csv.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.len() > i && f[0] == pxname && f[1] == svname)
        .unwrap_or_else(|| panic!("no row {pxname},{svname} in:\n{csv}"))[i]
        .to_string()
}

// ---------------------------------------------------------------------------
// hatop

/// A tmux session running one program, killed when dropped.
struct Tmux(String);

impl Tmux {
    async fn start(name: &str, command: &str) -> Tmux {
        // hatop draws for the terminal tmux gives it; tmux itself needs
        // to know one even when detached.
        let (ok, out) = run(
            "env",
            &[
                "TERM=xterm",
                "tmux",
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "200",
                "-y",
                "50",
                command,
            ],
            "",
        )
        .await;
        assert!(ok, "tmux new-session: {out}");
        Tmux(name.to_string())
    }

    async fn screen(&self) -> String {
        let (ok, out) = run("tmux", &["capture-pane", "-p", "-t", &self.0], "").await;
        assert!(ok, "tmux capture-pane: {out}");
        out
    }

    async fn keys(&self, keys: &[&str]) {
        for k in keys {
            let (ok, out) = run("tmux", &["send-keys", "-t", &self.0, k], "").await;
            assert!(ok, "tmux send-keys {k}: {out}");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Waits until the screen shows what `ok` wants; the screen.
    async fn wait(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(8);
        loop {
            let screen = self.screen().await;
            if ok(&screen) {
                return screen;
            }
            assert!(Instant::now() < end, "hatop never showed {what}:\n{screen}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// The status hatop shows on the line of `server`.
fn hatop_status<'a>(screen: &'a str, server: &str) -> Option<&'a str> {
    screen
        .lines()
        .find(|l| l.split_whitespace().next() == Some(server))?
        .split_whitespace()
        .nth(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hatop_shows_every_server_and_f10_f9_take_one_out_and_back() {
    need("hatop", "the hatop package");
    need("tmux", "the tmux package");
    let rig = Rig::start().await;
    rig.traffic(4).await;
    let name = format!("hatop-{}", std::process::id());
    let hatop = Tmux::start(&name, &format!("hatop -s {}", rig.sock_str())).await;
    let screen = hatop
        .wait("the status view with blue's servers", |s| {
            hatop_status(s, "blue1") == Some("UP") && hatop_status(s, "blue2") == Some("UP")
        })
        .await;
    for want in [
        "HAProxy Version: pointsman-",
        ">>> web",
        ">>> blue",
        ">>> green",
        "FRONTEND",
        "BACKEND",
        "green1",
        "Tasks:",
    ] {
        assert!(screen.contains(want), "no {want:?} on:\n{screen}");
    }
    assert!(!screen.contains("runtime error"), "{screen}");

    // The cursor starts on `>>> web`: FRONTEND, blank, `>>> blue`, blue1.
    hatop.keys(&["Down", "Down", "Down", "Down", "F10"]).await;
    let screen = hatop
        .wait("blue1 in MAINT after F10", |s| {
            hatop_status(s, "blue1") == Some("MAINT")
        })
        .await;
    assert_eq!(hatop_status(&screen, "blue2"), Some("UP"), "{screen}");
    assert_eq!(
        stat(&rig.cli("show stat").await, "blue", "blue1", "status"),
        "MAINT"
    );
    let seen = rig.traffic(6).await;
    assert_eq!(
        seen.get("blue2"),
        Some(&6),
        "no traffic reaches blue1: {seen:?}"
    );

    hatop.keys(&["F9"]).await;
    hatop
        .wait("blue1 UP again after F9", |s| {
            hatop_status(s, "blue1") == Some("UP")
        })
        .await;
    let seen = rig.traffic(6).await;
    assert!(seen.get("blue1").is_some_and(|n| *n > 0), "{seen:?}");
}

// ---------------------------------------------------------------------------
// haproxyadmin and haproxytool

/// Drives haproxyadmin's API; prints `key=value` lines the test reads.
const HAPROXYADMIN_SCRIPT: &str = r#"
import sys
from haproxyadmin import haproxy, STATE_DISABLE, STATE_ENABLE
hap = haproxy.HAProxy(socket_file=sys.argv[1])
print("backends=" + ",".join(sorted(b.name for b in hap.backends())))
for s in sorted(hap.servers(), key=lambda s: s.name):
    print("server.%s=%s,%s,%s" % (s.name, s.status, s.weight, s.requests))
print("totalrequests=%s" % hap.totalrequests)
print("releasedate=%s" % hap.releasedate)
print("version=%s" % hap.version)
s = hap.server("blue1", backend="blue")[0]
print("disable=%s,%s" % (s.setstate(STATE_DISABLE), s.status))
print("enable=%s,%s" % (s.setstate(STATE_ENABLE), s.status))
print("setweight=%s,%s" % (s.setweight(7), s.weight))
print("set_map=%s" % hap.set_map("hosts", "STATIC", "green"))
print("get_map=%s" % hap.get_map("hosts", "STATIC"))
print("get_map_missing=%s" % hap.get_map("hosts", "NOPE"))
"#;

fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxyadmin_and_haproxytool_read_and_change_servers() {
    need_python_clients();
    let rig = Rig::start().await;
    let seen = rig.traffic(10).await;
    let (ok, out) = run("python3", &["-c", HAPROXYADMIN_SCRIPT, rig.sock_str()], "").await;
    assert!(ok, "the haproxyadmin script failed:\n{out}");
    assert_eq!(value(&out, "backends"), "blue,green");
    for name in ["blue1", "blue2"] {
        let n = seen.get(name).copied().unwrap_or(0);
        assert_eq!(
            value(&out, &format!("server.{name}")),
            format!("UP,1,{n}"),
            "status, weight and the requests it got: {seen:?}\n{out}"
        );
    }
    assert_eq!(value(&out, "server.green1"), "no check,1,0");
    assert_eq!(value(&out, "totalrequests"), "10", "CumReq");
    assert_eq!(value(&out, "releasedate").len(), "2026/01/01".len());
    assert!(value(&out, "version").starts_with("pointsman-"), "{out}");
    assert_eq!(value(&out, "disable"), "True,MAINT");
    assert_eq!(value(&out, "enable"), "True,UP");
    assert_eq!(value(&out, "setweight"), "True,7");
    assert_eq!(value(&out, "set_map"), "True");
    assert!(
        value(&out, "get_map").contains("found=yes")
            && value(&out, "get_map").contains("value=\"green\""),
        "{out}"
    );
    assert_eq!(
        value(&out, "get_map_missing"),
        "type=str, case=sensitive, found=no"
    );
    assert_eq!(
        rig.traffic(3).await.get("green1"),
        Some(&3),
        "the map change routes"
    );

    let tool = |args: Vec<String>| async move {
        let mut all = vec![
            "-c".to_string(),
            "import sys; from haproxytool.cli import main; sys.argv[0] = 'haproxytool'; sys.exit(main())".into(),
        ];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let (ok, out) = run("python3", &refs, "").await;
        assert!(ok, "haproxytool {:?}: {out}", &all[2..]);
        out
    };
    let sock = rig.sock_str().to_string();
    let args = |a: &[&str]| {
        let mut v = vec!["server".to_string(), "-F".into(), sock.clone()];
        v.extend(a.iter().map(|s| s.to_string()));
        v
    };
    let list = tool(args(&["-l"])).await;
    for server in ["blue1", "blue2", "green1"] {
        assert!(list.contains(server), "server -l: {list}");
    }
    let out = tool(args(&["-d", "blue2"])).await;
    assert!(out.contains("blue2 disabled in blue backend"), "{out}");
    assert_eq!(
        stat(&rig.cli("show stat").await, "blue", "blue2", "status"),
        "MAINT"
    );
    let out = tool(args(&["-s", "blue2"])).await;
    assert!(out.contains("MAINT"), "server -s: {out}");
    let out = tool(args(&["-e", "blue2"])).await;
    assert!(out.contains("blue2 enabled in blue backend"), "{out}");
    assert_eq!(
        stat(&rig.cli("show stat").await, "blue", "blue2", "status"),
        "UP"
    );
}

// ---------------------------------------------------------------------------
// prometheus-haproxy-exporter

/// A running exporter, killed when dropped.
struct Exporter {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
}

impl Exporter {
    async fn start(scrape_uri: &str) -> Exporter {
        let addr = free_addr();
        let child = tokio::process::Command::new("prometheus-haproxy-exporter")
            .arg(format!("--haproxy.scrape-uri={scrape_uri}"))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn prometheus-haproxy-exporter");
        let e = Exporter { child, addr };
        wait_for(STEP, "the exporter listens", || async {
            accepts(addr).await
        })
        .await;
        e
    }

    async fn metrics(&self) -> String {
        plain_client()
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .expect("scrape the exporter")
            .text()
            .await
            .expect("the exporter's text")
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_haproxy_exporter_reads_the_socket_and_stats_csv() {
    need(
        "prometheus-haproxy-exporter",
        "the prometheus-haproxy-exporter package",
    );
    let rig = Rig::start().await;
    let seen = rig.traffic(8).await;
    let over_http = Exporter::start(&rig.proxy.admin_url("/stats;csv")).await;
    let over_socket = Exporter::start(&format!("unix:{}", rig.sock_str())).await;
    for (how, e) in [("http", &over_http), ("socket", &over_socket)] {
        let m = e.metrics().await;
        assert_eq!(sample(&m, "haproxy_up"), Some(1.0), "{how}:\n{m}");
        for server in ["blue1", "blue2"] {
            let n = seen.get(server).copied().unwrap_or(0) as f64;
            let ok = format!(
                "haproxy_server_http_responses_total{{backend=\"blue\",code=\"2xx\",server=\"{server}\"}}"
            );
            assert_eq!(sample(&m, &ok), Some(n), "{how}: {ok}\n{m}");
            let up = format!("haproxy_server_up{{backend=\"blue\",server=\"{server}\"}}");
            assert_eq!(sample(&m, &up), Some(1.0), "{how}: {up}");
            let weight = format!("haproxy_server_weight{{backend=\"blue\",server=\"{server}\"}}");
            assert_eq!(sample(&m, &weight), Some(1.0), "{how}: {weight}");
        }
        assert_eq!(
            sample(&m, "haproxy_backend_up{backend=\"blue\"}"),
            Some(1.0),
            "{how}"
        );
        // The listener's requests and the bytes each server sent back,
        // as `show stat` counts them.
        assert_eq!(
            sample(&m, "haproxy_frontend_http_requests_total{frontend=\"web\"}"),
            Some(8.0),
            "{how}:\n{m}"
        );
        let csv = rig.cli("show stat").await;
        for server in ["blue1", "blue2"] {
            let bout: f64 = stat(&csv, "blue", server, "bout")
                .parse()
                .expect("bout is a number");
            assert!(
                bout > 0.0 || !seen.contains_key(server),
                "{server} answered: {csv}"
            );
            let series =
                format!("haproxy_server_bytes_out_total{{backend=\"blue\",server=\"{server}\"}}");
            assert_eq!(sample(&m, &series), Some(bout), "{how}: {series}\n{m}");
        }
        let fe_out: f64 = stat(&csv, "web", "FRONTEND", "bout").parse().expect("bout");
        assert_eq!(
            sample(&m, "haproxy_frontend_bytes_out_total{frontend=\"web\"}"),
            Some(fe_out),
            "{how}:\n{m}"
        );
    }
    rig.cli("disable server blue/blue1").await;
    let m = over_http.metrics().await;
    assert_eq!(
        sample(&m, "haproxy_server_up{backend=\"blue\",server=\"blue1\"}"),
        Some(0.0),
        "MAINT is down for the exporter:\n{m}"
    );
}

// ---------------------------------------------------------------------------
// The commands, next to HAProxy 2.6

/// A real HAProxy with one frontend, the backend blue (blue1 checked,
/// blue2 not) and a map file; its stats socket. Stopped when dropped.
struct Haproxy {
    child: std::process::Child,
    sock: PathBuf,
    map: PathBuf,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    async fn start(blue1: std::net::SocketAddr) -> Haproxy {
        need("haproxy", "the haproxy package");
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("haproxy.sock");
        let map = dir.path().join("hosts.map");
        std::fs::write(&map, "STATIC blue\n").expect("write the map");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  stats socket {} mode 600 level admin\n\
                 defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\
                 frontend web\n  bind {}\n  use_backend %[req.hdr(host),map({},blue)]\n\
                 backend blue\n  server blue1 {blue1} check inter 100ms\n  server blue2 {}\n",
                sock.display(),
                free_addr(),
                map.display(),
                free_addr(),
            ),
        )
        .expect("write the haproxy config");
        let child = std::process::Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn haproxy");
        let h = Haproxy {
            child,
            sock,
            map,
            _dir: dir,
        };
        let sock = h.sock.clone();
        wait_until(STEP, "haproxy's stats socket", || sock.exists()).await;
        let sock = h.sock.clone();
        wait_for(STEP, "haproxy sees blue1 UP", || {
            let sock = sock.clone();
            async move { cli(&sock, "show stat").await.contains(",UP,") }
        })
        .await;
        h
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The field names of `show info` (plain), in order.
fn info_names(info: &str) -> Vec<String> {
    info.lines()
        .filter_map(|l| l.split_once(": ").map(|(k, _)| k.to_string()))
        .collect()
}

/// The `<pos>.<name>` or `<kind>.<pos>.<name>` and tags of typed lines,
/// keyed by name, with the ids left out.
fn typed_shape(typed: &str, stat: bool) -> std::collections::BTreeMap<String, String> {
    typed
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (key, rest) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("not typed: {l}"));
            let parts: Vec<&str> = key.split('.').collect();
            let name = if stat {
                format!("{}.{}.{}", parts[0], parts[3], parts[4])
            } else {
                format!("{}.{}", parts[0], parts[1])
            };
            let tags: Vec<&str> = rest.splitn(3, ':').take(2).collect();
            (name, tags.join(":"))
        })
        .collect()
}

/// The keys of each object of a JSON field list, sorted.
fn json_keys(v: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_commands_answer_in_haproxys_formats() {
    let rig = Rig::start().await;
    rig.traffic(4).await;
    let blue1 = rig
        ._ups
        .iter()
        .find(|u| u.name == "blue1")
        .expect("blue1")
        .addr;
    let hap = Haproxy::start(blue1).await;
    let ours = |line: &'static str| rig.cli(line);
    let theirs = |line: String| {
        let sock = hap.sock.clone();
        async move { cli(&sock, &line).await }
    };

    // show info: every field pointsman prints is one HAProxy prints, in
    // HAProxy's order, and the ones its clients need are there.
    let info = ours("show info").await;
    let hinfo = theirs("show info".into()).await;
    let (names, hnames) = (info_names(&info), info_names(&hinfo));
    let in_haproxy_order: Vec<&String> = hnames.iter().filter(|n| names.contains(n)).collect();
    let extra: Vec<&String> = names
        .iter()
        .filter(|n| !hnames.contains(n) && *n != "description")
        .collect();
    assert!(extra.is_empty(), "fields HAProxy does not print: {extra:?}");
    assert_eq!(
        names
            .iter()
            .filter(|n| *n != "description")
            .collect::<Vec<_>>(),
        in_haproxy_order,
        "{info}"
    );
    for field in [
        "Name",
        "Version",
        "Release_date",
        "Maxpipes",
        "PipesUsed",
        "Tasks",
        "Run_queue",
        "CumReq",
        "Idle_pct",
        "CumConns",
        "CurrConns",
        "Uptime_sec",
        "node",
    ] {
        assert!(names.iter().any(|n| n == field), "no {field}:\n{info}");
    }
    assert!(
        info.starts_with("Name: HAProxy\nVersion: pointsman-"),
        "{info}"
    );
    assert!(info.contains("\nCumReq: 4\n"), "{info}");

    // show info typed|json: the same positions, names and tags.
    let typed = typed_shape(&ours("show info typed").await, false);
    let htyped = typed_shape(&theirs("show info typed".into()).await, false);
    for (name, tags) in &typed {
        if name.ends_with(".description") {
            continue;
        }
        // Tainted and a few strings aside, the types follow the value.
        let want = htyped
            .get(name)
            .unwrap_or_else(|| panic!("HAProxy has no {name}"));
        assert_eq!(&tags[..3], &want[..3], "{name}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ours("show info json").await).expect("show info json is JSON");
    let hjson: serde_json::Value = serde_json::from_str(&theirs("show info json".into()).await)
        .expect("HAProxy's show info json");
    assert_eq!(json_keys(&json[0]), json_keys(&hjson[0]));
    assert_eq!(json[0]["value"]["value"], "HAProxy");

    // show stat typed|json: per field the same tags, per object the keys.
    let typed = typed_shape(&ours("show stat typed").await, true);
    let htyped = typed_shape(&theirs("show stat typed".into()).await, true);
    for key in [
        "F.0.pxname",
        "S.17.status",
        "S.18.weight",
        "S.7.stot",
        "B.1.svname",
        "S.36.check_status",
    ] {
        assert_eq!(typed.get(key), htyped.get(key), "{key}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ours("show stat json").await).expect("show stat json is JSON");
    let hjson: serde_json::Value = serde_json::from_str(&theirs("show stat json".into()).await)
        .expect("HAProxy's show stat json");
    assert_eq!(json_keys(&json[0][0]), json_keys(&hjson[0][0]));
    let server_row = json
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r[0]["objType"] == "Server"))
        .expect("a server row");
    assert_eq!(server_row[1]["value"]["value"], "blue1");

    // show version, show errors, get map, set timeout cli, clear counters.
    assert!(ours("show version").await.starts_with("pointsman-"));
    let errors = ours("show errors").await;
    let herrors = theirs("show errors".into()).await;
    let shape =
        |s: &str| s.split('[').next().unwrap_or("").to_string() + s.split(']').nth(1).unwrap_or("");
    assert_eq!(shape(&errors), shape(&herrors), "{errors}");
    assert_eq!(
        ours("show errors nope").await,
        theirs("show errors nope".into()).await
    );
    let map = hap.map.display().to_string();
    assert_eq!(
        rig.cli("get map /etc/haproxy/hosts.map STATIC").await,
        theirs(format!("get map {map} STATIC")).await
    );
    assert_eq!(
        ours("get map hosts NOPE").await,
        theirs(format!("get map {map} NOPE")).await
    );
    for line in [
        "get map hosts",
        "get map nope x",
        "set timeout cli 60",
        "set timeout cli x",
        "set timeout cli",
        "set timeout server 3",
        "clear counters",
        "shutdown sessions server blue/nope",
        "shutdown sessions server nope/x",
        "shutdown sessions server blue/blue2",
        "enable health blue/blue2",
        "disable health blue/blue2",
        "enable health blue/blue1",
        "disable health nope/x",
        "set maxconn server blue/blue1 7",
        "set maxconn server blue/blue1 0",
        "set maxconn server blue/blue1",
        "set maxconn server blue/blue1 x1",
        "set maxconn server blue/blue1 1x",
        "set maxconn server nope/x 1",
        "show info json float",
    ] {
        // HAProxy's blue2 has no check: pointsman's unchecked server is
        // green/green1.
        let mine = if line.contains("health blue/blue2") {
            line.replace("blue/blue2", "green/green1")
        } else {
            line.to_string()
        };
        let (a, b) = (rig.cli(&mine).await, theirs(line.to_string()).await);
        if line.starts_with("show info") {
            assert_eq!(a.is_empty(), b.is_empty(), "{line}");
        } else {
            assert_eq!(a, b, "{line}");
        }
    }
    // disable health on a checked server: the same answer, and the same
    // status and check columns as HAProxy's while its checks are stopped;
    // enable health starts them again.
    assert_eq!(
        rig.cli("disable health blue/blue1").await,
        theirs("disable health blue/blue1".into()).await
    );
    let (csv, hcsv) = (rig.cli("show stat").await, theirs("show stat".into()).await);
    for col in ["status", "check_status", "check_code", "check_desc"] {
        assert_eq!(
            stat(&csv, "blue", "blue1", col),
            stat(&hcsv, "blue", "blue1", col),
            "{col} while checks are stopped"
        );
    }
    assert_eq!(stat(&csv, "blue", "blue1", "status"), "no check");
    assert_eq!(
        rig.cli("enable health blue/blue1").await,
        theirs("enable health blue/blue1".into()).await
    );
    let csv = rig.cli("show stat").await;
    assert_eq!(stat(&csv, "blue", "blue1", "status"), "UP", "checks again");
    // set timeout cli holds for the session: a prompt session set to 1 s
    // is closed after a second without a command.
    let mut conn = tokio::net::UnixStream::connect(&rig.sock)
        .await
        .expect("connect to the runtime socket");
    conn.write_all(b"prompt\nset timeout cli 1\n")
        .await
        .expect("write");
    let started = Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut out),
    )
    .await;
    assert!(read.is_ok(), "the session outlived its 1 s timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too soon: {:?}",
        started.elapsed()
    );
    assert_eq!(String::from_utf8_lossy(&out), "\n> \n> ");

    // In MAINT the check columns are empty and the check health counter
    // drops, as in HAProxy; while up it is rise + fall - 1.
    let state = |csv: String| {
        csv.lines()
            .find(|l| l.contains(" blue1 "))
            .map(str::to_string)
    };
    let ours_state = state(rig.cli("show servers state blue").await).expect("blue1 state");
    let theirs_state =
        state(theirs("show servers state blue".into()).await).expect("haproxy blue1");
    let f = |l: &str, i: usize| l.split(' ').nth(i).unwrap_or("").to_string();
    assert_eq!(
        f(&ours_state, 12),
        f(&theirs_state, 12),
        "srv_check_health while up"
    );
    rig.cli("disable server blue/blue1").await;
    theirs("disable server blue/blue1".into()).await;
    let csv = rig.cli("show stat").await;
    let hcsv = theirs("show stat".into()).await;
    for col in ["status", "check_status", "check_desc", "check_health"] {
        assert_eq!(
            stat(&csv, "blue", "blue1", col),
            stat(&hcsv, "blue", "blue1", col),
            "{col}"
        );
    }
    let ours_state = state(rig.cli("show servers state blue").await).expect("blue1 state");
    let theirs_state =
        state(theirs("show servers state blue".into()).await).expect("haproxy blue1");
    for i in [5, 6, 12, 13] {
        assert_eq!(
            f(&ours_state, i),
            f(&theirs_state, i),
            "field {i}: {ours_state} / {theirs_state}"
        );
    }
}

// ---------------------------------------------------------------------------
// Stable ids

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ids_stay_when_a_registration_goes_and_new_ones_take_the_free_id() {
    let rig = Rig::start_with(&["blue1", "blue2", "blue3"]).await;
    let sid = |csv: &str, s: &str| stat(csv, "blue", s, "sid");
    let csv = rig.cli("show stat").await;
    assert_eq!(
        (sid(&csv, "blue1"), sid(&csv, "blue2"), sid(&csv, "blue3")),
        ("1".into(), "2".into(), "3".into())
    );
    let iid = stat(&csv, "blue", "BACKEND", "iid");
    let green_iid = stat(&csv, "green", "BACKEND", "iid");

    // blue1 goes: the others keep their ids, and `show stat <iid> 4 3`
    // still finds blue3.
    let ups = &rig._ups;
    rig.proxy
        .reload(&config(rig.proxy.listener("web"), ups, &["blue2", "blue3"]))
        .await;
    let csv = rig.cli("show stat").await;
    assert_eq!(
        (sid(&csv, "blue2"), sid(&csv, "blue3")),
        ("2".into(), "3".into())
    );
    assert_eq!(stat(&csv, "blue", "BACKEND", "iid"), iid);
    assert_eq!(stat(&csv, "green", "BACKEND", "iid"), green_iid);
    let one = rig.cli(&format!("show stat {iid} 4 3")).await;
    assert_eq!(
        one.lines().filter(|l| l.starts_with("blue,")).count(),
        1,
        "{one}"
    );
    assert!(one.contains("\nblue,blue3,"), "{one}");
    let state = rig.cli("show servers state blue").await;
    assert!(state.contains(&format!("{iid} blue 3 blue3 ")), "{state}");

    // blue1 comes back: it takes the free id 1.
    rig.proxy
        .reload(&config(
            rig.proxy.listener("web"),
            ups,
            &["blue2", "blue3", "blue1"],
        ))
        .await;
    let csv = rig.cli("show stat").await;
    assert_eq!(sid(&csv, "blue1"), "1");
    // The admin listener's CSV has the same ids.
    let http = plain_client()
        .get(rig.proxy.admin_url("/stats;csv"))
        .send()
        .await
        .expect("GET /stats;csv")
        .text()
        .await
        .expect("body");
    assert_eq!(sid(&http, "blue3"), "3");
}

// ---------------------------------------------------------------------------
// The admin listener: stats CSV/JSON and the stats admin form

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_csv_urls_and_the_admin_form() {
    let rig = Rig::start().await;
    rig.traffic(4).await;
    let http = plain_client();
    let get = |path: &'static str| {
        let url = rig.proxy.admin_url(path);
        let http = http.clone();
        async move {
            let r = http.get(&url).send().await.expect("GET");
            let status = r.status().as_u16();
            (status, r.text().await.expect("body"))
        }
    };
    let socket_csv = rig.cli("show stat").await;
    for path in [
        "/stats;csv",
        "/stats;csv;norefresh",
        "/;csv",
        "/?stats;csv",
        "/stats?stats;csv",
        "/haproxy?stats;csv",
    ] {
        let (status, body) = get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.starts_with("# pxname,svname,"), "{path}: {body}");
        assert_eq!(
            body.lines().count() + 1,
            socket_csv.lines().count(),
            "{path}: the rows of show stat (and its empty line)"
        );
        assert_eq!(stat(&body, "blue", "BACKEND", "stot"), "4", "{path}");
    }
    let (status, body) = get("/stats;json").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("/stats;json is JSON");
    assert_eq!(json[0][0]["field"]["name"], "pxname");
    let (status, _) = get("/haproxy").await;
    assert_eq!(status, 404, "only the stats URLs");

    // The admin form: HAProxy's fields, the token and the page's origin.
    let admin = rig.proxy.admin;
    let own = format!("http://{admin}");
    let form = |body: &'static str, origin: Option<String>, token: Option<&'static str>| {
        let url = rig.proxy.admin_url("/stats");
        async move {
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .expect("client");
            let mut req = client
                .post(&url)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body);
            if let Some(o) = origin {
                req = req.header("Origin", o);
            }
            if let Some(t) = token {
                req = req.basic_auth("admin", Some(t));
            }
            let r = req.send().await.expect("POST the form");
            let location = r
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (r.status().as_u16(), location)
        }
    };
    let status_of = |csv: &str| stat(csv, "blue", "blue1", "status");
    let drain = "s=blue1&action=drain&b=blue";
    assert_eq!(
        form(drain, Some(own.clone()), None).await.0,
        401,
        "no token"
    );
    assert_eq!(form(drain, Some(own.clone()), Some("wrong")).await.0, 401);
    assert_eq!(
        form(drain, Some("http://evil.example".into()), Some(TOKEN))
            .await
            .0,
        403,
        "another site's page"
    );
    assert_eq!(
        form(drain, None, Some(TOKEN)).await.0,
        403,
        "no origin at all"
    );
    assert_eq!(
        status_of(&rig.cli("show stat").await),
        "UP",
        "nothing changed"
    );

    let (status, location) = form(drain, Some(own.clone()), Some(TOKEN)).await;
    assert_eq!((status, location.as_str()), (303, "/stats;st=DONE"));
    assert_eq!(status_of(&rig.cli("show stat").await), "DRAIN");
    let (_, location) = form(
        "s=blue1&s=blue2&action=maint&b=blue",
        Some(own.clone()),
        Some(TOKEN),
    )
    .await;
    assert_eq!(location, "/stats;st=DONE");
    let csv = rig.cli("show stat").await;
    assert_eq!(
        (status_of(&csv), stat(&csv, "blue", "blue2", "status")),
        ("MAINT".into(), "MAINT".into())
    );
    let (_, location) = form(
        "s=blue1&s=nope&action=ready&b=blue",
        Some(own.clone()),
        Some(TOKEN),
    )
    .await;
    assert_eq!(location, "/stats;st=PART");
    let (_, location) = form(
        "s=blue2&action=hnolb&b=blue",
        Some(own.clone()),
        Some(TOKEN),
    )
    .await;
    assert_eq!(location, "/stats;st=ERRP", "an action pointsman has not");
    let (_, location) = form("action=ready&b=blue", Some(own), Some(TOKEN)).await;
    assert_eq!(location, "/stats;st=NONE");
    assert_eq!(status_of(&rig.cli("show stat").await), "UP");
}
