//! Delivery: the scan for deliverable messages, timers, lanes, leases, time to live.

use tidewater_storage::format::RecordView;
use tidewater_storage::{ReadError, Record};

use crate::policy::coalesce::Coalescer;
use crate::policy::keys::KeyGate;
use crate::policy::shaper::{Shaper, Staged, StagedLanes};

use super::{
    ANONYMOUS_TENANT, Delivery, HEADER_PRIORITY, HEADER_TENANT, HEADER_TTL_MS, Lease, MAX_PARKED,
    QueueState, RecordSource, SCAN_AHEAD, SCAN_BYTES, SHAPER_SCAN_STEP, Unacked, offset_of,
    source_of,
};
use crate::receipt::Receipt;

/// The records at `offsets` (any order), read in few sequential passes, in the order
/// asked; None where a record is gone (deleted with its segment: it was settled).
pub(super) fn read_offsets(
    source: &impl RecordSource,
    offsets: &[u64],
) -> Result<Vec<Option<Record>>, ReadError> {
    /// Offsets this close together are read in one pass rather than looked up apart
    /// (about 10 KiB of 150-byte messages: a chunk read either way).
    const GAP: u64 = 64;
    // Picks mostly come sorted (one lane, or the ready queue): then no reordering.
    let in_order = offsets.is_sorted_by(|a, b| a < b);
    let mut sorted = offsets.to_vec();
    if !in_order {
        sorted.sort_unstable();
        sorted.dedup();
    }
    let mut found: Vec<Option<Record>> = Vec::with_capacity(sorted.len());
    let mut i = 0;
    while i < sorted.len() {
        let first = i;
        while i + 1 < sorted.len() && sorted[i + 1] - sorted[i] <= GAP {
            i += 1;
        }
        let run = &sorted[first..=i];
        i += 1;
        // Records come in offset order: `want` walks the run instead of searching it.
        let at = std::cell::Cell::new(0);
        let want = |o: u64| {
            let mut k = at.get();
            while k < run.len() && run[k] < o {
                k += 1;
            }
            at.set(k);
            k < run.len() && run[k] == o
        };
        let mut records = source
            .read_where(run[0], run[run.len() - 1] + 1, &want)?
            .into_iter()
            .peekable();
        for &o in run {
            found.push(records.next_if(|r| r.offset == o));
        }
    }
    if in_order {
        return Ok(found);
    }
    Ok(offsets
        .iter()
        .map(|o| sorted.binary_search(o).ok().and_then(|at| found[at].take()))
        .collect())
}

impl QueueState {
    pub(super) fn add_timer(&mut self, offset: u64, at: i64) {
        if let Some(old) = self.timer_at.insert(offset, at) {
            self.timers.remove(&(old, offset));
        }
        self.timers.insert((at, offset));
    }

    /// Moves due timers to the ready queue; returns the earliest pending due time.
    pub fn fire_timers(&mut self, now_ms: i64) -> Option<i64> {
        while let Some(&(at, offset)) = self.timers.first() {
            if at > now_ms {
                return Some(at);
            }
            self.timers.pop_first();
            self.timer_at.remove(&offset);
            // Below the cursor it needs the ready queue; above it the scan finds it.
            if offset < self.src(offset).cursor && !self.is_settled_or_busy(offset) {
                self.ready.push_back(offset);
            }
        }
        None
    }

    /// Earliest time something changes on its own (a timer or a lease deadline).
    pub fn next_wakeup(&self) -> Option<i64> {
        let timer = self.timers.first().map(|&(at, _)| at);
        let lease = self.lease_expiry.first().map(|&(at, _)| at);
        let window = self.coalescer.as_ref().and_then(Coalescer::next_due);
        let parked = self.parked.first().map(|&(due, _)| due);
        [timer, lease, self.rate_wakeup, window, parked]
            .into_iter()
            .flatten()
            .min()
    }

    /// Takes leases on up to `max` messages: redeliveries first, then new messages in
    /// publish order.
    pub fn deliver(
        &mut self,
        source: &impl RecordSource,
        now_ms: i64,
        max: usize,
        lease_ms: u64,
    ) -> Result<Vec<Delivery>, ReadError> {
        self.fire_timers(now_ms);
        let mut room = (self
            .config
            .max_in_flight
            .saturating_sub(self.leases.len() as u64) as usize)
            .min(max);
        self.rate_wakeup = None;
        if let Some(rate) = &self.rate {
            let allowed = rate.available(now_ms, room);
            if allowed < room {
                // Held back by the rate: wake the long-poll when the next one conforms.
                let at = if allowed == 0 {
                    rate.next_ms()
                } else {
                    now_ms + 1
                };
                self.rate_wakeup = Some(at.max(now_ms + 1));
            }
            room = allowed;
        }
        let mut out = Vec::new();
        // Redeliveries and messages moved back to the ready queue.
        self.deliver_picks(source, room, &mut out, now_ms, lease_ms, |q| {
            q.ready.pop_front()
        })?;
        // Messages whose key got a free slot (they already hold it).
        loop {
            let mut picked = Vec::new();
            while out.len() + picked.len() < room
                && let Some(offset) = self.keys.as_mut().and_then(KeyGate::next_released)
            {
                picked.push(offset);
            }
            if picked.is_empty() {
                break;
            }
            let records = read_offsets(source, &picked)?;
            for (offset, record) in picked.into_iter().zip(records) {
                let record = match record {
                    Some(record) if !self.is_settled_or_busy(offset) => record,
                    gone => {
                        // Gone meanwhile (settled, or compacted away): free its slot for
                        // the next in line.
                        if gone.is_none() {
                            self.record_gone(offset);
                        }
                        if let Some(gate) = &mut self.keys {
                            gate.settled(offset);
                        }
                        continue;
                    }
                };
                if self.expires_at(&record).is_some_and(|at| at <= now_ms) {
                    self.expire(&record);
                } else {
                    out.push(self.lease(record, now_ms, lease_ms));
                }
            }
        }
        if self.shaper.is_some() {
            // What the lanes pick, in their order.
            self.fill_shaper(source, now_ms)?;
            self.deliver_picks(source, room, &mut out, now_ms, lease_ms, |q| {
                let gate = q.keys.as_ref();
                if gate.is_some_and(|gate| gate.parked_len() >= MAX_PARKED) {
                    return None; // bounded: wait for parked keys to move
                }
                q.shaper.as_mut().and_then(Shaper::pop)
            })?;
        }
        // First deliveries: each source's records in order; sources in turn from a rotating
        // start, each taking an even share of the room left (one source: all of it).
        if self.shaper.is_none() {
            let n = self.sources.len();
            let start = self.next_source % n;
            self.next_source = self.next_source.wrapping_add(1);
            'rounds: while out.len() < room {
                let active = (0..n)
                    .filter(|&i| self.sources[i].cursor < self.sources[i].visible_end)
                    .count();
                if active == 0 {
                    break;
                }
                let mut moved = false;
                let share = (room - out.len()).div_ceil(active);
                for i in (start..n).chain(0..start) {
                    if out.len() >= room {
                        break 'rounds;
                    }
                    let share = share.min(room - out.len());
                    let before = self.sources[i].cursor;
                    let stop = self.scan_source(source, i, share, &mut out, now_ms, lease_ms)?;
                    moved |= self.sources[i].cursor != before;
                    if stop {
                        break 'rounds;
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        self.counters.delivered += out.len() as u64;
        if let Some(rate) = &mut self.rate {
            rate.take(now_ms, out.len());
        }
        Ok(out)
    }

    /// Scans source `index` from its cursor for first deliveries, leasing up to `share` into
    /// `out`; true when the scan must stop for every source (too many messages parked).
    ///
    /// Reads about what the share takes at the share of scanned messages recently leased
    /// (the rest were parked behind their key, settled, timed): records read past the
    /// share are read again next time, so a fixed read-ahead costs a consumer taking a
    /// few at a time, and no read-ahead costs a read per leased few behind a hot key.
    fn scan_source(
        &mut self,
        source: &impl RecordSource,
        index: usize,
        share: usize,
        out: &mut Vec<Delivery>,
        now_ms: i64,
        lease_ms: u64,
    ) -> Result<bool, ReadError> {
        let (mut scanned, mut taken) = (0usize, 0usize);
        let mut stop = false;
        'scan: while taken < share && self.sources[index].cursor < self.sources[index].visible_end {
            let src = &self.sources[index];
            let (cursor, end) = (src.cursor, src.visible_end);
            let left = share - taken;
            let want = ((left as f64 / src.scan_yield).ceil() as usize).min(left + SCAN_AHEAD);
            let records = source.read(cursor, want, SCAN_BYTES)?;
            if records.is_empty() {
                // Nothing durable from the cursor on: a hole to the end (never for a queue).
                if self.sources[index].holes {
                    self.skip_hole(cursor..end);
                    self.sources[index].cursor = end;
                }
                break;
            }
            for record in records {
                if record.offset >= end {
                    self.skip_hole(self.sources[index].cursor..end);
                    self.sources[index].cursor = self.sources[index].cursor.max(end);
                    break 'scan;
                }
                self.skip_hole(self.sources[index].cursor..record.offset);
                if self
                    .keys
                    .as_ref()
                    .is_some_and(|gate| gate.parked_len() >= MAX_PARKED)
                {
                    stop = true;
                    break 'scan; // bounded lookahead: wait for parked keys to move
                }
                self.sources[index].cursor = record.offset + 1;
                scanned += 1;
                if self.is_settled_or_busy(record.offset)
                    || self.timer_at.contains_key(&record.offset)
                {
                    continue;
                }
                if record.deliver_at_ms > now_ms {
                    self.add_timer(record.offset, record.deliver_at_ms);
                    continue;
                }
                let Some(record) = self.screen(record, now_ms) else {
                    continue;
                };
                taken += 1;
                out.push(self.lease(record, now_ms, lease_ms));
                if taken == share {
                    break;
                }
            }
        }
        if scanned > 0 {
            let src = &mut self.sources[index];
            let seen = taken as f64 / scanned as f64;
            src.scan_yield = (0.5 * src.scan_yield + 0.5 * seen).clamp(0.05, 1.0);
        }
        Ok(stop)
    }

    /// Leases the messages `next` hands out (skipping settled, leased and timed ones) until
    /// `out` holds `room`, reading each batch of picks in few sequential passes.
    pub(super) fn deliver_picks(
        &mut self,
        source: &impl RecordSource,
        room: usize,
        out: &mut Vec<Delivery>,
        now_ms: i64,
        lease_ms: u64,
        mut next: impl FnMut(&mut Self) -> Option<u64>,
    ) -> Result<(), ReadError> {
        loop {
            let mut picked = Vec::new();
            while out.len() + picked.len() < room {
                let Some(offset) = next(self) else {
                    break;
                };
                if !self.is_settled_or_busy(offset) && !self.timer_at.contains_key(&offset) {
                    picked.push(offset);
                }
            }
            if picked.is_empty() {
                return Ok(());
            }
            let records = read_offsets(source, &picked)?;
            for (pos, record) in picked.into_iter().zip(records) {
                let Some(record) = record else {
                    self.record_gone(pos);
                    continue;
                };
                if let Some(record) = self.screen(record, now_ms) {
                    out.push(self.lease(record, now_ms, lease_ms));
                }
            }
        }
    }

    /// Sorts newly scanned messages into the shaper's lanes, a bounded step at a time:
    /// batches whose lanes were staged at publish go straight in; the rest is scanned,
    /// looking only at metadata (the scan borrows views, it decodes nothing).
    pub(super) fn fill_shaper(
        &mut self,
        source: &impl RecordSource,
        now_ms: i64,
    ) -> Result<(), ReadError> {
        let mut budget = SHAPER_SCAN_STEP;
        let n = self.sources.len();
        let start = self.next_source % n;
        self.next_source = self.next_source.wrapping_add(1);
        // Sources in turn, each up to an even share of the step (what one leaves, the
        // next may use).
        for (k, index) in (start..n).chain(0..start).enumerate() {
            let share = budget.div_ceil(n - k);
            let left = budget - share;
            budget = self.fill_shaper_from(source, index, share, now_ms)? + left;
        }
        Ok(())
    }

    /// `fill_shaper` over source `index`, up to `budget` messages; returns what is left.
    fn fill_shaper_from(
        &mut self,
        source: &impl RecordSource,
        index: usize,
        mut budget: usize,
        now_ms: i64,
    ) -> Result<usize, ReadError> {
        while budget > 0
            && self.sources[index].cursor < self.sources[index].visible_end
            && !self.shaper.as_ref().is_some_and(Shaper::is_full)
        {
            let (cursor, visible_end) = {
                let src = &self.sources[index];
                (src.cursor, src.visible_end)
            };
            let Some(shaper) = &mut self.shaper else {
                return Ok(budget);
            };
            let scan_end = match shaper.staged_at(cursor, visible_end) {
                Staged::Here(base, lanes) => {
                    for (offset, lane) in (base..).zip(lanes) {
                        if offset < self.sources[index].cursor {
                            continue;
                        }
                        self.sources[index].cursor = offset + 1;
                        budget = budget.saturating_sub(1);
                        // As the scan below: delayed messages wait on their timer (set
                        // at publish), others join their lane. (A staged batch goes in
                        // whole: the step and run bounds may be passed by one batch.)
                        if !self.is_settled_or_busy(offset)
                            && !self.timer_at.contains_key(&offset)
                            && let Some(shaper) = &mut self.shaper
                        {
                            shaper.push_to(offset, lane);
                        }
                    }
                    continue;
                }
                Staged::Until(base) => base.min(visible_end),
                Staged::Nothing => visible_end,
            };
            let before = cursor;
            let count = budget.min(4_096).min((scan_end - cursor) as usize);
            let mut holes = Vec::new();
            source.scan(cursor, count, &mut |record| {
                if record.offset >= scan_end || self.shaper.as_ref().is_some_and(Shaper::is_full) {
                    return false;
                }
                if record.offset > self.sources[index].cursor && self.sources[index].holes {
                    holes.push(self.sources[index].cursor..record.offset);
                }
                self.sources[index].cursor = record.offset + 1;
                budget = budget.saturating_sub(1);
                if self.is_settled_or_busy(record.offset)
                    || self.timer_at.contains_key(&record.offset)
                {
                    return true;
                }
                if record.deliver_at_ms > now_ms {
                    self.add_timer(record.offset, record.deliver_at_ms);
                    return true;
                }
                let (priority, flow) = self.lane_of(record);
                if let Some(shaper) = &mut self.shaper {
                    shaper.push(record.offset, priority, &flow);
                }
                true
            })?;
            for hole in holes {
                self.skip_hole(hole);
            }
            if self.sources[index].cursor == before {
                // Nothing durable from the cursor on (a source with holes): a hole to the
                // end of what the scan may see.
                if self.sources[index].holes && scan_end == visible_end {
                    self.skip_hole(before..visible_end);
                    self.sources[index].cursor = visible_end;
                }
                break;
            }
        }
        Ok(budget)
    }

    /// Resolves the lanes of a batch about to be appended (None without lanes, or past
    /// the staging bound): `stage` them once the batch has its offsets.
    pub fn lanes_of_batch(&mut self, batch: &[u8]) -> Option<StagedLanes> {
        use tidewater_storage::format::{BATCH_HEADER_LEN, BatchHeader, visit_records};
        let header = BatchHeader::decode(batch).ok()?;
        let body = batch.get(BATCH_HEADER_LEN..header.total_len())?;
        // (Out of `self` while `lane_of` reads the config.)
        let mut shaper = self.shaper.take()?;
        let mut lanes = Vec::with_capacity(header.count as usize);
        let resolved = shaper.room_to_stage(header.count as usize)
            && visit_records(&header, body, |record| {
                let (priority, flow) = self.lane_of(&record);
                lanes.push(shaper.lane(priority, &flow));
                Ok::<(), tidewater_storage::FormatError>(())
            })
            .is_ok();
        let staged = resolved.then(|| shaper.staged(lanes));
        self.shaper = Some(shaper);
        staged
    }

    /// A batch whose lanes were resolved by `lanes_of_batch` was appended at `base`.
    pub fn stage(&mut self, base: u64, lanes: StagedLanes) {
        if let Some(shaper) = &mut self.shaper {
            shaper.stage(base, lanes);
        }
    }

    /// (priority level, fairness value) of a message.
    pub(super) fn lane_of<'r>(&self, record: &RecordView<'r>) -> (u8, std::borrow::Cow<'r, str>) {
        let header = |name: &str| {
            record
                .headers()
                .find(|(k, _)| *k == name.as_bytes())
                .map(|(_, v)| String::from_utf8_lossy(v))
        };
        let priority = if self.config.priority_levels > 1 {
            header(HEADER_PRIORITY)
                .and_then(|p| p.parse::<u8>().ok())
                .unwrap_or(0)
        } else {
            0
        };
        let flow = match self.config.fairness.as_ref().map(|f| f.by.as_str()) {
            None => "".into(),
            Some("tenant") => header(HEADER_TENANT).unwrap_or(ANONYMOUS_TENANT.into()),
            Some("key") => record.key.map(String::from_utf8_lossy).unwrap_or_default(),
            Some(by) => by
                .strip_prefix("header:")
                .and_then(header)
                .unwrap_or_default(),
        };
        (priority, flow)
    }

    /// A message about to be leased: expired ones are dropped or dead-lettered, ones whose
    /// key has no free slot are parked; the rest return.
    pub(super) fn screen(&mut self, record: Record, now_ms: i64) -> Option<Record> {
        if self.expires_at(&record).is_some_and(|at| at <= now_ms) {
            self.expire(&record);
            None
        } else if self.park_if_blocked(&record) {
            None
        } else {
            Some(record)
        }
    }

    pub(super) fn key_hash(&self, record: &Record) -> Option<u64> {
        let gate = self.keys.as_ref()?;
        record.key.as_deref().map(|key| gate.hash(key))
    }

    /// Parks a message whose key has no free slot (true); otherwise it takes (or keeps)
    /// its key's slot and may be leased (false). Every lease passes here first.
    pub(super) fn park_if_blocked(&mut self, record: &Record) -> bool {
        let key = self.key_hash(record);
        match (&mut self.keys, key) {
            (Some(gate), Some(key)) => {
                let blocked = !gate.try_hold(record.offset, key);
                if blocked {
                    gate.park(record.offset, key);
                }
                blocked
            }
            _ => false,
        }
    }

    pub(super) fn lease(&mut self, record: Record, now_ms: i64, lease_ms: u64) -> Delivery {
        let delivery_count = self
            .history
            .get(&record.offset)
            .map_or(0, |h| h.delivery_count)
            + 1;
        let nonce = self.nonces.nonce();
        let deadline_ms = now_ms + lease_ms as i64;
        self.leases.insert(
            record.offset,
            Lease {
                nonce,
                deadline_ms,
                delivery_count,
                size: record.size(),
                published_at_ms: record.published_at_ms,
            },
        );
        self.lease_expiry.insert((deadline_ms, record.offset));
        let pos = record.offset;
        let receipt = Receipt {
            log_uid: self.src(pos).uid,
            offset: offset_of(pos),
            nonce,
        }
        .encode();
        let mut record = record;
        record.offset = offset_of(pos);
        Delivery {
            receipt,
            delivery_count,
            source: source_of(pos),
            record,
        }
    }

    /// Makes a message deliverable ahead of the scan (a merged message just appended).
    pub fn make_ready(&mut self, offset: u64) {
        self.ready.push_back(offset);
    }

    /// When a message expires, if it has a time to live (queue-wide or its own).
    pub(super) fn expires_at(&self, record: &Record) -> Option<i64> {
        let own = if record.headers.is_empty() {
            None
        } else {
            record
                .headers
                .iter()
                .find(|(k, _)| k == HEADER_TTL_MS.as_bytes())
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
        };
        let ttl = match (self.config.ttl_ms, own) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(record.published_at_ms.saturating_add(ttl as i64))
    }

    /// Takes a message past its time to live out of scheduling; the caller settles it.
    pub(super) fn expire(&mut self, record: &Record) {
        let delivery_count = self
            .history
            .get(&record.offset)
            .map_or(0, |h| h.delivery_count);
        self.settling.insert(record.offset);
        self.expired.push(Unacked {
            offset: record.offset,
            delivery_count,
            size: record.size(),
        });
    }

    /// Messages found past their time to live since the last call (already settling).
    pub fn take_expired(&mut self) -> Vec<Unacked> {
        std::mem::take(&mut self.expired)
    }

    /// Expires messages at the head of the queue that outlived the queue's `ttl_ms`, even
    /// with no consumer receiving. Stops at the first message still alive.
    pub fn expire_head(
        &mut self,
        source: &impl RecordSource,
        now_ms: i64,
    ) -> Result<(), ReadError> {
        let Some(ttl) = self.config.ttl_ms else {
            return Ok(());
        };
        for index in 0..self.sources.len() {
            self.expire_head_of(source, index, ttl, now_ms)?;
        }
        Ok(())
    }

    fn expire_head_of(
        &mut self,
        source: &impl RecordSource,
        index: usize,
        ttl: u64,
        now_ms: i64,
    ) -> Result<(), ReadError> {
        while self.sources[index].cursor < self.sources[index].visible_end {
            let (cursor, end) = (self.sources[index].cursor, self.sources[index].visible_end);
            let records = source.read(cursor, 1_000, SCAN_BYTES)?;
            if records.is_empty() {
                break;
            }
            for record in records {
                if record.offset >= end
                    || record.published_at_ms.saturating_add(ttl as i64) > now_ms
                {
                    return Ok(());
                }
                self.skip_hole(self.sources[index].cursor..record.offset);
                self.sources[index].cursor = record.offset + 1;
                if self.is_settled_or_busy(record.offset) {
                    continue;
                }
                if let Some(at) = self.timer_at.remove(&record.offset) {
                    self.timers.remove(&(at, record.offset));
                }
                self.expire(&record);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records at the offsets given (others are gone); counts the passes asked of it.
    struct Holes {
        present: Vec<u64>,
        passes: std::cell::Cell<usize>,
    }

    impl RecordSource for Holes {
        fn read(&self, _: u64, _: usize, _: usize) -> Result<Vec<Record>, ReadError> {
            unreachable!("read_offsets reads with read_where")
        }

        fn read_where(
            &self,
            from: u64,
            end: u64,
            want: &dyn Fn(u64) -> bool,
        ) -> Result<Vec<Record>, ReadError> {
            self.passes.set(self.passes.get() + 1);
            let record = |offset| Record {
                offset,
                published_at_ms: 0,
                flags: 0,
                deliver_at_ms: 0,
                id: Default::default(),
                key: None,
                headers: Vec::new(),
                body: offset.to_string().into_bytes().into(),
            };
            let present = self.present.iter().copied();
            Ok(present
                .filter(|&o| (from..end).contains(&o) && want(o))
                .map(record)
                .collect())
        }

        fn scan(
            &self,
            _: u64,
            _: usize,
            _: &mut dyn FnMut(&RecordView<'_>) -> bool,
        ) -> Result<(), ReadError> {
            unreachable!("read_offsets reads with read_where")
        }
    }

    #[test]
    fn read_offsets_answers_in_the_order_asked() {
        let source = Holes {
            present: (0..1_000).filter(|o| o % 7 != 3).collect(),
            passes: Default::default(),
        };
        let got = |asked: &[u64]| -> Vec<Option<u64>> {
            let records = read_offsets(&source, asked).unwrap();
            assert_eq!(records.len(), asked.len());
            records.into_iter().map(|r| r.map(|r| r.offset)).collect()
        };
        // Sorted: three passes (gaps over 64 split them); 3 and 10 are gone.
        let asked = [1, 2, 3, 10, 60, 200, 201, 900];
        let expect = asked.map(|o| (o % 7 != 3).then_some(o));
        assert_eq!(got(&asked), expect);
        assert_eq!(source.passes.replace(0), 3);
        // Any order, with a repeat (the second ask of 201 gets nothing) and past the end.
        let asked = [900, 201, 5, 3, 201, 2_000, 0];
        let expect = [Some(900), Some(201), Some(5), None, None, None, Some(0)];
        assert_eq!(got(&asked), expect);
        assert_eq!(source.passes.replace(0), 4);
    }
}
