//! Parked messages: long delays waiting in the delay log until due.

use super::QueueState;

impl QueueState {
    /// Records messages appended to the delay log at `base`: (index, due, bytes).
    pub fn park(&mut self, base: u64, entries: &[(u32, i64, u64)]) {
        for &(idx, due, size) in entries {
            self.park_at(base + idx as u64, due, size);
        }
    }

    /// Records one message of the delay log (also used to rebuild at recovery).
    pub fn park_at(&mut self, offset: u64, due: i64, size: u64) {
        if self.parked_info.insert(offset, (due, size)).is_none() {
            self.parked.insert((due, offset));
            self.parked_bytes += size;
        }
    }

    /// Offsets of every parked message (a purge settles them).
    pub fn parked_offsets(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self.parked_info.keys().copied().collect();
        out.sort_unstable();
        out
    }

    /// Parked messages due by `now_ms` (at most `max`), taken out of the due set while the
    /// caller moves them to the main log.
    pub fn take_due_parked(&mut self, now_ms: i64, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < max
            && let Some(&(due, offset)) = self.parked.first()
            && due <= now_ms
        {
            self.parked.pop_first();
            out.push(offset);
        }
        out
    }

    /// The move of parked messages finished: gone from the delay log, or back in line.
    pub fn unparked(&mut self, offsets: &[u64], ok: bool) {
        for &offset in offsets {
            if ok {
                if let Some((_, size)) = self.parked_info.remove(&offset) {
                    self.parked_bytes -= size;
                }
            } else if let Some(&(due, _)) = self.parked_info.get(&offset) {
                self.parked.insert((due, offset));
            }
        }
    }

    /// Forgets every parked message (a purge settled the delay log).
    pub fn forget_parked(&mut self) -> u64 {
        let n = self.parked_info.len() as u64;
        self.parked.clear();
        self.parked_info.clear();
        self.parked_bytes = 0;
        n
    }
}
