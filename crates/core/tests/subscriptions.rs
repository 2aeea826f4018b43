//! Work-queue subscriptions on streams through the broker: every record delivered per
//! subscription, independently of other subscriptions and of consumer groups; leases, acks,
//! nacks with retries and the dead-letter queue; where a subscription starts; growth,
//! deletion, retention and compaction; and all of it across restarts.

use std::collections::{BTreeMap, BTreeSet};

use tidewater_core::harness::{Harness, HarnessOptions};
use tidewater_core::queue::Delivery;
use tidewater_core::stream::config::StreamPatch;
use tidewater_core::stream::records::NewStreamRecord;
use tidewater_core::stream::subscription::SubscriptionPatch;
use tidewater_core::{AckLevel, Broker, ErrorCode, NackReason};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn stream(partitions: u32) -> StreamPatch {
    StreamPatch {
        partitions: Some(partitions),
        ..StreamPatch::default()
    }
}

/// A harness whose segments roll at 4 KiB (retention has whole segments to delete).
fn small_segments() -> Harness {
    Harness::temporary(HarnessOptions {
        store: tidewater_storage::StoreOptions {
            fsync: false,
            segment_roll_bytes: 4_096,
            ..tidewater_storage::StoreOptions::default()
        },
        ..HarnessOptions::default()
    })
    .unwrap()
}

fn sub(json: &str) -> SubscriptionPatch {
    SubscriptionPatch::from_json(json.as_bytes()).unwrap()
}

/// Produces `values` keyed `k<i % keys>` (durably).
async fn produce(broker: &Broker, stream: &str, values: &[String], keys: usize) {
    let records: Vec<NewStreamRecord> = values
        .iter()
        .enumerate()
        .map(|(i, v)| NewStreamRecord {
            key: Some(format!("k{}", i % keys).into_bytes()),
            value: Some(v.clone().into_bytes()),
            ..NewStreamRecord::default()
        })
        .collect();
    broker
        .produce(stream, &records, AckLevel::Durable)
        .await
        .unwrap();
}

fn values(range: std::ops::Range<usize>, prefix: &str) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

fn body(d: &Delivery) -> String {
    String::from_utf8(d.record.body.to_vec()).unwrap()
}

/// Receives everything deliverable now (no wait), at most `max` at a time.
async fn drain(broker: &Broker, name: &str, max: usize) -> Vec<Delivery> {
    let mut out = Vec::new();
    loop {
        let got = broker.receive(name, max, 0, None).await.unwrap();
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

async fn ack(broker: &Broker, name: &str, deliveries: &[Delivery]) {
    let receipts: Vec<String> = deliveries.iter().map(|d| d.receipt.clone()).collect();
    let reply = broker.ack(name, &receipts).await.unwrap();
    assert_eq!(reply.ok as usize, deliveries.len(), "{:?}", reply.failed);
}

#[test]
fn each_subscription_gets_every_record_independently_across_restarts() {
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("orders", &stream(3)).await.unwrap();
        produce(b, "orders", &values(0..60, "o"), 7).await;
        let (created, info) = b
            .put_subscription("orders", "billing", &sub("{}"))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(info.partitions.len(), 3);
        assert_eq!(info.stats.total, 60);
        assert!(
            info.stats.bytes > 60 * 2,
            "its partitions' bytes: {}",
            info.stats.bytes
        );
        assert_eq!(
            info.config["dead_letter_queue"].as_str(),
            Some("orders.billing-dlq")
        );
        b.put_subscription("orders", "email", &sub("{}"))
            .await
            .unwrap();
        // Billing takes and acks 40; email takes 10 and acks none.
        let billing = drain(b, "orders/billing", 40).await;
        assert_eq!(billing.len(), 60);
        ack(b, "orders/billing", &billing[..40]).await;
        let email = b.receive("orders/email", 10, 0, None).await.unwrap();
        assert_eq!(email.len(), 10);
        // Each delivery says where it came from; the same record for both subscriptions.
        for d in &billing {
            assert!(d.source >= 1 && d.source <= 3, "{}", d.source);
        }
        let billing_stats = b.get_subscription("orders", "billing").unwrap().stats;
        assert_eq!(
            (
                billing_stats.acked,
                billing_stats.in_flight,
                billing_stats.total
            ),
            (40, 20, 20)
        );
        let email_stats = b.get_subscription("orders", "email").unwrap().stats;
        assert_eq!(
            (email_stats.acked, email_stats.in_flight, email_stats.total),
            (0, 10, 60)
        );
        // A receipt of one subscription means nothing to another.
        let foreign = b
            .ack("orders/email", &[billing[45].receipt.clone()])
            .await
            .unwrap();
        assert_eq!(foreign.failed[0].code, "invalid_receipt");
        // The stream itself is untouched: a fetch from 0 still sees every record.
        assert_eq!(
            b.get_stream("orders")
                .unwrap()
                .partitions
                .iter()
                .map(|p| p.start_offset)
                .sum::<u64>(),
            0
        );
    });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        b.debug_check_consistency();
        // Acks survived; leases did not (redelivered now, as a queue's after any restart:
        // leases are not journaled, so the lost one is not counted).
        let billing = drain(b, "orders/billing", 100).await;
        assert_eq!(billing.len(), 20);
        assert!(billing.iter().all(|d| d.delivery_count == 1));
        ack(b, "orders/billing", &billing).await;
        let email = drain(b, "orders/email", 100).await;
        assert_eq!(email.len(), 60);
        ack(b, "orders/email", &email).await;
        // New records reach both.
        produce(b, "orders", &values(60..66, "o"), 7).await;
        let more = drain(b, "orders/billing", 100).await;
        assert_eq!(
            more.iter().map(body).collect::<BTreeSet<_>>(),
            values(60..66, "o").into_iter().collect()
        );
        assert_eq!(drain(b, "orders/email", 100).await.len(), 6);
        let info = b.get_subscription("orders", "billing").unwrap();
        assert_eq!(info.stats.total, 6);
        assert_eq!(
            info.stats.published, 6,
            "records that reached it since the restart"
        );
        assert_eq!(info.partitions.iter().map(|p| p.end).sum::<u64>(), 66);
        b.debug_check_consistency();
    });
}

#[test]
fn nacks_retry_and_max_deliveries_dead_letter_with_the_subscriptions_name() {
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("orders", &stream(2)).await.unwrap();
        produce(b, "orders", &values(0..4, "o"), 4).await;
        b.put_subscription(
            "orders",
            "billing",
            &sub(r#"{"max_deliveries":2,"backoff":{"base_ms":0}}"#),
        )
        .await
        .unwrap();
        for attempt in 1..=2 {
            let got = drain(b, "orders/billing", 10).await;
            assert_eq!(got.len(), 4, "attempt {attempt}");
            let receipts: Vec<String> = got.iter().map(|d| d.receipt.clone()).collect();
            b.nack(
                "orders/billing",
                &receipts,
                Some(0),
                Some("boom"),
                NackReason::Failed,
            )
            .await
            .unwrap();
        }
        let stats = b.get_subscription("orders", "billing").unwrap().stats;
        assert_eq!((stats.dead_lettered, stats.total), (4, 0));
        let dlq = drain(b, "orders.billing-dlq", 10).await;
        assert_eq!(dlq.len(), 4);
        let header = |d: &Delivery, name: &str| {
            d.record
                .headers
                .iter()
                .find(|(k, _)| &k[..] == name.as_bytes())
                .map(|(_, v)| String::from_utf8(v.to_vec()).unwrap())
        };
        for d in &dlq {
            assert_eq!(
                header(d, "tidewater-source-queue").as_deref(),
                Some("orders/billing")
            );
            assert_eq!(header(d, "tidewater-last-error").as_deref(), Some("boom"));
            // The id names the record's partition and offset.
            let id = String::from_utf8(d.record.id.to_vec()).unwrap();
            assert!(id.contains('-'), "{id}");
        }
        // Give them back, then redrive: by default each goes back to its source, here the
        // subscription (into its own log: the stream and other subscriptions do not see
        // them again).
        let receipts: Vec<String> = dlq.iter().map(|d| d.receipt.clone()).collect();
        b.nack(
            "orders.billing-dlq",
            &receipts,
            Some(0),
            None,
            NackReason::Failed,
        )
        .await
        .unwrap();
        b.put_subscription("orders", "other", &sub("{}"))
            .await
            .unwrap();
        let other_before = b.get_subscription("orders", "other").unwrap().stats.total;
        let redrive = |to: Option<&str>| tidewater_core::RedriveRequest {
            to: to.map(str::to_string),
            rate_per_s: 1_000,
            max: 0,
            key: None,
            error_contains: None,
            ids: None,
        };
        let started = b
            .start_redrive("orders.billing-dlq", redrive(None))
            .unwrap();
        for _ in 0..500 {
            if b.redrive_progress(&started.id).unwrap().state != "running" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let progress = b.redrive_progress(&started.id).unwrap();
        assert_eq!(
            (progress.state, progress.moved),
            ("done", 4),
            "{progress:?}"
        );
        let back = drain(b, "orders/billing", 10).await;
        assert_eq!(back.len(), 4);
        assert!(
            back.iter().all(|d| d.source == 0),
            "from the subscription's own log"
        );
        let mut bodies: Vec<String> = back.iter().map(body).collect();
        bodies.sort();
        assert_eq!(bodies, values(0..4, "o"));
        ack(b, "orders/billing", &back).await;
        assert_eq!(
            b.get_subscription("orders", "other").unwrap().stats.total,
            other_before
        );
        // An explicit target may name a subscription too; one that does not exist is refused.
        let err = b
            .start_redrive("orders.billing-dlq", redrive(Some("orders/nope")))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::SubscriptionNotFound);
    });
}

#[test]
fn a_subscription_starts_at_earliest_latest_or_a_time_and_keeps_its_place() {
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &stream(2)).await.unwrap();
        produce(b, "s", &values(0..10, "old"), 10).await;
        h.clock.advance(60_000);
        let cut = b.now_ms();
        produce(b, "s", &values(0..4, "new"), 10).await;
        // Records carry the producer's time: set explicitly to the harness clock here.
        b.put_subscription("s", "all", &sub(r#"{"start":"earliest"}"#))
            .await
            .unwrap();
        b.put_subscription("s", "new", &sub(r#"{"start":"latest"}"#))
            .await
            .unwrap();
        let at = format!(r#"{{"start":{{"time":{cut}}}}}"#);
        b.put_subscription("s", "since", &sub(&at)).await.unwrap();
        assert_eq!(drain(b, "s/all", 100).await.len(), 14);
        assert_eq!(drain(b, "s/new", 100).await.len(), 0);
        let since = drain(b, "s/since", 100).await;
        assert_eq!(
            since.iter().map(body).collect::<BTreeSet<_>>(),
            values(0..4, "new").into_iter().collect()
        );
        produce(b, "s", &values(0..3, "later"), 10).await;
        assert_eq!(drain(b, "s/new", 100).await.len(), 3);
        // Configuration changes keep the place; a different start is a conflict.
        let (created, info) = b
            .put_subscription("s", "new", &sub(r#"{"lease_ms":5000}"#))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(info.config["lease_ms"], 5_000);
        let err = b
            .put_subscription("s", "new", &sub(r#"{"start":"latest"}"#))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ConfigConflict);
        // Errors that say what is wrong.
        let err = b
            .put_subscription("nope", "x", &sub("{}"))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::StreamNotFound);
        let err = b.receive("s/nope", 1, 0, None).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::SubscriptionNotFound);
        let err = b
            .put_subscription("s", "a/b", &sub("{}"))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidSubscriptionName);
        let err = b
            .put_subscription("s", "q", &sub(r#"{"dedup_window_ms":1000}"#))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        // Found by a review: dead-lettering past the caps with no dead-letter queue
        // stalled retention and counted the same records again each tick: refused.
        let err = b
            .put_subscription(
                "s",
                "q",
                &sub(r#"{"on_retention":"dead_letter","dead_letter_queue":null}"#),
            )
            .await
            .unwrap_err();
        assert!(err.message.contains("dead_letter_queue"), "{}", err.message);
        // A long stream name needs an explicit dead-letter queue (as a queue does), rather
        // than quietly none.
        b.put_stream(&"l".repeat(190), &stream(1)).await.unwrap();
        let err = b
            .put_subscription(&"l".repeat(190), "abcdefghij", &sub("{}"))
            .await
            .unwrap_err();
        assert!(
            err.message.contains("explicit dead_letter_queue"),
            "{}",
            err.message
        );
        // The configuration a GET shows goes back in a PUT as it is; null start is absent.
        let shown = b.get_subscription("s", "new").unwrap().config;
        assert!(shown.get("max_messages").is_none() && shown.get("pin_max_bytes").is_some());
        let mut again = shown.clone();
        again["start"] = serde_json::Value::Null;
        let patch = SubscriptionPatch::from_value(again).unwrap();
        let (created, info) = b.put_subscription("s", "new", &patch).await.unwrap();
        assert!(!created);
        assert_eq!(info.config, shown);
        // An unknown field's error names the subscription's own fields too.
        let err = SubscriptionPatch::from_json(br#"{"bogus":1}"#).unwrap_err();
        assert!(err.message.contains("pin_max_bytes"), "{}", err.message);
        // A subscription's name where a queue goes says what to do.
        let err = b
            .publish(
                "s/new",
                &[tidewater_core::NewMessage::default()],
                AckLevel::Durable,
            )
            .await
            .unwrap_err();
        assert!(
            err.message.contains("produced to the stream 's'"),
            "{}",
            err.message
        );
        let names: Vec<String> = b
            .list_subscriptions(Some("s"))
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["all", "new", "since"]);
        // Subscriptions are not queues.
        assert!(b.list_queues().iter().all(|q| !q.name.contains('/')));
    });
}

#[test]
fn growth_deletion_and_policies_across_partitions() {
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &stream(2)).await.unwrap();
        // One message per key at a time, whatever partition it is in.
        b.put_subscription("s", "one", &sub(r#"{"key_concurrency":1}"#))
            .await
            .unwrap();
        produce(b, "s", &values(0..8, "a"), 2).await;
        let first = drain(b, "s/one", 100).await;
        assert_eq!(first.len(), 2, "one per key");
        // The stream grows: its new partition reaches the subscription.
        b.put_stream("s", &stream(4)).await.unwrap();
        let info = b.get_subscription("s", "one").unwrap();
        assert_eq!(info.partitions.len(), 4);
        ack(b, "s/one", &first).await;
        produce(b, "s", &values(8..40, "a"), 40).await;
        let mut by_partition: BTreeMap<usize, usize> = BTreeMap::new();
        let mut seen = 0;
        loop {
            let got = drain(b, "s/one", 1000).await;
            if got.is_empty() {
                break;
            }
            for d in &got {
                *by_partition.entry(d.source).or_default() += 1;
            }
            seen += got.len();
            ack(b, "s/one", &got).await;
        }
        assert_eq!(seen, 38);
        assert_eq!(by_partition.len(), 4, "{by_partition:?}");
    });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        assert_eq!(b.get_subscription("s", "one").unwrap().partitions.len(), 4);
        // Deleting a subscription leaves the stream; deleting the stream takes the rest.
        b.put_subscription("s", "two", &sub("{}")).await.unwrap();
        b.delete_subscription("s", "one").await.unwrap();
        assert_eq!(
            b.get_subscription("s", "one").unwrap_err().code,
            ErrorCode::SubscriptionNotFound
        );
        assert_eq!(drain(b, "s/two", 1000).await.len(), 40);
        b.delete_stream("s").await.unwrap();
        assert_eq!(
            b.receive("s/two", 1, 0, None).await.unwrap_err().code,
            ErrorCode::StreamNotFound
        );
    });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        assert!(b.list_subscriptions(None).unwrap().is_empty());
        b.put_stream("s", &stream(1)).await.unwrap();
        assert!(b.list_subscriptions(Some("s")).unwrap().is_empty());
    });
}

#[test]
fn retention_wins_over_a_subscription_with_no_pin_and_counts_what_it_drops() {
    let rt = runtime();
    let mut h = small_segments();
    let big = "v".repeat(200);
    rt.block_on(async {
        let b = h.broker();
        let patch = StreamPatch {
            partitions: Some(1),
            retention_bytes: Some(8_192),
            retention_ms: Some(-1),
            ..StreamPatch::default()
        };
        b.put_stream("logs", &patch).await.unwrap();
        // pin_max_bytes 0: retention wins (as Kafka's consumers live with).
        b.put_subscription("logs", "slow", &sub(r#"{"pin_max_bytes":0}"#))
            .await
            .unwrap();
        b.put_subscription("logs", "fast", &sub("{}"))
            .await
            .unwrap();
        for _ in 0..20 {
            produce(b, "logs", &vec![big.clone(); 5], 5).await;
            // Fast keeps up: nothing of it is ever dropped.
            let got = drain(b, "logs/fast", 100).await;
            ack(b, "logs/fast", &got).await;
        }
        let leased = b.receive("logs/slow", 3, 0, None).await.unwrap();
        assert_eq!(leased.len(), 3);
        h.advance(1).await;
        let start = b.get_stream("logs").unwrap().partitions[0].start_offset;
        assert!(start > 3, "retention moved the start: {start}");
        let slow = b.get_subscription("logs", "slow").unwrap();
        // Everything below the start, leased or not, was dropped and counted.
        assert_eq!(slow.retention_expired, start);
        assert_eq!(slow.partitions[0].floor, start);
        assert_eq!(slow.stats.total, 100 - start);
        assert_eq!(
            b.get_subscription("logs", "fast")
                .unwrap()
                .retention_expired,
            0
        );
        // The leases there are gone: their acks fail.
        let receipts: Vec<String> = leased.iter().map(|d| d.receipt.clone()).collect();
        let reply = b.ack("logs/slow", &receipts).await.unwrap();
        assert_eq!(reply.ok, 0);
        let rest = drain(b, "logs/slow", 1000).await;
        assert_eq!(rest.len() as u64, 100 - start);
        assert_eq!(rest[0].record.offset, start);
        b.debug_check_consistency();
    });
    // Storage's recovery check agrees: the views were settled with the partition.
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        let info = b.get_subscription("logs", "slow").unwrap();
        let start = b.get_stream("logs").unwrap().partitions[0].start_offset;
        assert_eq!(info.partitions[0].floor, start);
    });
}

/// Policies that act when a record arrives work on subscriptions too: supersede cancels a
/// key's older pending records (whatever partition they are in), coalesce holds records in
/// their key's window; a restart rebuilds each key's newest under supersede.
#[test]
fn supersede_and_coalesce_act_on_records_as_they_arrive() {
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("prices", &stream(2)).await.unwrap();
        b.put_subscription("prices", "latest", &sub(r#"{"supersede":true}"#))
            .await
            .unwrap();
        b.put_subscription(
            "prices",
            "digest",
            &sub(r#"{"coalesce":{"window_ms":1000,"mode":"merge"}}"#),
        )
        .await
        .unwrap();
        b.put_subscription("prices", "all", &sub("{}"))
            .await
            .unwrap();
        // Three rounds of five keys.
        for round in 0..3 {
            produce(b, "prices", &values(round * 5..round * 5 + 5, "p"), 5).await;
        }
        // Supersede: only each key's newest is left to deliver.
        let latest = drain(b, "prices/latest", 100).await;
        let mut got: Vec<String> = latest.iter().map(body).collect();
        got.sort();
        assert_eq!(got, values(10..15, "p"));
        let stats = b.get_subscription("prices", "latest").unwrap().stats;
        assert_eq!((stats.superseded, stats.total), (10, 5));
        // A newer record cancels the older one even while it is leased (flagged on ack).
        produce(b, "prices", &values(15..16, "p"), 5).await;
        let receipts: Vec<String> = latest.iter().map(|d| d.receipt.clone()).collect();
        let reply = b.ack("prices/latest", &receipts).await.unwrap();
        assert_eq!(reply.superseded.len(), 1, "{reply:?}");
        // Coalesce: nothing until the window closes, then one merged message per key,
        // from the subscription's own log.
        assert!(drain(b, "prices/digest", 100).await.is_empty());
        h.advance(1_500).await;
        let digest = drain(b, "prices/digest", 100).await;
        // (Each key's window holds three or four records: each becomes one message.)
        assert_eq!(
            digest.len(),
            5,
            "{:?}",
            digest.iter().map(body).collect::<Vec<_>>()
        );
        for d in &digest {
            assert_eq!(d.source, 0, "merged into the subscription's own log");
            assert!(body(d).starts_with("[\"p"), "{}", body(d));
        }
        // A subscription without the policies sees every record.
        assert_eq!(drain(b, "prices/all", 100).await.len(), 16);
        let receipts: Vec<String> = digest.iter().map(|d| d.receipt.clone()).collect();
        b.ack("prices/digest", &receipts).await.unwrap();
        let digest = b.get_subscription("prices", "digest").unwrap().stats;
        assert_eq!(
            (digest.total, digest.coalesced_in, digest.coalesced_out),
            (0, 16, 5)
        );
    });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        // After a restart, a newer record still supersedes the pending one of its key.
        produce(b, "prices", &values(16..21, "p"), 5).await;
        let latest = drain(b, "prices/latest", 100).await;
        let mut got: Vec<String> = latest.iter().map(body).collect();
        got.sort();
        assert_eq!(got, values(16..21, "p"));
        b.debug_check_consistency();
    });
}

/// The shaping policies on a subscription over several partitions: priorities (the
/// reserved header on stream records), fair scheduling by tenant, a dispatch rate, and a
/// time to live measured from each record's timestamp.
#[test]
fn priorities_fairness_rate_and_ttl_shape_a_subscription() {
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("jobs", &stream(3)).await.unwrap();
        let record = |i: usize, tenant: &str, priority: Option<u8>, ts: Option<i64>| {
            let mut headers = vec![(
                "tidewater-tenant".to_string(),
                Some(tenant.as_bytes().to_vec()),
            )];
            if let Some(p) = priority {
                headers.push((
                    "tidewater-priority".into(),
                    Some(p.to_string().into_bytes()),
                ));
            }
            NewStreamRecord {
                key: Some(format!("k{i}").into_bytes()),
                value: Some(format!("{tenant}-{i}").into_bytes()),
                headers,
                timestamp: ts,
                partition: None,
            }
        };
        // A flood from tenant "big" first, then a few from "small"; one urgent record.
        let mut records: Vec<NewStreamRecord> =
            (0..60).map(|i| record(i, "big", None, None)).collect();
        records.extend((60..66).map(|i| record(i, "small", None, None)));
        records.push(record(66, "big", Some(2), None));
        b.produce("jobs", &records, AckLevel::Durable)
            .await
            .unwrap();
        b.put_subscription("jobs", "fair", &sub(r#"{"fairness":{"by":"tenant"}}"#))
            .await
            .unwrap();
        b.put_subscription("jobs", "urgent", &sub(r#"{"priority_levels":3}"#))
            .await
            .unwrap();
        b.put_subscription(
            "jobs",
            "slow",
            &sub(r#"{"dispatch_rate":{"per_s":5,"burst":5}}"#),
        )
        .await
        .unwrap();
        // Fairness: the small tenant is not stuck behind the flood.
        let first = b.receive("jobs/fair", 12, 0, None).await.unwrap();
        let small = first
            .iter()
            .filter(|d| body(d).starts_with("small"))
            .count();
        assert_eq!(small, 6, "{:?}", first.iter().map(body).collect::<Vec<_>>());
        // Priorities: the urgent record first.
        let first = b.receive("jobs/urgent", 1, 0, None).await.unwrap();
        assert_eq!(body(&first[0]), "big-66");
        // Rate: at most the burst now, more as time passes.
        assert_eq!(b.receive("jobs/slow", 100, 0, None).await.unwrap().len(), 5);
        assert!(
            b.receive("jobs/slow", 100, 0, None)
                .await
                .unwrap()
                .is_empty()
        );
        h.clock.advance(1_000);
        assert_eq!(b.receive("jobs/slow", 100, 0, None).await.unwrap().len(), 5);
        // Time to live from the record's timestamp: old records are dropped, counted.
        let now = b.now_ms();
        let old = vec![
            record(100, "big", None, Some(now - 120_000)),
            record(101, "big", None, Some(now)),
        ];
        b.produce("jobs", &old, AckLevel::Durable).await.unwrap();
        b.put_subscription(
            "jobs",
            "fresh",
            &sub(r#"{"ttl_ms":60000,"start":"latest"}"#),
        )
        .await
        .unwrap();
        produce(b, "jobs", &["new".to_string()], 1).await;
        let got = drain(b, "jobs/fresh", 100).await;
        assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["new"]);
        b.put_subscription("jobs", "aged", &sub(r#"{"ttl_ms":60000}"#))
            .await
            .unwrap();
        let got = drain(b, "jobs/aged", 1000).await;
        assert!(
            got.iter().all(|d| body(d) != "big-100"),
            "the old record expired"
        );
        assert_eq!(
            b.get_subscription("jobs", "aged")
                .unwrap()
                .stats
                .ttl_expired,
            1
        );
        b.debug_check_consistency();
    });
}

/// A stalled subscription pins what it has not settled, up to its caps (by default the
/// stream's own retention: the partition holds at most about twice its limit); past them
/// its oldest records go (dropped, or into its dead-letter queue), counted. Producers are
/// never refused for it.
#[test]
fn a_stalled_subscription_pins_retention_up_to_its_cap() {
    let rt = runtime();
    let mut h = small_segments();
    let big = "v".repeat(200);
    rt.block_on(async {
        let b = h.broker();
        let patch = StreamPatch {
            partitions: Some(1),
            retention_bytes: Some(8_192),
            retention_ms: Some(-1),
            ..StreamPatch::default()
        };
        b.put_stream("logs", &patch).await.unwrap();
        // Default caps: the stream's retention (8 KiB more at most).
        b.put_subscription("logs", "stalled", &sub("{}"))
            .await
            .unwrap();
        // No cap: holds everything (a disk to watch).
        b.put_subscription("logs", "forever", &sub(r#"{"pin_max_bytes":-1}"#))
            .await
            .unwrap();
        // A small cap into the dead-letter queue.
        b.put_subscription(
            "logs",
            "archive",
            &sub(r#"{"pin_max_bytes":4096,"on_retention":"dead_letter"}"#),
        )
        .await
        .unwrap();
        // About 46 KiB: retention would keep about 8 KiB of it.
        for _ in 0..40 {
            produce(b, "logs", &vec![big.clone(); 5], 5).await;
            h.advance(1).await;
        }
        // Nothing consumed: the partition is held at its start by "forever".
        let part = b.get_stream("logs").unwrap().partitions[0].clone();
        assert_eq!(part.start_offset, 0, "{part:?}");
        assert_eq!(
            b.get_subscription("logs", "stalled")
                .unwrap()
                .retention_expired,
            0
        );
        assert_eq!(
            b.get_subscription("logs", "forever")
                .unwrap()
                .retention_expired,
            0
        );
        // Without it, the stalled one holds up to its cap; the archive one moves its oldest
        // records to its dead-letter queue (a step per tick) and then lets go.
        b.delete_subscription("logs", "forever").await.unwrap();
        for _ in 0..5 {
            h.advance(1).await;
        }
        let part = b.get_stream("logs").unwrap().partitions[0].clone();
        assert!(part.start_offset > 0, "{part:?}");
        let stalled = b.get_subscription("logs", "stalled").unwrap();
        let archive = b.get_subscription("logs", "archive").unwrap();
        // The stalled one lost what is past its cap, counted, and nothing else.
        let floor = stalled.partitions[0].floor;
        // It let go exactly as far as retention deleted, no further (found by a review:
        // while another subscription's dead-letter moves held retention back, it dropped
        // records the partition still held).
        assert_eq!(floor, part.start_offset, "{part:?}");
        assert_eq!(stalled.retention_expired, floor);
        assert_eq!(stalled.stats.total, 200 - floor);
        // It holds more than retention would keep, at most twice that and a segment.
        let held = stalled.stats.bytes;
        assert!(held > 8_192 && held <= 2 * 8_192 + 4_096 + 512, "{held}");
        // The archive one's released records are in its dead-letter queue, counted.
        let dlq = b.get_queue("logs.archive-dlq").unwrap().stats.total;
        assert!(dlq > 0);
        assert_eq!(archive.retention_expired, dlq);
        assert_eq!(archive.stats.total + dlq, 200);
        b.debug_check_consistency();
    });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        let stalled = b.get_subscription("logs", "stalled").unwrap();
        let got = drain(b, "logs/stalled", 1000).await;
        assert_eq!(got.len() as u64, stalled.stats.total);
        assert_eq!(got[0].record.offset, stalled.partitions[0].floor);
    });
}
