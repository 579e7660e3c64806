use super::*;

fn sticky(name: &str, mode: CookieMode) -> StickyCookie {
    StickyCookie {
        name: name.into(),
        mode,
    }
}

fn with(name: http::header::HeaderName, values: &[&'static str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(name.clone(), HeaderValue::from_static(v));
    }
    h
}

fn all(h: &HeaderMap, name: http::header::HeaderName) -> Vec<&str> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().expect("text"))
        .collect()
}

#[test]
fn cookies_are_found_among_others() {
    let h = with(header::COOKIE, &["a=1; SERVERID=web2"]);
    assert_eq!(find_cookie(&h, "SERVERID"), Some("web2"));
    assert_eq!(find_cookie(&h, "b"), None);
}

#[test]
fn insert_takes_its_cookie_out_and_keeps_the_others() {
    let s = sticky("SERVERID", CookieMode::Insert);
    let mut h = with(
        header::COOKIE,
        &["a=1; SERVERID=web2; b=2", "SERVERID=web2"],
    );
    assert_eq!(s.value_in(&h), Some("web2"));
    s.clean_request(&mut h);
    assert_eq!(all(&h, header::COOKIE), ["a=1; b=2"]);
    let mut alone = with(header::COOKIE, &["SERVERID=web2"]);
    s.clean_request(&mut alone);
    assert!(alone.get(header::COOKIE).is_none(), "an empty header goes");
    let mut other = with(header::COOKIE, &["SERVERIDX=1;a=2"]);
    s.clean_request(&mut other);
    assert_eq!(
        all(&other, header::COOKIE),
        ["SERVERIDX=1;a=2"],
        "untouched"
    );
}

#[test]
fn prefix_reads_and_strips_the_endpoint_part() {
    let s = sticky("JSESSIONID", CookieMode::Prefix);
    let mut h = with(header::COOKIE, &["a=1; JSESSIONID=web2~abc~d; b=2"]);
    assert_eq!(s.value_in(&h), Some("web2"));
    s.clean_request(&mut h);
    assert_eq!(all(&h, header::COOKIE), ["a=1; JSESSIONID=abc~d; b=2"]);
    let mut quoted = with(header::COOKIE, &["JSESSIONID=\"web2~abc\""]);
    s.clean_request(&mut quoted);
    assert_eq!(all(&quoted, header::COOKIE), ["JSESSIONID=\"abc\""]);
    let plain = with(header::COOKIE, &["JSESSIONID=abc"]);
    assert_eq!(s.value_in(&plain), None, "not bound yet");
}

#[test]
fn insert_adds_its_cookie_and_drops_the_applications() {
    let s = sticky("SERVERID", CookieMode::Insert);
    let mut h = with(
        header::SET_COOKIE,
        &["SERVERID=x; Path=/a", "JSESSIONID=abc"],
    );
    assert!(s.on_response(&mut h, "web1", true), "a clash is told");
    assert_eq!(
        all(&h, header::SET_COOKIE),
        ["JSESSIONID=abc", "SERVERID=web1; Path=/"]
    );
    let mut bound = HeaderMap::new();
    assert!(!s.on_response(&mut bound, "web1", false));
    assert!(bound.is_empty(), "a bound client gets no cookie");
}

#[test]
fn prefix_and_rewrite_change_the_applications_cookie_only() {
    let p = sticky("JSESSIONID", CookieMode::Prefix);
    let mut h = with(
        header::SET_COOKIE,
        &[
            "JSESSIONID=abc; Path=/; HttpOnly",
            "other=1",
            "JSESSIONID=; Max-Age=0",
        ],
    );
    assert!(!p.on_response(&mut h, "web1", true));
    assert_eq!(
        all(&h, header::SET_COOKIE),
        [
            "JSESSIONID=web1~abc; Path=/; HttpOnly",
            "other=1",
            "JSESSIONID=; Max-Age=0"
        ]
    );
    let mut none = HeaderMap::new();
    p.on_response(&mut none, "web1", true);
    assert!(none.is_empty(), "prefix never adds a cookie");

    let r = sticky("SRV", CookieMode::Rewrite);
    let mut h = with(header::SET_COOKIE, &["SRV=anything; Path=/", "other=1"]);
    assert!(!r.on_response(&mut h, "web1", false));
    assert_eq!(all(&h, header::SET_COOKIE), ["SRV=web1; Path=/", "other=1"]);
}

#[test]
fn cookie_names_are_tokens() {
    assert!(is_cookie_name("JSESSIONID"));
    assert!(is_cookie_name("my-cookie_1"));
    assert!(!is_cookie_name(""));
    assert!(!is_cookie_name("a b"));
    assert!(!is_cookie_name("a=b"));
    assert!(!is_cookie_name("a;b"));
}
