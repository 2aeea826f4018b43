//! Simulated power losses under the broker: publishes (durable and written, some delayed
//! into the delay log), receives, acks, nacks, lease expiries, dead-letter moves, delay-log
//! moves, queue create/configure/delete, stream produces (keyed and not, across
//! partitions), group offset commits, checkpoints and clean restarts, on the `SimFs` disk, with power cuts at
//! random file operations, during recovery too.
//!
//! Deterministic per seed: time is a `ManualClock`, jitter fixed, nonces seeded, the runtime
//! single-threaded, and after each step the driver waits for the store to be idle
//! (`Store::wait_idle`: the broker submits some writes without waiting for them).
//!
//! After each recovery (with the clock moved a day on and maintenance run, so that every
//! delayed and backed-off message is due): every publish acknowledged as durable and not
//! acked is present, in its queue or the dead-letter queue; no acked message is present;
//! nothing present was never published; no message is present twice, not even after a
//! power loss during a step that moves messages (finding 3 of RELIABILITY-sim.md, fixed: a
//! move is one request, a journal group, replayed all or nothing); each queue exists or not
//! as last acknowledged, with its configuration as last acknowledged. In the stream: every
//! record acknowledged as durable is at the partition and offset its produce answered, each
//! partition's offsets run from 0 with no gap, and no record is there twice or unproduced.
//! A group's committed offset of each partition is the last commit acknowledged, or the one
//! in flight at the cut. The stream keeps about 2 KiB per partition (retention by size runs
//! in maintenance): records below a partition's start are gone, and the start never moves
//! back after a recovery. A compacted stream (a few keys, some tombstones) is compacted
//! now and then, power cuts included: every record in it is one produced, at the offset
//! its produce answered, once, and each key's last record is its latest acknowledged one or
//! later (a tombstone may be gone once its horizon passed, with every older record of its
//! key). A work-queue subscription on the stream (3 deliveries, then its dead-letter queue)
//! is received from, acked and nacked, its leases expire, retention deletes under it: after
//! each recovery every record the stream holds is, for the subscription, acked (never back)
//! or deliverable or in its dead-letter queue, exactly once across the two (a dead-letter
//! move is one journal group), and nothing it delivers was never produced.
//!
//!     SIM_SEEDS=2000 cargo test -p tidewater-core --release --test powerloss -- --nocapture
//!     SIM_SEED=5 cargo test -p tidewater-core --test powerloss -- --nocapture

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tidewater_core::broker::record_id;
use tidewater_core::clock::{FixedJitter, ManualClock, SeededNonces};
use tidewater_core::config::BackoffPatch;
use tidewater_core::stream::config::{Cleanup, StreamPatch};
use tidewater_core::stream::records::NewStreamRecord;
use tidewater_core::{AckLevel, Broker, BrokerOptions, ConfigPatch, Delay, NackReason, NewMessage};
use tidewater_storage::StoreOptions;
use tidewater_storage::sim::{SimFs, SimRng};

const DATA: &str = "/data";
const Q: &str = "q";
const DLQ: &str = "dlq";
const STREAM: &str = "st";
const GROUP: &str = "g";
const PARTITIONS: u32 = 3;
/// A compacted stream (one partition): records of a few keys, some tombstones.
const COMPACTED: &str = "ct";
const COMPACTED_KEYS: u64 = 4;
/// A work-queue subscription on `STREAM`, and its dead-letter queue.
const SUB: &str = "st/w";
const SUB_DLQ: &str = "st.w-dlq";

fn body(id: &str) -> Vec<u8> {
    format!("body of {id}").into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Publish,
    Produce,
    ProduceCompacted,
    Compact,
    Commit,
    Receive,
    Ack,
    Nack,
    Time,
    Configure,
    Scratch,
    Checkpoint,
    Restart,
}

impl Kind {
    /// Steps during which the broker may move messages (append a copy, settle the original):
    /// a duplicate after a cut in one of these would be half a move.
    fn moves(self) -> bool {
        matches!(
            self,
            Kind::Nack | Kind::Time | Kind::Restart | Kind::Receive
        )
    }
}

struct Run {
    seed: u64,
    fs: SimFs,
    rng: SimRng,
    clock: ManualClock,
    broker: Option<Broker>,
    next_id: u64,
    /// Every id ever published (answered or not).
    published: BTreeSet<String>,
    /// Published durably (or written and then synced) and not acked.
    must: BTreeSet<String>,
    /// Acked (the ack answered).
    acked: BTreeSet<String>,
    /// Leases held: (queue, receipt, id).
    leases: Vec<(String, String, String)>,
    /// Lease of `q` as last acknowledged, and one in flight.
    lease_ms: u64,
    lease_in_flight: Option<u64>,
    /// Scratch queues: present as acknowledged, and one in flight (name, exists after).
    scratch: BTreeSet<String>,
    scratch_in_flight: Option<(String, bool)>,
    /// Ids whose publish or ack was in flight at the cut.
    maybe: BTreeSet<String>,
    /// The step in flight at the cut.
    cut_in: Option<Kind>,
    /// Stream records: every id produced, and those acknowledged durable at (partition,
    /// offset); ids in flight at the cut.
    produced: BTreeSet<String>,
    stream_must: BTreeMap<String, (u32, u64)>,
    stream_maybe: BTreeSet<String>,
    /// Group offsets: per partition, the last commit acknowledged, and one in flight at
    /// the cut.
    commits_must: BTreeMap<u32, u64>,
    commit_maybe: Option<(u32, u64)>,
    /// Each partition's start offset at the last check (retention only moves it on).
    stream_starts: BTreeMap<u32, u64>,
    /// The compacted stream: every record produced (id -> key, tombstone), those
    /// acknowledged durable by offset, those in flight at the cut.
    compact_produced: BTreeMap<String, (String, bool)>,
    compact_must: BTreeMap<u64, String>,
    compact_maybe: BTreeSet<String>,
    /// Records compaction removed, and power cuts during a compaction (the sim exercises
    /// both).
    compacted_away: u64,
    cuts_in_compaction: u64,
    /// Checks that found a partition whose start retention had moved (the sim exercises it).
    retained_away: u64,
    /// The subscription: records it acked ("partition-offset", as its deliveries' ids), an
    /// ack in flight at the cut; records found in its dead-letter queue at checks.
    sub_acked: BTreeSet<String>,
    sub_in_flight: Vec<String>,
    sub_maybe: BTreeSet<String>,
    sub_dead_seen: u64,
    history: Vec<String>,
    power_losses: u64,
    duplicates_after_moves: u64,
    steps: u64,
}

type Failure = String;

fn options(fs: &SimFs, clock: &ManualClock, seed: u64) -> BrokerOptions {
    BrokerOptions {
        store: StoreOptions {
            fsync: true,
            journal_roll_bytes: u64::MAX,
            checkpoint_interval: Duration::from_secs(86_400 * 365),
            segment_roll_bytes: 4_096,
            // Few open files: segments leave the cache and are reopened all the time.
            max_open_segment_files: tidewater_storage::MIN_OPEN_SEGMENT_FILES,
            // No index budget: every checkpoint thins sealed segments to one mark each.
            max_index_bytes: 0,
            fs: Arc::new(fs.clone()),
            lockstep: true,
            ..StoreOptions::default()
        },
        clock: Arc::new(clock.clone()),
        jitter: Arc::new(FixedJitter(1.0)),
        nonces: Arc::new(SeededNonces::new(seed)),
        ..BrokerOptions::default()
    }
}

impl Run {
    fn note(&mut self, line: String) {
        self.history.push(line);
    }

    fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("open")
    }

    fn idle(&self) {
        if let Some(broker) = &self.broker {
            broker.store().wait_idle();
        }
    }

    /// Opens; `Ok(false)` when the power went out during the open.
    async fn open(&mut self) -> Result<bool, Failure> {
        let options = options(&self.fs, &self.clock, self.seed ^ self.power_losses);
        let opened =
            std::panic::catch_unwind(AssertUnwindSafe(|| Broker::open(Path::new(DATA), options)));
        match opened {
            Err(_) => Err("recovery panicked".into()),
            Ok(Err(err)) if self.fs.is_cut() => {
                self.note(format!("open cut by the power: {err}"));
                Ok(false)
            }
            Ok(Err(err)) => Err(format!("recovery refused to open: {err}")),
            Ok(Ok(broker)) => {
                broker.store().wait_idle();
                self.fs.disarm();
                if self.fs.is_cut() {
                    self.note("open returned on a dead disk".into());
                    broker.shutdown(); // frees the directory now (see power_loss)
                    return Ok(false);
                }
                self.broker = Some(broker);
                Ok(true)
            }
        }
    }

    fn power_loss(&mut self) {
        // Stop the store's threads here: a completion still holding a handle would
        // otherwise drop the last one later, on a store thread, while the next open runs.
        if let Some(broker) = self.broker.take() {
            broker.shutdown();
        }
        let report = self.fs.power_loss();
        self.power_losses += 1;
        self.note(report);
    }

    async fn recover(&mut self) -> Result<(), Failure> {
        for attempt in 0.. {
            if attempt < 4 && self.rng.chance(0.35) {
                let n = 1 + self.rng.below(40);
                self.note(format!("recovery {attempt}: cut after {n}"));
                self.fs.cut_after(n);
            }
            if self.open().await? {
                break;
            }
            self.power_loss();
        }
        self.check().await
    }

    /// The invariants, after a recovery; then what is present becomes what must be.
    async fn check(&mut self) -> Result<(), Failure> {
        self.leases.clear();
        // Everything due: delayed messages move in, backoffs end.
        self.clock.advance(86_400_000);
        self.broker().run_maintenance().await;
        self.idle();
        if self.fs.is_cut() {
            return Err("the power went out during a check".into());
        }
        let mut present: BTreeMap<String, u32> = BTreeMap::new();
        let queues: BTreeSet<String> = self
            .broker()
            .list_queues()
            .into_iter()
            .map(|q| q.name)
            .collect();
        for queue in [Q, DLQ] {
            let mut from = 0;
            loop {
                let page = self
                    .broker()
                    .peek(queue, from, 1_000)
                    .map_err(|e| format!("peek {queue}: {e}"))?;
                let Some(last) = page.last() else { break };
                from = last.record.offset + 1;
                for p in &page {
                    let id = record_id(&p.record);
                    if p.record.body[..] != body(&id)[..] {
                        return Err(format!("{queue}: {id} has the wrong body"));
                    }
                    *present.entry(id).or_default() += 1;
                }
            }
        }
        let maybe = std::mem::take(&mut self.maybe);
        for id in &self.must {
            if !present.contains_key(id) && !maybe.contains(id) {
                return Err(format!("{id} was published durably and is gone"));
            }
        }
        for (id, &n) in &present {
            if self.acked.contains(id) && !maybe.contains(id) {
                return Err(format!("{id} was acked and is back"));
            }
            if !self.published.contains(id) {
                return Err(format!("{id} was never published"));
            }
            if n > 1 {
                // Not even after a move in flight at the cut: a move (copy appended, original
                // settled) is one request, a journal group, replayed all or nothing.
                if self.cut_in.is_some_and(Kind::moves) {
                    self.duplicates_after_moves += 1;
                    return Err(format!(
                        "{id} is present {n} times after a move in flight (half a move)"
                    ));
                }
                return Err(format!("{id} is present {n} times"));
            }
        }
        let lease_ms = self
            .broker()
            .list_queues()
            .into_iter()
            .find(|q| q.name == Q)
            .map(|q| q.config.lease_ms);
        let allowed = [Some(self.lease_ms), self.lease_in_flight];
        if !allowed.contains(&lease_ms) {
            return Err(format!(
                "lease_ms of {Q} is {lease_ms:?}, acknowledged {}",
                self.lease_ms
            ));
        }
        self.lease_ms = lease_ms.unwrap_or(self.lease_ms);
        self.lease_in_flight = None;
        let mut want = self.scratch.clone();
        if let Some((name, exists)) = self.scratch_in_flight.take()
            && queues.contains(&name) == exists
        {
            if exists {
                want.insert(name);
            } else {
                want.remove(&name);
            }
        }
        let have: BTreeSet<String> = queues
            .iter()
            .filter(|n| {
                n.strip_prefix('s')
                    .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
            })
            .cloned()
            .collect();
        if have != want {
            return Err(format!("scratch queues {have:?}, expected {want:?}"));
        }
        self.scratch = have;
        self.check_stream().await?;
        self.must = present.keys().cloned().collect();
        self.cut_in = None;
        self.note(format!("checked: {} messages present", present.len()));
        Ok(())
    }

    /// The stream's invariants, after a recovery; then what is present becomes what must be.
    async fn check_stream(&mut self) -> Result<(), Failure> {
        let info = self
            .broker()
            .get_stream(STREAM)
            .map_err(|e| format!("the stream is gone: {e}"))?;
        let mut present: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        for part in &info.partitions {
            let seen = self
                .stream_starts
                .get(&part.partition)
                .copied()
                .unwrap_or(0);
            if part.start_offset < seen {
                return Err(format!(
                    "partition {} starts at {} after recovery, before {seen}, where retention had moved it",
                    part.partition, part.start_offset
                ));
            }
            self.stream_starts.insert(part.partition, part.start_offset);
            if part.start_offset > 0 {
                self.retained_away += 1;
            }
            let mut next = part.start_offset;
            while next < part.end_offset {
                let (records, after, _) = self
                    .broker()
                    .fetch_records(STREAM, part.partition, next, 1 << 20, 0)
                    .await
                    .map_err(|e| format!("fetch {}: {e}", part.partition))?;
                for r in records {
                    if r.offset != next {
                        return Err(format!(
                            "partition {} has a gap: offset {} after {next}",
                            part.partition, r.offset
                        ));
                    }
                    let value = r.value.map(|v| v.to_vec()).unwrap_or_default();
                    let id = String::from_utf8_lossy(&value)
                        .strip_prefix("body of ")
                        .map(str::to_string)
                        .ok_or_else(|| format!("a record holds {value:?}"))?;
                    if !self.produced.contains(&id) {
                        return Err(format!("stream record {id} was never produced"));
                    }
                    if present
                        .insert(id.clone(), (part.partition, r.offset))
                        .is_some()
                    {
                        return Err(format!("stream record {id} is present twice"));
                    }
                    next = r.offset + 1;
                }
                if after <= next.saturating_sub(1) && next < part.end_offset {
                    return Err(format!(
                        "partition {}: fetch made no progress",
                        part.partition
                    ));
                }
                next = next.max(after);
            }
        }
        let maybe = std::mem::take(&mut self.stream_maybe);
        for (id, at) in &self.stream_must {
            let start = self.stream_starts.get(&at.0).copied().unwrap_or(0);
            match present.get(id) {
                Some(found) if found == at => {}
                // Deleted by retention: below the partition's start.
                None if at.1 < start => {}
                Some(found) => {
                    return Err(format!("stream record {id} moved from {at:?} to {found:?}"));
                }
                None if maybe.contains(id) => {}
                None => {
                    return Err(format!(
                        "stream record {id} was produced durably and is gone"
                    ));
                }
            }
        }
        self.stream_must = present;
        // Committed offsets: each the last acknowledged, or the one in flight at the cut.
        let maybe = self.commit_maybe.take();
        let partitions = info.partitions.len() as u32;
        let mut now = BTreeMap::new();
        for p in 0..partitions {
            if let Some(c) = self.broker().committed(GROUP, STREAM, p).await {
                now.insert(p, c.offset);
            }
        }
        for p in 0..partitions {
            let (got, want) = (now.get(&p), self.commits_must.get(&p));
            if got != want && maybe.is_none_or(|(mp, mo)| mp != p || got != Some(&mo)) {
                return Err(format!(
                    "partition {p}: committed {got:?}, acknowledged {want:?} (in flight: {maybe:?})"
                ));
            }
        }
        self.commits_must = now;
        self.check_compacted().await?;
        self.check_subscription().await
    }

    /// The subscription's invariants (after the stream's, whose present records are in
    /// `stream_must` now): every record the stream holds is acked (and not delivered
    /// again), or deliverable, or in the dead-letter queue, once across the two; nothing
    /// delivered or dead-lettered is unknown. Receives everything it may deliver (the
    /// leases stay for the steps to come).
    async fn check_subscription(&mut self) -> Result<(), Failure> {
        let info = self
            .broker()
            .get_subscription(STREAM, "w")
            .map_err(|e| format!("the subscription is gone: {e}"))?;
        let mut found: BTreeMap<String, &'static str> = BTreeMap::new();
        loop {
            let got = self
                .broker()
                .receive(SUB, 100, 0, None)
                .await
                .map_err(|e| format!("receive {SUB}: {e}"))?;
            if got.is_empty() {
                break;
            }
            for d in got {
                let id = record_id(&d.record);
                let at = format!("{}-{}", d.source.wrapping_sub(1), d.record.offset);
                if id != at {
                    return Err(format!("{SUB}: delivery {id} came from {at}"));
                }
                if found.insert(id.clone(), SUB).is_some() {
                    return Err(format!("{SUB}: {id} delivered twice at once"));
                }
                self.leases.push((SUB.to_string(), d.receipt, id));
            }
        }
        let mut from = 0;
        loop {
            let page = match self.broker().peek(SUB_DLQ, from, 1_000) {
                Ok(page) => page,
                Err(_) => break, // not made yet: nothing was dead-lettered
            };
            let Some(last) = page.last() else { break };
            from = last.record.offset + 1;
            for p in page {
                let id = record_id(&p.record);
                if let Some(other) = found.insert(id.clone(), SUB_DLQ) {
                    return Err(format!(
                        "{id} is in {SUB_DLQ} and in {other} (half a dead-letter move)"
                    ));
                }
                self.sub_dead_seen += 1;
            }
        }
        self.broker().debug_check_consistency();
        self.note(format!("check {SUB}: {} found", found.len()));
        let maybe = std::mem::take(&mut self.sub_maybe);
        let held: BTreeMap<String, String> = self
            .stream_must
            .iter()
            .map(|(id, (p, offset))| (format!("{p}-{offset}"), id.clone()))
            .collect();
        for (at, record) in &held {
            let acked = self.sub_acked.contains(at);
            match (acked, found.get(at)) {
                (true, Some(place)) if !maybe.contains(at) => {
                    return Err(format!(
                        "{SUB}: {record} at {at} was acked and is back (in {place})"
                    ));
                }
                (false, None) if !maybe.contains(at) => {
                    return Err(format!(
                        "{SUB}: {record} at {at} is in the stream, not acked, and neither deliverable nor dead-lettered ({} unsettled; partitions {:?})",
                        info.stats.total, info.partitions
                    ));
                }
                _ => {}
            }
        }
        for at in found.keys() {
            // Below a partition's start (retention) a record is gone from the stream: a
            // dead-lettered copy may outlive it.
            let (p, offset) = at.split_once('-').expect("partition-offset");
            let start = self
                .stream_starts
                .get(&p.parse().unwrap_or(u32::MAX))
                .copied();
            let below = start.is_some_and(|s| offset.parse::<u64>().unwrap_or(0) < s);
            if !(held.contains_key(at) || below && found[at] == SUB_DLQ) {
                return Err(format!(
                    "{SUB}: {at} ({}) was never produced, or is gone",
                    found[at]
                ));
            }
        }
        // An ack in flight at the cut landed if its record is not found now: acked.
        for at in &maybe {
            if !found.contains_key(at) {
                self.sub_acked.insert(at.clone());
            }
        }
        // Acks of records retention deleted are history now.
        self.sub_acked.retain(|at| held.contains_key(at));
        Ok(())
    }

    /// The compacted stream's invariants: every record read is one produced, at the offset
    /// its produce answered, once; for each key, the last record read is its latest
    /// acknowledged one or later (a tombstone may be gone, and then every older record of
    /// its key too). Then what is present becomes what must be.
    async fn check_compacted(&mut self) -> Result<(), Failure> {
        let info = self
            .broker()
            .get_stream(COMPACTED)
            .map_err(|e| format!("the compacted stream is gone: {e}"))?;
        let part = &info.partitions[0];
        let mut present: BTreeMap<u64, String> = BTreeMap::new();
        let mut last_read: BTreeMap<String, u64> = BTreeMap::new();
        let mut ids = BTreeSet::new();
        let mut next = part.start_offset;
        while next < part.end_offset {
            let (records, after, _) = self
                .broker()
                .fetch_records(COMPACTED, 0, next, 4_096, 0)
                .await
                .map_err(|e| format!("fetch compacted from {next}: {e}"))?;
            if after <= next {
                return Err(format!("compacted: a fetch from {next} made no progress"));
            }
            for r in records {
                let id = r
                    .headers
                    .iter()
                    .find(|(k, _)| k == "id")
                    .and_then(|(_, v)| v.clone())
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .ok_or_else(|| format!("compacted offset {} has no id", r.offset))?;
                let key = String::from_utf8_lossy(&r.key.unwrap_or_default()).into_owned();
                let Some((want_key, tombstone)) = self.compact_produced.get(&id) else {
                    return Err(format!("compacted record {id} was never produced"));
                };
                if *want_key != key || *tombstone != r.value.is_none() {
                    return Err(format!("compacted record {id} is not as produced"));
                }
                if let Some(value) = &r.value
                    && value[..] != body(&id)[..]
                {
                    return Err(format!("compacted record {id} holds another value"));
                }
                if !ids.insert(id.clone()) {
                    return Err(format!("compacted record {id} is present twice"));
                }
                if let Some((&at, _)) = self.compact_must.iter().find(|(_, must)| **must == id)
                    && at != r.offset
                {
                    return Err(format!(
                        "compacted record {id} moved from {at} to {}",
                        r.offset
                    ));
                }
                present.insert(r.offset, id);
                last_read.insert(key, r.offset);
            }
            next = after;
        }
        let mut latest: BTreeMap<&str, (u64, bool)> = BTreeMap::new();
        for (offset, id) in &self.compact_must {
            let (key, tombstone) = &self.compact_produced[id];
            latest.insert(key.as_str(), (*offset, *tombstone));
        }
        for (key, (offset, tombstone)) in latest {
            match last_read.get(key) {
                Some(read) if *read >= offset => {}
                None if tombstone => {}
                other => {
                    return Err(format!(
                        "compacted key {key}: its latest acknowledged record is at {offset}, the last read at {other:?}"
                    ));
                }
            }
        }
        self.compact_maybe.clear();
        self.compact_must = present;
        Ok(())
    }

    fn lease(&mut self) -> Option<(String, String, String)> {
        if self.leases.is_empty() {
            return None;
        }
        let i = self.rng.below(self.leases.len() as u64) as usize;
        Some(self.leases.swap_remove(i))
    }

    /// One step; `Ok(false)` when the power went out during it.
    async fn step(&mut self) -> Result<bool, Failure> {
        let roll = self.rng.below(100);
        let kind = match roll {
            0..=22 => Kind::Publish,
            23..=27 => Kind::ProduceCompacted,
            28..=31 => Kind::Produce,
            32..=34 => Kind::Commit,
            35..=54 => Kind::Receive,
            55..=69 => Kind::Ack,
            70..=79 => Kind::Nack,
            80..=87 => Kind::Time,
            88..=90 => Kind::Configure,
            91..=93 => Kind::Scratch,
            94..=95 => Kind::Checkpoint,
            96..=97 => Kind::Compact,
            _ => Kind::Restart,
        };
        let kind = match kind {
            Kind::Ack | Kind::Nack if self.leases.is_empty() => Kind::Receive,
            other => other,
        };
        let mut in_flight: Vec<String> = Vec::new();
        let outcome: Result<String, String> = match kind {
            Kind::Publish => {
                let level = if self.rng.chance(0.7) {
                    AckLevel::Durable
                } else {
                    AckLevel::Written
                };
                let n = 1 + self.rng.below(3);
                let mut msgs = Vec::new();
                for _ in 0..n {
                    let id = format!("m{}", self.next_id);
                    self.next_id += 1;
                    let delay = match self.rng.below(4) {
                        0 => Delay::AfterMs(1_000 + self.rng.below(600_000)),
                        _ => Delay::None,
                    };
                    self.published.insert(id.clone());
                    in_flight.push(id.clone());
                    msgs.push(NewMessage {
                        id: Some(id.clone()),
                        body: body(&id),
                        delay,
                        ..NewMessage::default()
                    });
                }
                let result = self.broker().publish(Q, &msgs, level).await;
                self.idle();
                match result {
                    Ok(published) => {
                        // Answered at `durable`, or at `written` and synced since.
                        if level == AckLevel::Durable || !self.fs.is_cut() {
                            self.must.extend(published.ids.iter().cloned());
                            in_flight.clear();
                        }
                        Ok(format!("publish {:?} at {level:?}", published.ids))
                    }
                    Err(e) => Err(format!("publish: {e}")),
                }
            }
            Kind::Produce => {
                let level = if self.rng.chance(0.7) {
                    AckLevel::Durable
                } else {
                    AckLevel::Written
                };
                let n = 4 + self.rng.below(8);
                let mut records = Vec::new();
                let mut ids = Vec::new();
                for _ in 0..n {
                    let id = format!("r{}", self.next_id);
                    self.next_id += 1;
                    let key = (self.rng.below(3) > 0).then(|| format!("k{}", self.rng.below(5)));
                    self.produced.insert(id.clone());
                    in_flight.push(id.clone());
                    ids.push(id.clone());
                    records.push(NewStreamRecord {
                        key: key.map(String::into_bytes),
                        value: Some(body(&id)),
                        // Bulk, so partitions fill segments and retention has work.
                        headers: vec![("pad".into(), Some(vec![b'x'; 900]))],
                        ..NewStreamRecord::default()
                    });
                }
                let result = self.broker().produce(STREAM, &records, level).await;
                self.idle();
                match result {
                    Ok(produced) => {
                        if level == AckLevel::Durable || !self.fs.is_cut() {
                            for (id, at) in ids.iter().zip(produced.offsets) {
                                self.stream_must.insert(id.clone(), at);
                            }
                            in_flight.clear();
                        }
                        Ok(format!("produce {ids:?} at {level:?}"))
                    }
                    Err(e) => Err(format!("produce: {e}")),
                }
            }
            Kind::ProduceCompacted => {
                let level = if self.rng.chance(0.7) {
                    AckLevel::Durable
                } else {
                    AckLevel::Written
                };
                let n = 1 + self.rng.below(6);
                let (mut records, mut ids) = (Vec::new(), Vec::new());
                for _ in 0..n {
                    let id = format!("c{}", self.next_id);
                    self.next_id += 1;
                    let key = format!("k{}", self.rng.below(COMPACTED_KEYS));
                    let tombstone = self.rng.chance(0.15);
                    self.compact_produced
                        .insert(id.clone(), (key.clone(), tombstone));
                    in_flight.push(id.clone());
                    ids.push(id.clone());
                    records.push(NewStreamRecord {
                        key: Some(key.into_bytes()),
                        value: (!tombstone).then(|| body(&id)),
                        headers: vec![
                            ("id".into(), Some(id.clone().into_bytes())),
                            ("pad".into(), Some(vec![b'x'; 300])),
                        ],
                        ..NewStreamRecord::default()
                    });
                }
                let result = self.broker().produce(COMPACTED, &records, level).await;
                self.idle();
                match result {
                    Ok(produced) => {
                        if level == AckLevel::Durable || !self.fs.is_cut() {
                            for (id, (_, offset)) in ids.iter().zip(produced.offsets) {
                                self.compact_must.insert(offset, id.clone());
                            }
                            in_flight.clear();
                        }
                        Ok(format!("produce compacted {ids:?} at {level:?}"))
                    }
                    Err(e) => Err(format!("produce compacted: {e}")),
                }
            }
            Kind::Compact => {
                // Only segments in a durable checkpoint are rewritten: one first.
                match self.broker().store().checkpoint() {
                    Err(e) => Err(format!("checkpoint before compaction: {e}")),
                    Ok(()) => {
                        let report = self.broker().compact_once().await;
                        self.idle();
                        match report {
                            None => Ok("compaction: nothing to do".into()),
                            Some(Ok(r)) => {
                                self.compacted_away += r.superseded + r.tombstones;
                                Ok(format!(
                                    "compaction: {} groups, {} superseded, {} tombstones, cleaned to {}{}",
                                    r.groups,
                                    r.superseded,
                                    r.tombstones,
                                    r.cleaned_to,
                                    if r.interrupted { " (interrupted)" } else { "" }
                                ))
                            }
                            Some(Err(e)) => Err(format!("compaction: {e}")),
                        }
                    }
                }
            }
            Kind::Commit => {
                let info = self
                    .broker()
                    .get_stream(STREAM)
                    .map_err(|e| format!("the stream is gone: {e}"))?;
                let part = &info.partitions[self.rng.below(info.partitions.len() as u64) as usize];
                let offset = self.rng.below(part.end_offset + 1);
                self.commit_maybe = Some((part.partition, offset));
                let result = self
                    .broker()
                    .commit(GROUP, STREAM, part.partition, offset, "")
                    .await;
                self.idle();
                match result {
                    Ok(()) => {
                        self.commits_must.insert(part.partition, offset);
                        self.commit_maybe = None;
                        Ok(format!("commit {} at {offset}", part.partition))
                    }
                    Err(e) => Err(format!("commit: {e}")),
                }
            }
            Kind::Receive => {
                let queue = match self.rng.below(10) {
                    0..=5 => Q,
                    6..=8 => SUB,
                    _ => DLQ,
                };
                let max = 1 + self.rng.below(3) as usize;
                let got = self.broker().receive(queue, max, 0, None).await;
                self.idle();
                match got {
                    Ok(got) => {
                        let ids: Vec<String> = got.iter().map(|d| record_id(&d.record)).collect();
                        for d in got {
                            let id = record_id(&d.record);
                            self.leases.push((queue.to_string(), d.receipt, id));
                        }
                        Ok(format!("receive {queue}: {ids:?}"))
                    }
                    Err(e) => Err(format!("receive: {e}")),
                }
            }
            Kind::Ack => match self.lease() {
                None => Ok("ack: nothing leased".into()),
                Some((queue, receipt, id)) => {
                    if queue == SUB {
                        self.sub_in_flight.push(id.clone());
                    } else {
                        in_flight.push(id.clone());
                    }
                    let result = self.broker().ack(&queue, &[receipt]).await;
                    self.idle();
                    match result {
                        Ok(reply) if reply.ok == 1 && queue == SUB => {
                            self.sub_acked.insert(id.clone());
                            Ok(format!("ack {queue} {id}"))
                        }
                        Ok(reply) if reply.ok == 1 => {
                            self.acked.insert(id.clone());
                            self.must.remove(&id);
                            Ok(format!("ack {queue} {id}"))
                        }
                        Ok(reply) => Ok(format!("ack {queue} {id}: {:?}", reply.failed)),
                        Err(e) => Err(format!("ack: {e}")),
                    }
                }
            },
            Kind::Nack => match self.lease() {
                None => Ok("nack: nothing leased".into()),
                Some((queue, receipt, id)) => {
                    let result = self
                        .broker()
                        .nack(&queue, &[receipt], None, Some("failed"), NackReason::Failed)
                        .await;
                    self.idle();
                    match result {
                        Ok(reply) => Ok(format!("nack {queue} {id}: ok {}", reply.ok)),
                        Err(e) => Err(format!("nack: {e}")),
                    }
                }
            },
            Kind::Time => {
                let ms = 100 + self.rng.below(20_000) as i64;
                self.clock.advance(ms);
                self.broker().run_maintenance().await;
                self.idle();
                Ok(format!("time +{ms} ms, maintenance"))
            }
            Kind::Configure => {
                let lease_ms = 1_000 + self.rng.below(10) * 500;
                self.lease_in_flight = Some(lease_ms);
                let patch = ConfigPatch {
                    lease_ms: Some(lease_ms),
                    ..ConfigPatch::default()
                };
                let result = self.broker().put_queue(Q, &patch).await;
                self.idle();
                match result {
                    Ok(_) => {
                        self.lease_ms = lease_ms;
                        if !self.fs.is_cut() {
                            self.lease_in_flight = None;
                        }
                        Ok(format!("configure {Q}: lease {lease_ms}"))
                    }
                    Err(e) => Err(format!("configure: {e}")),
                }
            }
            Kind::Scratch => {
                let delete = !self.scratch.is_empty() && self.rng.chance(0.5);
                if delete {
                    let name = self.scratch.iter().next().cloned().unwrap();
                    self.scratch_in_flight = Some((name.clone(), false));
                    let result = self.broker().delete_queue(&name).await;
                    self.idle();
                    match result {
                        Ok(()) => {
                            self.scratch.remove(&name);
                            Ok(format!("delete {name}"))
                        }
                        Err(e) => Err(format!("delete {name}: {e}")),
                    }
                } else {
                    let name = format!("s{}", self.rng.below(1_000));
                    self.scratch_in_flight = Some((name.clone(), true));
                    let result = self
                        .broker()
                        .put_queue(&name, &ConfigPatch::default())
                        .await;
                    self.idle();
                    match result {
                        Ok(_) => {
                            self.scratch.insert(name.clone());
                            Ok(format!("create {name}"))
                        }
                        Err(e) => Err(format!("create {name}: {e}")),
                    }
                }
            }
            Kind::Checkpoint => match self.broker().store().checkpoint() {
                Ok(()) => Ok("checkpoint".into()),
                Err(e) => Err(format!("checkpoint: {e}")),
            },
            Kind::Restart => {
                // A clean restart shuts down (as the server does on SIGTERM): dropping the
                // handle alone leaves the store to whichever completion drops the last one.
                if let Some(broker) = self.broker.take() {
                    broker.shutdown();
                }
                self.leases.clear();
                if self.fs.is_cut() {
                    Err("restart: the disk is dead".into())
                } else if self.open().await? {
                    Ok("clean restart".into())
                } else {
                    Err("restart cut".into())
                }
            }
        };
        self.steps += 1;
        let cut = self.fs.is_cut();
        match outcome {
            Ok(line) => self.note(line),
            Err(line) if cut => self.note(format!("{line} (power cut)")),
            Err(line) => return Err(format!("refused without a power cut: {line}")),
        }
        if cut {
            self.cut_in = Some(kind);
            self.cuts_in_compaction += u64::from(kind == Kind::Compact);
            if kind == Kind::Produce {
                self.stream_maybe.extend(in_flight);
            } else if kind == Kind::ProduceCompacted {
                self.compact_maybe.extend(in_flight);
            } else {
                self.maybe.extend(in_flight);
            }
            self.sub_maybe
                .extend(std::mem::take(&mut self.sub_in_flight));
            return Ok(false);
        }
        self.sub_in_flight.clear();
        self.scratch_in_flight = None;
        Ok(true)
    }

    async fn run(&mut self, epochs: u64, steps: u64) -> Result<(), Failure> {
        self.fs
            .create_dir_durable(Path::new(DATA))
            .map_err(|e| e.to_string())?;
        if !self.open().await? {
            return Err("first open cut".into());
        }
        for (name, patch) in [
            (DLQ, ConfigPatch::default()),
            (
                Q,
                ConfigPatch {
                    lease_ms: Some(self.lease_ms),
                    max_deliveries: Some(2),
                    dead_letter_queue: Some(Some(DLQ.into())),
                    backoff: Some(BackoffPatch {
                        base_ms: Some(100),
                        multiplier: Some(2.0),
                        max_ms: Some(1_000),
                    }),
                    ..ConfigPatch::default()
                },
            ),
        ] {
            self.broker()
                .put_queue(name, &patch)
                .await
                .map_err(|e| e.to_string())?;
        }
        // Retention by size keeps about a segment (4 KiB) per partition: maintenance
        // deletes old segments all the time.
        let partitions = StreamPatch {
            partitions: Some(PARTITIONS),
            retention_bytes: Some(2_048),
            ..StreamPatch::default()
        };
        self.broker()
            .put_stream(STREAM, &partitions)
            .await
            .map_err(|e| e.to_string())?;
        let sub = tidewater_core::stream::subscription::SubscriptionPatch::from_json(
            br#"{"max_deliveries":3,"lease_ms":2000,"backoff":{"base_ms":100,"max_ms":1000},"pin_max_bytes":6000,"on_retention":"dead_letter"}"#,
        )
        .map_err(|e| e.to_string())?;
        self.broker()
            .put_subscription(STREAM, "w", &sub)
            .await
            .map_err(|e| e.to_string())?;
        let compacted = StreamPatch {
            cleanup: Some(Cleanup::Compact),
            delete_retention_ms: Some(30_000),
            min_dirty_ratio: Some(0.0),
            ..StreamPatch::default()
        };
        self.broker()
            .put_stream(COMPACTED, &compacted)
            .await
            .map_err(|e| e.to_string())?;
        self.idle();
        for epoch in 0..epochs {
            let cut = 1 + self.rng.below(steps * 8);
            self.note(format!(
                "epoch {epoch}: power cut after {cut} more operations"
            ));
            self.fs.cut_after(cut);
            for _ in 0..steps {
                if !self.step().await? {
                    break;
                }
            }
            if !self.fs.is_cut() {
                self.fs.cut_now();
            }
            self.power_loss();
            self.recover().await?;
        }
        Ok(())
    }
}

fn run_seed(seed: u64, epochs: u64, steps: u64) -> (Run, Result<(), Failure>) {
    let mut run = Run {
        seed,
        fs: SimFs::new(seed),
        rng: SimRng::new(seed.wrapping_mul(0x2545_F491).wrapping_add(7)),
        clock: ManualClock::new(1_000_000),
        broker: None,
        next_id: 0,
        published: BTreeSet::new(),
        must: BTreeSet::new(),
        acked: BTreeSet::new(),
        leases: Vec::new(),
        lease_ms: 2_000,
        lease_in_flight: None,
        scratch: BTreeSet::new(),
        scratch_in_flight: None,
        maybe: BTreeSet::new(),
        cut_in: None,
        produced: BTreeSet::new(),
        stream_must: BTreeMap::new(),
        stream_maybe: BTreeSet::new(),
        commits_must: BTreeMap::new(),
        commit_maybe: None,
        stream_starts: BTreeMap::new(),
        compact_produced: BTreeMap::new(),
        compact_must: BTreeMap::new(),
        compact_maybe: BTreeSet::new(),
        compacted_away: 0,
        cuts_in_compaction: 0,
        retained_away: 0,
        sub_acked: BTreeSet::new(),
        sub_in_flight: Vec::new(),
        sub_maybe: BTreeSet::new(),
        sub_dead_seen: 0,
        history: Vec::new(),
        power_losses: 0,
        duplicates_after_moves: 0,
        steps: 0,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(run.run(epochs, steps))));
    let result = match result {
        Ok(result) => result,
        Err(panic) => Err(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    };
    drop(rt);
    (run, result)
}

fn report(run: &Run, failure: &str) -> String {
    let history: Vec<&str> = run
        .history
        .iter()
        .rev()
        .take(env("SIM_HISTORY").unwrap_or(40) as usize)
        .rev()
        .map(|s| s.as_str())
        .collect();
    format!(
        "broker power-loss simulation failed at seed {seed}: {failure}\n\
         reproduce: SIM_SEED={seed} cargo test -p tidewater-core --test powerloss -- --nocapture\n\
         last driver steps:\n  {}\nlast disk operations:\n  {}",
        history.join("\n  "),
        run.fs.trace().join("\n  "),
        seed = run.seed,
    )
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

const EPOCHS: u64 = 3;
const STEPS: u64 = 30;

/// A seed reproduces its run exactly: the same steps, answers and disk operations.
#[test]
fn a_seed_reproduces_its_broker_run_exactly() {
    for seed in 0..8 {
        let (a, ra) = run_seed(seed, EPOCHS, STEPS);
        let (b, rb) = run_seed(seed, EPOCHS, STEPS);
        assert_eq!(ra, rb, "seed {seed}");
        if a.history != b.history {
            let i = a.history.iter().zip(&b.history).position(|(x, y)| x != y);
            panic!(
                "seed {seed}: runs differ at step {i:?}:\n{:?}\n{:?}",
                i.map(|i| &a.history[i]),
                i.map(|i| &b.history[i])
            );
        }
        assert_eq!(a.fs.trace(), b.fs.trace(), "seed {seed}");
    }
}

#[test]
fn broker_power_losses_never_lose_acknowledged_messages() {
    let seeds: Vec<u64> = match env("SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let start = env("SIM_SEED_START").unwrap_or(0);
            (start..start + env("SIM_SEEDS").unwrap_or(300)).collect()
        }
    };
    let started = std::time::Instant::now();
    let (mut losses, mut steps, mut dups, mut retained) = (0, 0, 0, 0);
    let (mut compacted, mut compaction_cuts, mut sub_dead) = (0, 0, 0);
    for &seed in &seeds {
        let (run, result) = run_seed(seed, EPOCHS, STEPS);
        if let Err(failure) = result {
            panic!("{}", report(&run, &failure));
        }
        if seeds.len() == 1 {
            println!("{}", run.history.join("\n"));
        }
        losses += run.power_losses;
        steps += run.steps;
        dups += run.duplicates_after_moves;
        retained += run.retained_away;
        compacted += run.compacted_away;
        compaction_cuts += run.cuts_in_compaction;
        sub_dead += run.sub_dead_seen;
    }
    println!(
        "{} seeds: {steps} steps, {losses} power losses, {dups} duplicates after a move in flight, {retained} checks after retention moved a start, {compacted} records compacted away, {compaction_cuts} cuts during a compaction, {sub_dead} subscription records seen dead-lettered, {:.1} s",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    if seeds.len() >= 100 {
        assert!(
            retained > 0,
            "retention never ran: the simulation does not exercise it"
        );
        assert!(
            compacted > 0,
            "compaction never removed a record: the simulation does not exercise it"
        );
        assert!(
            compaction_cuts > 0,
            "no power cut during a compaction: the simulation does not exercise it"
        );
        assert!(
            sub_dead > 0,
            "the subscription never dead-lettered: the simulation does not exercise it"
        );
    }
}
