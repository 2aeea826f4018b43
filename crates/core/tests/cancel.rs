//! A caller that goes away (an HTTP client that disconnects, a request future dropped by a
//! timeout) must not leave a queue's memory out of step with what was written: whatever a
//! request submitted to storage is accounted for when storage answers, whether or not
//! anyone still waits for the reply.
//!
//! Each test holds the store's syncer (`Faults::stall_syncer`), polls a request once (it
//! submits its write and waits for the answer: it cannot have it yet), drops it, lets the
//! syncer go, waits for storage to finish, and checks that the queue is as if the caller
//! had waited. Before, the accounting ran in the dropped future: a published message was stored
//! but never delivered (until a restart), an acked or dead-lettered one stayed "settling"
//! forever, neither delivered nor gone.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use tidewater_core::harness::{Harness, HarnessOptions};
use tidewater_core::{Broker, ConfigPatch, NackReason, NewMessage};
use tidewater_storage::faults::Faults;
use tidewater_storage::{AckLevel, StoreOptions};

/// A harness whose store's syncer can be held.
fn harness() -> (Harness, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let options = HarnessOptions {
        store: StoreOptions {
            fsync: false,
            faults: faults.clone(),
            ..StoreOptions::default()
        },
        ..HarnessOptions::default()
    };
    (Harness::temporary(options).unwrap(), faults)
}

/// Polls `fut` once with the syncer held (so its durable write cannot be answered yet) and
/// drops it; whether it was waiting (always, unless it failed before writing).
fn poll_once_then_drop<F: Future>(faults: &Faults, fut: F) -> bool {
    faults.stall_syncer.store(true, Ordering::SeqCst);
    let pending = {
        let mut fut = pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        matches!(fut.as_mut().poll(&mut cx), Poll::Pending)
    };
    faults.stall_syncer.store(false, Ordering::SeqCst);
    pending
}

fn message(body: &str) -> NewMessage {
    NewMessage {
        body: body.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn stats(broker: &Broker, queue: &str) -> (u64, u64, u64) {
    let s = broker.get_queue(queue).unwrap().stats;
    (s.total, s.in_flight, s.acked)
}

#[test]
fn a_publish_whose_caller_went_away_is_delivered_and_frees_its_reservation() {
    let rt = runtime();
    let (harness, faults) = harness();
    let broker = harness.broker();
    let patch: ConfigPatch = serde_json::from_str(r#"{"max_messages": 20}"#).unwrap();
    rt.block_on(broker.put_queue("q", &patch)).unwrap();
    let mut dropped = 0;
    for i in 0..20 {
        let batch = [message(&format!("m{i}"))];
        if poll_once_then_drop(&faults, broker.publish("q", &batch, AckLevel::Durable)) {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 20, "every publish was waiting for its write");
    broker.store().wait_idle();
    let got = rt.block_on(broker.receive("q", 100, 0, None)).unwrap();
    assert_eq!(
        got.len(),
        20,
        "{dropped} publishes were dropped while writing"
    );
    assert_eq!(broker.get_queue("q").unwrap().stats.published, 20);
    let receipts: Vec<String> = got.iter().map(|d| d.receipt.clone()).collect();
    rt.block_on(broker.ack("q", &receipts)).unwrap();
    // The queue is empty: it takes max_messages again (a reservation left behind by a
    // dropped publish made it refuse with queue_full).
    let batch: Vec<NewMessage> = (0..20).map(|i| message(&format!("again {i}"))).collect();
    rt.block_on(broker.publish("q", &batch, AckLevel::Durable))
        .unwrap();
}

#[test]
fn a_binary_publish_whose_caller_went_away_is_delivered() {
    let rt = runtime();
    let (harness, faults) = harness();
    let broker = harness.broker();
    rt.block_on(broker.put_queue("q", &ConfigPatch::default()))
        .unwrap();
    let mut builder = tidewater_storage::BatchBuilder::new(0, 0);
    for i in 0..3 {
        let id = format!("id-{i}");
        builder.push(&tidewater_storage::NewRecord {
            id: id.as_bytes(),
            body: b"x",
            ..Default::default()
        });
    }
    // start_publish_batch submits before it is polled: hold the syncer from here.
    faults.stall_syncer.store(true, Ordering::SeqCst);
    let pending = broker
        .start_publish_batch("q", builder.finish(), AckLevel::Durable)
        .unwrap();
    assert!(poll_once_then_drop(&faults, pending));
    broker.store().wait_idle();
    let got = rt.block_on(broker.receive("q", 100, 0, None)).unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(broker.get_queue("q").unwrap().stats.published, 3);
}

#[test]
fn an_ack_whose_caller_went_away_settles() {
    let rt = runtime();
    let (harness, faults) = harness();
    let broker = harness.broker();
    rt.block_on(broker.put_queue("q", &ConfigPatch::default()))
        .unwrap();
    let batch: Vec<NewMessage> = (0..20).map(|i| message(&format!("m{i}"))).collect();
    rt.block_on(broker.publish("q", &batch, AckLevel::Durable))
        .unwrap();
    let got = rt.block_on(broker.receive("q", 20, 0, None)).unwrap();
    let mut dropped = 0;
    for delivery in &got {
        let receipts = [delivery.receipt.clone()];
        if poll_once_then_drop(&faults, broker.ack("q", &receipts)) {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 20, "every ack was waiting for its write");
    broker.store().wait_idle();
    assert_eq!(stats(broker, "q"), (0, 0, 20), "(total, in flight, acked)");
}

#[test]
fn a_nack_to_the_dead_letter_queue_whose_caller_went_away_moves_the_message() {
    let rt = runtime();
    let (harness, faults) = harness();
    let broker = harness.broker();
    let patch: ConfigPatch = serde_json::from_str(r#"{"max_deliveries": 1}"#).unwrap();
    rt.block_on(broker.put_queue("q", &patch)).unwrap();
    // The dead-letter queue exists first: the nack's only wait is its move.
    rt.block_on(broker.put_queue("q-dlq", &ConfigPatch::default()))
        .unwrap();
    let batch: Vec<NewMessage> = (0..20).map(|i| message(&format!("m{i}"))).collect();
    rt.block_on(broker.publish("q", &batch, AckLevel::Durable))
        .unwrap();
    let got = rt.block_on(broker.receive("q", 20, 0, None)).unwrap();
    let mut dropped = 0;
    for delivery in &got {
        let receipts = [delivery.receipt.clone()];
        let nack = broker.nack("q", &receipts, None, Some("boom"), NackReason::Failed);
        if poll_once_then_drop(&faults, nack) {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 20, "every nack was waiting for its move");
    broker.store().wait_idle();
    assert_eq!(
        stats(broker, "q").0,
        0,
        "the source queue still holds messages"
    );
    assert_eq!(stats(broker, "q-dlq").0, 20);
}
