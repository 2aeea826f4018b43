//! SIGKILL at random points under concurrent publishes (durable and written), receives and
//! acks; after every restart: each acknowledged publish is present exactly once, no acked
//! message is delivered again, and the queue's counts add up.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, call};

const CONFIG: &str = "[storage]\njournal_roll_bytes = 1048576\nsegment_roll_bytes = 65536\ncheckpoint_interval_ms = 200\n";

#[derive(Default)]
struct Ledger {
    /// Ids whose publish got a 200 (durable or written).
    published: HashSet<String>,
    /// Every id ever sent (a publish cut by the kill may or may not have landed).
    attempted: HashSet<String>,
    /// Ids whose ack got an "ok" for their receipt.
    acked: HashSet<String>,
    /// Ids in an ack request the kill cut off: settled or not, both are correct.
    ack_in_doubt: HashSet<String>,
    /// Ids delivered although an earlier round had acked them.
    redelivered_after_ack: Vec<String>,
}

fn producer(
    url: String,
    round: u32,
    worker: u32,
    ack: &'static str,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let ids: Vec<String> = (0..20)
            .map(|i| format!("r{round}-w{worker}-b{n}-{i}"))
            .collect();
        n += 1;
        ledger.lock().unwrap().attempted.extend(ids.iter().cloned());
        let messages: Vec<Value> = ids.iter().map(|id| json!({"id": id, "body": id})).collect();
        match call(
            &url,
            "POST",
            "/v1/queues/crash/messages",
            Some(&json!({"messages": messages, "ack": ack})),
        ) {
            Ok((200, reply)) => {
                let got: Vec<String> = reply["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(got, ids);
                ledger.lock().unwrap().published.extend(ids);
            }
            Ok((status, reply)) => panic!("publish refused: {status} {reply}"),
            Err(_) => return, // the server is gone
        }
    }
}

fn consumer(
    url: String,
    stop: Arc<AtomicBool>,
    earlier_acks: Arc<HashSet<String>>,
    ledger: Arc<Mutex<Ledger>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let Ok((200, reply)) = call(
            &url,
            "POST",
            "/v1/queues/crash/receive",
            Some(&json!({"max": 50, "wait_ms": 50})),
        ) else {
            return;
        };
        let messages = reply["messages"].as_array().unwrap().clone();
        if messages.is_empty() {
            continue;
        }
        let pairs: Vec<(String, String)> = messages
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_string(),
                    m["receipt"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        {
            let mut ledger = ledger.lock().unwrap();
            for (id, _) in &pairs {
                if earlier_acks.contains(id) || ledger.acked.contains(id) {
                    ledger.redelivered_after_ack.push(id.clone());
                }
            }
        }
        let receipts: Vec<&String> = pairs.iter().map(|(_, r)| r).collect();
        let Ok((200, reply)) = call(
            &url,
            "POST",
            "/v1/queues/crash/ack",
            Some(&json!({"receipts": receipts})),
        ) else {
            ledger
                .lock()
                .unwrap()
                .ack_in_doubt
                .extend(pairs.into_iter().map(|(id, _)| id));
            return;
        };
        let failed: HashSet<&str> = reply["failed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["receipt"].as_str().unwrap())
            .collect();
        let mut ledger = ledger.lock().unwrap();
        for (id, receipt) in pairs {
            if !failed.contains(receipt.as_str()) {
                ledger.acked.insert(id);
            }
        }
    }
}

fn verify(server: &Server, ledger: &Ledger, round: u32) {
    let present: Vec<String> = server
        .peek_all("crash")
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<&String> = present.iter().collect();
    assert_eq!(
        unique.len(),
        present.len(),
        "round {round}: a message is present twice"
    );
    for id in &ledger.published {
        if !ledger.acked.contains(id) && !ledger.ack_in_doubt.contains(id) {
            assert!(
                unique.contains(id),
                "round {round}: acknowledged publish {id} was lost"
            );
        }
    }
    for id in &ledger.acked {
        assert!(
            !unique.contains(id),
            "round {round}: acked message {id} came back"
        );
    }
    for id in &present {
        assert!(
            ledger.attempted.contains(id),
            "round {round}: {id} was never published"
        );
    }
    assert!(
        ledger.redelivered_after_ack.is_empty(),
        "round {round}: acked messages delivered again: {:?}",
        ledger.redelivered_after_ack
    );
    let stats = server.stats("crash");
    assert_eq!(
        stats["total"].as_u64().unwrap(),
        present.len() as u64,
        "round {round}: stats disagree with the contents"
    );
    assert_eq!(
        stats["in_flight"], 0,
        "round {round}: leases must not survive a crash"
    );
}

#[test]
fn acknowledged_data_survives_sigkill_at_random_points() {
    let seed: u64 = std::env::var("TIDEWATER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let rounds: u32 = std::env::var("TIDEWATER_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!(
        "crash test: seed {seed}, {rounds} rounds (TIDEWATER_CRASH_SEED / TIDEWATER_CRASH_ROUNDS to change)"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), Some(CONFIG));
    server.create_queue("crash", json!({"lease_ms": 600000}));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let earlier_acks = Arc::new(ledger.lock().unwrap().acked.clone());
        let mut threads = Vec::new();
        for (worker, ack) in [(0, "durable"), (1, "durable"), (2, "written")] {
            let (url, stop, ledger) = (server.url.clone(), stop.clone(), ledger.clone());
            threads.push(std::thread::spawn(move || {
                producer(url, round, worker, ack, stop, ledger)
            }));
        }
        let (url, stop2, ledger2) = (server.url.clone(), stop.clone(), ledger.clone());
        threads.push(std::thread::spawn(move || {
            consumer(url, stop2, earlier_acks, ledger2)
        }));
        std::thread::sleep(Duration::from_millis(rng.u64(50..700)));
        server.kill9();
        stop.store(true, Ordering::SeqCst);
        for thread in threads {
            thread.join().expect("worker panicked");
        }
        server.kill_and_restart();
        let ledger = ledger.lock().unwrap();
        verify(&server, &ledger, round);
        eprintln!(
            "round {round}: {} published, {} acked, {} present",
            ledger.published.len(),
            ledger.acked.len(),
            server.stats("crash")["total"]
        );
    }
    let ledger = ledger.lock().unwrap();
    assert!(
        ledger.published.len() > 100 && !ledger.acked.is_empty(),
        "the test did too little work to mean anything"
    );
}

/// What the stream crash test saw acknowledged.
#[derive(Default)]
struct StreamLedger {
    /// Value -> (partition, offset) of each record whose produce got a 200.
    produced: std::collections::HashMap<String, (u64, u64)>,
    /// Per partition: the end of what was acknowledged durable (a consumer sees, and
    /// commits, only durable records).
    durable_end: [u64; 3],
    attempted: HashSet<String>,
    /// Per partition: the highest commit answered Ok, and the highest one sent at all.
    committed: [u64; 3],
    commit_sent: [u64; 3],
}

/// A raw binary connection for commits (a consumer outside the group's membership).
fn commit_raw(addr: &str, offsets: [u64; 3]) -> Result<(), ()> {
    use std::io::{Read, Write};
    use tidewater_proto::{CommitOffset, DEFAULT_MAX_FRAME, Frame, PROTOCOL_VERSION, decode_frame};
    let mut stream = std::net::TcpStream::connect(addr).map_err(|_| ())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|_| ())?;
    let mut out = Vec::new();
    Frame::Hello {
        version: PROTOCOL_VERSION,
        client: "crash".into(),
        credentials: String::new(),
    }
    .encode(1, &mut out);
    Frame::Commit {
        group: "g".into(),
        member: String::new(),
        offsets: (0..3)
            .map(|p| CommitOffset {
                stream: "events".into(),
                partition: p,
                offset: offsets[p as usize],
                metadata: String::new(),
            })
            .collect(),
    }
    .encode(2, &mut out);
    stream.write_all(&out).map_err(|_| ())?;
    let mut buf = Vec::new();
    let mut replies = 0;
    loop {
        while let Ok(Some((frame, _, used))) = decode_frame(&buf, DEFAULT_MAX_FRAME) {
            buf.drain(..used);
            replies += 1;
            if replies == 2 {
                return if frame == Frame::Ok {
                    Ok(())
                } else {
                    panic!("commit refused: {frame:?}")
                };
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Every record of a stream partition, by paging through fetches.
fn stream_records(server: &Server, partition: u64) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let reply = server.ok(
            "GET",
            &format!("/v1/streams/events/partitions/{partition}/records?offset={offset}&max_bytes=1048576"),
            None,
        );
        let records = reply["records"].as_array().unwrap();
        if records.is_empty() {
            return out;
        }
        for r in records {
            out.push((
                r["offset"].as_u64().unwrap(),
                r["value"].as_str().unwrap().to_string(),
            ));
        }
        offset = reply["next_offset"].as_u64().unwrap();
    }
}

#[test]
fn acknowledged_stream_records_and_commits_survive_sigkill() {
    let seed: u64 = std::env::var("TIDEWATER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("stream crash test: seed {seed} (TIDEWATER_CRASH_SEED to change)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), Some(CONFIG));
    server.ok("PUT", "/v1/streams/events", Some(json!({"partitions": 3})));
    let ledger = Arc::new(Mutex::new(StreamLedger::default()));
    for round in 0..6u32 {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for worker in 0..2u32 {
            let (url, stop, ledger) = (server.url.clone(), stop.clone(), ledger.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let values: Vec<String> = (0..20)
                        .map(|i| format!("r{round}-w{worker}-b{n}-{i}"))
                        .collect();
                    n += 1;
                    ledger
                        .lock()
                        .unwrap()
                        .attempted
                        .extend(values.iter().cloned());
                    let records: Vec<Value> = values
                        .iter()
                        .enumerate()
                        .map(|(i, v)| json!({"value": v, "key": format!("k{i}")}))
                        .collect();
                    let ack = if worker == 0 { "durable" } else { "written" };
                    match call(
                        &url,
                        "POST",
                        "/v1/streams/events/records",
                        Some(&json!({"records": records, "ack": ack})),
                    ) {
                        Ok((200, reply)) => {
                            let mut ledger = ledger.lock().unwrap();
                            for (v, at) in values.iter().zip(reply["offsets"].as_array().unwrap()) {
                                let at = (
                                    at["partition"].as_u64().unwrap(),
                                    at["offset"].as_u64().unwrap(),
                                );
                                ledger.produced.insert(v.clone(), at);
                                if worker == 0 {
                                    let end = &mut ledger.durable_end[at.0 as usize];
                                    *end = (*end).max(at.1 + 1);
                                }
                            }
                        }
                        Ok((status, reply)) => panic!("produce refused: {status} {reply}"),
                        Err(_) => return,
                    }
                }
            }));
        }
        let (addr, stop2, ledger2) = (server.protocol.clone(), stop.clone(), ledger.clone());
        threads.push(std::thread::spawn(move || {
            // Commits move forward to what was produced so far, as a consumer's would.
            while !stop2.load(Ordering::SeqCst) {
                let target = {
                    let mut ledger = ledger2.lock().unwrap();
                    let target: [u64; 3] =
                        std::array::from_fn(|p| ledger.committed[p].max(ledger.durable_end[p]));
                    for (sent, t) in ledger.commit_sent.iter_mut().zip(target) {
                        *sent = (*sent).max(t);
                    }
                    target
                };
                match commit_raw(&addr, target) {
                    Ok(()) => ledger2.lock().unwrap().committed = target,
                    Err(()) => return,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
        std::thread::sleep(Duration::from_millis(rng.u64(50..600)));
        server.kill9();
        stop.store(true, Ordering::SeqCst);
        for thread in threads {
            thread.join().expect("worker panicked");
        }
        server.kill_and_restart();
        let ledger = ledger.lock().unwrap();
        let mut present = HashSet::new();
        for p in 0..3u64 {
            let records = stream_records(&server, p);
            for (i, (offset, value)) in records.iter().enumerate() {
                assert_eq!(*offset, i as u64, "round {round}: partition {p} has a gap");
                assert!(
                    ledger.attempted.contains(value),
                    "round {round}: {value} never produced"
                );
                assert!(
                    present.insert(value.clone()),
                    "round {round}: {value} is there twice"
                );
                if let Some(&at) = ledger.produced.get(value) {
                    assert_eq!(at, (p, *offset), "round {round}: {value} moved");
                }
            }
        }
        for value in ledger.produced.keys() {
            assert!(
                present.contains(value),
                "round {round}: acknowledged {value} was lost"
            );
        }
        let group = server.ok("GET", "/v1/groups/g", None);
        for o in group["offsets"].as_array().unwrap() {
            let p = o["partition"].as_u64().unwrap() as usize;
            let committed = o["committed"].as_u64().unwrap();
            assert!(
                committed >= ledger.committed[p] && committed <= ledger.commit_sent[p],
                "round {round}: partition {p} committed {committed}, acknowledged {} (sent up to {})",
                ledger.committed[p],
                ledger.commit_sent[p]
            );
        }
        eprintln!(
            "round {round}: {} records acknowledged, commits at {:?}",
            ledger.produced.len(),
            ledger.committed
        );
    }
    let ledger = ledger.lock().unwrap();
    assert!(
        ledger.produced.len() > 100 && ledger.committed.iter().any(|&c| c > 0),
        "the test did too little work to mean anything"
    );
}
