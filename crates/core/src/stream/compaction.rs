//! Compaction, without I/O: which sealed segments of a partition a pass reads and rewrites,
//! the bounded map of each key's latest offset, and which records stay (Kafka's log
//! cleaner, one partition at a time).
//!
//! A pass maps the keys of the dirty part (sealed segments written since the partition was
//! last compacted: from `cleaned_to` on) to the offset of their latest record, then
//! rewrites every sealed segment from the partition's start through the ones it mapped,
//! dropping each record whose key has a later record, and merging neighbours into
//! segments of at most the roll size. The active segment is never touched, nor segments
//! past the log's end in a durable checkpoint. Offsets never change.
//!
//! The map holds 128-bit hashes of keys (`KeyMap`), a fixed number of them: when it is
//! full, keys not yet in it are left for the next pass, and `cleaned_to` moves only as far
//! as every key was mapped. Dropping a record whose key maps to a later offset is right
//! whatever the map holds: the later record exists and stays (or is a tombstone, which
//! deletes the key anyway).

use std::collections::HashMap;

use tidewater_storage::SegmentInfo;

/// Bytes one bucket of the key map's table takes: 16 bytes of hash, 8 of offset, a control
/// byte. The table has a power of two of buckets, at most 7/8 of them used.
pub const KEY_MAP_BUCKET_BYTES: usize = 25;
/// What one key costs at most, the table's slack included (for sizing the budget).
pub const KEY_MAP_ENTRY_BYTES: usize = 32;

/// Each key's latest offset, by a 128-bit hash of the key, up to a fixed number of keys.
pub struct KeyMap {
    map: HashMap<u128, u64>,
    capacity: usize,
}

impl KeyMap {
    /// A map whose table fits in `budget` bytes (the largest power of two of buckets that
    /// does, 7/8 of them usable; at least one key), allocated for `expected` keys at most.
    pub fn with_budget(budget: usize, expected: usize) -> KeyMap {
        let buckets = match budget / KEY_MAP_BUCKET_BYTES {
            0 => 1,
            n => 1usize << n.ilog2(),
        };
        let capacity = (buckets * 7 / 8).max(1);
        KeyMap {
            map: HashMap::with_capacity(capacity.min(expected.max(1))),
            capacity,
        }
    }

    /// The keys it holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Notes that `key`'s latest record so far is at `offset` (offsets come in order).
    /// False when the map is full and `key` is not in it.
    pub fn insert(&mut self, key: &[u8], offset: u64) -> bool {
        let hash = key_hash(key);
        if let Some(latest) = self.map.get_mut(&hash) {
            *latest = offset;
            return true;
        }
        if self.map.len() >= self.capacity {
            return false;
        }
        self.map.insert(hash, offset);
        true
    }

    /// The offset of `key`'s latest mapped record.
    pub fn latest(&self, key: &[u8]) -> Option<u64> {
        self.map.get(&key_hash(key)).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn key_hash(key: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(key)
}

/// What a pass over one partition does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassPlan {
    /// Map keys from here (where the last pass stopped, or the partition's start)...
    pub map_from: u64,
    /// ...up to here at most: the end of the last sealed segment that may be rewritten.
    pub map_until: u64,
    /// Runs of neighbouring segments rewritten into one file each, as (base, end), from
    /// the partition's start; a run is taken only once the map reached its end.
    pub groups: Vec<(u64, u64)>,
}

/// The share of a partition's sealed bytes (those that may be rewritten) written since it
/// was last compacted (`cleaned_to`): Kafka's dirty ratio. 0 when nothing is sealed.
pub fn dirty_ratio(
    segments: &[SegmentInfo],
    start: u64,
    cleaned_to: u64,
    checkpointed_end: u64,
) -> f64 {
    let (mut clean, mut dirty) = (0u64, 0u64);
    for seg in rewritable(segments, start, checkpointed_end) {
        if seg.end <= cleaned_to {
            clean += seg.bytes;
        } else {
            dirty += seg.bytes;
        }
    }
    if clean + dirty == 0 {
        0.0
    } else {
        dirty as f64 / (clean + dirty) as f64
    }
}

/// Sealed segments holding offsets at or after `start` and wholly below the end of the
/// newest durable checkpoint (storage refuses to rewrite others).
fn rewritable(
    segments: &[SegmentInfo],
    start: u64,
    checkpointed_end: u64,
) -> impl Iterator<Item = &SegmentInfo> {
    let sealed = segments.split_last().map_or(&[][..], |(_, sealed)| sealed);
    sealed
        .iter()
        .filter(move |s| s.end > start)
        .take_while(move |s| s.end <= checkpointed_end)
}

/// The pass to run now, or `None` when the partition's dirty ratio is below `min_dirty_ratio`
/// (or nothing is dirty), unless `tombstones_due` (a tombstone's delete horizon passed: a
/// pass removes it, dirty or not, as KIP-534 makes such a partition cleanable). Groups are
/// neighbours of at most `max_segment_bytes` together (their size before compaction: an
/// upper bound), so files stay few as data shrinks.
pub fn plan_pass(
    segments: &[SegmentInfo],
    (start, cleaned_to, checkpointed_end): (u64, u64, u64),
    min_dirty_ratio: f64,
    tombstones_due: bool,
    max_segment_bytes: u64,
) -> Option<PassPlan> {
    let live: Vec<&SegmentInfo> = rewritable(segments, start, checkpointed_end).collect();
    let last = live.last()?;
    let ratio = dirty_ratio(segments, start, cleaned_to, checkpointed_end);
    let dirty_enough = last.end > cleaned_to && ratio >= min_dirty_ratio && ratio > 0.0;
    let mut groups: Vec<(u64, u64)> = Vec::new();
    let mut group_bytes = 0u64;
    for seg in &live {
        match groups.last_mut() {
            Some(group) if group_bytes + seg.bytes <= max_segment_bytes && group.1 == seg.base => {
                group.1 = seg.end;
                group_bytes += seg.bytes;
            }
            _ => {
                groups.push((seg.base, seg.end));
                group_bytes = seg.bytes;
            }
        }
    }
    // Neighbours small enough to share a file (a pass shrank them): merged even when
    // nothing is dirty, so a quiet partition does not keep many small files.
    let mergeable = groups.len() < live.len();
    if !(dirty_enough || tombstones_due || mergeable) {
        return None;
    }
    Some(PassPlan {
        map_from: cleaned_to.max(live[0].base),
        map_until: last.end,
        groups,
    })
}

/// What a pass does with one record of a segment it rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// A later record has its key.
    Superseded,
    /// A tombstone (null value) whose delete horizon passed, in the part compacted before.
    TombstoneExpired,
    /// No key (written before the stream was compacted): Kafka's cleaner drops those too.
    Keyless,
}

/// Whether a record stays. `clean_until`: offsets below it were compacted by an earlier
/// pass (every older record of their keys is gone), so a tombstone there may go once its
/// batch's delete horizon passed (`horizon_passed`).
pub fn verdict(
    key: Option<&[u8]>,
    tombstone: bool,
    offset: u64,
    map: &KeyMap,
    clean_until: u64,
    horizon_passed: bool,
) -> Verdict {
    let Some(key) = key else {
        return Verdict::Keyless;
    };
    if map.latest(key).is_some_and(|latest| latest > offset) {
        return Verdict::Superseded;
    }
    if tombstone && offset < clean_until && horizon_passed {
        return Verdict::TombstoneExpired;
    }
    Verdict::Keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(base: u64, end: u64, bytes: u64) -> SegmentInfo {
        SegmentInfo {
            base,
            end,
            bytes,
            max_timestamp: 0,
        }
    }

    #[test]
    fn the_key_map_keeps_the_latest_offset_and_stops_at_its_budget() {
        // 32 MiB holds 2^20 buckets of 25 bytes, 917,504 keys (7/8 of them).
        assert_eq!(KeyMap::with_budget(32 << 20, 0).capacity(), 917_504);
        // 100 bytes: 4 buckets, 3 keys.
        let mut map = KeyMap::with_budget(4 * KEY_MAP_BUCKET_BYTES, usize::MAX);
        assert_eq!(map.capacity(), 3);
        assert!(map.insert(b"a", 1));
        assert!(map.insert(b"b", 2));
        assert!(map.insert(b"c", 3));
        assert!(map.insert(b"a", 4), "a known key updates when full");
        assert!(!map.insert(b"d", 5), "a new key does not fit");
        assert_eq!(map.latest(b"a"), Some(4));
        assert_eq!(map.latest(b"d"), None);
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn records_go_when_superseded_and_tombstones_once_clean_and_past_their_horizon() {
        let mut map = KeyMap::with_budget(1 << 10, 16);
        map.insert(b"k", 10);
        assert_eq!(
            verdict(Some(b"k"), false, 5, &map, 0, false),
            Verdict::Superseded
        );
        assert_eq!(
            verdict(Some(b"k"), false, 10, &map, 0, false),
            Verdict::Keep
        );
        assert_eq!(
            verdict(Some(b"other"), false, 5, &map, 0, false),
            Verdict::Keep
        );
        assert_eq!(verdict(None, false, 5, &map, 0, false), Verdict::Keyless);
        // A tombstone stays until it is in the clean part and its horizon passed.
        assert_eq!(verdict(Some(b"k"), true, 10, &map, 5, true), Verdict::Keep);
        assert_eq!(
            verdict(Some(b"k"), true, 10, &map, 11, false),
            Verdict::Keep
        );
        assert_eq!(
            verdict(Some(b"k"), true, 10, &map, 11, true),
            Verdict::TombstoneExpired
        );
    }

    #[test]
    fn a_pass_runs_past_the_dirty_ratio_and_groups_neighbours_by_size() {
        // Sealed: [0,10) 100 B, [10,20) 100 B, [20,30) 100 B, [30,40) 100 B; active [40,..).
        let segments = [
            seg(0, 10, 100),
            seg(10, 20, 100),
            seg(20, 30, 100),
            seg(30, 40, 100),
            seg(40, 45, 50),
        ];
        // Small files that fit together are merged, dirty or not.
        let small = [
            seg(0, 10, 10),
            seg(10, 20, 10),
            seg(20, 30, 10),
            seg(30, 35, 5),
        ];
        let plan = plan_pass(&small, (0, 30, 30), 0.5, false, 250).unwrap();
        assert_eq!(plan.groups, vec![(0, 30)]);
        assert_eq!(plan_pass(&small[2..], (20, 30, 30), 0.5, false, 250), None);
        // All dirty: a pass over everything sealed, two files of at most 250 B.
        let plan = plan_pass(&segments, (0, 0, 45), 0.5, false, 250).unwrap();
        assert_eq!(plan.map_from, 0);
        assert_eq!(plan.map_until, 40);
        assert_eq!(plan.groups, vec![(0, 20), (20, 40)]);
        // A quarter dirty: below 0.5, nothing to do; above 0.2, a pass from 30 on.
        // (Files of 100 B at most: none merge.)
        assert_eq!(plan_pass(&segments, (0, 30, 45), 0.5, false, 100), None);
        let plan = plan_pass(&segments, (0, 30, 45), 0.2, false, 100).unwrap();
        assert_eq!((plan.map_from, plan.map_until), (30, 40));
        // Nothing dirty at all.
        assert_eq!(plan_pass(&segments, (0, 40, 45), 0.0, false, 100), None);
        // Unless a tombstone is due: a pass over everything, mapping nothing new.
        let plan = plan_pass(&segments, (0, 40, 45), 0.5, true, 250).unwrap();
        assert_eq!((plan.map_from, plan.map_until), (40, 40));
        assert_eq!(plan.groups, vec![(0, 20), (20, 40)]);
        // Only what a durable checkpoint holds, and what retention kept.
        let plan = plan_pass(&segments, (10, 0, 25), 0.5, false, 1_000).unwrap();
        assert_eq!(plan.groups, vec![(10, 20)]);
        assert_eq!(plan.map_from, 10);
        assert!((dirty_ratio(&segments, 0, 20, 45) - 0.5).abs() < 1e-9);
    }
}
