//! Webhook hooks through the broker: definitions durable across restarts, events stored
//! byte for byte with their headers, replays of a delivery id deduplicated (across a
//! restart too), secrets rotated, refusals that store nothing, and stream targets.

use tidewater_core::harness::{Harness, HarnessOptions};
use tidewater_core::hook::{HEADER_DELIVERY_ID, HookPatch, HookRequest};
use tidewater_core::stream::config::StreamPatch;
use tidewater_core::{Broker, BrokerError, ErrorCode, Ingested};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn patch(json: serde_json::Value) -> HookPatch {
    serde_json::from_value(json).unwrap()
}

fn github_signature(secret: &str, body: &[u8]) -> String {
    tidewater_auth::webhook::sign_github(secret.as_bytes(), body)
}

/// A GitHub delivery signed with `secret`.
async fn deliver(
    broker: &Broker,
    hook: &str,
    secret: &str,
    delivery: &str,
    body: &[u8],
) -> Result<Ingested, BrokerError> {
    let signature = github_signature(secret, body);
    let headers = [
        ("x-hub-signature-256", signature.as_str()),
        ("x-github-delivery", delivery),
        ("x-github-event", "push"),
        ("content-type", "application/json"),
        ("authorization", "Bearer not-kept"),
    ];
    let lookup = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    broker
        .ingest(
            hook,
            &HookRequest {
                header: &lookup,
                body,
            },
        )
        .await
}

#[test]
fn hooks_store_events_once_and_survive_restarts() {
    runtime().block_on(async {
        let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
        h.queue("github", serde_json::json!({})).await.unwrap();
        let refused = h
            .broker()
            .put_hook(
                "gh",
                &patch(serde_json::json!({
                    "target": {"queue": "missing"},
                    "signature": {"preset": "github", "secrets": ["s1"]}
                })),
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::QueueNotFound);
        let (created, info) = h
            .broker()
            .put_hook(
                "gh",
                &patch(serde_json::json!({
                    "target": {"queue": "github"},
                    "signature": {"preset": "github", "secrets": ["s1"]},
                    "key_header": "x-github-event"
                })),
            )
            .await
            .unwrap();
        assert!(created);
        assert!(!info.config.to_string().contains("s1"), "{}", info.config);

        // Bytes that are not UTF-8 or JSON are stored as sent.
        let body: Vec<u8> = (0..=255u8).collect();
        let first = deliver(h.broker(), "gh", "s1", "d-1", &body).await.unwrap();
        assert_eq!(first, Ingested::Accepted { id: "d-1".into() });
        let replay = deliver(h.broker(), "gh", "s1", "d-1", &body).await.unwrap();
        assert_eq!(replay, Ingested::Duplicate { id: "d-1".into() });
        let forged = deliver(h.broker(), "gh", "other", "d-2", b"{}")
            .await
            .unwrap_err();
        assert_eq!(forged.code, ErrorCode::InvalidSignature);

        h.restart();
        let replay = deliver(h.broker(), "gh", "s1", "d-1", &body).await.unwrap();
        assert_eq!(replay, Ingested::Duplicate { id: "d-1".into() });
        deliver(h.broker(), "gh", "s1", "d-2", b"{\"n\":2}")
            .await
            .unwrap();

        let got = h.receive("github", 10).await.unwrap();
        assert_eq!(got.len(), 2);
        let first = &got[0].record;
        assert_eq!(first.body.as_ref(), body.as_slice());
        assert_eq!(first.key.as_deref(), Some(b"push".as_slice()));
        let header = |name: &str| {
            first
                .headers
                .iter()
                .find(|(k, _)| k.as_ref() == name.as_bytes())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("x-github-delivery").as_deref(), Some("d-1"));
        assert_eq!(header(HEADER_DELIVERY_ID).as_deref(), Some("d-1"));
        assert_eq!(
            header("x-hub-signature-256"),
            Some(github_signature("s1", &body)),
            "the signature is kept, so it can be checked downstream"
        );
        assert_eq!(
            header("authorization"),
            None,
            "only configured headers are kept"
        );

        // Rotation: both secrets in force, then only the new one.
        h.broker()
            .put_hook(
                "gh",
                &patch(
                    serde_json::json!({"signature": {"preset": "github", "secrets": ["s2", "s1"]}}),
                ),
            )
            .await
            .unwrap();
        deliver(h.broker(), "gh", "s1", "d-3", b"{}").await.unwrap();
        deliver(h.broker(), "gh", "s2", "d-4", b"{}").await.unwrap();
        h.broker()
            .put_hook(
                "gh",
                &patch(serde_json::json!({"signature": {"preset": "github", "secrets": ["s2"]}})),
            )
            .await
            .unwrap();
        h.restart();
        let old = deliver(h.broker(), "gh", "s1", "d-5", b"{}")
            .await
            .unwrap_err();
        assert_eq!(old.code, ErrorCode::InvalidSignature);
        deliver(h.broker(), "gh", "s2", "d-5", b"{}").await.unwrap();
        let stats = h.broker().hook("gh").unwrap().stats;
        assert_eq!((stats.accepted, stats.signature_failures), (1, 1));
        assert_eq!(h.broker().hooks().len(), 1);

        h.broker().delete_hook("gh").await.unwrap();
        h.restart();
        let gone = h.broker().hook("gh").unwrap_err();
        assert_eq!(gone.code, ErrorCode::HookNotFound);
        let gone = deliver(h.broker(), "gh", "s2", "d-6", b"{}")
            .await
            .unwrap_err();
        assert_eq!(gone.code, ErrorCode::HookNotFound);
    });
}

#[test]
fn a_missing_target_is_retried_not_lost() {
    runtime().block_on(async {
        let h = Harness::temporary(HarnessOptions::default()).unwrap();
        h.queue("q", serde_json::json!({})).await.unwrap();
        h.broker()
            .put_hook(
                "gh",
                &patch(serde_json::json!({
                    "target": {"queue": "q"},
                    "signature": {"preset": "github", "secrets": ["s"]}
                })),
            )
            .await
            .unwrap();
        h.broker().delete_queue("q").await.unwrap();
        let refused = deliver(h.broker(), "gh", "s", "d-1", b"{}")
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::TargetUnavailable);
        assert!(refused.retry_after_ms.is_some());
        let stats = h.broker().hook("gh").unwrap().stats;
        assert_eq!(stats.refused.get("target_unavailable"), Some(&1));

        // Full: refused with Retry-After; nothing stored.
        h.queue("q", serde_json::json!({"max_messages": 1}))
            .await
            .unwrap();
        deliver(h.broker(), "gh", "s", "d-1", b"{}").await.unwrap();
        let full = deliver(h.broker(), "gh", "s", "d-2", b"{}")
            .await
            .unwrap_err();
        assert_eq!(full.code, ErrorCode::QueueFull);
        assert!(full.retry_after_ms.is_some());
        assert_eq!(h.stats("q").unwrap().depth, 1);
    });
}

#[test]
fn a_stream_target_gets_records_with_the_headers() {
    runtime().block_on(async {
        let h = Harness::temporary(HarnessOptions::default()).unwrap();
        h.broker()
            .put_stream(
                "events",
                &StreamPatch {
                    partitions: Some(1),
                    ..StreamPatch::default()
                },
            )
            .await
            .unwrap();
        h.broker()
            .put_hook(
                "in",
                &patch(serde_json::json!({
                    "target": {"stream": "events"},
                    "signature": {"preset": "github", "secrets": ["s"]},
                    "tenant": "acme"
                })),
            )
            .await
            .unwrap();
        let accepted = deliver(h.broker(), "in", "s", "d-1", b"{\"a\":1}")
            .await
            .unwrap();
        assert_eq!(accepted, Ingested::Accepted { id: "0:0".into() });
        let (records, _, _) = h
            .broker()
            .fetch_records("events", 0, 0, 1 << 20, 0)
            .await
            .unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].value.as_deref(), Some(b"{\"a\":1}".as_slice()));
        let names: Vec<&str> = records[0].headers.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.contains(&"x-github-delivery"), "{names:?}");
        assert!(names.contains(&"tidewater-tenant"), "{names:?}");
    });
}
