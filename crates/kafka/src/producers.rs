//! Idempotent producers (the default of current Kafka clients), without I/O: per producer
//! id and partition, the epoch, the sequence number expected next and the last five
//! batches appended, so that a batch sent again (after a lost connection or a timeout) is
//! answered with its first append's offset instead of being written twice, and a batch out
//! of order is refused. As Kafka's broker does (`ProducerStateManager`), five batches are
//! kept: a client has at most five in flight per partition when idempotent.
//!
//! The state is in memory, and rebuilt after a restart from the batches a partition holds
//! (their headers keep producer id, epoch and sequences): the first idempotent batch a
//! partition gets after a restart first reads the partition's last batches (`RESTORE_*`) and
//! `restore`s what they say, as Kafka rebuilds its producer state from its log. A retry of a
//! batch older than that window is taken as new.

use std::collections::{HashMap, VecDeque};

use tidewater_storage::format::kafka::KafkaBatchHeader;

/// Batches remembered per producer and partition (Kafka's `max.in.flight.requests` limit
/// for idempotent producers).
pub const RECENT_BATCHES: usize = 5;

/// What to do with a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sequenced<W> {
    /// Not an idempotent producer's batch: append it.
    Plain,
    /// The next batch in sequence (or a producer's first batch seen here): append it; it
    /// is recorded as pending, with its waiter.
    Fresh,
    /// A batch already taken: answer what its append answered (the waiter tells).
    Duplicate(W),
    /// A sequence number other than the one expected.
    OutOfOrder { expected: i32, got: i32 },
    /// An epoch older than the producer's current one (a zombie producer).
    StaleEpoch { current: i16, got: i16 },
}

struct Recent<W> {
    first: i32,
    last: i32,
    waiter: W,
}

struct Entry<W> {
    epoch: i16,
    next: i32,
    recent: VecDeque<Recent<W>>,
    used: u64,
}

/// A partition: its stream's uid (a stream made again under the same name has another)
/// and its number.
pub type PartitionKey = (u64, u32);

/// Producers' sequence state per (partition, producer id), bounded: past `cap`
/// entries the least recently used go (a producer idle that long starts over, as in
/// Kafka after `producer.id.expiration.ms`).
pub struct Producers<W> {
    entries: HashMap<(PartitionKey, i64), Entry<W>>,
    cap: usize,
    tick: u64,
    evicted: u64,
}

/// Kafka's sequence arithmetic: sequences wrap from `i32::MAX` to 0.
pub fn increment_sequence(sequence: i32, by: i32) -> i32 {
    if sequence > i32::MAX - by {
        by - (i32::MAX - sequence) - 1
    } else {
        sequence + by
    }
}

impl<W: Clone> Producers<W> {
    pub fn new(cap: usize) -> Self {
        Producers {
            entries: HashMap::new(),
            cap: cap.max(1),
            tick: 0,
            evicted: 0,
        }
    }

    /// Producer states held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// States dropped for room since the start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Checks a batch for partition `at`; a `Fresh` one is recorded at once with
    /// `waiter` (call `abandon` if its append is then refused).
    pub fn begin(
        &mut self,
        at: PartitionKey,
        header: &KafkaBatchHeader,
        waiter: impl FnOnce() -> W,
    ) -> Sequenced<W> {
        if header.producer_id < 0 {
            return Sequenced::Plain;
        }
        self.tick += 1;
        let tick = self.tick;
        let first = header.base_sequence;
        let last = increment_sequence(first, header.last_offset_delta.max(0));
        let key = (at, header.producer_id);
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.used = tick;
            if header.producer_epoch < entry.epoch {
                return Sequenced::StaleEpoch {
                    current: entry.epoch,
                    got: header.producer_epoch,
                };
            }
            if header.producer_epoch == entry.epoch {
                if let Some(seen) = entry
                    .recent
                    .iter()
                    .find(|r| r.first == first && r.last == last)
                {
                    return Sequenced::Duplicate(seen.waiter.clone());
                }
                if first != entry.next {
                    return Sequenced::OutOfOrder {
                        expected: entry.next,
                        got: first,
                    };
                }
            } else {
                // A new epoch (the producer bumped it after an error): its sequences
                // start again.
                entry.epoch = header.producer_epoch;
                entry.recent.clear();
            }
            entry.next = increment_sequence(last, 1);
            if entry.recent.len() == RECENT_BATCHES {
                entry.recent.pop_front();
            }
            entry.recent.push_back(Recent {
                first,
                last,
                waiter: waiter(),
            });
            return Sequenced::Fresh;
        }
        if self.entries.len() >= self.cap {
            self.evict();
        }
        let mut recent = VecDeque::with_capacity(RECENT_BATCHES);
        recent.push_back(Recent {
            first,
            last,
            waiter: waiter(),
        });
        self.entries.insert(
            key,
            Entry {
                epoch: header.producer_epoch,
                next: increment_sequence(last, 1),
                recent,
                used: tick,
            },
        );
        Sequenced::Fresh
    }

    /// Records a batch found in the partition (rebuilding the state after a restart), in
    /// offset order: whatever the state said, this batch is the producer's latest there.
    pub fn restore(&mut self, at: PartitionKey, header: &KafkaBatchHeader, waiter: W) {
        if header.producer_id < 0 {
            return;
        }
        self.tick += 1;
        let first = header.base_sequence;
        let last = increment_sequence(first, header.last_offset_delta.max(0));
        let entry = self
            .entries
            .entry((at, header.producer_id))
            .or_insert_with(|| Entry {
                epoch: header.producer_epoch,
                next: first,
                recent: VecDeque::with_capacity(RECENT_BATCHES),
                used: 0,
            });
        if header.producer_epoch < entry.epoch {
            return;
        }
        if header.producer_epoch > entry.epoch || entry.next != first {
            entry.recent.clear();
        }
        entry.epoch = header.producer_epoch;
        entry.next = increment_sequence(last, 1);
        entry.used = self.tick;
        if entry.recent.len() == RECENT_BATCHES {
            entry.recent.pop_front();
        }
        entry.recent.push_back(Recent {
            first,
            last,
            waiter,
        });
    }

    /// A `Fresh` batch (first sequence `first`) was refused or failed, so nothing of it was
    /// written: it and the batches recorded after it are forgotten, and the producer's next
    /// sequence is `first` again, so its retry is taken and the batches after it are out of
    /// order until then (as in Kafka, where a failed append leaves the state as it was).
    pub fn rollback(&mut self, at: PartitionKey, producer_id: i64, first: i32) {
        if let Some(entry) = self.entries.get_mut(&(at, producer_id))
            && let Some(pos) = entry.recent.iter().position(|r| r.first == first)
        {
            entry.recent.truncate(pos);
            entry.next = first;
        }
    }

    /// Whether a producer has state on a partition.
    pub fn knows(&self, at: PartitionKey, producer_id: i64) -> bool {
        self.entries.contains_key(&(at, producer_id))
    }

    /// Drops the least recently used eighth of the states.
    fn evict(&mut self) {
        let mut used: Vec<u64> = self.entries.values().map(|e| e.used).collect();
        let n = (used.len() / 8).max(1);
        let (_, cut, _) = used.select_nth_unstable(n - 1);
        let cut = *cut;
        let before = self.entries.len();
        self.entries.retain(|_, e| e.used > cut);
        self.evicted += (before - self.entries.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(pid: i64, epoch: i16, seq: i32, count: i32) -> KafkaBatchHeader {
        KafkaBatchHeader {
            base_offset: 0,
            attributes: 0,
            last_offset_delta: count - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            records_count: count,
        }
    }

    #[test]
    fn sequences_wrap_as_kafka_does() {
        assert_eq!(increment_sequence(5, 3), 8);
        assert_eq!(increment_sequence(i32::MAX, 1), 0);
        assert_eq!(increment_sequence(i32::MAX - 1, 3), 1);
    }

    #[test]
    fn a_batch_sent_again_is_a_duplicate_of_the_first() {
        let mut p = Producers::new(10);
        assert_eq!(
            p.begin((1, 0), &batch(-1, -1, -1, 3), || 0),
            Sequenced::Plain
        );
        assert_eq!(p.begin((1, 0), &batch(7, 0, 0, 3), || 10), Sequenced::Fresh);
        assert_eq!(p.begin((1, 0), &batch(7, 0, 3, 2), || 11), Sequenced::Fresh);
        assert_eq!(
            p.begin((1, 0), &batch(7, 0, 0, 3), || 99),
            Sequenced::Duplicate(10)
        );
        assert_eq!(
            p.begin((1, 0), &batch(7, 0, 3, 2), || 99),
            Sequenced::Duplicate(11)
        );
        assert_eq!(
            p.begin((1, 0), &batch(7, 0, 9, 1), || 99),
            Sequenced::OutOfOrder {
                expected: 5,
                got: 9
            }
        );
        // Another partition, another producer: their own sequences.
        assert_eq!(p.begin((2, 0), &batch(7, 0, 0, 1), || 12), Sequenced::Fresh);
        assert_eq!(p.begin((1, 0), &batch(8, 0, 0, 1), || 13), Sequenced::Fresh);
    }

    #[test]
    fn only_the_last_five_batches_are_remembered() {
        let mut p = Producers::new(10);
        for i in 0..6 {
            assert_eq!(p.begin((1, 0), &batch(7, 0, i, 1), || i), Sequenced::Fresh);
        }
        // The first fell out: it is now merely out of order.
        assert!(matches!(
            p.begin((1, 0), &batch(7, 0, 0, 1), || 99),
            Sequenced::OutOfOrder { expected: 6, .. }
        ));
        assert_eq!(
            p.begin((1, 0), &batch(7, 0, 1, 1), || 99),
            Sequenced::Duplicate(1)
        );
    }

    #[test]
    fn epochs_fence_older_producers_and_restart_sequences() {
        let mut p = Producers::new(10);
        assert_eq!(p.begin((1, 0), &batch(7, 2, 0, 1), || 0), Sequenced::Fresh);
        assert_eq!(
            p.begin((1, 0), &batch(7, 1, 1, 1), || 0),
            Sequenced::StaleEpoch { current: 2, got: 1 }
        );
        assert_eq!(p.begin((1, 0), &batch(7, 3, 0, 1), || 1), Sequenced::Fresh);
        assert_eq!(p.begin((1, 0), &batch(7, 3, 1, 1), || 2), Sequenced::Fresh);
    }

    #[test]
    fn a_restored_state_answers_retries_from_before_a_restart() {
        let mut p = Producers::new(10);
        // The partition holds producer 7's batches 0..3 and 3..5, then producer 8's.
        p.restore((1, 0), &batch(7, 0, 0, 3), 100);
        p.restore((1, 0), &batch(7, 0, 3, 2), 103);
        p.restore((1, 0), &batch(8, 2, 40, 1), 105);
        assert_eq!(
            p.begin((1, 0), &batch(7, 0, 3, 2), || 0),
            Sequenced::Duplicate(103)
        );
        assert_eq!(p.begin((1, 0), &batch(7, 0, 5, 1), || 1), Sequenced::Fresh);
        assert_eq!(
            p.begin((1, 0), &batch(8, 2, 40, 1), || 0),
            Sequenced::Duplicate(105)
        );
        assert!(matches!(
            p.begin((1, 0), &batch(8, 1, 41, 1), || 0),
            Sequenced::StaleEpoch { current: 2, got: 1 }
        ));
    }

    #[test]
    fn a_failed_batch_is_taken_again_and_the_ones_after_it_wait_for_it() {
        let mut p = Producers::new(8);
        assert_eq!(p.begin((1, 0), &batch(7, 0, 0, 2), || 0), Sequenced::Fresh);
        assert_eq!(p.begin((1, 0), &batch(7, 0, 2, 2), || 1), Sequenced::Fresh);
        assert_eq!(p.begin((1, 0), &batch(7, 0, 4, 2), || 2), Sequenced::Fresh);
        // Batch 2..4 is refused (nothing written): 4..6, pipelined after it, was not taken.
        p.rollback((1, 0), 7, 2);
        assert!(matches!(
            p.begin((1, 0), &batch(7, 0, 4, 2), || 9),
            Sequenced::OutOfOrder { expected: 2, .. }
        ));
        assert_eq!(
            p.begin((1, 0), &batch(7, 0, 0, 2), || 9),
            Sequenced::Duplicate(0)
        );
        assert_eq!(p.begin((1, 0), &batch(7, 0, 2, 2), || 3), Sequenced::Fresh);
        assert_eq!(p.begin((1, 0), &batch(7, 0, 4, 2), || 4), Sequenced::Fresh);
    }

    #[test]
    fn states_are_bounded() {
        let mut p = Producers::new(8);
        for pid in 100..200 {
            p.begin((1, 0), &batch(pid, 0, 0, 1), || 2);
            assert!(p.len() <= 8);
        }
        assert!(p.evicted() > 0);
        // The most recent stays.
        assert_eq!(
            p.begin((1, 0), &batch(199, 0, 0, 1), || 9),
            Sequenced::Duplicate(2)
        );
    }
}
