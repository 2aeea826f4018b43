//! The delivery state of one queue: which messages are ready, leased, delayed or settled.
//!
//! Sans-IO: records are read through `RecordSource`, time is passed in, and the caller
//! writes the durable facts (settle, retry) to storage. Every unsettled message behind the
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

/// Where a queue's records come from (a storage log reader, or a model in tests).
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
}

pub struct QueueState {
    /// Lease nonces (a CSPRNG unless a simulation injects one).
    nonces: Arc<dyn NonceSource>,
    pub uid: u64,
    pub name: String,
    pub config: QueueConfig,
    /// Offsets below are durable and deliverable.
    visible_end: u64,
    /// Offsets below were assigned to accepted publishes.
    accepted_end: u64,
    ack_floor: u64,
    /// Settled offsets at or above the floor.
    settled: RangeSet,
    /// Settlements written but not yet confirmed by storage.
    settling: OffsetSet,
    /// Next offset never looked at for a first delivery.
    cursor: u64,
    /// Share of recently scanned messages that were leased (sizes the scan's reads).
    scan_yield: f64,
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
    /// (ack floor, published_at of the message there), cached for oldest-age.
    oldest: Option<(u64, i64)>,
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
}

impl QueueState {
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
            visible_end: 0,
            accepted_end: 0,
            ack_floor: 0,
            settled: RangeSet::new(),
            settling: OffsetSet::default(),
            cursor: 0,
            scan_yield: 1.0,
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
            oldest: None,
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
        let mut state = QueueState::new(log.uid, log.name.clone(), config);
        if state.config.dedup_window_ms > 0 {
            for (at, id) in &log.recent_ids.ids {
                state.dedup.restore(*at, id);
            }
        }
        state.visible_end = log.next_offset;
        state.accepted_end = log.next_offset;
        state.ack_floor = log.ack_floor;
        state.settled = log.settled.clone();
        state.cursor = log.ack_floor;
        for (&offset, info) in &log.retries {
            let RetryInfo {
                delivery_count,
                deliver_at_ms,
                errors,
            } = info;
            state.history.insert(
                offset,
                History {
                    delivery_count: *delivery_count,
                    errors: errors.clone(),
                },
            );
            if *deliver_at_ms > now_ms {
                state.add_timer(offset, *deliver_at_ms);
            }
        }
        // Messages awaiting a retry keep their key's slot across the restart.
        if state.keys.is_some() {
            for &offset in log.retries.keys() {
                if let Some(record) = source.read(offset, 1, 1)?.pop()
                    && record.offset == offset
                {
                    let key = state.key_hash(&record);
                    if let Some(gate) = &mut state.keys {
                        gate.hold(offset, key);
                    }
                }
            }
        }
        // One pass over the backlog for its size and its delayed messages.
        let mut from = log.ack_floor;
        while from < log.next_offset {
            let records = source.read(from, usize::MAX, SCAN_BYTES)?;
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for record in records {
                if state.settled.contains(record.offset) {
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
        Ok(state)
    }

    pub(super) fn log_end(&self) -> u64 {
        self.accepted_end.max(self.visible_end)
    }

    /// Messages accepted and not settled.
    pub fn unsettled(&self) -> u64 {
        self.log_end()
            .saturating_sub(self.ack_floor)
            .saturating_sub(self.settled.len())
    }

    pub fn set_visible_end(&mut self, end: u64) {
        self.visible_end = self.visible_end.max(end);
    }

    pub fn visible_end(&self) -> u64 {
        self.visible_end
    }

    pub fn ack_floor(&self) -> u64 {
        self.ack_floor
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
        offset < self.ack_floor
            || self.settled.contains(offset)
            || self.settling.contains(&offset)
            || self.leases.contains_key(&offset)
            || self.coalescer.as_ref().is_some_and(|c| c.is_held(offset))
    }
}
