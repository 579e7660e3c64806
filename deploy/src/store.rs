//! The registry as rollouts and `pointsman ctl` write it: fleet-wide
//! overrides, map entries and routes under the pointsman root, and the
//! instances of a service under the services root. Every write returns the
//! etcd revision it created, which is what proxies confirm they applied.
//! Requests go through [`EtcdConn`] (bounded, one member at a time), and one
//! that etcd could not answer for now is tried again on the next member, so
//! a leader election on a busy cluster does not fail a rollout.

use std::future::Future;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use pointsman_discovery::backoff::Backoff;
use pointsman_discovery::conn::{EtcdConn, EtcdError};
use pointsman_discovery::{
    parse_entry, AdminState, Entry, EtcdOptions, Override, PauseSpec, Prefixes, Registration,
    RouteSpec,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::DeployError;
use pointsman_discovery::keys;

/// Tries of one request while etcd could not answer it (at least one per
/// member, see [`Store::tries`]).
const TRIES: usize = 4;

/// A connection to the registry with the key layout of one deployment.
pub struct Store {
    conn: EtcdConn,
    prefixes: Prefixes,
}

/// A value with the revision that last changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

impl Store {
    /// Connects to the first member that answers, tried in order, so that a
    /// registry nobody can reach fails here rather than mid-rollout.
    pub async fn connect(opts: &EtcdOptions) -> Result<Store, DeployError> {
        let failed = |reason: String| DeployError::Registry {
            what: "connect".into(),
            reason,
        };
        let conn = EtcdConn::new(opts.clone()).map_err(|e| failed(e.to_string()))?;
        let mut store = Store {
            conn,
            prefixes: opts.prefixes.clone(),
        };
        let mut errors = Vec::new();
        for _ in 0..opts.endpoints.len() {
            // A failed call moves the connection on to the next member.
            match store
                .conn
                .call("status", |mut c| async move { c.status().await })
                .await
            {
                Ok(_) => return Ok(store),
                Err(e) => errors.push(reason(&e)),
            }
        }
        Err(failed(errors.join("; ")))
    }

    /// How often one request is tried: a few times, and on every member.
    fn tries(&self) -> usize {
        TRIES.max(self.conn.opts().endpoints.len() + 1)
    }

    /// Runs one request, again on the next member after a backoff while
    /// etcd could not answer it (unreachable, no answer in time, no
    /// leader). Every request here is safe to repeat: reads, puts and
    /// deletes of a fixed value, and compare-and-swap txns, whose repeat
    /// after a write that did land fails its compare and sends the caller
    /// back to read.
    async fn request<T, F, Fut>(
        &mut self,
        verb: &'static str,
        what: &str,
        f: F,
    ) -> Result<T, DeployError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let opts = self.conn.opts();
        let mut backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
        let tries = self.tries();
        let mut tried = 1;
        loop {
            match self.conn.call(verb, &f).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && tried < tries => {
                    let delay = backoff.next();
                    tracing::warn!(
                        "registry: {what} failed ({e}); trying {} in {delay:?} ({tried} of {tries} tries)",
                        self.conn.endpoint()
                    );
                    tokio::time::sleep(delay).await;
                    tried += 1;
                }
                Err(e) => {
                    return Err(DeployError::Registry {
                        what: what.to_string(),
                        reason: reason(&e),
                    })
                }
            }
        }
    }

    pub fn prefixes(&self) -> &Prefixes {
        &self.prefixes
    }

    /// The key of a service instance.
    pub fn instance_key(&self, service: &str, id: &str) -> String {
        keys::instance_key(&self.prefixes, service, id)
    }

    /// The current revision of the registry.
    pub async fn revision(&mut self) -> Result<i64, DeployError> {
        let resp = self
            .request("read", "read the revision", |mut c| async move {
                c.get("/", Some(GetOptions::new().with_count_only())).await
            })
            .await?;
        header_revision(resp.header())
    }

    async fn get_raw(&mut self, key: &str) -> Result<Option<(Vec<u8>, i64)>, DeployError> {
        let resp = self
            .request("read", &format!("read {key}"), |mut c| async move {
                c.get(key, None).await
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn get_json<T: DeserializeOwned>(
        &mut self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, DeployError> {
        match self.get_raw(key).await? {
            None => Ok(None),
            Some((raw, rev)) => {
                let value = serde_json::from_slice(&raw).map_err(|e| DeployError::Malformed {
                    key: key.to_string(),
                    reason: e.to_string(),
                })?;
                Ok(Some(Versioned {
                    value,
                    mod_revision: rev,
                }))
            }
        }
    }

    /// Writes `value` at `key` only if the key is still at `expected`
    /// (`None`: absent); returns the new revision, or `None` if someone
    /// else changed it first.
    async fn put_if(
        &mut self,
        key: &str,
        value: Option<Vec<u8>>,
        expected: Option<i64>,
    ) -> Result<Option<i64>, DeployError> {
        let cmp = match expected {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
            None => Compare::version(key, CompareOp::Equal, 0),
        };
        let op = match value {
            Some(v) => TxnOp::put(key, v, None),
            None => TxnOp::delete(key, None),
        };
        let txn = Txn::new().when([cmp]).and_then([op]);
        let resp = self
            .request("write", &format!("write {key}"), |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        header_revision(resp.header()).map(Some)
    }

    /// Reads, changes and writes back a JSON value, again if another
    /// writer got in between. `change` returning `None` deletes the key.
    async fn update_json<T, F>(&mut self, key: &str, mut change: F) -> Result<i64, DeployError>
    where
        T: DeserializeOwned + Serialize,
        F: FnMut(Option<T>) -> Option<T>,
    {
        for _ in 0..16 {
            let current = self.get_json::<T>(key).await?;
            let expected = current.as_ref().map(|c| c.mod_revision);
            let next = change(current.map(|c| c.value));
            let bytes = match &next {
                Some(v) => Some(serde_json::to_vec(v).map_err(|e| DeployError::Malformed {
                    key: key.to_string(),
                    reason: e.to_string(),
                })?),
                None if expected.is_none() => return self.revision().await,
                None => None,
            };
            if let Some(rev) = self.put_if(key, bytes, expected).await? {
                return Ok(rev);
            }
        }
        Err(DeployError::Contended(key.to_string()))
    }

    /// The fleet-wide override of an instance.
    pub async fn override_of(
        &mut self,
        service: &str,
        id: &str,
    ) -> Result<Option<Override>, DeployError> {
        let key = keys::override_key(&self.prefixes, service, id);
        Ok(self.get_json::<Override>(&key).await?.map(|v| v.value))
    }

    /// Sets the given fields of an instance's fleet-wide override, keeping
    /// the others.
    pub async fn set_override(
        &mut self,
        service: &str,
        id: &str,
        state: Option<AdminState>,
        weight: Option<u16>,
    ) -> Result<i64, DeployError> {
        let key = keys::override_key(&self.prefixes, service, id);
        self.update_json::<Override, _>(&key, |cur| {
            let mut o = cur.unwrap_or_default();
            o.state = state.or(o.state);
            o.weight = weight.or(o.weight);
            Some(o)
        })
        .await
    }

    /// Puts an override back exactly as it was (`None`: no override).
    pub async fn restore_override(
        &mut self,
        service: &str,
        id: &str,
        previous: Option<Override>,
    ) -> Result<i64, DeployError> {
        let key = keys::override_key(&self.prefixes, service, id);
        self.update_json::<Override, _>(&key, |_| previous.clone())
            .await
    }

    /// A map entry and the revision that last set it.
    pub async fn map_entry(
        &mut self,
        map: &str,
        key: &str,
    ) -> Result<Option<Versioned<String>>, DeployError> {
        let k = keys::map_key(&self.prefixes, map, key);
        Ok(self.get_raw(&k).await?.map(|(raw, rev)| Versioned {
            value: String::from_utf8_lossy(&raw).trim().to_string(),
            mod_revision: rev,
        }))
    }

    /// Sets a map entry; returns its revision.
    pub async fn set_map(&mut self, map: &str, key: &str, value: &str) -> Result<i64, DeployError> {
        let k = keys::map_key(&self.prefixes, map, key);
        let resp = self
            .request("write", &format!("write {k}"), |mut c| {
                let k = k.clone();
                async move { c.put(k, value, None).await }
            })
            .await?;
        header_revision(resp.header())
    }

    /// Sets a map entry and records the value it replaces (for `deploy
    /// rollback`) in the same transaction; returns the revision and the
    /// previous value.
    pub async fn switch_map(
        &mut self,
        map: &str,
        key: &str,
        value: &str,
    ) -> Result<(i64, Option<String>), DeployError> {
        let k = keys::map_key(&self.prefixes, map, key);
        let history = keys::map_history_key(&self.prefixes, map, key);
        // The previous value of an attempt whose compare failed: a retried
        // txn fails its compare when its first try did land, and then the
        // entry already holds `value` and `current` no longer tells what
        // it replaced.
        let mut replaced: Option<Option<String>> = None;
        for _ in 0..16 {
            let current = self.get_raw(&k).await?;
            if let (Some((raw, rev)), Some(before)) = (&current, &replaced) {
                if String::from_utf8_lossy(raw).trim() == value {
                    return Ok((*rev, before.clone()));
                }
            }
            let cmp = match &current {
                Some((_, rev)) => Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev),
                None => Compare::version(k.as_str(), CompareOp::Equal, 0),
            };
            let previous = current.map(|(raw, _)| String::from_utf8_lossy(&raw).trim().to_string());
            let mut ops = vec![TxnOp::put(k.as_str(), value, None)];
            if let Some(p) = &previous {
                if p != value {
                    ops.push(TxnOp::put(history.as_str(), p.as_str(), None));
                }
            }
            let txn = Txn::new().when([cmp]).and_then(ops);
            let resp = self
                .request("write", &format!("write {k}"), |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if resp.succeeded() {
                return Ok((header_revision(resp.header())?, previous));
            }
            replaced.get_or_insert(previous);
        }
        Err(DeployError::Contended(k))
    }

    /// The value a map entry had before its last switch.
    pub async fn switched_from(
        &mut self,
        map: &str,
        key: &str,
    ) -> Result<Option<String>, DeployError> {
        let history = keys::map_history_key(&self.prefixes, map, key);
        Ok(self
            .get_raw(&history)
            .await?
            .map(|(raw, _)| String::from_utf8_lossy(&raw).trim().to_string()))
    }

    /// Deletes a map entry; returns the revision (the current one if it
    /// was not there).
    pub async fn delete_map(&mut self, map: &str, key: &str) -> Result<i64, DeployError> {
        let k = keys::map_key(&self.prefixes, map, key);
        let resp = self
            .request("delete", &format!("delete {k}"), |mut c| {
                let k = k.clone();
                async move { c.delete(k, None).await }
            })
            .await?;
        header_revision(resp.header())
    }

    /// Registers instance `id` of `service` at `address` (a plain
    /// `host:port` value, with no lease: it stays until deleted); returns
    /// the revision.
    pub async fn put_instance(
        &mut self,
        service: &str,
        id: &str,
        address: &str,
    ) -> Result<i64, DeployError> {
        let key = self.instance_key(service, id);
        self.put_text(&key, address.to_string()).await
    }

    /// Deletes instance `id`'s registration; returns the revision.
    pub async fn delete_instance(&mut self, service: &str, id: &str) -> Result<i64, DeployError> {
        let key = self.instance_key(service, id);
        self.delete_key(&key).await
    }

    /// Pauses `service` on every proxy (see [`PauseSpec`]); returns the
    /// revision of the write.
    pub async fn set_pause(&mut self, service: &str, spec: &PauseSpec) -> Result<i64, DeployError> {
        let key = keys::pause_key(&self.prefixes, service);
        let value = serde_json::to_string(spec).map_err(|e| DeployError::Malformed {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        self.put_text(&key, value).await
    }

    /// Resumes `service`: deletes its pause; returns the revision.
    pub async fn delete_pause(&mut self, service: &str) -> Result<i64, DeployError> {
        let key = keys::pause_key(&self.prefixes, service);
        self.delete_key(&key).await
    }

    /// Puts `service` in maintenance on every proxy, its requests
    /// answered 503 with `page` (empty: the 503 page); returns the revision.
    pub async fn set_maintenance(
        &mut self,
        service: &str,
        page: String,
    ) -> Result<i64, DeployError> {
        let key = keys::maintenance_key(&self.prefixes, service);
        self.put_text(&key, page).await
    }

    /// Ends `service`'s maintenance; returns the revision.
    pub async fn delete_maintenance(&mut self, service: &str) -> Result<i64, DeployError> {
        let key = keys::maintenance_key(&self.prefixes, service);
        self.delete_key(&key).await
    }

    async fn put_text(&mut self, key: &str, value: String) -> Result<i64, DeployError> {
        let resp = self
            .request("write", &format!("write {key}"), |mut c| {
                let (k, v) = (key.to_string(), value.clone());
                async move { c.put(k, v, None).await }
            })
            .await?;
        header_revision(resp.header())
    }

    async fn delete_key(&mut self, key: &str) -> Result<i64, DeployError> {
        let k = key.to_string();
        let resp = self
            .request("delete", &format!("delete {k}"), |mut c| {
                let k = k.clone();
                async move { c.delete(k, None).await }
            })
            .await?;
        header_revision(resp.header())
    }

    /// A route from the registry.
    pub async fn route(&mut self, name: &str) -> Result<Option<Versioned<RouteSpec>>, DeployError> {
        let key = keys::route_key(&self.prefixes, name);
        self.get_json(&key).await
    }

    /// Writes a route; returns its revision.
    pub async fn put_route(&mut self, name: &str, spec: &RouteSpec) -> Result<i64, DeployError> {
        let key = keys::route_key(&self.prefixes, name);
        spec.target().map_err(|why| DeployError::Malformed {
            key: key.clone(),
            reason: why,
        })?;
        let value = serde_json::to_vec(spec).map_err(|e| DeployError::Malformed {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        let resp = self
            .request("write", &format!("write {key}"), |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, None).await }
            })
            .await?;
        header_revision(resp.header())
    }

    /// The registered instances of a service, sorted by id; values that do
    /// not parse are reported, not skipped, since a rollout must know
    /// every instance.
    pub async fn instances(
        &mut self,
        service: &str,
    ) -> Result<Vec<Versioned<Registration>>, DeployError> {
        let prefix = keys::service_dir(&self.prefixes, service);
        let resp = self
            .request("list", &format!("list {prefix}"), |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match parse_entry(&self.prefixes, &key, kv.value()) {
                Ok(Some(Entry::Instance(reg))) => out.push(Versioned {
                    value: reg,
                    mod_revision: kv.mod_revision(),
                }),
                Ok(_) => {}
                Err(e) => {
                    return Err(DeployError::Malformed {
                        key,
                        reason: e.to_string(),
                    })
                }
            }
        }
        out.sort_by(|a, b| a.value.id.cmp(&b.value.id));
        Ok(out)
    }

    /// One instance's registration, if it is registered.
    pub async fn instance(
        &mut self,
        service: &str,
        id: &str,
    ) -> Result<Option<Versioned<Registration>>, DeployError> {
        let key = self.instance_key(service, id);
        match self.get_raw(&key).await? {
            None => Ok(None),
            Some((raw, rev)) => match parse_entry(&self.prefixes, &key, &raw) {
                Ok(Some(Entry::Instance(reg))) => Ok(Some(Versioned {
                    value: reg,
                    mod_revision: rev,
                })),
                Ok(_) => Ok(None),
                Err(e) => Err(DeployError::Malformed {
                    key,
                    reason: e.to_string(),
                }),
            },
        }
    }
}

/// The final reason of a failed request: etcd's answer behind the member
/// that gave it (the verb is already in the caller's "cannot ...").
fn reason(e: &EtcdError) -> String {
    match e {
        EtcdError::Request {
            endpoint, reason, ..
        }
        | EtcdError::Unavailable {
            endpoint, reason, ..
        } => format!("etcd at {endpoint}: {reason}"),
        EtcdError::Timeout {
            endpoint, limit, ..
        } => format!("etcd at {endpoint}: no answer within {limit:?}"),
        other => other.to_string(),
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<i64, DeployError> {
    h.map(|h| h.revision())
        .ok_or_else(|| DeployError::Registry {
            what: "read the revision".into(),
            reason: "etcd answered without a response header".into(),
        })
}
