//! ACLs and `if`/`unless` conditions as [`super::routes`] tests: what of an
//! ACL pointsman can route on, and why the rest cannot.

use std::collections::BTreeMap;

use super::routes::{Acl, Condition, Test};

/// `acl NAME <criterion> [flags] <values>` (the words after NAME).
pub fn parse_acl(words: &[String]) -> Result<Acl, String> {
    let criterion = words.first().map(String::as_str).unwrap_or("");
    let mut method = None;
    let mut insensitive = false;
    let mut i = 1;
    while let Some(w) = words.get(i).map(String::as_str) {
        match w {
            "-i" => insensitive = true,
            "-m" => {
                method = words.get(i + 1).map(String::as_str);
                i += 1;
            }
            "-f" | "-M" => return Err("patterns from a file".into()),
            "--" => {
                i += 1;
                break;
            }
            w if w.starts_with('-') && w.len() == 2 => {}
            _ => break,
        }
        i += 1;
    }
    let values = &words[i.min(words.len())..];
    if values.is_empty() {
        return Err("the ACL has no value to match".into());
    }
    let host_fetch = |c: &str| {
        let inner = c.strip_prefix("req.").unwrap_or(c);
        ["hdr(host)", "hdr(Host)", "hdr(HOST)"].contains(&inner)
    };
    enum Subject {
        Path,
        Host,
    }
    let (subject, how) = match criterion {
        "path_beg" | "url_beg" => (Subject::Path, "beg"),
        "path" => (Subject::Path, method.unwrap_or("str")),
        c if host_fetch(c) => (Subject::Host, method.unwrap_or("str")),
        c if c.starts_with("hdr_") && c.ends_with("(host)") => {
            let how = &c[4..c.len() - "(host)".len()];
            (Subject::Host, how)
        }
        _ => {
            return Err(format!(
                "{criterion:?}: pointsman routes on the host (hdr(host), hdr_dom, hdr_end) and path prefixes (path_beg) only"
            ))
        }
    };
    let mut tests = Vec::new();
    for v in values {
        let test = match (&subject, how) {
            (Subject::Path, "beg") if v.starts_with('/') && !insensitive => Test::PathPrefix(v.clone()),
            (Subject::Path, "beg") if insensitive => {
                return Err("a case-insensitive path match: pointsman's path prefixes match case-sensitively".into())
            }
            (Subject::Path, "beg") => return Err(format!("the path prefix {v:?} does not start with '/'")),
            (Subject::Path, "str") => {
                return Err("an exact path: pointsman matches path prefixes (path_beg)".into())
            }
            (Subject::Host, _)
                if !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b)) =>
            {
                return Err(format!("{v:?} is not a host name"))
            }
            (Subject::Host, _) if v.contains(':') => {
                return Err(format!("the host {v:?} has a port: pointsman matches hosts without their port"))
            }
            (Subject::Host, "str") => Test::Host(v.to_ascii_lowercase()),
            (Subject::Host, "dom") => Test::Domain(v.trim_matches('.').to_ascii_lowercase()),
            (Subject::Host, "end") if v.starts_with('.') => Test::Subdomain(v[1..].to_ascii_lowercase()),
            (Subject::Host, "end") => {
                return Err(format!(
                    "hdr_end {v:?} also matches hosts such as x{v}: write .{v} for its subdomains, or use hdr_dom"
                ))
            }
            (_, how) => {
                return Err(format!(
                    "matching by {how:?}: pointsman matches exact hosts, domains with their subdomains, and path prefixes"
                ))
            }
        };
        tests.push(test);
    }
    Ok(tests)
}

/// The words after `if`/`unless`: ACL names, `!`, `||`/`or`, `{ ... }`.
pub fn parse_condition(
    unless: bool,
    words: &[String],
    acls: &BTreeMap<String, Result<Acl, String>>,
) -> Result<Condition, String> {
    let mut any_of = vec![Vec::new()];
    let mut negate = false;
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        i += 1;
        let acl = match w {
            "||" | "or" => {
                any_of.push(Vec::new());
                continue;
            }
            "!" => {
                negate = !negate;
                continue;
            }
            "{" => {
                let end = words[i..]
                    .iter()
                    .position(|w| w == "}")
                    .ok_or("an anonymous ACL `{` is not closed")?;
                let acl = parse_acl(&words[i..i + end])?;
                i += end + 1;
                acl
            }
            "TRUE" => vec![Test::Always(true)],
            "FALSE" => vec![Test::Always(false)],
            w => {
                let (neg, name) = match w.strip_prefix('!') {
                    Some(n) => (true, n),
                    None => (false, w),
                };
                negate ^= neg;
                match acls.get(name) {
                    Some(Ok(acl)) => acl.clone(),
                    Some(Err(_)) => {
                        return Err(format!("it uses ACL {name:?}, which is not translated"))
                    }
                    None => return Err(format!("ACL {name:?} is not defined in this section")),
                }
            }
        };
        if let Some(group) = any_of.last_mut() {
            group.push((negate, acl));
        }
        negate = false;
    }
    if any_of.iter().any(Vec::is_empty) {
        return Err("a condition with nothing on a side of `||`".into());
    }
    Ok(Condition { unless, any_of })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn host_and_path_criteria_become_tests() {
        let acl = |s: &str| parse_acl(&words(s));
        assert_eq!(
            acl("path_beg /blog /news"),
            Ok(vec![
                Test::PathPrefix("/blog".into()),
                Test::PathPrefix("/news".into())
            ])
        );
        assert_eq!(
            acl("path -m beg /x"),
            Ok(vec![Test::PathPrefix("/x".into())])
        );
        assert_eq!(
            acl("hdr(host) -i WWW.Example.com"),
            Ok(vec![Test::Host("www.example.com".into())])
        );
        assert_eq!(
            acl("req.hdr(host) -m dom example.com"),
            Ok(vec![Test::Domain("example.com".into())])
        );
        assert_eq!(
            acl("hdr_end(host) .example.com"),
            Ok(vec![Test::Subdomain("example.com".into())])
        );
        for (bad, why) in [
            ("path /exact", "exact path"),
            ("path_beg -i /x", "case-insensitive"),
            ("hdr_beg(host) www.", "matching by \"beg\""),
            ("hdr_end(host) example.com", "write .example.com"),
            ("hdr(host) example.com:8080", "has a port"),
            ("src 10.0.0.0/8", "routes on the host"),
            ("path_beg -f /etc/paths.lst", "from a file"),
            ("path_beg", "no value"),
        ] {
            let err = acl(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn conditions_combine_named_negated_and_anonymous_acls() {
        let mut acls = BTreeMap::new();
        acls.insert("api".to_string(), Ok(vec![Test::PathPrefix("/api".into())]));
        acls.insert("bad".to_string(), Err("no".to_string()));
        let c = parse_condition(
            false,
            &words("api !api || { hdr(host) a.b } or TRUE"),
            &acls,
        )
        .expect("parses");
        assert_eq!(c.any_of.len(), 3);
        assert_eq!(c.any_of[0].len(), 2);
        assert!(
            !c.any_of[0][0].0 && c.any_of[0][1].0,
            "the second is negated"
        );
        assert_eq!(c.any_of[1], [(false, vec![Test::Host("a.b".into())])]);
        assert_eq!(c.any_of[2], [(false, vec![Test::Always(true)])]);
        assert!(parse_condition(false, &words("bad"), &acls).is_err());
        assert!(parse_condition(false, &words("nope"), &acls).is_err());
        assert!(parse_condition(false, &words("api ||"), &acls).is_err());
        assert!(parse_condition(false, &words("{ path_beg /x"), &acls).is_err());
    }
}
