//! JWT bearer tokens from an identity provider, checked against a JWKS (the provider's
//! published keys, read from a file): the signature by the key the token's `kid` names (or
//! the only key), the algorithm the key declares (never `none`, never a symmetric algorithm
//! for an asymmetric key), the expiry, and the issuer and audience when configured. A claim
//! names the principal (`sub` by default); others may name the tenant and the roles.

use std::collections::HashSet;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use serde_json::Value;

use crate::state::{AuthError, Identity};

/// `[auth.jwt]` (docs/security.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// The JWKS file (a JSON object with `keys`), as the provider publishes it.
    pub jwks_file: Option<std::path::PathBuf>,
    /// The `iss` tokens must carry (none: not checked).
    pub issuer: Option<String>,
    /// An `aud` tokens must carry (none: not checked).
    pub audience: Option<String>,
    /// The claim naming the principal.
    pub principal_claim: String,
    /// The claim naming the tenant (none, or absent from a token: the principal).
    pub tenant_claim: Option<String>,
    /// The claim listing the roles (an array of strings, or one space-separated string).
    pub roles_claim: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// How often the JWKS file is checked for a change (loaded again when it changed, and
    /// on SIGHUP); 0 = on SIGHUP only.
    pub reload_check_ms: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            jwks_file: None,
            issuer: None,
            audience: None,
            principal_claim: "sub".into(),
            tenant_claim: None,
            roles_claim: None,
            leeway_s: 60,
            reload_check_ms: 10_000,
        }
    }
}

struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithm: Algorithm,
}

pub struct JwtVerifier {
    keys: Vec<Key>,
    config: JwtConfig,
}

/// The algorithms a key may sign with: the one it declares, else those of its type.
fn algorithms(params: &AlgorithmParameters, declared: Option<Algorithm>) -> Vec<Algorithm> {
    if let Some(alg) = declared {
        return vec![alg];
    }
    match params {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            jsonwebtoken::jwk::EllipticCurve::P256 => vec![Algorithm::ES256],
            jsonwebtoken::jwk::EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
        AlgorithmParameters::OctetKey(_) => {
            vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]
        }
    }
}

impl JwtVerifier {
    /// From a JWKS's JSON text.
    pub fn new(jwks: &str, config: JwtConfig) -> Result<JwtVerifier, String> {
        let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("the JWKS: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let declared = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                format!(
                    "the JWKS: key {}: {e}",
                    jwk.common.key_id.as_deref().unwrap_or("(no kid)")
                )
            })?;
            for algorithm in algorithms(&jwk.algorithm, declared) {
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    key: key.clone(),
                    algorithm,
                });
            }
        }
        if keys.is_empty() {
            return Err("the JWKS holds no usable key".into());
        }
        Ok(JwtVerifier { keys, config })
    }

    /// The keys it checks signatures with.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Whether `token` has a JWT's shape (three base64url parts, a header that decodes).
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3 && decode_header(token).is_ok()
    }

    /// The identity a valid token names; `Invalid` for anything else (`Expired` when only
    /// its time ran out).
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
        let candidates = self.keys.iter().filter(|k| {
            k.algorithm == header.alg
                && match (&header.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    (Some(_), None) => false,
                    (None, _) => true,
                }
        });
        let mut expired = false;
        for key in candidates {
            let mut validation = Validation::new(key.algorithm);
            validation.leeway = self.config.leeway_s;
            validation.validate_nbf = true;
            validation.set_required_spec_claims(&["exp"]);
            match &self.config.audience {
                Some(aud) => validation.set_audience(&[aud]),
                None => validation.validate_aud = false,
            }
            if let Some(iss) = &self.config.issuer {
                validation.set_issuer(&[iss]);
            }
            match decode::<Value>(token, &key.key, &validation) {
                Ok(data) => return self.identity(&data.claims),
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                    expired = true;
                }
                Err(_) => {}
            }
        }
        Err(if expired {
            AuthError::Expired
        } else {
            AuthError::Invalid
        })
    }

    fn identity(&self, claims: &Value) -> Result<Identity, AuthError> {
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
        let principal = text(&self.config.principal_claim)
            .filter(|p| crate::acl::check_name("principal", p).is_ok())
            .ok_or(AuthError::Invalid)?;
        let tenant = self
            .config
            .tenant_claim
            .as_deref()
            .and_then(text)
            .unwrap_or_else(|| principal.clone());
        let roles: Vec<String> = match self
            .config
            .roles_claim
            .as_deref()
            .and_then(|c| claims.get(c))
        {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        let roles: Vec<String> = roles
            .into_iter()
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|r| crate::acl::check_name("role", r).is_ok())
            .take(crate::keys::MAX_ROLES)
            .collect();
        let expires_at_ms = claims
            .get("exp")
            .and_then(Value::as_i64)
            .map(|s| s.saturating_mul(1000));
        Ok(Identity {
            principal,
            roles,
            tenant,
            key_id: None,
            expires_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "c2VjcmV0LWZvci10aGUtand0LXVuaXQtdGVzdHMtMDEyMw"; // base64url

    fn verifier(config: JwtConfig) -> JwtVerifier {
        let jwks =
            format!(r#"{{"keys":[{{"kty":"oct","kid":"k1","alg":"HS256","k":"{SECRET}"}}]}}"#);
        JwtVerifier::new(&jwks, config).unwrap()
    }

    fn token(claims: Value, kid: &str) -> String {
        use base64::Engine;
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(SECRET)
            .unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.into());
        encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn claims_name_principal_tenant_and_roles() {
        let v = verifier(JwtConfig {
            tenant_claim: Some("org".into()),
            roles_claim: Some("groups".into()),
            issuer: Some("https://idp".into()),
            audience: Some("tidewater".into()),
            ..JwtConfig::default()
        });
        let good = token(
            serde_json::json!({"sub": "alice", "org": "acme", "groups": ["ops", "ops"], "iss": "https://idp", "aud": "tidewater", "exp": now() + 600}),
            "k1",
        );
        let id = v.verify(&good).unwrap();
        assert_eq!(
            (id.principal.as_str(), id.tenant.as_str()),
            ("alice", "acme")
        );
        assert_eq!(id.roles, ["ops"]);
        assert!(JwtVerifier::looks_like_jwt(&good));
        assert!(!JwtVerifier::looks_like_jwt("tw01.secret"));
        // Wrong issuer, wrong audience, unknown kid, expired, no subject: refused.
        for (claims, kid, want) in [
            (
                serde_json::json!({"sub": "a", "iss": "https://other", "aud": "tidewater", "exp": now() + 600}),
                "k1",
                AuthError::Invalid,
            ),
            (
                serde_json::json!({"sub": "a", "iss": "https://idp", "aud": "other", "exp": now() + 600}),
                "k1",
                AuthError::Invalid,
            ),
            (
                serde_json::json!({"sub": "a", "iss": "https://idp", "aud": "tidewater", "exp": now() + 600}),
                "k2",
                AuthError::Invalid,
            ),
            (
                serde_json::json!({"sub": "a", "iss": "https://idp", "aud": "tidewater", "exp": now() - 600}),
                "k1",
                AuthError::Expired,
            ),
            (
                serde_json::json!({"iss": "https://idp", "aud": "tidewater", "exp": now() + 600}),
                "k1",
                AuthError::Invalid,
            ),
            (
                serde_json::json!({"sub": "a", "iss": "https://idp", "aud": "tidewater"}),
                "k1",
                AuthError::Invalid,
            ),
        ] {
            assert_eq!(v.verify(&token(claims.clone(), kid)), Err(want), "{claims}");
        }
        // A tampered payload fails the signature.
        let mut parts: Vec<&str> = good.split('.').collect();
        let other = token(serde_json::json!({"sub": "root", "exp": now() + 600}), "k1");
        parts[1] = other.split('.').nth(1).unwrap();
        assert_eq!(v.verify(&parts.join(".")), Err(AuthError::Invalid));
    }
}
