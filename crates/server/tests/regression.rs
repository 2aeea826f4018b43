//! Regression tests of the hardening issue (an outside client, an attack run and a code
//! review): one test per defect, named for the behaviour it pins. Each failed before its fix.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use tidewater_proto::{DEFAULT_MAX_FRAME, Frame, PROTOCOL_VERSION, decode_frame};

use crate::support::{Server, call_raw, metrics_text};

fn server(config: Option<&str>) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), config);
    (dir, server)
}

fn encode(frame: &Frame, request_id: u32, out: &mut Vec<u8>) {
    frame.encode(request_id, out);
}

/// A connection that said Hello (request id 1) and read its HelloOk; reads time out in 20 s.
fn greeted(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut hello = Vec::new();
    encode(
        &Frame::Hello {
            version: PROTOCOL_VERSION,
            client: "regression".into(),
            credentials: String::new(),
        },
        1,
        &mut hello,
    );
    stream.write_all(&hello).unwrap();
    let mut reader = FrameReader::default();
    let (frame, _) = reader.next(&mut stream).expect("HelloOk");
    assert!(matches!(frame, Frame::HelloOk { .. }), "{frame:?}");
    assert!(reader.buf.is_empty());
    stream
}

/// Reads frames one at a time from a blocking stream.
#[derive(Default)]
struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// The next frame and its request id; None when the peer closed (or the read timed out).
    fn next(&mut self, stream: &mut TcpStream) -> Option<(Frame, u32)> {
        loop {
            if let Some((frame, id, used)) = decode_frame(&self.buf, DEFAULT_MAX_FRAME).unwrap() {
                self.buf.drain(..used);
                return Some((frame, id));
            }
            let mut chunk = [0u8; 64 << 10];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn code_of(frame: &Frame) -> &str {
    match frame {
        Frame::Error { code, .. } | Frame::Throttle { code, .. } => code,
        _ => "",
    }
}

/// Pipelined requests beyond the outbox (1,024 frames) all get replies: the reader used to
/// block on its own full outbox, which only it emptied.
#[test]
fn every_pipelined_request_gets_its_reply_however_many_are_sent_at_once() {
    let (_dir, server) = server(None);
    server.create_queue("full", json!({"max_messages": 10}));

    // 5,000 pings in one write.
    let mut stream = greeted(&server.protocol);
    let mut out = Vec::new();
    for id in 0..5_000u32 {
        encode(&Frame::Ping, 2 + id, &mut out);
    }
    stream.write_all(&out).unwrap();
    let mut reader = FrameReader::default();
    for _ in 0..5_000 {
        let (frame, _) = reader.next(&mut stream).expect("a Pong for every Ping");
        assert_eq!(frame, Frame::Pong);
    }

    // 1,100 produces into a queue that takes 10, and 2,049 acks of unknown receipts.
    let mut out = Vec::new();
    for id in 0..1_100u32 {
        let mut batch = tidewater_storage::BatchBuilder::new(0, 0);
        batch.push(&tidewater_storage::NewRecord {
            id: format!("m{id}").as_bytes(),
            body: b"x",
            ..Default::default()
        });
        encode(
            &Frame::Produce {
                queue: "full".into(),
                ack: tidewater_proto::Ack::Durable,
                batch: batch.finish(),
            },
            10_000 + id,
            &mut out,
        );
    }
    for id in 0..2_049u32 {
        encode(
            &Frame::Ack {
                queue: "full".into(),
                receipts: {
                    let mut receipts = tidewater_proto::Receipts::default();
                    receipts.push("nope");
                    receipts
                },
            },
            20_000 + id,
            &mut out,
        );
    }
    stream.write_all(&out).unwrap();
    let (mut produced, mut throttled, mut settled) = (0, 0, 0);
    for _ in 0..(1_100 + 2_049) {
        match reader.next(&mut stream).expect("a reply to every request") {
            (Frame::Produced { count: 1, .. }, _) => produced += 1,
            (Frame::Throttle { code, .. }, _) if code == "queue_full" => throttled += 1,
            (Frame::Settled { ok: 0, failed }, _) if failed.len() == 1 => settled += 1,
            (other, id) => panic!("unexpected reply to {id}: {other:?}"),
        }
    }
    assert_eq!((produced, throttled, settled), (10, 1_090, 2_049));
    assert_eq!(server.stats("full")["total"], 10);
}

/// User + system CPU of a process in clock ticks (USER_HZ, 100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Connections whose peer closed are closed on the server too, even when the peer went
/// away in the middle of a pipelined burst it never read (they stayed in CLOSE-WAIT).
#[test]
fn connections_closed_by_their_peer_give_back_their_sockets() {
    let (_dir, server) = server(None);
    let pid = server.child.id();
    let before = open_fds(pid);
    for _ in 0..20 {
        let mut stream = greeted(&server.protocol);
        let mut out = Vec::new();
        for id in 0..3_000u32 {
            encode(&Frame::Ping, 2 + id, &mut out);
        }
        stream.write_all(&out).unwrap();
        drop(stream);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_fds(pid) > before + 2 {
        assert!(
            Instant::now() < deadline,
            "the server still holds {} file descriptors (it had {before})",
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The gauge drops as each connection's task ends, a moment after its socket closes.
    loop {
        let metrics = metrics_text(&server.url);
        if metrics.contains("tidewater_connections{listener=\"binary\"} 0") {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection cap per listener, refused with a clear error; a small frame limit and a
/// deadline before Hello; an idle timeout after it that a heartbeat keeps away.
#[test]
fn binary_connections_are_capped_and_timed_out() {
    let (_dir, server) = server(Some(
        "[protocol]\nmax_connections = 4\nhandshake_timeout_ms = 300\nidle_timeout_ms = 1500\n",
    ));
    // Before Hello, a frame may not announce more than 4 KiB (max_frame_bytes is 64 MiB).
    let mut stream = TcpStream::connect(&server.protocol).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(&(1u32 << 20).to_le_bytes()).unwrap();
    let (frame, id) = FrameReader::default().next(&mut stream).unwrap();
    assert_eq!((code_of(&frame), id), ("frame_too_large", 0), "{frame:?}");

    // No Hello in time: told, then closed.
    let mut silent = TcpStream::connect(&server.protocol).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = FrameReader::default();
    let (frame, _) = reader.next(&mut silent).expect("an error before the close");
    assert_eq!(code_of(&frame), "connection_timeout", "{frame:?}");
    assert!(reader.next(&mut silent).is_none(), "closed after the error");

    // Idle after Hello: told, then closed.
    let mut idle = greeted(&server.protocol);
    let (frame, _) = reader.next(&mut idle).expect("an error before the close");
    assert_eq!(code_of(&frame), "connection_timeout", "{frame:?}");
    assert!(
        matches!(&frame, Frame::Error { message, .. } if message.contains("Ping")),
        "{frame:?}"
    );

    // Four connections fill the listener; the fifth is refused and told why. The Rust
    // client's heartbeat keeps its quiet connection open past the idle timeout.
    super::binary::runtime().block_on(async {
        let client = tidewater_client::Client::new(
            &server.protocol,
            tidewater_client::ClientOptions {
                heartbeat_interval: Duration::from_millis(200),
                breaker_failures: 1_000,
                ..tidewater_client::ClientOptions::default()
            },
        );
        client.ping().await.unwrap();
        let mut held: Vec<TcpStream> = (0..3).map(|_| greeted(&server.protocol)).collect();
        let mut over = TcpStream::connect(&server.protocol).unwrap();
        over.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (frame, id) = FrameReader::default()
            .next(&mut over)
            .expect("refused with a frame");
        assert_eq!((code_of(&frame), id), ("overloaded", 0), "{frame:?}");
        assert!(
            matches!(&frame, Frame::Error { message, .. } if message.contains("max_connections")),
            "{frame:?}"
        );
        // A slot comes back when a connection ends.
        held.pop();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut stream = TcpStream::connect(&server.protocol).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut hello = Vec::new();
            encode(
                &Frame::Hello {
                    version: PROTOCOL_VERSION,
                    client: "again".into(),
                    credentials: String::new(),
                },
                1,
                &mut hello,
            );
            stream.write_all(&hello).unwrap();
            match FrameReader::default().next(&mut stream) {
                Some((Frame::HelloOk { .. }, _)) => break,
                other => {
                    assert!(Instant::now() < deadline, "no slot came back: {other:?}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        // Quiet for longer than the idle timeout (which closed the raw connections).
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        client
            .ping()
            .await
            .expect("the heartbeat kept the connection");
        drop(held);
    });
    let metrics = metrics_text(&server.url);
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidewater_connections_refused_total{listener=\"binary\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{metrics}");
}

/// A subscriber that grants endless credit and never reads holds only what its connection
/// can take, not the queue; credit saturates instead of wrapping; reading again recovers.
#[test]
fn a_subscriber_that_stops_reading_is_leased_only_what_its_connection_takes() {
    let (_dir, server) = server(Some("[protocol]\noutbox_bytes = 65536\n"));
    server.create_queue("big", json!({"lease_ms": 600000}));
    let body = "x".repeat(20_000);
    let total = 3_000;
    for chunk in 0..(total / 500) {
        let messages: Vec<_> = (0..500)
            .map(|i| json!({"body": body, "id": format!("m{}", chunk * 500 + i)}))
            .collect();
        server.publish("big", json!(messages));
    }
    // The kernel's buffers hold some too: the server's send buffer (up to tcp_wmem's max)
    // and ours (set small below).
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    let bound = (wmem_max + (256 << 10) + 2 * 65536) / 20_000 + 100;
    assert!(
        bound < total / 2,
        "the test needs a queue larger than the bound ({bound})"
    );

    super::binary::runtime().block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 << 10).unwrap();
        let stream = socket
            .connect(server.protocol.parse().unwrap())
            .await
            .unwrap();
        let mut stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut out = Vec::new();
        encode(
            &Frame::Hello {
                version: PROTOCOL_VERSION,
                client: "greedy".into(),
                credentials: String::new(),
            },
            1,
            &mut out,
        );
        encode(
            &Frame::Subscribe {
                queue: "big".into(),
                lease_ms: 0,
                credit: u32::MAX,
            },
            2,
            &mut out,
        );
        stream.write_all(&out).unwrap();
        // Leases settle at what the connection holds; wait until they stop growing.
        let mut last = u64::MAX;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = server.stats("big")["in_flight"].as_u64().unwrap();
            if now == last && now > 0 {
                break;
            }
            last = now;
        }
        let in_flight = server.stats("big")["in_flight"].as_u64().unwrap() as usize;
        assert!(
            in_flight <= bound,
            "{in_flight} of {total} messages leased to a client that read nothing (bound {bound})"
        );
        // More credit on top of endless credit saturates: then every message still arrives.
        let mut credit = Vec::new();
        let mut reader = FrameReader::default();
        let (frame, _) = reader.next(&mut stream).unwrap();
        assert!(matches!(frame, Frame::HelloOk { .. }));
        let (frame, _) = reader.next(&mut stream).unwrap();
        let Frame::Subscribed { subscription } = frame else {
            panic!("{frame:?}")
        };
        encode(
            &Frame::Credit {
                subscription,
                credit: u32::MAX,
            },
            0,
            &mut credit,
        );
        stream.write_all(&credit).unwrap();
        let mut delivered = 0;
        while delivered < total {
            match reader.next(&mut stream) {
                Some((Frame::Deliver { deliveries, .. }, _)) => delivered += deliveries.len(),
                other => panic!("after {delivered} deliveries: {other:?}"),
            }
        }
        assert_eq!(server.stats("big")["in_flight"], total as u64);
    });
}

/// A Subscribe with a lease out of range is refused before any `Subscribed`.
#[test]
fn a_subscribe_with_an_impossible_lease_is_refused_before_it_is_confirmed() {
    let (_dir, server) = server(None);
    server.create_queue("q", json!({}));
    let mut stream = greeted(&server.protocol);
    let mut out = Vec::new();
    encode(
        &Frame::Subscribe {
            queue: "q".into(),
            lease_ms: 100 * 86_400_000,
            credit: 10,
        },
        2,
        &mut out,
    );
    stream.write_all(&out).unwrap();
    let (frame, id) = FrameReader::default().next(&mut stream).unwrap();
    assert_eq!((code_of(&frame), id), ("invalid_request", 2), "{frame:?}");
}

/// A publish that no queue state could ever take is refused for good, not "retry in 1 s".
#[test]
fn a_publish_larger_than_the_whole_queue_is_refused_for_good() {
    let (_dir, server) = server(None);
    server.create_queue("small", json!({"max_messages": 5, "max_bytes": 100000}));
    let six: Vec<_> = (0..6).map(|i| json!({"body": format!("m{i}")})).collect();
    let url = format!("{}/v1/queues/small/messages", server.url);
    let (status, body) = call_raw(
        &url,
        "POST",
        Some(json!({"messages": six}).to_string().as_bytes()),
    )
    .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("exceeds_capacity")),
        "{body}"
    );
    assert!(
        body.get("retry_after_ms").is_none_or(|v| v.is_null()),
        "{body}"
    );
    let huge = json!({"messages": [{"body": "y".repeat(200_000)}]});
    let (status, body) = call_raw(&url, "POST", Some(huge.to_string().as_bytes())).unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("exceeds_capacity")),
        "{body}"
    );

    // The binary protocol says Error, not Throttle.
    let mut stream = greeted(&server.protocol);
    let mut batch = tidewater_storage::BatchBuilder::new(0, 0);
    for i in 0..6 {
        batch.push(&tidewater_storage::NewRecord {
            id: format!("b{i}").as_bytes(),
            body: b"x",
            ..Default::default()
        });
    }
    let mut out = Vec::new();
    encode(
        &Frame::Produce {
            queue: "small".into(),
            ack: tidewater_proto::Ack::Durable,
            batch: batch.finish(),
        },
        2,
        &mut out,
    );
    stream.write_all(&out).unwrap();
    let (frame, _) = FrameReader::default().next(&mut stream).unwrap();
    assert!(
        matches!(&frame, Frame::Error { code, .. } if code == "exceeds_capacity"),
        "{frame:?}"
    );
    assert_eq!(server.stats("small")["total"], 0);
}

fn http_exchange(stream: &mut TcpStream) -> String {
    let mut text = Vec::new();
    let _ = stream.read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}

/// Slowloris: half-sent heads and bodies are cut off, connections are capped, and a
/// SIGTERM ends the server within its deadline whatever the clients do.
#[test]
fn slow_http_clients_are_cut_off_and_cannot_hold_shutdown() {
    let connect = |server: &Server| {
        let stream = TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
    };
    let (_dir, server) = server(Some(
        "[http]\nheader_timeout_ms = 500\nbody_timeout_ms = 500\n",
    ));
    // Half a head: closed.
    let mut half = connect(&server);
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let _ = http_exchange(&mut half);
    // A body that stops: 408 connection_timeout.
    let mut slow = connect(&server);
    slow.write_all(
        b"POST /v1/queues/q/messages HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n{\"messages\"",
    )
    .unwrap();
    let reply = http_exchange(&mut slow);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("connection_timeout"), "{reply}");
    drop(server);

    drop(_dir);
    let (_dir, mut server) = self::server(Some(
        "shutdown_timeout_ms = 1000\n[http]\nmax_connections = 6\nheader_timeout_ms = 600000\n",
    ));
    // Six connections in the middle of their heads hold the listener; the seventh is
    // answered 503 at once.
    let held: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut s = connect(&server);
            s.write_all(b"GET /healthz HTTP/1.1\r\nHos").unwrap();
            s
        })
        .collect();
    let mut over = connect(&server);
    let reply = http_exchange(&mut over);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.contains("max_connections"), "{reply}");
    // SIGTERM ends the server although they never finish (and would wait 10 minutes).
    let started = Instant::now();
    assert_eq!(server.stop(), 0);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        started.elapsed()
    );
    drop(held);
}

/// Deleting a queue removes its metric series.
#[test]
fn deleted_queues_leave_no_metric_series_behind() {
    let (_dir, server) = server(None);
    for i in 0..3 {
        let name = format!("gone-{i}");
        server.create_queue(&name, json!({}));
        server.publish(&name, json!([{"body": "x"}]));
        server.ok("DELETE", &format!("/v1/queues/{name}"), None);
    }
    let metrics = metrics_text(&server.url);
    assert!(!metrics.contains("gone-"), "{metrics}");
}

fn wait_for_redrive(server: &Server, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let progress = server.ok("GET", &format!("/v1/redrives/{id}"), None);
        if progress["state"] != "running" {
            return progress;
        }
        assert!(Instant::now() < deadline, "redrive {id} still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A redrive into its own source moved 1,000 messages 101,000 times: refused now, as is a
/// cycle; a redrive moves only what its source held at its start; list and cancel.
#[test]
fn redrives_always_end_never_cycle_and_can_be_listed_and_cancelled() {
    let (_dir, server) = server(None);
    server.create_queue("src", json!({}));
    server.create_queue("dst", json!({}));
    let batch = |n: usize, tag: &str| -> serde_json::Value {
        json!(
            (0..n)
                .map(|i| json!({"body": format!("{tag}{i}")}))
                .collect::<Vec<_>>()
        )
    };
    server.publish("src", batch(20, "a"));
    server.err(
        "POST",
        "/v1/queues/src/redrive",
        Some(json!({"to": "src"})),
        409,
        "config_conflict",
    );
    let started = server.ok(
        "POST",
        "/v1/queues/src/redrive",
        Some(json!({"to": "dst", "rate_per_s": 10})),
    );
    let id = started["id"].as_str().unwrap().to_string();
    server.err(
        "POST",
        "/v1/queues/dst/redrive",
        Some(json!({"to": "src"})),
        409,
        "config_conflict",
    );
    // Published after the start: not part of this redrive.
    server.publish("src", batch(50, "b"));
    let done = wait_for_redrive(&server, &id);
    assert_eq!(
        (done["state"].as_str(), done["moved"].as_u64()),
        (Some("done"), Some(20)),
        "{done}"
    );
    assert_eq!(server.stats("src")["total"], 50);
    assert_eq!(server.stats("dst")["total"], 20);

    // Cancel a slow one.
    let slow = server.ok(
        "POST",
        "/v1/queues/src/redrive",
        Some(json!({"to": "dst", "rate_per_s": 2})),
    );
    let slow_id = slow["id"].as_str().unwrap().to_string();
    let cancelled = server.ok("DELETE", &format!("/v1/redrives/{slow_id}"), None);
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let moved = cancelled["moved"].as_u64().unwrap();
    assert!(moved < 50, "{cancelled}");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        server.stats("src")["total"],
        50 - moved,
        "nothing moves after a cancel"
    );
    let list = server.ok("GET", "/v1/redrives", None);
    let ids: Vec<&str> = list["redrives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str(), slow_id.as_str()]);
    server.err(
        "DELETE",
        "/v1/redrives/rd-999",
        None,
        404,
        "redrive_not_found",
    );
}

/// Missing segment files are never passed over: the server refuses to start and names
/// them; `--repair-missing` starts, dropping exactly what is missing, and says what.
#[test]
fn missing_segments_refuse_the_start_until_an_explicit_repair() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = "[storage]\nsegment_roll_bytes = 65536\n";
    let mut server = Server::start(&data, Some(config));
    server.create_queue("q", json!({}));
    let body = "z".repeat(1000);
    for _ in 0..4 {
        let batch: Vec<_> = (0..100).map(|_| json!({"body": body})).collect();
        server.publish("q", json!(batch));
    }
    assert_eq!(server.stop(), 0);
    // The first segment of the log with the most segments (q's).
    let mut logs: Vec<_> = std::fs::read_dir(data.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    logs.sort_by_key(|p| std::fs::read_dir(p).unwrap().count());
    let log = logs.last().unwrap();
    let mut segments: Vec<_> = std::fs::read_dir(log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "{segments:?}");
    std::fs::remove_file(&segments[0]).unwrap();

    let serve = |repair: bool| {
        let mut command = std::process::Command::new(crate::support::BIN);
        command
            .args(["serve", "--data"])
            .arg(&data)
            .args(["--config"])
            .arg(data.with_extension("toml"))
            .args([
                "--listen",
                &format!("127.0.0.1:{}", crate::support::free_port()),
            ])
            .args([
                "--protocol-listen",
                &format!("127.0.0.1:{}", crate::support::free_port()),
            ])
            .env("TIDEWATER_LOG", "error");
        if repair {
            command.arg("--repair-missing");
        }
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let refused = serve(false).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    let name = segments[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        stderr.contains(&name) || stderr.contains("missing"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--repair-missing") || stderr.contains("repair"),
        "{stderr}"
    );

    // With the repair: it starts, and says what it dropped.
    let mut repaired = serve(true);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stderr = repaired.stderr.take().unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains("dropped") {
        assert!(Instant::now() < deadline, "no repair report: {text}");
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "exited: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let _ = repaired.kill();
    let _ = repaired.wait();
    // A later start needs no repair, and holds what was not dropped.
    let server = Server::start_on(
        &data,
        Some(data.with_extension("toml")),
        &[],
        (crate::support::free_port(), crate::support::free_port()),
    );
    let total = server.stats("q")["total"].as_u64().unwrap();
    assert!(
        total > 0 && total < 400,
        "{total} of 400 left after the repair"
    );
}

/// A queue create whose fsync failed answered "storage_failed" (documented as "not
/// applied") and the queue existed after a restart: the reply must say the outcome is
/// unknown, because the write reached the file before its fsync failed.
#[test]
fn a_write_whose_fsync_failed_says_its_outcome_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start_env(&data, None, &[("TIDEWATER_FAULT_FAIL_FSYNC_AT", "1")]);
    let (status, body) = server
        .try_call("PUT", "/v1/queues/q", Some(&json!({})))
        .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (500, Some("storage_failed")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("may or may not"), "{message}");
    assert!(!message.contains("nothing was stored"), "{message}");
    let _ = server.child.wait();
    // The truth after the restart: here the write had reached the file.
    let server = Server::start(&data, None);
    assert!(server.try_call("GET", "/v1/queues/q", None).unwrap().0 == 200);
    let meaning = tidewater_core::ErrorCode::StorageFailed.meaning();
    assert!(!meaning.contains("not applied"), "{meaning}");
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A body of millions of tiny values was parsed whole before any count applied: 63 MB of
/// empty messages peaked at 1.26 GB. Values are counted as they are parsed now.
#[test]
fn a_body_of_millions_of_tiny_values_is_refused_without_building_them() {
    let (_dir, server) = server(None);
    server.create_queue("q", json!({}));
    let pid = server.child.id();
    let before = peak_rss_kib(pid);
    // 2,000,000 empty messages in 6 MB: within max_request_bytes.
    let mut body = String::with_capacity(6_100_000);
    body.push_str("{\"messages\":[");
    for i in 0..2_000_000 {
        if i > 0 {
            body.push(',');
        }
        body.push_str("{}");
    }
    body.push_str("]}");
    let url = format!("{}/v1/queues/q/messages", server.url);
    let (status, reply) = call_raw(&url, "POST", Some(body.as_bytes())).unwrap();
    assert_eq!(status, 413, "{reply}");
    let grown_mib = (peak_rss_kib(pid) - before) / 1024;
    assert!(
        grown_mib < 100,
        "the server's peak RSS grew by {grown_mib} MiB for a 6 MB body"
    );
    // Same for a huge array in a queue's configuration.
    let weights: serde_json::Map<String, serde_json::Value> =
        (0..300_000).map(|i| (format!("t{i}"), json!(1))).collect();
    let url = format!("{}/v1/queues/q", server.url);
    let body = json!({"fairness": {"by": "tenant", "weights": weights}}).to_string();
    let (status, reply) = call_raw(&url, "PUT", Some(body.as_bytes())).unwrap();
    assert_eq!(status, 413, "{reply}");
}

/// Request bodies in flight share a broker-wide budget: past it, a request is refused at
/// once with overloaded and Retry-After instead of adding to memory.
#[test]
fn request_bodies_in_flight_share_a_budget() {
    let (_dir, server) = server(Some("max_request_bytes_in_flight = 1048576\n"));
    server.create_queue("q", json!({}));
    let addr = server.url.trim_start_matches("http://").to_string();
    // A client that announces 900 kB and sends a little of it holds that much budget.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(
        b"POST /v1/queues/q/messages HTTP/1.1\r\nHost: x\r\ncontent-length: 900000\r\n\r\n{\"messages\":[",
    )
    .unwrap();
    let body = json!({"messages": [{"body": "y".repeat(300_000)}]}).to_string();
    let url = format!("{}/v1/queues/q/messages", server.url);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, reply) = call_raw(&url, "POST", Some(body.as_bytes())).unwrap();
        if status == 429 {
            assert_eq!(reply["code"], "overloaded", "{reply}");
            assert!(
                reply["message"]
                    .as_str()
                    .unwrap()
                    .contains("max_request_bytes_in_flight"),
                "{reply}"
            );
            break;
        }
        assert_eq!(status, 200, "{reply}");
        assert!(Instant::now() < deadline, "never refused");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(slow);
    // The budget comes back when the request ends.
    let deadline = Instant::now() + Duration::from_secs(20);
    while call_raw(&url, "POST", Some(body.as_bytes())).unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "the budget never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Errors from the query string and from a path that is not UTF-8 were plain text; every
/// error is `{code, message}`. A number written `820.0` is the integer 820, as in JSON.
#[test]
fn every_error_is_json_and_integral_floats_are_integers() {
    let (_dir, server) = server(None);
    server.create_queue("q", json!({}));
    for path in [
        "/v1/queues/q/messages?max=abc",
        "/v1/queues/q/messages?unknown=1",
        "/v1/queues/%FF%FE/messages",
    ] {
        let (status, body) = call_raw(&format!("{}{path}", server.url), "GET", None).unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "invalid_request", "{path}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let (status, body) = call_raw(
        &format!("{}/v1/queues/q/receive", server.url),
        "POST",
        Some(br#"{"max": 2.0, "wait_ms": 0.0}"#),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = call_raw(
        &format!("{}/v1/queues/q", server.url),
        "PUT",
        Some(br#"{"lease_ms": 820.0}"#),
    )
    .unwrap();
    assert_eq!(
        (status, body["config"]["lease_ms"].as_u64()),
        (200, Some(820)),
        "{body}"
    );
}

/// Out of file descriptors, the accept loops spun at 100% CPU logging `accept failed`
/// (74 MB/s): they back off now, and serve again once descriptors are free.
#[test]
fn running_out_of_file_descriptors_backs_off_instead_of_spinning() {
    let (_dir, server) = server(None);
    server.create_queue("q", json!({}));
    let pid = server.child.id() as i32;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let used = open_fds(server.child.id()) as u64;
    // SAFETY: prlimit on our own child with valid pointers (reads the limit).
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) },
        0
    );
    // Only the soft limit: raising a hard limit back needs a capability.
    let limit = libc::rlimit {
        rlim_cur: used + 8,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) },
        0
    );
    // Fill the server's table, then keep knocking.
    let mut held = Vec::new();
    for _ in 0..16 {
        if let Ok(s) = TcpStream::connect(&server.protocol) {
            held.push(s);
        }
    }
    let cpu_before = cpu_ticks(server.child.id());
    std::thread::sleep(Duration::from_millis(1500));
    let cpu_ticks_spent = cpu_ticks(server.child.id()) - cpu_before;
    let errors = |server: &Server| -> u64 {
        let metrics = loop {
            // The metrics request needs a descriptor too: retry until one is free.
            if let Ok(text) = std::panic::catch_unwind(|| metrics_text(&server.url)) {
                break text;
            }
        };
        metrics
            .lines()
            .filter(|l| l.starts_with("tidewater_connection_accept_errors_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    drop(held);
    let restored = libc::rlimit {
        rlim_cur: old.rlim_cur,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &restored, std::ptr::null_mut()) },
        0
    );
    let failed = errors(&server);
    // With backoff (10 ms doubling to 1 s) about ten failures fit in 1.5 s; a spinning loop
    // fails hundreds of thousands of times.
    assert!(failed < 200, "{failed} failed accepts in 1.5 s");
    // A spinning accept loop burns a core: 150 ticks (of 10 ms) in 1.5 s.
    assert!(
        cpu_ticks_spent < 60,
        "the server used {cpu_ticks_spent} ticks of CPU in 1.5 s while out of descriptors"
    );
    server.publish("q", json!([{"body": "served again"}]));
}

/// A `deliver_at` far in the past (i64::MIN) overflowed `deliver_at - now`: the handler
/// panicked and the client saw the connection close with no reply (schemathesis found it).
/// A past time means "now", over HTTP and over the binary protocol alike.
#[test]
fn a_deliver_at_far_in_the_past_is_now_not_a_dropped_connection() {
    let (_dir, server) = server(None);
    server.create_queue("q", json!({}));
    let ids = server.publish(
        "q",
        json!([{"body": "a", "deliver_at": i64::MIN}, {"body": "b", "deliver_at": -1}]),
    );
    assert_eq!(ids.len(), 2);
    let got = server.receive("q", 2, 0, None);
    assert_eq!(got.len(), 2, "{got:?}");
    // The server is still there.
    assert_eq!(server.ok("GET", "/readyz", None)["status"], "ready");
}

/// The largest valid queue configuration (10,000 fairness weights, 1,000 quota tenants with
/// their four limits) holds about 30,000 JSON values; the cap on a configuration's values was
/// 20,000, so a valid configuration was refused 413 request_too_large, and one weight too many
/// was refused 413 instead of 400 invalid_config (schemathesis found it).
#[test]
fn the_largest_valid_queue_configuration_is_accepted() {
    let (_dir, server) = server(None);
    let weights: serde_json::Map<String, serde_json::Value> =
        (0..10_000).map(|i| (format!("w{i}"), json!(2.5))).collect();
    let tenants: serde_json::Map<String, serde_json::Value> = (0..1_000)
        .map(|i| {
            let limits = json!({"msgs_per_s": 10.0, "bytes_per_s": 1000.0, "burst_msgs": 5, "burst_bytes": 500});
            (format!("t{i}"), limits)
        })
        .collect();
    let config = json!({"config": {
        "fairness": {"by": "tenant", "weights": weights},
        "quota": {"msgs_per_s": 100.0, "tenants": tenants},
    }});
    let body = serde_json::to_vec(&config).unwrap();
    let (status, reply) =
        call_raw(&format!("{}/v1/queues/big", server.url), "PUT", Some(&body)).unwrap();
    assert_eq!(status, 201, "{reply}");
    assert_eq!(
        reply["config"]["fairness"]["weights"]
            .as_object()
            .unwrap()
            .len(),
        10_000
    );
    let mut too_many = config;
    too_many["config"]["fairness"]["weights"]["one-more"] = json!(1.0);
    let body = serde_json::to_vec(&too_many).unwrap();
    let (status, reply) =
        call_raw(&format!("{}/v1/queues/big", server.url), "PUT", Some(&body)).unwrap();
    assert_eq!(
        (status, reply["code"].as_str()),
        (400, Some("invalid_config")),
        "{reply}"
    );
}

/// Peek's default page of 10 was refused (400) by a server whose max_receive_messages is
/// lower: a request with no parameters failed. The default is now at most that limit.
#[test]
fn peek_without_max_works_under_a_low_max_receive_messages() {
    let (_dir, server) = server(Some("[limits]\nmax_receive_messages = 3\n"));
    server.create_queue("q", json!({}));
    server.publish(
        "q",
        json!([{"body": "a"}, {"body": "b"}, {"body": "c"}, {"body": "d"}]),
    );
    let page = server.ok("GET", "/v1/queues/q/messages", None);
    assert_eq!(page["messages"].as_array().unwrap().len(), 3, "{page}");
    assert_eq!(page["next_from"], 3, "{page}");
    let spec = server.ok("GET", "/v1/openapi.json", None);
    let max = &spec["paths"]["/v1/queues/{queue}/messages"]["get"]["parameters"][0]["schema"];
    assert_eq!(
        (max["maximum"].as_u64(), max["default"].as_u64()),
        (Some(3), Some(3))
    );
}

/// `-9223372036854775809` (one below i64::MIN) parses as a float, and the conversion of
/// integral floats (`820.0` is 820) turned it into i64::MIN: a number out of range was
/// accepted as another number (schemathesis found it). Integral floats become integers only
/// below 2^53 in magnitude, where the conversion is exact.
#[test]
fn integers_out_of_range_are_refused_not_rounded_into_range() {
    let (_dir, server) = server(None);
    server.create_queue("q", json!({}));
    let url = format!("{}/v1/queues/q/messages", server.url);
    for body in [
        r#"{"messages": [{"body": "a", "deliver_at": -9223372036854775809}]}"#,
        r#"{"messages": [{"body": "a", "delay_ms": 18446744073709551616}]}"#,
        r#"{"messages": [{"body": "a", "delay_ms": 9007199254740993.0}]}"#,
    ] {
        let (status, reply) = call_raw(&url, "POST", Some(body.as_bytes())).unwrap();
        assert_eq!(
            (status, reply["code"].as_str()),
            (400, Some("invalid_request")),
            "{body}: {reply}"
        );
    }
    let (status, reply) = call_raw(
        &url,
        "POST",
        Some(br#"{"messages": [{"body": "a", "delay_ms": 1000.0, "deliver_at": null}]}"#),
    )
    .unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(server.stats("q")["delayed"], 1);
}

/// serde_json's default float parsing may be one ULP off: `3944916605361726.0` (an integer
/// written as a float, below 2^53) was read as 3944916605361726.5 and refused as a
/// non-integer (schemathesis found it). Floats parse to the nearest double now.
#[test]
fn integral_floats_parse_exactly() {
    let (_dir, server) = server(None);
    let (status, reply) = call_raw(
        &format!("{}/v1/queues/q", server.url),
        "PUT",
        Some(br#"{"quota": {"msgs_per_s": 10.0, "burst_msgs": 3944916605361726.0}}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{reply}");
    assert_eq!(
        reply["config"]["quota"]["burst_msgs"].as_u64(),
        Some(3_944_916_605_361_726)
    );
}

/// A body of only whitespace is no body (the defaults) where a body is optional; the check
/// used ASCII whitespace, so a lone form feed (no JSON text: JSON's whitespace is space, tab,
/// line feed and carriage return) was taken as no body too (schemathesis found it).
#[test]
fn a_form_feed_is_invalid_json_not_an_empty_body() {
    let (_dir, server) = server(None);
    server.create_queue("q", json!({}));
    let url = format!("{}/v1/queues/q/receive", server.url);
    for blank in [&b""[..], b" \t\r\n"] {
        let (status, reply) = call_raw(&url, "POST", Some(blank)).unwrap();
        assert_eq!(status, 200, "{blank:?}: {reply}");
    }
    let (status, reply) = call_raw(&url, "POST", Some(b"\x0c")).unwrap();
    assert_eq!(
        (status, reply["code"].as_str()),
        (400, Some("invalid_json")),
        "{reply}"
    );
}

/// Issue 9, item 15: every segment file stayed open for as long as its queue lived (a
/// queue with data held two descriptors, more with a backlog), so 10,000 queues needed
/// 20,000 descriptors and the open-files limit, not `max_queues`, decided how many queues
/// a server could hold: past it, publishes and the restart's recovery failed with EMFILE.
/// Under a limit of 400 descriptors, 500 queues with data (1,000 logs) are written, the
/// server is killed and recovers, and every message is received; the server holds at most
/// `max_open_segment_files` segment files.
#[test]
fn more_queues_than_the_open_files_limit_holds_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[protocol]\nmax_connections = 32\n[http]\nmax_connections = 32\n\
                  [storage]\nfsync = false\nmax_open_segment_files = 64\n";
    let mut server = Server::start_with_open_files(&dir.path().join("data"), config, 400);
    let queues = 500;
    for i in 0..queues {
        server.create_queue(&format!("q{i}"), json!({}));
        server.publish(
            &format!("q{i}"),
            json!([{"body": format!("message of q{i}")}, {"body": "delayed", "delay_ms": 3_600_000}]),
        );
    }
    let open = |server: &Server| -> u64 {
        metrics_text(&server.url)
            .lines()
            .find_map(|l| l.strip_prefix("tidewater_segment_files_open "))
            .and_then(|v| v.parse().ok())
            .expect("tidewater_segment_files_open")
    };
    assert!(open(&server) <= 64);
    server.kill_and_restart();
    for i in 0..queues {
        let got = server.receive(&format!("q{i}"), 10, 0, None);
        let bodies: Vec<&str> = got.iter().filter_map(|m| m["body"].as_str()).collect();
        assert_eq!(bodies, [format!("message of q{i}")], "queue q{i}");
        assert_eq!(server.stats(&format!("q{i}"))["total"], 2, "queue q{i}");
    }
    assert!(open(&server) <= 64);
    assert!(
        open_fds(server.child.id()) <= 400,
        "the server holds {} descriptors",
        open_fds(server.child.id())
    );
}

/// `systemctl reload` (deploy/tidewater.service) sends SIGHUP. Without TLS nothing handled
/// it, and its default action ended the server.
#[test]
fn sighup_without_tls_does_not_stop_the_server() {
    let (_dir, mut server) = server(None);
    server.create_queue("kept", json!({}));
    let pid = server.child.id() as libc::pid_t;
    // SAFETY: a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    // Still there, answering, a moment later (an exit would show by then).
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "the server exited on SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.ok("GET", "/v1/queues/kept", None);
}
