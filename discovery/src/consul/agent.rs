//! The registrar for `pointsman register --consul`: one instance, registered
//! with the local Consul agent (which runs its checks and keeps the catalog
//! in step), kept alive through a TTL check or checked by the agent over
//! HTTP, drained by re-registering with `pointsman-state: drain`, and
//! deregistered when it stops.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::client::{encode, go_duration, ConsulHttp};
use super::{ConsulError, ConsulOptions, META_STATE, META_WEIGHT};
use crate::registration::MAX_WEIGHT;
use crate::{AdminState, Registration};

/// The health check the agent keeps for the instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentCheck {
    /// The agent requests `url` every `interval`; 2xx is passing, 429 is
    /// warning, anything else (or no answer within `timeout`) critical.
    Http {
        url: String,
        interval: Duration,
        timeout: Duration,
        /// Deregister the instance after its check has been critical this
        /// long (Consul's minimum is one minute).
        deregister_critical_after: Option<Duration>,
    },
    /// The instance reports itself: the check turns critical unless
    /// [`Agent::update_ttl`] passes it at least every `ttl`.
    Ttl {
        ttl: Duration,
        deregister_critical_after: Option<Duration>,
    },
}

/// What a TTL check is set to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlStatus {
    Pass,
    Warn,
    Fail,
}

impl TtlStatus {
    fn path(self) -> &'static str {
        match self {
            TtlStatus::Pass => "pass",
            TtlStatus::Warn => "warn",
            TtlStatus::Fail => "fail",
        }
    }
}

/// One instance as the agent registers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentService {
    /// Consul's ServiceID: unique on the agent.
    pub id: String,
    /// Consul's service name.
    pub name: String,
    /// IP or DNS name; empty means the agent's node address.
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    /// Free-form; `pointsman-weight` and `pointsman-state` are set from
    /// `weight` and `state` and need not be given here.
    pub meta: BTreeMap<String, String>,
    /// 0..=256, written as meta `pointsman-weight`.
    pub weight: u16,
    /// Written as meta `pointsman-state`.
    pub state: AdminState,
    pub check: Option<AgentCheck>,
}

impl AgentService {
    /// The instance a [`Registration`] describes: service name, id,
    /// address, tags, meta, weight and state (its `check` is pointsman's
    /// own and not passed on: give Consul's with `check`).
    pub fn from_registration(reg: &Registration, check: Option<AgentCheck>) -> Self {
        AgentService {
            id: reg.id.clone(),
            name: reg.service.clone(),
            address: reg.address.host().to_string(),
            port: reg.address.port(),
            tags: reg.tags.clone(),
            meta: reg.meta.clone(),
            weight: reg.weight,
            state: reg.state,
            check,
        }
    }

    /// The id Consul gives the instance's check: `service:<id>`. Pass it to
    /// [`Agent::update_ttl`].
    pub fn check_id(&self) -> String {
        format!("service:{}", self.id)
    }

    /// The body of `PUT /v1/agent/service/register`.
    pub fn payload(&self) -> Result<Value, ConsulError> {
        let invalid = |reason: String| ConsulError::Invalid {
            what: "service registration",
            reason,
        };
        for (what, value) in [("name", &self.name), ("id", &self.id)] {
            if value.is_empty()
                || value.contains('/')
                || value.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(format!(
                    "service {what} {value:?} must be non-empty, without '/', whitespace or control characters"
                )));
            }
        }
        if self.port == 0 {
            return Err(invalid("port 0: expected 1 to 65535".to_string()));
        }
        if self.weight > MAX_WEIGHT {
            return Err(invalid(format!(
                "weight {} is out of range: expected 0 to {MAX_WEIGHT}",
                self.weight
            )));
        }
        let mut meta = self.meta.clone();
        meta.insert(META_WEIGHT.to_string(), self.weight.to_string());
        meta.insert(META_STATE.to_string(), self.state.as_str().to_string());
        let mut body = json!({
            "ID": self.id,
            "Name": self.name,
            "Address": self.address,
            "Port": self.port,
            "Tags": self.tags,
            "Meta": meta,
        });
        if let Some(check) = &self.check {
            let mut c = Map::new();
            c.insert("Name".into(), json!(format!("pointsman: {}", self.name)));
            let after = match check {
                AgentCheck::Http {
                    url,
                    interval,
                    timeout,
                    deregister_critical_after,
                } => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(invalid(format!(
                            "check URL {url:?} must start with http:// or https://"
                        )));
                    }
                    if interval.is_zero() || timeout.is_zero() {
                        return Err(invalid(
                            "check interval and timeout must not be 0".to_string(),
                        ));
                    }
                    c.insert("HTTP".into(), json!(url));
                    c.insert("Interval".into(), json!(go_duration(*interval)));
                    c.insert("Timeout".into(), json!(go_duration(*timeout)));
                    deregister_critical_after
                }
                AgentCheck::Ttl {
                    ttl,
                    deregister_critical_after,
                } => {
                    if ttl.is_zero() {
                        return Err(invalid("check TTL must not be 0".to_string()));
                    }
                    c.insert("TTL".into(), json!(go_duration(*ttl)));
                    deregister_critical_after
                }
            };
            if let Some(after) = after {
                c.insert(
                    "DeregisterCriticalServiceAfter".into(),
                    json!(go_duration(*after)),
                );
            }
            body["Check"] = Value::Object(c);
        }
        Ok(body)
    }
}

/// The local Consul agent's service API.
#[derive(Clone)]
pub struct Agent {
    http: ConsulHttp,
    base: String,
    timeout: Duration,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("url", &self.base).finish()
    }
}

impl Agent {
    /// An agent client for the first of `opts.urls` (registrations belong
    /// to one agent: the one on the instance's own host), with its token
    /// and timeouts. Fails on options that can never work.
    pub fn new(opts: &ConsulOptions) -> Result<Agent, ConsulError> {
        let config = opts.config()?;
        let base = config.bases.into_iter().next().ok_or(ConsulError::NoUrls)?;
        Ok(Agent {
            http: ConsulHttp::new(opts.connect_timeout, config.token),
            base,
            timeout: opts.connect_timeout + opts.request_timeout,
        })
    }

    /// The agent's URL, `http://host:port`.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Registers `service`, or replaces its registration (same id): tags,
    /// meta and check definition are replaced; a check that stays keeps
    /// its status.
    pub async fn register(&self, service: &AgentService) -> Result<(), ConsulError> {
        let body = serde_json::to_vec(&service.payload()?).map_err(|e| ConsulError::Invalid {
            what: "service registration",
            reason: e.to_string(),
        })?;
        let url = format!(
            "{}/v1/agent/service/register?replace-existing-checks=true",
            self.base
        );
        self.http.put(&url, Some(body), self.timeout).await?;
        Ok(())
    }

    /// Re-registers `service` with `state` (written as meta
    /// `pointsman-state`), e.g. `drain` before stopping it; keeps
    /// `service.state` in step.
    pub async fn set_state(
        &self,
        service: &mut AgentService,
        state: AdminState,
    ) -> Result<(), ConsulError> {
        let mut next = service.clone();
        next.state = state;
        self.register(&next).await?;
        service.state = state;
        Ok(())
    }

    /// Removes the instance `id` and its checks. An id the agent does not
    /// know is an error (Consul answers 404).
    pub async fn deregister(&self, id: &str) -> Result<(), ConsulError> {
        let url = format!("{}/v1/agent/service/deregister/{}", self.base, encode(id));
        self.http.put(&url, None, self.timeout).await?;
        Ok(())
    }

    /// Sets the TTL check `check_id` (see [`AgentService::check_id`]) and
    /// restarts its TTL; `note` becomes the check's output.
    pub async fn update_ttl(
        &self,
        check_id: &str,
        status: TtlStatus,
        note: Option<&str>,
    ) -> Result<(), ConsulError> {
        let mut url = format!(
            "{}/v1/agent/check/{}/{}",
            self.base,
            status.path(),
            encode(check_id)
        );
        if let Some(note) = note {
            url.push_str("?note=");
            url.push_str(&encode(note));
        }
        self.http.put(&url, None, self.timeout).await?;
        Ok(())
    }
}
