//! The keys and grants in force, and the two questions asked of them: who is this (a
//! token), and may they do this (an operation on a resource).

use std::collections::{BTreeMap, HashMap};

use crate::acl::{Acl, Operation, Resource, Subject};
use crate::keys::{ApiKey, parse_token};

/// The principal of requests without credentials (granted only what is granted to it).
pub const ANONYMOUS: &str = "anonymous";

/// Who a request comes from, once its credentials are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub principal: String,
    pub roles: Vec<String>,
    /// The tenant its requests count against (the key's, else the principal).
    pub tenant: String,
    /// The key it presented (None: anonymous, a JWT, a client certificate).
    pub key_id: Option<String>,
    /// When the credential stops being valid.
    pub expires_at_ms: Option<i64>,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity {
            principal: ANONYMOUS.into(),
            roles: Vec::new(),
            tenant: ANONYMOUS.into(),
            key_id: None,
            expires_at_ms: None,
        }
    }

    pub fn of_key(key: &ApiKey) -> Identity {
        Identity {
            principal: key.principal.clone(),
            roles: key.roles.clone(),
            tenant: key.tenant.clone().unwrap_or_else(|| key.principal.clone()),
            key_id: Some(key.id.clone()),
            expires_at_ms: key.expires_at_ms,
        }
    }

    /// The principal a verified TLS client certificate names (its tenant too).
    pub fn of_certificate(principal: &str) -> Identity {
        Identity {
            principal: principal.to_string(),
            roles: Vec::new(),
            tenant: principal.to_string(),
            key_id: None,
            expires_at_ms: None,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.key_id.is_none() && self.principal == ANONYMOUS
    }
}

/// Why credentials were not accepted. What the client is told does not say whether a key
/// id exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("credentials are not of the form <key id>.<secret>")]
    Malformed,
    #[error("invalid credentials")]
    Invalid,
    #[error("the key has expired")]
    Expired,
}

/// Every key and grant in force. Changed only by `apply`, which bumps `epoch`: a
/// connection that authenticated earlier checks its key again when the epoch moved.
#[derive(Debug, Clone, Default)]
pub struct AuthState {
    keys: BTreeMap<String, ApiKey>,
    acls: BTreeMap<String, Acl>,
    /// Grant ids by subject.
    by_subject: HashMap<Subject, Vec<String>>,
    epoch: u64,
}

/// A change to the keys and grants.
#[derive(Debug, Clone)]
pub enum Change {
    AddKey(ApiKey),
    RemoveKey(String),
    AddAcl(Acl),
    RemoveAcl(String),
}

impl AuthState {
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::AddKey(key) => {
                self.keys.insert(key.id.clone(), key);
            }
            Change::RemoveKey(id) => {
                self.keys.remove(&id);
            }
            Change::AddAcl(acl) => {
                self.by_subject
                    .entry(acl.subject.clone())
                    .or_default()
                    .push(acl.id.clone());
                self.acls.insert(acl.id.clone(), acl);
            }
            Change::RemoveAcl(id) => {
                if let Some(acl) = self.acls.remove(&id)
                    && let Some(ids) = self.by_subject.get_mut(&acl.subject)
                {
                    ids.retain(|i| *i != id);
                    if ids.is_empty() {
                        self.by_subject.remove(&acl.subject);
                    }
                }
            }
        }
        self.epoch += 1;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn key(&self, id: &str) -> Option<&ApiKey> {
        self.keys.get(id)
    }

    pub fn keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.keys.values()
    }

    pub fn acl(&self, id: &str) -> Option<&Acl> {
        self.acls.get(id)
    }

    pub fn acls(&self) -> impl Iterator<Item = &Acl> {
        self.acls.values()
    }

    /// Checks a key id and secret (SASL PLAIN, or a token split).
    pub fn authenticate_key(
        &self,
        id: &str,
        secret: &str,
        now_ms: i64,
    ) -> Result<Identity, AuthError> {
        let Some(key) = self.keys.get(id) else {
            // Spend the hash an existing key would cost, so timing does not tell.
            let _ = DUMMY.secret_matches(secret);
            return Err(AuthError::Invalid);
        };
        if !key.secret_matches(secret) {
            return Err(AuthError::Invalid);
        }
        if key.expired(now_ms) {
            return Err(AuthError::Expired);
        }
        Ok(Identity::of_key(key))
    }

    /// Checks a token `<id>.<secret>`.
    pub fn authenticate(&self, token: &str, now_ms: i64) -> Result<Identity, AuthError> {
        let (id, secret) = parse_token(token).ok_or(AuthError::Malformed)?;
        self.authenticate_key(id, secret, now_ms)
    }

    /// Whether an identity authenticated earlier still holds: its key exists and has not
    /// expired (identities without a key hold until their own expiry).
    pub fn still_valid(&self, identity: &Identity, now_ms: i64) -> bool {
        if identity.expires_at_ms.is_some_and(|at| now_ms >= at) {
            return false;
        }
        match &identity.key_id {
            Some(id) => self.keys.get(id).is_some_and(|k| !k.expired(now_ms)),
            None => true,
        }
    }

    /// Whether some grant to the identity (its principal or one of its roles) allows `op`
    /// on `resource`. Nothing else does.
    pub fn allows(&self, identity: &Identity, op: Operation, resource: &Resource<'_>) -> bool {
        self.grants_of(identity).any(|acl| acl.allows(op, resource))
    }

    /// Every grant that applies to the identity.
    pub fn grants_of<'a>(&'a self, identity: &'a Identity) -> impl Iterator<Item = &'a Acl> + 'a {
        let principal = Subject::Principal(identity.principal.clone());
        let roles = identity.roles.iter().map(|r| Subject::Role(r.clone()));
        std::iter::once(principal)
            .chain(roles)
            .filter_map(|s| self.by_subject.get(&s))
            .flatten()
            .filter_map(|id| self.acls.get(id))
    }
}

static DUMMY: std::sync::LazyLock<ApiKey> = std::sync::LazyLock::new(|| ApiKey {
    id: String::new(),
    principal: String::new(),
    roles: Vec::new(),
    tenant: None,
    description: String::new(),
    created_at_ms: 0,
    expires_at_ms: None,
    secret_sha256: "0".repeat(64),
    scram: Vec::new(),
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{AclSpec, Match, ResourceKind};
    use crate::keys::KeySpec;

    fn state() -> (AuthState, String) {
        let mut state = AuthState::default();
        let secret = "s".repeat(43);
        let key = KeySpec {
            principal: "alice".into(),
            roles: vec!["ops".into()],
            expires_at_ms: Some(1_000),
            ..KeySpec::default()
        }
        .into_key("tw1".into(), &secret, [[0; 16], [1; 16]], 1, 0);
        state.apply(Change::AddKey(key));
        (state, format!("tw1.{secret}"))
    }

    fn grant(state: &mut AuthState, id: &str, subject: Subject, name: &str, op: Operation) {
        let acl = AclSpec {
            subject,
            resource: ResourceKind::Queue,
            name: name.into(),
            matching: Match::Exact,
            operations: [op].into_iter().collect(),
        }
        .into_acl(id.into(), 0);
        state.apply(Change::AddAcl(acl));
    }

    #[test]
    fn tokens_authenticate_until_expiry_or_revocation() {
        let (mut state, token) = state();
        let alice = state.authenticate(&token, 10).unwrap();
        assert_eq!(alice.principal, "alice");
        assert_eq!(alice.tenant, "alice");
        assert_eq!(state.authenticate("tw1.wrong", 10), Err(AuthError::Invalid));
        assert_eq!(state.authenticate("tw2.wrong", 10), Err(AuthError::Invalid));
        assert_eq!(state.authenticate("garbage", 10), Err(AuthError::Malformed));
        assert_eq!(state.authenticate(&token, 1_000), Err(AuthError::Expired));
        assert!(state.still_valid(&alice, 999));
        assert!(!state.still_valid(&alice, 1_000));
        let epoch = state.epoch();
        state.apply(Change::RemoveKey("tw1".into()));
        assert!(state.epoch() > epoch);
        assert!(!state.still_valid(&alice, 10));
        assert_eq!(state.authenticate(&token, 10), Err(AuthError::Invalid));
    }

    #[test]
    fn nothing_is_allowed_but_what_a_grant_allows() {
        let (mut state, token) = state();
        let alice = state.authenticate(&token, 10).unwrap();
        let orders = Resource::new(ResourceKind::Queue, "orders");
        for op in Operation::ALL {
            assert!(!state.allows(&alice, op, &orders));
        }
        grant(
            &mut state,
            "a1",
            Subject::Role("ops".into()),
            "orders",
            Operation::Consume,
        );
        assert!(state.allows(&alice, Operation::Consume, &orders));
        assert!(!state.allows(&alice, Operation::Produce, &orders));
        assert!(!state.allows(&Identity::anonymous(), Operation::Consume, &orders));
        grant(
            &mut state,
            "a2",
            Subject::Principal("anonymous".into()),
            "orders",
            Operation::Describe,
        );
        assert!(state.allows(&Identity::anonymous(), Operation::Describe, &orders));
        state.apply(Change::RemoveAcl("a1".into()));
        assert!(!state.allows(&alice, Operation::Consume, &orders));
    }
}
