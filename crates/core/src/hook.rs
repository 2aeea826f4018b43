//! Webhook hooks, sans-IO: a hook is a named ingress bound to a queue or a stream. Senders
//! (GitHub, Stripe, Slack, Svix...) POST events to it; the broker checks the signature
//! (`tidewater_auth::webhook`), stores the raw body byte for byte with a configured set of
//! headers, and answers 2xx only once the event is durable. This module holds a hook's
//! configuration and its checks, and what a verified request becomes (`plan_event`); the
//! broker (`broker/hooks.rs`) performs it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tidewater_auth::webhook::{self, Rejected, Scheme, Signed};

use crate::config::{Limits, MAX_TENANT_LEN, validate_name};
use crate::error::{BrokerError, ErrorCode};

/// Secrets in force at once (rotation keeps the old ones a while).
pub const MAX_SECRETS: usize = 8;
pub const MAX_SECRET_CHARS: usize = 512;
pub const MAX_PREFIX_CHARS: usize = 64;
/// Request headers a hook keeps besides its preset's.
pub const MAX_KEPT_HEADERS: usize = 32;
pub const MAX_HEADER_NAME: usize = 64;
pub const DEFAULT_TOLERANCE_S: u64 = 300;
pub const MAX_TOLERANCE_S: u64 = 86_400;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1 << 20;
/// The header a stored event carries its delivery id in (a stream record has no id).
pub const HEADER_DELIVERY_ID: &str = "tidewater-delivery-id";

/// Where a hook's accepted events go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HookTarget {
    Queue(String),
    Stream(String),
}

impl HookTarget {
    pub fn name(&self) -> &str {
        match self {
            HookTarget::Queue(name) | HookTarget::Stream(name) => name,
        }
    }
}

/// How the sender signs, and with which secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    #[serde(flatten)]
    pub scheme: Scheme,
    #[serde(default)]
    pub secrets: Vec<String>,
    /// How far a signed timestamp may be from now (Stripe, Slack, Standard Webhooks).
    #[serde(default = "default_tolerance")]
    pub tolerance_s: u64,
}

fn default_tolerance() -> u64 {
    DEFAULT_TOLERANCE_S
}

/// A hook's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookConfig {
    pub target: HookTarget,
    pub signature: Signature,
    /// The header naming each delivery, for deduplication of the sender's retries; the
    /// preset's when null (GitHub's `X-GitHub-Delivery`, `webhook-id`, Stripe's and
    /// Slack's event id in the body).
    #[serde(default)]
    pub id_header: Option<String>,
    /// The header whose value becomes the message key (per-key order and concurrency).
    #[serde(default)]
    pub key_header: Option<String>,
    /// Request headers stored with each event, besides `content-type` and the preset's.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Larger bodies are refused (413).
    pub max_body_bytes: u64,
    /// The tenant every event counts against (quotas, fairness).
    #[serde(default)]
    pub tenant: Option<String>,
}

/// A change to a hook: every field optional; `signature` replaces the whole signature
/// (secrets included: the server never shows them).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookPatch {
    pub target: Option<HookTarget>,
    pub signature: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "crate::config::explicit_null")]
    pub id_header: Option<Option<String>>,
    #[serde(default, deserialize_with = "crate::config::explicit_null")]
    pub key_header: Option<Option<String>>,
    pub headers: Option<Vec<String>>,
    pub max_body_bytes: Option<u64>,
    #[serde(default, deserialize_with = "crate::config::explicit_null")]
    pub tenant: Option<Option<String>>,
}

fn invalid(message: impl Into<String>) -> BrokerError {
    BrokerError::new(ErrorCode::InvalidConfig, message)
}

/// The fields a signature object may have, per preset: serde's `flatten` cannot refuse
/// unknown ones, so a typo (`secret` for `secrets`) would be ignored.
fn check_signature_fields(value: &serde_json::Value) -> Result<(), BrokerError> {
    let Some(object) = value.as_object() else {
        return Err(invalid(
            r#"signature: give an object, like {"preset": "github", "secrets": ["..."]}"#,
        ));
    };
    let preset = object.get("preset").and_then(|p| p.as_str()).unwrap_or("");
    let mut allowed = vec!["preset", "secrets", "tolerance_s"];
    if preset == "hmac" {
        allowed.extend(["header", "algorithm", "encoding", "prefix"]);
    }
    if let Some(unknown) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(format!(
            "signature: unknown field '{unknown}' for preset '{preset}' (it takes {})",
            allowed.join(", ")
        )));
    }
    Ok(())
}

/// Parses a signature object (`check_signature_fields`, then its type).
pub fn parse_signature(value: serde_json::Value) -> Result<Signature, BrokerError> {
    check_signature_fields(&value)?;
    serde_json::from_value(value).map_err(|e| {
        invalid(format!(
            "signature: {e} (presets: github, stripe, slack, standard_webhooks, hmac, none)"
        ))
    })
}

fn check_header_name(what: &str, name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_HEADER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !ok {
        let shown: String = name.chars().take(40).collect();
        return Err(invalid(format!(
            "{what}: '{shown}' is not a header name (1 to {MAX_HEADER_NAME} characters of A-Z a-z 0-9 and !#$%&'*+-.^_`|~)"
        )));
    }
    Ok(())
}

pub fn validate_hook_name(name: &str) -> Result<(), BrokerError> {
    validate_name(name, "hook", ErrorCode::InvalidHookName)
}

impl HookConfig {
    /// A new hook from a patch: `target` and `signature` are required.
    pub fn create(patch: &HookPatch, limits: &Limits) -> Result<HookConfig, BrokerError> {
        let (Some(target), Some(signature)) = (&patch.target, &patch.signature) else {
            return Err(invalid(
                r#"a new hook needs a target and a signature, like {"target": {"queue": "orders"}, "signature": {"preset": "github", "secrets": ["..."]}}"#,
            ));
        };
        let config = HookConfig {
            target: target.clone(),
            signature: parse_signature(signature.clone())?,
            id_header: None,
            key_header: None,
            headers: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES.min(limits.max_message_bytes as u64),
            tenant: None,
        };
        config.apply(patch)
    }

    /// This configuration with `patch` applied, checked.
    pub fn apply(&self, patch: &HookPatch) -> Result<HookConfig, BrokerError> {
        let mut next = self.clone();
        if let Some(target) = &patch.target {
            next.target = target.clone();
        }
        if let Some(signature) = &patch.signature {
            next.signature = parse_signature(signature.clone())?;
        }
        if let Some(id_header) = &patch.id_header {
            next.id_header = id_header.as_ref().map(|h| h.to_ascii_lowercase());
        }
        if let Some(key_header) = &patch.key_header {
            next.key_header = key_header.as_ref().map(|h| h.to_ascii_lowercase());
        }
        if let Some(headers) = &patch.headers {
            next.headers = headers.iter().map(|h| h.to_ascii_lowercase()).collect();
            next.headers.sort();
            next.headers.dedup();
        }
        if let Some(max) = patch.max_body_bytes {
            next.max_body_bytes = max;
        }
        if let Some(tenant) = &patch.tenant {
            next.tenant = tenant.clone();
        }
        Ok(next)
    }

    pub fn validate(&self, limits: &Limits) -> Result<(), BrokerError> {
        let name = self.target.name();
        match &self.target {
            HookTarget::Queue(_) => crate::config::validate_queue_name(name)?,
            HookTarget::Stream(_) => {
                validate_name(name, "stream", ErrorCode::InvalidStreamName)?;
            }
        }
        let signature = &self.signature;
        let unsigned = signature.scheme == Scheme::Unsigned;
        if unsigned && !signature.secrets.is_empty() {
            return Err(invalid("signature: preset none takes no secrets"));
        }
        if !unsigned && !(1..=MAX_SECRETS).contains(&signature.secrets.len()) {
            return Err(invalid(format!(
                "signature.secrets: give 1 to {MAX_SECRETS} secrets (several while rotating)"
            )));
        }
        if let Some(long) = signature
            .secrets
            .iter()
            .find(|s| s.is_empty() || s.chars().count() > MAX_SECRET_CHARS)
        {
            return Err(invalid(format!(
                "signature.secrets: a secret of {} characters; each is 1 to {MAX_SECRET_CHARS}",
                long.chars().count()
            )));
        }
        webhook::keys(&signature.scheme, &signature.secrets)
            .map_err(|e| invalid(format!("signature.secrets: {e}")))?;
        if let Scheme::Hmac { header, prefix, .. } = &signature.scheme {
            check_header_name("signature.header", header)?;
            if prefix.chars().count() > MAX_PREFIX_CHARS {
                return Err(invalid(format!(
                    "signature.prefix: at most {MAX_PREFIX_CHARS} characters"
                )));
            }
        }
        if !(1..=MAX_TOLERANCE_S).contains(&signature.tolerance_s) {
            return Err(invalid(format!(
                "signature.tolerance_s: give 1 to {MAX_TOLERANCE_S} seconds"
            )));
        }
        if self.headers.len() > MAX_KEPT_HEADERS {
            return Err(invalid(format!(
                "headers: at most {MAX_KEPT_HEADERS} header names"
            )));
        }
        for header in &self.headers {
            check_header_name("headers", header)?;
        }
        if let Some(header) = &self.id_header {
            check_header_name("id_header", header)?;
        }
        if let Some(header) = &self.key_header {
            check_header_name("key_header", header)?;
        }
        let max_body = limits.max_message_bytes as u64;
        if !(1..=max_body).contains(&self.max_body_bytes) {
            return Err(invalid(format!(
                "max_body_bytes: give 1 to {max_body} (the server's max_message_bytes)"
            )));
        }
        if let Some(tenant) = &self.tenant
            && (tenant.is_empty() || tenant.len() > MAX_TENANT_LEN)
        {
            return Err(invalid(format!("tenant: give 1 to {MAX_TENANT_LEN} bytes")));
        }
        Ok(())
    }

    /// The headers stored with each event: `content-type`, the preset's, the configured
    /// ones, the id and key headers.
    pub fn kept_headers(&self) -> Vec<String> {
        let mut names = vec!["content-type".to_string()];
        names.extend(self.signature.scheme.headers());
        names.extend(self.headers.iter().cloned());
        names.extend(self.id_header.iter().cloned());
        names.extend(self.key_header.iter().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// What is shown of it: the secrets never, only how many there are and a fingerprint
    /// of each (the first 8 hex digits of its SHA-256), so an operator can tell which are
    /// in force while rotating.
    pub fn shown(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("a hook serializes");
        let fingerprints: Vec<String> = self
            .signature
            .secrets
            .iter()
            .map(|s| fingerprint(s))
            .collect();
        if let Some(signature) = value.get_mut("signature").and_then(|s| s.as_object_mut()) {
            signature.remove("secrets");
            signature.insert("secret_fingerprints".into(), fingerprints.into());
        }
        value
    }
}

pub fn fingerprint(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A request to a hook: its headers (by lower-case name) and raw body.
pub struct HookRequest<'a> {
    pub header: &'a (dyn Fn(&str) -> Option<&'a str> + Sync),
    pub body: &'a [u8],
}

/// What a verified request becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// An event to store.
    Event(Event),
    /// Slack's URL verification: answer the challenge, store nothing.
    Challenge(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The sender's delivery id, if it names deliveries (then a replay is a duplicate).
    pub delivery_id: Option<String>,
    /// The stored message's id: the delivery id, or its hash when longer than ids may be.
    pub message_id: Option<String>,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// Why a request is refused before anything is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    TooLarge { size: usize, max: u64 },
    Signature(Rejected),
}

impl Refused {
    pub fn error(&self, hook: &str) -> BrokerError {
        match self {
            Refused::TooLarge { size, max } => BrokerError::new(
                ErrorCode::RequestTooLarge,
                format!(
                    "hook '{hook}': the body is {size} bytes, past its max_body_bytes of {max}; nothing was stored"
                ),
            ),
            Refused::Signature(why) => BrokerError::new(
                ErrorCode::InvalidSignature,
                format!("hook '{hook}': {why}; nothing was stored"),
            ),
        }
    }
}

/// Checks a request against a hook (size, then signature by `keys`, at `now_s`) and says
/// what it becomes.
pub fn plan_event(
    config: &HookConfig,
    keys: &[Vec<u8>],
    request: &HookRequest<'_>,
    now_s: i64,
    limits: &Limits,
) -> Result<Planned, Refused> {
    if request.body.len() as u64 > config.max_body_bytes {
        return Err(Refused::TooLarge {
            size: request.body.len(),
            max: config.max_body_bytes,
        });
    }
    let signature = &config.signature;
    let verified = webhook::verify(
        &signature.scheme,
        keys,
        &Signed {
            header: request.header,
            body: request.body,
        },
        now_s,
        signature.tolerance_s,
    )
    .map_err(Refused::Signature)?;
    if signature.scheme == Scheme::Slack
        && let Some(challenge) = slack_challenge(request.body)
    {
        return Ok(Planned::Challenge(challenge));
    }
    let delivery_id = match &config.id_header {
        Some(name) => (request.header)(name).map(str::to_string),
        None => verified.delivery_id,
    }
    .filter(|id| !id.is_empty());
    let message_id = delivery_id.as_ref().map(|id| {
        if id.len() <= limits.max_id_bytes {
            id.clone()
        } else {
            let digest = Sha256::digest(id.as_bytes());
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256-{hex}")
        }
    });
    let clip = |value: &str| -> String {
        let mut end = value.len().min(limits.max_header_bytes);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value[..end].to_string()
    };
    let mut headers: Vec<(String, String)> = config
        .kept_headers()
        .into_iter()
        .filter_map(|name| (request.header)(&name).map(|v| (name, clip(v))))
        .collect();
    if let Some(id) = &delivery_id {
        headers.push((HEADER_DELIVERY_ID.to_string(), clip(id)));
    }
    headers.truncate(limits.max_headers.saturating_sub(1));
    let key = config
        .key_header
        .as_ref()
        .and_then(|name| (request.header)(name))
        .map(|k| {
            let mut end = k.len().min(limits.max_key_bytes);
            while !k.is_char_boundary(end) {
                end -= 1;
            }
            k[..end].to_string()
        })
        .filter(|k| !k.is_empty());
    Ok(Planned::Event(Event {
        delivery_id,
        message_id,
        key,
        headers,
    }))
}

/// Slack's `url_verification` request: `{"type": "url_verification", "challenge": "..."}`.
fn slack_challenge(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if value.get("type")?.as_str()? != "url_verification" {
        return None;
    }
    value.get("challenge")?.as_str().map(str::to_string)
}

/// A hook's counters since the server started.
#[derive(Default)]
pub struct HookCounters {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub signature_failures: AtomicU64,
    /// Refusals by reason (an error code: a bounded set).
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

/// The counters as shown in stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HookStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub signature_failures: u64,
    pub refused: BTreeMap<&'static str, u64>,
}

impl HookCounters {
    pub fn refuse(&self, reason: ErrorCode) {
        *self.refused.lock().entry(reason.as_str()).or_default() += 1;
        if reason == ErrorCode::InvalidSignature {
            self.signature_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> HookStats {
        HookStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            signature_failures: self.signature_failures.load(Ordering::Relaxed),
            refused: self.refused.lock().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};

    fn patch(json: &str) -> HookPatch {
        serde_json::from_str(json).unwrap()
    }

    fn github(secret: &str, body: &[u8]) -> String {
        webhook::sign_github(secret.as_bytes(), body)
    }

    fn plan(
        config: &HookConfig,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Planned, Refused> {
        let keys = webhook::keys(&config.signature.scheme, &config.signature.secrets).unwrap();
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        plan_event(
            config,
            &keys,
            &HookRequest {
                header: &lookup,
                body,
            },
            1_700_000_000,
            &Limits::default(),
        )
    }

    fn github_hook() -> HookConfig {
        let limits = Limits::default();
        let config = HookConfig::create(
            &patch(
                r#"{"target": {"queue": "gh"}, "signature": {"preset": "github", "secrets": ["new", "old"]}, "headers": ["X-Request-Id"], "key_header": "x-github-event"}"#,
            ),
            &limits,
        )
        .unwrap();
        config.validate(&limits).unwrap();
        config
    }

    #[test]
    fn a_signed_github_delivery_keeps_its_headers_and_id() {
        let config = github_hook();
        let body = br#"{"action":"opened"}"#;
        let sig = github("old", body);
        let headers = [
            ("X-Hub-Signature-256", sig.as_str()),
            ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ("X-GitHub-Event", "issues"),
            ("Content-Type", "application/json"),
            ("X-Request-Id", "r-1"),
            ("Cookie", "not kept"),
        ];
        let Planned::Event(event) = plan(&config, &headers, body).unwrap() else {
            panic!("an event");
        };
        assert_eq!(
            event.message_id.as_deref(),
            Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
        );
        assert_eq!(event.key.as_deref(), Some("issues"));
        let names: Vec<&str> = event.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "x-github-delivery",
                "x-github-event",
                "x-hub-signature-256",
                "x-request-id",
                HEADER_DELIVERY_ID
            ]
        );
    }

    #[test]
    fn bad_signatures_and_large_bodies_are_refused() {
        let config = github_hook();
        let body = b"{}";
        let wrong = github("someone else", body);
        assert!(matches!(
            plan(&config, &[("X-Hub-Signature-256", &wrong)], body),
            Err(Refused::Signature(Rejected::Mismatch))
        ));
        assert!(matches!(
            plan(&config, &[], body),
            Err(Refused::Signature(Rejected::Missing(_)))
        ));
        let mut small = config.clone();
        small.max_body_bytes = 1;
        let sig = github("new", body);
        assert!(matches!(
            plan(&small, &[("X-Hub-Signature-256", &sig)], body),
            Err(Refused::TooLarge { size: 2, max: 1 })
        ));
    }

    #[test]
    fn long_delivery_ids_are_hashed_to_fit() {
        let mut config = github_hook();
        config.id_header = Some("x-id".into());
        let long = "d".repeat(500);
        let body = b"{}";
        let sig = github("new", body);
        let Planned::Event(event) = plan(
            &config,
            &[("X-Hub-Signature-256", &sig), ("X-Id", &long)],
            body,
        )
        .unwrap() else {
            panic!("an event");
        };
        let id = event.message_id.unwrap();
        assert!(id.starts_with("sha256-") && id.len() <= Limits::default().max_id_bytes);
        assert_eq!(event.delivery_id.as_deref(), Some(long.as_str()));
    }

    #[test]
    fn configurations_are_checked() {
        let limits = Limits::default();
        let bad = [
            r#"{"target": {"queue": "q"}}"#,
            r#"{"target": {"queue": "q"}, "signature": {"preset": "github"}}"#,
            r#"{"target": {"queue": "q"}, "signature": {"preset": "github", "secret": ["s"]}}"#,
            r#"{"target": {"queue": "q"}, "signature": {"preset": "none", "secrets": ["s"]}}"#,
            r#"{"target": {"queue": "q"}, "signature": {"preset": "sha1", "secrets": ["s"]}}"#,
            r#"{"target": {"queue": "q"}, "signature": {"preset": "standard_webhooks", "secrets": ["whsec_!!"]}}"#,
            r#"{"target": {"queue": "q"}, "signature": {"preset": "github", "secrets": ["s"], "tolerance_s": 0}}"#,
            r#"{"target": {"queue": "q/x"}, "signature": {"preset": "github", "secrets": ["s"]}}"#,
            r#"{"target": {"queue": "q"}, "signature": {"preset": "github", "secrets": ["s"]}, "headers": ["bad header"]}"#,
            r#"{"target": {"queue": "q"}, "signature": {"preset": "github", "secrets": ["s"]}, "max_body_bytes": 0}"#,
        ];
        for json in bad {
            let refused =
                HookConfig::create(&patch(json), &limits).and_then(|c| c.validate(&limits));
            assert!(refused.is_err(), "{json} was accepted");
        }
        let hmac = HookConfig::create(
            &patch(
                r#"{"target": {"stream": "s"}, "signature": {"preset": "hmac", "header": "X-Sig", "encoding": "base64", "secrets": ["s"]}}"#,
            ),
            &limits,
        )
        .unwrap();
        hmac.validate(&limits).unwrap();
        assert!(hmac.kept_headers().contains(&"x-sig".to_string()));
    }

    #[test]
    fn secrets_are_never_shown() {
        let shown = github_hook().shown().to_string();
        assert!(
            !shown.contains("\"new\"") && !shown.contains("\"old\""),
            "{shown}"
        );
        assert!(shown.contains(&fingerprint("new")), "{shown}");
    }

    #[test]
    fn slack_url_verification_is_answered_not_stored() {
        let limits = Limits::default();
        let config = HookConfig::create(
            &patch(
                r#"{"target": {"queue": "q"}, "signature": {"preset": "slack", "secrets": ["s"]}}"#,
            ),
            &limits,
        )
        .unwrap();
        let body = br#"{"type":"url_verification","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","token":"x"}"#;
        let ts = "1700000000";
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s").unwrap();
        mac.update(b"v0:");
        mac.update(ts.as_bytes());
        mac.update(b":");
        mac.update(body);
        let sig: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let sig = format!("v0={sig}");
        let planned = plan(
            &config,
            &[
                ("X-Slack-Signature", &sig),
                ("X-Slack-Request-Timestamp", ts),
            ],
            body,
        )
        .unwrap();
        assert_eq!(
            planned,
            Planned::Challenge("3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P".into())
        );
    }
}
