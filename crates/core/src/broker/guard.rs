//! Marks on a queue's memory that a storage write finishes, and that are undone when dropped
//! unfinished: messages being settled, capacity reserved for an append, client ids claimed
//! for deduplication, parked messages being moved.
//!
//! A request takes its marks before it writes, moves them into the write's completion
//! (`Broker::submit_then`), and the completion finishes them when storage answers, whether
//! or not the request's caller still waits. A request dropped before it wrote (its caller
//! went away, a step before the write failed with `?`) drops its marks, which undoes them:
//! for the queue, a dropped request is a write that failed or one that succeeded, never a
//! message left half-way ("settling" forever, or stored and never delivered).
//!
//! A guard's drop locks the queue's state, so a guard is never dropped unfinished while
//! that state is locked (each `finish` marks its guard done before touching the state).
//! While a thread unwinds from a panic (a bug), drops undo nothing: the state may be
//! locked by the frame that panicked, and a deadlock would hide the panic.

use std::sync::Arc;

use super::QueueHandle;
use crate::clock::Clock;
use crate::queue::{QueueState, Unacked};

/// Messages marked settling (their settle or move is in flight). Dropped unfinished, they
/// are deliverable again (`finish_settle(.., false)`).
#[must_use = "dropping it puts the messages back in line"]
pub(super) struct Settling {
    handle: Arc<QueueHandle>,
    items: Vec<Unacked>,
    clock: Arc<dyn Clock>,
}

impl Settling {
    /// Marks `items` settling now (the caller has the queue's state locked).
    pub fn begin(
        handle: &Arc<QueueHandle>,
        state: &mut QueueState,
        items: Vec<Unacked>,
        clock: &Arc<dyn Clock>,
    ) -> Settling {
        let offsets: Vec<u64> = items.iter().map(|m| m.offset).collect();
        state.begin_settle(&offsets);
        Settling::marked(handle, items, clock)
    }

    /// Takes charge of `items` the queue already marked settling (expired, superseded,
    /// coalesced, bound for the dead-letter queue, claimed by a redrive).
    pub fn marked(
        handle: &Arc<QueueHandle>,
        items: Vec<Unacked>,
        clock: &Arc<dyn Clock>,
    ) -> Settling {
        Settling {
            handle: handle.clone(),
            items,
            clock: clock.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn items(&self) -> &[Unacked] {
        &self.items
    }

    pub fn offsets(&self) -> Vec<u64> {
        self.items.iter().map(|m| m.offset).collect()
    }

    /// Storage settled them (`ok`) or refused to. (The caller has the state locked: this
    /// guard's drop then locks nothing.)
    pub fn finish(mut self, state: &mut QueueState, ok: bool) {
        let sizes = sizes(&std::mem::take(&mut self.items));
        state.finish_settle(&sizes, ok, self.clock.now_ms());
    }
}

fn sizes(items: &[Unacked]) -> Vec<(u64, u64)> {
    items.iter().map(|m| (m.offset, m.size)).collect()
}

impl Drop for Settling {
    fn drop(&mut self) {
        if !self.items.is_empty() && !std::thread::panicking() {
            let now = self.clock.now_ms();
            self.handle
                .state
                .lock()
                .finish_settle(&sizes(&self.items), false, now);
        }
    }
}

/// Capacity reserved for messages being appended, and the client ids they claimed.
/// Dropped unfinished, both are given back.
#[must_use = "dropping it gives the reservation back"]
pub(super) struct Reserved {
    handle: Arc<QueueHandle>,
    n: u64,
    bytes: u64,
    claimed: Vec<Vec<u8>>,
    done: bool,
}

impl Reserved {
    /// Takes charge of a reservation the queue made (`admit`, `reserve_unchecked`) and of
    /// the ids claimed for it.
    pub fn made(handle: &Arc<QueueHandle>, n: u64, bytes: u64, claimed: Vec<Vec<u8>>) -> Reserved {
        Reserved {
            handle: handle.clone(),
            n,
            bytes,
            claimed,
            done: false,
        }
    }

    /// Reserves room for `n` messages of `bytes` beyond capacity (moves of messages already
    /// accepted: a merge, a dead-letter move, an unpark).
    pub fn unchecked(handle: &Arc<QueueHandle>, n: u64, bytes: u64) -> Reserved {
        handle.state.lock().reserve_unchecked(n, bytes);
        Reserved::made(handle, n, bytes, Vec::new())
    }

    /// Storage stored the messages: the caller accounts for them (`QueueState::published`,
    /// with their offsets), and the ids stay claimed. Returns (messages, bytes) reserved.
    pub fn stored(mut self) -> (u64, u64) {
        self.done = true;
        (self.n, self.bytes)
    }

    /// Storage refused them: the reservation and the claims are given back.
    pub fn refused(mut self, state: &mut QueueState) {
        self.done = true;
        state.published(self.n, self.bytes, None);
        state.release_ids(&self.claimed);
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.done && !std::thread::panicking() {
            let mut state = self.handle.state.lock();
            state.published(self.n, self.bytes, None);
            state.release_ids(&self.claimed);
        }
    }
}

/// Client ids claimed for deduplication before a publish is admitted. Dropped before
/// they pass to a `Reserved` (a refusal, an error), they are forgotten.
#[must_use = "dropping it forgets the claims"]
pub(super) struct Claims {
    handle: Arc<QueueHandle>,
    ids: Vec<Vec<u8>>,
}

impl Claims {
    pub fn new(handle: &Arc<QueueHandle>, ids: Vec<Vec<u8>>) -> Claims {
        Claims {
            handle: handle.clone(),
            ids,
        }
    }

    /// The ids, now in the caller's charge.
    pub fn take(mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.ids)
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        if !self.ids.is_empty() && !std::thread::panicking() {
            self.handle.state.lock().release_ids(&self.ids);
        }
    }
}

/// Parked messages taken out of the due set to be moved to the main log. Dropped
/// unfinished, they are due again.
#[must_use = "dropping it puts the messages back in the due set"]
pub(super) struct Unparking {
    handle: Arc<QueueHandle>,
    offsets: Vec<u64>,
}

impl Unparking {
    pub fn new(handle: &Arc<QueueHandle>, offsets: Vec<u64>) -> Unparking {
        Unparking {
            handle: handle.clone(),
            offsets,
        }
    }

    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    pub fn finish(mut self, state: &mut QueueState, ok: bool) {
        let offsets = std::mem::take(&mut self.offsets);
        state.unparked(&offsets, ok);
    }
}

impl Drop for Unparking {
    fn drop(&mut self) {
        if !self.offsets.is_empty() && !std::thread::panicking() {
            self.handle.state.lock().unparked(&self.offsets, false);
        }
    }
}
