//! What every listener shares when authentication is on: credentials checked against the
//! keys in force, failed attempts limited per address (a blocked address is refused even
//! with the right secret), and each failure logged with the key id at most, never a byte
//! of the secret (target `tidewater::audit`).

use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::limiter::FailureLimiter;
use crate::state::{AuthError, AuthState, Identity};

pub struct Guard {
    /// Authentication is on.
    pub enabled: bool,
    failures: Mutex<FailureLimiter>,
    /// Binds receipts to the principal they are delivered to.
    pub receipts: crate::receipts::ReceiptBinder,
    /// JWT bearer tokens, when an identity provider's keys are configured (replaced whole
    /// when its JWKS is loaded again).
    jwt: RwLock<Option<Arc<crate::jwt::JwtVerifier>>>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guard {{ enabled: {} }}", self.enabled)
    }
}

/// Why credentials were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The address failed too often; it may try again after this many ms.
    Blocked {
        retry_after_ms: u64,
    },
    Failed(AuthError),
    /// A JWT the identity provider's keys and the `[auth.jwt]` checks did not accept.
    Token(AuthError),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Blocked { .. } => f.write_str(
                "too many failed authentication attempts from this address; wait and retry",
            ),
            Refused::Failed(AuthError::Malformed) => f.write_str(
                "credentials are not of the form <key id>.<secret> (HTTP: Authorization: Bearer <key id>.<secret>)",
            ),
            Refused::Failed(AuthError::Invalid) => {
                f.write_str("invalid credentials: unknown or revoked key, or wrong secret")
            }
            Refused::Failed(AuthError::Expired) => {
                f.write_str("the key has expired: ask an admin for a new one")
            }
            Refused::Token(AuthError::Malformed) => f.write_str("malformed JWT"),
            Refused::Token(AuthError::Invalid) => f.write_str(
                "invalid token: not signed by a key of the identity provider's JWKS, or its issuer, audience or principal claim is not the one expected",
            ),
            Refused::Token(AuthError::Expired) => {
                f.write_str("the token has expired: get a new one from the identity provider")
            }
        }
    }
}

impl Guard {
    /// `receipt_key`: random, for the process's receipt bindings.
    pub fn new(
        enabled: bool,
        burst: u32,
        refill_ms: u64,
        max_addresses: usize,
        receipt_key: [u8; 32],
    ) -> Guard {
        Guard {
            enabled,
            failures: Mutex::new(FailureLimiter::new(burst, refill_ms, max_addresses)),
            receipts: crate::receipts::ReceiptBinder::new(receipt_key),
            jwt: RwLock::new(None),
        }
    }

    /// Takes JWT bearer tokens checked by `verifier` too.
    pub fn with_jwt(self, verifier: crate::jwt::JwtVerifier) -> Guard {
        self.set_jwt(verifier);
        self
    }

    /// Puts `verifier` in force (an identity provider's rotated keys): the tokens checked
    /// from now on use its keys; a check under way finishes with the previous ones.
    pub fn set_jwt(&self, verifier: crate::jwt::JwtVerifier) {
        *self.jwt.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(verifier));
    }

    fn jwt(&self) -> Option<Arc<crate::jwt::JwtVerifier>> {
        self.jwt
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, FailureLimiter> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses an address that failed too often.
    pub fn check_peer(
        &self,
        peer: IpAddr,
        now_ms: i64,
        listener: &'static str,
    ) -> Result<(), Refused> {
        self.failures().check(peer, now_ms).map_err(|retry_after_ms| {
            tracing::warn!(target: "tidewater::audit", %peer, listener, "authentication refused: too many failed attempts from this address");
            Refused::Blocked { retry_after_ms }
        })
    }

    /// Counts and logs a failed attempt (`key`: the key id tried, if known).
    pub fn failed(
        &self,
        peer: IpAddr,
        now_ms: i64,
        listener: &'static str,
        key: &str,
        reason: &dyn std::fmt::Display,
    ) {
        self.failures().failed(peer, now_ms);
        tracing::warn!(target: "tidewater::audit", %peer, listener, key, reason = %reason, "authentication failed");
    }

    /// Who presents `token` (`<key id>.<secret>`); without one, the principal of the
    /// connection's verified client certificate, else the anonymous principal.
    pub fn authenticate(
        &self,
        state: &AuthState,
        now_ms: i64,
        token: Option<&str>,
        certificate: Option<&str>,
        peer: IpAddr,
        listener: &'static str,
    ) -> Result<Identity, Refused> {
        let Some(token) = token else {
            return Ok(certificate.map_or_else(Identity::anonymous, Identity::of_certificate));
        };
        self.check_peer(peer, now_ms, listener)?;
        if let Some(jwt) = self.jwt()
            && crate::jwt::JwtVerifier::looks_like_jwt(token)
        {
            return jwt.verify(token).map_err(|err| {
                self.failed(peer, now_ms, listener, "jwt", &err);
                Refused::Token(err)
            });
        }
        state.authenticate(token, now_ms).map_err(|err| {
            // The id part of a well-formed token only: never a byte of the secret.
            let key = crate::keys::parse_token(token).map_or("-", |(id, _)| id);
            self.failed(peer, now_ms, listener, key, &err);
            Refused::Failed(err)
        })
    }

    /// Checks a key id and secret given apart (SASL PLAIN).
    pub fn authenticate_key(
        &self,
        state: &AuthState,
        now_ms: i64,
        id: &str,
        secret: &str,
        peer: IpAddr,
        listener: &'static str,
    ) -> Result<Identity, Refused> {
        self.check_peer(peer, now_ms, listener)?;
        state.authenticate_key(id, secret, now_ms).map_err(|err| {
            let key = if crate::keys::check_key_id(id).is_ok() {
                id
            } else {
                "-"
            };
            self.failed(peer, now_ms, listener, key, &err);
            Refused::Failed(err)
        })
    }
}
