//! API keys and grants, durable in the `#auth` catalog (`catalog.rs`): a key or a grant is
//! one entry ("key:<id>", "acl:<id>"); revoking it removes the entry. What they mean is
//! tidewater-auth's (`AuthState`); the listeners read a snapshot of it per request
//! (`Broker::auth`), so a change applies to the next request of every connection.

use std::sync::Arc;

use parking_lot::RwLock;
use rand::Rng;
use tidewater_auth::keys::{self, KeyInfo, KeySpec};
use tidewater_auth::{Acl, AclSpec, ApiKey, AuthState, Change};
use tidewater_storage::{RecoveredLog, Store};

use super::Broker;
use super::catalog::Catalog;
use crate::error::{BrokerError, ErrorCode};

/// The name of the log holding keys and grants (no queue or stream can have it).
pub(crate) const AUTH_LOG: &str = "#auth";

const KEY_PREFIX: &str = "key:";
const ACL_PREFIX: &str = "acl:";

pub(crate) struct Auth {
    /// Held across a change's write: one change at a time.
    log: tokio::sync::Mutex<Catalog>,
    /// What is in force, replaced whole at each change (readers keep the `Arc` they took).
    state: RwLock<Arc<AuthState>>,
}

/// A key just made: its secret exists only here, to be shown once.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub info: KeyInfo,
    pub secret: String,
}

impl NewKey {
    /// The token that presents it: `<id>.<secret>`.
    pub fn token(&self) -> String {
        format!("{}.{}", self.info.id, self.secret)
    }
}

impl Auth {
    pub(crate) fn recover(store: &Store, log: Option<RecoveredLog>) -> Result<Auth, String> {
        let (catalog, entries) = Catalog::recover(AUTH_LOG, store, log)?;
        let mut state = AuthState::default();
        for entry in entries {
            let id = &entry.id;
            let bad = |e: serde_json::Error| format!("the auth log: entry {id}: {e}");
            let change = if id.starts_with(KEY_PREFIX) {
                Change::AddKey(serde_json::from_slice::<ApiKey>(&entry.body).map_err(bad)?)
            } else if id.starts_with(ACL_PREFIX) {
                Change::AddAcl(serde_json::from_slice::<Acl>(&entry.body).map_err(bad)?)
            } else {
                return Err(format!("the auth log: an entry has an unknown id '{id}'"));
            };
            state.apply(change);
        }
        Ok(Auth {
            log: tokio::sync::Mutex::new(catalog),
            state: RwLock::new(Arc::new(state)),
        })
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

impl Broker {
    /// The keys and grants in force now.
    pub fn auth(&self) -> Arc<AuthState> {
        self.inner.auth.state.read().clone()
    }

    /// Whether a key or grant was ever made in this data directory (even if all were
    /// revoked since): a bootstrap key from the environment is made only before that.
    pub fn auth_ever_used(&self) -> bool {
        self.inner
            .auth
            .log
            .try_lock()
            .map_or(true, |log| log.ever_used())
    }

    /// Makes an API key for `spec`: a random id and secret, or the ones `chosen` (a
    /// bootstrap key from the environment). The secret is in the reply only.
    pub async fn create_key(
        &self,
        spec: KeySpec,
        chosen: Option<(String, String)>,
    ) -> Result<NewKey, BrokerError> {
        let now = self.now_ms();
        spec.validate(now).map_err(BrokerError::invalid)?;
        let (id, secret) = match chosen {
            Some((id, secret)) => {
                keys::check_key_id(&id).map_err(BrokerError::invalid)?;
                keys::check_secret(&secret).map_err(BrokerError::invalid)?;
                (id, secret)
            }
            None => (keys::new_key_id(random()), keys::new_secret(random())),
        };
        // Two PBKDF2 derivations (a few milliseconds), off the runtime's threads.
        let derive_secret = secret.clone();
        let derive_id = id.clone();
        let key = tokio::task::spawn_blocking(move || {
            spec.into_key(
                derive_id,
                &derive_secret,
                [random(), random()],
                tidewater_auth::scram::ITERATIONS,
                now,
            )
        })
        .await
        .map_err(|e| BrokerError::new(ErrorCode::Internal, format!("deriving the key: {e}")))?;
        let mut log = self.inner.auth.log.lock().await;
        let state = self.auth();
        if state.key(&id).is_some() {
            return Err(BrokerError::new(
                ErrorCode::ConfigConflict,
                format!("a key with id '{id}' exists"),
            ));
        }
        let max = self.inner.limits.max_api_keys;
        if state.keys().count() >= max {
            return Err(BrokerError::new(
                ErrorCode::ConfigConflict,
                format!(
                    "the server holds its maximum of {max} API keys (max_api_keys); revoke unused ones first"
                ),
            ));
        }
        let body = serde_json::to_vec(&key).expect("a key serializes");
        let info = key.info();
        self.auth_write(
            &mut log,
            format!("{KEY_PREFIX}{id}"),
            Some(body),
            Change::AddKey(key),
        )
        .await?;
        Ok(NewKey { info, secret })
    }

    /// Revokes a key: requests presenting it are refused from the next one on.
    pub async fn revoke_key(&self, id: &str) -> Result<KeyInfo, BrokerError> {
        let mut log = self.inner.auth.log.lock().await;
        let Some(key) = self.auth().key(id).map(ApiKey::info) else {
            return Err(BrokerError::new(
                ErrorCode::KeyNotFound,
                format!("no API key has id '{id}'"),
            ));
        };
        self.auth_write(
            &mut log,
            format!("{KEY_PREFIX}{id}"),
            None,
            Change::RemoveKey(id.to_string()),
        )
        .await?;
        Ok(key)
    }

    /// Grants what `spec` says; the same grant asked twice is one grant.
    pub async fn grant(&self, spec: AclSpec) -> Result<Acl, BrokerError> {
        spec.validate().map_err(BrokerError::invalid)?;
        let mut log = self.inner.auth.log.lock().await;
        let state = self.auth();
        let now = self.now_ms();
        let acl = spec.into_acl(format!("acl-{}", tidewater_auth_hex(&random::<6>())), now);
        if let Some(same) = state.acls().find(|a| {
            a.subject == acl.subject
                && a.resource == acl.resource
                && a.name == acl.name
                && a.matching == acl.matching
                && a.operations == acl.operations
        }) {
            return Ok(same.clone());
        }
        let max = self.inner.limits.max_acls;
        if state.acls().count() >= max {
            return Err(BrokerError::new(
                ErrorCode::ConfigConflict,
                format!(
                    "the server holds its maximum of {max} grants (max_acls); revoke unused ones first"
                ),
            ));
        }
        let body = serde_json::to_vec(&acl).expect("a grant serializes");
        self.auth_write(
            &mut log,
            format!("{ACL_PREFIX}{}", acl.id),
            Some(body),
            Change::AddAcl(acl.clone()),
        )
        .await?;
        Ok(acl)
    }

    /// Revokes a grant.
    pub async fn revoke_acl(&self, id: &str) -> Result<Acl, BrokerError> {
        let mut log = self.inner.auth.log.lock().await;
        let Some(acl) = self.auth().acl(id).cloned() else {
            return Err(BrokerError::new(
                ErrorCode::AclNotFound,
                format!("no grant has id '{id}'"),
            ));
        };
        self.auth_write(
            &mut log,
            format!("{ACL_PREFIX}{id}"),
            None,
            Change::RemoveAcl(id.to_string()),
        )
        .await?;
        Ok(acl)
    }

    /// Writes one change (an entry to put, or the entry `id` to remove), durably, then
    /// puts it in force.
    async fn auth_write(
        &self,
        log: &mut Catalog,
        id: String,
        body: Option<Vec<u8>>,
        change: Change,
    ) -> Result<(), BrokerError> {
        match body {
            Some(body) => self.catalog_put(log, &id, &body).await?,
            None => self.catalog_remove(log, &id).await?,
        }
        let mut next = (*self.auth()).clone();
        next.apply(change);
        *self.inner.auth.state.write() = Arc::new(next);
        Ok(())
    }
}

fn tidewater_auth_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
