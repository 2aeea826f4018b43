//! Flow-control policies, one by one, against a real broker with a manual clock: every
//! figure below is exact because time only moves when the test says so.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use tidewater_core::broker::Published;
use tidewater_core::broker::header;
use tidewater_core::clock::{FixedJitter, ManualClock};
use tidewater_core::harness::{self, HarnessOptions};
use tidewater_core::{AckLevel, Broker, ConfigPatch, Delay, NackReason, NewMessage};

/// The shared harness (`tidewater_core::harness`), with every call expected to succeed.
struct Harness {
    inner: harness::Harness,
    clock: ManualClock,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_jitter(1.0)
    }

    fn with_jitter(jitter: f64) -> Harness {
        let inner = harness::Harness::temporary(HarnessOptions {
            jitter: Arc::new(FixedJitter(jitter)),
            ..HarnessOptions::default()
        })
        .unwrap();
        let clock = inner.clock.clone();
        Harness { inner, clock }
    }

    fn broker(&self) -> &Broker {
        self.inner.broker()
    }

    fn restart(&mut self) {
        self.inner.restart();
    }

    async fn queue(&self, name: &str, config: serde_json::Value) {
        self.inner.queue(name, config).await.unwrap();
    }

    async fn publish(&self, queue: &str, messages: Vec<NewMessage>) -> Published {
        self.inner.publish(queue, &messages).await.unwrap()
    }

    async fn try_publish(
        &self,
        messages: Vec<NewMessage>,
    ) -> Result<Published, tidewater_core::BrokerError> {
        self.broker()
            .publish("q", &messages, AckLevel::Durable)
            .await
    }

    async fn receive(&self, queue: &str, max: usize) -> Vec<tidewater_core::queue::Delivery> {
        self.inner.receive(queue, max).await.unwrap()
    }

    fn stats(&self, queue: &str) -> tidewater_core::queue::QueueStats {
        self.inner.stats(queue).unwrap()
    }
}

fn msgs(n: usize) -> Vec<NewMessage> {
    harness::messages(n)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

#[test]
fn dispatch_rate_never_exceeds_rate_plus_burst_in_any_second() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue(
            "mail",
            json!({"dispatch_rate": {"per_s": 100, "burst": 10}}),
        )
        .await;
        h.publish("mail", msgs(1_000)).await;
        // A greedy consumer asks every 5 ms for 3 seconds and acks at once.
        let mut delivered_at = Vec::new();
        for step in 0..600 {
            for d in h.receive("mail", 1_000).await {
                delivered_at.push(step * 5);
                h.broker().ack("mail", &[d.receipt]).await.unwrap();
            }
            h.clock.advance(5);
        }
        assert_eq!(delivered_at.iter().filter(|&&t| t == 0).count(), 10);
        for start in (0..2_000).step_by(5) {
            let window = delivered_at
                .iter()
                .filter(|&&t| t >= start && t < start + 1_000)
                .count();
            assert!(
                window <= 110,
                "{window} deliveries in the second from {start} ms"
            );
        }
        // Burst then 100/s: 10 + 3 s x 100, less the last interval.
        assert!(
            (305..=310).contains(&delivered_at.len()),
            "{}",
            delivered_at.len()
        );
        assert_eq!(h.stats("mail").dispatch_rate_per_s, Some(100.0));
    });
}

#[test]
fn dispatch_rate_changes_at_run_time_and_survives_restart() {
    runtime().block_on(async {
        let mut h = Harness::new();
        h.queue("q", json!({})).await;
        h.publish("q", msgs(50)).await;
        assert_eq!(h.receive("q", 20).await.len(), 20, "no limit yet");
        h.queue("q", json!({"dispatch_rate": {"per_s": 1, "burst": 5}}))
            .await;
        assert_eq!(h.receive("q", 20).await.len(), 5);
        assert_eq!(h.receive("q", 20).await.len(), 0);
        h.restart();
        let config = h.broker().get_queue("q").unwrap().config;
        assert_eq!(
            config.dispatch_rate.map(|r| (r.per_s, r.burst)),
            Some((1.0, 5))
        );
        // The restarted broker starts with a full burst, then 1/s.
        assert_eq!(h.receive("q", 50).await.len(), 5);
        h.clock.advance(1_000);
        assert_eq!(h.receive("q", 50).await.len(), 1);
        h.queue("q", json!({"dispatch_rate": null})).await;
        assert_eq!(h.receive("q", 50).await.len(), 50 - 5 - 1, "limit removed");
    });
}

#[test]
fn adaptive_throttling_halves_on_overload_and_recovers_on_success() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue(
            "api",
            json!({"adaptive": {"min_per_s": 10, "max_per_s": 100}, "lease_ms": 1500}),
        )
        .await;
        h.publish("api", msgs(500)).await;
        assert_eq!(h.stats("api").dispatch_rate_per_s, Some(100.0));
        let got = h.receive("api", 4).await;
        let receipts: Vec<String> = got.iter().map(|d| d.receipt.clone()).collect();
        h.broker()
            .nack("api", &receipts[..1], Some(0), None, NackReason::Overloaded)
            .await
            .unwrap();
        assert_eq!(h.stats("api").dispatch_rate_per_s, Some(50.0));
        h.broker()
            .nack(
                "api",
                &receipts[1..2],
                Some(0),
                None,
                NackReason::Overloaded,
            )
            .await
            .unwrap();
        assert_eq!(
            h.stats("api").dispatch_rate_per_s,
            Some(50.0),
            "one cut per second"
        );
        // A plain failure is not an overload signal.
        h.clock.advance(1_000);
        h.broker()
            .nack("api", &receipts[2..3], Some(0), None, NackReason::Failed)
            .await
            .unwrap();
        assert_eq!(h.stats("api").dispatch_rate_per_s, Some(50.0));
        // An expired lease is.
        h.clock.advance(1_000);
        h.broker().run_maintenance().await;
        assert_eq!(h.stats("api").dispatch_rate_per_s, Some(25.0));
        // Success raises it by a twentieth of the range per second.
        h.clock.advance(1_000);
        let got = h.receive("api", 1).await;
        h.broker()
            .ack("api", &[got[0].receipt.clone()])
            .await
            .unwrap();
        assert_eq!(h.stats("api").dispatch_rate_per_s, Some(29.5));
        assert_eq!(h.stats("api").nacked, 3, "overloaded nacks are nacks too");
    });
}

#[test]
fn queue_ttl_drops_old_messages_even_without_consumers() {
    runtime().block_on(async {
        let mut h = Harness::new();
        h.queue("t", json!({"ttl_ms": 1000})).await;
        h.publish("t", msgs(3)).await;
        h.clock.advance(600);
        h.publish("t", msgs(2)).await;
        // Ages count from the publish time stored with each message, across restarts.
        h.restart();
        h.clock.advance(400);
        h.broker().run_maintenance().await;
        let stats = h.stats("t");
        assert_eq!((stats.ttl_expired, stats.total), (3, 2));
        let got = h.receive("t", 10).await;
        assert_eq!(got.len(), 2);
        // A leased message that outlives its ttl is dropped at its next delivery.
        h.broker()
            .nack(
                "t",
                &[got[0].receipt.clone()],
                Some(0),
                None,
                NackReason::Failed,
            )
            .await
            .unwrap();
        h.clock.advance(600);
        assert!(h.receive("t", 10).await.is_empty());
        let stats = h.stats("t");
        assert_eq!((stats.ttl_expired, stats.total, stats.in_flight), (4, 1, 1));
        assert!(
            h.broker().get_queue("t-dlq").is_err(),
            "dropped, not dead-lettered"
        );
    });
}

#[test]
fn a_message_ttl_dead_letters_with_the_reason() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue("t", json!({"on_expire": "dead_letter"})).await;
        let mut batch = msgs(2);
        batch[0].ttl_ms = Some(100);
        h.publish("t", batch).await;
        h.clock.advance(100);
        let got = h.receive("t", 10).await;
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].record.body[..], b"m1");
        assert_eq!(h.stats("t").ttl_expired, 1);
        let dead = h.broker().peek("t-dlq", 0, 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(&dead[0].record.body[..], b"m0");
        assert_eq!(
            header(&dead[0].record, "tidewater-last-error").as_deref(),
            Some("expired: older than its ttl_ms")
        );
        // A bad ttl is refused with the message named.
        let mut bad = msgs(1);
        bad[0].ttl_ms = Some(0);
        let err = h
            .broker()
            .publish("t", &bad, AckLevel::Durable)
            .await
            .unwrap_err();
        assert_eq!(err.code.as_str(), "invalid_message");
    });
}

#[test]
fn jitter_spreads_delivery_times_within_the_bound() {
    runtime().block_on(async {
        // The injected jitter draws 0.5: half of jitter_ms is added.
        let h = Harness::with_jitter(0.5);
        h.queue("cron", json!({})).await;
        let mut batch = msgs(2);
        batch[0].jitter_ms = Some(1_000);
        batch[1].jitter_ms = Some(1_000);
        batch[1].delay = Delay::AfterMs(2_000);
        h.publish("cron", batch).await;
        assert_eq!(h.stats("cron").delayed, 2);
        h.clock.advance(499);
        assert!(h.receive("cron", 10).await.is_empty());
        h.clock.advance(1);
        assert_eq!(&h.receive("cron", 10).await[0].record.body[..], b"m0");
        h.clock.advance(2_000);
        assert_eq!(&h.receive("cron", 10).await[0].record.body[..], b"m1");
    });
}

#[test]
fn invalid_policies_are_refused_with_the_field_named() {
    runtime().block_on(async {
        let h = Harness::new();
        for (config, field) in [
            (
                json!({"dispatch_rate": {"per_s": 0}}),
                "dispatch_rate.per_s",
            ),
            (
                json!({"dispatch_rate": {"per_s": 5, "burst": 0}}),
                "dispatch_rate.burst",
            ),
            (
                json!({"adaptive": {"min_per_s": 50, "max_per_s": 10}}),
                "adaptive",
            ),
            (json!({"ttl_ms": 0}), "ttl_ms"),
            (
                json!({"on_expire": "dead_letter", "dead_letter_queue": null}),
                "dead_letter",
            ),
        ] {
            let patch: ConfigPatch = serde_json::from_value(config.clone()).unwrap();
            let err = h.broker().put_queue("p", &patch).await.unwrap_err();
            assert!(err.message.contains(field), "{config}: {}", err.message);
        }
        assert!(serde_json::from_value::<ConfigPatch>(json!({"on_expire": "explode"})).is_err());
    });
}

/// Messages from `tenant`, each with a fresh id (so none is a duplicate).
fn from(tenant: &str, n: usize) -> Vec<NewMessage> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    (0..n)
        .map(|_| NewMessage {
            body: vec![b'x'; 10],
            tenant: Some(tenant.to_string()),
            id: Some(format!(
                "id-{}",
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )),
            ..NewMessage::default()
        })
        .collect()
}

#[test]
fn quotas_refuse_with_the_exact_wait_per_tenant() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue(
            "q",
            json!({"quota": {"msgs_per_s": 10, "burst_msgs": 5,
                "tenants": {"big": {"msgs_per_s": 100, "burst_msgs": 50}, "thin": {"bytes_per_s": 100, "burst_bytes": 100}}}}),
        )
        .await;
        h.try_publish(from("a", 5)).await.unwrap();
        let err = h.try_publish(from("a", 1)).await.unwrap_err();
        assert_eq!(err.code.as_str(), "quota_exceeded");
        assert_eq!(err.retry_after_ms, Some(100), "one token at 10/s");
        assert!(err.message.contains("tenant 'a'"), "{}", err.message);
        // Another tenant has its own bucket of the default size; a named one its own limits.
        h.try_publish(from("b", 5)).await.unwrap();
        h.try_publish(from("big", 50)).await.unwrap();
        // Bytes: a message counts 30 (body and tenant header); 3 nearly empty thin's 100.
        h.try_publish(from("thin", 3)).await.unwrap();
        let err = h.try_publish(from("thin", 1)).await.unwrap_err();
        assert!(err.message.contains("bytes_per_s"), "{}", err.message);
        assert_eq!(err.retry_after_ms, Some(200), "20 bytes missing at 100/s");
        // A batch is admitted whole or refused whole: one over-quota tenant refuses it all.
        let mut mixed = from("c", 2);
        mixed.extend(from("a", 1));
        assert!(h.try_publish(mixed).await.is_err());
        h.try_publish(from("c", 5)).await.expect("c spent nothing on the refused batch");
        h.clock.advance(300);
        h.try_publish(from("a", 3)).await.expect("refilled");
        assert_eq!(h.stats("q").total, 5 + 5 + 50 + 3 + 5 + 3);
        let info = h.broker().get_queue("q").unwrap();
        assert_eq!(
            info.quota_refused.into_iter().collect::<Vec<_>>(),
            vec![("a".to_string(), 2), ("thin".to_string(), 1)]
        );
        // Messages without a tenant share the "anonymous" bucket of the default size.
        h.try_publish(msgs(5)).await.unwrap();
        assert!(h.try_publish(msgs(1)).await.is_err());
        // Removing the quota lets everything through.
        h.queue("q", json!({"quota": null})).await;
        h.try_publish(msgs(100)).await.unwrap();
    });
}

#[test]
fn quota_refusal_labels_are_bounded() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue("q", json!({"quota": {"msgs_per_s": 1, "burst_msgs": 1}}))
            .await;
        for t in 0..50 {
            let tenant = format!("t{t}");
            h.broker()
                .publish("q", &from(&tenant, 1), AckLevel::Durable)
                .await
                .unwrap();
            assert!(
                h.broker()
                    .publish("q", &from(&tenant, 1), AckLevel::Durable)
                    .await
                    .is_err()
            );
        }
        let refused = h.broker().get_queue("q").unwrap().quota_refused;
        assert_eq!(refused.len(), 21, "20 tenants and other");
        assert_eq!(refused["other"], 30);
    });
}

fn with_ids(ids: &[&str]) -> Vec<NewMessage> {
    ids.iter()
        .map(|id| NewMessage {
            id: Some(id.to_string()),
            body: format!("body of {id}").into_bytes(),
            ..NewMessage::default()
        })
        .collect()
}

#[test]
fn duplicates_within_the_window_are_acknowledged_not_enqueued_even_after_restart() {
    runtime().block_on(async {
        let mut h = Harness::new();
        h.queue("d", json!({"dedup_window_ms": 10_000})).await;
        let first = h.publish("d", with_ids(&["a", "b"])).await;
        assert_eq!((first.ids.len(), first.duplicates.len()), (2, 0));
        // One repeat, one new, and a repeat inside the same batch.
        let second = h.publish("d", with_ids(&["b", "c", "c"])).await;
        assert_eq!(second.ids, vec!["b", "c", "c"]);
        assert_eq!(second.duplicates, vec![0, 2]);
        assert_eq!(h.stats("d").total, 3);
        // Settled messages are still remembered; the window survives a restart.
        for d in h.receive("d", 10).await {
            h.broker().ack("d", &[d.receipt]).await.unwrap();
        }
        h.restart();
        h.clock.advance(9_000);
        let third = h.publish("d", with_ids(&["a", "b", "c"])).await;
        assert_eq!(third.duplicates, vec![0, 1, 2]);
        assert_eq!(h.stats("d").total, 0);
        assert_eq!(h.stats("d").deduplicated, 3, "counters restart from zero");
        assert_eq!(h.stats("d").dedup_ids, 3, "a, b and c are remembered");
        // Past the window an id is new again.
        h.clock.advance(1_001);
        let fourth = h.publish("d", with_ids(&["a"])).await;
        assert!(fourth.duplicates.is_empty());
        assert_eq!(h.stats("d").total, 1);
    });
}

#[test]
fn a_refused_publish_does_not_claim_its_ids() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue("d", json!({"max_messages": 2})).await;
        h.publish("d", with_ids(&["a", "b"])).await;
        let err = h
            .broker()
            .publish("d", &with_ids(&["c"]), AckLevel::Durable)
            .await
            .unwrap_err();
        assert_eq!(err.code.as_str(), "queue_full");
        h.queue("d", json!({"max_messages": 10})).await;
        let retry = h.publish("d", with_ids(&["c"])).await;
        assert!(
            retry.duplicates.is_empty(),
            "the refused copy was not stored"
        );
        assert_eq!(h.stats("d").total, 3);
        // Turning deduplication off enqueues repeats.
        h.queue("d", json!({"dedup_window_ms": 0})).await;
        assert!(h.publish("d", with_ids(&["a"])).await.duplicates.is_empty());
        assert_eq!(h.stats("d").total, 4);
    });
}

fn keyed(keys: &[&str]) -> Vec<NewMessage> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| NewMessage {
            key: Some(k.to_string()),
            body: format!("{k}{i}").into_bytes(),
            ..NewMessage::default()
        })
        .collect()
}

/// Where messages wait, by key and by fairness value: the busiest first, each key named as
/// published (UTF-8 or not), nothing where the policy is off, and a bounded listing.
#[test]
fn the_busiest_keys_and_flows_say_where_messages_wait() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue("plain", json!({})).await;
        assert_eq!(
            h.broker().busiest("plain", 10).unwrap(),
            tidewater_core::broker::Busiest::default()
        );
        h.queue(
            "k",
            json!({"key_concurrency": 1, "fairness": {"by": "tenant", "weights": {"acme": 2}}}),
        )
        .await;
        let mut messages = keyed(&["hot", "hot", "hot", "warm", "warm", "idle"]);
        for (i, m) in messages.iter_mut().enumerate() {
            m.tenant = Some(if i < 4 { "acme" } else { "globex" }.into());
        }
        h.publish("k", messages).await;
        // One of each key leased: two hot and one warm wait.
        assert_eq!(h.receive("k", 10).await.len(), 3);
        let busiest = h.broker().busiest("k", 10).unwrap();
        let keys: Vec<(Option<&str>, u32, u64)> = busiest
            .keys
            .as_ref()
            .unwrap()
            .iter()
            .map(|k| (k.key.as_deref(), k.in_flight, k.waiting))
            .collect();
        assert_eq!(
            keys,
            [
                (Some("hot"), 1, 2),
                (Some("warm"), 1, 1),
                (Some("idle"), 1, 0)
            ]
        );
        assert_eq!(busiest.keys.as_ref().unwrap()[0].key_base64, "aG90");
        assert_eq!(busiest.fair_by.as_deref(), Some("tenant"));
        assert_eq!(h.broker().busiest("k", 1).unwrap().keys.unwrap().len(), 1);
        let err = h.broker().busiest("k", 0).unwrap_err();
        assert_eq!(err.code, tidewater_core::ErrorCode::InvalidRequest);
        assert!(h.broker().busiest("nope", 1).is_err());
        // Fairness: waiting messages per tenant, with its weight.
        h.queue(
            "f",
            json!({"fairness": {"by": "tenant", "weights": {"acme": 2}}}),
        )
        .await;
        let mut messages = msgs(5);
        for (i, m) in messages.iter_mut().enumerate() {
            m.tenant = Some(if i < 3 { "acme" } else { "globex" }.into());
        }
        h.publish("f", messages).await;
        // (The scheduler sorts messages as it looks ahead for a receive.)
        assert_eq!(h.receive("f", 1).await.len(), 1);
        let flows: Vec<(String, u64, f64)> = h
            .broker()
            .busiest("f", 10)
            .unwrap()
            .flows
            .unwrap()
            .into_iter()
            .map(|f| (f.flow, f.waiting, f.weight))
            .collect();
        assert_eq!(
            flows,
            [("acme".to_string(), 2, 2.0), ("globex".to_string(), 2, 1.0)]
        );
    });
}

#[test]
fn key_concurrency_one_keeps_per_key_order_across_retries_and_lets_other_keys_pass() {
    runtime().block_on(async {
        let mut h = Harness::new();
        h.queue("k", json!({"key_concurrency": 1, "lease_ms": 1000}))
            .await;
        h.publish("k", keyed(&["a", "a", "b", "a", "c"])).await;
        let got = h.receive("k", 10).await;
        let bodies: Vec<&[u8]> = got.iter().map(|d| &d.record.body[..]).collect();
        assert_eq!(
            bodies,
            [b"a0", b"b2", b"c4"],
            "one per key; b and c pass a's line"
        );
        let stats = h.stats("k");
        assert_eq!(
            (stats.keys_in_flight, stats.keys_blocked),
            (Some(3), Some(1))
        );
        // a0 fails and is retried later: a1 still waits behind it.
        h.broker()
            .nack(
                "k",
                &[got[0].receipt.clone()],
                Some(500),
                None,
                NackReason::Failed,
            )
            .await
            .unwrap();
        assert!(h.receive("k", 10).await.is_empty());
        h.clock.advance(500);
        let again = h.receive("k", 10).await;
        assert_eq!(again.len(), 1);
        assert_eq!(&again[0].record.body[..], b"a0");
        // A restart forgets leases, not order.
        h.restart();
        let after = h.receive("k", 10).await;
        let bodies: Vec<&[u8]> = after.iter().map(|d| &d.record.body[..]).collect();
        assert_eq!(bodies, [b"a0", b"b2", b"c4"]);
        h.broker()
            .ack("k", &[after[0].receipt.clone()])
            .await
            .unwrap();
        let next = h.receive("k", 10).await;
        assert_eq!(&next[0].record.body[..], b"a1", "a0 settled: a1 is next");
        // Turning the limit off hands the waiting a3 out at once.
        h.queue("k", json!({"key_concurrency": null})).await;
        let rest = h.receive("k", 10).await;
        assert_eq!(&rest[0].record.body[..], b"a3");
        assert_eq!(h.stats("k").keys_in_flight, None);
    });
}

mod key_model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Publish(Vec<u8>),
        Receive(usize),
        Ack(usize),
        Nack(usize, u64),
        Advance(i64),
        Restart,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => prop::collection::vec(0u8..4, 1..5).prop_map(Step::Publish),
            4 => (1usize..6).prop_map(Step::Receive),
            3 => any::<usize>().prop_map(Step::Ack),
            2 => (any::<usize>(), 0u64..800).prop_map(|(i, d)| Step::Nack(i, d)),
            2 => (1i64..1_500).prop_map(Step::Advance),
            1 => Just(Step::Restart),
        ]
    }

    /// With key_concurrency 2, never more than two messages of a key leased at once;
    /// each key's messages start in publish order (a message's first delivery comes
    /// after every earlier message of its key but one has started); nothing is lost.
    fn run(steps: Vec<Step>, fair: bool) -> Result<(), TestCaseError> {
        runtime().block_on(async move {
            let mut h = Harness::new();
            let mut config = json!({"key_concurrency": 2, "lease_ms": 1000, "max_deliveries": 0});
            if fair {
                // Lanes per key in front of the key gate.
                config["fairness"] = json!({"by": "key"});
            }
            h.queue("k", config).await;
            let mut published: Vec<(u8,)> = Vec::new();
            let mut acked: Vec<bool> = Vec::new();
            let mut started: Vec<bool> = Vec::new();
            let mut leased: Vec<(usize, String, i64)> = Vec::new(); // (index, receipt, deadline)
            for step in steps {
                let now = h.clock.now();
                leased.retain(|(_, _, deadline)| *deadline > now);
                match step {
                    Step::Publish(keys) => {
                        // The body is the message's index in `published`.
                        let msgs: Vec<NewMessage> = keys
                            .iter()
                            .enumerate()
                            .map(|(i, k)| NewMessage {
                                key: Some(format!("k{k}")),
                                body: (published.len() + i).to_string().into_bytes(),
                                ..NewMessage::default()
                            })
                            .collect();
                        h.publish("k", msgs).await;
                        for k in keys {
                            published.push((k,));
                            acked.push(false);
                            started.push(false);
                        }
                    }
                    Step::Receive(max) => {
                        for d in h.receive("k", max).await {
                            let i: usize = String::from_utf8(d.record.body.to_vec())
                                .unwrap()
                                .parse()
                                .unwrap();
                            let key = published[i].0;
                            if !started[i] {
                                // Earlier unstarted messages of this key would be overtaken.
                                let overtaken = (0..i)
                                    .filter(|&j| published[j].0 == key && !started[j])
                                    .count();
                                prop_assert_eq!(
                                    overtaken,
                                    0,
                                    "message {} overtook its key-mates",
                                    i
                                );
                                started[i] = true;
                            }
                            leased.push((i, d.receipt, now + 1000));
                            let in_flight = leased
                                .iter()
                                .filter(|(j, _, _)| published[*j].0 == key)
                                .count();
                            prop_assert!(
                                in_flight <= 2,
                                "{} messages of key {} leased",
                                in_flight,
                                key
                            );
                        }
                    }
                    Step::Ack(pick) if !leased.is_empty() => {
                        let (i, receipt, _) = leased.remove(pick % leased.len());
                        h.broker().ack("k", &[receipt]).await.unwrap();
                        acked[i] = true;
                    }
                    Step::Nack(pick, delay) if !leased.is_empty() => {
                        let (_, receipt, _) = leased.remove(pick % leased.len());
                        h.broker()
                            .nack("k", &[receipt], Some(delay), None, NackReason::Failed)
                            .await
                            .unwrap();
                    }
                    Step::Ack(_) | Step::Nack(..) => {}
                    Step::Advance(ms) => {
                        h.clock.advance(ms);
                        h.broker().run_maintenance().await;
                    }
                    Step::Restart => {
                        h.restart();
                        leased.clear();
                    }
                }
                h.broker().debug_check_consistency();
                let open = acked.iter().filter(|a| !**a).count() as u64;
                prop_assert_eq!(h.stats("k").total, open);
            }
            // Drain: everything not acked is delivered eventually, in key order.
            let mut rounds = 0;
            while acked.iter().any(|a| !a) {
                rounds += 1;
                prop_assert!(rounds < 200, "messages stuck: {:?}", acked);
                h.clock.advance(2_000);
                h.broker().run_maintenance().await;
                for d in h.receive("k", 100).await {
                    let i: usize = String::from_utf8(d.record.body.to_vec())
                        .unwrap()
                        .parse()
                        .unwrap();
                    h.broker().ack("k", &[d.receipt]).await.unwrap();
                    acked[i] = true;
                }
            }
            Ok(())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 1_000, ..ProptestConfig::default() })]
        #[test]
        fn per_key_limits_hold_and_lose_nothing(steps in prop::collection::vec(step(), 1..50)) {
            run(steps, false)?;
        }

        #[test]
        fn per_key_limits_hold_behind_fair_lanes(steps in prop::collection::vec(step(), 1..50)) {
            run(steps, true)?;
        }
    }
}

#[test]
fn supersede_cancels_pending_and_flags_leased_older_messages() {
    runtime().block_on(async {
        let mut h = Harness::new();
        h.queue("ci", json!({"supersede": true})).await;
        // Three pushes to one branch, one to another: only the newest of each is built.
        h.publish("ci", keyed(&["main", "dev", "main"])).await;
        h.publish("ci", keyed(&["main"])).await;
        h.broker().run_maintenance().await;
        let stats = h.stats("ci");
        assert_eq!((stats.superseded, stats.total), (2, 2));
        let got = h.receive("ci", 10).await;
        let bodies: Vec<&[u8]> = got.iter().map(|d| &d.record.body[..]).collect();
        assert_eq!(
            bodies,
            [&b"dev1"[..], &b"main0"[..]],
            "the newest main is its second batch's 0"
        );
        // A push while main is being built: the running build learns it on extend and ack.
        h.publish("ci", keyed(&["main"])).await;
        let main = got[1].receipt.clone();
        let reply = h
            .broker()
            .extend("ci", std::slice::from_ref(&main), None)
            .unwrap();
        assert_eq!((reply.ok, reply.failed[0].code), (0, "superseded"));
        let reply = h
            .broker()
            .ack("ci", std::slice::from_ref(&main))
            .await
            .unwrap();
        assert_eq!((reply.ok, reply.superseded.clone()), (1, vec![main]));
        let dev = got[0].receipt.clone();
        let reply = h.broker().ack("ci", &[dev]).await.unwrap();
        assert!(reply.superseded.is_empty());
        assert_eq!(
            h.receive("ci", 10).await.len(),
            1,
            "the newest main is pending"
        );
        // Two pending messages of one key after a restart (turned on late): the older goes.
        h.queue("late", json!({})).await;
        h.publish("late", keyed(&["k", "k", "j"])).await;
        h.queue("late", json!({"supersede": true})).await;
        h.restart();
        h.broker().run_maintenance().await;
        let stats = h.stats("late");
        assert_eq!((stats.superseded, stats.total), (1, 2));
    });
}

fn tenant_of(d: &tidewater_core::queue::Delivery) -> String {
    header(&d.record, "tidewater-tenant").unwrap_or_default()
}

#[test]
fn fair_scheduling_evens_out_a_tenant_flood() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue("jobs", json!({"fairness": {"by": "tenant"}})).await;
        // Tenant "big" publishes 95% of the backlog, four others 5% between them.
        let mut batch = Vec::new();
        for i in 0..4_000 {
            let tenant = if i % 20 == 0 {
                ["b", "c", "d", "e"][i / 20 % 4]
            } else {
                "big"
            };
            batch.extend(from(tenant, 1));
            if batch.len() == 1_000 {
                h.publish("jobs", std::mem::take(&mut batch)).await;
            }
        }
        let mut delivered: HashMap<String, f64> = HashMap::new();
        for _ in 0..25 {
            for d in h.receive("jobs", 10).await {
                *delivered.entry(tenant_of(&d)).or_default() += 1.0;
                h.broker().ack("jobs", &[d.receipt]).await.unwrap();
            }
        }
        let shares: Vec<f64> = ["big", "b", "c", "d", "e"]
            .iter()
            .map(|t| delivered.get(*t).copied().unwrap_or(0.0))
            .collect();
        assert_eq!(shares.iter().sum::<f64>(), 250.0);
        let jain = tidewater_core::policy::shaper::jain_index(&shares);
        assert!(jain >= 0.95, "Jain {jain:.3} for {shares:?}");
        // Without the policy, delivery follows the backlog: "big" takes 95%.
        h.queue("fifo", json!({})).await;
        let mut batch = Vec::new();
        for i in 0..1_000 {
            batch.extend(from(if i % 20 == 0 { "b" } else { "big" }, 1));
        }
        h.publish("fifo", batch).await;
        let got = h.receive("fifo", 100).await;
        assert_eq!(got.iter().filter(|d| tenant_of(d) == "big").count(), 95);
    });
}

#[test]
fn weights_and_priorities_shape_the_order() {
    runtime().block_on(async {
        let mut h = Harness::new();
        h.queue(
            "w",
            json!({"fairness": {"by": "key", "weights": {"gold": 3}}}),
        )
        .await;
        let keys: Vec<&str> = (0..400)
            .map(|i| if i % 2 == 0 { "gold" } else { "tin" })
            .collect();
        h.publish("w", keyed(&keys)).await;
        let got = h.receive("w", 100).await;
        let gold = got
            .iter()
            .filter(|d| d.record.key.as_deref() == Some(&b"gold"[..]))
            .count();
        assert_eq!(gold, 75, "3 : 1");

        h.queue(
            "p",
            json!({"priority_levels": 3, "priority_min_share": 0.0}),
        )
        .await;
        let mut msgs = Vec::new();
        for (i, priority) in [0u8, 0, 1, 2, 0, 2, 1].into_iter().enumerate() {
            msgs.push(NewMessage {
                body: format!("p{priority}-{i}").into_bytes(),
                priority: Some(priority),
                ..NewMessage::default()
            });
        }
        h.publish("p", msgs).await;
        let bodies = |ds: Vec<tidewater_core::queue::Delivery>| -> Vec<String> {
            ds.iter()
                .map(|d| String::from_utf8(d.record.body.to_vec()).unwrap())
                .collect()
        };
        assert_eq!(
            bodies(h.receive("p", 3).await),
            ["p2-3", "p2-5", "p1-2"],
            "highest first, publish order within a level"
        );
        // Sorting is volatile: a restart sorts the backlog again (leases were lost).
        h.restart();
        assert_eq!(
            bodies(h.receive("p", 10).await),
            ["p2-3", "p2-5", "p1-2", "p1-6", "p0-0", "p0-1", "p0-4"]
        );
        // A minimum share keeps the lowest level moving under a flood of high priority.
        h.queue(
            "s",
            json!({"priority_levels": 2, "priority_min_share": 0.2}),
        )
        .await;
        let msgs: Vec<NewMessage> = (0..100)
            .map(|i| NewMessage {
                body: vec![b'x'],
                priority: Some(u8::from(i >= 10)),
                ..NewMessage::default()
            })
            .collect();
        h.publish("s", msgs).await;
        let got = h.receive("s", 30).await;
        let low = got
            .iter()
            .filter(|d| header(&d.record, "tidewater-priority").as_deref() == Some("0"))
            .count();
        assert_eq!(
            low, 6,
            "one in five (its share, 0.2) while the high level waits"
        );
    });
}

/// Lanes are resolved at publish, so sorting a live backlog reads nothing back; after a
/// restart the scan sorts the backlog from the log, in the same order.
#[test]
fn lanes_are_staged_at_publish_and_rebuilt_from_the_log_after_a_restart() {
    runtime().block_on(async {
        let mut h = Harness::new();
        h.queue(
            "p",
            json!({"priority_levels": 2, "priority_min_share": 0.0}),
        )
        .await;
        for part in 0..2 {
            let msgs: Vec<NewMessage> = (part * 500..(part + 1) * 500)
                .map(|i| NewMessage {
                    body: format!("m{i}").into_bytes(),
                    priority: Some((i % 2) as u8),
                    ..NewMessage::default()
                })
                .collect();
            h.publish("p", msgs).await;
        }
        let high: Vec<String> = (1..40).step_by(2).map(|i| format!("m{i}")).collect();
        assert_eq!(bodies_of(&h.receive("p", 10).await), high[..10]);
        let info = h.broker().get_queue("p").unwrap();
        assert!(
            info.read_bytes < info.disk_bytes / 4,
            "only the picks were read: {} of {} bytes",
            info.read_bytes,
            info.disk_bytes
        );
        h.restart();
        // The leased ten come back first (their leases were lost), then the rest.
        assert_eq!(bodies_of(&h.receive("p", 20).await), high);
        let info = h.broker().get_queue("p").unwrap();
        assert!(
            info.read_bytes >= info.disk_bytes,
            "the scan read the backlog"
        );
    });
}

fn bodies_of(ds: &[tidewater_core::queue::Delivery]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8(d.record.body.to_vec()).unwrap())
        .collect()
}

#[test]
fn coalescing_latest_keeps_the_newest_per_key_and_window() {
    runtime().block_on(async {
        let mut h = Harness::new();
        h.queue(
            "cache",
            json!({"coalesce": {"window_ms": 100, "mode": "latest", "max_wait_ms": 300}}),
        )
        .await;
        h.publish("cache", keyed(&["k", "k", "j"])).await;
        assert!(
            h.receive("cache", 10).await.is_empty(),
            "held in their windows"
        );
        assert_eq!(h.stats("cache").delayed, 3);
        h.clock.advance(100);
        let got = h.receive("cache", 10).await;
        assert_eq!(bodies_of(&got), ["k1", "j2"]);
        let stats = h.stats("cache");
        assert_eq!(
            (stats.coalesced_in, stats.coalesced_out, stats.total),
            (3, 2, 2)
        );
        // A steady stream cannot postpone delivery past max_wait_ms.
        for step in 0..8 {
            h.publish("cache", keyed(&["s"])).await;
            h.clock.advance(50);
            let got = h.receive("cache", 10).await;
            if step < 5 {
                assert!(got.is_empty(), "step {step}");
            } else if step == 5 {
                assert_eq!(bodies_of(&got), ["s0"], "closed at 300 ms");
                break;
            }
        }
        // Held messages are ordinary pending messages after a restart.
        h.publish("cache", keyed(&["r", "r"])).await;
        h.restart();
        let after = bodies_of(&h.receive("cache", 10).await);
        assert!(
            after.contains(&"r0".to_string()) && after.contains(&"r1".to_string()),
            "{after:?}"
        );
    });
}

#[test]
fn coalescing_merge_delivers_every_distinct_body_once() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue(
            "inv",
            json!({"coalesce": {"window_ms": 100, "mode": "merge"}}),
        )
        .await;
        let msgs = |bodies: &[&str]| -> Vec<NewMessage> {
            bodies
                .iter()
                .map(|b| NewMessage {
                    key: Some("user:42".into()),
                    body: b.as_bytes().to_vec(),
                    ..NewMessage::default()
                })
                .collect()
        };
        h.publish("inv", msgs(&["profile", "avatar", "profile"]))
            .await;
        h.clock.advance(50);
        h.publish("inv", msgs(&["settings"])).await;
        h.clock.advance(100);
        let got = h.receive("inv", 10).await;
        assert_eq!(got.len(), 1);
        assert_eq!(bodies_of(&got), [r#"["profile","avatar","settings"]"#]);
        assert_eq!(
            header(&got[0].record, "tidewater-merged").as_deref(),
            Some("4")
        );
        assert_eq!(got[0].record.key.as_deref(), Some(&b"user:42"[..]));
        assert_eq!(h.stats("inv").total, 1, "the four were replaced by one");
        h.broker()
            .ack("inv", &[got[0].receipt.clone()])
            .await
            .unwrap();
        assert_eq!(h.stats("inv").total, 0);
    });
}

#[test]
fn an_invalidation_storm_is_coalesced_to_one_delivery_per_key_and_window() {
    runtime().block_on(async {
        let h = Harness::new();
        h.queue(
            "storm",
            json!({"coalesce": {"window_ms": 1000, "mode": "latest"}}),
        )
        .await;
        // 10,000 events over 1,000 keys within one window.
        for round in 0..10 {
            let keys: Vec<String> = (0..1_000).map(|k| format!("key{k}")).collect();
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            h.publish("storm", keyed(&refs)).await;
            h.clock.advance(50);
            assert!(h.receive("storm", 100).await.is_empty(), "round {round}");
        }
        h.clock.advance(1_000);
        let mut delivered = 0;
        loop {
            let got = h.receive("storm", 1_000).await;
            if got.is_empty() {
                break;
            }
            delivered += got.len();
        }
        assert_eq!(delivered, 1_000);
        let stats = h.stats("storm");
        assert_eq!((stats.coalesced_in, stats.coalesced_out), (10_000, 1_000));
    });
}

#[test]
fn an_ack_that_frees_a_key_wakes_a_waiting_receive() {
    // Real time here: paused time would jump to the receive's deadline while the ack
    // waits for the storage threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let h = Harness::new();
        h.queue("k", json!({"key_concurrency": 1})).await;
        h.publish("k", keyed(&["a", "a"])).await;
        let first = h.receive("k", 10).await;
        assert_eq!(first.len(), 1);
        let broker = h.broker().clone();
        let waiting = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let got = broker.receive("k", 10, 30_000, None).await.unwrap();
            (got.len(), started.elapsed())
        });
        tokio::task::yield_now().await;
        h.broker()
            .ack("k", &[first[0].receipt.clone()])
            .await
            .unwrap();
        let (n, waited) = waiting.await.unwrap();
        assert_eq!(n, 1);
        // Woken by the ack, not by its 30 s timeout (a generous bound, not a timing test).
        assert!(waited < std::time::Duration::from_secs(20), "{waited:?}");
    });
}

#[test]
fn long_delays_wait_in_the_delay_log_and_come_back_when_due() {
    runtime().block_on(async {
        let mut h = Harness::new();
        h.queue("later", json!({})).await;
        let mut batch = msgs(3);
        batch.push(NewMessage {
            id: Some("reminder-1".into()),
            key: Some("user:7".into()),
            body: b"renew your plan".to_vec(),
            delay: Delay::AfterMs(2 * 3_600_000),
            ..NewMessage::default()
        });
        batch.push(NewMessage {
            body: b"soon".to_vec(),
            delay: Delay::AfterMs(60_000),
            ..NewMessage::default()
        });
        h.publish("later", batch).await;
        let stats = h.stats("later");
        assert_eq!((stats.total, stats.delayed, stats.parked), (5, 2, 1));
        // The main log holds only what is due within the parking threshold.
        assert_eq!(h.broker().peek("later", 0, 10).unwrap().len(), 4);
        for d in h.receive("later", 10).await {
            h.broker().ack("later", &[d.receipt]).await.unwrap();
        }
        h.clock.advance(60_000);
        let soon = h.receive("later", 10).await;
        assert_eq!(bodies_of(&soon), ["soon"]);
        h.broker()
            .ack("later", &[soon[0].receipt.clone()])
            .await
            .unwrap();
        // Parked messages survive a restart.
        h.restart();
        let stats = h.stats("later");
        assert_eq!((stats.total, stats.parked), (1, 1));
        assert!(h.receive("later", 10).await.is_empty());
        h.clock.advance(2 * 3_600_000);
        h.broker().run_maintenance().await;
        let got = h.receive("later", 10).await;
        assert_eq!(bodies_of(&got), ["renew your plan"]);
        assert_eq!(
            tidewater_core::broker::record_id(&got[0].record),
            "reminder-1"
        );
        assert_eq!(got[0].record.key.as_deref(), Some(&b"user:7"[..]));
        assert_eq!(got[0].delivery_count, 1);
        assert_eq!(h.stats("later").parked, 0);
        // Purge reaches the delay log too.
        h.publish(
            "later",
            vec![NewMessage {
                body: b"next year".to_vec(),
                delay: Delay::AfterMs(7 * 86_400_000),
                ..NewMessage::default()
            }],
        )
        .await;
        assert_eq!(h.broker().purge("later").await.unwrap(), 2);
        let stats = h.stats("later");
        assert_eq!((stats.total, stats.parked), (0, 0));
        // Deleting the queue deletes its delay log; nothing of it shows after a restart.
        h.broker().delete_queue("later").await.unwrap();
        h.restart();
        assert!(h.broker().list_queues().is_empty());
    });
}

/// An expired lease makes the message deliverable again at the lease's deadline, exactly:
/// not after a backoff (that is for nacks), which made expiry up to `base_ms` late.
#[test]
fn an_expired_lease_is_deliverable_again_at_its_deadline() {
    let h = Harness::new();
    runtime().block_on(async {
        h.queue("q", json!({"backoff": {"base_ms": 60000}})).await;
        h.publish("q", msgs(1)).await;
        let first = h.broker().receive("q", 1, 0, Some(1000)).await.unwrap();
        assert_eq!(first.len(), 1);
        h.clock.advance(999);
        assert!(
            h.receive("q", 1).await.is_empty(),
            "leased until its deadline"
        );
        h.clock.advance(1);
        let again = h.receive("q", 1).await;
        assert_eq!(again.len(), 1, "deliverable at the deadline");
        assert_eq!(again[0].delivery_count, 2);
        assert_eq!(h.stats("q").expired, 1);
    });
}
