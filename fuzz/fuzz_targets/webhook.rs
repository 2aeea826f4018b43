//! Webhook ingress (crates/core/src/hook.rs, crates/auth/src/webhook.rs): any headers and
//! body a sender posts, against every preset. Nothing panics; what a request becomes keeps
//! the server's limits (id, key and header sizes); a body signed as Standard Webhooks by
//! `sign_standard` verifies, and the same body changed by one byte does not.
//!
//! Input: a preset selector byte, then `name: value` lines, an empty line, the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewater_auth::webhook::{self, Scheme, Signed, sign_standard};
use tidewater_core::Limits;
use tidewater_core::hook::{HookConfig, HookPatch, HookRequest, Planned, plan_event};

const SIGNATURES: [&str; 6] = [
    r#"{"preset": "github", "secrets": ["s1", "s2"]}"#,
    r#"{"preset": "stripe", "secrets": ["whsec_test"]}"#,
    r#"{"preset": "slack", "secrets": ["8f742231b10e8888abcd99yyyzzz85a5"]}"#,
    r#"{"preset": "standard_webhooks", "secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}"#,
    r#"{"preset": "hmac", "header": "X-Sig", "encoding": "base64", "prefix": "sha256=", "secrets": ["k"]}"#,
    r#"{"preset": "none"}"#,
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&rest[..at], &rest[at + 2..]),
        None => (rest, &[][..]),
    };
    let headers: Vec<(String, String)> = String::from_utf8_lossy(head)
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let lookup = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let limits = Limits::default();
    let signature = SIGNATURES[usize::from(which) % SIGNATURES.len()];
    let patch: HookPatch = serde_json::from_str(&format!(
        r#"{{"target": {{"queue": "q"}}, "signature": {signature}, "id_header": null, "key_header": "x-key", "headers": ["x-a"]}}"#
    ))
    .unwrap();
    let config = HookConfig::create(&patch, &limits).unwrap();
    config.validate(&limits).unwrap();
    let keys = webhook::keys(&config.signature.scheme, &config.signature.secrets).unwrap();
    let request = HookRequest {
        header: &lookup,
        body,
    };
    if let Ok(Planned::Event(event)) = plan_event(&config, &keys, &request, 1_614_265_330, &limits)
    {
        if let Some(id) = &event.message_id {
            assert!(!id.is_empty() && id.len() <= limits.max_id_bytes, "{id}");
        }
        if let Some(key) = &event.key {
            assert!(key.len() <= limits.max_key_bytes);
        }
        assert!(event.headers.len() < limits.max_headers);
        for (name, value) in &event.headers {
            assert!(
                name.len() <= limits.max_header_bytes && value.len() <= limits.max_header_bytes
            );
        }
    }

    // Signing and verifying agree, for any body, id and timestamp.
    let key = b"0123456789abcdef0123456789abcdef";
    let id = String::from_utf8_lossy(head).into_owned();
    let ts = 1_614_265_330i64;
    let signature = sign_standard(key, &id, ts, body);
    let ts_text = ts.to_string();
    let check = |body: &[u8]| {
        let lookup = |name: &str| match name {
            "webhook-id" => Some(id.as_str()),
            "webhook-timestamp" => Some(ts_text.as_str()),
            "webhook-signature" => Some(signature.as_str()),
            _ => None,
        };
        webhook::verify(
            &Scheme::StandardWebhooks,
            &[key.to_vec()],
            &Signed {
                header: &lookup,
                body,
            },
            ts,
            300,
        )
    };
    assert!(check(body).is_ok());
    if let Some((&first, others)) = body.split_first() {
        let mut changed = vec![first ^ 1];
        changed.extend_from_slice(others);
        assert!(check(&changed).is_err());
    }
});
