//! Streams through the broker: partitions as Kafka places keys, produce all or nothing,
//! fetch from an offset (long poll included), lookup by time, growth, deletion, and all of
//! it the same after a restart.

use std::collections::BTreeMap;

use tidewater_core::harness::{Harness, HarnessOptions, START_MS};
use tidewater_core::stream::config::{StreamPatch, TimestampType};
use tidewater_core::stream::partition::partition_for_key;
use tidewater_core::stream::records::NewStreamRecord;
use tidewater_core::{AckLevel, Broker, ErrorCode};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn record(key: Option<&str>, value: &str) -> NewStreamRecord {
    NewStreamRecord {
        key: key.map(|k| k.as_bytes().to_vec()),
        value: Some(value.as_bytes().to_vec()),
        ..NewStreamRecord::default()
    }
}

fn patch(partitions: u32) -> StreamPatch {
    StreamPatch {
        partitions: Some(partitions),
        ..StreamPatch::default()
    }
}

/// Every record of every partition: partition -> [(offset, key, value)].
async fn everything(broker: &Broker, stream: &str) -> BTreeMap<u32, Vec<(u64, String, String)>> {
    let info = broker.get_stream(stream).unwrap();
    let mut out = BTreeMap::new();
    for part in info.partitions {
        let mut next = 0;
        let mut got = Vec::new();
        while next < part.end_offset {
            let (records, after, _) = broker
                .fetch_records(stream, part.partition, next, 1_000, 0)
                .await
                .unwrap();
            for r in records {
                let text = |b: Option<bytes::Bytes>| {
                    b.map(|b| String::from_utf8(b.to_vec()).unwrap())
                        .unwrap_or_default()
                };
                got.push((r.offset, text(r.key), text(r.value)));
            }
            next = after;
        }
        out.insert(part.partition, got);
    }
    out
}

#[test]
fn records_go_where_kafka_puts_them_and_read_back_in_order_across_restarts() {
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let (created, info) = h.broker().put_stream("readings", &patch(4)).await.unwrap();
        assert!(created);
        assert_eq!(info.partitions.len(), 4);
        let records: Vec<NewStreamRecord> = (0..100)
            .map(|i| record(Some(&format!("sensor-{}", i % 10)), &format!("r{i}")))
            .collect();
        let produced = h
            .broker()
            .produce("readings", &records, AckLevel::Durable)
            .await
            .unwrap();
        let mut next_offset = [0u64; 4];
        for (i, &(partition, offset)) in produced.offsets.iter().enumerate() {
            let key = format!("sensor-{}", i % 10);
            assert_eq!(
                partition,
                partition_for_key(key.as_bytes(), 4),
                "record {i}"
            );
            assert_eq!(offset, next_offset[partition as usize], "record {i}");
            next_offset[partition as usize] += 1;
        }
        // Keyless records: one partition per produce, the next produce the next one.
        let a = h
            .broker()
            .produce(
                "readings",
                &[record(None, "x"), record(None, "y")],
                AckLevel::Durable,
            )
            .await
            .unwrap();
        let b = h
            .broker()
            .produce("readings", &[record(None, "z")], AckLevel::Durable)
            .await
            .unwrap();
        assert_eq!(a.offsets[0].0, a.offsets[1].0);
        assert_ne!(a.offsets[0].0, b.offsets[0].0);
    });
    let before = rt.block_on(everything(h.broker(), "readings"));
    assert_eq!(before.values().map(Vec::len).sum::<usize>(), 103);
    for records in before.values() {
        let offsets: Vec<u64> = records.iter().map(|r| r.0).collect();
        assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<_>>());
    }
    h.restart();
    assert_eq!(rt.block_on(everything(h.broker(), "readings")), before);
    // Appends continue where the partitions ended.
    let produced = rt
        .block_on(h.broker().produce(
            "readings",
            &[record(Some("sensor-3"), "after restart")],
            AckLevel::Durable,
        ))
        .unwrap();
    let (partition, offset) = produced.offsets[0];
    assert_eq!(offset, before[&partition].len() as u64);
}

#[test]
fn a_fetch_at_the_end_waits_for_the_next_record() {
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        h.broker().put_stream("s", &patch(1)).await.unwrap();
        let broker = h.broker();
        // 30 s is only a bound: the fetch answers when the record is durable.
        let (fetched, produced) =
            tokio::join!(broker.fetch_records("s", 0, 0, 1_000, 30_000), async {
                tokio::task::yield_now().await;
                broker
                    .produce("s", &[record(None, "late")], AckLevel::Durable)
                    .await
            });
        produced.unwrap();
        let (records, next, _) = fetched.unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].value.as_deref(), Some(&b"late"[..]));
        assert_eq!(next, 1);
        // Closing the broker ends a waiting fetch at once, empty.
        let (fetched, ()) = tokio::join!(broker.fetch("s", 0, 1, 1_000, 30_000), async {
            tokio::task::yield_now().await;
            broker.close();
        });
        assert!(fetched.unwrap().batches.is_empty());
    });
}

#[test]
fn partitions_grow_never_shrink_and_a_deleted_stream_stays_deleted() {
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        h.broker().put_stream("s", &patch(2)).await.unwrap();
        h.broker()
            .produce("s", &[record(Some("a"), "1")], AckLevel::Durable)
            .await
            .unwrap();
        let (created, info) = h.broker().put_stream("s", &patch(5)).await.unwrap();
        assert!(!created);
        assert_eq!(info.partitions.len(), 5);
        let err = h.broker().put_stream("s", &patch(3)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::ConfigConflict);
        // The new partitions take records.
        let to_four = NewStreamRecord {
            partition: Some(4),
            ..record(None, "p4")
        };
        let produced = h
            .broker()
            .produce("s", &[to_four], AckLevel::Durable)
            .await
            .unwrap();
        assert_eq!(produced.offsets, vec![(4, 0)]);
        h.broker().put_stream("gone", &patch(3)).await.unwrap();
        h.broker().delete_stream("gone").await.unwrap();
    });
    h.restart();
    let info = h.broker().get_stream("s").unwrap();
    assert_eq!(info.config.partitions, 5);
    let ends: Vec<u64> = info.partitions.iter().map(|p| p.end_offset).collect();
    assert_eq!(ends.iter().sum::<u64>(), 2);
    assert_eq!(ends[4], 1);
    assert_eq!(
        h.broker().get_stream("gone").unwrap_err().code,
        ErrorCode::StreamNotFound
    );
    assert_eq!(h.broker().list_streams().len(), 1);
}

#[test]
fn bad_requests_get_their_code_and_change_nothing() {
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &patch(2)).await.unwrap();
        fn code<T: std::fmt::Debug>(r: Result<T, tidewater_core::BrokerError>) -> ErrorCode {
            r.unwrap_err().code
        }
        assert_eq!(
            code(
                b.produce("nope", &[record(None, "x")], AckLevel::Durable)
                    .await
            ),
            ErrorCode::StreamNotFound
        );
        assert_eq!(
            code(b.fetch("s", 2, 0, 100, 0).await),
            ErrorCode::PartitionNotFound
        );
        assert_eq!(
            code(b.fetch("s", 0, 1, 100, 0).await),
            ErrorCode::OffsetOutOfRange
        );
        assert_eq!(
            code(b.put_stream("bad/name", &patch(1)).await),
            ErrorCode::InvalidStreamName
        );
        assert_eq!(
            code(b.put_stream("zero", &patch(0)).await),
            ErrorCode::InvalidConfig
        );
        let wrong_partition = NewStreamRecord {
            partition: Some(7),
            ..record(None, "x")
        };
        assert_eq!(
            code(
                b.produce(
                    "s",
                    &[record(None, "ok"), wrong_partition],
                    AckLevel::Durable
                )
                .await
            ),
            ErrorCode::PartitionNotFound
        );
        let info = b.get_stream("s").unwrap();
        assert!(
            info.partitions.iter().all(|p| p.end_offset == 0),
            "nothing was stored"
        );
    });
}

#[test]
fn offsets_are_found_by_time_and_log_append_time_uses_the_brokers_clock() {
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("t", &patch(1)).await.unwrap();
        for (i, ts) in [1_000i64, 2_000, 1_500, 3_000].into_iter().enumerate() {
            let r = NewStreamRecord {
                timestamp: Some(ts),
                ..record(None, &format!("at {ts}"))
            };
            let produced = b.produce("t", &[r], AckLevel::Durable).await.unwrap();
            assert_eq!(produced.offsets[0].1, i as u64);
        }
        assert_eq!(b.offset_for_time("t", 0, 0).unwrap(), Some(0));
        assert_eq!(b.offset_for_time("t", 0, 1_001).unwrap(), Some(1));
        assert_eq!(b.offset_for_time("t", 0, 2_001).unwrap(), Some(3));
        assert_eq!(b.offset_for_time("t", 0, 3_001).unwrap(), None);

        let append_time = StreamPatch {
            partitions: Some(1),
            timestamp_type: Some(TimestampType::LogAppendTime),
            ..StreamPatch::default()
        };
        b.put_stream("u", &append_time).await.unwrap();
        let r = NewStreamRecord {
            timestamp: Some(5),
            ..record(None, "producer says 5")
        };
        b.produce("u", &[r], AckLevel::Durable).await.unwrap();
        let (records, _, _) = b.fetch_records("u", 0, 0, 1_000, 0).await.unwrap();
        assert_eq!(
            records[0].timestamp, START_MS,
            "the broker's clock at append"
        );
    });
}

/// Consumer groups: two members share a stream's partitions, commits are durable across a
/// restart (a commit replaces the one before: only the latest is kept), lag is exact in
/// records and in age, and a silent member's session expires.
#[test]
fn groups_share_partitions_commit_durably_and_report_lag() {
    use std::collections::BTreeSet;
    use tidewater_core::stream::group::TopicPartition;
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
    let streams = vec!["events".to_string()];
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("events", &patch(4)).await.unwrap();
        let records: Vec<NewStreamRecord> = (0..40)
            .map(|i| NewStreamRecord {
                partition: Some(i % 4),
                timestamp: Some(START_MS - 60_000),
                ..record(None, &format!("e{i}"))
            })
            .collect();
        b.produce("events", &records, AckLevel::Durable)
            .await
            .unwrap();
        let one = b.join_group("etl", None, &streams, 10_000).unwrap();
        let two = b.join_group("etl", None, &streams, 10_000).unwrap();
        // Heartbeat until settled: each holds two partitions.
        let mut held: [BTreeSet<TopicPartition>; 2] = Default::default();
        for _ in 0..4 {
            for (i, member) in [&one, &two].into_iter().enumerate() {
                let a = b.heartbeat("etl", member, &held[i]).unwrap();
                for r in &a.revoked {
                    held[i].remove(r);
                }
                held[i].extend(a.assigned);
            }
        }
        assert_eq!((held[0].len(), held[1].len()), (2, 2));
        assert!(held[0].is_disjoint(&held[1]));
        // Commits: the latest one counts.
        for (partition, offset) in [(0, 3), (0, 7), (1, 10), (2, 0)] {
            b.commit("etl", "events", partition, offset, "m")
                .await
                .unwrap();
        }
        let err = b.commit("etl", "events", 0, 11, "").await.unwrap_err();
        assert_eq!(err.code, ErrorCode::OffsetOutOfRange);
        // Several partitions commit in one write, all or none.
        let both = [
            ("events".to_string(), 3, 1, String::new()),
            ("events".to_string(), 0, 99, String::new()),
        ];
        let err = b.commit_many("etl", &both).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::OffsetOutOfRange);
        assert!(
            b.committed("etl", "events", 3).await.is_none(),
            "none of them"
        );
        let err = b
            .heartbeat("etl", "member-99", &BTreeSet::new())
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::UnknownMember);
    });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        assert_eq!(b.committed("etl", "events", 0).await.unwrap().offset, 7);
        let info = b.describe_group("etl").await.unwrap();
        let lag: Vec<(u32, u64, u64)> = info
            .offsets
            .iter()
            .map(|l| (l.partition, l.committed, l.lag))
            .collect();
        assert_eq!(lag, vec![(0, 7, 3), (1, 10, 0), (2, 0, 10)]);
        let p0 = &info.offsets[0];
        assert_eq!(
            p0.lag_ms, 60_000,
            "the oldest unconsumed record is a minute old"
        );
        assert_eq!(info.offsets[1].lag_ms, 0);
        // Members are not durable (as Kafka's): after a restart they join again.
        assert!(info.members.is_empty());
        // The metrics' view: per group and stream, summed records and the oldest's age.
        let lags = b.group_lags();
        assert_eq!(lags.len(), 1);
        assert_eq!(
            (lags[0].lag, lags[0].lag_ms, lags[0].members),
            (13, 60_000, 0)
        );
        let three = b.join_group("etl", None, &streams, 1_000).unwrap();
        b.heartbeat("etl", &three, &BTreeSet::new()).unwrap();
        h.advance(1_001).await;
        let err = h
            .broker()
            .heartbeat("etl", &three, &BTreeSet::new())
            .unwrap_err();
        assert!(
            matches!(
                err.code,
                ErrorCode::UnknownMember | ErrorCode::GroupNotFound
            ),
            "{err}"
        );
        assert_eq!(h.broker().list_groups().await, vec!["etl".to_string()]);
    });
}

/// Consumer instances (the HTTP members the broker runs): fetch from assigned partitions at
/// their positions, commit them, and when a second member joins, the partition that moves
/// is committed by the first and continued by the second from there: nothing is read
/// twice or skipped.
#[test]
fn consumer_instances_continue_where_the_group_left_off() {
    use std::collections::BTreeSet;
    use tidewater_core::broker::StartAt;
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("jobs", &patch(2)).await.unwrap();
        let records: Vec<NewStreamRecord> = (0..20)
            .map(|i| NewStreamRecord {
                partition: Some(i % 2),
                ..record(None, &format!("j{i}"))
            })
            .collect();
        b.produce("jobs", &records, AckLevel::Durable)
            .await
            .unwrap();
        let streams = vec!["jobs".to_string()];
        let one = b
            .create_consumer("workers", None, &streams, 10_000, StartAt::Earliest)
            .unwrap();
        // Small fetches: one batch of one partition each.
        let first = b.consumer_fetch("workers", &one, 1, 0).await.unwrap();
        assert_eq!(first.len(), 10, "one whole batch");
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let value = |r: &tidewater_core::broker::MemberRecord| {
            String::from_utf8(r.record.value.clone().unwrap().to_vec()).unwrap()
        };
        for r in &first {
            assert!(seen.insert(value(r)));
        }
        b.commit_consumer("workers", &one, None).await.unwrap();
        let two = b
            .create_consumer("workers", None, &streams, 10_000, StartAt::Earliest)
            .unwrap();
        // Both fetch until nothing is left: every record exactly once.
        for _ in 0..6 {
            for member in [&one, &two] {
                for r in b
                    .consumer_fetch("workers", member, 1 << 20, 0)
                    .await
                    .unwrap()
                {
                    assert!(seen.insert(value(&r)), "{} read twice", value(&r));
                }
                b.commit_consumer("workers", member, None).await.unwrap();
            }
        }
        assert_eq!(seen.len(), 20);
        let info = b.describe_group("workers").await.unwrap();
        assert_eq!(info.members.len(), 2);
        assert!(info.offsets.iter().all(|l| l.lag == 0), "{info:?}");
        // A fetch waits for new records; one produced wakes it.
        let (fetched, produced) =
            tokio::join!(b.consumer_fetch("workers", &one, 1 << 20, 30_000), async {
                tokio::task::yield_now().await;
                let to_both: Vec<NewStreamRecord> = (0..2)
                    .map(|p| NewStreamRecord {
                        partition: Some(p),
                        ..record(None, "new")
                    })
                    .collect();
                b.produce("jobs", &to_both, AckLevel::Durable).await
            });
        produced.unwrap();
        assert_eq!(
            fetched.unwrap().len(),
            1,
            "one of the two partitions is one's"
        );
        b.delete_consumer("workers", &one, true).await.unwrap();
        let err = b.consumer_fetch("workers", &one, 1, 0).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::UnknownMember);
    });
}

/// Defects a newcomer trial found (session 6), each checked here: member ids are never
/// handed out again (an old client cannot act for a new member); a partition a member gives
/// up reaches the new member at once; a fetch takes partitions in turns; an explicit commit
/// to a stream that does not exist is refused; instance names are checked; a deleted and
/// re-created stream starts with no committed offsets; a refused keyless produce leaves
/// its turn to the next one.
#[test]
fn group_edges_found_by_a_newcomer() {
    use tidewater_core::broker::StartAt;
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &patch(2)).await.unwrap();
        let batch: Vec<NewStreamRecord> = (0..8)
            .map(|i| NewStreamRecord {
                partition: Some(i % 2),
                ..record(None, &format!("v{i}"))
            })
            .collect();
        b.produce("s", &batch, AckLevel::Durable).await.unwrap();
        let streams = vec!["s".to_string()];
        let one = b
            .create_consumer("g", None, &streams, 60_000, StartAt::Earliest)
            .unwrap();
        // Turns: a one-batch fetch takes partition after partition.
        let first = b.consumer_fetch("g", &one, 1, 0).await.unwrap();
        let second = b.consumer_fetch("g", &one, 1, 0).await.unwrap();
        assert_ne!(first[0].partition, second[0].partition);
        b.commit_consumer("g", &one, None).await.unwrap();
        // A second member gets its partition as soon as the first has fetched once.
        let two = b
            .create_consumer("g", None, &streams, 60_000, StartAt::Earliest)
            .unwrap();
        b.consumer_fetch("g", &one, 1 << 20, 0).await.unwrap();
        let info = b.describe_group("g").await.unwrap();
        let mine: Vec<u32> = info
            .members
            .iter()
            .find(|m| m.member == two)
            .unwrap()
            .assigned
            .iter()
            .map(|p| p.partition)
            .collect();
        assert_eq!(mine.len(), 1);
        b.produce(
            "s",
            &[NewStreamRecord {
                partition: Some(mine[0]),
                ..record(None, "for two")
            }],
            AckLevel::Durable,
        )
        .await
        .unwrap();
        let got = b.consumer_fetch("g", &two, 1 << 20, 0).await.unwrap();
        assert!(
            got.iter()
                .any(|r| r.record.value.as_deref() == Some(&b"for two"[..])),
            "{got:?}"
        );
        // Ids are never reused: after both leave, a new member has a new id and the old
        // ones are unknown.
        b.delete_consumer("g", &one, true).await.unwrap();
        b.delete_consumer("g", &two, true).await.unwrap();
        let three = b
            .create_consumer("g", None, &streams, 60_000, StartAt::Earliest)
            .unwrap();
        assert!(three != one && three != two);
        assert_eq!(
            b.consumer_fetch("g", &one, 1, 0).await.unwrap_err().code,
            ErrorCode::UnknownMember
        );
        // Explicit commits name what exists; instance names are checked.
        let missing = [("nope".to_string(), 0, 1)];
        let err = b
            .commit_consumer("g", &three, Some(&missing))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::StreamNotFound);
        let err = b
            .create_consumer("g", Some("bad name"), &streams, 60_000, StartAt::Earliest)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        // Deleting the stream forgets its committed offsets.
        b.commit("g", "s", 0, 3, "").await.unwrap();
        b.delete_consumer("g", &three, true).await.unwrap();
        b.delete_stream("s").await.unwrap();
        b.put_stream("s", &patch(2)).await.unwrap();
        assert!(b.committed("g", "s", 0).await.is_none());
        // A refused keyless produce does not take the next turn.
        let ok = b
            .produce("s", &[record(None, "a")], AckLevel::Durable)
            .await
            .unwrap();
        let bad = NewStreamRecord {
            partition: Some(9),
            ..record(None, "b")
        };
        assert!(
            b.produce("s", &[record(None, "c"), bad], AckLevel::Durable)
                .await
                .is_err()
        );
        let next = b
            .produce("s", &[record(None, "d")], AckLevel::Durable)
            .await
            .unwrap();
        assert_eq!(next.offsets[0].0, (ok.offsets[0].0 + 1) % 2);
    });
}

/// A long poll longer than the member's session keeps the member: the fetch is its
/// heartbeat for as long as it waits (before, the member was removed during its own fetch).
#[test]
fn a_long_poll_keeps_its_member_alive() {
    use tidewater_core::broker::StartAt;
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &patch(1)).await.unwrap();
        let streams = vec!["s".to_string()];
        let member = b
            .create_consumer("g", None, &streams, 1_000, StartAt::Earliest)
            .unwrap();
        let (fetched, ()) = tokio::join!(b.consumer_fetch("g", &member, 1 << 20, 30_000), async {
            tokio::task::yield_now().await;
            // Five sessions pass (simulated) while the fetch waits; maintenance runs.
            h.advance(5_000).await;
            b.produce("s", &[record(None, "wake")], AckLevel::Durable)
                .await
                .unwrap();
        });
        assert_eq!(fetched.unwrap().len(), 1);
    });
}

/// The committed offsets of a group, by (stream, partition).
async fn committed_of(broker: &Broker, group: &str) -> BTreeMap<(String, u32), u64> {
    match broker.describe_group(group).await {
        Ok(info) => info
            .offsets
            .iter()
            .map(|l| ((l.stream.clone(), l.partition), l.committed))
            .collect(),
        Err(err) => {
            assert_eq!(err.code, ErrorCode::GroupNotFound, "{err}");
            BTreeMap::new()
        }
    }
}

/// Offset resets as kafka-consumer-groups makes them: each target (earliest, latest, a
/// time, a shift, an offset) lands within the partition's range; a dry run changes
/// nothing; a group with members is refused; what was reset survives a restart.
#[test]
fn offsets_reset_to_each_target_within_range_and_only_without_members() {
    use tidewater_core::broker::{OffsetReset, ResetTo};
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
    let s = |p: u32| ("s".to_string(), p);
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &patch(2)).await.unwrap();
        b.put_stream("other", &patch(1)).await.unwrap();
        // Record i of each partition was made at START_MS - 100_000 + i * 1_000.
        let records: Vec<NewStreamRecord> = (0..20)
            .map(|i| NewStreamRecord {
                partition: Some(i % 2),
                timestamp: Some(START_MS - 100_000 + i64::from(i / 2) * 1_000),
                ..record(None, &format!("r{i}"))
            })
            .collect();
        b.produce("s", &records, AckLevel::Durable).await.unwrap();
        let streams = vec!["s".to_string()];
        let member = b.join_group("g", None, &streams, 10_000).unwrap();
        let commits = [
            ("s".to_string(), 0, 4, "m".to_string()),
            ("s".to_string(), 1, 6, "m".to_string()),
        ];
        b.commit_many("g", &commits).await.unwrap();
        for dry_run in [true, false] {
            let err = b
                .reset_offsets("g", None, ResetTo::Earliest, dry_run)
                .await
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::GroupNotEmpty, "{err}");
            assert!(err.message.contains("1 member"), "{err}");
        }
        let err = b.delete_group("g").await.unwrap_err();
        assert_eq!(err.code, ErrorCode::GroupNotEmpty);
        b.leave_group("g", &member).unwrap();

        // A dry run shows the plan and changes nothing.
        let plan = b
            .reset_offsets("g", None, ResetTo::Earliest, true)
            .await
            .unwrap();
        let row = |p, from, to| OffsetReset {
            stream: "s".into(),
            partition: p,
            from,
            to,
        };
        assert_eq!(plan, vec![row(0, Some(4), 0), row(1, Some(6), 0)]);
        assert_eq!(
            committed_of(b, "g").await,
            BTreeMap::from([(s(0), 4), (s(1), 6)])
        );
        // Each target, executed, in turn.
        let cases = [
            (ResetTo::Latest, [10, 10]),
            // Record 3 of each partition is the first made at or after this time.
            (ResetTo::Datetime(START_MS - 96_000), [4, 4]),
            (ResetTo::Datetime(START_MS - 97_500), [3, 3]),
            (ResetTo::Datetime(START_MS - 97_000), [3, 3]),
            (ResetTo::Datetime(0), [0, 0]),
            // Every record is older: the end.
            (ResetTo::Datetime(START_MS), [10, 10]),
            (ResetTo::ShiftBy(-3), [7, 7]),
            (ResetTo::ShiftBy(-100), [0, 0]),
            (ResetTo::ShiftBy(4), [4, 4]),
            (ResetTo::ShiftBy(i64::MAX), [10, 10]),
            (ResetTo::Offset(7), [7, 7]),
            (ResetTo::Offset(99), [10, 10]),
            (ResetTo::Earliest, [0, 0]),
        ];
        let mut before = [Some(4), Some(6)];
        for (to, after) in cases {
            let plan = b.reset_offsets("g", None, to, false).await.unwrap();
            assert_eq!(
                plan,
                vec![row(0, before[0], after[0]), row(1, before[1], after[1])],
                "{to:?}"
            );
            assert_eq!(
                committed_of(b, "g").await,
                BTreeMap::from([(s(0), after[0]), (s(1), after[1])]),
                "{to:?}"
            );
            before = [Some(after[0]), Some(after[1])];
        }
        // Named streams: every partition of each, committed or not; one that does not
        // exist refuses the whole reset.
        let names = vec!["s".to_string(), "nope".to_string()];
        let err = b
            .reset_offsets("g", Some(&names), ResetTo::Latest, false)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::StreamNotFound);
        assert_eq!(committed_of(b, "g").await[&s(0)], 0, "nothing changed");
        let err = b
            .reset_offsets("g", Some(&[]), ResetTo::Latest, false)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        let err = b
            .reset_offsets("new", None, ResetTo::Latest, false)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::GroupNotFound, "nothing to reset");
        // A group with no commits yet can be placed: a shift counts from the start.
        let plan = b
            .reset_offsets("new", Some(&streams), ResetTo::ShiftBy(3), false)
            .await
            .unwrap();
        assert_eq!(plan, vec![row(0, None, 3), row(1, None, 3)]);
        let other = vec!["other".to_string()];
        b.reset_offsets("new", Some(&other), ResetTo::Latest, false)
            .await
            .unwrap();
        let err = b
            .reset_offsets("bad/name", None, ResetTo::Latest, true)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        // Names too long together for a commit record are refused, not a panic.
        let long = "g".repeat(200);
        b.put_stream(&"s".repeat(100), &patch(1)).await.unwrap();
        let err = b
            .commit(&long, &"s".repeat(100), 0, 0, "")
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest, "{err}");
    });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        assert_eq!(
            committed_of(b, "g").await,
            BTreeMap::from([(s(0), 0), (s(1), 0)])
        );
        assert_eq!(
            committed_of(b, "new").await,
            BTreeMap::from([(s(0), 3), (s(1), 3), (("other".to_string(), 0), 0)])
        );
        // Without streams named: every stream the group committed offsets for.
        let plan = b
            .reset_offsets("new", None, ResetTo::Latest, false)
            .await
            .unwrap();
        assert_eq!(plan.len(), 3);
        assert_eq!(
            committed_of(b, "new").await,
            BTreeMap::from([(s(0), 10), (s(1), 10), (("other".to_string(), 0), 0)])
        );
    });
}

/// Deleting a group settles its committed offsets (gone after a restart too) and is
/// refused while it has members.
#[test]
fn a_deleted_group_is_gone_for_good() {
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &patch(3)).await.unwrap();
        for group in ["doomed", "kept"] {
            let commits: Vec<(String, u32, u64, String)> = (0..3)
                .map(|p| ("s".to_string(), p, 0, String::new()))
                .collect();
            b.commit_many(group, &commits).await.unwrap();
        }
        let streams = vec!["s".to_string()];
        let member = b.join_group("doomed", None, &streams, 10_000).unwrap();
        let err = b.delete_group("doomed").await.unwrap_err();
        assert_eq!(err.code, ErrorCode::GroupNotEmpty);
        b.leave_group("doomed", &member).unwrap();
        b.delete_group("doomed").await.unwrap();
        assert!(committed_of(b, "doomed").await.is_empty());
        let err = b.delete_group("doomed").await.unwrap_err();
        assert_eq!(err.code, ErrorCode::GroupNotFound);
        assert_eq!(b.list_groups().await, vec!["kept".to_string()]);
    });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        assert_eq!(b.list_groups().await, vec!["kept".to_string()]);
        assert!(b.committed("doomed", "s", 0).await.is_none());
        assert_eq!(committed_of(b, "kept").await.len(), 3);
    });
}

/// Committed offsets of a group without members expire `group_offsets_retention_ms` after
/// its newest commit, or after it last had a member, whichever is later; a restart counts
/// as seeing every group (nothing expires early because the broker was down).
#[test]
fn offsets_of_groups_without_members_expire_after_the_retention() {
    const HOUR: i64 = 3_600_000;
    // Maintenance looks for expired offsets at most once a minute.
    const SCAN: i64 = 60_000;
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions {
        limits: tidewater_core::Limits {
            group_offsets_retention_ms: HOUR as u64,
            max_session_timeout_ms: 10 * HOUR as u64,
            ..tidewater_core::Limits::default()
        },
        ..HarnessOptions::default()
    })
    .unwrap();
    let streams = vec!["s".to_string()];
    let commit = |b: &Broker, group: &'static str| {
        let b = b.clone();
        async move { b.commit(group, "s", 0, 0, "").await.unwrap() }
    };
    let groups = |h: &Harness| {
        let b = h.broker().clone();
        async move { b.list_groups().await }
    };
    let member = rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &patch(1)).await.unwrap();
        // idle: commits once, no members. busy: a member for two hours, commits once.
        commit(b, "idle").await;
        let member = b
            .join_group("busy", None, &streams, 3 * HOUR as u64)
            .unwrap();
        commit(b, "busy").await;
        h.advance(HOUR - SCAN).await;
        assert_eq!(groups(&h).await, vec!["busy", "idle"]);
        h.advance(SCAN).await;
        assert_eq!(groups(&h).await, vec!["busy"], "idle's hour has passed");
        h.advance(HOUR).await;
        assert_eq!(
            groups(&h).await,
            vec!["busy"],
            "a group with members keeps them"
        );
        member
    });
    rt.block_on(async {
        h.broker().leave_group("busy", &member).unwrap();
        // Two hours after its commit, but it had a member until now.
        h.advance(HOUR - SCAN).await;
        assert_eq!(groups(&h).await, vec!["busy"]);
        h.advance(SCAN).await;
        assert!(groups(&h).await.is_empty());
        // A restart half-way: the retention counts from the restart.
        commit(h.broker(), "restarted").await;
    });
    rt.block_on(h.advance(HOUR / 2));
    h.restart();
    rt.block_on(async {
        h.advance(HOUR / 2 + SCAN).await;
        assert_eq!(groups(&h).await, vec!["restarted"]);
        h.advance(HOUR / 2).await;
        assert!(groups(&h).await.is_empty());
    });
    // With retention 0, offsets stay.
    drop(h);
    let h = Harness::temporary(HarnessOptions {
        limits: tidewater_core::Limits {
            group_offsets_retention_ms: 0,
            ..tidewater_core::Limits::default()
        },
        ..HarnessOptions::default()
    })
    .unwrap();
    rt.block_on(async {
        h.broker().put_stream("s", &patch(1)).await.unwrap();
        commit(h.broker(), "forever").await;
        h.advance(1_000 * HOUR).await;
        assert_eq!(groups(&h).await, vec!["forever"]);
    });
}

/// A consumer instance's fetch returns at most `max_records` (the position moves past the
/// last record returned only, so the rest of a batch comes next), and a partition with no
/// committed offset starts where `start_at` says: an offset or a time; a commit wins.
#[test]
fn consumer_instances_take_at_most_max_records_and_start_where_asked() {
    use tidewater_core::broker::StartAt;
    let rt = runtime();
    let h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &patch(1)).await.unwrap();
        // One produce: one stored batch, records made at START_MS + i seconds.
        let records: Vec<NewStreamRecord> = (0..10)
            .map(|i| NewStreamRecord {
                timestamp: Some(START_MS + i * 1_000),
                ..record(None, &format!("r{i}"))
            })
            .collect();
        b.produce("s", &records, AckLevel::Durable).await.unwrap();
        let streams = vec!["s".to_string()];
        let offsets = |got: Vec<tidewater_core::broker::MemberRecord>| -> Vec<u64> {
            got.iter().map(|r| r.record.offset).collect()
        };
        let start = |group: &'static str, at: StartAt| {
            let b = b.clone();
            let streams = streams.clone();
            async move {
                let m = b
                    .create_consumer(group, None, &streams, 60_000, at)
                    .unwrap();
                let got = b
                    .consumer_fetch_records(group, &m, 1 << 20, 100, 0)
                    .await
                    .unwrap();
                b.delete_consumer(group, &m, true).await.unwrap();
                offsets(got)
            }
        };
        let m = b
            .create_consumer("g", None, &streams, 60_000, StartAt::Offset(3))
            .unwrap();
        let got = b.consumer_fetch_records("g", &m, 1 << 20, 4, 0).await;
        assert_eq!(offsets(got.unwrap()), vec![3, 4, 5, 6]);
        let got = b.consumer_fetch_records("g", &m, 1 << 20, 4, 0).await;
        assert_eq!(offsets(got.unwrap()), vec![7, 8, 9]);
        // Leaving commits the position: after the last record returned.
        b.delete_consumer("g", &m, true).await.unwrap();
        assert_eq!(b.committed("g", "s", 0).await.unwrap().offset, 10);
        let m = b
            .create_consumer("h", None, &streams, 60_000, StartAt::Earliest)
            .unwrap();
        let got = b.consumer_fetch_records("h", &m, 1 << 20, 2, 0).await;
        assert_eq!(offsets(got.unwrap()), vec![0, 1]);
        b.delete_consumer("h", &m, true).await.unwrap();
        assert_eq!(b.committed("h", "s", 0).await.unwrap().offset, 2);

        assert_eq!(
            start("t", StartAt::Time(START_MS + 5_500)).await,
            vec![6, 7, 8, 9]
        );
        assert!(
            start("late", StartAt::Time(START_MS + 60_000))
                .await
                .is_empty()
        );
        assert!(start("far", StartAt::Offset(99)).await.is_empty());
        assert_eq!(start("end", StartAt::Latest).await, Vec::<u64>::new());
        // A committed offset wins over start_at.
        assert_eq!(
            start("h", StartAt::Offset(0)).await,
            (2..10).collect::<Vec<_>>()
        );
    });
}

/// Commits from outside a group's membership (the binary protocol's Commit without a
/// member) made new groups without limit: max_groups held only for joins.
#[test]
fn commits_to_new_groups_stop_at_max_groups() {
    let rt = runtime();
    let limits = tidewater_core::Limits {
        max_groups: 3,
        ..tidewater_core::Limits::default()
    };
    let h = Harness::temporary(HarnessOptions {
        limits,
        ..HarnessOptions::default()
    })
    .unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &patch(1)).await.unwrap();
        let commit = vec![("s".to_string(), 0, 0, String::new())];
        for g in ["a", "b", "c"] {
            b.commit_as_member(g, None, &commit).await.unwrap();
        }
        let err = b.commit_as_member("d", None, &commit).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest, "{}", err.message);
        assert!(err.message.contains("max_groups"), "{}", err.message);
        // A group that exists takes more commits.
        b.commit_as_member("a", None, &commit).await.unwrap();
        assert_eq!(b.list_groups().await.len(), 3);
    });
}

/// A group name is checked on every path that can make a group: a commit from outside the
/// membership took any name, and a NUL in it made its offsets record unreadable at
/// recovery.
#[test]
fn commits_check_the_group_name() {
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions::default()).unwrap();
    rt.block_on(async {
        let b = h.broker();
        b.put_stream("s", &patch(1)).await.unwrap();
        let commit = vec![("s".to_string(), 0, 0, String::new())];
        for bad in ["", "a\0b", "x y", &"g".repeat(201)] {
            let err = b.commit_as_member(bad, None, &commit).await.unwrap_err();
            assert_eq!(
                err.code,
                ErrorCode::InvalidRequest,
                "{bad:?}: {}",
                err.message
            );
        }
        b.commit_as_member("fine", None, &commit).await.unwrap();
    });
    h.restart();
    rt.block_on(async {
        assert_eq!(h.broker().list_groups().await, vec!["fine".to_string()]);
    });
}

/// Retention (issue 11): whole sealed segments go by size and by age; the partition's start
/// moves past them, durably; reads below it are told where it starts; consumer instances
/// go on from there.
#[test]
fn retention_deletes_whole_old_segments_by_size_and_age() {
    let rt = runtime();
    let mut h = Harness::temporary(HarnessOptions {
        store: tidewater_storage::StoreOptions {
            fsync: false,
            segment_roll_bytes: 4_096,
            ..tidewater_storage::StoreOptions::default()
        },
        ..HarnessOptions::default()
    })
    .unwrap();
    let value = "v".repeat(200);
    rt.block_on(async {
        let b = h.broker();
        b.put_stream(
            "s",
            &StreamPatch {
                partitions: Some(1),
                retention_bytes: Some(20_000),
                retention_ms: Some(-1),
                ..StreamPatch::default()
            },
        )
        .await
        .unwrap();
        let member = b
            .create_consumer(
                "g",
                None,
                &["s".to_string()],
                30_000,
                tidewater_core::broker::StartAt::Earliest,
            )
            .unwrap();
        for _ in 0..40 {
            let records: Vec<NewStreamRecord> = (0..10).map(|_| record(None, &value)).collect();
            b.produce("s", &records, AckLevel::Durable).await.unwrap();
        }
        h.advance(1).await;
        let info = b.get_stream("s").unwrap();
        let start = info.partitions[0].start_offset;
        assert!(start > 0, "retention moved the start: {info:?}");
        b.store().checkpoint().unwrap();
        let bytes = b.get_stream("s").unwrap().partitions[0].bytes;
        assert!(
            (20_000..20_000 + 4_096 + 512).contains(&bytes),
            "between the limit and the limit plus a segment: {bytes}"
        );
        let err = b.fetch("s", 0, 0, 1 << 20, 0).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::OffsetOutOfRange);
        assert!(err.message.contains("retention"), "{}", err.message);
        let (records, _, _) = b.fetch_records("s", 0, start, 1 << 20, 0).await.unwrap();
        assert_eq!(records[0].offset, start);
        assert_eq!(
            b.list_offset("s", 0, tidewater_core::broker::EARLIEST)
                .unwrap(),
            Some(start)
        );
        // A consumer whose position was deleted goes on from the start.
        let got = b.consumer_fetch("g", &member, 1 << 20, 0).await.unwrap();
        assert_eq!(got[0].record.offset, start);
    });
    let start_before =
        rt.block_on(async { h.broker().get_stream("s").unwrap().partitions[0].start_offset });
    h.restart();
    rt.block_on(async {
        let b = h.broker();
        assert_eq!(
            b.get_stream("s").unwrap().partitions[0].start_offset,
            start_before,
            "the start survives a restart"
        );
        // By age: everything sealed is older than a second once ten have passed.
        b.put_stream(
            "s",
            &StreamPatch {
                retention_ms: Some(1_000),
                retention_bytes: Some(-1),
                ..StreamPatch::default()
            },
        )
        .await
        .unwrap();
        h.advance(10_000).await;
        let info = b.get_stream("s").unwrap();
        let part = &info.partitions[0];
        assert!(part.start_offset > start_before, "{info:?}");
        assert!(
            part.start_offset < part.end_offset,
            "the active segment stays: {info:?}"
        );
        let counters = b.stream_counters();
        assert!(counters[0].1.deleted_records > 0, "{counters:?}");
    });
}
