//! `host:port` addresses of upstream endpoints, as registrator writes them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::excerpt::quote;

/// Where an endpoint listens: an IP literal or a DNS name, and a port.
///
/// Names are kept as given and resolved when connecting, so a compose
/// service name (`app:8080`) works as well as `127.0.0.1:8080`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    host: String,
    port: u16,
}

/// Why a `host:port` string is not an address; each message says what to
/// write instead. The string is kept quoted, and cut short when long
/// ([`crate::excerpt::quote`]).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("address {0} is empty: expected host:port, e.g. 127.0.0.1:8080")]
    Empty(String),
    #[error("address {0} has no port: expected host:port, e.g. 127.0.0.1:8080")]
    NoPort(String),
    #[error("address {0} has an invalid port: expected a number from 1 to 65535")]
    BadPort(String),
    #[error("address {0} has an invalid host: expected an IP address or a DNS name")]
    BadHost(String),
}

impl Address {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Address {
            host: host.into(),
            port,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(AddressError::Empty(quote(s)));
        }
        // `[::1]:80` for IPv6, `host:port` otherwise.
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| AddressError::NoPort(quote(s)))?;
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(AddressError::BadHost(quote(s)));
            }
            (h, p)
        } else {
            let (h, p) = s
                .rsplit_once(':')
                .ok_or_else(|| AddressError::NoPort(quote(s)))?;
            if h.contains(':') {
                // A bare IPv6 literal needs brackets to carry a port.
                return Err(AddressError::BadHost(quote(s)));
            }
            (h, p)
        };
        let port: u16 = p_parse(port).ok_or_else(|| AddressError::BadPort(quote(s)))?;
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
        {
            return Err(AddressError::BadHost(quote(s)));
        }
        Ok(Address::new(host, port))
    }
}

fn p_parse(p: &str) -> Option<u16> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// This host's name, or `localhost` if it has none.
pub fn host_name() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().trim().to_string();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_names_and_ipv6() {
        assert_eq!(
            "127.0.0.1:8080".parse(),
            Ok(Address::new("127.0.0.1", 8080))
        );
        assert_eq!("app-blue:80".parse(), Ok(Address::new("app-blue", 80)));
        let v6: Address = "[::1]:9000".parse().unwrap();
        assert_eq!(v6.host(), "::1");
        assert_eq!(v6.to_string(), "[::1]:9000");
    }

    #[test]
    fn rejects_what_cannot_be_dialled() {
        assert!(matches!("".parse::<Address>(), Err(AddressError::Empty(_))));
        assert!(matches!(
            "localhost".parse::<Address>(),
            Err(AddressError::NoPort(_))
        ));
        assert!(matches!(
            "h:0".parse::<Address>(),
            Err(AddressError::BadPort(_))
        ));
        assert!(matches!(
            "h:99999".parse::<Address>(),
            Err(AddressError::BadPort(_))
        ));
        assert!(matches!(
            "::1:80".parse::<Address>(),
            Err(AddressError::BadHost(_))
        ));
        assert!(matches!(
            "a b:80".parse::<Address>(),
            Err(AddressError::BadHost(_))
        ));
    }
}
