//! The writing side of the registry contract: one instance registering
//! itself, as `pointsman register` does for the app beside it.
//!
//! A [`Registrar`] keeps `<services>/<service>/<id>` in etcd under a lease
//! (see [`pointsman_discovery::lease`]): it is written by [`register`](Registrar::register),
//! rewritten in place by [`set_state`](Registrar::set_state) (`drain` takes
//! the instance out of rotation while its requests finish), kept alive, and
//! written again under a new lease if etcd loses the old one. Each write
//! returns its etcd revision, so a caller can wait until every proxy has
//! applied it (see [`crate::fleet`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use pointsman_discovery::conn::EtcdError;
use pointsman_discovery::keys;
use pointsman_discovery::lease::{LeaseState, LeasedKey};
use pointsman_discovery::parse::parse_instance;
use pointsman_discovery::{Address, AdminState, CheckSpec, EtcdOptions, ParseError, Registration};

/// Why a registrar could not start.
#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    /// The registration would not parse back from etcd: a bad service name,
    /// instance id, weight or check.
    #[error("{0}")]
    Invalid(#[from] ParseError),
    #[error("{0}")]
    Etcd(#[from] EtcdError),
}

/// One instance's registration, kept in etcd; see the module documentation.
pub struct Registrar {
    lease: LeasedKey,
    registration: Registration,
}

impl Registrar {
    /// Prepares the registration of `registration` with a lease of `ttl`.
    /// Nothing is written until [`register`](Self::register). Fails if the
    /// registration is not one the proxies would accept, or if the etcd
    /// options can never work. Call it within a Tokio runtime.
    pub fn new(
        etcd: EtcdOptions,
        ttl: Duration,
        registration: Registration,
    ) -> Result<Registrar, RegistrarError> {
        let key = keys::instance_key(&etcd.prefixes, &registration.service, &registration.id);
        // What the proxies will parse, checked before anything is written.
        parse_instance(
            &key,
            &registration.service,
            &registration.id,
            registration_value(&registration).as_bytes(),
        )?;
        let lease = LeasedKey::start(etcd, key, ttl)?;
        Ok(Registrar {
            lease,
            registration,
        })
    }

    /// `<services>/<service>/<id>`.
    pub fn key(&self) -> &str {
        self.lease.key()
    }

    pub fn registration(&self) -> &Registration {
        &self.registration
    }

    /// Follows the lease: held (with the revision of the last write), lost,
    /// or pending while etcd is unreachable.
    pub fn lease_state(&self) -> watch::Receiver<LeaseState> {
        self.lease.state()
    }

    /// Writes the registration; returns the revision of the write. On an
    /// error the write is retried in the background with backoff.
    pub async fn register(&self) -> Result<i64, EtcdError> {
        self.lease.put(registration_value(&self.registration)).await
    }

    /// Rewrites the registration with `state`, under the same lease (and
    /// registers it if it was not); returns the revision of the write.
    pub async fn set_state(&mut self, state: AdminState) -> Result<i64, EtcdError> {
        self.registration.state = state;
        self.register().await
    }

    /// Deletes the registration and revokes its lease; returns the revision
    /// of the delete.
    pub async fn deregister(self) -> Result<i64, EtcdError> {
        self.lease.delete().await
    }
}

/// The JSON value of a registration, as `SCHEMA.md` describes it; empty
/// tags, meta and a missing check are left out.
pub fn registration_value(registration: &Registration) -> String {
    #[derive(Serialize)]
    struct Value<'a> {
        address: &'a Address,
        weight: u16,
        state: AdminState,
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        tags: &'a [String],
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        meta: &'a BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        check: Option<&'a CheckSpec>,
    }
    let value = Value {
        address: &registration.address,
        weight: registration.weight,
        state: registration.state,
        tags: &registration.tags,
        meta: &registration.meta,
        check: registration.check.as_ref(),
    };
    // Plain strings, numbers and maps of strings: serializing cannot fail.
    serde_json::to_string(&value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_parses_back_to_the_same_registration() {
        let mut reg = Registration::new("web", "host1:8080", "10.0.0.5:8080".parse().unwrap());
        reg.weight = 20;
        reg.state = AdminState::Drain;
        reg.tags = vec!["green".into()];
        reg.meta.insert("version".into(), "2".into());
        let key = keys::instance_key(
            &pointsman_discovery::Prefixes::default(),
            "web",
            "host1:8080",
        );
        assert_eq!(key, "/services/web/host1:8080");
        let value = registration_value(&reg);
        assert_eq!(
            value,
            r#"{"address":"10.0.0.5:8080","weight":20,"state":"drain","tags":["green"],"meta":{"version":"2"}}"#
        );
        let back = parse_instance(&key, "web", "host1:8080", value.as_bytes()).unwrap();
        assert_eq!(back, reg);

        let plain = Registration::new("web", "a", "[fd00::7]:80".parse().unwrap());
        assert_eq!(
            registration_value(&plain),
            r#"{"address":"[fd00::7]:80","weight":1,"state":"ready"}"#
        );
    }

    #[tokio::test]
    async fn a_registration_the_proxies_would_refuse_is_refused_here() {
        let mut reg = Registration::new("web", "a/b", "10.0.0.5:8080".parse().unwrap());
        let etcd = EtcdOptions::default();
        let err = Registrar::new(etcd.clone(), Duration::from_secs(10), reg.clone())
            .err()
            .expect("an id with a slash");
        assert!(err.to_string().contains("must not contain '/'"), "{err}");
        reg.id = "a".into();
        reg.weight = 300;
        let err = Registrar::new(etcd, Duration::from_secs(10), reg)
            .err()
            .expect("weight 300");
        assert!(err.to_string().contains("out of range"), "{err}");
    }
}
