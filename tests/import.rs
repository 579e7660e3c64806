//! End to end: `pointsman import` of an haproxy.cfg, then `pointsman run`
//! with the imported config in front of real upstreams, answering each
//! request from the upstream HAProxy would have picked. And what `check`
//! says of an haproxy.cfg and of a missing file.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::*;

/// The example config of seed 004, as the seed writes it.
const SEED_004: &str = include_str!("data/haproxy/seed-004.cfg");

/// `pointsman import <dir>/haproxy.cfg` of `cfg` (with `files` beside it);
/// the translated config. Panics unless the import succeeds.
fn import(dir: &Path, cfg: &str, files: &[(&str, &str)]) -> String {
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write haproxy.cfg");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write a map file");
    }
    let (code, out, err) = run_cli(&["import", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "pointsman import failed: {err}\n{out}");
    assert!(
        err.contains("pointsman import:"),
        "a summary on stderr: {err}"
    );
    out
}

#[test]
fn the_seed_config_imports_and_says_what_it_lacks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = import(dir.path(), SEED_004, &[]);
    for want in [
        "bind = \"0.0.0.0:80\"",
        "mode = \"http\"",
        "default_service = \"web-backend\"",
        "path_prefix = \"/blog\"\nservice = \"jms-backend\"",
        "{ id = \"web1\", address = \"web1.yourdomain.com:9001\" }",
        "[services.web_jms]",
        // The seed's frontend names backends its backends are not called.
        "haproxy.cfg:20: use_backend jms-backend if url_blog -- partly translated: there is no backend \"jms-backend\"",
    ] {
        assert!(out.contains(want), "the import has {want:?}:\n{out}");
    }
    // What it prints is a config pointsman takes.
    let toml = dir.path().join("pointsman.toml");
    std::fs::write(&toml, &out).expect("write");
    let (code, stdout, err) = run_cli(&["check", "--config", toml.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("1 listeners, 2 services, 1 routes"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_config_serves_blog_from_jms_and_the_rest_from_web() {
    let ups = Upstream::start_many(&["web1", "web2", "jms1", "jms2"]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // The seed's servers are these upstreams; its frontend's backends are
    // given the names its backends have, as its text means them
    // (/blog to the JMS servers, the rest to the web servers).
    let cfg = |listen: SocketAddr| {
        let mut cfg = SEED_004
            .replace("*:80", &format!("*:{}", listen.port()))
            .replace("jms-backend", "web_jms")
            .replace("web-backend", "web_server");
        for u in &ups {
            cfg = cfg.replace(
                &format!("{}.yourdomain.com:9001", u.name),
                &u.addr.to_string(),
            );
        }
        import(dir.path(), &cfg, &[])
    };
    let proxy = Proxy::start(|| cfg(free_addr())).await;
    let client = client();
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", proxy.addr().port());
    // The servers have `check`: they take traffic after their first check.
    for (service, id) in [
        ("web_server", "web1"),
        ("web_server", "web2"),
        ("web_jms", "jms1"),
        ("web_jms", "jms2"),
    ] {
        wait_for(
            Duration::from_secs(15),
            &format!("{service}/{id} is healthy"),
            || {
                let proxy = &proxy;
                async move { proxy.endpoint(service, id).await["healthy"] == true }
            },
        )
        .await;
    }
    let mut blog = std::collections::BTreeSet::new();
    let mut rest = std::collections::BTreeSet::new();
    for _ in 0..8 {
        blog.insert(server_of(&client, &url("/blog/2024/haproxy"), &[]).await);
        rest.insert(server_of(&client, &url("/about"), &[]).await);
    }
    let set = |s: &[&str]| {
        s.iter()
            .map(|s| s.to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(
        blog,
        set(&["jms1", "jms2"]),
        "path_beg /blog goes round robin to web_jms"
    );
    assert_eq!(
        rest,
        set(&["web1", "web2"]),
        "the rest goes to the default_backend"
    );
}

const ROUTED: &str = "\
global
    maxconn 1000
    log /dev/log local0

defaults
    mode http
    timeout connect 2s
    timeout server 10s
    timeout client 30s
    retries 2
    option redispatch

frontend www
    bind ipv4@127.0.0.1:LISTEN
    acl is_api   path_beg /api
    acl is_admin hdr(host) -i admin.example.com
    acl is_shop  hdr_dom(host) -i shop.example
    http-request set-header X-From haproxy
    use_backend api if is_api
    use_backend admin if is_admin
    use_backend shop if is_shop
    use_backend %[req.hdr(host),lower,map(hosts.map,web)]

backend api
    balance leastconn
    server api1 API

backend admin
    server admin1 ADMIN check

backend shop
    cookie SERVERID insert indirect nocache
    server shop1 SHOP check

backend web
    server web1 WEB

backend blue
    server blue1 BLUE

backend green
    server green1 GREEN
    server green-spare SPARE backup
";

const HOSTS_MAP: &str = "# host -> backend\nblue.example blue\ngreen.example green\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_and_map_routing_picks_the_upstreams_haproxy_would() {
    let names = ["api", "admin", "shop", "web", "blue", "green", "spare"];
    let ups = Upstream::start_many(&names).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = |listen: SocketAddr| {
        let mut cfg = ROUTED.replace("LISTEN", &listen.port().to_string());
        for u in &ups {
            cfg = cfg.replace(
                &format!(" {}\n", u.name.to_uppercase()),
                &format!(" {}\n", u.addr),
            );
            cfg = cfg.replace(
                &format!(" {} ", u.name.to_uppercase()),
                &format!(" {} ", u.addr),
            );
        }
        import(dir.path(), &cfg, &[("hosts.map", HOSTS_MAP)])
    };
    let imported = cfg(free_addr());
    for want in [
        "map = \"hosts\"\nmap_key = \"req.host\"\nmap_default = \"web\"",
        "blue.example\" = \"blue\"",
        "http-request set-header X-From haproxy -- not translated",
        "id = \"green-spare\"",
        "backup = true",
        "retry = { attempts = 3 }",
        "max_connections = 1000",
        "sticky = \"cookie\"\ncookie = { name = \"SERVERID\", mode = \"insert\" }",
    ] {
        assert!(
            imported.contains(want),
            "the import has {want:?}:\n{imported}"
        );
    }
    let proxy = Proxy::start(|| cfg(free_addr())).await;
    let client = client();
    let url = |path: &str| proxy.url(path);
    for (service, id) in [("admin", "admin1"), ("shop", "shop1")] {
        wait_for(
            Duration::from_secs(15),
            &format!("{service}/{id} is healthy"),
            || {
                let proxy = &proxy;
                async move { proxy.endpoint(service, id).await["healthy"] == true }
            },
        )
        .await;
    }
    // (Host, path, the upstream HAProxy's rules pick)
    let cases = [
        ("admin.example.com", "/x", "admin"),
        // use_backend api comes first: it takes /api on every host.
        ("admin.example.com", "/api/users", "api"),
        ("shop.example", "/", "shop"),
        ("www.shop.example", "/cart", "shop"),
        ("www.shop.example", "/api/cart", "api"),
        ("blue.example", "/", "blue"),
        ("green.example", "/page", "green"),
        ("blue.example", "/api", "api"),
        ("other.example", "/", "web"),
        ("ADMIN.example.com", "/", "admin"),
    ];
    for (host, path, want) in cases {
        let got = server_of(&client, &url(path), &[("Host", host)]).await;
        assert_eq!(got, want, "Host {host}, path {path}");
    }
    // The backup server takes nothing: green1 answers every time.
    for _ in 0..6 {
        assert_eq!(
            server_of(&client, &url("/"), &[("Host", "green.example")]).await,
            "green"
        );
    }
}

#[test]
fn check_of_an_haproxy_cfg_says_to_import_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, SEED_004).expect("write");
    let shown = path.display().to_string();
    let (code, out, err) = run_cli(&["check", "--config", &shown]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("is an HAProxy config") && err.contains(&format!("pointsman import {shown}")),
        "check says to import it: {err}"
    );
    assert!(
        !err.contains("TOML") && !err.contains("expected"),
        "and no TOML error: {err}"
    );
}

#[test]
fn a_missing_file_says_why_once() {
    for args in [
        &["check", "--config", "/nonexistent/pointsman.toml"][..],
        &["import", "/nonexistent/haproxy.cfg"][..],
    ] {
        let (code, _, err) = run_cli(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(
            err.matches("No such file or directory").count(),
            1,
            "{args:?} says why once: {err}"
        );
        assert!(
            err.contains("/nonexistent/"),
            "{args:?} names the file: {err}"
        );
    }
}

#[test]
fn import_writes_output_and_the_config_binds_star_port() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, "frontend fe\n  mode http\n  bind *:8080\n  default_backend be\nbackend be\n  server a 127.0.0.1:9001\n")
        .expect("write");
    let out = dir.path().join("pointsman.toml");
    let (code, stdout, err) = run_cli(&[
        "import",
        cfg.to_str().expect("utf-8"),
        "--output",
        out.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.is_empty(), "the config goes to --output: {stdout}");
    let written = std::fs::read_to_string(&out).expect("the output file");
    assert!(written.contains("bind = \"0.0.0.0:8080\""), "{written}");
    // pointsman's own config takes HAProxy's *:PORT too.
    let own = dir.path().join("own.toml");
    std::fs::write(&own, written.replace("0.0.0.0:8080", "*:8080")).expect("write");
    let (code, stdout, err) = run_cli(&["check", "--config", own.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("ok"), "{stdout}");
}
