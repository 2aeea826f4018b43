//! Writes small valid inputs for each fuzz target into `<dir>/<target>/` (the seed
//! corpora), made by the real encoders so they follow the formats as they are today.
//! Usage: tidewater-fuzz-seeds <corpus dir>

use std::path::Path;

use tidewater_core::Limits;
use tidewater_core::config::QueueConfig;
use tidewater_core::receipt::Receipt;
use tidewater_format::kafka::{KafkaBatchBuilder, NewKafkaRecord, stamp_kafka_batch};
use tidewater_format::{BatchBuilder, NewRecord, Record, stamp_batch};
use tidewater_proto::{Ack, DeliverWriter, Frame, Receipts};
use tidewater_storage::LogState;
use tidewater_storage::fuzzing::encode_checkpoint;
use tidewater_storage::journal::{Entry, encode_entry};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

/// Checksums are valid, so seeds start with an even mode byte (no repair needed), and
/// again with an odd one (the fuzzer's mutations get repaired).
fn write_both(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    for (mode, suffix) in [(0u8, "raw"), (1u8, "repair")] {
        let mut seed = vec![mode];
        seed.extend_from_slice(bytes);
        write(dir, target, &format!("{name}-{suffix}"), &seed);
    }
}

fn batch(log_uid: u64, base_offset: u64) -> Vec<u8> {
    let mut builder = BatchBuilder::new(log_uid, 1_700_000_000_000);
    builder.push(&NewRecord {
        id: b"order-1",
        body: b"hello",
        ..Default::default()
    });
    builder.push(&NewRecord {
        id: &[7; 16],
        generated_id: true,
        key: Some(b"customer-9"),
        headers: vec![
            (b"tidewater-tenant", b"acme"),
            (b"tidewater-priority", b"3"),
        ],
        deliver_at_ms: 1_700_000_005_000,
        body: &[0, 1, 2, 255],
    });
    let mut batch = builder.finish();
    stamp_batch(&mut batch, base_offset);
    batch
}

fn kafka_batch(base_offset: u64) -> Vec<u8> {
    let mut builder = KafkaBatchBuilder::new();
    let headers: [(&[u8], Option<&[u8]>); 2] = [(b"trace", Some(b"t-1")), (b"none", None)];
    builder.push(&NewKafkaRecord {
        key: Some(b"sensor-4"),
        value: Some(b"21.5"),
        headers: &headers,
        timestamp: 1_700_000_000_000,
    });
    builder.push(&NewKafkaRecord {
        key: None,
        value: None,
        headers: &[],
        timestamp: 1_699_999_999_000,
    });
    let mut batch = builder.finish();
    stamp_kafka_batch(&mut batch, base_offset, None);
    batch
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: tidewater-fuzz-seeds <corpus dir>");
    let dir = Path::new(&dir);
    let s = |t: &str| t.to_string();
    let batch0 = batch(3, 0);
    let record = {
        let mut records = Vec::new();
        let header = tidewater_format::check_batch(&batch0).unwrap();
        tidewater_format::decode_records(&header, &batch0[48..], &mut records).unwrap();
        records.pop().unwrap()
    };
    let wire_record = |r: &Record| {
        let mut out = Vec::new();
        r.encode(&mut out);
        out
    };
    let receipt = Receipt {
        log_uid: 3,
        offset: 1,
        nonce: 0xfeed,
    }
    .encode();

    // proto: one file per frame kind, and one with every frame pipelined.
    let frames = vec![
        Frame::Hello {
            version: 1,
            client: s("seed"),
            credentials: s("twseed.secret"),
        },
        Frame::Produce {
            queue: s("orders"),
            ack: Ack::Durable,
            batch: batch(0, 0),
        },
        Frame::Subscribe {
            queue: s("orders"),
            lease_ms: 30_000,
            credit: 100,
        },
        Frame::Credit {
            subscription: 0x8000_0001,
            credit: 50,
        },
        Frame::Ack {
            queue: s("orders"),
            receipts: vec![receipt.clone(), s("x")].into(),
        },
        Frame::Nack {
            queue: s("orders"),
            delay_ms: -1,
            error: s("boom"),
            receipts: Receipts::from(vec![receipt.clone()]),
            overloaded: true,
        },
        Frame::Extend {
            queue: s("orders"),
            lease_ms: 0,
            receipts: vec![receipt.clone()].into(),
        },
        Frame::Unsubscribe {
            subscription: 0x8000_0001,
        },
        Frame::Ping,
        Frame::HelloOk {
            version: 1,
            max_frame: 64 << 20,
            server: s("tidewater"),
        },
        Frame::Produced {
            base_offset: 0,
            count: 2,
        },
        Frame::Subscribed {
            subscription: 0x8000_0001,
        },
        Frame::Settled {
            ok: 1,
            failed: vec![tidewater_proto::Failure {
                index: 1,
                code: s("invalid_receipt"),
            }],
        },
        Frame::Throttle {
            retry_after_ms: 250,
            code: s("queue_full"),
            message: s("full"),
        },
        Frame::Error {
            code: s("invalid_frame"),
            message: s("bad"),
        },
        Frame::Pong,
        Frame::Ok,
    ];
    let mut all = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        let mut one = Vec::new();
        frame.encode(i as u32 + 1, &mut one);
        write(dir, "proto", &format!("frame-{:02x}", frame.kind()), &one);
        all.extend_from_slice(&one);
    }
    let mut deliver = DeliverWriter::new(0x8000_0001, 0);
    deliver.push(&receipt, 1, record.offset, record.published_at_ms, |b| {
        record.encode(b)
    });
    let deliver = deliver.finish();
    write(dir, "proto", "frame-84", &deliver);
    all.extend_from_slice(&deliver);
    write(dir, "proto", "pipelined", &all);

    // batch: one batch, two batches back to back (a segment), a lone record.
    write_both(dir, "batch", "one", &batch0);
    let mut segment = batch0.clone();
    segment.extend_from_slice(&batch(3, 2));
    write_both(dir, "batch", "segment", &segment);
    write_both(dir, "batch", "record", &wire_record(&record));

    // kafka: one batch, a record set of two, an empty one.
    let kafka = kafka_batch(10);
    write_both(dir, "kafka", "one", &kafka);
    let mut set = kafka.clone();
    set.extend_from_slice(&kafka_batch(12));
    write_both(dir, "kafka", "two", &set);
    write_both(dir, "kafka", "empty", &KafkaBatchBuilder::new().finish());
    kafka_request_seeds(dir);

    // journal: every entry kind, in an order replay accepts.
    let entries = [
        Entry::CreateLog {
            uid: 3,
            name: "orders",
            config: "{}",
        },
        Entry::IdWindow {
            uid: 3,
            window_ms: 300_000,
            max: 1_000,
        },
        Entry::Data { batch: &batch0 },
        Entry::Settle {
            uid: 3,
            ranges: vec![0..1],
        },
        Entry::Retry {
            uid: 3,
            offset: 1,
            deliver_at_ms: 1_700_000_010_000,
            delivery_count: 2,
            at_ms: 1_700_000_009_000,
            error: "timeout",
        },
        Entry::UpdateConfig {
            uid: 3,
            config: "{\"lease_ms\":5000}",
        },
        Entry::CreateView {
            uid: 4,
            name: "#sub/orders/billing/0",
            source: 3,
            floor: 1,
        },
        Entry::Settle {
            uid: 4,
            ranges: vec![1..2],
        },
        Entry::DeleteLog { uid: 4 },
        Entry::DeleteLog { uid: 3 },
    ];
    let mut journal = Vec::new();
    for entry in &entries {
        encode_entry(&mut journal, entry);
    }
    write_both(dir, "journal", "every-kind", &journal);

    // checkpoint: a log with settled ranges, retries and remembered ids.
    let mut state = LogState::new(3, s("orders"), s("{}"));
    state.next_offset = 100;
    state.settle(&[0..10, 20..30]);
    state.record_retry(15, 99, 3, 98, "boom");
    state.recent_ids.set_window(300_000, 1_000);
    state.recent_ids.remember_batch(&batch(3, 98));
    let empty = LogState::new(4, s("orders-dlq"), s("{}"));
    write_both(
        dir,
        "checkpoint",
        "two-logs",
        &encode_checkpoint(5, &[&state, &empty]),
    );
    write_both(dir, "checkpoint", "empty", &encode_checkpoint(1, &[]));
    // A view (version 04): a subscription's state over the log above.
    let mut view = LogState::new(6, s("#sub/orders/billing/0"), String::new());
    view.source = Some(3);
    view.next_offset = 100;
    view.settle(&[0..40]);
    view.record_retry(41, 99, 2, 98, "timeout");
    let mut with_view = encode_checkpoint(7, &[&state, &view]);
    if with_view.len() % 2 == 0 {
        // The repaired seed keeps version 04 (see `repair_checkpoint`).
        view.config = s(" ");
        with_view = encode_checkpoint(7, &[&state, &view]);
    }
    write_both(dir, "checkpoint", "view", &with_view);

    // receipt
    write(dir, "receipt", "valid", receipt.as_bytes());
    write(dir, "receipt", "raw", &[1u8; 24]);

    // webhook: a preset byte, header lines, an empty line, the body (fuzz_targets/webhook.rs).
    let webhooks: [(&str, u8, &str, &str); 5] = [
        (
            "github",
            0,
            "X-Hub-Signature-256: sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17\nX-GitHub-Delivery: 72d3162e\nX-Key: push",
            "Hello, World!",
        ),
        (
            "stripe",
            1,
            "Stripe-Signature: t=1614265330,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd,v1=00",
            r#"{"id": "evt_1", "object": "event"}"#,
        ),
        (
            "slack",
            2,
            "X-Slack-Signature: v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503\nX-Slack-Request-Timestamp: 1614265330",
            r#"{"type": "url_verification", "challenge": "c", "event_id": "Ev1"}"#,
        ),
        (
            "standard",
            3,
            "webhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek\nwebhook-timestamp: 1614265330\nwebhook-signature: v1,bm9ub3RoZXJzaWc= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            r#"{"test": 2432232314}"#,
        ),
        ("hmac", 4, "X-Sig: sha256=aGVsbG8=\nx-a: kept", "body"),
    ];
    for (name, preset, headers, body) in webhooks {
        let mut seed = vec![preset];
        seed.extend_from_slice(headers.as_bytes());
        seed.extend_from_slice(b"\n\n");
        seed.extend_from_slice(body.as_bytes());
        write(dir, "webhook", name, &seed);
    }

    // json: every request body, and a full queue configuration.
    let limits = Limits::default();
    let full = QueueConfig {
        quota: serde_json::from_str(
            r#"{"msgs_per_s": 100, "tenants": {"acme": {"burst_msgs": 5}}}"#,
        )
        .unwrap(),
        fairness: serde_json::from_str(r#"{"by": "header:region", "weights": {"eu": 2.5}}"#)
            .unwrap(),
        coalesce: serde_json::from_str(r#"{"window_ms": 100, "mode": "merge"}"#).unwrap(),
        dispatch_rate: serde_json::from_str(r#"{"per_s": 10.5, "burst": 3}"#).unwrap(),
        adaptive: serde_json::from_str(r#"{"min_per_s": 1, "max_per_s": 100}"#).unwrap(),
        key_concurrency: Some(1),
        ttl_ms: Some(60_000),
        ..QueueConfig::defaults_for("orders", &limits)
    };
    let bodies = [
        (
            "publish",
            format!(
                r#"{{"messages": [{{"body": "hi", "key": "k", "headers": {{"a": "b"}}, "delay_ms": 5, "id": "x", "jitter_ms": 3, "ttl_ms": 9, "tenant": "t", "priority": 1}}, {{"body_base64": "AAEC", "deliver_at": 1700000000000}}], "ack": "written", "tenant": "acme"}}"#
            ),
        ),
        (
            "receive",
            s(r#"{"max": 10, "wait_ms": 1000, "lease_ms": 30000}"#),
        ),
        (
            "nack",
            format!(
                r#"{{"receipts": ["{receipt}"], "delay_ms": 5, "error": "boom", "reason": "overloaded"}}"#
            ),
        ),
        (
            "extend",
            format!(r#"{{"receipts": ["{receipt}"], "lease_ms": 60000}}"#),
        ),
        (
            "redrive",
            s(
                r#"{"to": "orders", "rate_per_s": 100, "max": 10, "filter": {"key": "k", "error_contains": "boom"}}"#,
            ),
        ),
        (
            "patch",
            s(
                r#"{"lease_ms": 5000, "backoff": {"multiplier": 1.5}, "dead_letter_queue": null, "quota": {"bytes_per_s": 1e6}, "ttl_ms": null, "on_expire": "dead_letter", "priority_levels": 3, "priority_min_share": 0.2}"#,
            ),
        ),
        ("config", serde_json::to_string(&full).unwrap()),
        ("limits", serde_json::to_string(&limits).unwrap()),
    ];
    for (name, body) in &bodies {
        write(dir, "json", name, body.as_bytes());
    }

    // publish: a JSON publish body (first byte even) and a client-built batch (odd).
    let mut json = vec![0u8];
    json.extend_from_slice(bodies[0].1.as_bytes());
    write(dir, "publish", "json", &json);
    let mut produce = vec![1u8];
    produce.extend_from_slice(&batch(0, 0));
    write(dir, "publish", "batch", &produce);
}

/// kafka_request: request frames as Kafka clients send them (even first byte), and record
/// sets with each codec (odd first byte).
fn kafka_request_seeds(dir: &Path) {
    use bytes::{Bytes, BytesMut};
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::{Encodable, StrBytes};
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    fn frame<R: Encodable>(api: ApiKey, version: i16, req: &R) -> Vec<u8> {
        let mut header = RequestHeader::default();
        header.request_api_key = api as i16;
        header.request_api_version = version;
        header.correlation_id = 7;
        header.client_id = Some(StrBytes::from_static_str("seed"));
        let mut buf = BytesMut::new();
        header
            .encode(&mut buf, api.request_header_version(version))
            .unwrap();
        req.encode(&mut buf, version).unwrap();
        let mut out = vec![0u8];
        out.extend_from_slice(&buf);
        out
    }
    let records: Vec<Record> = (0..5)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: 1000,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset: i,
            sequence: i as i32,
            timestamp: 1_700_000_000_000 + i,
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(Bytes::from(format!("value-{i}"))),
            headers: Default::default(),
        })
        .collect();
    let mut sets = Vec::new();
    for (name, compression) in [
        ("none", Compression::None),
        ("gzip", Compression::Gzip),
        ("snappy", Compression::Snappy),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd),
    ] {
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .unwrap();
        let mut seed = vec![1u8];
        seed.extend_from_slice(&buf);
        write(dir, "kafka_request", &format!("set-{name}"), &seed);
        sets.push(buf.freeze());
    }
    let mut part = produce_request::PartitionProduceData::default();
    part.index = 0;
    part.records = Some(sets[3].clone());
    let mut topic = produce_request::TopicProduceData::default();
    topic.name = TopicName(StrBytes::from_static_str("orders"));
    topic.partition_data = vec![part];
    let mut produce = ProduceRequest::default();
    produce.acks = -1;
    produce.topic_data = vec![topic];
    write(
        dir,
        "kafka_request",
        "produce-v9",
        &frame(ApiKey::Produce, 9, &produce),
    );
    write(
        dir,
        "kafka_request",
        "produce-v3",
        &frame(ApiKey::Produce, 3, &produce),
    );
    let mut metadata = MetadataRequest::default();
    metadata.topics = None;
    write(
        dir,
        "kafka_request",
        "metadata-v12",
        &frame(ApiKey::Metadata, 12, &metadata),
    );
    write(
        dir,
        "kafka_request",
        "metadata-v1",
        &frame(ApiKey::Metadata, 1, &metadata),
    );
    write(
        dir,
        "kafka_request",
        "apiversions-v3",
        &frame(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default()),
    );
    let mut fp = fetch_request::FetchPartition::default();
    fp.fetch_offset = 10;
    fp.partition_max_bytes = 1 << 20;
    let mut ft = fetch_request::FetchTopic::default();
    ft.topic = TopicName(StrBytes::from_static_str("orders"));
    ft.partitions = vec![fp];
    let mut fetch = FetchRequest::default();
    fetch.replica_id = BrokerId(-1);
    fetch.max_wait_ms = 500;
    fetch.topics = vec![ft];
    write(
        dir,
        "kafka_request",
        "fetch-v12",
        &frame(ApiKey::Fetch, 12, &fetch),
    );
    let mut join = JoinGroupRequest::default();
    join.group_id = GroupId(StrBytes::from_static_str("g"));
    join.session_timeout_ms = 45_000;
    join.rebalance_timeout_ms = 300_000;
    join.protocol_type = StrBytes::from_static_str("consumer");
    let mut p = join_group_request::JoinGroupRequestProtocol::default();
    p.name = StrBytes::from_static_str("range");
    p.metadata = Bytes::from_static(&[0, 1, 0, 0, 0, 1, 0, 6, b'o', b'r', b'd', b'e', b'r', b's']);
    join.protocols = vec![p];
    write(
        dir,
        "kafka_request",
        "joingroup-v9",
        &frame(ApiKey::JoinGroup, 9, &join),
    );
    let mut hb = ConsumerGroupHeartbeatRequest::default();
    hb.group_id = GroupId(StrBytes::from_static_str("g"));
    hb.member_id = StrBytes::from_static_str("m");
    hb.subscribed_topic_names = Some(vec![TopicName(StrBytes::from_static_str("orders"))]);
    write(
        dir,
        "kafka_request",
        "consumerheartbeat-v1",
        &frame(ApiKey::ConsumerGroupHeartbeat, 1, &hb),
    );
}
