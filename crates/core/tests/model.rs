//! Model-based test: random operation sequences run against the broker (with real storage
//! on a temp dir, a manual clock and fixed jitter) and against a trivial reference model.
//! Covers publish (with delays), receive, ack, nack with and without delay, extend, lease
//! expiry, dead-lettering after max deliveries, redrive, purge, message time to live,
//! republishing (deduplication), and restart at any step.

use std::sync::Arc;

use proptest::prelude::*;
use tidewater_core::broker::record_id;
use tidewater_core::clock::FixedJitter;
use tidewater_core::config::BackoffPatch;
use tidewater_core::harness::{Harness, HarnessOptions};
use tidewater_core::{AckLevel, ConfigPatch, Delay, NackReason, NewMessage, RedriveRequest};

const QUEUE: &str = "work";
const DLQ: &str = "work-dlq";
const MAX_DELIVERIES: u32 = 3;
const LEASE_MS: u64 = 1_000;
const BACKOFF_BASE_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 1_000;

#[derive(Debug, Clone)]
enum Action {
    Publish {
        n: usize,
        delay_ms: Option<u64>,
        /// Each message's own time to live.
        ttl_ms: Option<u64>,
    },
    Receive {
        max: usize,
        lease_ms: Option<u64>,
    },
    Ack {
        pick: usize,
    },
    Nack {
        pick: usize,
        delay_ms: Option<u64>,
    },
    Extend {
        pick: usize,
        lease_ms: u64,
    },
    Advance {
        ms: i64,
    },
    /// Time passes with no maintenance run: leases past their deadline are not yet expired.
    AdvanceQuiet {
        ms: i64,
    },
    /// Publishes again a message id published before (within the dedup window).
    Republish {
        pick: usize,
    },
    Purge,
    Redrive,
    Restart,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (1usize..4, prop::option::weighted(0.3, 1u64..2_500), prop::option::weighted(0.2, 1u64..3_000)).prop_map(|(n, delay_ms, ttl_ms)| Action::Publish { n, delay_ms, ttl_ms }),
        4 => (1usize..5, prop::option::weighted(0.3, 1u64..3_000)).prop_map(|(max, lease_ms)| Action::Receive { max, lease_ms }),
        3 => any::<usize>().prop_map(|pick| Action::Ack { pick }),
        2 => (any::<usize>(), prop::option::weighted(0.5, 0u64..1_500)).prop_map(|(pick, delay_ms)| Action::Nack { pick, delay_ms }),
        1 => (any::<usize>(), 1u64..3_000).prop_map(|(pick, lease_ms)| Action::Extend { pick, lease_ms }),
        3 => (1i64..2_000).prop_map(|ms| Action::Advance { ms }),
        2 => (1i64..1_500).prop_map(|ms| Action::AdvanceQuiet { ms }),
        1 => any::<usize>().prop_map(|pick| Action::Republish { pick }),
        1 => Just(Action::Purge),
        1 => Just(Action::Redrive),
        1 => Just(Action::Restart),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Deliverable from this time on.
    Ready {
        at: i64,
    },
    Leased {
        receipt: String,
        deadline: i64,
    },
    Done,
    Dead,
}

#[derive(Debug, Clone)]
struct Msg {
    id: String,
    state: State,
    /// Deliveries so far.
    count: u32,
    /// Deliveries as storage knows them (written at nack and lease expiry).
    journaled: u32,
    /// Published with a delay (first deliveries of these may leave publish order).
    delayed: bool,
    /// Bytes it counts against max_bytes; None after a redrive (it gained DLQ headers).
    size: Option<u64>,
    /// Past this time it is never delivered; the broker drops it when it comes across it,
    /// so until purge the model cannot tell whether it is still counted ("limbo").
    expires_at: Option<i64>,
    /// When it went to the dead-letter queue (a sequence number): redrive brings messages
    /// back in that order.
    dead_seq: u64,
}

/// Sequence of moves to the dead-letter queue.
static DEAD_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Msg {
    fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Waiting (not leased) and expired: the broker may or may not have dropped it yet.
    fn in_limbo(&self, now: i64) -> bool {
        matches!(self.state, State::Ready { .. }) && self.expired(now)
    }
}

#[derive(Default)]
struct Model {
    /// Main queue messages in publish order.
    msgs: Vec<Msg>,
    /// Every receipt ever handed out (stale ones included).
    receipts: Vec<(String, String)>,
    next_id: usize,
}

fn backoff(count: u32) -> i64 {
    let exp = 2f64.powi(count.saturating_sub(1) as i32);
    (BACKOFF_BASE_MS as f64 * exp)
        .min(BACKOFF_MAX_MS as f64)
        .round() as i64
}

impl Model {
    fn find(&mut self, id: &str) -> &mut Msg {
        self.msgs
            .iter_mut()
            .rev()
            .find(|m| m.id == id && !matches!(m.state, State::Done))
            .expect("known message")
    }

    /// After a delivery ends without an ack: retry later or dead-letter.
    fn unacked(msg: &mut Msg, now: i64, delay: Option<i64>) {
        msg.journaled = msg.count;
        if msg.count >= MAX_DELIVERIES {
            msg.state = State::Dead;
            msg.dead_seq = DEAD_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            msg.state = State::Ready {
                at: now + delay.unwrap_or_else(|| backoff(msg.count)),
            };
        }
    }

    fn expire(&mut self, now: i64) {
        // In the broker's order: by deadline, then offset (publish order).
        let mut expired: Vec<(i64, usize)> = (0..self.msgs.len())
            .filter_map(|i| match self.msgs[i].state {
                State::Leased { deadline, .. } if deadline <= now => Some((deadline, i)),
                _ => None,
            })
            .collect();
        expired.sort_unstable();
        for (_, i) in expired {
            // Deliverable again at once: no backoff after an expired lease.
            Model::unacked(&mut self.msgs[i], now, Some(0));
        }
    }

    fn valid_lease(&self, id: &str, receipt: &str, now: i64) -> bool {
        self.msgs.iter().any(|m| m.id == id && matches!(&m.state, State::Leased { receipt: r, deadline } if r == receipt && *deadline > now))
    }
}

fn run(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut h = Harness::temporary(HarnessOptions {
            start_ms: 1_000_000,
            ..HarnessOptions::default()
        })
        .unwrap();
        let patch = ConfigPatch {
            lease_ms: Some(LEASE_MS),
            max_deliveries: Some(MAX_DELIVERIES),
            backoff: Some(BackoffPatch {
                base_ms: Some(BACKOFF_BASE_MS),
                multiplier: Some(2.0),
                max_ms: Some(BACKOFF_MAX_MS),
            }),
            ..ConfigPatch::default()
        };
        h.broker().put_queue(QUEUE, &patch).await.unwrap();
        let mut model = Model::default();
        for action in actions {
            let now = h.clock.now();
            match action {
                Action::Publish {
                    n,
                    delay_ms,
                    ttl_ms,
                } => {
                    let msgs: Vec<NewMessage> = (0..n)
                        .map(|i| NewMessage {
                            id: Some(format!("m{}", model.next_id + i)),
                            body: format!("body {}", model.next_id + i).into_bytes(),
                            delay: delay_ms.map_or(Delay::None, Delay::AfterMs),
                            ttl_ms,
                            ..NewMessage::default()
                        })
                        .collect();
                    let ids = h
                        .broker()
                        .publish(QUEUE, &msgs, AckLevel::Durable)
                        .await
                        .unwrap()
                        .ids;
                    prop_assert_eq!(ids.len(), n);
                    for id in ids {
                        model.next_id += 1;
                        let at = now + delay_ms.unwrap_or(0) as i64;
                        // Body, plus the reserved header carrying the message's ttl.
                        let ttl_header =
                            ttl_ms.map_or(0, |t| "tidewater-ttl-ms".len() + t.to_string().len());
                        let size = Some((format!("body {}", &id[1..]).len() + ttl_header) as u64);
                        model.msgs.push(Msg {
                            dead_seq: 0,
                            id,
                            state: State::Ready { at },
                            count: 0,
                            journaled: 0,
                            delayed: delay_ms.is_some(),
                            size,
                            expires_at: ttl_ms.map(|t| now + t as i64),
                        });
                    }
                }
                Action::Receive { max, lease_ms } => {
                    model.expire(now);
                    let got = h.broker().receive(QUEUE, max, 0, lease_ms).await.unwrap();
                    // Expired messages are never delivered (the broker drops them instead).
                    let deliverable: Vec<String> = model
                        .msgs
                        .iter()
                        .filter(|m| {
                            !m.expired(now) && matches!(m.state, State::Ready { at } if at <= now)
                        })
                        .map(|m| m.id.clone())
                        .collect();
                    prop_assert_eq!(
                        got.len(),
                        max.min(deliverable.len()),
                        "deliverable {:?}",
                        deliverable
                    );
                    // First deliveries of undelayed messages come in publish order, oldest first.
                    let fresh: Vec<String> = model
                        .msgs
                        .iter()
                        .filter(|m| {
                            m.count == 0
                                && !m.delayed
                                && !m.expired(now)
                                && matches!(m.state, State::Ready { at } if at <= now)
                        })
                        .map(|m| m.id.clone())
                        .collect();
                    let got_fresh: Vec<String> = got
                        .iter()
                        .map(|d| record_id(&d.record))
                        .filter(|id| fresh.contains(id))
                        .collect();
                    prop_assert_eq!(&got_fresh[..], &fresh[..got_fresh.len()]);
                    let lease = lease_ms.unwrap_or(LEASE_MS) as i64;
                    for delivery in got {
                        let id = record_id(&delivery.record);
                        prop_assert!(deliverable.contains(&id), "{} was not deliverable", id);
                        prop_assert_eq!(
                            delivery.record.body.clone(),
                            format!("body {}", &id[1..]).into_bytes()
                        );
                        let msg = model.find(&id);
                        msg.count += 1;
                        prop_assert_eq!(
                            delivery.delivery_count,
                            msg.count,
                            "delivery count of {}",
                            id
                        );
                        msg.state = State::Leased {
                            receipt: delivery.receipt.clone(),
                            deadline: now + lease,
                        };
                        model.receipts.push((id, delivery.receipt));
                    }
                }
                Action::Ack { pick } | Action::Nack { pick, .. } | Action::Extend { pick, .. }
                    if model.receipts.is_empty() =>
                {
                    let _ = pick;
                }
                Action::Ack { pick } => {
                    let (id, receipt) = model.receipts[pick % model.receipts.len()].clone();
                    let valid = model.valid_lease(&id, &receipt, now);
                    let reply = h
                        .broker()
                        .ack(QUEUE, std::slice::from_ref(&receipt))
                        .await
                        .unwrap();
                    prop_assert_eq!(reply.ok, valid as u64, "ack of {}", id);
                    if valid {
                        model.find(&id).state = State::Done;
                    } else {
                        prop_assert_eq!(reply.failed[0].code, "stale_receipt");
                    }
                }
                Action::Nack { pick, delay_ms } => {
                    let (id, receipt) = model.receipts[pick % model.receipts.len()].clone();
                    let valid = model.valid_lease(&id, &receipt, now);
                    let reply = h
                        .broker()
                        .nack(
                            QUEUE,
                            std::slice::from_ref(&receipt),
                            delay_ms,
                            Some("boom"),
                            NackReason::Failed,
                        )
                        .await
                        .unwrap();
                    prop_assert_eq!(reply.ok, valid as u64);
                    if valid {
                        Model::unacked(model.find(&id), now, delay_ms.map(|d| d as i64));
                    }
                }
                Action::Extend { pick, lease_ms } => {
                    let (id, receipt) = model.receipts[pick % model.receipts.len()].clone();
                    let valid = model.valid_lease(&id, &receipt, now);
                    let reply = h
                        .broker()
                        .extend(QUEUE, std::slice::from_ref(&receipt), Some(lease_ms))
                        .unwrap();
                    prop_assert_eq!(reply.ok, valid as u64);
                    if valid && let State::Leased { deadline, .. } = &mut model.find(&id).state {
                        *deadline = now + lease_ms as i64;
                    }
                }
                Action::Advance { ms } => {
                    h.clock.advance(ms);
                    h.broker().run_maintenance().await;
                    model.expire(h.clock.now());
                }
                Action::AdvanceQuiet { ms } => h.clock.advance(ms),
                Action::Republish { pick } => {
                    if model.next_id == 0 {
                        continue;
                    }
                    let n = pick % model.next_id;
                    let msg = NewMessage {
                        id: Some(format!("m{n}")),
                        body: b"a repeat".to_vec(),
                        ..NewMessage::default()
                    };
                    let reply = h
                        .broker()
                        .publish(QUEUE, &[msg], AckLevel::Durable)
                        .await
                        .unwrap();
                    // Every id is younger than the 5-minute default window: a duplicate,
                    // even after restarts, acked or not.
                    prop_assert_eq!(reply.duplicates, vec![0], "m{} again", n);
                }
                Action::Purge => {
                    let removed = h.broker().purge(QUEUE).await.unwrap();
                    let (mut expected, mut limbo) = (0, 0);
                    for msg in &mut model.msgs {
                        if !matches!(msg.state, State::Done | State::Dead) {
                            if msg.in_limbo(now) {
                                limbo += 1;
                            } else {
                                expected += 1;
                            }
                            msg.state = State::Done;
                        }
                    }
                    prop_assert!(
                        (expected..=expected + limbo).contains(&removed),
                        "purged {} of {} live and {} expired",
                        removed,
                        expected,
                        limbo
                    );
                }
                Action::Redrive => {
                    if h.broker().get_queue(DLQ).is_err() {
                        continue;
                    }
                    let progress = h
                        .broker()
                        .start_redrive(
                            DLQ,
                            RedriveRequest {
                                rate_per_s: 1_000,
                                ..Default::default()
                            },
                        )
                        .unwrap();
                    let done = loop {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let p = h.broker().redrive_progress(&progress.id).unwrap();
                        if p.state != "running" {
                            break p;
                        }
                    };
                    prop_assert_eq!(done.state, "done", "{:?}", done.error);
                    let mut dead: Vec<usize> = (0..model.msgs.len())
                        .filter(|&i| model.msgs[i].state == State::Dead)
                        .collect();
                    dead.sort_by_key(|&i| model.msgs[i].dead_seq);
                    prop_assert_eq!(done.moved, dead.len() as u64);
                    for i in dead {
                        let id = model.msgs[i].id.clone();
                        model.msgs[i].state = State::Done;
                        model.msgs.push(Msg {
                            dead_seq: 0,
                            id,
                            state: State::Ready { at: now },
                            count: 0,
                            journaled: 0,
                            delayed: false,
                            size: None,
                            // The dead-letter queue drops reserved headers, ttl included.
                            expires_at: None,
                        });
                    }
                }
                Action::Restart => {
                    h.restart();
                    for msg in &mut model.msgs {
                        if let State::Leased { .. } = msg.state {
                            msg.state = State::Ready { at: now };
                        }
                        msg.count = msg.journaled;
                    }
                }
            }
            h.broker().debug_check_consistency();
            let info = h.broker().get_queue(QUEUE).unwrap();
            let live = model
                .msgs
                .iter()
                .filter(|m| !matches!(m.state, State::Done | State::Dead))
                .count() as u64;
            let leased = model
                .msgs
                .iter()
                .filter(|m| matches!(m.state, State::Leased { .. }))
                .count() as u64;
            let now = h.clock.now();
            let limbo = model.msgs.iter().filter(|m| m.in_limbo(now)).count() as u64;
            prop_assert!(
                (live - limbo..=live).contains(&info.stats.total),
                "unsettled messages: {} of {} live ({} expired)",
                info.stats.total,
                live,
                limbo
            );
            prop_assert_eq!(info.stats.in_flight, leased, "leased messages");
            let sizes: Option<u64> = model
                .msgs
                .iter()
                .filter(|m| !matches!(m.state, State::Done | State::Dead))
                .map(|m| m.size)
                .sum();
            if let Some(bytes) = sizes
                && limbo == 0
            {
                prop_assert_eq!(info.stats.bytes, bytes, "backlog bytes");
            }
            let dead = model.msgs.iter().filter(|m| m.state == State::Dead).count() as u64;
            let dlq_total = h.broker().get_queue(DLQ).map_or(0, |q| q.stats.total);
            prop_assert_eq!(dlq_total, dead, "dead-lettered messages");
        }
        // Dead-lettered messages carry their history.
        if let Ok(peeked) = h.broker().peek(DLQ, 0, 100) {
            for p in peeked {
                let count =
                    tidewater_core::broker::header(&p.record, "tidewater-delivery-count").unwrap();
                prop_assert_eq!(count, MAX_DELIVERIES.to_string());
                prop_assert_eq!(
                    tidewater_core::broker::header(&p.record, "tidewater-source-queue").unwrap(),
                    QUEUE
                );
            }
        }
        drop(h);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2_000, ..ProptestConfig::default() })]
    #[test]
    fn broker_matches_the_reference_model(actions in prop::collection::vec(action(), 1..60)) {
        run(actions)?;
    }
}

#[test]
fn long_scripted_run_with_every_action() {
    use Action::*;
    let mut script = Vec::new();
    for round in 0..30 {
        script.extend([
            Publish {
                n: 3,
                delay_ms: (round % 3 == 0).then_some(500),
                ttl_ms: (round % 4 == 1).then_some(1_500),
            },
            Receive {
                max: 4,
                lease_ms: None,
            },
            Ack { pick: round },
            Nack {
                pick: round + 1,
                delay_ms: None,
            },
            Advance { ms: 1_100 },
            Receive {
                max: 2,
                lease_ms: Some(200),
            },
            Extend {
                pick: round + 2,
                lease_ms: 2_000,
            },
        ]);
        if round % 7 == 3 {
            script.push(Restart);
        }
        if round % 11 == 5 {
            script.push(Redrive);
        }
    }
    script.push(Purge);
    run(script).unwrap();
}

#[test]
fn history_survives_restart_into_the_dead_letter_queue() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut h = Harness::temporary(HarnessOptions {
            start_ms: 5_000,
            jitter: Arc::new(FixedJitter(0.0)),
            ..HarnessOptions::default()
        })
        .unwrap();
        let broker = h.broker();
        broker
            .put_queue(
                "q",
                &ConfigPatch {
                    max_deliveries: Some(2),
                    ..ConfigPatch::default()
                },
            )
            .await
            .unwrap();
        broker
            .publish(
                "q",
                &[NewMessage {
                    body: b"poison".to_vec(),
                    ..NewMessage::default()
                }],
                AckLevel::Durable,
            )
            .await
            .unwrap();
        let first = broker.receive("q", 1, 0, None).await.unwrap();
        broker
            .nack(
                "q",
                &[first[0].receipt.clone()],
                Some(0),
                Some("parse error: bad byte"),
                NackReason::Failed,
            )
            .await
            .unwrap();
        h.restart();
        let broker = h.broker();
        let second = broker.receive("q", 1, 0, None).await.unwrap();
        assert_eq!(second[0].delivery_count, 2);
        broker
            .nack(
                "q",
                &[second[0].receipt.clone()],
                None,
                Some("parse error again"),
                NackReason::Failed,
            )
            .await
            .unwrap();
        let dead = broker.peek("q-dlq", 0, 10).unwrap();
        assert_eq!(dead.len(), 1);
        let record = &dead[0].record;
        assert_eq!(&record.body[..], b"poison");
        let header = |name| tidewater_core::broker::header(record, name).unwrap();
        assert_eq!(header("tidewater-delivery-count"), "2");
        assert_eq!(header("tidewater-last-error"), "parse error again");
        assert!(header("tidewater-errors").contains("parse error: bad byte"));
        assert_eq!(broker.get_queue("q").unwrap().stats.total, 0);
        assert_eq!(broker.get_queue("q").unwrap().stats.dead_lettered, 1);
    });
}
