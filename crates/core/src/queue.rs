//! The delivery state of one queue: which messages are ready, leased, delayed or settled.
//!
//! Sans-IO: records are read through `RecordSource`, time is passed in, and the caller
//! writes the durable facts (settle, retry) to storage. Every unsettled message behind the
//! scan cursor is reachable from `leases`, `ready`, `timers`, `settling`, or a policy's
//! waiting structure (key gate, shaper lanes, coalescing windows); checked by
//! `debug_check_consistency`.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use tidewater_storage::format::RecordView;
use tidewater_storage::{LogState, RangeSet, ReadError, Record, RetryInfo};

use crate::clock::{NonceSource, OsNonces};
use crate::config::CoalesceMode;
use crate::config::QueueConfig;
use crate::error::{BrokerError, ErrorCode};
use crate::policy::coalesce::{Closed, Coalescer};
use crate::policy::keys::KeyGate;
use crate::policy::shaper::{Shaper, Staged, StagedLanes};
use crate::policy::{Aimd, DedupWindow, Gcra, TenantQuotas};

/// Messages parked behind their key's slots, per queue; at this many the scan waits.
pub const MAX_PARKED: usize = 100_000;
/// Most records a delivery reads beyond its room when messages are being passed over.
const SCAN_AHEAD: usize = 4_096;
/// Messages sorted into priority/fairness lanes per receive, at most (bounds its latency).
const SHAPER_SCAN_STEP: usize = 50_000;
/// Reserved header holding a message's priority (0 = lowest).
pub const HEADER_PRIORITY: &str = "tidewater-priority";

/// Keys whose newest message a supersede queue tracks; beyond, new keys are not tracked.
pub const MAX_SUPERSEDE_KEYS: usize = 1_000_000;

/// Supersede: the newest message per key, and leased messages that a newer one replaced.
#[derive(Debug, Default)]
struct Supersede {
    /// Randomly keyed, so a producer cannot aim many keys at one entry.
    hasher: std::collections::hash_map::RandomState,
    /// key hash -> (offset, bytes) of the newest accepted message with that key.
    latest: HashMap<u64, (u64, u64)>,
    /// Leased when superseded: their consumer learns it on extend or ack.
    flagged: OffsetSet,
}
use crate::offsets::{OffsetMap, OffsetSet};
use crate::receipt::Receipt;

/// Bytes read ahead per scan step when looking for deliverable messages.
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

/// Settlements per second, measured over windows of at least a second.
#[derive(Debug, Clone, Default)]
struct DrainMeter {
    rate_per_s: f64,
    window_start_ms: i64,
    window_count: u64,
}

impl DrainMeter {
    fn record(&mut self, n: u64, now_ms: i64) {
        if self.window_start_ms == 0 {
            self.window_start_ms = now_ms;
        }
        self.window_count += n;
        let elapsed = now_ms - self.window_start_ms;
        if elapsed >= 1_000 {
            let rate = self.window_count as f64 * 1_000.0 / elapsed as f64;
            self.rate_per_s = if self.rate_per_s == 0.0 {
                rate
            } else {
                0.5 * self.rate_per_s + 0.5 * rate
            };
            self.window_start_ms = now_ms;
            self.window_count = 0;
        }
    }

    /// How long until `excess` messages have drained at the measured rate (100 ms ..= 5 min).
    /// Without a recent measurement: 1 s (a refused publish is cheap to retry).
    fn wait_ms(&self, excess: u64, now_ms: i64) -> u64 {
        let stale = now_ms - self.window_start_ms > 10_000;
        if self.rate_per_s <= 0.0 || stale {
            return 1_000;
        }
        ((excess as f64 / self.rate_per_s) * 1_000.0).clamp(100.0, 300_000.0) as u64
    }
}

/// The records at `offsets` (any order), read in few sequential passes, in the order
/// asked; None where a record is gone (deleted with its segment: it was settled).
fn read_offsets(
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

    /// Takes quota tokens for a publish of `(tenant, messages, bytes)`, or refuses it whole
    /// with the exact time until the tokens exist.
    pub fn admit_quota(
        &mut self,
        demand: &[(&str, u64, u64)],
        now_ms: i64,
    ) -> Result<(), BrokerError> {
        let Some(quota) = &self.config.quota else {
            return Ok(());
        };
        self.quotas.admit(quota, demand, now_ms).map_err(|over| {
            *self.counters.refused.entry("quota").or_default() += 1;
            BrokerError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "tenant '{}' is over its {} quota on queue '{}'; nothing was stored, retry in {} ms",
                    over.tenant, over.what, self.name, over.wait_ms
                ),
            )
            .retry_after(over.wait_ms)
        })
    }

    /// Of these (index in batch, client-chosen id), the indexes that duplicate an id
    /// accepted within the dedup window; the others are claimed until `release_ids`.
    pub fn claim_ids(&mut self, ids: &[(usize, &[u8])], max_ids: u32, now_ms: i64) -> Vec<usize> {
        let window = self.config.dedup_window_ms;
        if window == 0 || ids.is_empty() {
            return Vec::new();
        }
        self.dedup.prune(window, max_ids as usize, now_ms);
        let dups: Vec<usize> = ids
            .iter()
            .filter(|(_, id)| self.dedup.check_and_claim(id, now_ms))
            .map(|&(idx, _)| idx)
            .collect();
        self.counters.deduplicated += dups.len() as u64;
        dups
    }

    /// Forgets claims of a publish that was refused or failed.
    pub fn release_ids(&mut self, ids: &[Vec<u8>]) {
        self.dedup.release(ids);
    }

    /// Publishes refused by quota, per tenant (the top tenants, then "other").
    pub fn quota_refusals(&self) -> std::collections::BTreeMap<String, u64> {
        self.quotas
            .refused
            .iter()
            .map(|(t, n)| (t.clone(), *n))
            .collect()
    }

    fn with_policies(mut self) -> Self {
        self.apply_policies();
        self
    }

    fn apply_policies(&mut self) {
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
    fn dispatch_limit(&self) -> Option<(f64, u64)> {
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

    /// A consumer signalled overload (nack reason `overloaded`, or leases expired).
    pub fn overloaded(&mut self, now_ms: i64) {
        if let Some(aimd) = &mut self.aimd
            && aimd.overloaded(now_ms)
        {
            self.counters.throttle_cuts += 1;
            self.apply_policies();
        }
    }

    /// Consumers acknowledged messages.
    pub fn succeeded(&mut self, now_ms: i64) {
        if let Some(aimd) = &mut self.aimd
            && aimd.succeeded(now_ms)
        {
            self.counters.throttle_raises += 1;
            self.apply_policies();
        }
    }

    /// When a message expires, if it has a time to live (queue-wide or its own).
    fn expires_at(&self, record: &Record) -> Option<i64> {
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
    fn expire(&mut self, record: &Record) {
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

    /// Records that a batch with these keyed messages (index in batch, key, bytes) was
    /// appended at `base`: older pending messages with the same keys are cancelled (see
    /// `take_cancelled`), older leased ones are flagged.
    pub fn supersede(&mut self, base: u64, keyed: &[(u32, Vec<u8>, u64)]) {
        for (idx, key, size) in keyed {
            self.supersede_one(base + *idx as u64, key, *size);
        }
    }

    fn supersede_one(&mut self, offset: u64, key: &[u8], size: u64) {
        let Some(s) = &mut self.supersede else { return };
        let hash = std::hash::BuildHasher::hash_one(&s.hasher, key);
        if s.latest.len() >= MAX_SUPERSEDE_KEYS && !s.latest.contains_key(&hash) {
            let (floor, settled) = (self.ack_floor, &self.settled);
            s.latest
                .retain(|_, (o, _)| *o >= floor && !settled.contains(*o));
            if s.latest.len() >= MAX_SUPERSEDE_KEYS {
                return;
            }
        }
        let Some((older, older_size)) = s.latest.insert(hash, (offset, size)) else {
            return;
        };
        if older >= offset
            || older < self.ack_floor
            || self.settled.contains(older)
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

    /// Makes a message deliverable ahead of the scan (a merged message just appended).
    pub fn make_ready(&mut self, offset: u64) {
        self.ready.push_back(offset);
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
        while self.cursor < self.visible_end {
            let records = source.read(self.cursor, 1_000, SCAN_BYTES)?;
            if records.is_empty() {
                break;
            }
            for record in records {
                if record.offset >= self.visible_end
                    || record.published_at_ms.saturating_add(ttl as i64) > now_ms
                {
                    return Ok(());
                }
                self.cursor = record.offset + 1;
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

    fn log_end(&self) -> u64 {
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

    /// Reserves room for a publish or refuses it with a retry-after from the drain rate.
    pub fn admit(&mut self, n: u64, bytes: u64, now_ms: i64) -> Result<(), BrokerError> {
        if n > self.config.max_messages || bytes > self.config.max_bytes {
            // Not even an empty queue takes it: a retry would be refused forever.
            *self.counters.refused.entry("exceeds_capacity").or_default() += 1;
            let what = if n > self.config.max_messages {
                format!("{n} messages, max_messages is {}", self.config.max_messages)
            } else {
                format!("{bytes} bytes, max_bytes is {}", self.config.max_bytes)
            };
            return Err(BrokerError::new(
                ErrorCode::ExceedsCapacity,
                format!(
                    "the publish is larger than queue '{}' can ever hold ({what}); nothing was stored, and a retry cannot succeed: split it or raise the limit",
                    self.name
                ),
            ));
        }
        let messages =
            self.unsettled() + self.parked_info.len() as u64 + self.reserved_messages + n;
        let total_bytes =
            self.backlog_bytes.max(0) as u64 + self.parked_bytes + self.reserved_bytes + bytes;
        if messages > self.config.max_messages || total_bytes > self.config.max_bytes {
            *self.counters.refused.entry("queue_full").or_default() += 1;
            let excess = messages.saturating_sub(self.config.max_messages).max(n);
            let wait = self.drain.wait_ms(excess, now_ms);
            let what = if messages > self.config.max_messages {
                format!(
                    "{} of max_messages {}",
                    self.unsettled(),
                    self.config.max_messages
                )
            } else {
                format!(
                    "{} bytes of max_bytes {}",
                    self.backlog_bytes.max(0),
                    self.config.max_bytes
                )
            };
            return Err(BrokerError::new(
                ErrorCode::QueueFull,
                format!(
                    "queue '{}' is full ({what}); nothing was stored, retry in {} s",
                    self.name,
                    wait.div_ceil(1000)
                ),
            )
            .retry_after(wait));
        }
        self.reserved_messages += n;
        self.reserved_bytes += bytes;
        Ok(())
    }

    /// Reserves room without a capacity check (moves of already-accepted messages).
    pub fn reserve_unchecked(&mut self, n: u64, bytes: u64) {
        self.reserved_messages += n;
        self.reserved_bytes += bytes;
    }

    pub fn count_refusal(&mut self, reason: &'static str) {
        *self.counters.refused.entry(reason).or_default() += 1;
    }

    /// Ends a reservation; on success the messages at `base..base+n` join the backlog.
    /// `delays` are (index in batch, deliver_at) of delayed messages.
    pub fn published(&mut self, n: u64, bytes: u64, appended: Option<(u64, &[(u32, i64)])>) {
        self.reserved_messages -= n;
        self.reserved_bytes -= bytes;
        if let Some((base, delays)) = appended {
            self.accepted_end = self.accepted_end.max(base + n);
            self.backlog_bytes += bytes as i64;
            self.counters.published += n;
            for &(idx, at) in delays {
                // Behind the cursor the scan has seen it already (and timed or delivered it).
                let offset = base + idx as u64;
                if offset >= self.cursor && !self.is_settled_or_busy(offset) {
                    self.add_timer(offset, at);
                }
            }
        }
    }

    fn add_timer(&mut self, offset: u64, at: i64) {
        if let Some(old) = self.timer_at.insert(offset, at) {
            self.timers.remove(&(old, offset));
        }
        self.timers.insert((at, offset));
    }

    fn is_settled_or_busy(&self, offset: u64) -> bool {
        offset < self.ack_floor
            || self.settled.contains(offset)
            || self.settling.contains(&offset)
            || self.leases.contains_key(&offset)
            || self.coalescer.as_ref().is_some_and(|c| c.is_held(offset))
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
            if offset < self.cursor && !self.is_settled_or_busy(offset) {
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
                    _ => {
                        // Gone meanwhile (settled): free its slot for the next in line.
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
        // Read about what the room takes at the share of scanned messages recently leased
        // (the rest were parked behind their key, settled, timed): records read past the
        // room are read again next time, so a fixed read-ahead costs a consumer taking a
        // few at a time, and no read-ahead costs a read per leased few behind a hot key.
        let (mut scanned, mut taken) = (0usize, 0usize);
        'scan: while self.shaper.is_none() && out.len() < room && self.cursor < self.visible_end {
            let left = room - out.len();
            let want = ((left as f64 / self.scan_yield).ceil() as usize).min(left + SCAN_AHEAD);
            let records = source.read(self.cursor, want, SCAN_BYTES)?;
            if records.is_empty() {
                break;
            }
            for record in records {
                if record.offset >= self.visible_end {
                    break;
                }
                if self
                    .keys
                    .as_ref()
                    .is_some_and(|gate| gate.parked_len() >= MAX_PARKED)
                {
                    break 'scan; // bounded lookahead: wait for parked keys to move
                }
                self.cursor = record.offset + 1;
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
                if out.len() == room {
                    break;
                }
            }
        }
        if scanned > 0 {
            let seen = taken as f64 / scanned as f64;
            self.scan_yield = (0.5 * self.scan_yield + 0.5 * seen).clamp(0.05, 1.0);
        }
        self.counters.delivered += out.len() as u64;
        if let Some(rate) = &mut self.rate {
            rate.take(now_ms, out.len());
        }
        Ok(out)
    }

    /// Leases the messages `next` hands out (skipping settled, leased and timed ones) until
    /// `out` holds `room`, reading each batch of picks in few sequential passes.
    fn deliver_picks(
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
            for record in read_offsets(source, &picked)?.into_iter().flatten() {
                if let Some(record) = self.screen(record, now_ms) {
                    out.push(self.lease(record, now_ms, lease_ms));
                }
            }
        }
    }

    /// Sorts newly scanned messages into the shaper's lanes, a bounded step at a time:
    /// batches whose lanes were staged at publish go straight in; the rest is scanned,
    /// looking only at metadata (the scan borrows views, it decodes nothing).
    fn fill_shaper(&mut self, source: &impl RecordSource, now_ms: i64) -> Result<(), ReadError> {
        let mut budget = SHAPER_SCAN_STEP;
        while budget > 0
            && self.cursor < self.visible_end
            && !self.shaper.as_ref().is_some_and(Shaper::is_full)
        {
            let Some(shaper) = &mut self.shaper else {
                return Ok(());
            };
            let scan_end = match shaper.staged_at(self.cursor, self.visible_end) {
                Staged::Here(base, lanes) => {
                    for (offset, lane) in (base..).zip(lanes) {
                        if offset < self.cursor {
                            continue;
                        }
                        self.cursor = offset + 1;
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
                Staged::Until(base) => base.min(self.visible_end),
                Staged::Nothing => self.visible_end,
            };
            let before = self.cursor;
            let count = budget.min(4_096).min((scan_end - self.cursor) as usize);
            source.scan(self.cursor, count, &mut |record| {
                if record.offset >= scan_end || self.shaper.as_ref().is_some_and(Shaper::is_full) {
                    return false;
                }
                self.cursor = record.offset + 1;
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
            if self.cursor == before {
                break;
            }
        }
        Ok(())
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
    fn lane_of<'r>(&self, record: &RecordView<'r>) -> (u8, std::borrow::Cow<'r, str>) {
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
    fn screen(&mut self, record: Record, now_ms: i64) -> Option<Record> {
        if self.expires_at(&record).is_some_and(|at| at <= now_ms) {
            self.expire(&record);
            None
        } else if self.park_if_blocked(&record) {
            None
        } else {
            Some(record)
        }
    }

    fn key_hash(&self, record: &Record) -> Option<u64> {
        let gate = self.keys.as_ref()?;
        record.key.as_deref().map(|key| gate.hash(key))
    }

    /// Parks a message whose key has no free slot (true); otherwise it takes (or keeps)
    /// its key's slot and may be leased (false). Every lease passes here first.
    fn park_if_blocked(&mut self, record: &Record) -> bool {
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

    fn lease(&mut self, record: Record, now_ms: i64, lease_ms: u64) -> Delivery {
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
        let receipt = Receipt {
            log_uid: self.uid,
            offset: record.offset,
            nonce,
        }
        .encode();
        Delivery {
            receipt,
            delivery_count,
            record,
        }
    }

    /// Checks a receipt against the current lease of its message.
    pub fn check_receipt(&self, receipt: &str, now_ms: i64) -> Result<Receipt, ErrorCode> {
        let parsed = Receipt::decode(receipt).ok_or(ErrorCode::InvalidReceipt)?;
        if parsed.log_uid != self.uid {
            return Err(ErrorCode::InvalidReceipt);
        }
        match self.leases.get(&parsed.offset) {
            Some(lease) if lease.nonce == parsed.nonce && lease.deadline_ms > now_ms => Ok(parsed),
            _ => Err(ErrorCode::StaleReceipt),
        }
    }

    /// Ends a valid lease; the message is now being settled or rescheduled by the caller.
    pub fn release(&mut self, offset: u64) -> Option<Lease> {
        let lease = self.leases.remove(&offset)?;
        self.lease_expiry.remove(&(lease.deadline_ms, offset));
        Some(lease)
    }

    pub fn extend(&mut self, offset: u64, now_ms: i64, lease_ms: u64) -> Option<i64> {
        let lease = self.leases.get_mut(&offset)?;
        self.lease_expiry.remove(&(lease.deadline_ms, offset));
        lease.deadline_ms = now_ms + lease_ms as i64;
        self.lease_expiry.insert((lease.deadline_ms, offset));
        Some(lease.deadline_ms)
    }

    /// Marks released messages as being settled (their settle record is in flight).
    pub fn begin_settle(&mut self, offsets: &[u64]) {
        self.settling.extend(offsets.iter().copied());
    }

    /// Storage confirmed (or refused) a settle. `sizes` are the messages' bytes.
    pub fn finish_settle(&mut self, offsets: &[(u64, u64)], ok: bool, now_ms: i64) {
        for &(offset, size) in offsets {
            self.settling.remove(&offset);
            if ok {
                if offset >= self.ack_floor && self.settled.insert_one(offset) {
                    self.backlog_bytes -= size as i64;
                }
                self.history.remove(&offset);
                if let Some(gate) = &mut self.keys {
                    gate.settled(offset);
                }
                if let Some(s) = &mut self.supersede {
                    s.flagged.remove(&offset);
                }
            } else if !self.is_settled_or_busy(offset) {
                self.ready.push_back(offset);
            }
        }
        if ok {
            self.drain.record(offsets.len() as u64, now_ms);
            self.advance_floor();
        }
    }

    fn advance_floor(&mut self) {
        let floor = self.settled.end_of_run(self.ack_floor);
        if floor != self.ack_floor {
            self.ack_floor = floor;
            self.settled.remove_below(floor);
            self.cursor = self.cursor.max(floor);
        }
    }

    /// Leases whose deadline passed, removed from the lease table.
    pub fn expire_leases(&mut self, now_ms: i64) -> Vec<Unacked> {
        let mut out = Vec::new();
        while let Some(&(deadline, offset)) = self.lease_expiry.first() {
            if deadline > now_ms {
                break;
            }
            self.lease_expiry.pop_first();
            if let Some(lease) = self.leases.remove(&offset) {
                out.push(Unacked {
                    offset,
                    delivery_count: lease.delivery_count,
                    size: lease.size,
                });
            }
        }
        self.counters.expired += out.len() as u64;
        out
    }

    /// Schedules another delivery of a released message.
    pub fn schedule_retry(
        &mut self,
        offset: u64,
        delivery_count: u32,
        deliver_at_ms: i64,
        error: Option<(i64, String)>,
        now_ms: i64,
    ) {
        self.record_attempt(offset, delivery_count, error);
        if deliver_at_ms > now_ms {
            self.add_timer(offset, deliver_at_ms);
        } else {
            self.ready.push_back(offset);
        }
    }

    /// Remembers a delivery that ended without an ack, and why.
    pub fn record_attempt(
        &mut self,
        offset: u64,
        delivery_count: u32,
        error: Option<(i64, String)>,
    ) {
        let history = self.history.entry(offset).or_default();
        history.delivery_count = history.delivery_count.max(delivery_count);
        if let Some(error) = error {
            if history.errors.len() == tidewater_storage::state::MAX_ERRORS_KEPT {
                history.errors.pop_front();
            }
            history.errors.push_back(error);
        }
    }

    pub fn history(&self, offset: u64) -> Option<&History> {
        self.history.get(&offset)
    }

    /// Everything accepted so far, to settle for a purge, with the bytes it holds now.
    pub fn purge_range(&self) -> (Range<u64>, i64) {
        (self.ack_floor..self.log_end(), self.backlog_bytes)
    }

    /// Applies a purge that storage confirmed; returns how many messages it removed.
    /// `bytes` is the backlog size taken with the range: later publishes keep theirs.
    pub fn apply_purge(&mut self, range: Range<u64>, bytes: i64) -> u64 {
        let removed = (range.end.saturating_sub(self.ack_floor))
            .saturating_sub(self.settled.count_in(self.ack_floor..range.end));
        let offsets: Vec<u64> = self
            .leases
            .keys()
            .copied()
            .filter(|o| range.contains(o))
            .collect();
        for offset in offsets {
            self.release(offset);
        }
        let timed: Vec<u64> = self
            .timer_at
            .keys()
            .copied()
            .filter(|o| range.contains(o))
            .collect();
        for offset in timed {
            let at = self.timer_at.remove(&offset).unwrap();
            self.timers.remove(&(at, offset));
        }
        self.ready.retain(|o| !range.contains(o));
        self.history.retain(|o, _| !range.contains(o));
        if let Some(gate) = &mut self.keys {
            gate.forget_below(range.end);
        }
        if let Some(shaper) = &mut self.shaper {
            shaper.forget_below(range.end);
        }
        if let Some(coalescer) = &mut self.coalescer {
            coalescer.forget_below(range.end);
        }
        self.settled.insert(range.clone());
        self.advance_floor();
        self.cursor = self.cursor.max(range.end);
        self.backlog_bytes = if self.unsettled() == 0 {
            0
        } else {
            (self.backlog_bytes - bytes).max(0)
        };
        self.counters.purged += removed;
        removed
    }

    /// Unsettled, unleased offsets from `from` on, oldest first (for peek and redrive).
    pub fn pending_offsets(&self, from: u64, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut offset = from.max(self.ack_floor);
        while out.len() < max && offset < self.visible_end {
            offset = self.settled.next_absent(offset);
            if offset >= self.visible_end {
                break;
            }
            if !self.settling.contains(&offset) && !self.leases.contains_key(&offset) {
                out.push(offset);
            }
            offset += 1;
        }
        out
    }

    /// Takes unleased messages out of scheduling before moving them elsewhere (redrive).
    pub fn claim(&mut self, offsets: &[u64]) -> Vec<u64> {
        let mut claimed = Vec::new();
        for &offset in offsets {
            if self.is_settled_or_busy(offset) || offset >= self.visible_end {
                continue;
            }
            if let Some(at) = self.timer_at.remove(&offset) {
                self.timers.remove(&(at, offset));
            }
            self.settling.insert(offset);
            claimed.push(offset);
        }
        claimed
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
        let oldest_age_ms = match self.oldest {
            Some((floor, at)) if floor == self.ack_floor && unsettled > 0 => {
                (now_ms - at).max(0) as u64
            }
            _ => 0,
        };
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
        }
    }

    /// Refreshes the cached publish time of the oldest unsettled message.
    pub fn refresh_oldest(&mut self, source: &impl RecordSource) {
        if self
            .oldest
            .is_some_and(|(floor, _)| floor == self.ack_floor)
            || self.unsettled() == 0
        {
            return;
        }
        if let Ok(records) = source.read(self.ack_floor, 1, 1)
            && let Some(record) = records.first()
        {
            self.oldest = Some((self.ack_floor, record.published_at_ms));
        }
    }

    /// Checks the invariants that tie the structures together (tests and debug builds).
    pub fn debug_check_consistency(&self) {
        for offset in self.leases.keys() {
            assert!(
                !self.timer_at.contains_key(offset),
                "leased message {offset} also has a timer"
            );
            assert!(
                !self.settled.contains(*offset) && *offset >= self.ack_floor,
                "leased message {offset} is settled"
            );
        }
        assert_eq!(self.timers.len(), self.timer_at.len());
        assert_eq!(self.lease_expiry.len(), self.leases.len());
        assert!(self.cursor >= self.ack_floor);
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
        let mut offset = self.ack_floor;
        while offset < self.cursor.min(self.visible_end) {
            offset = self.settled.next_absent(offset);
            if offset >= self.cursor.min(self.visible_end) {
                break;
            }
            let reachable = self.leases.contains_key(&offset)
                || ready.contains(&offset)
                || self.timer_at.contains_key(&offset)
                || self.settling.contains(&offset);
            assert!(
                reachable,
                "message {offset} behind the cursor {} is lost from scheduling",
                self.cursor
            );
            offset += 1;
        }
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
