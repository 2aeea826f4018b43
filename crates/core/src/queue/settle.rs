//! Settling: receipts, lease ends and extensions, acks, retries and their history,
//! purges.

use std::ops::Range;

use tidewater_storage::Op;

use crate::clock::Jitter;
use crate::error::ErrorCode;

use super::{History, Lease, QueueState, Unacked, offset_of, position, source_of};
use crate::receipt::Receipt;

impl QueueState {
    /// Checks a receipt against the current lease of its message; returns the message's
    /// position.
    pub fn check_receipt(&self, receipt: &str, now_ms: i64) -> Result<u64, ErrorCode> {
        let parsed = Receipt::decode(receipt).ok_or(ErrorCode::InvalidReceipt)?;
        let index = self
            .source_index(parsed.log_uid)
            .ok_or(ErrorCode::InvalidReceipt)?;
        if parsed.offset > offset_of(u64::MAX) {
            return Err(ErrorCode::InvalidReceipt);
        }
        let pos = position(index, parsed.offset);
        match self.leases.get(&pos) {
            Some(lease) if lease.nonce == parsed.nonce && lease.deadline_ms > now_ms => Ok(pos),
            _ => Err(ErrorCode::StaleReceipt),
        }
    }

    /// The storage ops that settle these positions for good: one `Settle` per source.
    pub fn settle_ops(&self, positions: &[u64]) -> Vec<Op> {
        if let [only] = &self.sources[..] {
            // A queue: positions are offsets.
            return vec![Op::Settle {
                uid: only.uid,
                ranges: crate::plan::to_ranges(positions),
            }];
        }
        let mut by_source: Vec<Vec<u64>> = vec![Vec::new(); self.sources.len()];
        for &pos in positions {
            by_source[source_of(pos)].push(offset_of(pos));
        }
        by_source
            .into_iter()
            .enumerate()
            .filter(|(_, offsets)| !offsets.is_empty())
            .map(|(index, offsets)| Op::Settle {
                uid: self.sources[index].uid,
                ranges: crate::plan::to_ranges(&offsets),
            })
            .collect()
    }

    /// Ends a valid lease; the message is now being settled or rescheduled by the caller.
    pub fn release(&mut self, offset: u64) -> Option<Lease> {
        let lease = self.leases.remove(&offset)?;
        self.lease_expiry.remove(&(lease.deadline_ms, offset));
        Some(lease)
    }

    pub fn extend(&mut self, offset: u64, now_ms: i64, lease_ms: u64) -> Option<i64> {
        let lease = self.leases.get_mut(&offset)?;
        self.lease_expiry.remove(&(lease.deadline_ms, offset));
        lease.deadline_ms = now_ms + lease_ms as i64;
        self.lease_expiry.insert((lease.deadline_ms, offset));
        Some(lease.deadline_ms)
    }

    /// Marks released messages as being settled (their settle record is in flight).
    pub fn begin_settle(&mut self, offsets: &[u64]) {
        self.settling.extend(offsets.iter().copied());
    }

    /// Storage confirmed (or refused) a settle. `sizes` are the messages' bytes.
    pub fn finish_settle(&mut self, offsets: &[(u64, u64)], ok: bool, now_ms: i64) {
        for &(offset, size) in offsets {
            self.settling.remove(&offset);
            if ok {
                let src = self.src_mut(offset);
                if offset >= src.ack_floor && src.settled.insert_one(offset) {
                    self.backlog_bytes -= size as i64;
                }
                self.history.remove(&offset);
                if let Some(gate) = &mut self.keys {
                    gate.settled(offset);
                }
                if let Some(s) = &mut self.supersede {
                    s.flagged.remove(&offset);
                }
            } else if !self.is_settled_or_busy(offset) {
                self.ready.push_back(offset);
            }
        }
        if ok {
            self.drain.record(offsets.len() as u64, now_ms);
            self.advance_floor();
        }
    }

    pub(super) fn advance_floor(&mut self) {
        for src in &mut self.sources {
            let floor = src.settled.end_of_run(src.ack_floor);
            if floor != src.ack_floor {
                src.ack_floor = floor;
                src.settled.remove_below(floor);
                src.cursor = src.cursor.max(floor);
            }
        }
    }

    /// Leases whose deadline passed, removed from the lease table.
    pub fn expire_leases(&mut self, now_ms: i64) -> Vec<Unacked> {
        let mut out = Vec::new();
        while let Some(&(deadline, offset)) = self.lease_expiry.first() {
            if deadline > now_ms {
                break;
            }
            self.lease_expiry.pop_first();
            if let Some(lease) = self.leases.remove(&offset) {
                out.push(Unacked {
                    offset,
                    delivery_count: lease.delivery_count,
                    size: lease.size,
                });
            }
        }
        self.counters.expired += out.len() as u64;
        out
    }

    /// Schedules another delivery of a released message.
    pub fn schedule_retry(
        &mut self,
        offset: u64,
        delivery_count: u32,
        deliver_at_ms: i64,
        error: Option<(i64, String)>,
        now_ms: i64,
    ) {
        self.record_attempt(offset, delivery_count, error);
        if deliver_at_ms > now_ms {
            self.add_timer(offset, deliver_at_ms);
        } else {
            self.ready.push_back(offset);
        }
    }

    /// Remembers a delivery that ended without an ack, and why.
    pub fn record_attempt(
        &mut self,
        offset: u64,
        delivery_count: u32,
        error: Option<(i64, String)>,
    ) {
        let history = self.history.entry(offset).or_default();
        history.delivery_count = history.delivery_count.max(delivery_count);
        if let Some(error) = error {
            if history.errors.len() == tidewater_storage::state::MAX_ERRORS_KEPT {
                history.errors.pop_front();
            }
            history.errors.push_back(error);
        }
    }

    pub fn history(&self, offset: u64) -> Option<&History> {
        self.history.get(&offset)
    }

    /// Everything accepted so far, to settle for a purge (position ranges, one per source
    /// with messages), with the bytes it holds now.
    pub fn purge_ranges(&self) -> (Vec<Range<u64>>, i64) {
        let ranges = self
            .sources
            .iter()
            .map(|src| src.ack_floor..src.end())
            .filter(|range| !range.is_empty())
            .collect();
        (ranges, self.backlog_bytes)
    }

    /// The storage ops that settle position ranges (each within one source).
    pub fn settle_range_ops(&self, ranges: &[Range<u64>]) -> Vec<Op> {
        ranges
            .iter()
            .filter(|range| !range.is_empty())
            .map(|range| Op::Settle {
                uid: self.src(range.start).uid,
                ranges: vec![
                    offset_of(range.start)..offset_of(range.start) + (range.end - range.start),
                ],
            })
            .collect()
    }

    /// Applies a purge that storage confirmed; returns how many messages it removed.
    /// `bytes` is the backlog size taken with the ranges: later publishes keep theirs.
    pub fn apply_purge(&mut self, ranges: &[Range<u64>], bytes: i64) -> u64 {
        let mut removed = 0;
        for range in ranges {
            removed += self.purge_one(range.clone());
        }
        self.backlog_bytes = if self.unsettled() == 0 {
            0
        } else {
            (self.backlog_bytes - bytes).max(0)
        };
        self.counters.purged += removed;
        removed
    }

    /// Takes the unsettled messages of a position range (within one source) out of the
    /// state, as settled, without counting them as purged (retention deleted their records);
    /// returns how many there were.
    pub fn expire_range(&mut self, range: Range<u64>) -> u64 {
        self.purge_one(range)
    }

    /// Takes the messages of one position range (within one source) out of the state, as
    /// settled; returns how many were unsettled.
    fn purge_one(&mut self, range: Range<u64>) -> u64 {
        let src = self.src(range.start);
        let removed = (range.end.saturating_sub(src.ack_floor))
            .saturating_sub(src.settled.count_in(src.ack_floor..range.end));
        let offsets: Vec<u64> = self
            .leases
            .keys()
            .copied()
            .filter(|o| range.contains(o))
            .collect();
        for offset in offsets {
            self.release(offset);
        }
        let timed: Vec<u64> = self
            .timer_at
            .keys()
            .copied()
            .filter(|o| range.contains(o))
            .collect();
        for offset in timed {
            let at = self.timer_at.remove(&offset).unwrap();
            self.timers.remove(&(at, offset));
        }
        self.ready.retain(|o| !range.contains(o));
        self.history.retain(|o, _| !range.contains(o));
        // Only this range: the waiting messages of other sources stay.
        if let Some(gate) = &mut self.keys {
            gate.forget_range(&range);
        }
        if let Some(shaper) = &mut self.shaper {
            shaper.forget_range(&range);
        }
        if let Some(coalescer) = &mut self.coalescer {
            coalescer.forget_range(&range);
        }
        let src = self.src_mut(range.start);
        let start = range.start.max(src.ack_floor);
        if start < range.end {
            src.settled.insert(start..range.end);
        }
        src.cursor = src.cursor.max(range.end);
        self.advance_floor();
        removed
    }

    /// Unsettled, unleased positions from `from` on, oldest first, source by source (for
    /// peek and redrive).
    pub fn pending_offsets(&self, from: u64, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for src in self.sources.iter().skip(source_of(from)) {
            let mut offset = from.max(src.ack_floor);
            while out.len() < max && offset < src.visible_end {
                offset = src.settled.next_absent(offset);
                if offset >= src.visible_end {
                    break;
                }
                if !self.settling.contains(&offset) && !self.leases.contains_key(&offset) {
                    out.push(offset);
                }
                offset += 1;
            }
        }
        out
    }

    /// Takes unleased messages out of scheduling before moving them elsewhere (redrive).
    pub fn claim(&mut self, offsets: &[u64]) -> Vec<u64> {
        let mut claimed = Vec::new();
        for &offset in offsets {
            if source_of(offset) >= self.sources.len()
                || self.is_settled_or_busy(offset)
                || offset >= self.src(offset).visible_end
            {
                continue;
            }
            if let Some(at) = self.timer_at.remove(&offset) {
                self.timers.remove(&(at, offset));
            }
            self.settling.insert(offset);
            claimed.push(offset);
        }
        claimed
    }

    /// Marks released messages for the dead-letter queue now, whatever their delivery count
    /// (a consumer rejected them), with `error` in their history; returns them for the
    /// caller to move.
    pub fn plan_rejects(&mut self, released: Vec<Unacked>, error: &str, now: i64) -> Vec<Unacked> {
        for msg in &released {
            self.record_attempt(
                msg.offset,
                msg.delivery_count,
                Some((now, error.to_string())),
            );
        }
        let offsets: Vec<u64> = released.iter().map(|m| m.offset).collect();
        self.begin_settle(&offsets);
        released
    }

    /// Decides, for each released message, another delivery later (scheduled here; the
    /// returned `Op::Retry`s keep its history) or the dead-letter queue (marked settling,
    /// returned for the caller to move).
    pub fn plan_retries(
        &mut self,
        random: &dyn Jitter,
        released: Vec<Unacked>,
        delay_ms: Option<u64>,
        error: Option<&str>,
        now: i64,
    ) -> (Vec<Op>, Vec<Unacked>) {
        let mut ops = Vec::new();
        let mut to_dlq = Vec::new();
        let max = self.config.max_deliveries;
        for msg in released {
            let error_text = error.unwrap_or("").to_string();
            let error_entry = (!error_text.is_empty()).then(|| (now, error_text.clone()));
            if max > 0 && msg.delivery_count >= max && self.config.dead_letter_queue.is_some() {
                self.record_attempt(msg.offset, msg.delivery_count, error_entry);
                to_dlq.push(msg);
                continue;
            }
            let wait = delay_ms.unwrap_or_else(|| {
                self.config
                    .backoff
                    .delay_ms(msg.delivery_count, random.unit())
            });
            let deliver_at = now + wait as i64;
            self.schedule_retry(msg.offset, msg.delivery_count, deliver_at, error_entry, now);
            ops.push(Op::Retry {
                uid: self.src(msg.offset).uid,
                offset: offset_of(msg.offset),
                deliver_at_ms: deliver_at,
                delivery_count: msg.delivery_count,
                at_ms: now,
                error: error_text,
            });
        }
        let dlq_offsets: Vec<u64> = to_dlq.iter().map(|m| m.offset).collect();
        self.begin_settle(&dlq_offsets);
        (ops, to_dlq)
    }
}
