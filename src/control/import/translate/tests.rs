use std::path::Path;

use super::*;
use crate::control::config::{Config, ListenerMode};
use crate::control::import::parse::parse;
use crate::engine::sticky::{CookieMode, StickyCookie};

/// Translates `cfg` with the map files given, and parses the result.
fn import(cfg: &str, maps: &[(&str, &str)]) -> (Translation, Config) {
    let read = |file: &str| {
        maps.iter()
            .find(|(f, _)| *f == file)
            .map(|(f, text)| MapFile {
                shown: f.to_string(),
                text: text.to_string(),
            })
    };
    let t = translate("haproxy.cfg", &parse(cfg), &read);
    let c = Config::parse("out.toml", &t.toml)
        .unwrap_or_else(|e| panic!("{e}\n--- translated:\n{}", t.toml));
    (t, c)
}

fn has_note(t: &Translation, line: usize, kind: NoteKind, why: &str) -> bool {
    t.notes
        .iter()
        .any(|n| n.line == line && n.kind == kind && n.why.contains(why))
}

#[test]
fn the_seed_frontend_and_backends_translate() {
    let cfg = "\
backend web_server
\tbalance roundrobin
\tserver web1 web1.yourdomain.com:9001 check
\tserver web2 web2.yourdomain.com:9001 check

backend web_jms
\tbalance roundrobin
\tmode http
\tserver jms1 jms1.yourdomain.com:9001 check
\tserver jms2 jms2.yourdomain.com:9001 check

frontend http                            #configures frontend named http
\tbind *:80\t\t\t #which handles all incoming traffic on port 80 (*:80)
\tmode http
\tacl url_blog path_beg /blog
\tuse_backend web_jms if url_blog
\tdefault_backend web_server
";
    let (t, c) = import(cfg, &[]);
    assert!(t.notes.is_empty(), "{:?}", t.notes);
    assert_eq!(c.listeners.len(), 1);
    let l = &c.listeners[0];
    assert_eq!(
        (
            l.name.as_str(),
            l.bind.to_string(),
            l.mode,
            l.default_service.as_deref()
        ),
        (
            "http",
            "0.0.0.0:80".into(),
            ListenerMode::Http,
            Some("web_server")
        )
    );
    let jms = &c.services["web_jms"];
    assert_eq!(jms.endpoints.len(), 2);
    assert_eq!(
        jms.endpoints[0].address.to_string(),
        "jms1.yourdomain.com:9001"
    );
    let check = jms.check.as_ref().expect("a check");
    assert_eq!(check.http, None, "a TCP check, as HAProxy's `check` alone");
    assert_eq!(c.routes.len(), 1);
    let r = &c.routes["http-1"];
    assert_eq!(
        (r.path_prefix.as_str(), r.service.as_deref()),
        ("/blog", Some("web_jms"))
    );
}

#[test]
fn defaults_apply_to_the_sections_after_them() {
    let cfg = "\
global
    maxconn 4000
    log /dev/log local0
defaults
    mode http
    timeout connect 5s
    timeout client 50s
    timeout server 30s
    timeout http-request 10s
    retries 2
    option redispatch
    option httpchk GET /healthz HTTP/1.1\\r\\nHost:\\ app.local
    http-check expect status 200
frontend fe
    bind :8080
    default_backend app
backend app
    timeout server 5s
    server a 10.0.0.1:80 check inter 3s rise 1 fall 2
backend other
    server b 10.0.0.2:80
defaults
    timeout connect 1s
backend late
    server c 10.0.0.3:80
";
    let (t, c) = import(cfg, &[]);
    assert_eq!(c.global.max_connections, 4000);
    assert_eq!(c.global.idle_timeout, Duration::from_secs(50));
    assert_eq!(c.global.header_read_timeout, Duration::from_secs(10));
    let app = &c.services["app"];
    assert_eq!(
        app.connect_timeout.map(|d| d.0),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        app.request_timeout.map(|d| d.0),
        Some(Duration::from_secs(5))
    );
    assert_eq!(app.retry.attempts, 3);
    let check = app.check.as_ref().expect("check");
    assert_eq!(check.http.as_deref(), Some("/healthz"));
    assert_eq!(check.host.as_deref(), Some("app.local"));
    assert_eq!(check.expect_status, (200, 200));
    assert_eq!(
        (check.interval, check.rise, check.fall),
        (Duration::from_secs(3), 1, 2)
    );
    assert_eq!(
        c.services["other"].request_timeout.map(|d| d.0),
        Some(Duration::from_secs(30))
    );
    assert!(c.services["other"].check.is_none(), "no server has `check`");
    // The second defaults section starts afresh.
    let late = &c.services["late"];
    assert_eq!(
        late.connect_timeout.map(|d| d.0),
        Some(Duration::from_secs(1))
    );
    assert_eq!(late.request_timeout, None);
    assert_eq!(late.retry.attempts, 3, "pointsman's default");
    assert!(has_note(&t, 3, NoteKind::NotTranslated, "logs to stderr"));
    assert!(has_note(&t, 11, NoteKind::BuiltIn, "another endpoint"));
    assert!(
        t.toml
            .contains("# haproxy.cfg:11: option redispatch -- built in:"),
        "{}",
        t.toml
    );
}

#[test]
fn what_pointsman_lacks_is_said_line_by_line() {
    let cfg = "\
frontend fe
    mode http
    bind *:443 ssl crt /etc/ssl/site.pem
    bind *:80
    http-request redirect scheme https unless { ssl_fc }
    timeout queue 5s
backend be
    cookie SRV prefix
    server a 10.0.0.1:80 check port 8080 cookie a1
    server b 10.0.0.2:80 backup
    server c 10.0.0.3:80 disabled weight 300
    server d unix@/run/d.sock
";
    let (t, c) = import(cfg, &[]);
    assert!(has_note(
        &t,
        3,
        NoteKind::NotTranslated,
        "does not terminate TLS"
    ));
    assert_eq!(c.listeners.len(), 1, "only the plain bind");
    assert!(has_note(
        &t,
        5,
        NoteKind::NotTranslated,
        "no request or response rules"
    ));
    assert!(has_note(&t, 6, NoteKind::NotTranslated, "no queue"));
    assert_eq!(
        c.services["be"].sticky_cookie(),
        Some(StickyCookie {
            name: "SRV".into(),
            mode: CookieMode::Prefix
        }),
        "`cookie SRV prefix` translates, with the backend's balance"
    );
    assert_eq!(c.services["be"].balance.as_str(), "roundrobin");
    assert!(!t.notes.iter().any(|n| n.line == 8), "{:?}", t.notes);
    assert!(has_note(&t, 9, NoteKind::Partly, "`cookie a1`"));
    assert!(has_note(&t, 11, NoteKind::Partly, "weight 300"));
    assert!(has_note(&t, 12, NoteKind::NotTranslated, "over TCP only"));
    let be = &c.services["be"];
    let states: Vec<_> = be
        .endpoints
        .iter()
        .map(|e| (e.id.as_str(), e.state.as_str()))
        .collect();
    assert_eq!(states, [("a", "ready"), ("b", "ready"), ("c", "maint")]);
    let backups: Vec<_> = be.endpoints.iter().map(|e| e.backup).collect();
    assert_eq!(backups, [false, true, false], "b is a backup");
    let check = be.check.as_ref().expect("a check");
    assert_eq!(check.port, Some(8080), "the server's check port");
    assert!(t.toml.contains("# haproxy.cfg:3: bind *:443 ssl crt /etc/ssl/site.pem -- not translated: pointsman does not terminate TLS"), "{}", t.toml);
}

#[test]
fn host_and_path_acls_become_routes_in_haproxy_order() {
    let cfg = "\
frontend fe
    mode http
    bind 127.0.0.1:8080
    acl is_api path_beg /api
    acl is_www hdr(host) -i www.example.com example.com
    acl is_shop hdr_dom(host) -i shop.example
    acl is_exact path /exact
    use_backend api if is_api
    use_backend www if is_www
    use_backend shop if is_shop !is_api
    use_backend nope if is_exact
    default_backend web
backend api
backend www
backend shop
backend web
";
    let (t, c) = import(cfg, &[]);
    assert!(has_note(&t, 7, NoteKind::NotTranslated, "exact path"));
    assert!(has_note(&t, 11, NoteKind::NotTranslated, "rules after it"));
    let mut seen: Vec<(Option<&str>, &str, &str)> = c
        .routes
        .values()
        .map(|r| {
            (
                r.host.as_deref(),
                r.path_prefix.as_str(),
                r.service.as_deref().unwrap_or(""),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (None, "/api", "api"),
            (Some("*.shop.example"), "/", "shop"),
            // The first rule takes /api on every host, shop's included.
            (Some("*.shop.example"), "/api", "api"),
            (Some("example.com"), "/", "www"),
            (Some("example.com"), "/api", "api"),
            (Some("shop.example"), "/", "shop"),
            (Some("shop.example"), "/api", "api"),
            (Some("www.example.com"), "/", "www"),
            (Some("www.example.com"), "/api", "api"),
        ]
    );
}

#[test]
fn a_map_lookup_becomes_a_map_route_with_its_entries() {
    let cfg = "\
frontend fe
    mode http
    bind 127.0.0.1:8080
    use_backend %[req.hdr(host),lower,map(/etc/haproxy/hosts.map,web)]
backend web
backend blue
backend green
frontend static
    mode http
    bind 127.0.0.1:8081
    use_backend %[str(STATIC),map(/etc/haproxy/missing.map)]
    default_backend web
";
    let (t, c) = import(
        cfg,
        &[(
            "/etc/haproxy/hosts.map",
            "# comment\nblue.example blue\ngreen.example   green\n",
        )],
    );
    let hosts = &c.maps["hosts"];
    assert_eq!(hosts.get("blue.example").map(String::as_str), Some("blue"));
    assert_eq!(
        hosts.get("green.example").map(String::as_str),
        Some("green")
    );
    let r = &c.routes["fe-1"];
    assert_eq!(
        (
            r.map.as_deref(),
            r.map_key.as_deref(),
            r.map_default.as_deref()
        ),
        (Some("hosts"), Some("req.host"), Some("web"))
    );
    let r = &c.routes["static-1"];
    assert_eq!(
        (
            r.map.as_deref(),
            r.map_key.as_deref(),
            r.map_default.as_deref()
        ),
        (Some("missing"), Some("STATIC"), Some("web")),
        "no default in map(): the default_backend after it"
    );
    assert!(c.maps["missing"].is_empty());
    assert!(
        t.toml.contains("/etc/haproxy/missing.map was not found"),
        "{}",
        t.toml
    );
    assert!(has_note(&t, 11, NoteKind::Partly, "one routing table"));
}

#[test]
fn global_stats_socket_becomes_the_runtime_api() {
    let cfg = "global\n    stats socket /run/haproxy/admin.sock mode 660 level admin\n    stats socket ipv4@127.0.0.1:9999 level admin\n    hard-stop-after 30s\n    nbthread 4\n";
    let (t, c) = import(cfg, &[]);
    assert_eq!(
        c.global.runtime_socket.as_deref(),
        Some(Path::new("/run/haproxy/admin.sock"))
    );
    assert_eq!(
        c.global.runtime_api.map(|a| a.to_string()),
        Some("127.0.0.1:9999".into())
    );
    assert_eq!(c.global.drain_timeout, Duration::from_secs(30));
    assert!(has_note(&t, 5, NoteKind::NotTranslated, "--threads 4"));
}

#[test]
fn tcp_frontends_and_cookies() {
    let cfg = "\
defaults
    mode tcp
listen db
    bind 127.0.0.1:5433
    balance leastconn
    server pg1 10.0.0.1:5432 check
frontend broken
    bind 127.0.0.1:5434
backend shop
    mode http
    balance roundrobin
    cookie SERVERID insert indirect nocache
    server s1 10.0.0.1:80 check
backend api
    mode http
    balance leastconn
    cookie SRV rewrite
    server a1 10.0.0.2:80
backend old
    mode http
    cookie SRV
    server o1 10.0.0.3:80
";
    let (t, c) = import(cfg, &[]);
    let db = c
        .listeners
        .iter()
        .find(|l| l.name == "db")
        .expect("listener db");
    assert_eq!(
        (db.mode, db.default_service.as_deref()),
        (ListenerMode::Tcp, Some("db"))
    );
    assert_eq!(c.services["db"].balance.as_str(), "leastconn");
    assert!(has_note(
        &t,
        7,
        NoteKind::NotTranslated,
        "needs a default_backend"
    ));
    let sticky = |name: &str, mode| {
        Some(StickyCookie {
            name: name.into(),
            mode,
        })
    };
    assert_eq!(c.services["shop"].balance.as_str(), "roundrobin");
    assert_eq!(
        c.services["shop"].sticky_cookie(),
        sticky("SERVERID", CookieMode::Insert)
    );
    assert!(has_note(&t, 12, NoteKind::Partly, "nocache not translated"));
    assert!(
        !has_note(&t, 12, NoteKind::Partly, "indirect"),
        "pointsman's insert is indirect"
    );
    assert_eq!(c.services["api"].balance.as_str(), "leastconn", "kept");
    assert_eq!(
        c.services["api"].sticky_cookie(),
        sticky("SRV", CookieMode::Rewrite)
    );
    assert!(has_note(&t, 21, NoteKind::NotTranslated, "needs a mode"));
    assert_eq!(c.services["old"].sticky_cookie(), None);
}

#[test]
fn a_backend_that_is_not_defined_is_said() {
    let cfg = "frontend http\n  mode http\n  bind *:80\n  default_backend web-backend\n";
    let (t, c) = import(cfg, &[]);
    assert_eq!(
        c.listeners[0].default_service.as_deref(),
        Some("web-backend")
    );
    assert!(has_note(
        &t,
        4,
        NoteKind::Partly,
        "no backend \"web-backend\" in this file"
    ));
}

#[test]
fn odd_lines_are_noted_and_the_output_still_parses() {
    let cfg = "\
frontend fe
    mode http
    bind 127.0.0.1:8080
    acl
    acl bad hdr(host) *.example.com
    acl \"open
    use_backend be if bad
    use_backend %[req.hdr(a;b),map(x.map)]
    default_backend be
backend be
    cookie
    option httpchk HEAD http://example.com/
    server a 10.0.0.1:80 check inter 0
    server a 10.0.0.2:80
backend be
    server b 10.0.0.3:80
";
    let (t, c) = import(cfg, &[]);
    assert!(has_note(&t, 4, NoteKind::NotTranslated, "needs a name"));
    assert!(has_note(&t, 5, NoteKind::NotTranslated, "not a host name"));
    assert!(has_note(&t, 6, NoteKind::NotTranslated, "not closed"));
    assert!(has_note(&t, 7, NoteKind::NotTranslated, "rules after it"));
    assert!(has_note(
        &t,
        8,
        NoteKind::NotTranslated,
        "not a header name"
    ));
    assert!(has_note(&t, 11, NoteKind::NotTranslated, "insert"));
    assert!(has_note(&t, 12, NoteKind::NotTranslated, "not a path"));
    assert!(has_note(&t, 13, NoteKind::Partly, "`inter 0`"));
    assert!(has_note(&t, 14, NoteKind::NotTranslated, "a second server"));
    assert!(has_note(
        &t,
        15,
        NoteKind::NotTranslated,
        "a second backend"
    ));
    assert!(c.routes.is_empty());
    assert_eq!(c.services["be"].endpoints.len(), 1);
}

#[test]
fn a_stats_section_is_not_a_listener() {
    let cfg = "listen stats\n    bind *:8404\n    mode http\n    stats enable\n    stats uri /stats\n    stats refresh 10s\n";
    let (t, c) = import(cfg, &[]);
    assert!(c.listeners.is_empty() && c.services.is_empty());
    assert!(has_note(
        &t,
        1,
        NoteKind::NotTranslated,
        "/stats on its admin listener"
    ));
    assert!(has_note(&t, 6, NoteKind::NotTranslated, "stats page"));
}
