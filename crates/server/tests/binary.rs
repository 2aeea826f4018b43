//! The binary protocol and the Rust client against a real server.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::json;
use tidewater_client::{
    BreakerState, Client, ClientError, ClientOptions, ConsumerOptions, Message, ProducerOptions,
};
use tidewater_proto::{DEFAULT_MAX_FRAME, Frame, PROTOCOL_VERSION, decode_frame};

use crate::support::{Server, free_port};

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), None);
    (dir, server)
}

fn quick_options() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

#[test]
fn the_client_publishes_and_consumes_end_to_end() {
    let (_dir, server) = server();
    server.create_queue("events", json!({}));
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        client.ping().await.unwrap();
        let producer = client.producer("events", ProducerOptions::default());
        let sends: Vec<_> = (0..2_000)
            .map(|i| {
                let mut message = Message::new(format!("event {i}"))
                    .with_key(format!("k{}", i % 7))
                    .with_header("n", i.to_string());
                if i % 10 == 0 {
                    message = message.with_id(format!("mine-{i}"));
                }
                producer.send(message)
            })
            .collect();
        let mut ids = Vec::new();
        for send in sends {
            ids.push(send.await.unwrap());
        }
        assert_eq!(ids[10], "mine-10");
        assert_eq!(ids[1].len(), 32, "generated ids are 32 hex characters");

        let mut consumer = client.consumer(
            "events",
            ConsumerOptions {
                prefetch: 300,
                ..ConsumerOptions::default()
            },
        );
        let mut seen = Vec::new();
        while seen.len() < 2_000 {
            let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
                .await
                .expect("deliveries keep coming")
                .unwrap()
                .unwrap();
            let n: usize = delivery
                .headers
                .iter()
                .find(|(k, _)| k == "n")
                .unwrap()
                .1
                .parse()
                .unwrap();
            assert_eq!(delivery.body, format!("event {n}").into_bytes());
            assert_eq!(
                delivery.key.as_deref(),
                Some(format!("k{}", n % 7).as_str())
            );
            assert_eq!(delivery.delivery_count, 1);
            consumer.ack(&delivery);
            seen.push(delivery.id);
        }
        consumer.flush().await;
        assert_eq!(
            seen, ids,
            "first deliveries come in publish order (one producer batch stream, in order here)"
        );
        assert_eq!(
            client
                .stats()
                .ack_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    });
    let stats = server.stats("events");
    assert_eq!(
        (stats["total"].as_u64(), stats["acked"].as_u64()),
        (Some(0), Some(2_000))
    );
}

#[test]
fn nack_and_extend_work_through_the_client() {
    let (_dir, server) = server();
    server.create_queue("work", json!({"max_deliveries": 2}));
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        client
            .producer("work", ProducerOptions::default())
            .send(Message::new("poison"))
            .await
            .unwrap();
        let mut consumer = client.consumer(
            "work",
            ConsumerOptions {
                prefetch: 1,
                ..ConsumerOptions::default()
            },
        );
        let first = consumer.next().await.unwrap().unwrap();
        assert!(
            consumer
                .extend(&first, Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert!(
            consumer
                .nack(&first, Some(Duration::ZERO), "bad input")
                .await
                .unwrap()
        );
        assert!(
            !consumer.nack(&first, None, "again").await.unwrap(),
            "a receipt works once"
        );
        let second = consumer.next().await.unwrap().unwrap();
        assert_eq!(second.delivery_count, 2);
        assert!(
            consumer
                .nack(&second, Some(Duration::ZERO), "still bad")
                .await
                .unwrap()
        );
    });
    let dead = server.peek_all("work-dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["headers"]["tidewater-last-error"], "still bad");
}

/// A connection that has sent a hello of `version` (request id 1), reads time out in 10 s.
fn raw_connection(addr: &str, version: u16) -> (std::net::TcpStream, Vec<u8>) {
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    Frame::Hello {
        version,
        client: "raw".into(),
        credentials: String::new(),
    }
    .encode(1, &mut out);
    (stream, out)
}

/// Writes raw bytes on a fresh connection (after a proper hello) and reads until close.
fn raw_exchange(addr: &str, hello_version: u16, payload: &[u8]) -> Vec<Frame> {
    let (mut stream, mut out) = raw_connection(addr, hello_version);
    out.extend_from_slice(payload);
    stream.write_all(&out).unwrap();
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let mut frames = Vec::new();
    let mut at = 0;
    while let Ok(Some((frame, _, used))) = decode_frame(&bytes[at..], DEFAULT_MAX_FRAME) {
        frames.push(frame);
        at += used;
    }
    frames
}

fn error_code(frame: &Frame) -> &str {
    match frame {
        Frame::Error { code, .. } => code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn bad_frames_close_only_their_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), Some("max_frame_bytes = 4096\n"));
    server.create_queue("q", json!({}));
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        client
            .producer("q", ProducerOptions::default())
            .send(Message::new("before"))
            .await
            .unwrap();

        // Garbage: an unknown frame kind.
        let frames = raw_exchange(
            &server.protocol,
            PROTOCOL_VERSION,
            &[6, 0, 0, 0, 0x7f, 0, 1, 0, 0, 0],
        );
        assert!(matches!(frames[0], Frame::HelloOk { .. }));
        assert_eq!(error_code(&frames[1]), "invalid_frame");
        // A frame announcing more than max_frame_bytes.
        let frames = raw_exchange(
            &server.protocol,
            PROTOCOL_VERSION,
            &(1u32 << 20).to_le_bytes(),
        );
        assert_eq!(error_code(&frames[1]), "frame_too_large");
        // A server-only frame from a client.
        let mut pong = Vec::new();
        Frame::Pong.encode(5, &mut pong);
        let frames = raw_exchange(&server.protocol, PROTOCOL_VERSION, &pong);
        assert_eq!(error_code(&frames[1]), "invalid_frame");
        // A newer protocol version.
        let frames = raw_exchange(&server.protocol, PROTOCOL_VERSION + 1, &[]);
        assert_eq!(error_code(&frames[0]), "unsupported_version");
        // A batch with a broken CRC is a request error, not a connection error.
        let mut batch = tidewater_storage::BatchBuilder::new(0, 0);
        batch.push(&tidewater_storage::NewRecord {
            id: b"x",
            body: b"y",
            ..Default::default()
        });
        let mut batch = batch.finish();
        let last = batch.len() - 1;
        batch[last] ^= 1;
        let mut produce = Vec::new();
        Frame::Produce {
            queue: "q".into(),
            ack: tidewater_proto::Ack::Durable,
            batch,
        }
        .encode(9, &mut produce);
        Frame::Ping.encode(10, &mut produce);
        let mut stream = std::net::TcpStream::connect(&server.protocol).unwrap();
        let mut hello = Vec::new();
        Frame::Hello {
            version: PROTOCOL_VERSION,
            client: "raw".into(),
            credentials: String::new(),
        }
        .encode(1, &mut hello);
        stream.write_all(&hello).unwrap();
        stream.write_all(&produce).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let mut frames = Vec::new();
        while frames.len() < 3 {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed early");
            got.extend_from_slice(&buf[..n]);
            frames.clear();
            let mut at = 0;
            while let Ok(Some((frame, id, used))) = decode_frame(&got[at..], DEFAULT_MAX_FRAME) {
                frames.push((frame, id));
                at += used;
            }
        }
        let produce_reply = frames.iter().find(|(_, id)| *id == 9).unwrap();
        assert_eq!(error_code(&produce_reply.0), "invalid_message");
        assert!(
            frames.iter().any(|(f, id)| *id == 10 && *f == Frame::Pong),
            "the connection lives on"
        );

        // Nobody else noticed.
        client
            .producer("q", ProducerOptions::default())
            .send(Message::new("after"))
            .await
            .unwrap();
    });
    assert_eq!(server.stats("q")["total"], 2);
}

#[test]
fn throttle_replies_slow_the_producer_down_instead_of_failing_it() {
    let (_dir, server) = server();
    server.create_queue("narrow", json!({"max_messages": 10}));
    let url = server.url.clone();
    // A consumer over HTTP starts draining only once the broker has refused the producer.
    let drained = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = crate::support::metrics_text(&url);
            if text.contains("tidewater_refused_total{queue=\"narrow\",reason=\"queue_full\"}") {
                break;
            }
            assert!(Instant::now() < deadline, "the producer was never refused");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut total = 0;
        while total < 30 && Instant::now() < deadline {
            let (_, reply) = crate::support::call(
                &url,
                "POST",
                "/v1/queues/narrow/receive",
                Some(&json!({"max": 5, "wait_ms": 1000})),
            )
            .unwrap();
            let receipts: Vec<String> = reply["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["receipt"].as_str().unwrap().to_string())
                .collect();
            if !receipts.is_empty() {
                crate::support::call(
                    &url,
                    "POST",
                    "/v1/queues/narrow/ack",
                    Some(&json!({"receipts": receipts})),
                )
                .unwrap();
                total += receipts.len();
            }
        }
        total
    });
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        let producer = client.producer(
            "narrow",
            ProducerOptions {
                max_batch_messages: 5,
                max_in_flight_batches: 1,
                ..ProducerOptions::default()
            },
        );
        let sends: Vec<_> = (0..30)
            .map(|i| producer.send(Message::new(format!("m{i}"))))
            .collect();
        for send in sends {
            send.await.expect("throttled sends wait and succeed");
        }
        assert!(
            client
                .stats()
                .throttled
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0,
            "the broker must have throttled"
        );
    });
    assert_eq!(drained.join().unwrap(), 30);
}

#[test]
fn the_client_reconnects_after_a_server_restart() {
    let (_dir, mut server) = server();
    server.create_queue("r", json!({}));
    let rt = runtime();
    let client = Client::new(&server.protocol, quick_options());
    let producer = rt.block_on(async { client.producer("r", ProducerOptions::default()) });
    rt.block_on(producer.send(Message::new("before restart")))
        .unwrap();
    server.restart();
    rt.block_on(async {
        // The old connection is dead; the next send reconnects (with backoff) and succeeds.
        let id = producer.send(Message::new("after restart")).await.unwrap();
        assert_eq!(id.len(), 32);
        let mut consumer = client.consumer("r", ConsumerOptions::default());
        let mut bodies = Vec::new();
        for _ in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            consumer.ack(&d);
            bodies.push(String::from_utf8(d.body.to_vec()).unwrap());
        }
        consumer.flush().await;
        assert_eq!(bodies, ["before restart", "after restart"]);
    });
    assert!(
        client
            .stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[test]
fn the_circuit_breaker_opens_and_closes() {
    let dir = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port());
    let addr = format!("127.0.0.1:{}", ports.1);
    let opts = ClientOptions {
        breaker_failures: 2,
        breaker_open_for: Duration::from_millis(300),
        request_timeout: Duration::from_millis(200),
        reconnect_base: Duration::from_millis(1),
        reconnect_max: Duration::from_millis(10),
        ..ClientOptions::default()
    };
    let rt = runtime();
    let client = Client::new(&addr, opts);
    rt.block_on(async {
        assert!(client.ping().await.is_err(), "no server yet");
        assert_eq!(client.breaker_state(), BreakerState::Open);
        assert_eq!(
            client.ping().await,
            Err(ClientError::CircuitOpen),
            "fails fast while open"
        );
    });
    let _server = Server::start_on(&dir.path().join("data"), None, &[], ports);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if client.ping().await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "the breaker never closed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(client.breaker_state(), BreakerState::Closed);
    });
}

#[test]
fn closing_a_consumer_releases_what_it_never_handed_out() {
    let (_dir, server) = server();
    server.create_queue("c", json!({"lease_ms": 600000}));
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        let producer = client.producer("c", ProducerOptions::default());
        let sends: Vec<_> = (0..20)
            .map(|i| producer.send(Message::new(format!("m{i}"))))
            .collect();
        for send in sends {
            send.await.unwrap();
        }
        let mut consumer = client.consumer(
            "c",
            ConsumerOptions {
                prefetch: 10,
                ..ConsumerOptions::default()
            },
        );
        let first = consumer.next().await.unwrap().unwrap();
        consumer.ack(&first);
        // Wait until the broker pushed a full prefetch (10 leased) before closing.
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.stats("c")["in_flight"].as_u64().unwrap() < 9 {
            assert!(Instant::now() < deadline, "prefetch never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        consumer.close().await;
    });
    let stats = server.stats("c");
    assert_eq!(
        (
            stats["in_flight"].as_u64(),
            stats["total"].as_u64(),
            stats["acked"].as_u64()
        ),
        (Some(0), Some(19), Some(1))
    );

    // max_messages: a consumer that wants 3 never leases a 4th.
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        let opts = ConsumerOptions {
            prefetch: 10,
            max_messages: Some(3),
            ..ConsumerOptions::default()
        };
        let mut consumer = client.consumer("c", opts);
        for _ in 0..3 {
            let d = consumer.next().await.unwrap().unwrap();
            consumer.ack(&d);
        }
        consumer.flush().await;
        // Without the cap, the initial credit of 10 would have leased 7 more with the first 3.
        assert_eq!(
            server.stats("c")["in_flight"],
            0,
            "no delivery beyond max_messages"
        );
        consumer.close().await;
    });
    let stats = server.stats("c");
    assert_eq!(
        (stats["in_flight"].as_u64(), stats["total"].as_u64()),
        (Some(0), Some(16))
    );
}

#[test]
fn auto_extend_keeps_a_slow_handlers_lease() {
    let (_dir, server) = server();
    server.create_queue("slow", json!({"backoff": {"base_ms": 0, "max_ms": 0}}));
    let hold = Duration::from_millis(2_500);
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        client
            .producer("slow", ProducerOptions::default())
            .send(Message::new("big job"))
            .await
            .unwrap();

        // Without auto-extend, holding it for 2.5 leases loses it.
        let opts = ConsumerOptions {
            prefetch: 1,
            lease_ms: Some(1_000),
            max_messages: Some(1),
            ..ConsumerOptions::default()
        };
        let mut plain = client.consumer("slow", opts.clone());
        let first = plain.next().await.unwrap().unwrap();
        tokio::time::sleep(hold).await;
        plain.ack(&first);
        plain.flush().await;
        assert_eq!(
            client
                .stats()
                .ack_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the lease ran out"
        );
        plain.close().await;

        // With auto-extend, the same hold keeps the lease and the ack lands.
        let mut extended = client.consumer(
            "slow",
            ConsumerOptions {
                auto_extend: true,
                ..opts
            },
        );
        let second = extended.next().await.unwrap().unwrap();
        assert_eq!(second.delivery_count, 2);
        tokio::time::sleep(hold).await;
        extended.ack(&second);
        extended.flush().await;
        assert_eq!(
            client
                .stats()
                .ack_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "no new failure"
        );
        extended.close().await;
    });
    let stats = server.stats("slow");
    assert_eq!(
        (
            stats["total"].as_u64(),
            stats["acked"].as_u64(),
            stats["expired"].as_u64()
        ),
        (Some(0), Some(1), Some(1))
    );
}

#[test]
/// A batch whose messages ask for different ack levels goes out as one frame per level;
/// every message lands once.
fn mixed_ack_levels_split_into_frames_and_all_land() {
    let (_dir, server) = server();
    server.create_queue("mixed", json!({}));
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        let producer = client.producer("mixed", ProducerOptions::default());
        let sends: Vec<_> = (0..10)
            .map(|i| {
                let message = Message::new(format!("m{i}"));
                producer.send(if i % 2 == 0 {
                    message.with_ack(tidewater_proto::Ack::Written)
                } else {
                    message
                })
            })
            .collect();
        for send in sends {
            send.await.unwrap();
        }
    });
    // Peek shows durable messages only, and the `Written` ones were acknowledged before
    // their fsync: wait (bounded) for the group commit that follows.
    let mut sorted = Vec::new();
    for _ in 0..200 {
        sorted = server
            .peek_all("mixed")
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_string())
            .collect::<Vec<_>>();
        if sorted.len() == 10 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    sorted.sort();
    assert_eq!(sorted, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

#[test]
fn acks_are_split_below_the_servers_request_limit() {
    let (_dir, server) = server();
    server.create_queue("many", json!({}));
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        let producer = client.producer("many", ProducerOptions::default());
        let sends: Vec<_> = (0..12_000)
            .map(|i| producer.send(Message::new(format!("m{i}"))))
            .collect();
        for send in sends {
            send.await.unwrap();
        }
        // More than the server's 10,000 receipts per request, asked for in one batch.
        let mut consumer = client.consumer(
            "many",
            ConsumerOptions {
                prefetch: 12_000,
                ack_batch: 20_000,
                ack_linger: Duration::from_secs(5),
                ..ConsumerOptions::default()
            },
        );
        for _ in 0..12_000 {
            let delivery = consumer.next().await.unwrap().unwrap();
            consumer.ack(&delivery);
        }
        consumer.close().await;
        assert_eq!(
            client
                .stats()
                .ack_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    });
    assert_eq!(server.stats("many")["total"], 0);
}

/// A Settled reply names each refused receipt by its place in the request (receipts are
/// decoded into one buffer and failures matched in order).
#[test]
fn settled_replies_index_the_refused_receipts() {
    let (_dir, server) = server();
    server.create_queue("q", json!({}));
    server.publish("q", json!([{"body": "a"}, {"body": "b"}]));
    let receipts: Vec<String> = server
        .receive("q", 2, 0, None)
        .iter()
        .map(|m| m["receipt"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(receipts.len(), 2);
    let (mut stream, mut out) = raw_connection(&server.protocol, PROTOCOL_VERSION);
    let asked = [&receipts[0], "not-a-receipt", &receipts[1], &receipts[0]];
    Frame::Ack {
        queue: "q".into(),
        receipts: asked.into_iter().collect(),
    }
    .encode(2, &mut out);
    stream.write_all(&out).unwrap();
    let mut bytes = Vec::new();
    let mut frames = Vec::new();
    while frames.len() < 2 {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the server closed the connection: {frames:?}");
        bytes.extend_from_slice(&chunk[..n]);
        while let Ok(Some((frame, _, used))) = decode_frame(&bytes, DEFAULT_MAX_FRAME) {
            frames.push(frame);
            bytes.drain(..used);
        }
    }
    let Frame::Settled { ok, failed } = &frames[1] else {
        panic!("expected Settled, got {:?}", frames[1]);
    };
    assert_eq!(*ok, 2);
    let failed: Vec<(u32, &str)> = failed.iter().map(|f| (f.index, f.code.as_str())).collect();
    // The repeat of the first receipt is stale: its lease ended with the first ack.
    assert_eq!(failed, [(1, "invalid_receipt"), (3, "stale_receipt")]);
}

/// A subscription is consumed through the binary protocol by its `stream/subscription` name
/// (today's frames, unchanged): every record once, each subscription on its own.
#[test]
fn the_client_consumes_a_subscription_by_its_stream_and_name() {
    let (_dir, server) = server();
    server.ok("PUT", "/v1/streams/events", Some(json!({"partitions": 3})));
    let records: Vec<serde_json::Value> = (0..300)
        .map(|i| json!({"key": format!("k{}", i % 11), "value": format!("event {i}")}))
        .collect();
    server.ok(
        "POST",
        "/v1/streams/events/records",
        Some(json!({ "records": records })),
    );
    server.ok("PUT", "/v1/streams/events/subscriptions/a", None);
    server.ok("PUT", "/v1/streams/events/subscriptions/b", None);
    runtime().block_on(async {
        let client = Client::new(&server.protocol, quick_options());
        for name in ["a", "b"] {
            let mut consumer = client.subscription("events", name, ConsumerOptions::default());
            let mut seen = std::collections::BTreeSet::new();
            while seen.len() < 300 {
                let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
                    .await
                    .expect("deliveries keep coming")
                    .unwrap()
                    .unwrap();
                // The id names the partition and offset.
                assert!(
                    delivery.partition().is_some_and(|p| p < 3),
                    "{}",
                    delivery.id
                );
                assert!(seen.insert(String::from_utf8(delivery.body.clone()).unwrap()));
                consumer.ack(&delivery);
            }
            consumer.flush().await;
            consumer.close().await;
        }
        // A subscription that does not exist is refused with its own code.
        let mut missing = client.consumer("events/nope", ConsumerOptions::default());
        let err = tokio::time::timeout(Duration::from_secs(20), missing.next())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap_err();
        assert!(
            err.to_string().contains("subscription_not_found")
                || err.to_string().contains("no subscription"),
            "{err}"
        );
    });
    for sub in ["a", "b"] {
        let info = server.ok(
            "GET",
            &format!("/v1/streams/events/subscriptions/{sub}"),
            None,
        );
        assert_eq!(
            (
                info["stats"]["acked"].as_u64(),
                info["stats"]["total"].as_u64()
            ),
            (Some(300), Some(0)),
            "{info}"
        );
    }
}
