//! One state over several sources (a subscription's partitions): positions, round-robin
//! first deliveries, receipts and storage ops per source, policies across sources.

use std::collections::BTreeMap;

use tidewater_storage::format::RecordView;
use tidewater_storage::{LogState, Op, ReadError, Record};

use super::{Positioned, QueueState, RecordSource, position, source_of};
use crate::clock::Jitter;
use crate::config::{Limits, QueueConfig};
use crate::error::ErrorCode;

/// A source of records in memory: offset -> (key, body); offsets may have holes.
#[derive(Default)]
struct Mem(BTreeMap<u64, (Option<&'static str>, String)>);

impl Mem {
    fn of(n: u64, key: impl Fn(u64) -> Option<&'static str>) -> Mem {
        Mem((0..n).map(|o| (o, (key(o), format!("m{o}")))).collect())
    }

    fn record(&self, offset: u64) -> Record {
        let (key, body) = &self.0[&offset];
        Record {
            offset,
            published_at_ms: 1_000,
            flags: 0,
            deliver_at_ms: 0,
            id: Default::default(),
            key: key.map(|k| k.as_bytes().to_vec().into()),
            headers: Vec::new(),
            body: body.clone().into_bytes().into(),
        }
    }
}

impl RecordSource for Mem {
    fn read(&self, from: u64, max_count: usize, _: usize) -> Result<Vec<Record>, ReadError> {
        Ok(self
            .0
            .range(from..)
            .take(max_count)
            .map(|(&o, _)| self.record(o))
            .collect())
    }

    fn read_where(
        &self,
        from: u64,
        end: u64,
        want: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Record>, ReadError> {
        Ok(self
            .0
            .range(from..end)
            .filter(|(o, _)| want(**o))
            .map(|(&o, _)| self.record(o))
            .collect())
    }

    fn scan(
        &self,
        _: u64,
        _: usize,
        _: &mut dyn FnMut(&RecordView<'_>) -> bool,
    ) -> Result<(), ReadError> {
        unimplemented!("no lanes in these tests")
    }
}

struct NoJitter;
impl Jitter for NoJitter {
    fn unit(&self) -> f64 {
        0.0
    }
}

/// A state over `parts` (source i's log uid is 10 + i), every end durable.
fn state(parts: &[&Mem], config: impl FnOnce(&mut QueueConfig)) -> QueueState {
    let mut cfg = QueueConfig::defaults_for("orders/billing", &Limits::default());
    config(&mut cfg);
    let mut state = QueueState::new(10, "orders/billing".into(), cfg);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            assert_eq!(state.add_source(10 + i as u64), i);
        }
        let end = part.0.keys().last().map_or(0, |o| o + 1);
        state.set_source_end(i, end);
        state.published(0, 0, None);
    }
    state
}

/// (source, offset, body) of deliveries.
fn delivered(deliveries: &[super::Delivery]) -> Vec<(usize, u64, String)> {
    deliveries
        .iter()
        .map(|d| {
            (
                d.source,
                d.record.offset,
                String::from_utf8(d.record.body.to_vec()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn first_deliveries_take_turns_across_sources_and_keep_each_in_order() {
    let (a, b, c) = (
        Mem::of(10, |_| None),
        Mem::of(10, |_| None),
        Mem::of(2, |_| None),
    );
    let reader = Positioned {
        sources: vec![&a, &b, &c],
    };
    let mut q = state(&[&a, &b, &c], |_| {});
    let first = q.deliver(&reader, 2_000, 6, 30_000).unwrap();
    let got = delivered(&first);
    assert_eq!(got.len(), 6);
    for src in 0..3 {
        let offsets: Vec<u64> = got.iter().filter(|d| d.0 == src).map(|d| d.1).collect();
        assert_eq!(offsets, [0, 1], "source {src}: an even share, in order");
    }
    // Source 2 runs dry: the others share what is left.
    let rest = delivered(&q.deliver(&reader, 2_000, 100, 30_000).unwrap());
    assert_eq!(rest.len(), 16);
    assert!(rest.iter().all(|d| d.0 != 2));
    assert_eq!(q.deliver(&reader, 2_000, 100, 30_000).unwrap().len(), 0);
    q.debug_check_consistency();
    assert_eq!(q.stats(2_000).in_flight, 22);
}

#[test]
fn receipts_and_storage_ops_name_each_source_and_its_own_offsets() {
    let (a, b) = (Mem::of(3, |_| None), Mem::of(3, |_| None));
    let reader = Positioned {
        sources: vec![&a, &b],
    };
    let mut q = state(&[&a, &b], |_| {});
    let out = q.deliver(&reader, 2_000, 10, 30_000).unwrap();
    assert_eq!(out.len(), 6);
    // Ack source 1's offsets 0 and 2, and source 0's offset 1.
    let pick = |src: usize, offset: u64| {
        out.iter()
            .find(|d| d.source == src && d.record.offset == offset)
            .unwrap()
            .receipt
            .clone()
    };
    let receipts = [pick(1, 0), pick(1, 2), pick(0, 1)];
    let positions: Vec<u64> = receipts
        .iter()
        .map(|r| q.check_receipt(r, 2_000).unwrap())
        .collect();
    assert_eq!(positions, [position(1, 0), position(1, 2), position(0, 1)]);
    let ops = q.settle_ops(&positions);
    let ops: Vec<(u64, Vec<std::ops::Range<u64>>)> = ops
        .into_iter()
        .map(|op| match op {
            Op::Settle { uid, ranges } => (uid, ranges),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ops, [(10, vec![1..2]), (11, vec![0..1, 2..3])]);
    for &pos in &positions {
        q.release(pos).unwrap();
    }
    q.begin_settle(&positions);
    let sized: Vec<(u64, u64)> = positions.iter().map(|&p| (p, 2)).collect();
    q.finish_settle(&sized, true, 2_000);
    // Each source's floor moves on its own.
    assert_eq!(q.source_range(0), (0, 3));
    assert_eq!(q.source_range(1), (1, 3));
    // A settled receipt is stale; a receipt of another state's log is invalid.
    assert_eq!(
        q.check_receipt(&receipts[0], 2_000),
        Err(ErrorCode::StaleReceipt)
    );
    let other = state(&[&a], |_| {});
    let foreign = crate::receipt::Receipt {
        log_uid: 99,
        offset: 0,
        nonce: 1,
    }
    .encode();
    assert_eq!(
        other.check_receipt(&foreign, 2_000),
        Err(ErrorCode::InvalidReceipt)
    );
    q.debug_check_consistency();
}

#[test]
fn a_nack_retries_in_its_source_with_history_for_its_log() {
    let (a, b) = (Mem::of(1, |_| None), Mem::of(1, |_| None));
    let reader = Positioned {
        sources: vec![&a, &b],
    };
    let mut q = state(&[&a, &b], |c| c.max_deliveries = 0);
    let out = q.deliver(&reader, 2_000, 10, 30_000).unwrap();
    let d = out.iter().find(|d| d.source == 1).unwrap();
    let pos = q.check_receipt(&d.receipt, 2_000).unwrap();
    let lease = q.release(pos).unwrap();
    let unacked = vec![super::Unacked {
        offset: pos,
        delivery_count: lease.delivery_count,
        size: lease.size,
    }];
    let (ops, dlq) = q.plan_retries(&NoJitter, unacked, Some(500), Some("boom"), 2_000);
    assert!(dlq.is_empty());
    match &ops[..] {
        [Op::Retry { uid, offset, .. }] => assert_eq!((*uid, *offset), (11, 0)),
        other => panic!("{other:?}"),
    }
    assert!(q.deliver(&reader, 2_100, 10, 30_000).unwrap().is_empty());
    let again = q.deliver(&reader, 2_500, 10, 30_000).unwrap();
    assert_eq!(delivered(&again), [(1, 0, "m0".to_string())]);
    assert_eq!(again[0].delivery_count, 2);
    q.debug_check_consistency();
}

#[test]
fn key_concurrency_holds_a_key_across_sources() {
    // The same key in two partitions (a stream that grew, or an explicit partition).
    let a = Mem::of(2, |_| Some("acct-1"));
    let b = Mem::of(2, |o| {
        if o == 0 {
            Some("acct-1")
        } else {
            Some("acct-2")
        }
    });
    let reader = Positioned {
        sources: vec![&a, &b],
    };
    let mut q = state(&[&a, &b], |c| c.key_concurrency = Some(1));
    let out = q.deliver(&reader, 2_000, 10, 30_000).unwrap();
    let keys: Vec<String> = out
        .iter()
        .map(|d| String::from_utf8(d.record.key.clone().unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(
        out.len(),
        2,
        "one acct-1 and one acct-2: {:?}",
        delivered(&out)
    );
    assert!(keys.contains(&"acct-1".to_string()) && keys.contains(&"acct-2".to_string()));
    // Acking the acct-1 message lets the next acct-1 message (either source) go.
    let d = out
        .iter()
        .find(|d| d.record.key.as_deref() == Some(b"acct-1".as_slice()))
        .unwrap();
    let pos = q.check_receipt(&d.receipt, 2_000).unwrap();
    q.release(pos).unwrap();
    q.begin_settle(&[pos]);
    q.finish_settle(&[(pos, 2)], true, 2_000);
    let next = q.deliver(&reader, 2_000, 10, 30_000).unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].record.key.as_deref(), Some(b"acct-1".as_slice()));
    q.debug_check_consistency();
}

#[test]
fn purging_one_source_leaves_the_others_waiting_messages() {
    let a = Mem::of(3, |_| Some("k"));
    let b = Mem::of(3, |_| Some("k"));
    let reader = Positioned {
        sources: vec![&a, &b],
    };
    let mut q = state(&[&a, &b], |c| c.key_concurrency = Some(1));
    let out = q.deliver(&reader, 2_000, 10, 30_000).unwrap();
    assert_eq!(out.len(), 1);
    let held = out[0].source;
    let other = 1 - held;
    // Purge the source that does not hold the key: the holder's waiting messages stay.
    let range = position(other, 0)..position(other, 3);
    assert_eq!(q.apply_purge(&[range], 0), 3);
    q.debug_check_consistency();
    let pos = q.check_receipt(&out[0].receipt, 2_000).unwrap();
    q.release(pos).unwrap();
    q.begin_settle(&[pos]);
    q.finish_settle(&[(pos, 2)], true, 2_000);
    let next = q.deliver(&reader, 2_000, 10, 30_000).unwrap();
    assert_eq!(delivered(&next), [(held, 1, "m1".to_string())]);
    assert_eq!(q.source_range(other), (3, 3));
    assert_eq!(q.unsettled(), 2);
    q.debug_check_consistency();
}

#[test]
fn a_state_over_several_logs_recovers_positions_and_history() {
    let (a, b) = (Mem::of(4, |_| None), Mem::of(4, |_| None));
    let reader = Positioned {
        sources: vec![&a, &b],
    };
    let mut local = LogState::new(10, "#sub/orders/billing".into(), "{}".into());
    local.next_offset = 4;
    local.settle(&[0..4]);
    let mut view = LogState::new(11, "#sub/orders/billing/0".into(), String::new());
    view.source = Some(3);
    view.next_offset = 4;
    view.settle(&[0..1, 2..3]);
    view.record_retry(1, 0, 3, 1_500, "boom");
    let config = QueueConfig::defaults_for("orders/billing", &Limits::default());
    let mut q = QueueState::recover_sources(
        "orders/billing",
        &[&local, &view],
        1,
        config,
        &reader,
        2_000,
    )
    .unwrap();
    assert_eq!(q.unsettled(), 2);
    assert_eq!(q.source_index(11), Some(1));
    let out = q.deliver(&reader, 2_000, 10, 30_000).unwrap();
    assert_eq!(
        delivered(&out),
        [(1, 1, "m1".to_string()), (1, 3, "m3".to_string())]
    );
    assert_eq!(out[0].delivery_count, 4, "history kept");
    assert!(
        out.iter()
            .all(|d| source_of(q.check_receipt(&d.receipt, 2_000).unwrap()) == 1)
    );
    q.debug_check_consistency();
}

#[test]
fn holes_in_a_source_are_settled_as_the_scan_passes_and_records_gone_later_too() {
    // Source 1 lost offsets 1, 2 and 5..8 to compaction; 8 is its end.
    let local = Mem::of(0, |_| None);
    let mut part = Mem::of(8, |_| None);
    for gone in [1, 2, 5, 6, 7] {
        part.0.remove(&gone);
    }
    let part_end = 8;
    let reader = Positioned {
        sources: vec![&local, &part],
    };
    let mut q = state(&[&local], |c| c.max_deliveries = 0);
    let index = q.add_source(11);
    q.set_source_holes(index);
    q.set_source_end(index, part_end);
    assert_eq!(q.unsettled(), 8);
    let out = q.deliver(&reader, 2_000, 10, 30_000).unwrap();
    assert_eq!(
        delivered(&out).iter().map(|d| d.1).collect::<Vec<_>>(),
        [0, 3, 4]
    );
    // The holes are settled in memory and handed over for storage, once.
    assert_eq!(q.unsettled(), 3);
    let skipped = q.take_skipped();
    assert_eq!(
        skipped,
        [
            position(1, 1)..position(1, 3),
            position(1, 5)..position(1, 8)
        ]
    );
    let ops = q.settle_range_ops(&skipped);
    assert!(
        matches!(&ops[..], [Op::Settle { uid: 11, ranges: a }, Op::Settle { uid: 11, ranges: b }]
        if a == &[1..3] && b == &[5..8])
    );
    assert!(q.take_skipped().is_empty());
    q.debug_check_consistency();
    // Offset 3 is nacked, then compacted away before its retry: settled when picked.
    let d = out.iter().find(|d| d.record.offset == 3).unwrap();
    let pos = q.check_receipt(&d.receipt, 2_000).unwrap();
    let lease = q.release(pos).unwrap();
    let unacked = vec![super::Unacked {
        offset: pos,
        delivery_count: lease.delivery_count,
        size: lease.size,
    }];
    q.plan_retries(&NoJitter, unacked, Some(0), None, 2_000);
    part.0.remove(&3);
    let reader = Positioned {
        sources: vec![&local, &part],
    };
    assert!(q.deliver(&reader, 2_000, 10, 30_000).unwrap().is_empty());
    assert_eq!(q.take_skipped(), [position(1, 3)..position(1, 4)]);
    assert_eq!(q.unsettled(), 2);
    q.debug_check_consistency();
}
