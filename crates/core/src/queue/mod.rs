//! The delivery state of one queue: which messages are ready, leased, delayed or settled.
//!
//! Sans-IO: records are read through `RecordSource`, time is passed in, and the caller
//! writes the durable facts (settle, retry) to storage.
//!
//! **Sources and positions.** A queue's records come from one log. A subscription on a
//! stream is the same state over several sources: its own small log and one view per
//! partition (`Source`). Every map and set here is keyed by a *position*: the source's index
//! in the top 16 bits, the offset in that source below (`position`). For a queue (source 0)
//! a position is the offset, so queue state, receipts and storage ops are as they were.
//! Offsets turn into positions where records are read (`Positioned`) and back where the
//! state meets storage (`settle_ops`, `plan_retries`) or a consumer (receipts). Every unsettled message behind the
//! scan cursor is reachable from `leases`, `ready`, `timers`, `settling`, or a policy's
//! waiting structure (key gate, shaper lanes, coalescing windows); checked by
//! `debug_check_consistency`.

mod admit;
mod deliver;
mod park;
mod policies;
mod settle;
mod stats;

use admit::DrainMeter;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use tidewater_storage::format::RecordView;
use tidewater_storage::{LogState, RangeSet, ReadError, Record, RetryInfo};

use crate::clock::{NonceSource, OsNonces};
use crate::config::QueueConfig;
use crate::policy::coalesce::Coalescer;
use crate::policy::keys::KeyGate;
use crate::policy::shaper::Shaper;
use crate::policy::{Aimd, DedupWindow, Gcra, TenantQuotas};

use crate::offsets::{OffsetMap, OffsetSet};

/// Messages parked behind their key's slots, per queue; at this many the scan waits.
pub const MAX_PARKED: usize = 100_000;
/// Most records a delivery reads beyond its room when messages are being passed over.
pub(super) const SCAN_AHEAD: usize = 4_096;
/// Messages sorted into priority/fairness lanes per receive, at most (bounds its latency).
pub(super) const SHAPER_SCAN_STEP: usize = 50_000;
/// Reserved header holding a message's priority (0 = lowest).
pub const HEADER_PRIORITY: &str = "tidewater-priority";

/// Keys whose newest message a supersede queue tracks; beyond, new keys are not tracked.
pub const MAX_SUPERSEDE_KEYS: usize = 1_000_000;

/// Supersede: the newest message per key, and leased messages that a newer one replaced.
#[derive(Debug, Default)]
pub(super) struct Supersede {
    /// Randomly keyed, so a producer cannot aim many keys at one entry.
    hasher: std::collections::hash_map::RandomState,
    /// key hash -> (offset, bytes) of the newest accepted message with that key.
    latest: HashMap<u64, (u64, u64)>,
    /// Leased when superseded: their consumer learns it on extend or ack.
    flagged: OffsetSet,
}

pub(crate) const SCAN_BYTES: usize = 4 << 20;

/// Reserved header holding a message's own time to live (ms from its publish).
pub const HEADER_TTL_MS: &str = "tidewater-ttl-ms";
/// Reserved header of a merged (coalesced) message: how many messages it replaced.
pub const HEADER_MERGED: &str = "tidewater-merged";
/// Reserved header naming the producer (tenant) of a message.
pub const HEADER_TENANT: &str = "tidewater-tenant";
/// The tenant of messages that name none.
pub const ANONYMOUS_TENANT: &str = "anonymous";

/// Bits of a position that hold the offset; the source's index is above them. (2^48
/// offsets: nine years at a million records a second per partition.)
pub const POSITION_BITS: u32 = 48;
const OFFSET_MASK: u64 = (1 << POSITION_BITS) - 1;

/// The position of `offset` in source `src`.
pub fn position(src: usize, offset: u64) -> u64 {
    debug_assert!(offset <= OFFSET_MASK && src < 1 << (64 - POSITION_BITS));
    ((src as u64) << POSITION_BITS) | (offset & OFFSET_MASK)
}

/// The source a position is in.
pub fn source_of(pos: u64) -> usize {
    (pos >> POSITION_BITS) as usize
}

/// The offset of a position in its source.
pub fn offset_of(pos: u64) -> u64 {
    pos & OFFSET_MASK
}

/// Where a queue's records come from (a storage log reader, or a model in tests). Reads
/// from a position read that position's source only, and records come back with positions
/// (see `Positioned`; for a single log, positions and offsets are the same).
pub trait RecordSource {
    /// Records at offsets >= `from`, at most `max_count`, about `max_bytes` of bodies.
    fn read(&self, from: u64, max_count: usize, max_bytes: usize)
    -> Result<Vec<Record>, ReadError>;

    /// The records in `from..end` whose offset `want` accepts.
    fn read_where(
        &self,
        from: u64,
        end: u64,
        want: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Record>, ReadError>;

    /// Shows `visit` borrowed views of the records from `from` on, at most `max_count`,
    /// until it returns false.
    fn scan(
        &self,
        from: u64,
        max_count: usize,
        visit: &mut dyn FnMut(&RecordView<'_>) -> bool,
    ) -> Result<(), ReadError>;
}

/// Several record sources read as one: a read from a position goes to that position's
/// source (by index), and records come back with positions in place of offsets.
pub struct Positioned<'a> {
    pub sources: Vec<&'a dyn RecordSource>,
}

impl Positioned<'_> {
    fn part(&self, pos: u64) -> Option<&dyn RecordSource> {
        self.sources.get(source_of(pos)).copied()
    }
}

impl RecordSource for Positioned<'_> {
    fn read(
        &self,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, ReadError> {
        let Some(part) = self.part(from) else {
            return Ok(Vec::new());
        };
        let src = source_of(from);
        let mut records = part.read(offset_of(from), max_count, max_bytes)?;
        for record in &mut records {
            record.offset = position(src, record.offset);
        }
        Ok(records)
    }

    fn read_where(
        &self,
        from: u64,
        end: u64,
        want: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Record>, ReadError> {
        let Some(part) = self.part(from) else {
            return Ok(Vec::new());
        };
        let src = source_of(from);
        // Within the source of `from` (a position range never spans two).
        let end = if source_of(end.saturating_sub(1)) == src {
            offset_of(end.saturating_sub(1)) + 1
        } else {
            OFFSET_MASK + 1
        };
        let mut records =
            part.read_where(offset_of(from), end, &|offset| want(position(src, offset)))?;
        for record in &mut records {
            record.offset = position(src, record.offset);
        }
        Ok(records)
    }

    fn scan(
        &self,
        from: u64,
        max_count: usize,
        visit: &mut dyn FnMut(&RecordView<'_>) -> bool,
    ) -> Result<(), ReadError> {
        let Some(part) = self.part(from) else {
            return Ok(());
        };
        let src = source_of(from);
        part.scan(offset_of(from), max_count, &mut |view| {
            let mut view = *view;
            view.offset = position(src, view.offset);
            visit(&view)
        })
    }
}

impl RecordSource for tidewater_storage::LogReader {
    fn read(
        &self,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, ReadError> {
        tidewater_storage::LogReader::read(self, from, max_count, max_bytes)
    }

    fn read_where(
        &self,
        from: u64,
        end: u64,
        want: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Record>, ReadError> {
        tidewater_storage::LogReader::read_where(self, from, end, want)
    }

    fn scan(
        &self,
        from: u64,
        max_count: usize,
        visit: &mut dyn FnMut(&RecordView<'_>) -> bool,
    ) -> Result<(), ReadError> {
        tidewater_storage::LogReader::scan(self, from, max_count, visit)
    }
}

#[derive(Debug, Clone)]
pub struct Lease {
    pub nonce: u64,
    pub deadline_ms: i64,
    pub delivery_count: u32,
    pub size: u64,
    pub published_at_ms: i64,
}

/// Delivery count and errors of a message that was delivered and not settled.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub delivery_count: u32,
    pub errors: VecDeque<(i64, String)>,
}

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub receipt: String,
    pub delivery_count: u32,
    /// The source it came from (0 for a queue; a subscription's partition is its source
    /// index minus one).
    pub source: usize,
    /// `record.offset` is the offset in its source.
    pub record: Record,
}

#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub published: u64,
    pub delivered: u64,
    pub acked: u64,
    pub nacked: u64,
    pub expired: u64,
    pub dead_lettered: u64,
    pub redriven: u64,
    pub purged: u64,
    /// Messages older than their time to live, dropped or dead-lettered.
    pub ttl_expired: u64,
    /// Subscriptions: messages whose records retention deleted before they were settled.
    pub retention_expired: u64,
    /// Publishes acknowledged but not enqueued: their id was seen within the dedup window.
    pub deduplicated: u64,
    /// Pending messages cancelled by a newer one with their key (supersede).
    pub superseded: u64,
    /// Coalescing: messages that entered a window, and deliveries windows produced.
    pub coalesced_in: u64,
    pub coalesced_out: u64,
    /// Dispatch rate cuts and raises by adaptive throttling.
    pub throttle_cuts: u64,
    pub throttle_raises: u64,
    /// Refused publishes by reason (a fixed, small set of reasons).
    pub refused: HashMap<&'static str, u64>,
}

/// A message whose lease ran out or that was nacked: what to do with it next.
#[derive(Debug, Clone, PartialEq)]
pub struct Unacked {
    pub offset: u64,
    pub delivery_count: u32,
    pub size: u64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QueueStats {
    /// Messages ready for delivery now.
    pub depth: u64,
    pub in_flight: u64,
    pub delayed: u64,
    /// Of `delayed`: long delays parked in the delay log.
    pub parked: u64,
    /// Every unsettled message (depth + in_flight + delayed).
    pub total: u64,
    pub bytes: u64,
    pub oldest_age_ms: u64,
    pub published: u64,
    pub delivered: u64,
    pub acked: u64,
    pub nacked: u64,
    pub expired: u64,
    pub dead_lettered: u64,
    pub redriven: u64,
    pub purged: u64,
    pub ttl_expired: u64,
    pub deduplicated: u64,
    pub superseded: u64,
    /// Client-chosen ids remembered for deduplication now (memory: see max_dedup_ids).
    pub dedup_ids: u64,
    pub coalesced_in: u64,
    pub coalesced_out: u64,
    /// Coalescing windows open now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coalesce_windows: Option<u64>,
    pub throttle_cuts: u64,
    /// Per-key concurrency: keys with a message leased or awaiting a retry, and keys with
    /// messages waiting behind them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_in_flight: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_blocked: Option<u64>,
    /// Priorities: messages sorted and waiting per level, highest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_by_priority: Option<Vec<u64>>,
    /// Fair scheduling: values (tenants, keys, ...) with messages waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fair_flows: Option<u64>,
    pub throttle_raises: u64,
    /// The dispatch rate in force (messages/s; adaptive throttling moves it), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch_rate_per_s: Option<f64>,
    /// The backlog forecast with the server's default objectives (`crate::forecast`): set
    /// when the broker shows a queue or subscription.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<crate::forecast::Forecast>,
}

/// One source of a state's records (a queue's log, or a subscription's log or partition
/// view). Every field is a position in this source's range.
#[derive(Debug)]
pub(super) struct Source {
    /// The storage log whose settles and retries hold this source's durable state.
    pub(super) uid: u64,
    /// Positions below are durable and deliverable.
    pub(super) visible_end: u64,
    /// Positions below were assigned to accepted publishes.
    pub(super) accepted_end: u64,
    pub(super) ack_floor: u64,
    /// Settled positions at or above the floor.
    pub(super) settled: RangeSet,
    /// Next position never looked at for a first delivery.
    pub(super) cursor: u64,
    /// Share of recently scanned messages that were leased (sizes the scan's reads).
    pub(super) scan_yield: f64,
    /// (ack floor, published_at of the message there), cached for oldest-age.
    pub(super) oldest: Option<(u64, i64)>,
    /// Offsets may hold no record (a compacted stream partition): the scan settles those
    /// it passes (`QueueState::take_skipped`). A queue's log has none.
    pub(super) holes: bool,
}

impl Source {
    fn new(index: usize, uid: u64) -> Self {
        let start = position(index, 0);
        Source {
            uid,
            visible_end: start,
            accepted_end: start,
            ack_floor: start,
            settled: RangeSet::new(),
            cursor: start,
            scan_yield: 1.0,
            oldest: None,
            holes: false,
        }
    }

    /// Restores the durable state of its log.
    fn restore(&mut self, index: usize, log: &LogState) {
        let at = |offset| position(index, offset);
        self.visible_end = at(log.next_offset);
        self.accepted_end = at(log.next_offset);
        self.ack_floor = at(log.ack_floor);
        self.cursor = at(log.ack_floor);
        self.settled = RangeSet::new();
        for range in log.settled.iter() {
            self.settled.insert(at(range.start)..at(range.end));
        }
    }

    fn end(&self) -> u64 {
        self.accepted_end.max(self.visible_end)
    }

    fn unsettled(&self) -> u64 {
        self.end()
            .saturating_sub(self.ack_floor)
            .saturating_sub(self.settled.len())
    }
}

pub struct QueueState {
    /// Lease nonces (a CSPRNG unless a simulation injects one).
    nonces: Arc<dyn NonceSource>,
    /// The log of source 0 (a queue's log; a subscription's own log).
    pub uid: u64,
    pub name: String,
    pub config: QueueConfig,
    /// Where records come from; a queue has one.
    sources: Vec<Source>,
    /// Source index by storage uid (receipts name the uid).
    source_by_uid: HashMap<u64, usize>,
    /// The source the next scan starts from (round robin over sources).
    next_source: usize,
    /// Settlements written but not yet confirmed by storage.
    settling: OffsetSet,
    leases: OffsetMap<Lease>,
    lease_expiry: BTreeSet<(i64, u64)>,
    timers: BTreeSet<(i64, u64)>,
    timer_at: OffsetMap<i64>,
    /// Redeliverable now, served before new messages.
    ready: VecDeque<u64>,
    history: OffsetMap<History>,
    backlog_bytes: i64,
    reserved_messages: u64,
    reserved_bytes: u64,
    pub counters: Counters,
    drain: DrainMeter,
    /// Dispatch rate limit and its adaptive controller (None when unused: no cost).
    rate: Option<Gcra>,
    aimd: Option<Aimd>,
    /// Set when the rate limit held back deliveries: when the next one conforms.
    rate_wakeup: Option<i64>,
    /// Messages found past their time to live, being settled or dead-lettered by the caller.
    expired: Vec<Unacked>,
    /// Producer token buckets per tenant.
    quotas: TenantQuotas,
    /// Client-chosen ids accepted within `dedup_window_ms`.
    dedup: DedupWindow,
    /// Per-key concurrency (None when `key_concurrency` is not set).
    keys: Option<KeyGate>,
    /// Newest message per key (None unless `supersede`).
    supersede: Option<Supersede>,
    /// Priority levels and fair scheduling (None unless configured).
    shaper: Option<Shaper>,
    /// Debounce windows by key (None unless `coalesce`).
    coalescer: Option<Coalescer>,
    /// Long-delayed messages parked in the queue's delay log: (due, offset there), and
    /// offset -> (due, bytes) for those and for ones being moved to the main log.
    parked: BTreeSet<(i64, u64)>,
    parked_info: OffsetMap<(i64, u64)>,
    parked_bytes: u64,
    /// Pending messages superseded by a newer one, being settled by the caller.
    cancelled: Vec<Unacked>,
    /// Offsets found to hold no record (holes of a source with holes), settled here and
    /// to be settled in storage by the caller (`take_skipped`).
    skipped: Vec<std::ops::Range<u64>>,
}

impl QueueState {
    /// When the dispatch rate lets the next delivery go, if it is what holds deliveries back
    /// (set by the last `deliver`).
    pub fn rate_wakeup(&self) -> Option<i64> {
        self.rate_wakeup
    }

    /// Draws lease nonces from `nonces` from now on (the broker passes its own).
    pub fn set_nonce_source(&mut self, nonces: Arc<dyn NonceSource>) {
        self.nonces = nonces;
    }

    pub fn new(uid: u64, name: String, config: QueueConfig) -> Self {
        QueueState {
            nonces: Arc::new(OsNonces),
            uid,
            name,
            config,
            sources: vec![Source::new(0, uid)],
            source_by_uid: HashMap::from([(uid, 0)]),
            next_source: 0,
            settling: OffsetSet::default(),
            leases: OffsetMap::default(),
            lease_expiry: BTreeSet::new(),
            timers: BTreeSet::new(),
            timer_at: OffsetMap::default(),
            ready: VecDeque::new(),
            history: OffsetMap::default(),
            backlog_bytes: 0,
            reserved_messages: 0,
            reserved_bytes: 0,
            counters: Counters::default(),
            drain: DrainMeter::default(),
            rate: None,
            aimd: None,
            rate_wakeup: None,
            expired: Vec::new(),
            quotas: TenantQuotas::default(),
            dedup: DedupWindow::default(),
            keys: None,
            supersede: None,
            shaper: None,
            coalescer: None,
            parked: BTreeSet::new(),
            parked_info: OffsetMap::default(),
            parked_bytes: 0,
            cancelled: Vec::new(),
            skipped: Vec::new(),
        }
        .with_policies()
    }

    /// Applies a new configuration; policy state (spent rate, adaptive rate) carries over.
    pub fn set_config(&mut self, config: QueueConfig) {
        if config.quota != self.config.quota {
            self.quotas.reset();
        }
        if config.dedup_window_ms == 0 {
            self.dedup.clear();
        }
        self.config = config;
        self.apply_policies();
    }

    /// Rebuilds the state of a recovered log: leases are gone, so every unsettled message
    /// is deliverable (or delayed, if its retry or publish time is still ahead).
    pub fn recover(
        log: &LogState,
        config: QueueConfig,
        source: &impl RecordSource,
        now_ms: i64,
    ) -> Result<Self, ReadError> {
        Self::recover_sources(&log.name, &[log], 0, config, source, now_ms)
    }

    /// Rebuilds a state over several recovered logs (source `i` is `logs[i]`; `source`
    /// reads by position). The ids remembered for deduplication are source 0's. The first
    /// `logs.len() - with_holes` sources are logs of the state's own (read once for their
    /// backlog's size and delayed messages); the last `with_holes` are stream partitions,
    /// whose offsets may hold no record, and which are not read here (their records are
    /// never delayed, and their size is their segments': a subscription's creation or a
    /// restart must not read a whole stream), unless `supersede` needs each key's newest.
    pub fn recover_sources(
        name: &str,
        logs: &[&LogState],
        with_holes: usize,
        config: QueueConfig,
        source: &impl RecordSource,
        now_ms: i64,
    ) -> Result<Self, ReadError> {
        let first = logs.first().expect("a state has a source");
        let mut state = QueueState::new(first.uid, name.to_string(), config);
        if state.config.dedup_window_ms > 0 {
            for (at, id) in &first.recent_ids.ids {
                state.dedup.restore(*at, id);
            }
        }
        for (index, log) in logs.iter().enumerate() {
            if index > 0 {
                state.add_source(log.uid);
            }
            state.sources[index].restore(index, log);
            state.sources[index].holes = index >= logs.len() - with_holes.min(logs.len());
        }
        for (index, log) in logs.iter().enumerate() {
            for (&offset, info) in &log.retries {
                let RetryInfo {
                    delivery_count,
                    deliver_at_ms,
                    errors,
                } = info;
                let pos = position(index, offset);
                state.history.insert(
                    pos,
                    History {
                        delivery_count: *delivery_count,
                        errors: errors.clone(),
                    },
                );
                if *deliver_at_ms > now_ms {
                    state.add_timer(pos, *deliver_at_ms);
                }
            }
        }
        // Messages awaiting a retry keep their key's slot across the restart.
        if state.keys.is_some() {
            for (index, log) in logs.iter().enumerate() {
                for &offset in log.retries.keys() {
                    let pos = position(index, offset);
                    if let Some(record) = source.read(pos, 1, 1)?.pop()
                        && record.offset == pos
                    {
                        let key = state.key_hash(&record);
                        if let Some(gate) = &mut state.keys {
                            gate.hold(pos, key);
                        }
                    }
                }
            }
        }
        // One pass over the backlog for its size and its delayed messages.
        // (Stream partitions too under supersede: the newest record per key is rebuilt.)
        let own: Vec<usize> = (0..logs.len())
            .filter(|&i| !state.sources[i].holes || state.supersede.is_some())
            .collect();
        for index in own {
            let (mut from, end) = {
                let src = &state.sources[index];
                (src.ack_floor, src.visible_end)
            };
            while from < end {
                let records = source.read(from, usize::MAX, SCAN_BYTES)?;
                let Some(last) = records.last() else { break };
                from = last.offset + 1;
                state.recover_backlog(records, now_ms);
            }
        }
        Ok(state)
    }

    /// Adds a source of records whose durable state is in storage log `uid`; returns its
    /// index (positions `position(index, offset)`).
    pub fn add_source(&mut self, uid: u64) -> usize {
        let index = self.sources.len();
        self.sources.push(Source::new(index, uid));
        self.source_by_uid.insert(uid, index);
        index
    }

    /// Marks source `index` as one whose offsets may hold no record (a stream partition).
    pub fn set_source_holes(&mut self, index: usize) {
        self.sources[index].holes = true;
    }

    /// Positions `range` (in one source with holes) hold no record: settled now in memory,
    /// and handed to the caller to settle in storage. A position already settled or busy
    /// is left alone (a busy one had a record when it was taken).
    pub(super) fn skip_hole(&mut self, range: std::ops::Range<u64>) {
        if range.is_empty() || !self.src(range.start).holes {
            return;
        }
        let src = self.src(range.start);
        let start = range.start.max(src.ack_floor);
        if start >= range.end {
            return;
        }
        // Fast path: nothing there is settled or busy (the scan ahead of everything).
        let clean = src.settled.count_in(start..range.end) == 0
            && (start..range.end).all(|pos| !self.is_settled_or_busy(pos));
        if clean {
            self.src_mut(start).settled.insert(start..range.end);
            self.skipped.push(start..range.end);
        } else {
            for pos in start..range.end {
                if !self.is_settled_or_busy(pos) {
                    self.src_mut(pos).settled.insert_one(pos);
                    self.skipped.push(pos..pos + 1);
                }
            }
        }
        self.advance_floor();
    }

    /// A picked message's record is gone (a source with holes: compaction removed it after
    /// it was first seen): settled like a hole, its history and key slot let go.
    pub(super) fn record_gone(&mut self, pos: u64) {
        if !self.src(pos).holes || self.is_settled_or_busy(pos) {
            return;
        }
        if let Some(at) = self.timer_at.remove(&pos) {
            self.timers.remove(&(at, pos));
        }
        self.history.remove(&pos);
        if let Some(gate) = &mut self.keys {
            gate.settled(pos);
        }
        self.skip_hole(pos..pos + 1);
    }

    /// Position ranges found to hold no record since the last call (settled in memory):
    /// the caller settles them in storage (`settle_range_ops`; a loss of that write only
    /// means they are found again after a restart).
    pub fn take_skipped(&mut self) -> Vec<std::ops::Range<u64>> {
        std::mem::take(&mut self.skipped)
    }

    /// The backlog pass of a recovery, over records read from one source.
    fn recover_backlog(&mut self, records: Vec<Record>, now_ms: i64) {
        let state = self;
        {
            for record in records {
                if state.src(record.offset).settled.contains(record.offset) {
                    continue;
                }
                state.backlog_bytes += record.size() as i64;
                if let Some(key) = &record.key {
                    // Two pending messages with one key: a cancel was lost in a crash.
                    state.supersede_one(record.offset, key, record.size());
                }
                if record.deliver_at_ms > now_ms && !state.timer_at.contains_key(&record.offset) {
                    state.add_timer(record.offset, record.deliver_at_ms);
                }
            }
        }
    }

    /// The source of a position.
    pub(super) fn src(&self, pos: u64) -> &Source {
        &self.sources[source_of(pos)]
    }

    pub(super) fn src_mut(&mut self, pos: u64) -> &mut Source {
        &mut self.sources[source_of(pos)]
    }

    /// Number of sources (1 for a queue).
    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// The source whose durable state is in storage log `uid`.
    pub fn source_index(&self, uid: u64) -> Option<usize> {
        // (A queue: one compare, no hashing, on every receipt.)
        match &self.sources[..] {
            [only] => (only.uid == uid).then_some(0),
            _ => self.source_by_uid.get(&uid).copied(),
        }
    }

    /// The storage log of source `index`.
    pub fn source_uid(&self, index: usize) -> u64 {
        self.sources[index].uid
    }

    /// Messages accepted and not settled.
    pub fn unsettled(&self) -> u64 {
        self.sources.iter().map(Source::unsettled).sum()
    }

    /// Source 0's end moved (a queue's log): offsets below `end` are durable.
    pub fn set_visible_end(&mut self, end: u64) {
        self.set_source_end(0, end);
    }

    /// Source `index`'s durable end moved to offset `end`. For a stream partition, the
    /// offsets it moved over count as published (records reaching the subscription).
    pub fn set_source_end(&mut self, index: usize, end: u64) {
        let src = &mut self.sources[index];
        let end = position(index, end);
        if src.holes && end > src.visible_end {
            self.counters.published += end - src.visible_end;
        }
        src.visible_end = src.visible_end.max(end);
    }

    /// Source 0's durable end (a queue's log).
    pub fn visible_end(&self) -> u64 {
        offset_of(self.sources[0].visible_end)
    }

    /// Source 0's ack floor (a queue's log).
    pub fn ack_floor(&self) -> u64 {
        offset_of(self.sources[0].ack_floor)
    }

    /// Messages of source `index` accepted and not settled.
    pub fn source_unsettled(&self, index: usize) -> u64 {
        self.sources[index].unsettled()
    }

    /// Source `index`'s (ack floor, durable end), as offsets.
    pub fn source_range(&self, index: usize) -> (u64, u64) {
        let src = &self.sources[index];
        (offset_of(src.ack_floor), offset_of(src.visible_end))
    }

    pub(super) fn with_policies(mut self) -> Self {
        self.apply_policies();
        self
    }

    pub(super) fn apply_policies(&mut self) {
        match (self.config.coalesce.is_some(), &mut self.coalescer) {
            (true, None) => self.coalescer = Some(Coalescer::default()),
            (false, Some(coalescer)) => {
                let held = coalescer.release_all();
                self.ready.extend(held);
                self.coalescer = None;
            }
            _ => {}
        }
        let levels = self.config.priority_levels.max(1);
        let wants_shaper = levels > 1 || self.config.fairness.is_some();
        let weights: HashMap<String, f64> = self
            .config
            .fairness
            .as_ref()
            .map(|f| f.weights.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        let min_share = self.config.priority_min_share;
        let rebuild = match &self.shaper {
            Some(shaper) => !wants_shaper || shaper.levels() != levels as usize,
            None => wants_shaper,
        };
        if rebuild {
            // Messages already sorted are behind the cursor: serve them first, in order.
            if let Some(old) = self.shaper.take() {
                let mut waiting: Vec<u64> = old.offsets().collect();
                waiting.sort_unstable();
                self.ready.extend(waiting);
            }
            if wants_shaper {
                self.shaper = Some(Shaper::new(levels, min_share, weights));
            }
        } else if let Some(shaper) = &mut self.shaper {
            shaper.reconfigure(min_share, weights);
        }
        match (self.config.supersede, self.supersede.is_some()) {
            (true, false) => self.supersede = Some(Supersede::default()),
            (false, true) => self.supersede = None,
            _ => {}
        }
        match (self.config.key_concurrency, &mut self.keys) {
            (Some(limit), Some(gate)) => gate.set_limit(limit),
            (Some(limit), None) => self.keys = Some(KeyGate::new(limit)),
            (None, Some(gate)) => {
                // Waiting messages are behind the cursor: hand them to the ready queue.
                let waiting = gate.drain_waiting();
                self.ready.extend(waiting);
                self.keys = None;
            }
            (None, None) => {}
        }
        self.aimd = match (self.config.adaptive, self.aimd.take()) {
            (None, _) => None,
            (Some(a), Some(mut aimd)) => {
                aimd.reconfigure(a.min_per_s, a.max_per_s);
                Some(aimd)
            }
            (Some(a), None) => Some(Aimd::new(a.min_per_s, a.max_per_s)),
        };
        self.rate = match (self.dispatch_limit(), self.rate.take()) {
            (None, _) => None,
            (Some((per_s, burst)), Some(mut gcra)) => {
                gcra.reconfigure(per_s, burst);
                Some(gcra)
            }
            (Some((per_s, burst)), None) => Some(Gcra::new(per_s, burst)),
        };
    }

    /// (per second, burst) in force: the adaptive rate if adaptive, else the configured one.
    pub(super) fn dispatch_limit(&self) -> Option<(f64, u64)> {
        let burst = self.config.dispatch_rate.map(|r| r.burst);
        match (&self.aimd, self.config.dispatch_rate) {
            // Without a configured burst, 100 ms worth of the current rate.
            (Some(aimd), _) => Some((
                aimd.rate(),
                burst.unwrap_or(((aimd.rate() / 10.0) as u64).max(1)),
            )),
            (None, Some(rate)) => Some((rate.per_s, rate.burst)),
            (None, None) => None,
        }
    }

    pub(super) fn is_settled_or_busy(&self, offset: u64) -> bool {
        let src = self.src(offset);
        offset < src.ack_floor
            || src.settled.contains(offset)
            || self.settling.contains(&offset)
            || self.leases.contains_key(&offset)
            || self.coalescer.as_ref().is_some_and(|c| c.is_held(offset))
    }
}

#[cfg(test)]
mod sources_tests;
