//! Coalescing (debounce) by key. A keyed message opens a window for its key; messages with
//! the same key published while it is open join it and are held back. The window closes
//! `window_ms` after its newest message, or `max_wait_ms` after it opened, whichever comes
//! first, so a steady stream cannot postpone delivery forever. Closing yields the newest
//! message alone (`latest`: the others are dropped) or every member for the broker to merge
//! into one message (`merge`). Windows are in memory: after a restart, held messages are
//! ordinary pending messages again (delivered individually; nothing is lost).

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;

use crate::offsets::OffsetMap;

/// Open windows per queue; past this, new keys are not coalesced until windows close.
pub const MAX_WINDOWS: usize = 100_000;
/// Messages in one window; past this the window closes early.
pub const MAX_MEMBERS: usize = 10_000;

#[derive(Debug)]
struct Window {
    key: Vec<u8>,
    opened_ms: i64,
    deadline_ms: i64,
    /// (offset, bytes), oldest first.
    members: Vec<(u64, u64)>,
}

/// A window that closed: its key and members (oldest first).
#[derive(Debug, PartialEq)]
pub struct Closed {
    pub key: Vec<u8>,
    pub members: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
pub struct Coalescer {
    hasher: std::collections::hash_map::RandomState,
    windows: HashMap<u64, Window>,
    /// (deadline, key hash) of open windows.
    due: BTreeSet<(i64, u64)>,
    /// Held messages: offset -> key hash of their window.
    held: OffsetMap<u64>,
}

impl Coalescer {
    /// Holds a newly published keyed message in its key's window (opening one if needed).
    /// False if it cannot be held (too many windows): deliver it normally.
    pub fn hold(
        &mut self,
        offset: u64,
        key: &[u8],
        size: u64,
        now_ms: i64,
        window_ms: u64,
        max_wait_ms: u64,
    ) -> bool {
        let hash = self.hasher.hash_one(key);
        let window = match self.windows.get_mut(&hash) {
            Some(window) if window.key == key => window,
            Some(_) => return false, // a hash collision: leave it alone
            None => {
                if self.windows.len() >= MAX_WINDOWS {
                    return false;
                }
                self.windows.entry(hash).or_insert(Window {
                    key: key.to_vec(),
                    opened_ms: now_ms,
                    deadline_ms: now_ms,
                    members: Vec::new(),
                })
            }
        };
        self.due.remove(&(window.deadline_ms, hash));
        window.members.push((offset, size));
        let cap = window.opened_ms.saturating_add(max_wait_ms as i64);
        window.deadline_ms = now_ms.saturating_add(window_ms as i64).min(cap);
        if window.members.len() >= MAX_MEMBERS {
            window.deadline_ms = now_ms;
        }
        self.due.insert((window.deadline_ms, hash));
        self.held.insert(offset, hash);
        true
    }

    pub fn is_held(&self, offset: u64) -> bool {
        self.held.contains_key(&offset)
    }

    /// Closes the windows due at `now_ms`; their members are no longer held.
    pub fn close_due(&mut self, now_ms: i64) -> Vec<Closed> {
        let mut out = Vec::new();
        while let Some(&(deadline, hash)) = self.due.first() {
            if deadline > now_ms {
                break;
            }
            self.due.pop_first();
            if let Some(window) = self.windows.remove(&hash) {
                for (offset, _) in &window.members {
                    self.held.remove(offset);
                }
                out.push(Closed {
                    key: window.key,
                    members: window.members,
                });
            }
        }
        // Windows closing together go out in publish order of their newest message.
        out.sort_by_key(|c| c.members.last().map(|m| m.0));
        out
    }

    /// When the next window closes.
    pub fn next_due(&self) -> Option<i64> {
        self.due.first().map(|&(at, _)| at)
    }

    /// Held offsets (consistency checks).
    pub fn held_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.held.keys().copied()
    }

    /// Open windows (stats).
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// Forgets members below `end` (a purge settled them).
    pub fn forget_range(&mut self, range: &std::ops::Range<u64>) {
        self.held.retain(|offset, _| !range.contains(offset));
        let mut emptied = Vec::new();
        for (hash, window) in &mut self.windows {
            window.members.retain(|(offset, _)| !range.contains(offset));
            if window.members.is_empty() {
                emptied.push((window.deadline_ms, *hash));
            }
        }
        for (deadline, hash) in emptied {
            self.windows.remove(&hash);
            self.due.remove(&(deadline, hash));
        }
    }

    /// Releases every held message (the policy was turned off).
    pub fn release_all(&mut self) -> Vec<u64> {
        let mut out: Vec<u64> = self.held.keys().copied().collect();
        out.sort_unstable();
        self.held.clear();
        self.windows.clear();
        self.due.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_closes_after_quiet_or_at_max_wait() {
        let mut c = Coalescer::default();
        // window 100 ms, max wait 250 ms.
        assert!(c.hold(0, b"k", 1, 1_000, 100, 250));
        assert!(c.hold(1, b"k", 1, 1_080, 100, 250));
        assert!(c.hold(2, b"j", 1, 1_090, 100, 250));
        assert_eq!(c.next_due(), Some(1_180));
        assert!(c.close_due(1_179).is_empty());
        // A steady stream on k: each message pushes the deadline, up to opened + 250.
        assert!(c.hold(3, b"k", 1, 1_170, 100, 250));
        assert!(c.hold(4, b"k", 1, 1_240, 100, 250));
        let closed = c.close_due(1_190);
        assert_eq!(closed.len(), 1, "j closed at 1190");
        assert_eq!(closed[0].key, b"j");
        assert!(c.is_held(4));
        let closed = c.close_due(1_250);
        assert_eq!(
            closed[0].members.iter().map(|m| m.0).collect::<Vec<_>>(),
            [0, 1, 3, 4]
        );
        assert!(!c.is_held(4));
        // A new message after the close opens a new window.
        assert!(c.hold(5, b"k", 1, 1_300, 100, 250));
        assert_eq!(c.open_windows(), 1);
        assert_eq!(c.release_all(), vec![5]);
    }
}
