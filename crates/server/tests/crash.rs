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
