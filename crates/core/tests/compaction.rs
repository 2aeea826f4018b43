//! Compaction of streams (issue 11): the latest record per key stays at its offset, older
//! ones go, tombstones go once their delete horizon passed, offsets never change and reads
//! cross the gaps; keyless records are refused; several passes when the key map is small;
//! the same after a restart. A property test checks it against a model of every record
//! produced.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use tidewater_core::harness::{Harness, HarnessOptions};
use tidewater_core::stream::config::{Cleanup, StreamPatch};
use tidewater_core::stream::records::NewStreamRecord;
use tidewater_core::{AckLevel, Broker, ErrorCode, Limits};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn harness(key_map_keys: usize) -> Harness {
    Harness::temporary(HarnessOptions {
        store: tidewater_storage::StoreOptions {
            fsync: false,
            segment_roll_bytes: 1_024,
            ..tidewater_storage::StoreOptions::default()
        },
        limits: Limits {
            // The table's buckets: a power of two, 7/8 of them usable.
            compaction_key_map_bytes: ((key_map_keys * 8).div_ceil(7).next_power_of_two()
                * tidewater_core::stream::compaction::KEY_MAP_BUCKET_BYTES)
                .max(1024),
            compaction_bytes_per_s: 0,
            ..Limits::default()
        },
        ..HarnessOptions::default()
    })
    .unwrap()
}

fn compacted(partitions: u32) -> StreamPatch {
    StreamPatch {
        partitions: Some(partitions),
        cleanup: Some(Cleanup::Compact),
        delete_retention_ms: Some(60_000),
        min_dirty_ratio: Some(0.0),
        ..StreamPatch::default()
    }
}

fn record(key: &str, value: Option<&str>) -> NewStreamRecord {
    NewStreamRecord {
        key: Some(key.as_bytes().to_vec()),
        value: value.map(|v| v.as_bytes().to_vec()),
        ..NewStreamRecord::default()
    }
}

/// (offset, key, value) of every record of partition 0, read from offset 0 on, by fetches
/// of about `max_bytes` (each must progress).
async fn read_all(
    broker: &Broker,
    stream: &str,
    max_bytes: usize,
) -> Vec<(u64, String, Option<String>)> {
    let end = broker.get_stream(stream).unwrap().partitions[0].end_offset;
    let start = broker.get_stream(stream).unwrap().partitions[0].start_offset;
    let mut next = start;
    let mut out = Vec::new();
    while next < end {
        let (records, after, _) = broker
            .fetch_records(stream, 0, next, max_bytes, 0)
            .await
            .unwrap();
        assert!(after > next, "a fetch from {next} made no progress");
        for r in records {
            let text = |b: bytes::Bytes| String::from_utf8(b.to_vec()).unwrap();
            out.push((r.offset, text(r.key.unwrap()), r.value.map(text)));
        }
        next = after;
    }
    out
}

/// Runs passes until none is needed (a checkpoint first: only checkpointed segments are
/// rewritten).
async fn compact_all(broker: &Broker) -> u32 {
    broker.store().checkpoint().unwrap();
    let mut passes = 0;
    while let Some(report) = broker.compact_once().await {
        let report = report.unwrap();
        assert!(!report.interrupted, "{report:?}");
        passes += 1;
        assert!(passes < 1_000, "compaction does not converge");
    }
    passes
}

#[test]
fn the_latest_record_per_key_stays_at_its_offset_and_reads_cross_the_gaps() {
    let rt = runtime();
    let mut h = harness(1 << 20);
    let before_restart = rt.block_on(async {
        let b = h.broker();
        b.put_stream("prices", &compacted(1)).await.unwrap();
        // A record without a key is refused, with the reason.
        let keyless = NewStreamRecord {
            value: Some(b"v".to_vec()),
            ..NewStreamRecord::default()
        };
        let err = b
            .produce("prices", &[keyless], AckLevel::Durable)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidMessage);
        assert!(err.message.contains("needs one"), "{}", err.message);
        // 10 keys, 30 rounds, one record a produce: 300 offsets in many segments.
        for round in 0..30 {
            for key in 0..10 {
                let value = format!("{key}@{round}-{}", "x".repeat(40));
                b.produce(
                    "prices",
                    &[record(&format!("k{key}"), Some(&value))],
                    AckLevel::Durable,
                )
                .await
                .unwrap();
            }
        }
        let segments_before = b.store().reader(1).map(|r| r.segments().len());
        let bytes_before = b.get_stream("prices").unwrap().partitions[0].bytes;
        assert!(compact_all(b).await >= 1);
        let after = read_all(b, "prices", 1).await;
        let info = b.get_stream("prices").unwrap();
        assert_eq!(info.partitions[0].end_offset, 300, "offsets never change");
        assert!(
            info.partitions[0].bytes < bytes_before / 2,
            "{} of {bytes_before}",
            info.partitions[0].bytes
        );
        // Each key's latest value is there at its offset; older ones only in the active
        // segment.
        let mut latest: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for (offset, key, value) in &after {
            let round = (offset / 10) as usize;
            assert_eq!(key, &format!("k{}", offset % 10));
            assert!(
                value
                    .as_deref()
                    .unwrap()
                    .starts_with(&format!("{}@{round}-", offset % 10))
            );
            latest.insert(key.clone(), (*offset, value.clone().unwrap()));
        }
        assert_eq!(latest.len(), 10);
        for (key, (offset, _)) in &latest {
            assert!(
                *offset >= 290,
                "{key}'s latest record is the last round's: {offset}"
            );
        }
        assert!(
            after.len() < 100,
            "older records went: {} left",
            after.len()
        );
        // Reads from inside a gap, by time and through list_offset still work.
        let (records, _, _) = b.fetch_records("prices", 0, 1, 1 << 20, 0).await.unwrap();
        assert!(records[0].offset >= 1);
        let counters = b.stream_counters();
        let stats = counters[0].1.compaction;
        assert!(stats.superseded >= 200, "{stats:?}");
        assert!(stats.bytes_after < stats.bytes_before, "{stats:?}");
        assert!(b.store().reader(1).map(|r| r.segments().len()) <= segments_before);

        // A tombstone deletes its key: kept for delete_retention_ms after the compaction
        // that first saw it, then removed with every older record of the key.
        b.produce("prices", &[record("k3", None)], AckLevel::Durable)
            .await
            .unwrap();
        for round in 30..40 {
            for key in [0, 1, 2] {
                b.produce(
                    "prices",
                    &[record(&format!("k{key}"), Some(&format!("{key}@{round}-")))],
                    AckLevel::Durable,
                )
                .await
                .unwrap();
            }
        }
        compact_all(b).await;
        let with_tombstone = read_all(b, "prices", 1 << 20).await;
        assert!(
            with_tombstone
                .iter()
                .any(|(_, k, v)| k == "k3" && v.is_none()),
            "the tombstone stays a while"
        );
        assert!(
            !with_tombstone
                .iter()
                .any(|(_, k, v)| k == "k3" && v.is_some()),
            "older records of a deleted key go"
        );
        with_tombstone
    });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        assert_eq!(
            read_all(b, "prices", 1 << 20).await,
            before_restart,
            "the same after a restart"
        );
        // Past the horizon, with more written (a pass runs on dirty data): the tombstone goes.
        // (A restart forgets how far compaction got: the first pass after it treats the
        // whole partition as dirty, and removes no tombstone.)
        h.clock.advance(61_000);
        for rounds in [40..50, 50..60] {
            for round in rounds {
                for key in [0, 1, 2] {
                    b.produce(
                        "prices",
                        &[record(&format!("k{key}"), Some(&format!("{key}@{round}-")))],
                        AckLevel::Durable,
                    )
                    .await
                    .unwrap();
                }
            }
            compact_all(b).await;
        }
        let after = read_all(b, "prices", 1 << 20).await;
        assert!(!after.iter().any(|(_, k, _)| k == "k3"), "{after:?}");
        assert!(b.stream_counters()[0].1.compaction.tombstones >= 1);
    });
}

/// A tombstone goes once its horizon passed even when nothing new was written (the
/// partition is not dirty): KIP-534's rule.
#[test]
fn a_tombstone_goes_after_its_horizon_without_new_writes() {
    let rt = runtime();
    let h = harness(1 << 20);
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("t", &compacted(1)).await.unwrap();
        for round in 0..20 {
            for key in 0..5 {
                b.produce(
                    "t",
                    &[record(
                        &format!("k{key}"),
                        Some(&format!("{round}-{}", "x".repeat(50))),
                    )],
                    AckLevel::Durable,
                )
                .await
                .unwrap();
            }
        }
        b.produce("t", &[record("k1", None)], AckLevel::Durable)
            .await
            .unwrap();
        // Filler after the tombstone, so that its segment is sealed.
        for round in 0..20 {
            b.produce(
                "t",
                &[record(
                    "k0",
                    Some(&format!("after-{round}-{}", "y".repeat(50))),
                )],
                AckLevel::Durable,
            )
            .await
            .unwrap();
        }
        compact_all(b).await;
        let kept = read_all(b, "t", 1 << 20).await;
        assert!(
            kept.iter().any(|(_, k, v)| k == "k1" && v.is_none()),
            "kept until its horizon"
        );
        // Nothing written since: no pass until the horizon passes.
        assert_eq!(compact_all(b).await, 0);
        h.clock.advance(60_001);
        assert!(compact_all(b).await >= 1, "a pass for the tombstone due");
        let after = read_all(b, "t", 1 << 20).await;
        assert!(!after.iter().any(|(_, k, _)| k == "k1"), "{after:?}");
        assert_eq!(compact_all(b).await, 0, "and then no more");
    });
}

#[test]
fn a_small_key_map_takes_several_passes_to_the_same_result() {
    let rt = runtime();
    // The smallest budget (1 KiB): 32 buckets, 28 keys.
    let h = harness(28);
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &compacted(1)).await.unwrap();
        for round in 0..5 {
            for key in 0..100 {
                b.produce(
                    "s",
                    &[record(&format!("k{key}"), Some(&format!("{round}")))],
                    AckLevel::Durable,
                )
                .await
                .unwrap();
            }
        }
        let passes = compact_all(b).await;
        assert!(
            passes > 2,
            "a map of 28 keys takes passes for 100: {passes}"
        );
        let all = read_all(b, "s", 1 << 20).await;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (_, key, _) in &all {
            *seen.entry(key.clone()).or_default() += 1;
        }
        assert_eq!(seen.len(), 100);
    });
}

/// What the model test does.
#[derive(Debug, Clone)]
enum Step {
    /// Records (key index, value or tombstone) in one produce.
    Produce(Vec<(u8, Option<u16>)>),
    Compact,
    Advance(u32),
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop::collection::vec((0u8..40, prop::option::weighted(0.85, any::<u16>())), 1..12)
            .prop_map(Step::Produce),
        2 => Just(Step::Compact),
        1 => (0u32..120_000).prop_map(Step::Advance),
        1 => Just(Step::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Against a model of every record produced: each record read is the one produced at
    /// its offset; each key's latest record is there (a tombstone may go, and then nothing
    /// of its key is older); within a key, records read are in offset order and the last
    /// is its latest; reads always progress.
    #[test]
    fn compaction_keeps_what_a_model_of_the_log_says(
        steps in prop::collection::vec(step(), 1..40),
        map_keys in 28usize..60,
    ) {
        let rt = runtime();
        let mut h = harness(map_keys);
        rt.block_on(h.broker().put_stream("m", &compacted(1))).unwrap();
        let mut history: Vec<(String, Option<String>)> = Vec::new();
        for step in steps {
            match step {
                Step::Produce(records) => {
                    let records: Vec<NewStreamRecord> = records
                        .iter()
                        .map(|(k, v)| record(&format!("k{k}"), v.map(|v| format!("{v}-{}", history.len())).as_deref()))
                        .collect();
                    rt.block_on(h.broker().produce("m", &records, AckLevel::Durable)).unwrap();
                    for r in &records {
                        history.push((
                            String::from_utf8(r.key.clone().unwrap()).unwrap(),
                            r.value.clone().map(|v| String::from_utf8(v).unwrap()),
                        ));
                    }
                }
                Step::Compact => {
                    rt.block_on(compact_all(h.broker()));
                }
                Step::Advance(ms) => h.clock.advance(i64::from(ms)),
                Step::Restart => h.restart(),
            }
            let read = rt.block_on(read_all(h.broker(), "m", 300));
            let mut last: HashMap<&str, u64> = HashMap::new();
            let mut prev = None;
            for (offset, key, value) in &read {
                prop_assert!(prev.is_none_or(|p| p < *offset), "offsets rise");
                prev = Some(*offset);
                let (k, v) = &history[*offset as usize];
                prop_assert_eq!((k, v), (key, value), "the record produced at {}", offset);
                last.insert(k.as_str(), *offset);
            }
            let mut latest: HashMap<&str, u64> = HashMap::new();
            for (offset, (k, _)) in history.iter().enumerate() {
                latest.insert(k.as_str(), offset as u64);
            }
            for (key, offset) in &latest {
                let tombstone = history[*offset as usize].1.is_none();
                match last.get(key) {
                    Some(read_last) => prop_assert_eq!(read_last, offset, "{}'s last record read is its latest", key),
                    None => prop_assert!(tombstone, "{} has a value but nothing of it was read", key),
                }
            }
        }
    }
}

/// A batch of one record at offset 0 whose offsets span `span` (as compaction leaves a kept
/// batch that covers the superseded ones before it).
fn sparse_batch(key: &str, value: &str, span: u64) -> Vec<u8> {
    use tidewater_storage::format::kafka::{
        KafkaBatchBuilder, NewKafkaRecord, check_kafka_batch, rebuild_kafka_batch,
    };
    let mut builder = KafkaBatchBuilder::new();
    builder.push(&NewKafkaRecord {
        key: Some(key.as_bytes()),
        value: Some(value.as_bytes()),
        headers: &[],
        timestamp: 1_000,
    });
    let dense = builder.finish();
    let header = check_kafka_batch(&dense).unwrap();
    rebuild_kafka_batch(&dense, &header, 0, (0, span), None, &mut |_| true).unwrap()
}

/// Offsets emptied by compaction over a stream's life add up past what one Kafka batch can
/// span (lastOffsetDelta is an i32): the gap before a kept batch goes into empty batches
/// of their own, and compaction goes on. It used to fail the pass on every tick, as a
/// corrupt batch, once a key had been superseded 2^31 offsets' worth.
#[test]
fn a_gap_wider_than_one_batch_can_span_is_split() {
    let rt = runtime();
    let mut h = harness(1 << 20);
    let after = rt.block_on(async {
        let b = h.broker();
        b.put_stream("wide", &compacted(1)).await.unwrap();
        let uid = 1; // the stream's only partition: the first log
        const QUARTER: u64 = 1 << 30;
        for (value, span) in [("v1", QUARTER), ("v2", QUARTER), ("v3", QUARTER), ("v4", 1)] {
            let wrapped =
                tidewater_storage::format::wrap_kafka_batch(uid, &sparse_batch("k", value, span))
                    .unwrap();
            b.store()
                .submit_wait(
                    vec![tidewater_storage::Op::Append {
                        uid,
                        batch: wrapped,
                    }],
                    AckLevel::Durable,
                )
                .unwrap();
        }
        // Something after it, so the batch of v4 is in a sealed segment.
        b.produce(
            "wide",
            &[record("other", Some(&"x".repeat(2_000)))],
            AckLevel::Durable,
        )
        .await
        .unwrap();
        assert_eq!(
            b.get_stream("wide").unwrap().partitions[0].end_offset,
            3 * QUARTER + 2
        );
        assert!(compact_all(b).await >= 1);
        let after = read_all(b, "wide", 1 << 20).await;
        assert_eq!(
            after,
            vec![
                (3 * QUARTER, "k".to_string(), Some("v4".to_string())),
                (
                    3 * QUARTER + 1,
                    "other".to_string(),
                    Some("x".repeat(2_000))
                ),
            ]
        );
        let stats = b.stream_counters()[0].1.compaction;
        assert_eq!(stats.superseded, 3, "{stats:?}");
        assert_eq!(b.get_stream("wide").unwrap().partitions[0].start_offset, 0);
        after
    });
    h.restart();
    let b = h.broker();
    assert_eq!(
        rt.block_on(read_all(b, "wide", 1 << 20)),
        after,
        "the same after a restart"
    );
}
