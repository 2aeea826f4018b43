//! Deduplication: message ids accepted within a window.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Message ids accepted within a window (deduplication). Ids are claimed when a publish is
/// checked, so two concurrent publishes of one id cannot both be enqueued, and released if
/// the publish then fails. Memory per id: its bytes plus about 80 bytes (map entry and the
/// expiry queue share one allocation).
#[derive(Debug, Default)]
pub struct DedupWindow {
    /// id -> publish time of its accepted copy.
    seen: HashMap<Arc<[u8]>, i64>,
    /// (publish time, id), oldest first.
    order: VecDeque<(i64, Arc<[u8]>)>,
}

impl DedupWindow {
    /// Forgets ids older than `window_ms` before `now_ms` and the oldest beyond `max`.
    pub fn prune(&mut self, window_ms: u64, max: usize, now_ms: i64) {
        let horizon = now_ms.saturating_sub(window_ms as i64);
        while let Some((at, id)) = self.order.front() {
            if *at >= horizon && self.order.len() <= max {
                break;
            }
            if self.seen.get(id) == Some(at) {
                self.seen.remove(id);
            }
            self.order.pop_front();
        }
    }

    /// True (a duplicate) if `id` was accepted within the window; otherwise claims it.
    pub fn check_and_claim(&mut self, id: &[u8], now_ms: i64) -> bool {
        if self.seen.contains_key(id) {
            return true;
        }
        let id: Arc<[u8]> = id.into();
        self.seen.insert(id.clone(), now_ms);
        self.order.push_back((now_ms, id));
        false
    }

    /// Gives back claims of a publish that was not stored.
    pub fn release(&mut self, ids: &[Vec<u8>]) {
        for id in ids {
            self.seen.remove(id.as_slice());
        }
        // Their entries in `order` no longer match `seen` and are skipped when pruned.
    }

    /// Restores ids remembered by storage (recovery).
    pub fn restore(&mut self, at_ms: i64, id: &[u8]) {
        self.check_and_claim(id, at_ms);
    }

    pub fn clear(&mut self) {
        self.seen.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}
