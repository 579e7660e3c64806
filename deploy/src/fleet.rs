//! The fleet of proxies, and what each one confirms it has applied.
//!
//! Every proxy that follows etcd keeps a record under
//! `<pointsman>/proxies/<proxy-id>` (a [`ProxyRecord`], leased: it vanishes
//! with its proxy) naming its admin address. A change that must not hurt
//! traffic — an instance leaving, a rollout step — is written to etcd at
//! some revision `R`, and then every proxy is asked, through its admin
//! API, whether it has applied `R` and what it now does with the instance:
//!
//! - `GET /api/discovery`: the etcd source's `applied_revision`;
//! - `GET /api/services`: each endpoint's `state`, `in_flight` and
//!   `drain_notice`.
//!
//! Who is asked is decided so that no proxy drops out unnoticed. A
//! [`Fleet`] remembers every proxy it has seen — a live record, or named
//! by the caller — and keeps asking it even after its record is gone: a
//! record expires when its proxy is cut off from etcd or frozen, and such
//! a proxy may still be sending requests. A proxy leaves the set only when
//! it is known to send nothing: its record is gone *and* nothing listens at
//! its admin address any more (the process has exited: a proxy keeps its
//! admin listener open until its last request is over). Every such
//! departure is reported ([`FleetCheck::left`]). A fleet that knows no
//! proxy at all confirms nothing, unless the caller says an empty fleet is
//! expected ([`Fleet::allow_empty`]).
//!
//! A proxy that answers but has not applied `R` cannot know of a drain
//! written at `R`. For drains ([`Expectation::Drained`]) it is told
//! directly: `POST /api/drains` holds the instance in drain on that proxy
//! until it applies `R` itself, and the drain is confirmed once it shows
//! the notice and has nothing in flight (with the admin token, when the
//! proxy has one: [`Fleet::token`]).
//!
//! [`Expectation`] says what to wait for, [`Fleet::check`] asks every proxy
//! once, and [`Fleet::wait_until`] asks until all of them confirm or a
//! deadline passes, reporting each round so a caller can say who it is
//! still waiting for.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::GetOptions;
use futures_util::future::join_all;
use pointsman_discovery::admin_api::{ProxyRecord, ProxyView, ServiceView, SourceView};
use pointsman_discovery::conn::{EtcdConn, EtcdError};
use pointsman_discovery::http::{within, HttpConn, HttpError, Method};
use pointsman_discovery::keys::proxies_dir;
use pointsman_discovery::{AdminState, EtcdOptions, Prefixes};
use tokio::time::Instant;

/// How long a proxy may be behind a drain before it is told of it
/// directly.
const NOTICE_GRACE: Duration = Duration::from_secs(1);
/// The shortest time a proxy is given to answer, even past a deadline.
const MIN_PROBE: Duration = Duration::from_millis(200);

/// What to wait for on every proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expectation {
    /// The proxy has applied `revision` (or later).
    Applied { revision: i64 },
    /// The proxy sends nothing to the instance: it has applied `revision`
    /// (or holds a drain notice for it) and takes no new requests to the
    /// instance and has none in flight, or does not have it.
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

/// What a tool does when a drain is not confirmed by every proxy in time.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnUnconfirmed {
    /// Name the proxies and why, stop, and leave the instance running.
    #[default]
    Fail,
    /// Name the proxies and why, and go on anyway.
    Proceed,
}

/// A drain to tell proxies that have not applied it: `service`/`id` takes
/// no new requests from revision `revision` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainNotice {
    pub service: String,
    pub id: String,
    pub revision: i64,
}

impl Expectation {
    /// `Ok` if `view` meets the expectation, or why not yet.
    pub fn judge(&self, view: &ProxyView) -> Result<(), String> {
        match self {
            Expectation::Applied { revision } => applied(view, *revision),
            Expectation::Drained {
                service,
                id,
                revision,
            } => judge_drain(view, service, id, *revision),
            Expectation::Serving {
                service,
                id,
                revision,
            } => {
                applied(view, *revision)?;
                match view.endpoint(service, id) {
                    None => Err(format!("does not have {service}/{id} yet")),
                    Some(e) if e.state != AdminState::Ready => {
                        Err(format!("has {service}/{id} in state {}", e.state))
                    }
                    Some(e) if !e.healthy => Err(format!("sees {service}/{id} down")),
                    Some(_) => Ok(()),
                }
            }
            Expectation::Absent {
                service,
                id,
                revision,
            } => {
                applied(view, *revision)?;
                match view.endpoint(service, id) {
                    None => Ok(()),
                    Some(e) => Err(format!(
                        "still has {service}/{id} ({}, {} in flight)",
                        e.state, e.in_flight
                    )),
                }
            }
        }
    }

    /// The drain to tell proxies that are behind, for a drain.
    pub fn notice(&self) -> Option<DrainNotice> {
        match self {
            Expectation::Drained {
                service,
                id,
                revision,
            } => Some(DrainNotice {
                service: service.clone(),
                id: id.clone(),
                revision: *revision,
            }),
            _ => None,
        }
    }
}

/// `Ok` if the proxy follows etcd and has applied `revision`.
pub fn applied(view: &ProxyView, revision: i64) -> Result<(), String> {
    if !view.follows_etcd {
        return Err("does not follow etcd".to_string());
    }
    match view.applied_revision {
        Some(a) if a >= revision => Ok(()),
        Some(a) => Err(format!("applied revision {a}, waiting for {revision}")),
        None => Err(format!("applied no revision yet, waiting for {revision}")),
    }
}

/// `Ok` if the proxy sends nothing to `service`/`id` and will not again
/// before it applies `revision`: it has applied it, or holds a drain notice
/// for it; and it does not have the instance, or takes no new requests to
/// it and has none in flight.
pub fn judge_drain(view: &ProxyView, service: &str, id: &str, revision: i64) -> Result<(), String> {
    if let Err(behind) = applied(view, revision) {
        match view.endpoint(service, id) {
            Some(e) if e.drain_notice.is_some_and(|r| r >= revision) => {}
            _ => {
                return Err(format!(
                    "{behind}, and holds no drain notice for {service}/{id}"
                ))
            }
        }
    }
    judge_drained(view, service, id)
}

/// `Ok` if the proxy sends nothing to `service`/`id` now: it does not have
/// the instance, or takes no new requests to it and has none in flight.
/// (The drain part of [`Expectation::Drained`], for proxies found without
/// a revision to compare, as with Consul.)
pub fn judge_drained(view: &ProxyView, service: &str, id: &str) -> Result<(), String> {
    match view.endpoint(service, id) {
        None => Ok(()),
        Some(e) if e.state == AdminState::Ready && e.local_state => Err(format!(
            "still sends new requests to {service}/{id}: its state ready was set on this proxy, \
             which wins over the registry ({} in flight); clear it with \
             `pointsman ctl --admin <this proxy's admin address> reset {service}/{id}`",
            e.in_flight
        )),
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
/// each within `limit`, and judges its answer. (For proxies named by
/// address only, as with Consul; a [`Fleet`] asks its own.)
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

/// A proxy that left the set: known to send nothing any more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Departure {
    pub id: String,
    pub admin: String,
    pub why: String,
}

/// One round of asking every proxy of the set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetCheck {
    pub proxies: Vec<ProxyVerdict>,
    /// Proxies that left the set in this round, with why.
    pub left: Vec<Departure>,
    /// Records under `<pointsman>/proxies/` that do not parse, with why;
    /// they are not counted as proxies.
    pub malformed: Vec<String>,
    /// Set when no proxy could be asked (the proxies could not be listed
    /// and none is known, or none exists and that was not expected):
    /// nothing is confirmed.
    pub error: Option<String>,
    /// The proxies could not be listed this round; the known ones were
    /// asked.
    pub listing: Option<String>,
    /// No proxy is known (and an empty fleet was not expected): waiting
    /// changes nothing, so the waits end at once.
    pub empty: bool,
}

impl FleetCheck {
    /// Whether every proxy of the set confirmed (never for a set that
    /// could not be made: see [`FleetCheck::error`]).
    pub fn confirmed(&self) -> bool {
        self.error.is_none() && self.proxies.iter().all(|p| p.pending.is_none())
    }

    /// The proxies that have not confirmed.
    pub fn pending(&self) -> impl Iterator<Item = &ProxyVerdict> {
        self.proxies.iter().filter(|p| p.pending.is_some())
    }

    /// One line for a log: who confirmed, who is still waited for and why,
    /// who left the set.
    pub fn summary(&self) -> String {
        let mut out = self.tally();
        for d in &self.left {
            out.push_str(&format!("; {} ({}) left the set: {}", d.id, d.admin, d.why));
        }
        if let Some(e) = &self.listing {
            out.push_str(&format!("; asked the proxies already known: {e}"));
        }
        out
    }

    fn tally(&self) -> String {
        if let Some(e) = &self.error {
            return e.clone();
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
        if total == 0 {
            return "no proxy to ask (an empty fleet, as allowed)".to_string();
        }
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

/// A proxy of the set.
#[derive(Clone, Debug)]
struct Member {
    admin: String,
    /// Named by the caller: waited for whatever etcd says.
    named: bool,
    /// Had a live record at the last listing.
    live: bool,
}

/// One proxy's verdict before it is folded into a [`FleetCheck`].
enum Verdict {
    Confirmed,
    Pending(String),
    Gone(String),
}

/// The proxies to ask, and the questions to ask them; see the module
/// documentation for who is in the set.
pub struct Fleet {
    conn: EtcdConn,
    prefixes: Prefixes,
    /// Every proxy seen or named, by id.
    members: BTreeMap<String, Member>,
    /// (proxy, drain revision) -> when the proxy was first seen behind it.
    behind_since: BTreeMap<(String, i64), Instant>,
    /// Limit for one proxy's answer (both admin requests).
    pub probe_timeout: Duration,
    /// Time between rounds in [`wait_until`](Self::wait_until).
    pub poll_interval: Duration,
    /// Sent with drain notices, for proxies whose admin API has a token.
    pub token: Option<String>,
    /// Whether a fleet without any proxy confirms (there is no proxy on
    /// purpose); by default it confirms nothing.
    pub allow_empty: bool,
    /// What the tools do with a drain that is not confirmed in time.
    pub on_unconfirmed: OnUnconfirmed,
}

impl Fleet {
    /// A fleet read from the etcd `etcd` points at; connects lazily.
    pub fn new(etcd: EtcdOptions) -> Result<Fleet, EtcdError> {
        let prefixes = etcd.prefixes.clone();
        Ok(Fleet {
            conn: EtcdConn::new(etcd)?,
            prefixes,
            members: BTreeMap::new(),
            behind_since: BTreeMap::new(),
            probe_timeout: Duration::from_secs(2),
            poll_interval: Duration::from_millis(100),
            token: None,
            allow_empty: false,
            on_unconfirmed: OnUnconfirmed::Fail,
        })
    }

    /// Adds a proxy by its admin address, waited for whether or not it
    /// has a record (its id is the address unless a record names it).
    pub fn name(&mut self, admin: &str) {
        let known = self.members.values_mut().find(|m| m.admin == admin);
        match known {
            Some(m) => m.named = true,
            None => {
                self.members.insert(
                    admin.to_string(),
                    Member {
                        admin: admin.to_string(),
                        named: true,
                        live: false,
                    },
                );
            }
        }
    }

    /// The ids of the proxies in the set, with their admin addresses.
    pub fn members(&self) -> Vec<(String, String)> {
        self.members
            .iter()
            .map(|(id, m)| (id.clone(), m.admin.clone()))
            .collect()
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

    /// Lists the live records and adds them to the set; the keys that did
    /// not parse.
    pub async fn refresh(&mut self) -> Result<Vec<String>, EtcdError> {
        let (records, malformed) = self.proxies().await?;
        for m in self.members.values_mut() {
            m.live = false;
        }
        for r in records {
            // A named proxy found under its record's id is one member.
            let named = self
                .members
                .iter()
                .find(|(id, m)| **id != r.id && m.named && !m.live && m.admin == r.admin)
                .map(|(id, _)| id.clone());
            if let Some(old) = &named {
                self.members.remove(old);
            }
            let m = self.members.entry(r.id).or_insert(Member {
                admin: r.admin.clone(),
                named: named.is_some(),
                live: true,
            });
            m.admin = r.admin;
            m.live = true;
        }
        Ok(malformed)
    }

    /// Asks every proxy of the set once, all at the same time, whether it
    /// meets `expect`.
    pub async fn check(&mut self, expect: &Expectation) -> FleetCheck {
        let judged = expect.clone();
        self.check_with(move |v| judged.judge(v), expect.notice())
            .await
    }

    /// [`check`](Self::check) with any judgement of a proxy's view; with a
    /// `notice`, proxies that have not applied its revision are told of
    /// the drain directly.
    pub async fn check_with<J>(&mut self, judge: J, notice: Option<DrainNotice>) -> FleetCheck
    where
        J: Fn(&ProxyView) -> Result<(), String> + Sync,
    {
        self.check_round(judge, notice, self.probe_timeout).await
    }

    /// One round, each proxy answering within `limit`.
    async fn check_round<J>(
        &mut self,
        judge: J,
        notice: Option<DrainNotice>,
        limit: Duration,
    ) -> FleetCheck
    where
        J: Fn(&ProxyView) -> Result<(), String> + Sync,
    {
        let mut out = FleetCheck::default();
        match self.refresh().await {
            Ok(malformed) => out.malformed = malformed,
            Err(e) if self.members.is_empty() => {
                out.error = Some(format!("cannot list the proxies: {e}"));
                return out;
            }
            Err(e) => out.listing = Some(format!("cannot list the proxies: {e}")),
        }
        if self.members.is_empty() && !self.allow_empty {
            out.empty = true;
            out.error = Some(format!(
                "no proxy is known: none has a record under {} and none was named, so nothing can confirm (say so if the fleet is empty on purpose)",
                proxies_dir(&self.prefixes)
            ));
            return out;
        }
        let token = self.token.as_deref();
        let now = Instant::now();
        let behind_since = &self.behind_since;
        let asked = join_all(self.members.iter().map(|(id, m)| {
            // A proxy that follows etcd applies a drain within
            // milliseconds; only one still behind after a grace is told,
            // so a notice never races a proxy that is merely catching up.
            let revision = notice.as_ref().map(|n| n.revision);
            let tell_now = notice.clone().filter(|n| {
                behind_since
                    .get(&(id.clone(), n.revision))
                    .is_some_and(|since| now.duration_since(*since) >= NOTICE_GRACE)
            });
            let judge = &judge;
            async move {
                let (verdict, behind) =
                    ask_member(m, limit, token, judge, revision, tell_now).await;
                (id.clone(), m.admin.clone(), verdict, behind)
            }
        }))
        .await;
        for (id, admin, verdict, behind) in asked {
            if let (Some(behind), Some(n)) = (behind, &notice) {
                let key = (id.clone(), n.revision);
                if behind {
                    self.behind_since.entry(key).or_insert(now);
                } else {
                    self.behind_since.remove(&key);
                }
            }
            match verdict {
                Verdict::Confirmed => out.proxies.push(ProxyVerdict {
                    id,
                    admin,
                    pending: None,
                }),
                Verdict::Pending(why) => out.proxies.push(ProxyVerdict {
                    id,
                    admin,
                    pending: Some(why),
                }),
                Verdict::Gone(why) => {
                    self.members.remove(&id);
                    out.left.push(Departure { id, admin, why });
                }
            }
        }
        out.proxies.sort_by(|a, b| a.id.cmp(&b.id));
        out.left.sort_by(|a, b| a.id.cmp(&b.id));
        if out.proxies.is_empty() && !self.allow_empty {
            out.empty = true;
            out.error = Some(format!(
                "no proxy is left to confirm{}",
                if out.left.is_empty() {
                    String::new()
                } else {
                    format!(
                        ": {}",
                        out.left
                            .iter()
                            .map(|d| format!("{} ({}) left the set: {}", d.id, d.admin, d.why))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                }
            ));
        }
        out
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
            // A round ends by the deadline, or soon after with a slow etcd:
            // a whole round says who was waited for and why.
            let limit = self
                .probe_timeout
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(MIN_PROBE);
            let judged = expect.clone();
            let round = self
                .check_round(move |v| judged.judge(v), expect.notice(), limit)
                .await;
            progress(&round);
            if round.confirmed() {
                return Ok(round);
            }
            if round.empty || Instant::now() + self.poll_interval >= deadline {
                return Err(FleetError::Timeout {
                    waited: start.elapsed(),
                    last: round,
                });
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// [`wait_until`](Self::wait_until) every proxy has applied `revision`
    /// (or holds a drain notice) and has nothing in flight to
    /// `service`/`id` (or does not have it).
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

/// Asks one proxy of the set whether it meets `judge`, telling it of
/// `notice` if it is behind; also whether it is behind the drain's
/// `revision` (`None`: not known).
async fn ask_member<J>(
    m: &Member,
    limit: Duration,
    token: Option<&str>,
    judge: &J,
    revision: Option<i64>,
    notice: Option<DrainNotice>,
) -> (Verdict, Option<bool>)
where
    J: Fn(&ProxyView) -> Result<(), String> + Sync,
{
    let mut behind = None;
    let verdict = ask_member_once(m, limit, token, judge, (revision, notice), &mut behind).await;
    (verdict, behind)
}

/// [`ask_member`]; `behind` is set once the proxy's applied revision is
/// known.
async fn ask_member_once<J>(
    m: &Member,
    limit: Duration,
    token: Option<&str>,
    judge: &J,
    (revision, notice): (Option<i64>, Option<DrainNotice>),
    behind: &mut Option<bool>,
) -> Verdict
where
    J: Fn(&ProxyView) -> Result<(), String> + Sync,
{
    let record = if m.live || m.named {
        ""
    } else {
        " (its record in etcd is gone: cut off from etcd, frozen, or stopped without a word)"
    };
    let view = match probe_conn(&m.admin, limit).await {
        Ok(v) => v,
        Err(e) if e.refused() && !m.live && !m.named => {
            return Verdict::Gone(
                "its record is gone and nothing listens at its admin address: it has stopped"
                    .to_string(),
            )
        }
        Err(e) => return Verdict::Pending(format!("admin API did not answer: {e}{record}")),
    };
    *behind = revision.map(|r| applied(&view, r).is_err());
    let why = match judge(&view) {
        Ok(()) => return Verdict::Confirmed,
        Err(why) => why,
    };
    let Some(notice) = notice.filter(|n| applied(&view, n.revision).is_err()) else {
        return Verdict::Pending(format!("{why}{record}"));
    };
    // Behind the drain: tell it, then look again.
    if let Err(e) = tell(&m.admin, limit, token, &notice).await {
        return Verdict::Pending(format!("{why}; the drain notice was refused: {e}{record}"));
    }
    match probe_conn(&m.admin, limit).await {
        // Not there at all: the notice holds it out should it arrive.
        Ok(v) if v.endpoint(&notice.service, &notice.id).is_none() => Verdict::Confirmed,
        Ok(v) => match judge(&v) {
            Ok(()) => Verdict::Confirmed,
            Err(why) => Verdict::Pending(format!("{why}{record}")),
        },
        Err(e) => Verdict::Pending(format!("admin API did not answer: {e}{record}")),
    }
}

/// `POST /api/drains`: holds the instance in drain on the proxy at `admin`
/// until it has applied the notice's revision.
async fn tell(
    admin: &str,
    limit: Duration,
    token: Option<&str>,
    notice: &DrainNotice,
) -> Result<(), HttpError> {
    let body = serde_json::json!({
        "service": notice.service,
        "id": notice.id,
        "until_revision": notice.revision,
    });
    within(admin, limit, async {
        let mut conn = HttpConn::open(admin).await?.with_token(token);
        conn.send_ok(
            Method::POST,
            "/api/drains",
            Some(Bytes::from(body.to_string())),
        )
        .await
        .map(|_| ())
    })
    .await
}

/// Asks one proxy's admin API at `admin` (`host:port`) what it has applied
/// and what it does with each endpoint, within `limit`.
pub async fn probe(admin: &str, limit: Duration) -> Result<ProxyView, String> {
    probe_conn(admin, limit).await.map_err(|e| e.to_string())
}

async fn probe_conn(admin: &str, limit: Duration) -> Result<ProxyView, HttpError> {
    within(admin, limit, async {
        let mut conn = HttpConn::open(admin).await?;
        let sources: Vec<SourceView> = conn.get_json("/api/discovery").await?;
        let services: Vec<ServiceView> = conn.get_json("/api/services").await?;
        Ok(ProxyView::new(&sources, services))
    })
    .await
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
            Err(
                "applied revision 9, waiting for 10, and holds no drain notice for web/a"
                    .to_string()
            )
        );
        // Behind, but holding the notice: drained once nothing is in flight.
        let mut noticed = view(Some(9), &[("a", AdminState::Drain, 1)]);
        noticed.services[0].endpoints[0].drain_notice = Some(10);
        assert_eq!(
            drained.judge(&noticed),
            Err("1 request in flight to web/a".to_string())
        );
        noticed.services[0].endpoints[0].in_flight = 0;
        assert_eq!(drained.judge(&noticed), Ok(()));
        // A notice for an older drain does not count.
        noticed.services[0].endpoints[0].drain_notice = Some(9);
        assert!(drained.judge(&noticed).is_err());
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
}
