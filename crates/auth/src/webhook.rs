//! Webhook signatures, as the senders that matter sign them, checked without I/O: the
//! webhook ingress (issue 14) takes a request's headers and raw body and asks `verify`.
//!
//! - GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`; delivery id
//!   `X-GitHub-Delivery`.
//! - Stripe: `Stripe-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>[,v1=...]`,
//!   within a tolerance of `t`; delivery id: the event's `id` in the JSON body.
//! - Slack: `X-Slack-Signature: v0=<hex HMAC-SHA256(secret, "v0:<ts>:<body>")>` with
//!   `X-Slack-Request-Timestamp: <ts>`, within a tolerance.
//! - Standard Webhooks (Svix and others): `webhook-id`, `webhook-timestamp`,
//!   `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<ts>.<body>")> ...`, the key the
//!   base64 after `whsec_`; delivery id `webhook-id`.
//! - Generic HMAC: a header, SHA-256/SHA-512, hex or base64, an optional prefix.
//! - Slack's delivery id is the Events API's `event_id` in the JSON body.
//! - `none`: unsigned (the ingress asks for an API key instead when auth is on).
//!
//! Several secrets may be in force at once (rotation): a signature by any of them passes.
//! Every comparison is constant-time.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;

/// How a sender signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "preset")]
pub enum Scheme {
    /// No signature: for senders that cannot sign (the ingress then asks for other proof).
    #[serde(rename = "none")]
    Unsigned,
    Github,
    Stripe,
    Slack,
    StandardWebhooks,
    Hmac {
        /// The header carrying the signature.
        header: String,
        #[serde(default)]
        algorithm: Algorithm,
        #[serde(default)]
        encoding: Encoding,
        /// Text before the signature in the header (`sha256=`), if any.
        #[serde(default)]
        prefix: String,
    },
}

impl Scheme {
    /// The headers (lower case) a sender of this scheme signs with and names its deliveries
    /// by: kept with each event, so the signature stays verifiable downstream.
    pub fn headers(&self) -> Vec<String> {
        let names: &[&str] = match self {
            Scheme::Unsigned => &[],
            Scheme::Github => &[
                "x-github-event",
                "x-github-delivery",
                "x-github-hook-id",
                "x-hub-signature-256",
            ],
            Scheme::Stripe => &["stripe-signature"],
            Scheme::Slack => &["x-slack-signature", "x-slack-request-timestamp"],
            Scheme::StandardWebhooks => &["webhook-id", "webhook-timestamp", "webhook-signature"],
            Scheme::Hmac { header, .. } => return vec![header.to_ascii_lowercase()],
        };
        names.iter().map(|n| n.to_string()).collect()
    }

    /// Whether a signature has a timestamp the tolerance applies to.
    pub fn has_timestamp(&self) -> bool {
        matches!(
            self,
            Scheme::Stripe | Scheme::Slack | Scheme::StandardWebhooks
        )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    #[default]
    Hex,
    Base64,
}

/// Why a request is not the sender's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the {0} header is missing")]
    Missing(&'static str),
    #[error("the {0} header is malformed")]
    Malformed(&'static str),
    #[error(
        "the signature's timestamp is {age_s} s from now, past the tolerance of {tolerance_s} s"
    )]
    Stale { age_s: i64, tolerance_s: u64 },
    #[error("no secret in force signs this body so")]
    Mismatch,
}

/// A request as signed: its headers (looked up case-insensitively by the caller) and raw body.
pub struct Signed<'a> {
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
    pub body: &'a [u8],
}

/// What a verified request says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The sender's delivery id, for deduplication of its retries.
    pub delivery_id: Option<String>,
}

fn mac(algorithm: Algorithm, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    match algorithm {
        Algorithm::Sha256 => {
            let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
            parts.iter().for_each(|p| m.update(p));
            m.finalize().into_bytes().to_vec()
        }
        Algorithm::Sha512 => {
            let mut m = Hmac::<Sha512>::new_from_slice(key).expect("HMAC takes any key");
            parts.iter().for_each(|p| m.update(p));
            m.finalize().into_bytes().to_vec()
        }
    }
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether any key signs `parts` as `given`.
fn any_signs(algorithm: Algorithm, keys: &[Vec<u8>], parts: &[&[u8]], given: &[u8]) -> bool {
    keys.iter()
        .any(|key| bool::from(mac(algorithm, key, parts).ct_eq(given)))
}

fn fresh(
    timestamp: &str,
    now_s: i64,
    tolerance_s: u64,
    header: &'static str,
) -> Result<(), Rejected> {
    let t: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| Rejected::Malformed(header))?;
    let age_s = now_s.saturating_sub(t);
    if age_s.unsigned_abs() > tolerance_s {
        return Err(Rejected::Stale { age_s, tolerance_s });
    }
    Ok(())
}

/// Signs a body as GitHub does: the `X-Hub-Signature-256` header's value (for tests,
/// scenarios and senders of our own).
pub fn sign_github(secret: &[u8], body: &[u8]) -> String {
    let mac = mac(Algorithm::Sha256, secret, &[body]);
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Signs a request as Standard Webhooks does (push delivery's outgoing requests): the
/// `webhook-signature` header's value for message `id` at `timestamp_s` with `key` (the
/// bytes of a `whsec_` secret).
pub fn sign_standard(key: &[u8], id: &str, timestamp_s: i64, body: &[u8]) -> String {
    let ts = timestamp_s.to_string();
    let mac = mac(
        Algorithm::Sha256,
        key,
        &[id.as_bytes(), b".", ts.as_bytes(), b".", body],
    );
    format!("v1,{}", STANDARD.encode(mac))
}

/// A top-level string field of a JSON body (Stripe's event `id`, Slack's `event_id`).
fn body_field(body: &[u8], field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get(field)?.as_str().map(str::to_string)
}

/// The secrets of a hook as keys: a Standard Webhooks secret `whsec_<base64>` is the bytes
/// the base64 gives; any other secret its own bytes.
pub fn keys(scheme: &Scheme, secrets: &[String]) -> Result<Vec<Vec<u8>>, String> {
    secrets
        .iter()
        .map(|s| match (scheme, s.strip_prefix("whsec_")) {
            (Scheme::StandardWebhooks, Some(b64)) => STANDARD
                .decode(b64)
                .map_err(|_| "a whsec_ secret is not base64".to_string()),
            _ => Ok(s.as_bytes().to_vec()),
        })
        .collect()
}

/// Checks a request signed by `scheme` with one of `keys` (`keys()`), at `now_s` (unix
/// seconds), timestamps within `tolerance_s`.
pub fn verify(
    scheme: &Scheme,
    keys: &[Vec<u8>],
    request: &Signed<'_>,
    now_s: i64,
    tolerance_s: u64,
) -> Result<Verified, Rejected> {
    let header = request.header;
    match scheme {
        Scheme::Unsigned => Ok(Verified { delivery_id: None }),
        Scheme::Github => {
            let given =
                header("x-hub-signature-256").ok_or(Rejected::Missing("X-Hub-Signature-256"))?;
            let hex = given
                .strip_prefix("sha256=")
                .ok_or(Rejected::Malformed("X-Hub-Signature-256"))?;
            let given = hex_decode(hex).ok_or(Rejected::Malformed("X-Hub-Signature-256"))?;
            if !any_signs(Algorithm::Sha256, keys, &[request.body], &given) {
                return Err(Rejected::Mismatch);
            }
            Ok(Verified {
                delivery_id: header("x-github-delivery").map(str::to_string),
            })
        }
        Scheme::Stripe => {
            let given = header("stripe-signature").ok_or(Rejected::Missing("Stripe-Signature"))?;
            let mut timestamp = None;
            let mut signatures = Vec::new();
            for item in given.split(',') {
                match item.trim().split_once('=') {
                    Some(("t", t)) => timestamp = Some(t),
                    Some(("v1", s)) => signatures.push(s),
                    _ => {}
                }
            }
            let t = timestamp.ok_or(Rejected::Malformed("Stripe-Signature"))?;
            fresh(t, now_s, tolerance_s, "Stripe-Signature")?;
            let parts: [&[u8]; 3] = [t.as_bytes(), b".", request.body];
            let signed = signatures
                .iter()
                .filter_map(|s| hex_decode(s))
                .any(|s| any_signs(Algorithm::Sha256, keys, &parts, &s));
            if !signed {
                return Err(Rejected::Mismatch);
            }
            Ok(Verified {
                delivery_id: body_field(request.body, "id"),
            })
        }
        Scheme::Slack => {
            let given =
                header("x-slack-signature").ok_or(Rejected::Missing("X-Slack-Signature"))?;
            let ts = header("x-slack-request-timestamp")
                .ok_or(Rejected::Missing("X-Slack-Request-Timestamp"))?;
            fresh(ts, now_s, tolerance_s, "X-Slack-Request-Timestamp")?;
            let hex = given
                .strip_prefix("v0=")
                .ok_or(Rejected::Malformed("X-Slack-Signature"))?;
            let given = hex_decode(hex).ok_or(Rejected::Malformed("X-Slack-Signature"))?;
            let parts: [&[u8]; 4] = [b"v0:", ts.as_bytes(), b":", request.body];
            if !any_signs(Algorithm::Sha256, keys, &parts, &given) {
                return Err(Rejected::Mismatch);
            }
            Ok(Verified {
                delivery_id: body_field(request.body, "event_id"),
            })
        }
        Scheme::StandardWebhooks => {
            let id = header("webhook-id").ok_or(Rejected::Missing("webhook-id"))?;
            let ts = header("webhook-timestamp").ok_or(Rejected::Missing("webhook-timestamp"))?;
            let given =
                header("webhook-signature").ok_or(Rejected::Missing("webhook-signature"))?;
            fresh(ts, now_s, tolerance_s, "webhook-timestamp")?;
            let parts: [&[u8]; 5] = [id.as_bytes(), b".", ts.as_bytes(), b".", request.body];
            let signed = given
                .split(' ')
                .filter_map(|s| s.strip_prefix("v1,"))
                .filter_map(|s| STANDARD.decode(s).ok())
                .any(|s| any_signs(Algorithm::Sha256, keys, &parts, &s));
            if !signed {
                return Err(Rejected::Mismatch);
            }
            Ok(Verified {
                delivery_id: Some(id.to_string()),
            })
        }
        Scheme::Hmac {
            header: name,
            algorithm,
            encoding,
            prefix,
        } => {
            let given = header(&name.to_ascii_lowercase()).ok_or(Rejected::Missing("signature"))?;
            let text = given
                .strip_prefix(prefix.as_str())
                .ok_or(Rejected::Malformed("signature"))?;
            let given = match encoding {
                Encoding::Hex => hex_decode(text),
                Encoding::Base64 => STANDARD.decode(text).ok(),
            }
            .ok_or(Rejected::Malformed("signature"))?;
            if !any_signs(*algorithm, keys, &[request.body], &given) {
                return Err(Rejected::Mismatch);
            }
            Ok(Verified { delivery_id: None })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        scheme: &Scheme,
        secrets: &[&str],
        headers: &[(&str, &str)],
        body: &[u8],
        now_s: i64,
    ) -> Result<Verified, Rejected> {
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        let keys = keys(scheme, &secrets).unwrap();
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        verify(
            scheme,
            &keys,
            &Signed {
                header: &lookup,
                body,
            },
            now_s,
            300,
        )
    }

    /// GitHub's documented example ("Validating webhook deliveries").
    #[test]
    fn github_documented_example() {
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(
            sign_github(b"It's a Secret to Everybody", b"Hello, World!"),
            sig
        );
        let ok = check(
            &Scheme::Github,
            &["old-secret", "It's a Secret to Everybody"],
            &[("X-Hub-Signature-256", sig), ("X-GitHub-Delivery", "d-1")],
            b"Hello, World!",
            0,
        );
        assert_eq!(ok.unwrap().delivery_id.as_deref(), Some("d-1"));
        let bad = check(
            &Scheme::Github,
            &["It's a Secret to Everybody"],
            &[("X-Hub-Signature-256", sig)],
            b"Hello, World?",
            0,
        );
        assert_eq!(bad, Err(Rejected::Mismatch));
        let missing = check(&Scheme::Github, &["s"], &[], b"x", 0);
        assert_eq!(missing, Err(Rejected::Missing("X-Hub-Signature-256")));
    }

    /// The Standard Webhooks specification's test vector.
    #[test]
    fn standard_webhooks_test_vector() {
        let headers = [
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("webhook-timestamp", "1614265330"),
            (
                "webhook-signature",
                "v1,bm9ub3RoZXJzaWc= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
        ];
        let body = br#"{"test": 2432232314}"#;
        let secret = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"];
        // Signing gives the specification's signature.
        let key = &keys(&Scheme::StandardWebhooks, &[secret[0].to_string()]).unwrap()[0];
        assert_eq!(
            sign_standard(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let ok = check(
            &Scheme::StandardWebhooks,
            &secret,
            &headers,
            body,
            1614265330 + 10,
        )
        .unwrap();
        assert_eq!(
            ok.delivery_id.as_deref(),
            Some("msg_p5jXN8AQM9LWM0D4loKWxJek")
        );
        assert!(matches!(
            check(
                &Scheme::StandardWebhooks,
                &secret,
                &headers,
                body,
                1614265330 + 3_600
            ),
            Err(Rejected::Stale { .. })
        ));
        assert_eq!(
            check(
                &Scheme::StandardWebhooks,
                &secret,
                &headers,
                b"{}",
                1614265330
            ),
            Err(Rejected::Mismatch)
        );
    }

    /// Stripe and Slack, against HMACs computed with Python's hmac module.
    #[test]
    fn stripe_and_slack() {
        let body = br#"{"id":"evt_1","object":"event"}"#;
        let sig = "t=1614265330,v1=00,v1=42b3d2b2181207b6b299df380bf37599bb895dc182467ba12e046b1916c4cd19";
        let ok = check(
            &Scheme::Stripe,
            &["whsec_test_secret"],
            &[("Stripe-Signature", sig)],
            body,
            1614265330,
        );
        assert_eq!(ok.unwrap().delivery_id.as_deref(), Some("evt_1"));
        assert!(matches!(
            check(
                &Scheme::Stripe,
                &["whsec_test_secret"],
                &[("Stripe-Signature", sig)],
                body,
                1614265330 + 301
            ),
            Err(Rejected::Stale { .. })
        ));
        let slack = [
            (
                "X-Slack-Signature",
                "v0=71b0a7e79a0e37393adc80ac96f8aeffcbcdbf0ff8a0506259cf6bd02e6e13f2",
            ),
            ("X-Slack-Request-Timestamp", "1531420618"),
        ];
        let secret = ["8f742231b10e8888abcd99yyyzzz85a5"];
        assert!(
            check(
                &Scheme::Slack,
                &secret,
                &slack,
                b"token=xyz&team_id=T1",
                1531420618
            )
            .is_ok()
        );
        assert_eq!(
            check(
                &Scheme::Slack,
                &secret,
                &slack,
                b"token=xyz&team_id=T2",
                1531420618
            ),
            Err(Rejected::Mismatch)
        );
    }

    #[test]
    fn generic_hmac_with_prefix_and_base64() {
        let scheme = Scheme::Hmac {
            header: "X-Signature".into(),
            algorithm: Algorithm::Sha256,
            encoding: Encoding::Base64,
            prefix: "sha256=".into(),
        };
        let sig = format!(
            "sha256={}",
            STANDARD.encode(mac(Algorithm::Sha256, b"k", &[b"body"]))
        );
        assert!(check(&scheme, &["k"], &[("x-signature", &sig)], b"body", 0).is_ok());
        assert_eq!(
            check(&scheme, &["k"], &[("x-signature", "sha1=AA")], b"body", 0),
            Err(Rejected::Malformed("signature"))
        );
    }
}
