//! HAProxy's `use_backend` rules as pointsman routes.
//!
//! HAProxy takes the first rule whose condition holds; pointsman takes the
//! most specific route (exact host, then `*.` wildcards, then any host; in
//! the group, the longest path prefix). The two agree once every ACL is a
//! test of the host or of a path prefix: the hosts and prefixes the ACLs
//! name cut requests into classes on which every ACL is either true or
//! false, so the first-match answer is worked out per class and a route is
//! written wherever pointsman would otherwise answer differently. That
//! also covers `unless`, `!acl` and `||`, and earlier rules that shadow
//! later, more specific ones.

use std::collections::{BTreeMap, BTreeSet};

/// A test on the request an ACL value makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Test {
    /// The host is exactly this (lower-case, no port).
    Host(String),
    /// The host is this or one of its subdomains (`hdr_dom(host)`).
    Domain(String),
    /// The host is a subdomain of this (`hdr_end(host) .example.com`).
    Subdomain(String),
    /// The path starts with this.
    PathPrefix(String),
    /// `TRUE` / `FALSE`.
    Always(bool),
}

/// One ACL: true when any of its tests is (values and same-named lines are
/// alternatives, as in HAProxy).
pub type Acl = Vec<Test>;

/// `if`/`unless` with `||` between groups of ACLs that must all hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    pub unless: bool,
    /// Alternatives; each is a list of (negated, ACL).
    pub any_of: Vec<Vec<(bool, Acl)>>,
}

/// Where a rule or the default sends a request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Service(String),
    /// A map route: `map[key]`, else `default`.
    Map {
        map: String,
        key: String,
        default: Option<String>,
    },
    /// No backend at all (HAProxy answers 503).
    Nothing,
}

/// A `use_backend` rule, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub line: usize,
    /// `None`: the rule always applies.
    pub condition: Option<Condition>,
    pub target: Target,
}

/// A route to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledRoute {
    /// `example.com`, `*.example.com`, or any host.
    pub host: Option<String>,
    pub path_prefix: String,
    pub target: Target,
    /// The rule that decides these requests in HAProxy (`None`: the default).
    pub rule_line: Option<usize>,
}

/// Requests whose HAProxy answer no route can give (no backend at all, while
/// a less specific route sends them somewhere).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unexpressed {
    pub host: Option<String>,
    pub path_prefix: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum HostClass {
    /// Hosts that are subdomains of the suffix and of no more specific one.
    Wild(String),
    Exact(String),
    Other,
}

impl HostClass {
    fn key(&self) -> Option<String> {
        match self {
            HostClass::Exact(h) => Some(h.clone()),
            HostClass::Wild(s) => Some(format!("*.{s}")),
            HostClass::Other => None,
        }
    }
}

fn is_subdomain(host: &str, of: &str) -> bool {
    host.len() > of.len() + 1 && host.ends_with(of) && host[..host.len() - of.len()].ends_with('.')
}

fn holds(test: &Test, host: &HostClass, path: &str) -> bool {
    match (test, host) {
        (Test::Always(b), _) => *b,
        (Test::PathPrefix(p), _) => path.starts_with(p.as_str()),
        (Test::Host(v), HostClass::Exact(e)) => e == v,
        (Test::Domain(v), HostClass::Exact(e)) => e == v || is_subdomain(e, v),
        (Test::Subdomain(v), HostClass::Exact(e)) => is_subdomain(e, v),
        // A host of the class is `<label>.s`, and `s` is the most specific
        // suffix named, so it is a subdomain of `v` exactly when `s` is `v`
        // or a subdomain of it.
        (Test::Domain(v) | Test::Subdomain(v), HostClass::Wild(s)) => s == v || is_subdomain(s, v),
        (Test::Host(_), HostClass::Wild(_)) => false,
        (_, HostClass::Other) => false,
    }
}

impl Condition {
    fn holds(&self, host: &HostClass, path: &str) -> bool {
        let any = self.any_of.iter().any(|group| {
            group
                .iter()
                .all(|(negated, acl)| acl.iter().any(|t| holds(t, host, path)) != *negated)
        });
        any != self.unless
    }
}

/// HAProxy's answer for a request of the class: the target and the rule.
fn first_match(
    rules: &[Rule],
    default: &Target,
    host: &HostClass,
    path: &str,
) -> (Target, Option<usize>) {
    for (i, rule) in rules.iter().enumerate() {
        if !rule.condition.as_ref().is_none_or(|c| c.holds(host, path)) {
            continue;
        }
        return match &rule.target {
            // A map with no entry and no default of its own: HAProxy goes
            // on with the next rules, so their answer is the default.
            Target::Map {
                map,
                key,
                default: None,
            } => {
                let rest = match first_match(&rules[i + 1..], default, host, path).0 {
                    Target::Service(s) => Some(s),
                    Target::Map { default, .. } => default,
                    Target::Nothing => None,
                };
                (
                    Target::Map {
                        map: map.clone(),
                        key: key.clone(),
                        default: rest,
                    },
                    Some(rule.line),
                )
            }
            t => (t.clone(), Some(rule.line)),
        };
    }
    (default.clone(), None)
}

/// The routes that give every request the answer HAProxy's rules give, in
/// the order pointsman consults them, fewest needed; and the requests no
/// route can answer alike.
pub fn compile(rules: &[Rule], default: &Target) -> (Vec<CompiledRoute>, Vec<Unexpressed>) {
    let mut exact = BTreeSet::new();
    let mut suffixes = BTreeSet::new();
    let mut prefixes = BTreeSet::from(["/".to_string()]);
    for rule in rules {
        for group in rule.condition.iter().flat_map(|c| &c.any_of) {
            for test in group.iter().flat_map(|(_, acl)| acl) {
                match test {
                    Test::Host(h) => {
                        exact.insert(h.clone());
                    }
                    Test::Domain(d) => {
                        exact.insert(d.clone());
                        suffixes.insert(d.clone());
                    }
                    Test::Subdomain(d) => {
                        suffixes.insert(d.clone());
                    }
                    Test::PathPrefix(p) => {
                        prefixes.insert(p.clone());
                    }
                    Test::Always(_) => {}
                }
            }
        }
    }
    // Least specific first: a class falls back on those before it.
    let mut classes = vec![HostClass::Other];
    let mut wild: Vec<&String> = suffixes.iter().collect();
    wild.sort_by_key(|s| s.len());
    classes.extend(wild.iter().map(|s| HostClass::Wild((*s).clone())));
    classes.extend(exact.iter().map(|h| HostClass::Exact(h.clone())));
    let mut paths: Vec<&String> = prefixes.iter().collect();
    paths.sort_by_key(|p| (p.len(), p.as_str()));

    let fallback_chain = |class: &HostClass| -> Vec<Option<String>> {
        let mut chain = vec![class.key()];
        let name = match class {
            HostClass::Exact(h) => Some(h.as_str()),
            HostClass::Wild(s) => Some(s.as_str()),
            HostClass::Other => None,
        };
        if let Some(name) = name {
            let mut wider: Vec<&String> =
                suffixes.iter().filter(|s| is_subdomain(name, s)).collect();
            wider.sort_by_key(|s| std::cmp::Reverse(s.len()));
            chain.extend(wider.into_iter().map(|s| Some(format!("*.{s}"))));
            chain.push(None);
        }
        chain
    };

    let mut written: BTreeMap<Option<String>, Vec<(String, Target)>> = BTreeMap::new();
    let mut routes = Vec::new();
    let mut unexpressed = Vec::new();
    for class in &classes {
        let chain = fallback_chain(class);
        for path in &paths {
            let (want, rule_line) = first_match(rules, default, class, path);
            let have = chain
                .iter()
                .find_map(|group| {
                    written
                        .get(group)?
                        .iter()
                        .filter(|(p, _)| path.starts_with(p.as_str()))
                        .max_by_key(|(p, _)| p.len())
                        .map(|(_, t)| t.clone())
                })
                .unwrap_or_else(|| default.clone());
            if want == have {
                continue;
            }
            if want == Target::Nothing {
                unexpressed.push(Unexpressed {
                    host: class.key(),
                    path_prefix: (*path).clone(),
                });
                continue;
            }
            written
                .entry(class.key())
                .or_default()
                .push(((*path).clone(), want.clone()));
            routes.push(CompiledRoute {
                host: class.key(),
                path_prefix: (*path).clone(),
                target: want,
                rule_line,
            });
        }
    }
    (routes, unexpressed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> Target {
        Target::Service(s.into())
    }

    fn rule(line: usize, acls: Vec<Acl>, target: &str) -> Rule {
        Rule {
            line,
            condition: Some(Condition {
                unless: false,
                any_of: vec![acls.into_iter().map(|a| (false, a)).collect()],
            }),
            target: svc(target),
        }
    }

    fn brief(routes: &[CompiledRoute]) -> Vec<(Option<&str>, &str, Target)> {
        routes
            .iter()
            .map(|r| (r.host.as_deref(), r.path_prefix.as_str(), r.target.clone()))
            .collect()
    }

    #[test]
    fn a_path_rule_and_a_default_are_one_route() {
        let rules = [rule(5, vec![vec![Test::PathPrefix("/blog".into())]], "jms")];
        let (routes, none) = compile(&rules, &svc("web"));
        assert_eq!(brief(&routes), [(None, "/blog", svc("jms"))]);
        assert_eq!(routes[0].rule_line, Some(5));
        assert!(none.is_empty());
    }

    #[test]
    fn host_and_path_together_and_alternative_values() {
        let rules = [rule(
            3,
            vec![
                vec![
                    Test::Host("a.example".into()),
                    Test::Host("b.example".into()),
                ],
                vec![Test::PathPrefix("/api".into())],
            ],
            "api",
        )];
        let (routes, _) = compile(&rules, &svc("web"));
        assert_eq!(
            brief(&routes),
            [
                (Some("a.example"), "/api", svc("api")),
                (Some("b.example"), "/api", svc("api")),
            ]
        );
    }

    #[test]
    fn an_earlier_path_rule_shadows_a_later_host_rule() {
        // HAProxy: www.example.com/api goes to `api` (first rule), the rest
        // of www.example.com to `www`.
        let rules = [
            rule(1, vec![vec![Test::PathPrefix("/api".into())]], "api"),
            rule(2, vec![vec![Test::Host("www.example.com".into())]], "www"),
        ];
        let (routes, _) = compile(&rules, &svc("web"));
        assert_eq!(
            brief(&routes),
            [
                (None, "/api", svc("api")),
                (Some("www.example.com"), "/", svc("www")),
                (Some("www.example.com"), "/api", svc("api")),
            ]
        );
    }

    #[test]
    fn a_domain_covers_its_subdomains_and_unless_negates() {
        let rules = [Rule {
            line: 1,
            condition: Some(Condition {
                unless: true,
                any_of: vec![vec![(false, vec![Test::Domain("example.com".into())])]],
            }),
            target: svc("other"),
        }];
        // Any other host goes to `other`; example.com and its subdomains
        // keep the default, so they need routes of their own.
        let (routes, _) = compile(&rules, &svc("main"));
        assert_eq!(
            brief(&routes),
            [
                (None, "/", svc("other")),
                (Some("*.example.com"), "/", svc("main")),
                (Some("example.com"), "/", svc("main")),
            ]
        );
        let rules = [rule(
            1,
            vec![vec![Test::Domain("example.com".into())]],
            "ex",
        )];
        let (routes, _) = compile(&rules, &svc("main"));
        assert_eq!(
            brief(&routes),
            [
                (Some("*.example.com"), "/", svc("ex")),
                (Some("example.com"), "/", svc("ex")),
            ]
        );
    }

    #[test]
    fn unless_with_a_specific_default_writes_the_exceptions() {
        let rules = [Rule {
            line: 1,
            condition: Some(Condition {
                unless: true,
                any_of: vec![vec![(false, vec![Test::PathPrefix("/static".into())])]],
            }),
            target: svc("app"),
        }];
        let (routes, _) = compile(&rules, &svc("static"));
        assert_eq!(
            brief(&routes),
            [(None, "/", svc("app"))]
                .into_iter()
                .chain([(None, "/static", svc("static"))])
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_map_without_default_falls_back_on_what_follows() {
        let rules = [Rule {
            line: 1,
            condition: None,
            target: Target::Map {
                map: "hosts".into(),
                key: "req.host".into(),
                default: None,
            },
        }];
        let (routes, _) = compile(&rules, &svc("web"));
        assert_eq!(
            brief(&routes),
            [(
                None,
                "/",
                Target::Map {
                    map: "hosts".into(),
                    key: "req.host".into(),
                    default: Some("web".into())
                }
            )]
        );
    }

    #[test]
    fn no_backend_under_a_route_is_reported() {
        let rules = [Rule {
            line: 1,
            condition: Some(Condition {
                unless: true,
                any_of: vec![vec![(false, vec![Test::PathPrefix("/x".into())])]],
            }),
            target: svc("app"),
        }];
        let (routes, none) = compile(&rules, &Target::Nothing);
        assert_eq!(brief(&routes), [(None, "/", svc("app"))]);
        assert_eq!(
            none,
            [Unexpressed {
                host: None,
                path_prefix: "/x".into()
            }]
        );
    }
}
