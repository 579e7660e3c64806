//! The proxy configs most tests write: one HTTP listener in front of one
//! service, `web`, whose endpoints the test lists.

use std::net::SocketAddr;

use super::upstream::Upstream;

/// A config with one HTTP listener whose default service is `web`, with
/// `settings` (TOML lines of `[services.web]`) and `endpoints` (inline
/// tables, see [`ep`] and [`endpoint_line`]).
pub fn web(listen: SocketAddr, settings: &str, endpoints: &[String]) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
bind = "{listen}"
default_service = "web"

[services.web]
{settings}
endpoints = [
  {}
]
"#,
        endpoints.join(",\n  ")
    )
}

/// An endpoint as an inline table.
pub fn ep(id: &str, addr: SocketAddr) -> String {
    format!("{{ id = \"{id}\", address = \"{addr}\" }}")
}

/// A config line for an endpoint: `{ id = "<name>", address = "<addr>" }`
/// plus `extra` (e.g. `weight = 2`).
pub fn endpoint_line(u: &Upstream, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!("{{ id = \"{}\", address = \"{}\"{extra} }}", u.name, u.addr)
}
