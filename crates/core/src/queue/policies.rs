//! Supersede and coalescing on the queue's messages.

use crate::config::CoalesceMode;
use crate::policy::coalesce::Closed;
use crate::policy::keys::KeyGate;

use super::{MAX_SUPERSEDE_KEYS, QueueState, Unacked, source_of};

impl QueueState {
    /// Records that a batch with these keyed messages (index in batch, key, bytes) was
    /// appended at `base`: older pending messages with the same keys are cancelled (see
    /// `take_cancelled`), older leased ones are flagged.
    pub fn supersede(&mut self, base: u64, keyed: &[(u32, Vec<u8>, u64)]) {
        for (idx, key, size) in keyed {
            self.supersede_one(base + *idx as u64, key, *size);
        }
    }

    pub(super) fn supersede_one(&mut self, offset: u64, key: &[u8], size: u64) {
        let Some(s) = &mut self.supersede else { return };
        let hash = std::hash::BuildHasher::hash_one(&s.hasher, key);
        if s.latest.len() >= MAX_SUPERSEDE_KEYS && !s.latest.contains_key(&hash) {
            let sources = &self.sources;
            s.latest.retain(|_, (o, _)| {
                let src = &sources[source_of(*o)];
                *o >= src.ack_floor && !src.settled.contains(*o)
            });
            if s.latest.len() >= MAX_SUPERSEDE_KEYS {
                return;
            }
        }
        let Some((older, older_size)) = s.latest.insert(hash, (offset, size)) else {
            return;
        };
        // (Across sources, the later call is the newer message.)
        let src = &self.sources[source_of(older)];
        if (source_of(older) == source_of(offset) && older >= offset)
            || older < src.ack_floor
            || src.settled.contains(older)
            || self.settling.contains(&older)
        {
            return;
        }
        if self.leases.contains_key(&older) {
            s.flagged.insert(older);
            return;
        }
        if let Some(at) = self.timer_at.remove(&older) {
            self.timers.remove(&(at, older));
        }
        let delivery_count = self.history.get(&older).map_or(0, |h| h.delivery_count);
        self.settling.insert(older);
        self.cancelled.push(Unacked {
            offset: older,
            delivery_count,
            size: older_size,
        });
    }

    /// Holds newly published keyed messages (index in batch, key, bytes) appended at
    /// `base` in their key's coalescing window.
    pub fn coalesce(&mut self, base: u64, keyed: &[(u32, Vec<u8>, u64)], now_ms: i64) {
        let Some(c) = self.config.coalesce else {
            return;
        };
        for (idx, key, size) in keyed {
            let offset = base + *idx as u64;
            // Delayed messages keep their own time; cancelled ones are gone.
            if self.is_settled_or_busy(offset) || self.timer_at.contains_key(&offset) {
                continue;
            }
            if let Some(coalescer) = &mut self.coalescer
                && coalescer.hold(offset, key, *size, now_ms, c.window_ms, c.max_wait())
            {
                self.counters.coalesced_in += 1;
            }
        }
    }

    /// Closes due coalescing windows. `latest`: the newest member becomes deliverable and
    /// the others are returned to drop (already settling). `merge`: windows of several
    /// members are returned whole (already settling) for the caller to merge.
    pub fn close_windows(&mut self, now_ms: i64) -> (Vec<Unacked>, Vec<Closed>) {
        let (Some(coalescer), Some(c)) = (&mut self.coalescer, self.config.coalesce) else {
            return (Vec::new(), Vec::new());
        };
        let closed = coalescer.close_due(now_ms);
        let mut dropped = Vec::new();
        let mut merges = Vec::new();
        for mut window in closed {
            window
                .members
                .retain(|&(offset, _)| !self.is_settled_or_busy(offset));
            let Some(&(newest, _)) = window.members.last() else {
                continue;
            };
            self.counters.coalesced_out += 1;
            if c.mode == CoalesceMode::Latest || window.members.len() == 1 {
                for &(offset, size) in &window.members[..window.members.len() - 1] {
                    self.settling.insert(offset);
                    dropped.push(Unacked {
                        offset,
                        delivery_count: 0,
                        size,
                    });
                }
                self.ready.push_back(newest);
            } else {
                for &(offset, _) in &window.members {
                    self.settling.insert(offset);
                }
                merges.push(window);
            }
        }
        (dropped, merges)
    }

    /// After a settlement: true if it may have made messages deliverable that a waiting
    /// receive would not otherwise notice (released by their key, or in-flight room).
    pub fn may_deliver_after_settle(&self) -> bool {
        self.keys.as_ref().is_some_and(KeyGate::has_released)
            || self.leases.len() as u64 + 1 >= self.config.max_in_flight
    }

    /// Pending messages superseded since the last call (already settling).
    pub fn take_cancelled(&mut self) -> Vec<Unacked> {
        std::mem::take(&mut self.cancelled)
    }

    /// True if a newer message with its key replaced this leased one.
    pub fn is_superseded(&self, offset: u64) -> bool {
        self.supersede
            .as_ref()
            .is_some_and(|s| s.flagged.contains(&offset))
    }
}
