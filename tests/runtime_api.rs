//! End to end: the HAProxy-compatible runtime API, through real socat on
//! the Unix socket and on loopback TCP. The operators' blue/green script
//! (its shell functions copied unchanged) switches real traffic; every
//! command and its error answers; `;`-separated lines and prompt mode; the
//! socket's mode and its start-up checks; the TCP listener read-only until
//! `auth <token>`, and closed on an HTTP request line.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::recorder::{Recorder, Script};
use support::*;

/// How long one socat call or script step may take.
const STEP_DEADLINE: Duration = Duration::from_secs(30);

/// The address `--runtime-api 127.0.0.1:0` ended up on, from the log.
fn runtime_addr(proxy: &Proxy) -> SocketAddr {
    let err = proxy.stderr();
    err.lines()
        .filter(|l| l.contains("runtime API listening"))
        .find_map(|l| {
            l.split("addr=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `runtime API listening addr=` line in:\n{err}"))
}

/// Runs `program args` with `input` on stdin; its stdout. Panics if it
/// takes longer than [`STEP_DEADLINE`] or fails.
async fn run_with_input(program: &str, args: &[&str], input: &str) -> String {
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
    let out = tokio::time::timeout(STEP_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {STEP_DEADLINE:?}"))
        .expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The admin token the proxies here start with (`--admin-token`): what
/// `auth` on the TCP listener takes.
const TOKEN: &str = "runtime-test-token";

/// `echo "auth <TOKEN>; <line>" | socat stdio tcp4-connect:<addr>`: the
/// answer to `line`.
async fn cli(addr: SocketAddr, line: &str) -> String {
    let out = cli_as_is(addr, &format!("auth {TOKEN}; {line}")).await;
    match out.strip_prefix('\n') {
        Some(rest) => rest.to_string(),
        None => panic!("auth {TOKEN} was refused: {out}"),
    }
}

/// `echo "<line>" | socat stdio tcp4-connect:<addr>`, without `auth`.
async fn cli_as_is(addr: SocketAddr, line: &str) -> String {
    let target = format!("tcp4-connect:{addr}");
    run_with_input("socat", &["stdio", &target], &format!("{line}\n")).await
}

/// `echo "<line>" | socat stdio unix-connect:<path>`.
async fn cli_unix(path: &Path, line: &str) -> String {
    let target = format!("unix-connect:{}", path.display());
    run_with_input("socat", &["stdio", &target], &format!("{line}\n")).await
}

/// Field `n` (1-based) of the `show stat` row `pxname,svname`.
fn stat_field(csv: &str, pxname: &str, svname: &str, n: usize) -> String {
    csv.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.len() > n && f[0] == pxname && f[1] == svname)
        .unwrap_or_else(|| panic!("no row {pxname},{svname} in:\n{csv}"))[n - 1]
        .to_string()
}

/// The status column (18) of a server, as the operators' script cuts it.
async fn status_of(addr: SocketAddr, backend: &str, server: &str) -> String {
    stat_field(&cli(addr, "show stat").await, backend, server, 18)
}

// ---------------------------------------------------------------------------
// The operators' script

/// The shell functions of the operators' blue/green script, as they wrote
/// them. Only the runtime API address (`tcp4-connect:127.0.0.1:9000`,
/// which becomes the Unix socket: `set map` is a change, which the TCP
/// listener takes only after `auth`) and the map file path are replaced,
/// by [`seed_functions`].
const SEED_FUNCTIONS: &str = r#"#!/bin/bash
function forwardTo(){
   echo "set map /home/dong/code/learn-haproxy/hosts.map STATIC $1" | socat stdio tcp4-connect:127.0.0.1:9000
}

function readyToDown(){
   serverName=$1
   ok="false"
   while [[ $ok == "false" ]];
   do
      sleep 1
      count=$(echo "show servers conn $serverName $" | socat stdio tcp4-connect:127.0.0.1:9000 | sed -n 2p | cut -d " " -f 7)
      echo "current connection on $serverName: ${count}"
      if [[ $count == "0" ]]; then
            ok="true"
      fi;
   done

}

function waitItUp(){
   serverName=$1
   itUp="false"
   while [[ $itUp == "false" ]];
   do
      echo "wait for $serverName up"
      status=$(echo "show stat" | socat stdio tcp4-connect:127.0.0.1:9000 | cut -d "," -f 2,18 | column -s, -t | grep $serverName | awk "{print \$2}")
      echo "$serverName status: $status"
      if [[ $status != "UP" ]]; then
            sleep 1
      else
            itUp="true"
      fi
   done
}
"#;

/// The functions with this proxy's runtime socket and a map path whose
/// last segment names the map `hosts`.
fn seed_functions(socket: &Path, dir: &Path) -> String {
    SEED_FUNCTIONS
        .replace(
            "tcp4-connect:127.0.0.1:9000",
            &format!("unix-connect:{}", socket.display()),
        )
        .replace(
            "/home/dong/code/learn-haproxy/hosts.map",
            &dir.join("hosts.map").display().to_string(),
        )
}

/// Runs `calls` after sourcing `functions`, in bash; its output.
async fn script(functions: &Path, calls: &str) -> String {
    let source = format!("source {}\n{calls}\n", functions.display());
    run_with_input("bash", &["-s"], &source).await
}

/// Two services, blue and green, one instance each named like its
/// service, actively checked; every request goes where the map `hosts`
/// says for the key `STATIC`.
fn blue_green(listen: SocketAddr, blue: &Upstream, green: &Upstream) -> String {
    let check = r#"check = { interval = "100ms", timeout = "500ms", rise = 1, fall = 2 }"#;
    format!(
        r#"[[listeners]]
name = "web"
bind = "{listen}"

[services.blue]
{check}
endpoints = [{blue}]

[services.green]
{check}
endpoints = [{green}]

[routes.app]
path_prefix = "/"
map = "hosts"
map_key = "STATIC"

[maps.hosts]
STATIC = "blue"
"#,
        blue = endpoint_line(blue, ""),
        green = endpoint_line(green, ""),
    )
}

async fn all_go_to(proxy: &Proxy, n: usize) -> std::collections::BTreeMap<String, usize> {
    tally(&client(), &proxy.url("/"), n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_blue_green_script_runs_unchanged_and_switches_traffic() {
    let mut ups = Upstream::start_many(&["blue", "green"]).await;
    let (blue, green) = (&ups[0], &ups[1]);
    let sockets = tempfile::tempdir().expect("temp dir");
    let sock = sockets.path().join("runtime.sock");
    let sock_arg = sock.to_str().expect("UTF-8 path").to_string();
    let proxy = Proxy::start_with_args(
        || blue_green(free_addr(), blue, green),
        &[
            "--runtime-api",
            "127.0.0.1:0",
            "--admin-token",
            TOKEN,
            "--runtime-socket",
            &sock_arg,
        ],
    )
    .await;
    let addr = runtime_addr(&proxy);
    let functions = proxy.dir().join("deploy-functions.sh");
    std::fs::write(&functions, seed_functions(&sock, proxy.dir())).expect("write the functions");

    wait_for(Duration::from_secs(10), "blue and green are UP", || async {
        status_of(addr, "blue", "blue").await == "UP"
            && status_of(addr, "green", "green").await == "UP"
    })
    .await;
    assert_eq!(all_go_to(&proxy, 5).await.get("blue"), Some(&5));

    // A slow request to blue, in flight while the traffic moves to green.
    let slow_url = proxy.url("/slow?ms=3000");
    let slow = tokio::spawn(async move { plain_client().get(slow_url).send().await });
    wait_for(
        Duration::from_secs(5),
        "the slow request is in flight",
        || async {
            let conn = cli(addr, "show servers conn blue").await;
            conn.lines().nth(1).and_then(|l| l.split(' ').nth(6)) == Some("1")
        },
    )
    .await;

    let out = script(&functions, "waitItUp green\nforwardTo green").await;
    assert!(out.contains("green status: UP"), "{out}");
    let counts = all_go_to(&proxy, 10).await;
    assert_eq!(
        counts.get("green"),
        Some(&10),
        "after forwardTo green: {counts:?}"
    );

    // readyToDown waits for blue's last request.
    let started = Instant::now();
    let out = script(&functions, "readyToDown blue").await;
    assert!(
        out.contains("current connection on blue: 1\n"),
        "it saw the request in flight:\n{out}"
    );
    assert!(
        out.ends_with("current connection on blue: 0\n"),
        "it ends once blue is idle:\n{out}"
    );
    let resp = tokio::time::timeout(Duration::from_secs(2), slow)
        .await
        .expect("the slow request has ended when readyToDown returns")
        .expect("slow task")
        .expect("the slow request completes");
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(1));

    let out = script(&functions, "waitItUp blue\nforwardTo blue").await;
    assert!(out.contains("blue status: UP"), "{out}");
    let counts = all_go_to(&proxy, 10).await;
    assert_eq!(
        counts.get("blue"),
        Some(&10),
        "after forwardTo blue: {counts:?}"
    );

    let out = script(&functions, "readyToDown green").await;
    assert_eq!(out, "current connection on green: 0\n");

    // `show map` reports the value in force.
    let shown = cli(addr, "show map hosts").await;
    assert_eq!(shown, "0x1 STATIC blue\n\n");

    // Green stops: its check fails and show stat says DOWN.
    drop(ups.pop());
    wait_for(Duration::from_secs(10), "green is DOWN", || async {
        status_of(addr, "green", "green").await == "DOWN"
    })
    .await;
    let csv = cli(addr, "show stat").await;
    assert_eq!(stat_field(&csv, "green", "BACKEND", 18), "DOWN");
    assert_eq!(
        stat_field(&csv, "green", "green", 37),
        "L4CON",
        "check_status"
    );
    let chkfail: u64 = stat_field(&csv, "green", "green", 22)
        .parse()
        .expect("chkfail");
    assert!(chkfail >= 2, "fall = 2 failed checks at least: {chkfail}");
    assert_eq!(stat_field(&csv, "blue", "blue", 37), "L4OK");
    assert_eq!(stat_field(&csv, "blue", "blue", 22), "0");
}

// ---------------------------------------------------------------------------
// Servers: state and weight, seen in traffic

fn two_servers(listen: SocketAddr, a: &Upstream, b: &Upstream) -> String {
    format!(
        r#"[[listeners]]
name = "web"
bind = "{listen}"
default_service = "web"

[services.web]
endpoints = [{a}, {b}]

[routes.m]
path_prefix = "/m"
map = "release"
map_key = "live"

[maps.release]
live = "web"
"#,
        a = endpoint_line(a, ""),
        b = endpoint_line(b, ""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_state_and_weight_changes_are_seen_by_requests() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let proxy = Proxy::start_with_args(
        || two_servers(free_addr(), a, b),
        &[
            "--runtime-api",
            "127.0.0.1:0",
            "--admin-token",
            TOKEN,
            "--threads",
            "1",
        ],
    )
    .await;
    let addr = runtime_addr(&proxy);
    let c = client();
    let url = proxy.url("/");

    assert_eq!(status_of(addr, "web", "a").await, "no check");
    assert_eq!(cli(addr, "disable server web/a").await, "\n");
    assert_eq!(status_of(addr, "web", "a").await, "MAINT");
    assert_eq!(
        tally(&c, &url, 10).await.get("b"),
        Some(&10),
        "a is in maintenance"
    );

    assert_eq!(cli(addr, "enable server web/a").await, "\n");
    assert_eq!(status_of(addr, "web", "a").await, "no check");
    let both = tally(&c, &url, 10).await;
    assert_eq!(
        (both.get("a"), both.get("b")),
        (Some(&5), Some(&5)),
        "{both:?}"
    );

    // Weights: 3 to 1 over a whole number of rounds.
    assert_eq!(cli(addr, "set server web/a weight 3").await, "\n");
    assert_eq!(cli(addr, "get weight web/a").await, "3 (initial 1)\n\n");
    let csv = cli(addr, "show stat").await;
    assert_eq!(stat_field(&csv, "web", "a", 19), "3", "the weight column");
    assert_eq!(stat_field(&csv, "web", "BACKEND", 19), "4");
    let split = tally(&c, &url, 40).await;
    assert_eq!(
        (split.get("a"), split.get("b")),
        (Some(&30), Some(&10)),
        "{split:?}"
    );

    // 50% of the initial weight 1 is 0: no new requests.
    assert_eq!(cli(addr, "set server web/a weight 50%").await, "\n");
    assert_eq!(cli(addr, "get weight web/a").await, "0 (initial 1)\n\n");
    assert_eq!(tally(&c, &url, 10).await.get("b"), Some(&10));
    assert_eq!(cli(addr, "set weight web/a 100%").await, "\n");
    assert_eq!(cli(addr, "get weight web/a").await, "1 (initial 1)\n\n");

    // Drain: no new requests, status DRAIN; ready again: back in rotation.
    assert_eq!(cli(addr, "set server web/b state drain").await, "\n");
    assert_eq!(status_of(addr, "web", "b").await, "DRAIN");
    assert_eq!(tally(&c, &url, 10).await.get("a"), Some(&10));
    assert_eq!(cli(addr, "set server web/b state maint").await, "\n");
    assert_eq!(status_of(addr, "web", "b").await, "MAINT");
    assert_eq!(cli(addr, "set server web/a state maint").await, "\n");
    let csv = cli(addr, "show stat").await;
    assert_eq!(
        stat_field(&csv, "web", "BACKEND", 18),
        "DOWN",
        "no usable server"
    );
    let (status, _) = get_echo(&c, &url, &[]).await;
    assert_eq!(status, 503, "every server in maintenance");
    assert_eq!(
        cli(
            addr,
            "set server web/a state ready; set server web/b state ready"
        )
        .await,
        "\n\n"
    );
    let both = tally(&c, &url, 10).await;
    assert_eq!(
        (both.get("a"), both.get("b")),
        (Some(&5), Some(&5)),
        "{both:?}"
    );

    // The per-server counters count what was served.
    let csv = cli(addr, "show stat").await;
    let stot: u64 = stat_field(&csv, "web", "a", 8).parse().expect("stot");
    let hrsp_2xx: u64 = stat_field(&csv, "web", "a", 41).parse().expect("hrsp_2xx");
    assert!(
        stot >= 30 && hrsp_2xx == stot,
        "stot {stot}, hrsp_2xx {hrsp_2xx}"
    );

    // `show servers state` shows what the commands set.
    let state = cli(addr, "set server web/a weight 7; show servers state web").await;
    let row = state
        .lines()
        .find(|l| l.starts_with("2 web 1 a "))
        .unwrap_or_else(|| panic!("no row for web/a:\n{state}"));
    let f: Vec<&str> = row.split(' ').collect();
    assert_eq!((f[5], f[6], f[7], f[8]), ("2", "0", "7", "1"), "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_commands_change_where_requests_go() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let proxy = Proxy::start_with_args(
        || {
            two_servers(free_addr(), a, b)
                + &format!(
                    "\n[services.solo]\nendpoints = [{}]\n",
                    endpoint_line(b, "")
                )
        },
        &["--runtime-api", "127.0.0.1:0", "--admin-token", TOKEN],
    )
    .await;
    let addr = runtime_addr(&proxy);
    let c = client();
    let url = proxy.url("/m/x");
    let list = cli(addr, "show map").await;
    assert_eq!(
        list,
        "# id (file) description\n1 (release) routing map 'release' used by route m. entry_cnt=1\n\n"
    );

    assert_eq!(
        cli(addr, "set map /etc/haproxy/release.map live solo").await,
        "\n"
    );
    assert_eq!(
        tally(&c, &url, 4).await.get("b"),
        Some(&4),
        "solo is b alone"
    );
    assert_eq!(cli(addr, "show map #1").await, "0x1 live solo\n\n");

    assert_eq!(cli(addr, "clear map release").await, "\n");
    let (status, _) = get_echo(&c, &url, &[]).await;
    assert_eq!(status, 503, "no entry for the key");
    assert_eq!(cli(addr, "show map release").await, "\n");
    assert_eq!(
        cli(addr, "set map release live web").await,
        "entry not found.\n\n"
    );
    assert_eq!(cli(addr, "add map release live web").await, "\n");
    assert_eq!(tally(&c, &url, 4).await.len(), 2, "web again: a and b");
    assert!(cli(addr, "add map release live solo")
        .await
        .starts_with("Key already exists"));
    assert_eq!(cli(addr, "del map release live").await, "\n");
    assert_eq!(
        cli(addr, "del map release live").await,
        "Key not found.\n\n"
    );
    let (status, _) = get_echo(&c, &url, &[]).await;
    assert_eq!(status, 503);

    let unknown = "Unknown map identifier. Please use #<id> or <file>.\n\n";
    for line in [
        "show map nope",
        "show map #7",
        "set map /x/nope.map live web",
        "add map nope k v",
        "del map nope k",
        "clear map nope",
    ] {
        assert_eq!(cli(addr, line).await, unknown, "{line}");
    }
}

/// A state set on this proxy is told apart from the registry's: `show
/// servers state` gives HAProxy's admin bits (1: forced at run time, 4:
/// from the configuration), the stats page says "set here" and how to
/// clear it; once cleared, the mark goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_changes_are_marked_until_cleared() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let config = |listen| {
        web(
            listen,
            "",
            &[
                endpoint_line(&ups[0], ""),
                endpoint_line(&ups[1], "state = \"maint\""),
            ],
        )
    };
    let proxy = Proxy::start_with_args(
        || config(free_addr()),
        &["--runtime-api", "127.0.0.1:0", "--admin-token", TOKEN],
    )
    .await;
    let addr = runtime_addr(&proxy);
    assert_eq!(
        cli(addr, "disable server web/a; set server web/b weight 3").await,
        "\n\n"
    );
    let admin_bits = |state: String, id: &str| {
        state
            .lines()
            .find(|l| l.split(' ').nth(3) == Some(id))
            .and_then(|l| l.split(' ').nth(6).map(str::to_string))
            .unwrap_or_else(|| panic!("no row for {id}:\n{state}"))
    };
    let state = cli(addr, "show servers state web").await;
    assert_eq!(
        admin_bits(state.clone(), "a"),
        "1",
        "a: maintenance set here"
    );
    assert_eq!(
        admin_bits(state, "b"),
        "4",
        "b: maintenance from the config"
    );

    let page = |proxy: &Proxy| {
        let url = proxy.admin_url("/stats");
        async move {
            plain_client()
                .get(url)
                .send()
                .await
                .expect("GET /stats")
                .text()
                .await
                .expect("the page")
        }
    };
    let row = |html: &str, id: &str| {
        html.split("<tr")
            .find(|r| r.contains(&format!("data-endpoint=\"{id}\"")))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no row for {id}"))
    };
    let html = page(&proxy).await;
    let (row_a, row_b) = (row(&html, "a"), row(&html, "b"));
    assert!(row_a.contains("maint <span class=local"), "{row_a}");
    assert!(
        row_a.contains("DELETE /api/services/web/endpoints/a"),
        "{row_a}"
    );
    assert!(
        row_b.contains("maint</td>"),
        "b's state is the config's: {row_b}"
    );
    assert!(
        row_b.contains("3 (of 1) <span class=local"),
        "b's weight is set here: {row_b}"
    );

    let resp = plain_client()
        .delete(proxy.admin_url("/api/services/web/endpoints/a"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .send()
        .await
        .expect("DELETE");
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let html = page(&proxy).await;
    assert!(!row(&html, "a").contains("set here"), "{}", row(&html, "a"));
    let state = cli(addr, "show servers state web").await;
    assert_eq!(admin_bits(state, "a"), "0", "a is ready again");
}

/// `disable health` stops a failing check from keeping a server out: it
/// takes traffic, shown as `no check`; `enable health` starts the checks
/// again and the next failure takes it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_health_lets_a_server_failing_its_check_serve_until_enable_health() {
    let up = Upstream::start("a").await;
    // The check asks a port nothing listens on: it always fails.
    let check = format!(
        "check = {{ interval = \"100ms\", timeout = \"200ms\", rise = 1, fall = 1, port = {} }}",
        free_addr().port()
    );
    let proxy = Proxy::start_with_args(
        || web(free_addr(), &check, &[endpoint_line(&up, "")]),
        &["--runtime-api", "127.0.0.1:0", "--admin-token", TOKEN],
    )
    .await;
    let addr = runtime_addr(&proxy);
    let status = |csv: &str| stat_field(csv, "web", "a", 18);
    let deadline = Duration::from_secs(5);
    let (c, url) = (plain_client(), proxy.url("/"));
    let get = || get_echo(&c, &url, &[]);
    wait_for(deadline, "a is down by its check", || async {
        status(&cli(addr, "show stat").await).starts_with("DOWN")
    })
    .await;
    assert_eq!(get().await.0, 503);

    assert_eq!(cli(addr, "disable health web/a").await, "\n");
    assert_eq!(status(&cli(addr, "show stat").await), "no check");
    tokio::time::sleep(Duration::from_millis(400)).await; // checks would have run
    for _ in 0..5 {
        let (code, echo) = get().await;
        assert_eq!((code, echo["server"].as_str()), (200, Some("a")));
    }

    assert_eq!(cli(addr, "enable health web/a").await, "\n");
    wait_for(deadline, "a is down again by its check", || async {
        status(&cli(addr, "show stat").await).starts_with("DOWN")
    })
    .await;
    assert_eq!(get().await.0, 503);
}

/// `runtime_identity = "pointsman"` (or `--runtime-identity`, which wins)
/// makes `show info` name the process as it is; a reload follows the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_info_names_the_process_as_runtime_identity_says() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let with = |identity: &str, listen| {
        format!(
            "[global]\nruntime_identity = \"{identity}\"\n{}",
            two_servers(listen, a, b)
        )
    };
    let name = |info: String| info.lines().next().unwrap_or_default().to_string();

    let proxy = Proxy::start_with_args(
        || with("pointsman", free_addr()),
        &["--runtime-api", "127.0.0.1:0", "--admin-token", TOKEN],
    )
    .await;
    let addr = runtime_addr(&proxy);
    let info = cli(addr, "show info").await;
    assert_eq!(name(info.clone()), "Name: pointsman", "{info}");
    assert!(info.contains("\nVersion: pointsman-"), "{info}");
    assert!(!info.contains("HAProxy"), "{info}");
    proxy.reload(&with("haproxy", proxy.addr())).await;
    assert_eq!(name(cli(addr, "show info").await), "Name: HAProxy");

    let flagged = Proxy::start_with_args(
        || with("haproxy", free_addr()),
        &[
            "--runtime-api",
            "127.0.0.1:0",
            "--admin-token",
            TOKEN,
            "--runtime-identity",
            "pointsman",
        ],
    )
    .await;
    let addr = runtime_addr(&flagged);
    assert_eq!(name(cli(addr, "show info").await), "Name: pointsman");
}

// ---------------------------------------------------------------------------
// Every read command, lines of several commands, errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_commands_and_error_answers() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let proxy = Proxy::start_with_args(
        || two_servers(free_addr(), a, b),
        &["--runtime-api", "127.0.0.1:0", "--admin-token", TOKEN],
    )
    .await;
    let addr = runtime_addr(&proxy);

    let csv = cli(addr, "show stat").await;
    assert!(
        csv.starts_with("# pxname,svname,qcur,qmax,scur,smax,slim,stot,"),
        "{csv}"
    );
    let cut: Vec<String> = csv
        .lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > 18)
        .map(|f| format!("{} {} {}", f[0], f[1], f[17]))
        .collect();
    assert_eq!(
        cut,
        [
            "# pxname svname status",
            "web FRONTEND OPEN",
            "web a no check",
            "web b no check",
            "web BACKEND UP",
        ]
    );
    assert!(csv.ends_with(",\n\n"), "{csv}");

    assert_eq!(cli(addr, "show backend").await, "# name\nweb\n\n");
    let info = cli(addr, "show info").await;
    // HAProxy's name, for its clients; pointsman's in the version.
    assert!(
        info.starts_with("Name: HAProxy\nVersion: pointsman-"),
        "{info}"
    );
    assert!(
        info.contains(&format!("\nPid: {}\n", proxy.pid())),
        "{info}"
    );
    assert!(info.contains("\nNbthread: 2\n"), "{info}");
    let state = cli(addr, "show servers state").await;
    assert!(
        state.starts_with("1\n# be_id be_name srv_id srv_name srv_addr "),
        "{state}"
    );
    assert_eq!(
        state.lines().filter(|l| l.starts_with("2 web ")).count(),
        2,
        "{state}"
    );
    let conn = cli(addr, "show servers conn web").await;
    assert!(conn.starts_with("# bkname/svname bkid/svid addr port - purge_delay used_cur"));
    assert_eq!(
        conn.lines()
            .nth(1)
            .map(|l| l.split(' ').take(7).collect::<Vec<_>>().join(" ")),
        Some(format!(
            "web/a 2/1 {} {} - 30000 0",
            a.addr.ip(),
            a.addr.port()
        ))
    );
    let help = cli(addr, "help").await;
    for command in [
        "show stat",
        "show info",
        "show servers state",
        "show servers conn",
        "show backend",
        "show map",
        "disable server",
        "enable server",
        "set server",
        "set weight",
        "get weight",
        "set map",
        "add map",
        "del map",
        "clear map",
        "help",
        "prompt",
        "quit",
    ] {
        assert!(
            help.contains(&format!("\n  {command}")),
            "help lists {command}:\n{help}"
        );
    }

    // Several commands on one line, each answer followed by an empty line.
    assert_eq!(
        cli(addr, "get weight web/a;get weight web/b ; show backend").await,
        "1 (initial 1)\n\n1 (initial 1)\n\n# name\nweb\n\n"
    );
    // `quit` ends the line.
    assert_eq!(
        cli(addr, "get weight web/a; quit; show backend").await,
        "1 (initial 1)\n\n"
    );

    let errors = [
        ("show servers conn nope", "Can't find backend."),
        ("show servers state nope", "Can't find backend."),
        ("get weight web", "Require 'backend/server'."),
        ("get weight nope/a", "No such backend."),
        ("get weight web/nope", "No such server."),
        ("disable server", "Require 'backend/server'."),
        ("disable server nope/a", "No such backend."),
        ("enable server web/nope", "No such server."),
        (
            "set server web/a",
            "usage: set server <backend>/<server> state ready|drain|maint | weight <weight>[%]",
        ),
        (
            "set server web/a state up",
            "'set server <srv> state' expects 'ready', 'drain' and 'maint'.",
        ),
        ("set server web/nope state drain", "No such server."),
        ("set server web/a weight", "Require <weight> or <weight%>."),
        (
            "set server web/a weight 257",
            "Absolute weight can only be between 0 and 256 inclusive.",
        ),
        (
            "set server web/a weight heavy",
            "Empty weight string empty or preceded by garbage.",
        ),
        (
            "set server web/a weight 5kg",
            "Trailing garbage in weight string.",
        ),
        (
            "set server web/a weight -50%",
            "Relative weight must be positive.",
        ),
        ("set weight nope/a 3", "No such backend."),
        (
            "set map release live",
            "'set map' expects three parameters: map identifier, key and value.",
        ),
        ("set map release nope web", "entry not found."),
        (
            "del map release",
            "This command expects two parameters: map identifier and key.",
        ),
        ("clear map", "Missing map identifier."),
        ("show stat desc", "'show stat desc' is not supported"),
        ("get map release", "Missing map identifier and/or key."),
        ("set timeout cli x", "Invalid timeout value."),
    ];
    for (line, want) in errors {
        let got = cli(addr, line).await;
        assert!(
            got.starts_with(want),
            "{line:?}: got {got:?}, want {want:?}"
        );
        assert!(got.ends_with("\n\n"), "{line:?}: {got:?}");
    }
    // Nothing changed on the way.
    assert_eq!(cli(addr, "get weight web/a").await, "1 (initial 1)\n\n");
    assert_eq!(status_of(addr, "web", "a").await, "no check");

    // Unknown commands: the closest commands, or all, as HAProxy answers.
    let got = cli(addr, "show sess").await;
    assert!(
        got.starts_with(
            "Unknown command, but maybe one of the following ones is a better match:\n  show "
        ),
        "{got}"
    );
    assert!(!got.contains("  set "), "{got}");
    let got = cli(addr, "frobnicate web/a").await;
    assert!(
        got.starts_with("Unknown command. Please enter one of the following commands only:\n"),
        "{got}"
    );
    assert!(got.contains("  set map <map> <key> <value> "), "{got}");
    // The proxy is still there.
    assert_eq!(cli(addr, "show backend").await, "# name\nweb\n\n");
}

// ---------------------------------------------------------------------------
// Traffic counters

/// The column `name` of the `show stat` row `pxname,svname`, found by the
/// header's names.
fn stat_value(csv: &str, pxname: &str, svname: &str, name: &str) -> String {
    let header = csv.lines().next().unwrap_or_default();
    let n = header
        .trim_start_matches("# ")
        .split(',')
        .position(|c| c == name)
        .unwrap_or_else(|| panic!("no column {name} in {header}"));
    stat_field(csv, pxname, svname, n + 1)
}

/// One request on its own connection (`Connection: close`), read to the
/// end: the status and how many bytes the proxy wrote.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, usize) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the listener");
    s.write_all(request).await.expect("send the request");
    let mut answer = Vec::new();
    tokio::time::timeout(STEP_DEADLINE, s.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes in time")
        .expect("read the answer");
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).unwrap_or_default().to_string();
    (status, answer.len())
}

/// What the upstream answers every request with.
const UPSTREAM_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stat_counts_the_traffic_and_clear_counters_zeroes_it() {
    let upstream = Recorder::start(|_| Script::Answer(UPSTREAM_ANSWER.to_vec())).await;
    let up = upstream.addr;
    let proxy = Proxy::start_with_args(
        || {
            format!(
                r#"[[listeners]]
name = "web"
bind = "{}"

[services.api]
endpoints = [{{ id = "a", address = "{up}" }}]

[routes.api]
path_prefix = "/api"
service = "api"
"#,
                free_addr()
            )
        },
        &[
            "--runtime-api",
            "127.0.0.1:0",
            "--admin-token",
            TOKEN,
            "--threads",
            "1",
        ],
    )
    .await;
    let addr = runtime_addr(&proxy);
    let listener = proxy.listener("web");
    // Starting, the proxy was probed with connections that sent nothing.
    let before = cli(addr, "show stat").await;
    let before = |name| -> usize {
        let v = stat_value(&before, "web", "FRONTEND", name);
        v.parse().unwrap_or_else(|_| panic!("{name} is {v:?}"))
    };
    let sessions_before = before("stot");
    assert_eq!((before("req_tot"), before("bin")), (0, 0));

    // Three POSTs with bodies of 100, 200 and 300 bytes reach the
    // upstream; a GET that no route matches gets the proxy's own 404.
    let (mut sent, mut read) = (0, 0);
    for size in [100, 200, 300] {
        let request = format!(
            "POST /api/items HTTP/1.1\r\nHost: stats.test\r\nConnection: close\r\n\
             Content-Length: {size}\r\n\r\n{}",
            "x".repeat(size)
        );
        let (status, n) = exchange(listener, request.as_bytes()).await;
        assert_eq!(status, "200");
        sent += request.len();
        read += n;
    }
    let request = "GET /nowhere HTTP/1.1\r\nHost: stats.test\r\nConnection: close\r\n\r\n";
    let (status, n) = exchange(listener, request.as_bytes()).await;
    assert_eq!(status, "404");
    sent += request.len();
    read += n;
    let upstream_got: usize = upstream.received().iter().map(Vec::len).sum();
    assert!(upstream_got > 600, "the bodies reached the upstream");

    let csv = cli(addr, "show stat").await;
    let fe = |name| stat_value(&csv, "web", "FRONTEND", name);
    let sv = |name| stat_value(&csv, "api", "a", name);
    let sessions = (sessions_before + 4).to_string();
    assert_eq!(fe("stot"), sessions, "one session per connection\n{csv}");
    assert_eq!(fe("conn_tot"), sessions);
    assert_eq!(fe("req_tot"), "4", "{csv}");
    assert_eq!(
        (fe("hrsp_2xx"), fe("hrsp_4xx"), fe("hrsp_5xx")),
        ("3".into(), "1".into(), "0".into())
    );
    assert_eq!(fe("ereq"), "0");
    assert_eq!(fe("bin"), sent.to_string(), "bytes read from the clients");
    assert_eq!(fe("bout"), read.to_string(), "bytes written to the clients");
    assert!(
        fe("rate_max").parse::<u64>().expect("rate_max") >= 1,
        "{csv}"
    );
    assert!(
        fe("req_rate_max").parse::<u64>().expect("req_rate_max") >= 1,
        "{csv}"
    );
    for svname in ["BACKEND", "a"] {
        let row = |name| stat_value(&csv, "api", svname, name);
        assert_eq!(row("stot"), "3", "{csv}");
        assert_eq!(row("hrsp_2xx"), "3");
        assert_eq!(
            row("hrsp_4xx"),
            "0",
            "the 404 was the proxy's, not the server's"
        );
        assert_eq!(
            row("bin"),
            upstream_got.to_string(),
            "request bytes sent upstream"
        );
        assert_eq!(
            row("bout"),
            (3 * UPSTREAM_ANSWER.len()).to_string(),
            "response bytes read from the upstream"
        );
        assert_eq!(row("smax"), "1", "one request at a time");
        assert!(
            row("rate_max").parse::<u64>().expect("rate_max") >= 1,
            "{csv}"
        );
        let last: i64 = row("lastsess").parse().expect("lastsess");
        assert!((0..60).contains(&last), "{csv}");
        assert!(
            row("rtime").parse::<u64>().is_ok()
                && row("ttime").parse::<u64>().is_ok()
                && row("ctime").parse::<u64>().is_ok(),
            "{csv}"
        );
    }
    assert_eq!((sv("act"), sv("bck")), ("1".into(), "0".into()));

    // The maxima start again; the totals stay.
    assert_eq!(cli(addr, "clear counters").await, "\n");
    let csv = cli(addr, "show stat").await;
    assert_eq!(
        stat_value(&csv, "web", "FRONTEND", "rate_max"),
        "0",
        "{csv}"
    );
    assert_eq!(stat_value(&csv, "web", "FRONTEND", "req_rate_max"), "0");
    assert_eq!(stat_value(&csv, "api", "a", "rate_max"), "0");
    assert_eq!(stat_value(&csv, "web", "FRONTEND", "req_tot"), "4");
    assert_eq!(
        stat_value(&csv, "api", "a", "bout"),
        (3 * UPSTREAM_ANSWER.len()).to_string()
    );

    // Every counter starts from zero, as after a restart.
    assert_eq!(cli(addr, "clear counters all").await, "\n");
    let csv = cli(addr, "show stat").await;
    for (px, sv) in [("web", "FRONTEND"), ("api", "BACKEND"), ("api", "a")] {
        for name in ["stot", "bin", "bout", "hrsp_2xx", "hrsp_4xx"] {
            assert_eq!(
                stat_value(&csv, px, sv, name),
                "0",
                "{px}/{sv} {name}\n{csv}"
            );
        }
    }
    assert_eq!(stat_value(&csv, "web", "FRONTEND", "req_tot"), "0");
    assert_eq!(stat_value(&csv, "api", "a", "lastsess"), "-1", "{csv}");

    // Counting goes on from there.
    let (status, _) = exchange(listener, request.as_bytes()).await;
    assert_eq!(status, "404");
    let csv = cli(addr, "show stat").await;
    assert_eq!(
        stat_value(&csv, "web", "FRONTEND", "hrsp_4xx"),
        "1",
        "{csv}"
    );
    assert_eq!(
        stat_value(&csv, "web", "FRONTEND", "bin"),
        request.len().to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stat_tells_connect_errors_and_aborts_apart() {
    // Nothing listens at `dead`; `cut` closes halfway through its body;
    // `flood` sends a body the client stops reading.
    let dead = free_addr();
    let cut = Recorder::start(|_| {
        Script::AnswerClose(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..".to_vec())
    })
    .await;
    let flood = Recorder::start(|_| {
        Script::Flood(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n".to_vec())
    })
    .await;
    let (cut_addr, flood_addr) = (cut.addr, flood.addr);
    let proxy = Proxy::start_with_args(
        || {
            let mut c = format!(
                "[[listeners]]\nname = \"web\"\nbind = \"{}\"\n",
                free_addr()
            );
            for (name, addr) in [("dead", dead), ("cut", cut_addr), ("flood", flood_addr)] {
                c += &format!(
                    "\n[services.{name}]\nendpoints = [{{ id = \"{name}1\", address = \"{addr}\" }}]\n\
                     \n[routes.{name}]\npath_prefix = \"/{name}\"\nservice = \"{name}\"\n"
                );
            }
            c
        },
        &[
            "--runtime-api",
            "127.0.0.1:0",
            "--admin-token",
            TOKEN,
            "--threads",
            "1",
        ],
    )
    .await;
    let addr = runtime_addr(&proxy);
    let listener = proxy.listener("web");
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: stats.test\r\nConnection: close\r\n\r\n")
    };

    let (status, _) = exchange(listener, get("/dead").as_bytes()).await;
    assert_eq!(status, "502");
    // The answer's head and its first ten bytes arrive, then the end is
    // cut (the proxy resets the client's connection).
    let mut s = TcpStream::connect(listener).await.expect("connect");
    s.write_all(get("/cut").as_bytes()).await.expect("send");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(STEP_DEADLINE, s.read_to_end(&mut sink)).await;
    // The client reads a little of an endless body, then goes away.
    let mut s = TcpStream::connect(listener).await.expect("connect");
    s.write_all(get("/flood").as_bytes()).await.expect("send");
    let mut some = [0u8; 4096];
    let n = s.read(&mut some).await.expect("read the answer's start");
    assert!(n > 0);
    drop(s);

    let field = |csv: &str, px: &str, sv: &str, name: &str| stat_value(csv, px, sv, name);
    wait_for(STEP_DEADLINE, "the client's abort is counted", || async {
        field(&cli(addr, "show stat").await, "flood", "flood1", "cli_abrt") == "1"
    })
    .await;
    let csv = cli(addr, "show stat").await;
    for sv in ["dead1", "BACKEND"] {
        let tries: u64 = field(&csv, "dead", sv, "econ").parse().expect("econ");
        assert!(tries >= 1, "every try's connect failed:\n{csv}");
        assert_eq!(field(&csv, "dead", sv, "eresp"), "0", "{csv}");
    }
    for sv in ["cut1", "BACKEND"] {
        assert_eq!(field(&csv, "cut", sv, "srv_abrt"), "1", "{csv}");
        assert_eq!(
            field(&csv, "cut", sv, "eresp"),
            "1",
            "an abort is a response error"
        );
        assert_eq!(field(&csv, "cut", sv, "cli_abrt"), "0");
        assert_eq!(field(&csv, "cut", sv, "econ"), "0");
    }
    assert_eq!(field(&csv, "flood", "BACKEND", "cli_abrt"), "1", "{csv}");
    assert_eq!(field(&csv, "flood", "flood1", "srv_abrt"), "0", "{csv}");
    // The proxy's 502 and the two 200s (one cut) went to the clients.
    assert_eq!(field(&csv, "web", "FRONTEND", "hrsp_5xx"), "1", "{csv}");
    assert_eq!(field(&csv, "web", "FRONTEND", "hrsp_2xx"), "2", "{csv}");
    assert_eq!(field(&csv, "web", "FRONTEND", "ereq"), "0", "{csv}");

    // Malformed requests: a head hyper cannot parse, and one that names
    // two hosts, which the proxy refuses.
    let (status, _) = exchange(listener, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(status, "400");
    let two_hosts =
        "GET /cut HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n";
    let (status, _) = exchange(listener, two_hosts.as_bytes()).await;
    assert_eq!(status, "400");
    let csv = cli(addr, "show stat").await;
    assert_eq!(field(&csv, "web", "FRONTEND", "ereq"), "2", "{csv}");
    assert_eq!(field(&csv, "web", "FRONTEND", "hrsp_4xx"), "2", "{csv}");
    assert_eq!(
        field(&csv, "cut", "cut1", "stot"),
        "1",
        "no refused request went upstream"
    );

    assert_eq!(cli(addr, "clear counters all").await, "\n");
    let csv = cli(addr, "show stat").await;
    assert_eq!(field(&csv, "dead", "dead1", "econ"), "0", "{csv}");
    assert_eq!(field(&csv, "cut", "cut1", "srv_abrt"), "0", "{csv}");
    assert_eq!(field(&csv, "flood", "flood1", "cli_abrt"), "0", "{csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_mode_keeps_the_connection_until_quit() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let proxy = Proxy::start_with_args(
        || two_servers(free_addr(), a, b),
        &["--runtime-api", "127.0.0.1:0", "--admin-token", TOKEN],
    )
    .await;
    let addr = runtime_addr(&proxy);

    // Through socat, as a person would pipe it.
    let out = run_with_input(
        "socat",
        &["stdio", &format!("tcp4-connect:{addr}")],
        "prompt\nget weight web/a\nshow backend\nquit\nget weight web/b\n",
    )
    .await;
    assert_eq!(out, "\n> 1 (initial 1)\n\n> # name\nweb\n\n> ");

    // Over a socket held open: the session waits for the next command.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"prompt\n").await.expect("send");
    assert_eq!(read_until(&mut s, "> ").await, "\n> ");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(format!("auth {TOKEN}; disable server web/b\n").as_bytes())
        .await
        .expect("send");
    assert_eq!(read_until(&mut s, "\n> \n> ").await, "\n> \n> ");
    s.write_all(b"get weight web/b; show stat web 4 2\n")
        .await
        .expect("send");
    let out = read_until(&mut s, "\n\n> ").await;
    assert!(out.starts_with("1 (initial 1)\n\n> # pxname,"), "{out}");
    assert!(out.contains("\nweb,b,0,0,0,0,,0,"), "{out}");
    assert!(out.contains(",MAINT,"), "{out}");
    s.write_all(b"quit\n").await.expect("send");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the connection closes after quit")
        .expect("read");
    assert!(rest.is_empty(), "{rest:?}");

    // Without prompt, one line is answered and the connection closed.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"get weight web/a\n").await.expect("send");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("closed after one answer")
        .expect("read");
    assert_eq!(String::from_utf8_lossy(&all), "1 (initial 1)\n\n");
}

/// Reads from `s` until what arrived ends with `end`.
async fn read_until(s: &mut TcpStream, end: &str) -> String {
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        while !got.ends_with(end.as_bytes()) {
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| panic!("no {end:?} within 5 s"));
    String::from_utf8_lossy(&got).into_owned()
}

// ---------------------------------------------------------------------------
// Who may change things over TCP

/// Sends `input` on a fresh TCP connection to `addr` and reads until the
/// proxy closes it.
async fn tcp_session(addr: SocketAddr, input: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(input).await.expect("send");
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("the proxy closes the connection")
        .expect("read");
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_listener_is_read_only_until_auth_with_the_admin_token() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("runtime.sock");
    let sock_arg = sock.to_str().expect("UTF-8 path").to_string();
    let proxy = Proxy::start_with_args(
        || two_servers(free_addr(), a, b),
        &[
            "--runtime-api",
            "127.0.0.1:0",
            "--admin-token",
            TOKEN,
            "--runtime-socket",
            &sock_arg,
        ],
    )
    .await;
    let addr = runtime_addr(&proxy);

    // Reads need nothing.
    assert_eq!(
        cli_as_is(addr, "get weight web/a").await,
        "1 (initial 1)\n\n"
    );
    assert!(cli_as_is(addr, "help").await.contains("auth <token>"));
    assert_eq!(cli_as_is(addr, "show backend").await, "# name\nweb\n\n");

    // A change without auth, and with a wrong token, is refused.
    let out = cli_as_is(addr, "disable server web/a").await;
    assert_eq!(
        out,
        "Permission denied: this listener is read-only; send \"auth <token>\" first (the admin token), or use the Unix socket (--runtime-socket).\n\n"
    );
    let out = tcp_session(
        addr,
        b"auth wrong; disable server web/a\ndisable server web/a\n",
    )
    .await;
    assert!(out.starts_with("Permission denied: wrong token"), "{out}");
    assert_eq!(
        out.lines().filter(|l| !l.is_empty()).count(),
        1,
        "closed after the refusal: {out}"
    );
    assert_eq!(status_of(addr, "web", "a").await, "no check");
    let c = client();
    assert_eq!(tally(&c, &proxy.url("/"), 10).await.len(), 2, "both serve");

    // With the token, on the same line as HAProxy allows: applied.
    assert_eq!(
        cli_as_is(addr, &format!("auth {TOKEN}; disable server web/a")).await,
        "\n\n"
    );
    assert_eq!(status_of(addr, "web", "a").await, "MAINT");
    assert_eq!(tally(&c, &proxy.url("/"), 10).await.get("b"), Some(&10));

    // A browser page posting to the port: the request line closes the
    // connection before its body is read as commands.
    let post = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: 40\r\n\r\nauth {TOKEN}; enable server web/a\n"
    );
    assert_eq!(tcp_session(addr, post.as_bytes()).await, "");
    assert_eq!(
        tcp_session(addr, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n").await,
        ""
    );
    assert_eq!(status_of(addr, "web", "a").await, "MAINT");
    assert!(
        proxy.stderr().contains("an HTTP request arrived"),
        "{}",
        proxy.stderr()
    );

    // The Unix socket takes changes without auth.
    assert_eq!(cli_unix(&sock, "enable server web/a").await, "\n");
    assert_eq!(status_of(addr, "web", "a").await, "no check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_the_tcp_listener_refuses_every_change() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let proxy = Proxy::start_with_args(
        || two_servers(free_addr(), a, b),
        &["--runtime-api", "127.0.0.1:0"],
    )
    .await;
    let addr = runtime_addr(&proxy);
    assert_eq!(
        cli_as_is(addr, "get weight web/a").await,
        "1 (initial 1)\n\n"
    );
    for line in ["set weight web/a 5", "auth guess; set weight web/a 5"] {
        let out = cli_as_is(addr, line).await;
        assert!(
            out.starts_with(
                "Permission denied: this listener is read-only and no admin token is configured"
            ),
            "{line}: {out}"
        );
    }
    assert_eq!(
        cli_as_is(addr, "get weight web/a").await,
        "1 (initial 1)\n\n"
    );
}

// ---------------------------------------------------------------------------
// The Unix socket

fn socket_mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `pointsman run` that must refuse to start; its stderr.
fn refused_start(config: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "run",
        "--config",
        config.to_str().expect("UTF-8 path"),
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let (code, _, stderr) = run_cli(&args);
    assert_eq!(
        code, 1,
        "pointsman {args:?} should refuse to start:\n{stderr}"
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_is_owner_only_replaces_stale_files_and_refuses_live_ones() {
    let ups = Upstream::start_many(&["a", "b"]).await;
    let (a, b) = (&ups[0], &ups[1]);
    let dir = tempfile::tempdir().expect("temp dir");
    let sock: PathBuf = dir.path().join("admin.sock");
    // A socket file left by a process that died.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind a stale socket"));
    assert!(sock.exists());

    let sock_arg = sock.to_str().expect("UTF-8 path").to_string();
    let proxy = Proxy::start_with_args(
        || two_servers(free_addr(), a, b),
        &["--runtime-socket", &sock_arg],
    )
    .await;
    assert_eq!(socket_mode(&sock), 0o600, "mode 0600");
    assert!(proxy
        .stderr()
        .contains("removed a stale runtime socket file"));
    assert_eq!(cli_unix(&sock, "show backend").await, "# name\nweb\n\n");
    assert_eq!(
        cli_unix(&sock, "disable server web/a; get weight web/a").await,
        "\n1 (initial 1)\n\n"
    );
    let c = client();
    assert_eq!(tally(&c, &proxy.url("/"), 6).await.get("b"), Some(&6));

    // A second proxy on the same path refuses to start.
    let err = refused_start(proxy.config_path(), &["--runtime-socket", &sock_arg]);
    assert!(err.contains("another process is serving on it"), "{err}");
    assert_eq!(
        cli_unix(&sock, "get weight web/b").await,
        "1 (initial 1)\n\n",
        "still served"
    );

    // A path that is not a socket is never replaced.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").expect("write");
    let err = refused_start(
        proxy.config_path(),
        &["--runtime-socket", file.to_str().expect("UTF-8")],
    );
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");

    // The TCP address must be loopback.
    let err = refused_start(proxy.config_path(), &["--runtime-api", "0.0.0.0:9999"]);
    assert!(err.contains("not a loopback address"), "{err}");

    // The socket file goes with the proxy.
    let mut proxy = proxy;
    sigterm(proxy.pid());
    wait_exit(
        proxy.child(),
        Duration::from_secs(10),
        "pointsman after SIGTERM",
    )
    .await;
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn run_help_lists_the_runtime_api_flags() {
    let (code, out, _) = run_cli(&["run", "--help"]);
    assert_eq!(code, 0);
    for flag in ["--runtime-socket <PATH>", "--runtime-api <ADDR>"] {
        assert!(
            out.contains(flag),
            "`pointsman run --help` mentions {flag}:\n{out}"
        );
    }
}
