//! Streams and consumer groups over the binary protocol: the Rust client's stream producer
//! and group consumer, and the frames themselves, against a real server.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tidewater_client::{
    Client, ClientError, ClientOptions, GroupConsumer, GroupConsumerOptions, Rebalance, Record,
    StreamProducerOptions,
};
use tidewater_format::kafka::{KafkaBatchBuilder, NewKafkaRecord, partition_for_key};
use tidewater_proto::{
    Ack, CommitOffset, DEFAULT_MAX_FRAME, FetchPartition, Frame, PROTOCOL_VERSION, StreamPartition,
    decode_frame,
};

use crate::binary::runtime;
use crate::support::Server;

fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    (dir, server)
}

fn client(server: &Server) -> Client {
    Client::new(
        &server.protocol,
        ClientOptions {
            request_timeout: Duration::from_secs(20),
            ..ClientOptions::default()
        },
    )
}

fn quick_group() -> GroupConsumerOptions {
    GroupConsumerOptions {
        session_timeout: Duration::from_secs(6),
        max_wait: Duration::from_millis(200),
        ..GroupConsumerOptions::default()
    }
}

/// The next record within 20 s (a test that hangs says which wait it was).
async fn next(consumer: &mut GroupConsumer) -> tidewater_client::StreamRecord {
    tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a record within 20 s")
        .expect("the consumer is open")
        .expect("no error")
}

#[test]
fn the_stream_producer_and_a_group_consumer_round_trip_every_record() {
    let (_dir, server) = server();
    server.ok(
        "PUT",
        "/v1/streams/readings",
        Some(json!({"partitions": 4})),
    );
    runtime().block_on(async {
        let client = client(&server);
        let producer = client.stream_producer("readings", StreamProducerOptions::default());
        let sends: Vec<_> = (0..5_000u32)
            .map(|i| {
                let mut record = Record::new(format!("reading {i}"))
                    .with_header("n", i.to_string())
                    .with_timestamp(1_000_000 + i64::from(i));
                match i % 3 {
                    0 => record = record.with_key(format!("sensor-{}", i % 10)),
                    1 => record = record.with_partition(i % 4),
                    _ => {} // keyless: sticky
                }
                producer.send(record)
            })
            .collect();
        let mut sent = BTreeMap::new();
        for (i, send) in sends.into_iter().enumerate() {
            let meta = send.await.unwrap();
            let i = i as u32;
            match i % 3 {
                0 => assert_eq!(
                    meta.partition,
                    partition_for_key(format!("sensor-{}", i % 10).as_bytes(), 4),
                    "a key goes where Kafka's partitioner puts it"
                ),
                1 => assert_eq!(meta.partition, i % 4),
                _ => {}
            }
            assert!(
                sent.insert((meta.partition, meta.offset), i).is_none(),
                "two records at {meta:?}"
            );
        }
        // Offsets are dense per partition: 0..n.
        for p in 0..4 {
            let offsets: Vec<u64> = sent.keys().filter(|(q, _)| *q == p).map(|k| k.1).collect();
            assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<_>>());
        }

        let assigned = Arc::new(Mutex::new(Vec::new()));
        let seen_events = assigned.clone();
        let mut consumer = client.group_consumer(
            "billing",
            &["readings"],
            GroupConsumerOptions {
                on_rebalance: Some(Arc::new(move |event: &Rebalance| {
                    seen_events.lock().unwrap().push(event.clone());
                })),
                ..quick_group()
            },
        );
        let mut last_offset: BTreeMap<u32, u64> = BTreeMap::new();
        for _ in 0..5_000 {
            let record = next(&mut consumer).await;
            let i = sent[&(record.partition, record.offset)];
            assert_eq!(&*record.stream, "readings");
            assert_eq!(
                record.value.as_deref(),
                Some(format!("reading {i}").as_bytes())
            );
            assert_eq!(record.timestamp, 1_000_000 + i64::from(i));
            assert_eq!(record.headers.len(), 1);
            assert_eq!(
                record.headers[0].1.as_deref(),
                Some(i.to_string().as_bytes())
            );
            if i % 3 == 0 {
                assert_eq!(
                    record.key.as_deref(),
                    Some(format!("sensor-{}", i % 10).as_bytes())
                );
            }
            if let Some(last) = last_offset.insert(record.partition, record.offset) {
                assert_eq!(record.offset, last + 1, "in order, none skipped");
            }
        }
        assert_eq!(
            *assigned.lock().unwrap(),
            vec![Rebalance::Assigned(
                (0..4).map(|p| ("readings".to_string(), p)).collect()
            )]
        );
        consumer.close().await.unwrap();
    });
    // close() committed everything: the group's lag is 0.
    let group = server.ok("GET", "/v1/groups/billing", None);
    let offsets = group["offsets"].as_array().unwrap();
    assert_eq!(offsets.len(), 4, "{group}");
    for o in offsets {
        assert_eq!(o["lag"], 0, "{group}");
    }
    assert_eq!(group["members"].as_array().unwrap().len(), 0, "it left");
}

#[test]
fn group_members_share_partitions_and_a_survivor_continues_from_commits() {
    let (_dir, server) = server();
    server.ok("PUT", "/v1/streams/jobs", Some(json!({"partitions": 4})));
    runtime().block_on(async {
        let client = client(&server);
        let mut a = client.group_consumer("workers", &["jobs"], quick_group());
        let mut b = client.group_consumer("workers", &["jobs"], quick_group());
        // Wait until the group settled: 2 partitions each.
        let settled = async {
            loop {
                let (x, y) = (a.assignment(), b.assignment());
                if x.len() == 2 && y.len() == 2 {
                    return (x, y);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (x, y) = tokio::time::timeout(Duration::from_secs(30), settled)
            .await
            .expect("the group settles");
        let (x, y): (BTreeSet<_>, BTreeSet<_>) = (x.into_iter().collect(), y.into_iter().collect());
        assert!(x.is_disjoint(&y), "{x:?} {y:?}");

        let producer = client.stream_producer("jobs", StreamProducerOptions::default());
        let sends: Vec<_> = (0..2_000)
            .map(|i| producer.send(Record::new(format!("job {i}")).with_key(format!("k{i}"))))
            .collect();
        for send in sends {
            send.await.unwrap();
        }
        let mut got = BTreeSet::new();
        let mut from_a = 0;
        while got.len() < 2_000 {
            tokio::select! {
                r = next(&mut a) => {
                    assert!(x.contains(&(r.stream.to_string(), r.partition)));
                    assert!(got.insert((r.partition, r.offset)), "twice: {r:?}");
                    from_a += 1;
                }
                r = next(&mut b) => {
                    assert!(y.contains(&(r.stream.to_string(), r.partition)));
                    assert!(got.insert((r.partition, r.offset)), "twice: {r:?}");
                }
            }
        }
        assert!(
            from_a > 0 && from_a < 2_000,
            "both consumed: a took {from_a}"
        );
        a.commit().await.unwrap();
        a.close().await.unwrap();
        b.commit().await.unwrap();
        // b takes a's partitions over and starts each where a committed.
        let taken = async {
            while b.assignment().len() < 4 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), taken)
            .await
            .expect("the survivor takes every partition");
        let sends: Vec<_> = (0..400)
            .map(|i| producer.send(Record::new(format!("late {i}")).with_key(format!("k{i}"))))
            .collect();
        for send in sends {
            send.await.unwrap();
        }
        for _ in 0..400 {
            let r = next(&mut b).await;
            assert!(
                r.value.as_deref().unwrap().starts_with(b"late "),
                "nothing consumed and committed comes again: {r:?}"
            );
        }
        b.close().await.unwrap();
    });
}

#[test]
fn a_consumer_seeks_by_offset_and_by_time() {
    let (_dir, server) = server();
    server.ok("PUT", "/v1/streams/ticks", Some(json!({"partitions": 1})));
    runtime().block_on(async {
        let client = client(&server);
        let producer = client.stream_producer("ticks", StreamProducerOptions::default());
        for i in 0..100i64 {
            producer
                .send(Record::new(format!("t{i}")).with_timestamp(10_000 + i * 10))
                .await
                .unwrap();
        }
        let mut consumer = client.group_consumer(
            "readers",
            &["ticks"],
            GroupConsumerOptions {
                auto_commit: None,
                ..quick_group()
            },
        );
        assert_eq!(next(&mut consumer).await.offset, 0);
        consumer.seek("ticks", 0, 90).unwrap();
        assert_eq!(next(&mut consumer).await.offset, 90);
        consumer.seek_to_time(10_000 + 42 * 10 - 5).await.unwrap();
        let r = next(&mut consumer).await;
        assert_eq!((r.offset, r.timestamp), (42, 10_420));
        assert!(matches!(
            consumer.seek("ticks", 7, 0),
            Err(ClientError::Server { ref code, .. }) if code == "partition_not_assigned"
        ));
        // Without auto-commit nothing was committed until commit().
        let group = server.ok("GET", "/v1/groups/readers", None);
        assert_eq!(group["offsets"].as_array().unwrap().len(), 0, "{group}");
        consumer.commit().await.unwrap();
        let group = server.ok("GET", "/v1/groups/readers", None);
        assert_eq!(group["offsets"][0]["committed"], 43, "{group}");
        consumer.close().await.unwrap();
    });
}

/// A raw connection: frames in, frames out, in order.
struct Raw(std::net::TcpStream, Vec<u8>);

impl Raw {
    fn connect(addr: &str) -> Raw {
        let mut raw = Raw(std::net::TcpStream::connect(addr).unwrap(), Vec::new());
        let reply = raw.call(&Frame::Hello {
            version: PROTOCOL_VERSION,
            client: "raw".into(),
            credentials: String::new(),
        });
        assert!(matches!(reply, Frame::HelloOk { .. }), "{reply:?}");
        raw
    }

    fn call(&mut self, frame: &Frame) -> Frame {
        let mut out = Vec::new();
        frame.encode(1, &mut out);
        self.0.write_all(&out).unwrap();
        self.0
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        loop {
            if let Some((frame, _, used)) = decode_frame(&self.1, DEFAULT_MAX_FRAME).unwrap() {
                self.1.drain(..used);
                return frame;
            }
            let mut buf = [0u8; 65536];
            let n = self.0.read(&mut buf).unwrap();
            assert!(n > 0, "the server closed the connection");
            self.1.extend_from_slice(&buf[..n]);
        }
    }
}

fn code(frame: &Frame) -> &str {
    match frame {
        Frame::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn batch(values: &[&str]) -> Vec<u8> {
    let mut builder = KafkaBatchBuilder::new();
    for v in values {
        builder.push(&NewKafkaRecord {
            value: Some(v.as_bytes()),
            timestamp: 5_000,
            ..NewKafkaRecord::default()
        });
    }
    builder.finish()
}

#[test]
fn stream_frames_refuse_bad_input_with_codes_and_keep_the_connection() {
    let (_dir, server) = server();
    server.ok("PUT", "/v1/streams/s", Some(json!({"partitions": 2})));
    let mut raw = Raw::connect(&server.protocol);
    let produce = |partition: u32, batch: Vec<u8>| Frame::StreamProduce {
        stream: "s".into(),
        partition,
        ack: Ack::Durable,
        batch,
    };
    assert_eq!(
        raw.call(&produce(1, batch(&["a", "b"]))),
        Frame::Produced {
            base_offset: 0,
            count: 2
        }
    );
    let mut corrupt = batch(&["c"]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    assert_eq!(code(&raw.call(&produce(1, corrupt))), "invalid_message");
    assert_eq!(
        code(&raw.call(&produce(1, vec![1, 2, 3]))),
        "invalid_message"
    );
    assert_eq!(
        code(&raw.call(&produce(2, batch(&["x"])))),
        "partition_not_found"
    );
    // A compacted stream refuses a batch with a keyless record, as HTTP does.
    server.ok(
        "PUT",
        "/v1/streams/table",
        Some(json!({"cleanup": "compact"})),
    );
    let keyless = Frame::StreamProduce {
        stream: "table".into(),
        partition: 0,
        ack: Ack::Durable,
        batch: batch(&["no key"]),
    };
    let refused = raw.call(&keyless);
    assert_eq!(code(&refused), "invalid_message", "{refused:?}");
    let fetch = |offset: u64| Frame::Fetch {
        wait_ms: 0,
        max_bytes: 1 << 20,
        partitions: vec![
            FetchPartition {
                stream: "s".into(),
                partition: 1,
                offset,
                max_bytes: 1 << 20,
            },
            FetchPartition {
                stream: "nope".into(),
                partition: 0,
                offset: 0,
                max_bytes: 1 << 20,
            },
        ],
    };
    let Frame::Fetched { partitions } = raw.call(&fetch(1)) else {
        panic!("not Fetched")
    };
    assert_eq!(partitions[0].code, "");
    assert_eq!(partitions[0].end_offset, 2);
    assert!(!partitions[0].records.is_empty(), "the stored batch");
    assert_eq!(partitions[1].code, "stream_not_found");
    let Frame::Fetched { partitions } = raw.call(&fetch(3)) else {
        panic!("not Fetched")
    };
    assert_eq!(partitions[0].code, "offset_out_of_range");
    assert_eq!(
        raw.call(&Frame::ListOffset {
            stream: "s".into(),
            partition: 1,
            at: -1
        }),
        Frame::Offset { offset: Some(2) }
    );
    assert_eq!(
        raw.call(&Frame::ListOffset {
            stream: "s".into(),
            partition: 1,
            at: 6_000
        }),
        Frame::Offset { offset: None },
        "no record that late"
    );
    // Only a member that owns a partition commits it; nobody outside a live group does.
    let Frame::Joined { member, .. } = raw.call(&Frame::JoinGroup {
        group: "g".into(),
        instance: String::new(),
        session_timeout_ms: 30_000,
        streams: vec!["s".into()],
    }) else {
        panic!("not Joined")
    };
    let commit = |member: &str| Frame::Commit {
        group: "g".into(),
        member: member.into(),
        offsets: vec![CommitOffset {
            stream: "s".into(),
            partition: 1,
            offset: 1,
            metadata: String::new(),
        }],
    };
    assert_eq!(
        code(&raw.call(&commit(&member))),
        "unknown_member",
        "not handed yet"
    );
    assert_eq!(code(&raw.call(&commit(""))), "unknown_member");
    let Frame::Assignment { assigned, .. } = raw.call(&Frame::Heartbeat {
        group: "g".into(),
        member: member.clone(),
        owned: vec![],
    }) else {
        panic!("not Assignment")
    };
    assert_eq!(assigned.len(), 2);
    assert_eq!(raw.call(&commit(&member)), Frame::Ok);
    assert_eq!(
        raw.call(&Frame::FetchCommitted {
            group: "g".into(),
            partitions: vec![StreamPartition {
                stream: "s".into(),
                partition: 1
            }],
        }),
        Frame::Committed {
            offsets: vec![tidewater_proto::CommittedOffset {
                stream: "s".into(),
                partition: 1,
                offset: Some(1),
                metadata: String::new(),
            }]
        }
    );
    assert_eq!(
        raw.call(&Frame::LeaveGroup {
            group: "g".into(),
            member: member.clone()
        }),
        Frame::Ok
    );
    assert_eq!(
        code(&raw.call(&commit(&member))),
        "unknown_member",
        "it left"
    );
    assert_eq!(
        raw.call(&commit("")),
        Frame::Ok,
        "an empty group takes outside commits"
    );
}

/// A compacted partition's batches span offsets whose records are gone (emptied batches,
/// a group's trailing empty batch): the group consumer goes on past them to each key's
/// latest record (it used to fetch an empty batch for ever).
#[test]
fn a_group_consumer_reads_across_the_gaps_of_a_compacted_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), Some(crate::support::COMPACTING));
    server.ok(
        "PUT",
        "/v1/streams/prices",
        Some(json!({"cleanup": "compact", "min_dirty_ratio": 0.1})),
    );
    for round in 0..40 {
        server.produce_round("prices", round);
    }
    server.wait_for_compaction("prices");
    server.produce_round("prices", 40);
    runtime().block_on(async {
        let client = client(&server);
        let mut consumer = client.group_consumer(
            "readers",
            &["prices"],
            GroupConsumerOptions {
                max_partition_bytes: 1,
                ..quick_group()
            },
        );
        let mut latest: BTreeMap<String, String> = BTreeMap::new();
        let mut last_offset = None;
        while latest.values().filter(|v| v.starts_with("40:")).count() < 10 {
            let r = next(&mut consumer).await;
            assert!(
                last_offset < Some(r.offset),
                "offsets rise: {:?} then {}",
                last_offset,
                r.offset
            );
            last_offset = Some(r.offset);
            let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            let value = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
            latest.insert(key, value);
        }
        consumer.close().await.unwrap();
    });
}
