//! A registered service instance: what `/services/<service>/<id>` holds.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Address;

/// Weight given to an instance that does not name one (HAProxy's default).
pub const DEFAULT_WEIGHT: u16 = 1;
/// The largest weight, as in HAProxy.
pub const MAX_WEIGHT: u16 = 256;

/// One instance of a service, as a registry announced it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub service: String,
    pub id: String,
    pub address: Address,
    /// 0..=256; 0 takes no new traffic.
    pub weight: u16,
    pub state: AdminState,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub check: Option<CheckSpec>,
    /// Used only while no other (non-backup) instance of the service takes
    /// traffic, as HAProxy's `backup` servers; the first one in id order.
    pub backup: bool,
}

impl Registration {
    /// An instance with default weight, ready, no tags and no check.
    pub fn new(service: impl Into<String>, id: impl Into<String>, address: Address) -> Self {
        Registration {
            service: service.into(),
            id: id.into(),
            address,
            weight: DEFAULT_WEIGHT,
            state: AdminState::Ready,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            check: None,
            backup: false,
        }
    }
}

/// The administrative state of an endpoint, with HAProxy's meaning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes traffic.
    #[default]
    Ready,
    /// Takes no new requests (except sticky sessions bound to it); in-flight
    /// requests finish.
    Drain,
    /// Takes no traffic at all.
    Maint,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AdminState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ready" => Ok(AdminState::Ready),
            "drain" => Ok(AdminState::Drain),
            "maint" => Ok(AdminState::Maint),
            other => Err(format!(
                "unknown state {other:?}: expected ready, drain or maint"
            )),
        }
    }
}

/// An active health check carried by a registration or a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// HTTP path to request; absent means a TCP connect check.
    #[serde(default)]
    pub http: Option<String>,
    #[serde(default = "default_method")]
    pub method: String,
    /// Host header for HTTP checks.
    #[serde(default)]
    pub host: Option<String>,
    /// Accepted status range, inclusive.
    #[serde(default = "default_status")]
    pub expect_status: (u16, u16),
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passes that bring a down endpoint up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up endpoint down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Check this port instead of the instance's (an app checked on an
    /// admin port, as HAProxy's `check port N`).
    #[serde(default)]
    pub port: Option<u16>,
    /// Check this host (an IP or a name) instead of the instance's, on
    /// the instance's port or `port` (HAProxy's `addr`): an app whose
    /// health endpoint listens on another interface.
    #[serde(default)]
    pub address: Option<String>,
}

impl CheckSpec {
    /// Where to check an instance at `address`: there, or on another
    /// host (`address`) and/or port (`port`).
    pub fn target(&self, address: &Address) -> Address {
        let host = self.address.as_deref().unwrap_or(address.host());
        Address::new(host, self.port.unwrap_or(address.port()))
    }
}

impl CheckSpec {
    /// Checks the values serde cannot: a path that is a path, a status range
    /// that is a range, timings and thresholds that can ever fire.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(path) = &self.http {
            if !path.starts_with('/') {
                return Err(format!(
                    "check.http {path:?} must be a path starting with '/', e.g. \"/healthz\""
                ));
            }
        }
        if self.method.is_empty() || !self.method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "check.method {:?} is not an HTTP method: expected e.g. GET or HEAD",
                self.method
            ));
        }
        let (lo, hi) = self.expect_status;
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return Err(format!(
                "check.expect_status [{lo}, {hi}] is not a status range: expected [low, high] within 100..=599, e.g. [200, 399]"
            ));
        }
        if self.interval.is_zero() {
            return Err("check.interval is 0: expected a duration such as \"2s\"".to_string());
        }
        if self.timeout.is_zero() {
            return Err("check.timeout is 0: expected a duration such as \"1s\"".to_string());
        }
        if let Some(host) = &self.address {
            // The same rule as a registration's address, with any port.
            let bracketed = if host.contains(':') {
                format!("[{host}]:1")
            } else {
                format!("{host}:1")
            };
            if host.is_empty() || bracketed.parse::<Address>().is_err() {
                return Err(format!(
                    "check.address {host:?} is not a host: expected an IP address or a DNS name without a port, e.g. \"10.0.0.5\" (the port is the instance's, or check.port)"
                ));
            }
        }
        if self.rise == 0 || self.fall == 0 {
            return Err(format!(
                "check.rise ({}) and check.fall ({}) must be at least 1",
                self.rise, self.fall
            ));
        }
        Ok(())
    }
}

fn default_method() -> String {
    "GET".to_string()
}
fn default_status() -> (u16, u16) {
    crate::check::DEFAULT_EXPECT_STATUS
}
fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// A fleet-wide pause of a service: `/pointsman/pauses/<service>`. While
/// the key exists, every proxy holds the service's new requests (in-flight
/// ones finish) for up to `timeout` each; deleting it resumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseSpec {
    /// How long one request may wait; then it gets 503.
    #[serde(default = "default_pause_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for PauseSpec {
    fn default() -> Self {
        PauseSpec {
            timeout: default_pause_timeout(),
        }
    }
}

fn default_pause_timeout() -> Duration {
    Duration::from_secs(30)
}

/// A fleet-wide operator override: `/pointsman/overrides/<service>/<id>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    #[serde(default)]
    pub state: Option<AdminState>,
    #[serde(default)]
    pub weight: Option<u16>,
}
