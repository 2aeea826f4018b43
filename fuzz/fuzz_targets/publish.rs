//! Publishes through a real broker (on a data directory in the temp dir): the JSON publish
//! body as the HTTP handler parses and converts it, or a client-built record batch as a
//! binary Produce frame carries it (first byte odd: the batch's CRCs are repaired first, so
//! the per-record checks behind them are explored). Every message check of the broker runs
//! (limits, delays, ttl, tenant, priority, ids and deduplication) and what passes is
//! appended at ack level `written`. Refusals are fine; a panic is a finding.
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/server/src/api.rs"]
mod api;
// api.rs parses RFC 3339 times with the server's own parser (the rest of it goes unused).
#[allow(dead_code)]
#[path = "../../crates/server/src/time.rs"]
mod time;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use tidewater_core::{AckLevel, Broker, BrokerOptions, ConfigPatch};
use tidewater_fuzz::{mode, repair_batches};

struct Fixture {
    rt: tokio::runtime::Runtime,
    broker: Broker,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("tidewater-fuzz-publish-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let broker = rt.block_on(async {
            let broker = Broker::open(&dir, BrokerOptions::default()).expect("broker opens");
            let patch: ConfigPatch =
                serde_json::from_str(r#"{"priority_levels": 3, "key_concurrency": 2}"#).unwrap();
            broker.put_queue("q", &patch).await.expect("queue");
            broker
        });
        Fixture { rt, broker }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((batch, rest)) = mode(data) else {
        return;
    };
    let f = fixture();
    static RUNS: AtomicU64 = AtomicU64::new(0);
    f.rt.block_on(async {
        if batch {
            let mut bytes = rest.to_vec();
            repair_batches(&mut bytes);
            if let Ok(appended) = f.broker.start_publish_batch("q", bytes, AckLevel::Written) {
                let _ = appended.await;
            }
        } else if let Ok(req) = serde_json::from_slice::<api::PublishRequest>(rest) {
            let Ok(level) = api::ack_level(req.ack.as_deref()) else {
                return;
            };
            let level = if level == AckLevel::Durable {
                AckLevel::Written
            } else {
                level
            };
            let messages: Result<Vec<_>, _> = req
                .messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| m.into_message(i))
                .collect();
            if let Ok(messages) = messages {
                let _ = f.broker.publish("q", &messages, level).await;
            }
        }
        // Keep the queue from filling up (a full queue refuses everything).
        if RUNS.fetch_add(1, Ordering::Relaxed) % 1_000 == 999 {
            let _ = f.broker.purge("q").await;
        }
    });
});
