//! Per-key concurrency: at most `limit` messages with one key hold a slot at once. A slot
//! is taken at a message's first delivery and kept until the message is settled (acked,
//! dead-lettered, expired, moved), so with `limit` 1 the messages of a key are processed
//! strictly one after another, redeliveries included. Messages whose key is full are
//! parked by offset, per key, and released in order when a slot frees; other keys flow
//! past them. Parked offsets are bounded by the queue's lookahead.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use crate::offsets::OffsetMap;

/// Maps keyed by a key's hash (already a keyed hash: a cheap mixer is enough).
type HashKeyed<V> = OffsetMap<V>;

/// One key's load (`KeyGate::busiest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLoad {
    /// A message with the key (waiting, else holding a slot): its key names it.
    pub offset: u64,
    /// Its messages leased or awaiting a retry.
    pub held: u32,
    /// Its messages waiting for a slot.
    pub waiting: u64,
}

#[derive(Debug)]
pub struct KeyGate {
    limit: u32,
    /// Randomly keyed, so a producer cannot aim many keys at one slot.
    hasher: std::collections::hash_map::RandomState,
    /// Messages holding a slot: offset -> key hash.
    holders: OffsetMap<u64>,
    /// Slots held per key.
    active: HashKeyed<u32>,
    /// Offsets waiting for a slot of their key, oldest first.
    parked: HashKeyed<VecDeque<u64>>,
    parked_len: usize,
    /// Offsets whose key got a free slot: deliver these before new messages.
    released: VecDeque<u64>,
}

impl KeyGate {
    pub fn new(limit: u32) -> Self {
        KeyGate {
            limit,
            hasher: Default::default(),
            holders: OffsetMap::default(),
            active: HashKeyed::default(),
            parked: HashKeyed::default(),
            parked_len: 0,
            released: VecDeque::new(),
        }
    }

    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit;
        let keys: Vec<u64> = self.parked.keys().copied().collect();
        for key in keys {
            self.release_waiting(key);
        }
    }

    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The message is being delivered: it takes (or keeps) its key's slot.
    pub fn hold(&mut self, offset: u64, key: Option<u64>) {
        if let Some(key) = key
            && self.holders.insert(offset, key).is_none()
        {
            *self.active.entry(key).or_default() += 1;
        }
    }

    /// `admits` then `hold` in one pass over the maps (every keyed delivery comes here):
    /// true if the message holds a slot of its key now.
    pub fn try_hold(&mut self, offset: u64, key: u64) -> bool {
        match self.holders.entry(offset) {
            std::collections::hash_map::Entry::Occupied(_) => true,
            std::collections::hash_map::Entry::Vacant(holder) => {
                let held = self.active.entry(key).or_default();
                if *held >= self.limit {
                    return false;
                }
                *held += 1;
                holder.insert(key);
                true
            }
        }
    }

    /// Waits behind its key's slots.
    pub fn park(&mut self, offset: u64, key: u64) {
        self.parked.entry(key).or_default().push_back(offset);
        self.parked_len += 1;
    }

    /// Parked offsets (the scan stops while this is at the lookahead bound).
    pub fn parked_len(&self) -> usize {
        self.parked_len
    }

    /// The message is settled (or gone): its slot frees, and the next waiting message of
    /// its key is released.
    pub fn settled(&mut self, offset: u64) {
        let Some(key) = self.holders.remove(&offset) else {
            return;
        };
        let Some(held) = self.active.get_mut(&key) else {
            return;
        };
        // The slot passes straight to the key's next waiting message (unless a lowered
        // limit wants it back): one lookup each instead of a release round.
        if *held <= self.limit
            && self.parked_len > 0
            && let Some(waiting) = self.parked.get_mut(&key)
            && let Some(next) = waiting.pop_front()
        {
            if waiting.is_empty() {
                self.parked.remove(&key);
            }
            self.parked_len -= 1;
            self.holders.insert(next, key);
            self.released.push_back(next);
            return;
        }
        *held -= 1;
        if *held == 0 {
            self.active.remove(&key);
        }
    }

    /// Releases waiting messages of `key` while it has free slots; a released message
    /// takes its slot at once (a later key-mate cannot overtake it).
    fn release_waiting(&mut self, key: u64) {
        while self.active.get(&key).copied().unwrap_or(0) < self.limit {
            let Some(waiting) = self.parked.get_mut(&key) else {
                return;
            };
            let Some(offset) = waiting.pop_front() else {
                return;
            };
            if waiting.is_empty() {
                self.parked.remove(&key);
            }
            self.parked_len -= 1;
            self.hold(offset, Some(key));
            self.released.push_back(offset);
        }
    }

    /// A released message (it holds its slot): deliver it before new messages. If it
    /// turns out to be gone, call `settled` for it.
    pub fn next_released(&mut self) -> Option<u64> {
        self.released.pop_front()
    }

    /// Released messages wait to be delivered.
    pub fn has_released(&self) -> bool {
        !self.released.is_empty()
    }

    /// Keys with a message leased or awaiting a retry.
    pub fn keys_in_flight(&self) -> usize {
        self.active.len()
    }

    /// Keys with messages waiting behind their key's slots.
    pub fn keys_blocked(&self) -> usize {
        self.parked.len()
    }

    /// The `n` keys with the most messages waiting behind their slots, then the most slots
    /// held: (an offset whose message has the key, to name it by; slots held; waiting).
    pub fn busiest(&self, n: usize) -> Vec<KeyLoad> {
        let mut loads: Vec<(u64, u32, usize)> = self
            .active
            .iter()
            .map(|(&key, &held)| (key, held, self.parked.get(&key).map_or(0, VecDeque::len)))
            .chain(
                self.parked
                    .iter()
                    .filter(|(key, _)| !self.active.contains_key(key))
                    .map(|(&key, waiting)| (key, 0, waiting.len())),
            )
            .collect();
        loads.sort_unstable_by_key(|&(_, held, waiting)| std::cmp::Reverse((waiting, held)));
        loads.truncate(n);
        // A holder names a key with no message waiting.
        let mut holder: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        if loads.iter().any(|l| l.2 == 0) {
            let wanted: std::collections::HashSet<u64> =
                loads.iter().filter(|l| l.2 == 0).map(|l| l.0).collect();
            for (&offset, key) in &self.holders {
                if wanted.contains(key) {
                    let at = holder.entry(*key).or_insert(offset);
                    *at = (*at).min(offset);
                }
            }
        }
        loads
            .into_iter()
            .filter_map(|(key, held, waiting)| {
                let offset = match self.parked.get(&key).and_then(|p| p.front()) {
                    Some(&front) => front,
                    None => *holder.get(&key)?,
                };
                Some(KeyLoad {
                    offset,
                    held,
                    waiting: waiting as u64,
                })
            })
            .collect()
    }

    /// Every offset the gate keeps out of the ready queue (parked or released).
    pub fn waiting_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.parked
            .values()
            .flatten()
            .copied()
            .chain(self.released.iter().copied())
    }

    /// Forgets everything below `end` (a purge settled it).
    pub fn forget_range(&mut self, range: &std::ops::Range<u64>) {
        // Waiting ones first, so that freed slots do not release them.
        for waiting in self.parked.values_mut() {
            waiting.retain(|o| !range.contains(o));
        }
        self.parked.retain(|_, w| !w.is_empty());
        self.parked_len = self.parked.values().map(VecDeque::len).sum();
        self.released.retain(|o| !range.contains(o));
        let gone: Vec<u64> = self
            .holders
            .keys()
            .copied()
            .filter(|o| range.contains(o))
            .collect();
        for offset in gone {
            self.settled(offset);
        }
    }

    /// Empties the gate (the policy was turned off); returns the offsets that were waiting.
    pub fn drain_waiting(&mut self) -> Vec<u64> {
        let mut out: Vec<u64> = self.waiting_offsets().collect();
        out.sort_unstable();
        self.parked.clear();
        self.released.clear();
        self.parked_len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_per_key_releases_in_order() {
        let mut gate = KeyGate::new(1);
        let (a, b) = (gate.hash(b"a"), gate.hash(b"b"));
        assert!(gate.try_hold(0, a));
        assert!(
            gate.try_hold(0, a),
            "the holder keeps its slot (redelivery)"
        );
        assert!(!gate.try_hold(1, a));
        gate.park(1, a);
        gate.park(2, a);
        assert!(gate.try_hold(3, b), "other keys are not blocked");
        assert_eq!((gate.keys_in_flight(), gate.keys_blocked()), (2, 1));
        gate.settled(0);
        assert_eq!(gate.next_released(), Some(1));
        assert_eq!(gate.next_released(), None, "one slot: one release");
        assert!(!gate.try_hold(9, a), "the released message took the slot");
        gate.settled(1);
        assert_eq!(gate.next_released(), Some(2));
        assert_eq!(gate.parked_len(), 0);
    }

    #[test]
    fn a_wider_limit_and_a_purge() {
        let mut gate = KeyGate::new(2);
        let k = gate.hash(b"k");
        gate.hold(0, Some(k));
        gate.hold(1, Some(k));
        gate.park(2, k);
        gate.park(3, k);
        gate.park(9, k);
        gate.set_limit(3);
        assert_eq!(gate.next_released(), Some(2));
        gate.forget_range(&(0..4));
        // 9 took a freed slot.
        assert_eq!((gate.keys_in_flight(), gate.parked_len()), (1, 0));
        assert_eq!(gate.drain_waiting(), vec![9]);
    }

    #[test]
    fn the_busiest_keys_come_first_each_named_by_one_of_its_messages() {
        let mut gate = KeyGate::new(1);
        let (hot, warm, idle) = (gate.hash(b"hot"), gate.hash(b"warm"), gate.hash(b"idle"));
        assert!(gate.try_hold(5, hot));
        for offset in [6, 7, 8] {
            gate.park(offset, hot);
        }
        assert!(gate.try_hold(10, warm));
        gate.park(11, warm);
        assert!(gate.try_hold(20, idle));
        let KeyLoad {
            offset,
            held,
            waiting,
        } = gate.busiest(10)[0];
        assert_eq!((offset, held, waiting), (6, 1, 3));
        assert_eq!(
            gate.busiest(10),
            vec![
                KeyLoad {
                    offset: 6,
                    held: 1,
                    waiting: 3
                },
                KeyLoad {
                    offset: 11,
                    held: 1,
                    waiting: 1
                },
                KeyLoad {
                    offset: 20,
                    held: 1,
                    waiting: 0
                },
            ]
        );
        assert_eq!(gate.busiest(1).len(), 1);
    }
}
