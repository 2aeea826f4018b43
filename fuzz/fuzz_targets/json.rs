//! The JSON request bodies of the HTTP API: every body type the server parses, from the
//! same bytes, followed by what the handlers do with a parsed body before it reaches the
//! broker's state (message conversion, ack level, nack reason, receipts, configuration
//! patches applied to a queue's configuration and validated). The request types live in
//! the server binary's `api.rs`, compiled in here by path. A queue configuration (also
//! what the journal stores for each queue, parsed at startup) must survive a round trip
//! through JSON.
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/server/src/api.rs"]
mod api;
// api.rs parses RFC 3339 times with the server's own parser (the rest of it goes unused).
#[allow(dead_code)]
#[path = "../../crates/server/src/time.rs"]
mod time;

use libfuzzer_sys::fuzz_target;
use tidewater_core::config::{QueueConfig, validate_queue_name};
use tidewater_core::receipt::Receipt;
use tidewater_core::{ConfigPatch, Limits, NackReason};

fn check_config(config: &QueueConfig, name: &str, limits: &Limits) {
    let valid = config.validate(name, limits).is_ok();
    let text = serde_json::to_string(config).expect("a configuration serializes");
    let again: QueueConfig =
        serde_json::from_str(&text).expect("a serialized configuration parses");
    assert_eq!(&again, config, "configuration changed through JSON: {text}");
    assert_eq!(again.validate(name, limits).is_ok(), valid);
    if valid {
        // The arithmetic a valid configuration feeds.
        for count in [0, 1, 2, 30, u32::MAX] {
            let _ = config.backoff.delay_ms(count, 1.0);
        }
        if let Some(c) = &config.coalesce {
            let _ = c.max_wait();
        }
        if let Some(q) = &config.quota {
            let _ = q.limits_for("t");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(req) = serde_json::from_slice::<api::PublishRequest>(data) {
        let _ = api::ack_level(req.ack.as_deref());
        for (idx, message) in req.messages.into_iter().enumerate() {
            let _ = message.into_message(idx);
        }
    }
    if let Ok(req) = serde_json::from_slice::<api::ReceiptsRequest>(data) {
        let _ = NackReason::parse(req.reason.as_deref());
        for r in &req.receipts {
            let _ = Receipt::decode(r);
        }
    }
    let _ = serde_json::from_slice::<api::ReceiveRequest>(data);
    let _ = serde_json::from_slice::<api::RedriveBody>(data);
    if let Ok(patch) = serde_json::from_slice::<ConfigPatch>(data) {
        // PUT creates from the defaults; PUT/PATCH of an existing queue applies to its own.
        for base in [
            QueueConfig::defaults_for("q", &limits),
            QueueConfig::for_dead_letter_queue("q-dlq", &limits),
        ] {
            check_config(&base.apply(&patch), "q", &limits);
        }
    }
    if let Ok(config) = serde_json::from_slice::<QueueConfig>(data) {
        check_config(&config, "q", &limits);
    }
    let _ = serde_json::from_slice::<Limits>(data);
    if let Ok(name) = std::str::from_utf8(data) {
        let _ = validate_queue_name(name);
    }
});
