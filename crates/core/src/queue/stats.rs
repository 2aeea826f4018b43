//! Statistics and the consistency check of a queue's state.

use std::collections::HashSet;

use crate::policy::keys::KeyLoad;
use crate::policy::shaper::{FlowLoad, Shaper};

use super::{QueueState, QueueStats, RecordSource};

impl QueueState {
    /// The `n` busiest keys (per-key concurrency) and flows (fair scheduling); None where
    /// the policy is off.
    pub fn busiest(&self, n: usize) -> (Option<Vec<KeyLoad>>, Option<Vec<FlowLoad>>) {
        (
            self.keys.as_ref().map(|g| g.busiest(n)),
            self.shaper
                .as_ref()
                .filter(|_| self.config.fairness.is_some())
                .map(|s| s.busiest_flows(n)),
        )
    }

    /// With key_concurrency: messages waiting for a slot of their key.
    pub fn key_waiting(&self) -> Option<u64> {
        self.keys.as_ref().map(|g| g.parked_len() as u64)
    }

    pub fn stats(&self, now_ms: i64) -> QueueStats {
        let unsettled = self.unsettled();
        let in_flight = self.leases.len() as u64;
        // Messages held in a coalescing window wait for their time like delayed ones.
        let held = self
            .coalescer
            .as_ref()
            .map_or(0, |c| c.held_offsets().count() as u64);
        let waiting = self.timers.len() as u64 + held;
        let parked = self.parked_info.len() as u64;
        let oldest_age_ms = self
            .sources
            .iter()
            .filter_map(|src| match src.oldest {
                Some((floor, at)) if floor == src.ack_floor && src.unsettled() > 0 => {
                    Some((now_ms - at).max(0) as u64)
                }
                _ => None,
            })
            .max()
            .unwrap_or(0);
        QueueStats {
            depth: unsettled.saturating_sub(in_flight + waiting + self.settling.len() as u64),
            in_flight,
            delayed: waiting + parked,
            parked,
            total: unsettled + parked,
            bytes: self.backlog_bytes.max(0) as u64 + self.parked_bytes,
            oldest_age_ms,
            published: self.counters.published,
            delivered: self.counters.delivered,
            acked: self.counters.acked,
            nacked: self.counters.nacked,
            expired: self.counters.expired,
            dead_lettered: self.counters.dead_lettered,
            redriven: self.counters.redriven,
            purged: self.counters.purged,
            ttl_expired: self.counters.ttl_expired,
            deduplicated: self.counters.deduplicated,
            superseded: self.counters.superseded,
            dedup_ids: self.dedup.len() as u64,
            coalesced_in: self.counters.coalesced_in,
            coalesced_out: self.counters.coalesced_out,
            coalesce_windows: self.coalescer.as_ref().map(|c| c.open_windows() as u64),
            keys_in_flight: self.keys.as_ref().map(|g| g.keys_in_flight() as u64),
            keys_blocked: self.keys.as_ref().map(|g| g.keys_blocked() as u64),
            waiting_by_priority: self
                .shaper
                .as_ref()
                .filter(|s| s.levels() > 1)
                .map(Shaper::depth_by_level),
            fair_flows: self
                .shaper
                .as_ref()
                .filter(|_| self.config.fairness.is_some())
                .map(|s| s.active_flows() as u64),
            throttle_cuts: self.counters.throttle_cuts,
            throttle_raises: self.counters.throttle_raises,
            dispatch_rate_per_s: self.dispatch_limit().map(|(per_s, _)| per_s),
            forecast: None,
        }
    }

    /// Refreshes the cached publish time of the oldest unsettled message.
    pub fn refresh_oldest(&mut self, source: &impl RecordSource) {
        for src in &mut self.sources {
            if src.oldest.is_some_and(|(floor, _)| floor == src.ack_floor) || src.unsettled() == 0 {
                continue;
            }
            if let Ok(records) = source.read(src.ack_floor, 1, 1)
                && let Some(record) = records.first()
            {
                src.oldest = Some((src.ack_floor, record.published_at_ms));
            }
        }
    }

    /// Checks the invariants that tie the structures together (tests and debug builds).
    pub fn debug_check_consistency(&self) {
        for offset in self.leases.keys() {
            assert!(
                !self.timer_at.contains_key(offset),
                "leased message {offset} also has a timer"
            );
            let src = self.src(*offset);
            assert!(
                !src.settled.contains(*offset) && *offset >= src.ack_floor,
                "leased message {offset} is settled"
            );
        }
        assert_eq!(self.timers.len(), self.timer_at.len());
        assert_eq!(self.lease_expiry.len(), self.leases.len());
        for src in &self.sources {
            assert!(src.cursor >= src.ack_floor);
        }
        // Behind the cursor, an unsettled message must be reachable.
        let mut ready: HashSet<u64> = self.ready.iter().copied().collect();
        if let Some(gate) = &self.keys {
            ready.extend(gate.waiting_offsets());
        }
        if let Some(shaper) = &self.shaper {
            ready.extend(shaper.offsets());
        }
        if let Some(coalescer) = &self.coalescer {
            ready.extend(coalescer.held_offsets());
        }
        for src in &self.sources {
            let mut offset = src.ack_floor;
            while offset < src.cursor.min(src.visible_end) {
                offset = src.settled.next_absent(offset);
                if offset >= src.cursor.min(src.visible_end) {
                    break;
                }
                let reachable = self.leases.contains_key(&offset)
                    || ready.contains(&offset)
                    || self.timer_at.contains_key(&offset)
                    || self.settling.contains(&offset);
                assert!(
                    reachable,
                    "message {offset} behind the cursor {} is lost from scheduling",
                    src.cursor
                );
                offset += 1;
            }
        }
    }
}
