use std::time::Duration;

use super::*;
use crate::{RouteTarget, SplitSpec};

fn p() -> Prefixes {
    Prefixes::default()
}

fn ok(key: &str, value: &str) -> Entry {
    match parse_entry(&p(), key, value.as_bytes()) {
        Ok(Some(e)) => e,
        other => panic!("{key} = {value:?}: expected an entry, got {other:?}"),
    }
}

fn err(key: &str, value: &str) -> String {
    match parse_entry(&p(), key, value.as_bytes()) {
        Err(e) => {
            assert_eq!(e.key(), key);
            e.to_string()
        }
        other => panic!("{key} = {value:?}: expected an error, got {other:?}"),
    }
}

fn ignored(key: &str) {
    assert_eq!(parse_entry(&p(), key, b"whatever"), Ok(None), "{key}");
    assert_eq!(parse_key(&p(), key), None, "{key}");
}

#[test]
fn registrator_style_address() {
    let e = ok("/services/web/a1", "  10.0.0.5:8080\n");
    assert_eq!(
        e,
        Entry::Instance(Registration::new(
            "web",
            "a1",
            Address::new("10.0.0.5", 8080)
        ))
    );
    // Registrator ids carry colons.
    let e = ok("/services/web/host1:web-1:8080", "app:80");
    assert_eq!(
        e.key(),
        EntryKey::Instance {
            service: "web".into(),
            id: "host1:web-1:8080".into()
        }
    );
}

#[test]
fn bad_address_names_key_and_fix() {
    let msg = err("/services/web/a1", "x");
    assert!(
        msg.starts_with("/services/web/a1: address \"x\" has no port: expected host:port"),
        "{msg}"
    );
    assert!(err("/services/web/a1", "h:0").contains("invalid port"));
    let msg = err("/services/web/a1", r#"{"address":"h"}"#);
    assert!(msg.contains("has no port"), "{msg}");
}

#[test]
fn empty_and_binary_values() {
    let msg = err("/services/web/a1", "  \n");
    assert!(msg.contains("value is empty: expected host:port"), "{msg}");
    let e = parse_entry(&p(), "/services/web/a1", &[0xff, 0xfe]).unwrap_err();
    assert!(matches!(e, ParseError::NotUtf8 { .. }), "{e}");
    assert!(e.to_string().contains("not UTF-8"));
}

#[test]
fn json_registration_with_every_field() {
    let e = ok(
        "/services/web/a1",
        r#"{"address":"10.0.0.5:8080","weight":100,"state":"drain",
            "tags":["green"],"meta":{"version":"2"},
            "check":{"http":"/healthz","interval":"500ms","rise":1}}"#,
    );
    let Entry::Instance(r) = e else {
        panic!("not an instance: {e:?}")
    };
    assert_eq!(r.service, "web");
    assert_eq!(r.id, "a1");
    assert_eq!(r.address, Address::new("10.0.0.5", 8080));
    assert_eq!(r.weight, 100);
    assert_eq!(r.state, AdminState::Drain);
    assert_eq!(r.tags, vec!["green".to_string()]);
    assert_eq!(r.meta.get("version").map(String::as_str), Some("2"));
    let check = r.check.expect("check");
    assert_eq!(check.http.as_deref(), Some("/healthz"));
    assert_eq!(check.interval, Duration::from_millis(500));
    assert_eq!(check.rise, 1);
    assert_eq!(check.fall, 3);
    assert_eq!(check.method, "GET");
}

/// A check on another host and/or port than the instance serves on.
#[test]
fn a_check_goes_to_its_own_address_and_port_when_it_names_them() {
    let target = |check: &str| {
        let json = format!(r#"{{"address":"10.0.0.5:8080","check":{check}}}"#);
        let Entry::Instance(r) = ok("/services/web/a1", &json) else {
            panic!("not an instance")
        };
        r.check.expect("check").target(&r.address)
    };
    assert_eq!(target("{}"), Address::new("10.0.0.5", 8080));
    assert_eq!(target(r#"{"port":9000}"#), Address::new("10.0.0.5", 9000));
    assert_eq!(
        target(r#"{"address":"10.1.0.5"}"#),
        Address::new("10.1.0.5", 8080)
    );
    assert_eq!(
        target(r#"{"address":"::1","port":9000}"#),
        Address::new("::1", 9000)
    );
}

#[test]
fn json_registration_defaults() {
    let Entry::Instance(r) = ok("/services/web/a1", r#" {"address":"[::1]:80"} "#) else {
        panic!("not an instance")
    };
    assert_eq!(r.weight, 1);
    assert_eq!(r.state, AdminState::Ready);
    assert!(r.tags.is_empty() && r.meta.is_empty() && r.check.is_none());
    let Entry::Instance(r) = ok("/services/web/a1", r#"{"address":"h:1","weight":0}"#) else {
        panic!("not an instance")
    };
    assert_eq!(r.weight, 0);
    let Entry::Instance(r) = ok("/services/web/a1", r#"{"address":"h:1","weight":256}"#) else {
        panic!("not an instance")
    };
    assert_eq!(r.weight, 256);
}

#[test]
fn json_registration_errors() {
    let msg = err("/services/web/a1", r#"{"address":"h:1","wieght":3}"#);
    assert!(msg.contains("unknown field `wieght`"), "{msg}");
    assert!(
        msg.starts_with("/services/web/a1: invalid registration JSON"),
        "{msg}"
    );

    let msg = err("/services/web/a1", r#"{"address":"h:1","weight":257}"#);
    assert_eq!(
        msg,
        "/services/web/a1: weight 257 is out of range: expected 0 to 256"
    );
    let msg = err("/services/web/a1", r#"{"address":"h:1","weight":-1}"#);
    assert!(msg.contains("invalid registration JSON"), "{msg}");

    let msg = err("/services/web/a1", r#"{"address":"h:1","state":"down"}"#);
    assert!(msg.contains("unknown variant `down`"), "{msg}");

    let msg = err("/services/web/a1", r#"{"weight":3}"#);
    assert!(msg.contains("missing field `address`"), "{msg}");

    let msg = err("/services/web/a1", r#"{"address":"h:1""#);
    assert!(msg.contains("invalid registration JSON"), "{msg}");

    let msg = err("/services/web/a1", r#"{"address":"h:1","meta":{"v":2}}"#);
    assert!(msg.contains("expected a string"), "{msg}");

    let msg = err(
        "/services/web/a1",
        r#"{"address":"h:1","check":{"http":"/","every":"1s"}}"#,
    );
    assert!(msg.contains("unknown field `every`"), "{msg}");

    let msg = err(
        "/services/web/a1",
        r#"{"address":"h:1","check":{"http":"healthz"}}"#,
    );
    assert!(msg.contains("must be a path starting with '/'"), "{msg}");

    let msg = err(
        "/services/web/a1",
        r#"{"address":"h:1","check":{"address":"10.0.0.9:8080"}}"#,
    );
    assert!(
        msg.contains("check.address \"10.0.0.9:8080\" is not a host"),
        "{msg}"
    );

    let msg = err(
        "/services/web/a1",
        r#"{"address":"h:1","check":{"interval":"0s"}}"#,
    );
    assert!(msg.contains("check.interval is 0"), "{msg}");

    let msg = err(
        "/services/web/a1",
        r#"{"address":"h:1","check":{"rise":0}}"#,
    );
    assert!(msg.contains("at least 1"), "{msg}");

    let msg = err(
        "/services/web/a1",
        r#"{"address":"h:1","check":{"expect_status":[400,200]}}"#,
    );
    assert!(msg.contains("not a status range"), "{msg}");
}

#[test]
fn malformed_service_keys() {
    let msg = err("/services/web", "h:1");
    assert!(
        msg.contains("directly under the services root") && msg.contains("--flat-keys"),
        "{msg}"
    );
    let msg = err("/services//a1", "h:1");
    assert!(msg.contains("service is empty"), "{msg}");
    let msg = err("/services/web/a1/extra", "h:1");
    assert!(msg.contains("must not contain '/'"), "{msg}");
    let msg = err("/services/web/a 1", "h:1");
    assert!(msg.contains("whitespace"), "{msg}");
    // Deletes of malformed keys remove nothing.
    assert_eq!(parse_key(&p(), "/services/web"), None);
}

#[test]
fn ignored_keys() {
    ignored("/other/web/a1");
    ignored("/servicesX/web/a1");
    ignored("/services");
    ignored("/services/");
    ignored("/services/web/");
    ignored("/services/web/a1/");
    ignored("/pointsman");
    ignored("/pointsman/");
    ignored("/pointsman/routes");
    ignored("/pointsman/routes/");
    ignored("/pointsman/maps/");
    ignored("/pointsman/maps/colour/");
    ignored("/pointsman/overrides/");
    ignored("/pointsman/overrides/web/");
    ignored("/pointsman/proxies/p1");
    ignored("/pointsman/rollouts/web/42");
}

#[test]
fn routes() {
    let e = ok(
        "/pointsman/routes/blog",
        r#"{"host":"example.com","path_prefix":"/blog","service":"blog"}"#,
    );
    let Entry::Route { name, spec } = e else {
        panic!("not a route")
    };
    assert_eq!(name, "blog");
    assert_eq!(spec.target(), Ok(RouteTarget::Service("blog".into())));

    let Entry::Route { spec, .. } = ok(
        "/pointsman/routes/canary",
        r#"{"split":[{"service":"a","weight":90},{"service":"b","weight":10}]}"#,
    ) else {
        panic!("not a route")
    };
    assert_eq!(spec.path_prefix, "/");
    assert_eq!(
        spec.split,
        vec![
            SplitSpec {
                service: "a".into(),
                weight: 90
            },
            SplitSpec {
                service: "b".into(),
                weight: 10
            }
        ]
    );

    let msg = err("/pointsman/routes/blog", r#"{"path_prefix":"/blog"}"#);
    assert!(msg.contains("exactly one target"), "{msg}");
    let msg = err(
        "/pointsman/routes/blog",
        r#"{"service":"b","path_prefix":"blog"}"#,
    );
    assert!(msg.contains("must start with '/'"), "{msg}");
    let msg = err("/pointsman/routes/blog", r#"{"service":"b","hots":"x"}"#);
    assert!(
        msg.contains("invalid route JSON") && msg.contains("unknown field `hots`"),
        "{msg}"
    );
    let msg = err("/pointsman/routes/blog", "blog");
    assert!(msg.contains("invalid route JSON"), "{msg}");
    let msg = err("/pointsman/routes/a/b", r#"{"service":"b"}"#);
    assert!(msg.contains("route name must not contain '/'"), "{msg}");
    assert_eq!(
        parse_key(&p(), "/pointsman/routes/blog"),
        Some(EntryKey::Route {
            name: "blog".into()
        })
    );
}

#[test]
fn maps() {
    assert_eq!(
        ok("/pointsman/maps/colour/www.example.com", " green\n"),
        Entry::MapEntry {
            map: "colour".into(),
            key: "www.example.com".into(),
            value: "green".into()
        }
    );
    // Keys may be paths.
    assert_eq!(
        parse_key(&p(), "/pointsman/maps/bypath//blog/x"),
        Some(EntryKey::MapEntry {
            map: "bypath".into(),
            key: "/blog/x".into()
        })
    );
    let msg = err("/pointsman/maps/colour", "green");
    assert!(msg.contains("map \"colour\" has no key"), "{msg}");
    let msg = err("/pointsman/maps/colour/k", "   ");
    assert!(msg.contains("value is empty"), "{msg}");
    let msg = err("/pointsman/maps//k", "green");
    assert!(msg.contains("map name is empty"), "{msg}");
}

#[test]
fn overrides() {
    assert_eq!(
        ok(
            "/pointsman/overrides/web/a1",
            r#"{"state":"drain","weight":10}"#
        ),
        Entry::Override {
            service: "web".into(),
            id: "a1".into(),
            spec: Override {
                state: Some(AdminState::Drain),
                weight: Some(10)
            }
        }
    );
    assert_eq!(
        ok("/pointsman/overrides/web/a1", "{}"),
        Entry::Override {
            service: "web".into(),
            id: "a1".into(),
            spec: Override::default()
        }
    );
    let msg = err("/pointsman/overrides/web/a1", r#"{"weight":300}"#);
    assert_eq!(
        msg,
        "/pointsman/overrides/web/a1: weight 300 is out of range: expected 0 to 256"
    );
    let msg = err(
        "/pointsman/overrides/web/a1",
        r#"{"state":"maint","why":"x"}"#,
    );
    assert!(msg.contains("unknown field `why`"), "{msg}");
    let msg = err("/pointsman/overrides/web", "{}");
    assert!(msg.contains("has no instance id"), "{msg}");
    let msg = err("/pointsman/overrides/web/a1", "");
    assert!(msg.contains("value is empty"), "{msg}");
}

#[test]
fn custom_prefixes() {
    let p = Prefixes {
        services: "/reg/svc/".into(),
        pointsman: "/reg/px".into(),
        ..Prefixes::default()
    };
    assert!(matches!(
        parse_entry(&p, "/reg/svc/web/a1", b"h:1"),
        Ok(Some(Entry::Instance(_)))
    ));
    assert!(matches!(
        parse_entry(&p, "/reg/px/maps/m/k", b"v"),
        Ok(Some(Entry::MapEntry { .. }))
    ));
    assert_eq!(parse_entry(&p, "/services/web/a1", b"h:1"), Ok(None));
    assert!(is_ours(&p, b"/reg/svc/x"));
    assert!(!is_ours(&p, b"/reg/other"));
}

#[test]
fn nested_roots_resolve_to_the_inner_one() {
    let inner_services = Prefixes {
        services: "/pointsman/services".into(),
        pointsman: "/pointsman".into(),
        ..Prefixes::default()
    };
    assert!(matches!(
        parse_entry(&inner_services, "/pointsman/services/web/a1", b"h:1"),
        Ok(Some(Entry::Instance(_)))
    ));
    assert!(matches!(
        parse_entry(
            &inner_services,
            "/pointsman/routes/r",
            br#"{"service":"web"}"#
        ),
        Ok(Some(Entry::Route { .. }))
    ));
    let inner_pointsman = Prefixes {
        services: "/svc".into(),
        pointsman: "/svc/_pointsman".into(),
        ..Prefixes::default()
    };
    assert!(matches!(
        parse_entry(&inner_pointsman, "/svc/_pointsman/maps/m/k", b"v"),
        Ok(Some(Entry::MapEntry { .. }))
    ));
    assert!(matches!(
        parse_entry(&inner_pointsman, "/svc/web/a1", b"h:1"),
        Ok(Some(Entry::Instance(_)))
    ));
}

#[test]
fn watch_range_covers_both_prefixes() {
    let (start, end) = Prefixes::default().watch_range();
    assert_eq!(start, b"/pointsman/".to_vec());
    assert_eq!(end, b"/services0".to_vec());

    // One root inside the other: the end must still cover the outer one.
    let p = Prefixes {
        services: "/a/b".into(),
        pointsman: "/a".into(),
        ..Prefixes::default()
    };
    let (start, end) = p.watch_range();
    assert_eq!(start, b"/a/".to_vec());
    assert_eq!(end, b"/a0".to_vec());

    assert_eq!(prefix_range_end(b"a\xff\xff"), b"b".to_vec());
    assert_eq!(prefix_range_end(b"\xff"), vec![0]);
}

#[test]
fn entry_keys_match_parse_key() {
    for (key, value) in [
        ("/services/web/a1", "h:1"),
        ("/pointsman/routes/r", r#"{"service":"web"}"#),
        ("/pointsman/maps/m/k", "v"),
        ("/pointsman/overrides/web/a1", "{}"),
    ] {
        assert_eq!(Some(ok(key, value).key()), parse_key(&p(), key), "{key}");
    }
}

#[test]
fn a_huge_malformed_value_is_quoted_by_its_length_and_start() {
    let huge = "y".repeat(1 << 20);
    for value in [
        huge.clone(),
        format!("{{\"address\":{huge:?}}}"),
        format!("{{\"address\":\"127.0.0.1:80\",\"weight\":{huge:?}}}"),
    ] {
        let e = err("/services/web/a1", &value);
        assert!(
            e.len() < 400,
            "an error quoting {} bytes stays short: {} bytes",
            value.len(),
            e.len()
        );
        assert!(e.starts_with("/services/web/a1"), "{e}");
    }
    let e = err("/services/web/a1", &huge);
    assert!(e.contains("a value of 1048576 bytes starting \"yyy"), "{e}");
}

#[test]
fn flat_keys_are_instances_of_the_service_their_name_gives() {
    let flat = Prefixes {
        flat_keys: true,
        ..Prefixes::default()
    };
    let key = "/services/docker-container-webapp1:49153";
    let entry = parse_entry(&flat, key, b"10.0.0.7:49153")
        .expect("a flat key")
        .expect("an entry");
    match entry {
        Entry::Instance(r) => {
            assert_eq!(
                (r.service.as_str(), r.id.as_str()),
                ("docker-container-webapp", "docker-container-webapp1:49153")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        parse_key(&flat, key),
        Some(EntryKey::Instance {
            service: "docker-container-webapp".into(),
            id: "docker-container-webapp1:49153".into()
        })
    );
    for (name, service) in [
        ("web-2", "web"),
        ("api_10", "api"),
        ("cache", "cache"),
        ("1234", "1234"),
        ("db:5432", "db"),
    ] {
        assert_eq!(flat_service(name), service, "{name}");
    }
    // Without --flat-keys: refused, naming the layout and the flag.
    let err =
        parse_entry(&Prefixes::default(), key, b"10.0.0.7:49153").expect_err("not a flat layout");
    let why = err.to_string();
    assert!(
        why.contains("<services>/<service>/<instance-id>") && why.contains("--flat-keys"),
        "{why}"
    );
}

#[test]
fn pauses_and_maintenance_pages_are_read_with_their_defaults() {
    let pause = |value: &str| match ok("/pointsman/pauses/web", value) {
        Entry::Pause { service, spec } => (service, spec.timeout),
        other => panic!("not a pause: {other:?}"),
    };
    assert_eq!(
        pause(r#"{"timeout":"5s"}"#),
        ("web".into(), Duration::from_secs(5))
    );
    assert_eq!(pause(""), ("web".into(), Duration::from_secs(30)));
    assert_eq!(pause("{}"), ("web".into(), Duration::from_secs(30)));
    let msg = err("/pointsman/pauses/web", r#"{"timeout":"0s"}"#);
    assert!(msg.contains("pause timeout is 0"), "{msg}");
    let msg = err("/pointsman/pauses/web", r#"{"wait":"5s"}"#);
    assert!(msg.contains("unknown field `wait`"), "{msg}");
    let msg = err("/pointsman/pauses/web/extra", "{}");
    assert!(
        msg.contains("expected <pointsman>/pauses/<service>"),
        "{msg}"
    );

    let page = |value: &str| match ok("/pointsman/maintenance/web", value) {
        Entry::Maintenance { service, page } => (service, page),
        other => panic!("not a maintenance: {other:?}"),
    };
    assert_eq!(
        page("<h1>back soon</h1>\n"),
        ("web".into(), "<h1>back soon</h1>\n".into())
    );
    assert_eq!(page(" \n"), ("web".into(), String::new()));
}

#[test]
fn error_pages_are_read_as_written_for_the_three_statuses() {
    match ok("/pointsman/pages/web/503", "<h1>busy</h1>\n") {
        Entry::Page {
            service,
            status,
            page,
        } => assert_eq!(
            (service.as_str(), status, page.as_str()),
            ("web", 503, "<h1>busy</h1>\n")
        ),
        other => panic!("not a page: {other:?}"),
    }
    let msg = err("/pointsman/pages/web/404", "<h1>no</h1>");
    assert!(
        msg.contains("\"404\" is not a status the proxy answers"),
        "{msg}"
    );
    let msg = err("/pointsman/pages/web/503", "  ");
    assert!(msg.contains("empty"), "{msg}");
}
