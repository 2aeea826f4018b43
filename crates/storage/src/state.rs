//! Durable facts about each log, rebuilt on recovery and written in checkpoints: its name
//! and configuration, its end offset, which offsets are settled, and retry history.
//! Leases are deliberately absent: they are volatile (see ARCHITECTURE.md).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use crate::error::FormatError;
use crate::format::{
    BATCH_HEADER_LEN, BatchHeader, Cursor, RECORD_FLAG_GENERATED_ID, has_client_ids, put_string,
    visit_records,
};
use crate::ranges::RangeSet;

/// Error texts kept per message (the newest ones).
pub const MAX_ERRORS_KEPT: usize = 5;

/// What is known about a message that was delivered and not acked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetryInfo {
    pub delivery_count: u32,
    /// When it may be delivered again (ms since the epoch).
    pub deliver_at_ms: i64,
    /// (when, error text), oldest first, at most `MAX_ERRORS_KEPT`.
    pub errors: VecDeque<(i64, String)>,
}

/// Client-chosen message ids appended within a time window, oldest first (for the
/// broker's deduplication; generated ids are never remembered). Bounded by `max`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecentIds {
    pub window_ms: u64,
    pub max: u32,
    /// (publish time, id)
    pub ids: VecDeque<(i64, Box<[u8]>)>,
}

impl RecentIds {
    pub fn set_window(&mut self, window_ms: u64, max: u32) {
        self.window_ms = window_ms;
        self.max = max;
        if window_ms == 0 {
            self.ids.clear();
        }
        self.prune(self.ids.back().map_or(0, |(at, _)| *at));
    }

    /// Remembers the client-chosen ids of an appended batch.
    pub fn remember_batch(&mut self, batch: &[u8]) {
        if self.window_ms == 0 || !has_client_ids(batch) {
            return;
        }
        let Ok(header) = BatchHeader::decode(batch) else {
            return;
        };
        let at = header.published_at_ms;
        let _ = visit_records::<FormatError>(&header, &batch[BATCH_HEADER_LEN..], |record| {
            if record.flags & RECORD_FLAG_GENERATED_ID == 0 {
                self.ids.push_back((at, record.id.into()));
            }
            Ok(())
        });
        self.prune(at);
    }

    /// Forgets ids older than the window before `now_ms`, and the oldest beyond `max`.
    fn prune(&mut self, now_ms: i64) {
        let horizon = now_ms.saturating_sub(self.window_ms as i64);
        while let Some((at, _)) = self.ids.front()
            && (*at < horizon || self.ids.len() > self.max as usize)
        {
            self.ids.pop_front();
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    pub uid: u64,
    pub name: String,
    /// Opaque to storage (JSON written by the core).
    pub config: String,
    /// Set for a view: a log with no files of its own whose offsets are those of the log
    /// `source` (its end follows the source's). It holds delivery state (settled ranges,
    /// retry history) over another log's records: a subscription's, per partition.
    pub source: Option<u64>,
    /// Offset the next appended message gets.
    pub next_offset: u64,
    /// Every offset below is settled.
    pub ack_floor: u64,
    /// Settled offsets at or above the floor.
    pub settled: RangeSet,
    pub retries: BTreeMap<u64, RetryInfo>,
    pub recent_ids: RecentIds,
}

impl LogState {
    pub fn new(uid: u64, name: String, config: String) -> Self {
        LogState {
            uid,
            name,
            config,
            source: None,
            next_offset: 0,
            ack_floor: 0,
            settled: RangeSet::new(),
            retries: BTreeMap::new(),
            recent_ids: RecentIds::default(),
        }
    }

    /// Number of appended messages that are not settled.
    pub fn unsettled(&self) -> u64 {
        self.next_offset - self.ack_floor - self.settled.len()
    }

    pub fn settle(&mut self, ranges: &[Range<u64>]) {
        for range in ranges {
            let start = range.start.max(self.ack_floor);
            let end = range.end.min(self.next_offset);
            if start >= end {
                continue;
            }
            self.settled.insert(start..end);
            let stale: Vec<u64> = self.retries.range(start..end).map(|(&o, _)| o).collect();
            for offset in stale {
                self.retries.remove(&offset);
            }
        }
        let floor = self.settled.end_of_run(self.ack_floor);
        if floor != self.ack_floor {
            self.ack_floor = floor;
            self.settled.remove_below(floor);
        }
    }

    pub fn record_retry(
        &mut self,
        offset: u64,
        deliver_at_ms: i64,
        delivery_count: u32,
        at_ms: i64,
        error: &str,
    ) {
        if offset < self.ack_floor || offset >= self.next_offset || self.settled.contains(offset) {
            return;
        }
        let info = self.retries.entry(offset).or_default();
        info.delivery_count = info.delivery_count.max(delivery_count);
        info.deliver_at_ms = deliver_at_ms;
        if !error.is_empty() {
            if info.errors.len() == MAX_ERRORS_KEPT {
                info.errors.pop_front();
            }
            info.errors.push_back((at_ms, error.to_string()));
        }
    }

    /// Encodes the state as checkpoints since version 04 hold it.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        self.encode_as(out, true);
    }

    /// Encodes the state as checkpoint versions 02 and 03 hold it (no `source`: not a view).
    pub(crate) fn encode_03(&self, out: &mut Vec<u8>) {
        debug_assert!(self.source.is_none(), "a view needs checkpoint version 04");
        self.encode_as(out, false);
    }

    fn encode_as(&self, out: &mut Vec<u8>, with_source: bool) {
        out.extend_from_slice(&self.uid.to_le_bytes());
        put_string(out, &self.name);
        put_string(out, &self.config);
        if with_source {
            out.extend_from_slice(&self.source.unwrap_or(0).to_le_bytes());
        }
        out.extend_from_slice(&self.next_offset.to_le_bytes());
        out.extend_from_slice(&self.ack_floor.to_le_bytes());
        out.extend_from_slice(&(self.settled.range_count() as u64).to_le_bytes());
        for range in self.settled.iter() {
            out.extend_from_slice(&range.start.to_le_bytes());
            out.extend_from_slice(&range.end.to_le_bytes());
        }
        out.extend_from_slice(&(self.retries.len() as u64).to_le_bytes());
        for (offset, info) in &self.retries {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&info.delivery_count.to_le_bytes());
            out.extend_from_slice(&info.deliver_at_ms.to_le_bytes());
            out.push(crate::narrow(info.errors.len(), "an error count"));
            for (at, text) in &info.errors {
                out.extend_from_slice(&at.to_le_bytes());
                put_string(out, text);
            }
        }
        let ids = &self.recent_ids;
        out.extend_from_slice(&ids.window_ms.to_le_bytes());
        out.extend_from_slice(&ids.max.to_le_bytes());
        out.extend_from_slice(&(ids.ids.len() as u64).to_le_bytes());
        for (at, id) in &ids.ids {
            out.extend_from_slice(&at.to_le_bytes());
            out.push(crate::narrow(id.len(), "a remembered id"));
            out.extend_from_slice(id);
        }
    }

    /// Decodes a state as `encode` writes it; `with_source`: as checkpoints since version
    /// 04 write it (02 and 03 have no `source`).
    pub(crate) fn decode(cur: &mut Cursor<'_>, with_source: bool) -> Result<LogState, FormatError> {
        let uid = cur.u64()?;
        let name = cur.string()?;
        let config = cur.string()?;
        let mut state = LogState::new(uid, name, config);
        if with_source {
            // Uids start at 1: 0 is "not a view"; a log is never a view of itself.
            state.source = match cur.u64()? {
                0 => None,
                source if source == uid => return Err(FormatError::BadLength),
                source => Some(source),
            };
        }
        state.next_offset = cur.u64()?;
        state.ack_floor = cur.u64()?;
        if state.ack_floor > state.next_offset {
            return Err(FormatError::BadLength);
        }
        let n_ranges = cur.u64()?;
        let mut last_end = state.ack_floor;
        for _ in 0..n_ranges {
            let start = cur.u64()?;
            let end = cur.u64()?;
            // As written: in order, apart, between the floor and the end (a range beyond
            // the end cost memory and time in proportion to its length: 0..u64::MAX hung).
            if end < start || start < last_end || end > state.next_offset {
                return Err(FormatError::BadLength);
            }
            last_end = end;
            state.settled.insert(start..end);
        }
        let n_retries = cur.u64()?;
        for _ in 0..n_retries {
            let offset = cur.u64()?;
            let mut info = RetryInfo {
                delivery_count: cur.u32()?,
                deliver_at_ms: cur.i64()?,
                errors: VecDeque::new(),
            };
            let n_errors = cur.u8()?;
            for _ in 0..n_errors {
                let at = cur.i64()?;
                info.errors.push_back((at, cur.string()?));
            }
            state.retries.insert(offset, info);
        }
        state.recent_ids.window_ms = cur.u64()?;
        state.recent_ids.max = cur.u32()?;
        let n_ids = cur.u64()?;
        for _ in 0..n_ids {
            let at = cur.i64()?;
            let len = cur.u8()? as usize;
            state.recent_ids.ids.push_back((at, cur.bytes(len)?.into()));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settling_advances_the_floor_and_forgets_retries() {
        let mut state = LogState::new(1, "q".into(), "{}".into());
        state.next_offset = 10;
        state.record_retry(1, 50, 2, 40, "timeout");
        state.settle(&[2..4]);
        assert_eq!((state.ack_floor, state.unsettled()), (0, 8));
        state.settle(&[0..2]);
        assert_eq!((state.ack_floor, state.unsettled()), (4, 6));
        assert!(state.retries.is_empty());
        // Ranges beyond the end are clipped, not trusted.
        state.settle(&[8..100]);
        assert_eq!(state.unsettled(), 4);
    }

    #[test]
    fn error_history_is_bounded() {
        let mut state = LogState::new(1, "q".into(), "{}".into());
        state.next_offset = 1;
        for attempt in 0..20 {
            state.record_retry(0, 0, attempt, attempt as i64, &format!("error {attempt}"));
        }
        let info = &state.retries[&0];
        assert_eq!(info.errors.len(), MAX_ERRORS_KEPT);
        assert_eq!(info.errors.back().unwrap().1, "error 19");
        assert_eq!(info.delivery_count, 19);
    }

    /// A log's state laid out by hand: (next_offset, ack_floor, settled ranges).
    fn encoded(next_offset: u64, ack_floor: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&3u64.to_le_bytes());
        put_string(&mut out, "q");
        put_string(&mut out, "{}");
        out.extend_from_slice(&0u64.to_le_bytes()); // source
        out.extend_from_slice(&next_offset.to_le_bytes());
        out.extend_from_slice(&ack_floor.to_le_bytes());
        out.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
        for (start, end) in ranges {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&end.to_le_bytes());
        }
        out.extend_from_slice(&0u64.to_le_bytes()); // retries
        out.extend_from_slice(&0u64.to_le_bytes()); // id window
        out.extend_from_slice(&0u32.to_le_bytes()); // max ids
        out.extend_from_slice(&0u64.to_le_bytes()); // ids
        out
    }

    fn decoded(bytes: &[u8]) -> Result<LogState, FormatError> {
        LogState::decode(&mut Cursor { buf: bytes, pos: 0 }, true)
    }

    /// Found by fuzzing (fuzz target `checkpoint`): a checkpoint (with a valid CRC) whose
    /// settled range ran far past the log's end hung recovery, filling the settled set
    /// one 4,096-offset chunk at a time; a floor above the end underflowed `unsettled`.
    #[test]
    fn a_state_the_writer_cannot_have_written_is_refused() {
        let ok = decoded(&encoded(100, 10, &[(20, 30), (40, 100)])).unwrap();
        assert_eq!(
            (ok.ack_floor, ok.settled.len(), ok.unsettled()),
            (10, 70, 20)
        );
        for (next, floor, ranges) in [
            (100, 10, vec![(1, u64::MAX)]),      // hung
            (100, 10, vec![(50, 200)]),          // beyond the end
            (100, 10, vec![(5, 20)]),            // below the floor
            (100, 10, vec![(40, 50), (20, 30)]), // out of order
            (100, 10, vec![(30, 20)]),
            (5, 10, vec![]), // floor above the end
        ] {
            assert_eq!(
                decoded(&encoded(next, floor, &ranges)),
                Err(FormatError::BadLength),
                "{next} {floor} {ranges:?}"
            );
        }
    }

    #[test]
    fn state_round_trips() {
        let mut state = LogState::new(9, "orders".into(), "{\"a\":1}".into());
        state.next_offset = 100;
        state.settle(&[0..10, 20..30]);
        state.record_retry(15, 99, 3, 98, "boom");
        state.recent_ids.set_window(1_000, 10);
        state.recent_ids.ids.push_back((5, (*b"id-1").into()));
        let mut buf = Vec::new();
        state.encode(&mut buf);
        let mut cur = Cursor { buf: &buf, pos: 0 };
        assert_eq!(LogState::decode(&mut cur, true).unwrap(), state);
        assert!(cur.done());

        let mut view = LogState::new(10, "#sub/orders/billing/0".into(), String::new());
        view.source = Some(9);
        view.next_offset = 100;
        view.settle(&[0..40]);
        let mut buf = Vec::new();
        view.encode(&mut buf);
        let mut cur = Cursor { buf: &buf, pos: 0 };
        assert_eq!(LogState::decode(&mut cur, true).unwrap(), view);
        // A view of itself is refused.
        view.source = Some(10);
        let mut buf = Vec::new();
        view.encode(&mut buf);
        let mut cur = Cursor { buf: &buf, pos: 0 };
        assert_eq!(
            LogState::decode(&mut cur, true),
            Err(FormatError::BadLength)
        );
    }
}
