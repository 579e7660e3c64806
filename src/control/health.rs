//! Active health checks. Every endpoint with a check (its registration's
//! `check`, or its service's) has a task that probes it by TCP connect or
//! HTTP request every `interval`, with HAProxy's `rise`/`fall` meaning: an
//! endpoint goes down after `fall` failures in a row and back up after
//! `rise` passes (counted, and an answer's status judged, by
//! `pointsman_discovery::check`, as `pointsman register` does for its app). A new endpoint with a check takes traffic only after its
//! first passing check. The control task starts and stops these tasks as
//! tables are rebuilt; flips go back to it as [`Command::Health`] so slow
//! start can ramp an endpoint that came back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request};
use pointsman_discovery::check::{self, ConnectFailure, RiseFall};
use pointsman_discovery::{Address, CheckSpec};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::control::Command;
use crate::engine::body::UpstreamBody;
use crate::engine::endpoint::EndpointState;
use crate::engine::pool;

struct Running {
    address: Address,
    spec: CheckSpec,
    task: AbortHandle,
}

/// The check tasks, keyed by (service, instance id).
pub struct HealthChecks {
    running: HashMap<(String, Arc<str>), Running>,
    /// Where flips are reported; `None` in tools that run no checks.
    notify: Option<mpsc::Sender<Command>>,
}

impl HealthChecks {
    pub fn new(notify: Option<mpsc::Sender<Command>>) -> Self {
        HealthChecks {
            running: HashMap::new(),
            notify,
        }
    }

    /// Makes the running checks of `service` match its endpoints.
    pub fn sync<'a>(
        &mut self,
        service: &str,
        endpoints: impl IntoIterator<
            Item = (
                &'a Arc<str>,
                &'a Address,
                Option<&'a CheckSpec>,
                &'a Arc<EndpointState>,
            ),
        >,
    ) {
        let mut keep = std::collections::HashSet::new();
        for (id, address, spec, live) in endpoints {
            let Some(spec) = spec else { continue };
            let key = (service.to_string(), id.clone());
            keep.insert(id.clone());
            if let Some(r) = self.running.get(&key) {
                if &r.address == address && &r.spec == spec {
                    continue;
                }
                r.task.abort();
            }
            let task = tokio::spawn(check_loop(
                service.to_string(),
                id.clone(),
                address.clone(),
                spec.clone(),
                live.clone(),
                self.notify.clone(),
            ))
            .abort_handle();
            self.running.insert(
                key,
                Running {
                    address: address.clone(),
                    spec: spec.clone(),
                    task,
                },
            );
        }
        self.running.retain(|(s, id), r| {
            let stays = s != service || keep.contains(id);
            if !stays {
                r.task.abort();
            }
            stays
        });
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
    }
}

async fn check_loop(
    service: String,
    id: Arc<str>,
    address: Address,
    spec: CheckSpec,
    live: Arc<EndpointState>,
    notify: Option<mpsc::Sender<Command>>,
) {
    // A task restarted for new check settings keeps rise/fall going.
    let mut rise_fall = RiseFall::new(spec.rise, spec.fall, live.has_check_result());
    let mut tick = tokio::time::interval(spec.interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if live.checks_paused() {
            continue;
        }
        let started = std::time::Instant::now();
        let (passed, status, detail) = probe(&address, &spec).await;
        live.record_check(passed, status, started.elapsed());
        if let Some(now_up) = rise_fall.record(passed, live.healthy()) {
            live.set_healthy(now_up);
            if now_up {
                // Back up by its checks: a passive ejection from while it
                // was going down is over too.
                live.uneject();
                tracing::info!(%service, %id, %address, "endpoint up: check passed");
            } else {
                live.pool.clear();
                tracing::warn!(%service, %id, %address, %detail, "endpoint down: check failed");
            }
            if let Some(tx) = &notify {
                let _ = tx
                    .send(Command::Health {
                        service: service.clone(),
                        id: id.clone(),
                        up: now_up,
                    })
                    .await;
            }
        }
    }
}

/// Runs one check: (passed, HTTP status or 0, what went wrong).
async fn probe(address: &Address, spec: &CheckSpec) -> (bool, u16, String) {
    let address = &spec.target(address);
    let Some(path) = &spec.http else {
        return match check::tcp_connect(address, spec.timeout).await {
            Ok(()) => (true, 0, String::new()),
            Err(ConnectFailure::Failed(e)) => (false, 0, format!("connect failed: {e}")),
            Err(ConnectFailure::TimedOut) => (
                false,
                0,
                format!("connect timed out after {:?}", spec.timeout),
            ),
        };
    };
    // Through the engine's upstream connector rather than a client of its
    // own: the check reaches the endpoint the way requests do.
    let attempt = async {
        let mut sender = pool::connect(address, spec.timeout, None)
            .await
            .map_err(|e| e.to_string())?
            .sender;
        let host = spec.host.clone().unwrap_or_else(|| address.to_string());
        let method = Method::from_bytes(spec.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = Request::new(UpstreamBody::empty());
        *req.method_mut() = method;
        *req.uri_mut() = path
            .parse()
            .map_err(|_| format!("check path {path:?} is not a valid path"))?;
        let headers = req.headers_mut();
        headers.insert(
            header::HOST,
            HeaderValue::try_from(host).map_err(|e| e.to_string())?,
        );
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("pointsman-check"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        Ok::<u16, String>(resp.status().as_u16())
    };
    match tokio::time::timeout(spec.timeout, attempt).await {
        Ok(Ok(status)) => {
            let (lo, hi) = spec.expect_status;
            let passed = check::status_passes(status, spec.expect_status);
            (
                passed,
                status,
                if passed {
                    String::new()
                } else {
                    format!("status {status}, expected {lo}-{hi}")
                },
            )
        }
        Ok(Err(e)) => (false, 0, e),
        Err(_) => (false, 0, format!("no answer within {:?}", spec.timeout)),
    }
}
