//! API keys: an id and a secret. The server keeps the secret's SHA-256 (secrets are 256
//! random bits: no dictionary to slow down) and, for Kafka's SASL/SCRAM, the salted
//! credentials RFC 5802 derives from it; never the secret.
//!
//! A key is presented as the token `<id>.<secret>` (HTTP `Authorization: Bearer`, the
//! binary protocol's Hello), or as SASL username `<id>` and password `<secret>`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::scram::{Mechanism, ScramCredential};

/// Random bytes in a generated secret.
pub const SECRET_BYTES: usize = 32;

/// Shortest secret an operator may choose (a bootstrap key from the environment).
pub const MIN_SECRET_LEN: usize = 32;

/// Longest secret accepted (anything longer is not a key of ours: refused before hashing).
pub const MAX_SECRET_LEN: usize = 256;

/// Longest key id.
pub const MAX_ID_LEN: usize = 64;

/// A key as stored: what it grants and how to check it, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub principal: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// The tenant its requests count against; the principal when unset.
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub description: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    #[serde(default)]
    pub scram: Vec<ScramCredential>,
}

/// A key as shown (lists, the reply to a creation): no hash, no SCRAM credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub id: String,
    pub principal: String,
    pub roles: Vec<String>,
    pub tenant: Option<String>,
    pub description: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

impl ApiKey {
    pub fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            principal: self.principal.clone(),
            roles: self.roles.clone(),
            tenant: self.tenant.clone(),
            description: self.description.clone(),
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }

    /// Whether `secret` is this key's, in time that does not depend on where they differ.
    pub fn secret_matches(&self, secret: &str) -> bool {
        let given = hex(&Sha256::digest(secret.as_bytes()));
        given.as_bytes().ct_eq(self.secret_sha256.as_bytes()).into()
    }

    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    pub fn scram(&self, mechanism: Mechanism) -> Option<&ScramCredential> {
        self.scram.iter().find(|c| c.mechanism == mechanism)
    }
}

/// A key as asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySpec {
    pub principal: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}

/// Most roles on one key.
pub const MAX_ROLES: usize = 32;

/// Longest key description.
pub const MAX_DESCRIPTION_LEN: usize = 1024;

impl KeySpec {
    pub fn validate(&self, now_ms: i64) -> Result<(), String> {
        crate::acl::check_name("principal", &self.principal)?;
        if self.principal == crate::ANONYMOUS {
            return Err(format!(
                "'{}' is the principal of requests without credentials; a key cannot be it",
                crate::ANONYMOUS
            ));
        }
        if self.roles.len() > MAX_ROLES {
            return Err(format!("a key has at most {MAX_ROLES} roles"));
        }
        for role in &self.roles {
            crate::acl::check_name("role", role)?;
        }
        if let Some(tenant) = &self.tenant {
            crate::acl::check_name("tenant", tenant)?;
        }
        if self.description.len() > MAX_DESCRIPTION_LEN {
            return Err(format!(
                "a key's description is at most {MAX_DESCRIPTION_LEN} bytes"
            ));
        }
        if self.expires_at_ms.is_some_and(|at| at <= now_ms) {
            return Err("the key would expire before it is made (expires_at_ms is past)".into());
        }
        Ok(())
    }

    /// The stored key for `id` and `secret`, with SCRAM credentials for both mechanisms
    /// derived from the secret with `salts` (random, one per mechanism).
    pub fn into_key(
        self,
        id: String,
        secret: &str,
        salts: [[u8; 16]; 2],
        iterations: u32,
        now_ms: i64,
    ) -> ApiKey {
        let scram = [Mechanism::Sha256, Mechanism::Sha512]
            .into_iter()
            .zip(salts)
            .map(|(mechanism, salt)| ScramCredential::derive(mechanism, secret, &salt, iterations))
            .collect();
        ApiKey {
            id,
            principal: self.principal,
            roles: self.roles,
            tenant: self.tenant,
            description: self.description,
            created_at_ms: now_ms,
            expires_at_ms: self.expires_at_ms,
            secret_sha256: hex(&Sha256::digest(secret.as_bytes())),
            scram,
        }
    }
}

/// A key id from 8 random bytes: `tw` and 16 hex digits (a SASL username as it is).
pub fn new_key_id(random: [u8; 8]) -> String {
    format!("tw{}", hex(&random))
}

/// A secret from 32 random bytes: 43 characters of URL-safe base64.
pub fn new_secret(random: [u8; SECRET_BYTES]) -> String {
    URL_SAFE_NO_PAD.encode(random)
}

/// Checks a key id chosen by an operator: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn check_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("a key id is 1 to {MAX_ID_LEN} characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err("a key id is made of letters, digits, '_' and '-'".into());
    }
    Ok(())
}

/// Checks a secret chosen by an operator: 32 to 256 printable ASCII characters.
pub fn check_secret(secret: &str) -> Result<(), String> {
    if secret.len() < MIN_SECRET_LEN || secret.len() > MAX_SECRET_LEN {
        return Err(format!(
            "a key's secret is {MIN_SECRET_LEN} to {MAX_SECRET_LEN} characters (use a random one: `openssl rand -base64 32`)"
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a key's secret is printable ASCII without spaces".into());
    }
    Ok(())
}

/// A presented token, `<id>.<secret>`, split. `None` when it is not of that shape.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    if check_key_id(id).is_err() || secret.is_empty() || secret.len() > MAX_SECRET_LEN {
        return None;
    }
    Some((id, secret))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: &str) -> ApiKey {
        KeySpec {
            principal: "alice".into(),
            ..KeySpec::default()
        }
        .into_key("twabc".into(), secret, [[1; 16], [2; 16]], 4096, 0)
    }

    #[test]
    fn only_the_secret_matches_and_the_key_keeps_no_secret() {
        let secret = new_secret([7; SECRET_BYTES]);
        let key = key(&secret);
        assert!(key.secret_matches(&secret));
        assert!(!key.secret_matches(&secret[1..]));
        assert!(!key.secret_matches(""));
        let stored = serde_json::to_string(&key).unwrap();
        assert!(!stored.contains(&secret), "{stored}");
        assert_eq!(key.scram.len(), 2);
    }

    #[test]
    fn tokens_split_at_the_first_dot() {
        assert_eq!(parse_token("tw01.s3cr.et"), Some(("tw01", "s3cr.et")));
        assert_eq!(parse_token("nodot"), None);
        assert_eq!(parse_token(".secret"), None);
        assert_eq!(parse_token("id."), None);
        assert_eq!(parse_token("b@d.secret"), None);
    }

    #[test]
    fn keys_cannot_be_anonymous_nor_expire_before_they_exist() {
        let spec = |principal: &str, expires: Option<i64>| KeySpec {
            principal: principal.into(),
            expires_at_ms: expires,
            ..KeySpec::default()
        };
        assert!(spec("alice", None).validate(10).is_ok());
        assert!(spec("anonymous", None).validate(10).is_err());
        assert!(spec("", None).validate(10).is_err());
        assert!(spec("alice", Some(10)).validate(10).is_err());
        assert!(spec("alice", Some(11)).validate(10).is_ok());
    }
}
