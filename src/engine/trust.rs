//! Which clients may speak for the client before them: the peers listed in
//! `trusted_proxies` (a load balancer or CDN you run in front). From them,
//! `X-Forwarded-For` is appended to and `X-Forwarded-Proto`, `-Host` and
//! `Forwarded` are kept; from anyone else those headers are the proxy's
//! own, whatever the client sent (see `forward::add_forwarded`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// One address or CIDR block of `trusted_proxies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustedNet(IpNet);

impl FromStr for TrustedNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(TrustedNet(net.trunc()));
        }
        match s.parse::<IpAddr>() {
            Ok(ip) => Ok(TrustedNet(IpNet::from(ip))),
            Err(_) => Err(format!(
                "{s:?} is neither an address nor a CIDR block: write it as 10.0.0.0/8, 192.0.2.7 or fd00::/8"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for TrustedNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for TrustedNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The peers whose forwarding headers are believed; empty by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Arc<[TrustedNet]>);

impl TrustedProxies {
    pub fn new(nets: impl IntoIterator<Item = TrustedNet>) -> Self {
        TrustedProxies(nets.into_iter().collect())
    }

    /// Every peer: what `trust_forwarded_headers = true` means.
    pub fn everyone() -> Self {
        use ipnet::{Ipv4Net, Ipv6Net};
        use std::net::{Ipv4Addr, Ipv6Addr};
        Self::new([
            TrustedNet(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0).into()),
            TrustedNet(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0).into()),
        ])
    }

    /// Is `peer` one of them? An IPv4 peer on an IPv6 socket
    /// (`::ffff:10.0.0.1`) is matched as its IPv4 address.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.0.iter().any(|n| n.0.contains(&peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn addresses_and_blocks_are_matched() {
        let t = TrustedProxies::new(
            ["10.0.0.0/8", "192.0.2.7", "fd00::/8", "172.16.5.9/12"]
                .map(|s| s.parse().expect("valid")),
        );
        assert!(t.contains(ip("10.200.1.1")));
        assert!(t.contains(ip("192.0.2.7")));
        assert!(!t.contains(ip("192.0.2.8")));
        assert!(t.contains(ip("fd12::1")));
        assert!(t.contains(ip("::ffff:10.0.0.1")), "mapped IPv4");
        assert!(
            t.contains(ip("172.31.0.1")),
            "host bits of a block are ignored"
        );
        assert!(!t.contains(ip("127.0.0.1")));
        assert!(!TrustedProxies::default().contains(ip("127.0.0.1")));
        assert!(TrustedProxies::everyone().contains(ip("203.0.113.1")));
        assert!(TrustedProxies::everyone().contains(ip("2001:db8::1")));
    }

    #[test]
    fn a_bad_entry_says_how_to_write_it() {
        let e = "10.0.0.0/33".parse::<TrustedNet>().expect_err("bad");
        assert!(e.contains("10.0.0.0/8"), "{e}");
        assert!("lb.internal".parse::<TrustedNet>().is_err());
    }
}
