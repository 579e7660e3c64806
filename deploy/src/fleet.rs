//! The fleet of proxies, and what each one confirms it has applied.
//!
//! Every proxy that follows etcd keeps a record under
//! `<pointsman>/proxies/<proxy-id>` (a [`ProxyRecord`], leased: it vanishes
//! with its proxy) naming its admin address. A change that must not hurt
//! traffic — an instance leaving, a rollout step — is written to etcd at
//! some revision `R`, and then every live proxy is asked, through its admin
//! API, whether it has applied `R` and what it now does with the instance:
//!
//! - `GET /api/discovery`: the etcd source's `applied_revision`;
//! - `GET /api/services`: each endpoint's `state` and `in_flight`.
//!
//! [`Expectation`] says what to wait for, [`Fleet::check`] asks every proxy
//! once, and [`Fleet::wait_until`] asks until all of them confirm or a
//! deadline passes, reporting each round so a caller can say who it is
//! still waiting for. A proxy whose admin API does not answer is not
//! confirmed; if it is gone for good, its record expires with its lease and
//! it drops out of the fleet.

use std::time::Duration;

use etcd_client::GetOptions;
use pointsman_discovery::admin_api::{ProxyRecord, ProxyView, ServiceView, SourceView};
use pointsman_discovery::conn::{EtcdConn, EtcdError};
use pointsman_discovery::http::HttpConn;
use pointsman_discovery::keys::proxies_dir;
use pointsman_discovery::{AdminState, EtcdOptions, Prefixes};
use tokio::time::{timeout, Instant};

/// What to wait for on every proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expectation {
    /// The proxy has applied `revision` (or later).
    Applied { revision: i64 },
    /// The proxy has applied `revision` and sends nothing to the instance:
    /// it is absent, or takes no new requests and has none in flight.
    Drained {
        service: String,
        id: String,
        revision: i64,
    },
    /// The proxy has applied `revision` and sends new requests to the
    /// instance: present, ready and healthy.
    Serving {
        service: String,
        id: String,
        revision: i64,
    },
    /// The proxy has applied `revision` and no longer has the instance.
    Absent {
        service: String,
        id: String,
        revision: i64,
    },
}

impl Expectation {
    /// `Ok` if `view` meets the expectation, or why not yet.
    pub fn judge(&self, view: &ProxyView) -> Result<(), String> {
        let revision = match self {
            Expectation::Applied { revision }
            | Expectation::Drained { revision, .. }
            | Expectation::Serving { revision, .. }
            | Expectation::Absent { revision, .. } => *revision,
        };
        if !view.follows_etcd {
            return Err("does not follow etcd".to_string());
        }
        match view.applied_revision {
            Some(applied) if applied >= revision => {}
            Some(applied) => {
                return Err(format!(
                    "applied revision {applied}, waiting for {revision}"
                ))
            }
            None => return Err(format!("applied no revision yet, waiting for {revision}")),
        }
        match self {
            Expectation::Applied { .. } => Ok(()),
            Expectation::Drained { service, id, .. } => judge_drained(view, service, id),
            Expectation::Serving { service, id, .. } => match view.endpoint(service, id) {
                None => Err(format!("does not have {service}/{id} yet")),
                Some(e) if e.state != AdminState::Ready => {
                    Err(format!("has {service}/{id} in state {}", e.state))
                }
                Some(e) if !e.healthy => Err(format!("sees {service}/{id} down")),
                Some(_) => Ok(()),
            },
            Expectation::Absent { service, id, .. } => match view.endpoint(service, id) {
                None => Ok(()),
                Some(e) => Err(format!(
                    "still has {service}/{id} ({}, {} in flight)",
                    e.state, e.in_flight
                )),
            },
        }
    }
}

/// `Ok` if the proxy sends nothing to `service`/`id`: it does not have the
/// instance, or takes no new requests to it and has none in flight. (The
/// drain part of [`Expectation::Drained`], for proxies found without a
/// revision to compare, as with Consul.)
pub fn judge_drained(view: &ProxyView, service: &str, id: &str) -> Result<(), String> {
    match view.endpoint(service, id) {
        None => Ok(()),
        Some(e) if e.state == AdminState::Ready => Err(format!(
            "still sends new requests to {service}/{id} (state ready, {} in flight)",
            e.in_flight
        )),
        Some(e) if e.in_flight > 0 => Err(format!(
            "{} request{} in flight to {service}/{id}",
            e.in_flight,
            if e.in_flight == 1 { "" } else { "s" }
        )),
        Some(_) => Ok(()),
    }
}

/// Asks every proxy of `proxies` (id, admin address) at the same time,
/// each within `limit`, and judges its answer.
pub async fn ask_all<J>(
    proxies: Vec<(String, String)>,
    limit: Duration,
    judge: J,
) -> Vec<ProxyVerdict>
where
    J: Fn(&ProxyView) -> Result<(), String> + Clone + Send + 'static,
{
    let mut probes = tokio::task::JoinSet::new();
    for (i, (_, admin)) in proxies.iter().enumerate() {
        let (admin, judge) = (admin.clone(), judge.clone());
        probes.spawn(async move {
            let pending = match probe(&admin, limit).await {
                Ok(view) => judge(&view).err(),
                Err(e) => Some(format!("admin API did not answer: {e}")),
            };
            (i, pending)
        });
    }
    let mut verdicts: Vec<ProxyVerdict> = proxies
        .into_iter()
        .map(|(id, admin)| ProxyVerdict {
            id,
            admin,
            pending: Some("not asked".to_string()),
        })
        .collect();
    while let Some(done) = probes.join_next().await {
        if let Ok((i, pending)) = done {
            if let Some(v) = verdicts.get_mut(i) {
                v.pending = pending;
            }
        }
    }
    verdicts
}

/// One proxy's answer in a [`FleetCheck`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyVerdict {
    pub id: String,
    pub admin: String,
    /// `None` when the proxy confirmed; otherwise why not (including an
    /// admin API that did not answer).
    pub pending: Option<String>,
}

/// One round of asking every live proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetCheck {
    pub proxies: Vec<ProxyVerdict>,
    /// Records under `<pointsman>/proxies/` that do not parse, with why;
    /// they are not counted as proxies.
    pub malformed: Vec<String>,
    /// Set when the proxies could not be listed; nothing is confirmed.
    pub error: Option<String>,
}

impl FleetCheck {
    /// Whether every live proxy confirmed (true for an empty fleet).
    pub fn confirmed(&self) -> bool {
        self.error.is_none() && self.proxies.iter().all(|p| p.pending.is_none())
    }

    /// The proxies that have not confirmed.
    pub fn pending(&self) -> impl Iterator<Item = &ProxyVerdict> {
        self.proxies.iter().filter(|p| p.pending.is_some())
    }

    /// One line for a log: who confirmed, who is still waited for and why.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("cannot list the proxies: {e}");
        }
        let total = self.proxies.len();
        let waiting: Vec<String> = self
            .pending()
            .map(|p| {
                format!(
                    "{} ({}): {}",
                    p.id,
                    p.admin,
                    p.pending.as_deref().unwrap_or("")
                )
            })
            .collect();
        if waiting.is_empty() {
            return format!(
                "{total} of {total} prox{} confirmed",
                if total == 1 { "y" } else { "ies" }
            );
        }
        format!(
            "{} of {total} proxies confirmed; waiting for {}",
            total - waiting.len(),
            waiting.join("; ")
        )
    }
}

/// Why waiting for the fleet ended without a confirmation.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("not confirmed within {waited:?}: {}", last.summary())]
    Timeout { waited: Duration, last: FleetCheck },
}

/// The proxies registered in etcd, and the questions to ask them.
pub struct Fleet {
    conn: EtcdConn,
    prefixes: Prefixes,
    /// Limit for one proxy's answer (both admin requests).
    pub probe_timeout: Duration,
    /// Time between rounds in [`wait_until`](Self::wait_until).
    pub poll_interval: Duration,
}

impl Fleet {
    /// A fleet read from the etcd `etcd` points at; connects lazily.
    pub fn new(etcd: EtcdOptions) -> Result<Fleet, EtcdError> {
        let prefixes = etcd.prefixes.clone();
        Ok(Fleet {
            conn: EtcdConn::new(etcd)?,
            prefixes,
            probe_timeout: Duration::from_secs(2),
            poll_interval: Duration::from_millis(100),
        })
    }

    /// Every live proxy's record, and the keys that did not parse.
    pub async fn proxies(&mut self) -> Result<(Vec<ProxyRecord>, Vec<String>), EtcdError> {
        let dir = proxies_dir(&self.prefixes);
        let listed = self
            .conn
            .call("listing the proxies", move |mut c| async move {
                c.get(dir, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let mut records = Vec::new();
        let mut malformed = Vec::new();
        for kv in listed.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match serde_json::from_slice::<ProxyRecord>(kv.value()) {
                Ok(r) => records.push(r),
                Err(e) => malformed.push(format!("{key}: {e}")),
            }
        }
        Ok((records, malformed))
    }

    /// Asks every live proxy once, all at the same time.
    pub async fn check(&mut self, expect: &Expectation) -> FleetCheck {
        let (records, malformed) = match self.proxies().await {
            Ok(listed) => listed,
            Err(e) => {
                return FleetCheck {
                    error: Some(e.to_string()),
                    ..FleetCheck::default()
                }
            }
        };
        let expect = expect.clone();
        let proxies = ask_all(
            records.into_iter().map(|r| (r.id, r.admin)).collect(),
            self.probe_timeout,
            move |view| expect.judge(view),
        )
        .await;
        FleetCheck {
            proxies,
            malformed,
            error: None,
        }
    }

    /// Asks every proxy, every `poll_interval`, until all of them confirm
    /// `expect` or `deadline` passes; `progress` sees every round.
    pub async fn wait_until(
        &mut self,
        expect: &Expectation,
        deadline: Instant,
        mut progress: impl FnMut(&FleetCheck),
    ) -> Result<FleetCheck, FleetError> {
        let start = Instant::now();
        loop {
            let round = match timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.check(expect),
            )
            .await
            {
                Ok(round) => round,
                Err(_) => FleetCheck {
                    error: Some("no answer before the deadline".to_string()),
                    ..FleetCheck::default()
                },
            };
            progress(&round);
            if round.confirmed() {
                return Ok(round);
            }
            if Instant::now() + self.poll_interval >= deadline {
                return Err(FleetError::Timeout {
                    waited: start.elapsed(),
                    last: round,
                });
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// [`wait_until`](Self::wait_until) every proxy has applied `revision`
    /// and has nothing in flight to `service`/`id` (or does not have it).
    pub async fn wait_until_drained(
        &mut self,
        service: &str,
        id: &str,
        revision: i64,
        deadline: Instant,
        progress: impl FnMut(&FleetCheck),
    ) -> Result<FleetCheck, FleetError> {
        let expect = Expectation::Drained {
            service: service.to_string(),
            id: id.to_string(),
            revision,
        };
        self.wait_until(&expect, deadline, progress).await
    }
}

/// Asks one proxy's admin API at `admin` (`host:port`) what it has applied
/// and what it does with each endpoint, within `limit`.
pub async fn probe(admin: &str, limit: Duration) -> Result<ProxyView, String> {
    let ask = async {
        let mut conn = HttpConn::open(admin).await?;
        let sources: Vec<SourceView> = conn.get_json(admin, "/api/discovery").await?;
        let services: Vec<ServiceView> = conn.get_json(admin, "/api/services").await?;
        Ok(ProxyView::new(&sources, services))
    };
    timeout(limit, ask)
        .await
        .map_err(|_| format!("no answer from {admin} within {limit:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use pointsman_discovery::admin_api::EndpointView;

    fn view(applied: Option<i64>, endpoints: &[(&str, AdminState, u64)]) -> ProxyView {
        ProxyView {
            follows_etcd: true,
            applied_revision: applied,
            services: vec![ServiceView {
                name: "web".into(),
                endpoints: endpoints
                    .iter()
                    .map(|(id, state, in_flight)| EndpointView {
                        id: id.to_string(),
                        address: "127.0.0.1:1".into(),
                        state: *state,
                        healthy: true,
                        in_flight: *in_flight,
                        ..EndpointView::default()
                    })
                    .collect(),
                ..ServiceView::default()
            }],
        }
    }

    #[test]
    fn drained_needs_the_revision_no_new_requests_and_none_in_flight() {
        let drained = Expectation::Drained {
            service: "web".into(),
            id: "a".into(),
            revision: 10,
        };
        let behind = drained.judge(&view(Some(9), &[("a", AdminState::Drain, 0)]));
        assert_eq!(
            behind,
            Err("applied revision 9, waiting for 10".to_string())
        );
        assert!(drained
            .judge(&view(None, &[]))
            .is_err_and(|e| e.contains("no revision yet")));
        let busy = drained.judge(&view(Some(10), &[("a", AdminState::Drain, 2)]));
        assert_eq!(busy, Err("2 requests in flight to web/a".to_string()));
        let ready = drained.judge(&view(Some(11), &[("a", AdminState::Ready, 0)]));
        assert!(ready.is_err_and(|e| e.contains("still sends new requests")));
        assert_eq!(
            drained.judge(&view(Some(10), &[("a", AdminState::Drain, 0)])),
            Ok(())
        );
        assert_eq!(
            drained.judge(&view(Some(12), &[("b", AdminState::Ready, 5)])),
            Ok(())
        );
        let mut not_etcd = view(Some(12), &[]);
        not_etcd.follows_etcd = false;
        assert!(drained.judge(&not_etcd).is_err());
    }

    #[test]
    fn serving_and_absent() {
        let serving = Expectation::Serving {
            service: "web".into(),
            id: "a".into(),
            revision: 5,
        };
        assert!(serving.judge(&view(Some(5), &[])).is_err());
        assert!(serving
            .judge(&view(Some(5), &[("a", AdminState::Maint, 0)]))
            .is_err());
        assert_eq!(
            serving.judge(&view(Some(5), &[("a", AdminState::Ready, 0)])),
            Ok(())
        );
        let absent = Expectation::Absent {
            service: "web".into(),
            id: "a".into(),
            revision: 5,
        };
        assert!(absent
            .judge(&view(Some(5), &[("a", AdminState::Drain, 0)]))
            .is_err());
        assert_eq!(absent.judge(&view(Some(5), &[])), Ok(()));
        assert_eq!(
            Expectation::Applied { revision: 5 }.judge(&view(Some(6), &[])),
            Ok(())
        );
    }

    #[test]
    fn records_and_keys() {
        let p = Prefixes::default();
        assert_eq!(
            pointsman_discovery::keys::proxy_key(&p, "edge-1"),
            "/pointsman/proxies/edge-1"
        );
    }

    #[test]
    fn summary_names_who_is_waited_for() {
        let check = FleetCheck {
            proxies: vec![
                ProxyVerdict {
                    id: "p1".into(),
                    admin: "h1:1".into(),
                    pending: None,
                },
                ProxyVerdict {
                    id: "p2".into(),
                    admin: "h2:1".into(),
                    pending: Some("1 request in flight to web/a".into()),
                },
            ],
            ..FleetCheck::default()
        };
        assert!(!check.confirmed());
        assert_eq!(
            check.summary(),
            "1 of 2 proxies confirmed; waiting for p2 (h2:1): 1 request in flight to web/a"
        );
        assert!(FleetCheck::default().confirmed());
    }

    /// A stand-in admin API whose `/api/services` lacks `in_flight`, as a
    /// proxy that renamed the field would send.
    async fn admin_without_in_flight() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let body = if head.starts_with("GET /api/discovery") {
                            r#"[{"source":"etcd","connected":true,"seen_revision":5,"applied_revision":5,"last_sync_unix_ms":null,"staleness_secs":null,"malformed":0,"reconnects":0,"resets":0,"last_error":null,"serving_saved_state":false}]"#.to_string()
                        } else {
                            let mut services = serde_json::to_value(vec![ServiceView {
                                name: "web".into(),
                                endpoints: vec![EndpointView {
                                    id: "a".into(),
                                    ..EndpointView::default()
                                }],
                                ..ServiceView::default()
                            }])
                            .unwrap();
                            if let Some(e) = services[0]["endpoints"][0].as_object_mut() {
                                e.remove("in_flight");
                            }
                            services.to_string()
                        };
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_proxy_answer_without_in_flight_is_refused_by_name() {
        let admin = admin_without_in_flight().await;
        let err = probe(&admin, Duration::from_secs(5))
            .await
            .expect_err("an endpoint without in_flight read as drained");
        assert!(err.contains("missing field `in_flight`"), "{err}");
        assert!(err.contains(&admin), "{err}");
        let verdicts = ask_all(
            vec![("edge-1".into(), admin.clone())],
            Duration::from_secs(5),
            |view| judge_drained(view, "web", "a"),
        )
        .await;
        let pending = verdicts[0].pending.as_deref().unwrap_or("");
        assert!(pending.contains("in_flight"), "{pending}");
        assert_eq!(verdicts[0].id, "edge-1");
    }
}
