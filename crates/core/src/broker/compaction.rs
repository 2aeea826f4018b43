//! Compaction of compacted streams' partitions (`cleanup: compact` or `compact+delete`),
//! one partition at a time, on a blocking thread: what `stream::compaction` decides, done
//! with storage's segment rewrites (`Store::rewrite_segments`, `replace_segments`).
//!
//! A pass maps keys to their latest offsets from where the last pass stopped, then rewrites
//! the partition's sealed segments from its start, group by group (neighbours merged up to
//! the roll size). Each rewritten batch keeps the records that stay, with their offsets;
//! batches emptied are dropped, and the next batch kept spans their offsets (or an empty
//! batch does, at a group's end), so a segment's batches still follow each other; a run of
//! emptied offsets wider than one batch can span (2^31) gets empty batches of its own. Readers
//! see the old files or the new one, never a mix (storage swaps them under the log's lock;
//! a read under way finishes on the old file). A crash at any point leaves the old
//! segments or the new one, both complete.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tidewater_storage::format::kafka::{
    KafkaBatchHeader, MAX_KAFKA_BATCH_SPAN, batch_records, check_kafka_batch, rebuild_kafka_batch,
};
use tidewater_storage::{SegmentRewrite, StoredBatch};

use super::streams::{PartitionHandle, StreamHandle};
use super::{Broker, storage_error};
use crate::error::{BrokerError, ErrorCode};
use crate::stream::compaction::{KeyMap, PassPlan, Verdict, dirty_ratio, plan_pass, verdict};
use crate::stream::config::StreamConfig;

/// Bytes of batches read at a time.
const READ_CHUNK: usize = 1 << 20;

/// What compaction did to one stream since the broker started (counters).
#[derive(Default)]
pub(crate) struct CompactionCounters {
    passes: AtomicU64,
    bytes_before: AtomicU64,
    bytes_after: AtomicU64,
    superseded: AtomicU64,
    tombstones: AtomicU64,
    keyless: AtomicU64,
    compressed_batches: AtomicU64,
    pass_ms: AtomicU64,
}

/// A stream's compaction figures since the broker started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionStats {
    /// Passes that rewrote segments.
    pub passes: u64,
    /// Segment bytes rewritten, and what they came to.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Records removed because a later record has their key.
    pub superseded: u64,
    /// Tombstones removed once their delete horizon passed.
    pub tombstones: u64,
    /// Records without a key removed (written before the stream was compacted).
    pub keyless: u64,
    /// Compressed batches kept whole (compaction does not decompress them yet).
    pub compressed_batches: u64,
    /// Milliseconds spent in passes.
    pub pass_ms: u64,
}

impl CompactionCounters {
    pub(super) fn stats(&self) -> CompactionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CompactionStats {
            passes: get(&self.passes),
            bytes_before: get(&self.bytes_before),
            bytes_after: get(&self.bytes_after),
            superseded: get(&self.superseded),
            tombstones: get(&self.tombstones),
            keyless: get(&self.keyless),
            compressed_batches: get(&self.compressed_batches),
            pass_ms: get(&self.pass_ms),
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionReport {
    pub stream: String,
    pub partition: u32,
    /// Segment groups put in place, and their bytes before and after.
    pub groups: u32,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub superseded: u64,
    pub tombstones: u64,
    pub keyless: u64,
    /// Every key below this offset was mapped: the partition's clean part ends there.
    pub cleaned_to: u64,
    /// The pass stopped early: a group could not take its segments' place (retention
    /// removed some, the stream went away, storage refused).
    pub interrupted: bool,
}

/// Bytes a second, at most, over a pass (0: no limit).
struct Throttle {
    rate: u64,
    started: Instant,
    bytes: u64,
}

impl Throttle {
    fn account(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Per-record tallies of a group being rewritten.
#[derive(Default)]
struct Tally {
    superseded: u64,
    tombstones: u64,
    keyless: u64,
    /// Batches given a delete horizon (they keep a tombstone seen for the first time).
    horizons: u64,
    /// The earliest delete horizon of the tombstones kept.
    next_horizon: i64,
}

impl Broker {
    /// Runs one compaction pass over the partition that needs it most (the highest dirty
    /// ratio at or past its stream's `min_dirty_ratio`), on a blocking thread, and waits for
    /// it. `None` when no partition needs one, or a pass is already running.
    pub async fn compact_once(&self) -> Option<Result<CompactionReport, BrokerError>> {
        if self.inner.compacting.swap(true, Ordering::AcqRel) {
            return None;
        }
        let broker = self.clone();
        let (done, ran) = tokio::sync::oneshot::channel();
        // A thread of its own, run only when no other thread wants the CPU (SCHED_IDLE): a
        // pass waits for producers and readers, not they for it. On two cores a pass on an
        // ordinary thread (a blocking-pool one, or at nice 10) added 60-80% to produce p99
        // whatever its I/O budget; at SCHED_IDLE about 20% (BENCHMARKS.md).
        let spawned = std::thread::Builder::new()
            .name("tidewater-compaction".into())
            .spawn(move || {
                lower_priority();
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    broker.pick_and_compact()
                }));
                broker.inner.compacting.store(false, Ordering::Release);
                let _ = done.send(out);
            });
        if let Err(err) = spawned {
            self.inner.compacting.store(false, Ordering::Release);
            return Some(Err(BrokerError::new(
                ErrorCode::Internal,
                format!("could not start a compaction thread: {err}"),
            )));
        }
        match ran.await {
            Ok(Ok(out)) => out,
            Ok(Err(_)) | Err(_) => Some(Err(BrokerError::new(
                ErrorCode::Internal,
                "a compaction pass panicked".to_string(),
            ))),
        }
    }

    /// Maintenance: starts a pass in the background unless one is running (the server's
    /// maintenance loop calls this; tests call `compact_once`).
    pub fn start_compaction(&self) {
        if self.inner.compacting.load(Ordering::Acquire) {
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            match broker.compact_once().await {
                Some(Ok(report)) => tracing::debug!(?report, "compaction pass"),
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "compaction pass failed; retried later")
                }
                None => {}
            }
        });
    }

    /// Each compacted stream's dirty ratio: the share of its partitions' rewritable bytes
    /// written since they were last compacted (metrics).
    pub fn compaction_dirty_ratios(&self) -> Vec<(String, f64)> {
        let streams: Vec<Arc<StreamHandle>> = self.inner.streams.read().values().cloned().collect();
        let mut out = Vec::new();
        for stream in streams {
            if !stream.config.lock().cleanup.compacts() {
                continue;
            }
            let (mut dirty, mut total) = (0.0, 0.0);
            for part in stream.partition_handles_now() {
                let segments = part.reader.segments();
                let bytes: u64 = segments[..segments.len().saturating_sub(1)]
                    .iter()
                    .filter(|s| s.end > part.start())
                    .map(|s| s.bytes)
                    .sum();
                let ratio = dirty_ratio(
                    &segments,
                    part.start(),
                    part.cleaned_to.load(Ordering::Acquire),
                    part.reader.checkpointed_end(),
                );
                dirty += ratio * bytes as f64;
                total += bytes as f64;
            }
            out.push((
                stream.name.clone(),
                if total > 0.0 { dirty / total } else { 0.0 },
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn pick_and_compact(&self) -> Option<Result<CompactionReport, BrokerError>> {
        let streams: Vec<Arc<StreamHandle>> = self.inner.streams.read().values().cloned().collect();
        let roll_bytes = self.inner.store.options().segment_roll_bytes;
        let now = self.now_ms();
        let mut best: Option<(f64, Arc<StreamHandle>, Arc<PartitionHandle>, PassPlan)> = None;
        for stream in streams {
            let config = stream.config.lock().clone();
            if !config.cleanup.compacts() || stream.deleted.load(Ordering::SeqCst) {
                continue;
            }
            for part in stream.partition_handles_now() {
                let segments = part.reader.segments();
                let (start, cleaned_to) = (part.start(), part.cleaned_to.load(Ordering::Acquire));
                let checkpointed = part.reader.checkpointed_end();
                let due = now >= part.next_horizon.load(Ordering::Acquire);
                let Some(plan) = plan_pass(
                    &segments,
                    (start, cleaned_to, checkpointed),
                    config.min_dirty_ratio,
                    due,
                    roll_bytes,
                ) else {
                    continue;
                };
                // A due tombstone ranks as fully dirty.
                let ratio = if due {
                    1.0
                } else {
                    dirty_ratio(&segments, start, cleaned_to, checkpointed)
                };
                if best.as_ref().is_none_or(|(r, ..)| ratio > *r) {
                    best = Some((ratio, stream.clone(), part, plan));
                }
            }
        }
        let (_, stream, part, plan) = best?;
        let config = stream.config.lock().clone();
        let started = Instant::now();
        let result = self.compact_partition(&stream, &part, &plan, &config);
        let c = &stream.counters.compaction;
        c.pass_ms
            .fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        if let Ok(report) = &result {
            if report.groups > 0 {
                c.passes.fetch_add(1, Ordering::Relaxed);
            }
            c.bytes_before
                .fetch_add(report.bytes_before, Ordering::Relaxed);
            c.bytes_after
                .fetch_add(report.bytes_after, Ordering::Relaxed);
            c.superseded.fetch_add(report.superseded, Ordering::Relaxed);
            c.tombstones.fetch_add(report.tombstones, Ordering::Relaxed);
            c.keyless.fetch_add(report.keyless, Ordering::Relaxed);
            if report.groups > 0 {
                // One line a pass that changed files, as Kafka's cleaner logs its passes. (The
                // old files' space comes back once no reader holds them open.)
                tracing::info!(
                    stream = %stream.name,
                    partition = part.partition,
                    bytes_before = report.bytes_before,
                    bytes_after = report.bytes_after,
                    superseded = report.superseded,
                    tombstones = report.tombstones,
                    ms = started.elapsed().as_millis() as u64,
                    "compacted"
                );
            }
        }
        Some(result)
    }

    /// One pass over one partition (blocking).
    fn compact_partition(
        &self,
        stream: &StreamHandle,
        part: &PartitionHandle,
        plan: &PassPlan,
        config: &StreamConfig,
    ) -> Result<CompactionReport, BrokerError> {
        let limits = &self.inner.limits;
        let mut throttle = Throttle {
            rate: limits.compaction_bytes_per_s,
            started: Instant::now(),
            bytes: 0,
        };
        let clean_until = part.cleaned_to.load(Ordering::Acquire);
        // A table for the keys the dirty part can hold at most (a record takes 10 bytes or
        // more), within the budget: a small partition does not take the whole budget.
        let dirty_bytes: u64 = part
            .reader
            .segments()
            .iter()
            .filter(|s| s.end > plan.map_from && s.base < plan.map_until)
            .map(|s| s.bytes)
            .sum();
        let expected = usize::try_from(dirty_bytes / 10).unwrap_or(usize::MAX);
        let mut map = KeyMap::with_budget(limits.compaction_key_map_bytes, expected);
        let mapped_to = self.map_keys(stream, part, plan, &mut map, &mut throttle)?;
        let now = self.now_ms();
        let mut report = CompactionReport {
            stream: stream.name.clone(),
            partition: part.partition,
            groups: 0,
            bytes_before: 0,
            bytes_after: 0,
            superseded: 0,
            tombstones: 0,
            keyless: 0,
            cleaned_to: clean_until,
            interrupted: false,
        };
        let segments = part.reader.segments();
        // The earliest horizon of the tombstones the groups keep; whether every group was seen.
        let (mut next_horizon, mut all_groups) = (i64::MAX, true);
        for &(base, end) in &plan.groups {
            if base >= mapped_to {
                all_groups = false;
                break; // past what the map covers: the next pass
            }
            if stream.deleted.load(Ordering::SeqCst) || self.inner.closing.load(Ordering::SeqCst) {
                report.interrupted = true;
                return Ok(report);
            }
            let before: u64 = segments
                .iter()
                .filter(|s| s.base >= base && s.end <= end)
                .map(|s| s.bytes)
                .sum();
            let files = segments
                .iter()
                .filter(|s| s.base >= base && s.end <= end)
                .count();
            let mut tally = Tally {
                next_horizon: i64::MAX,
                ..Tally::default()
            };
            let mut rewrite = self
                .inner
                .store
                .rewrite_segments(part.uid, base)
                .map_err(storage_error)?;
            let mut emptied: Option<StoredBatch> = None;
            let next = each_batch(part, (base, end), &mut throttle, &mut |batch, header| {
                let batch_end = batch.base_offset + u64::from(batch.span);
                if header.compression() != 0 {
                    // Kept whole; the offsets of emptied batches before it go in an empty
                    // batch of their own.
                    if let Some(gap) = emptied.take() {
                        let from = rewrite.end().max(base);
                        push_empty(&mut rewrite, &gap, (from, batch.base_offset))?;
                    }
                    stream
                        .counters
                        .compaction
                        .compressed_batches
                        .fetch_add(1, Ordering::Relaxed);
                    rewrite.push(&batch.kafka).map_err(storage_error)?;
                    return Ok(ControlFlow::Continue(()));
                }
                // The kept batch covers the emptied offsets before it, unless that would
                // span more than a batch can: then they get empty batches of their own.
                let from = rewrite.end().max(base);
                let wide = batch_end - from > MAX_KAFKA_BATCH_SPAN;
                let span = (if wide { batch.base_offset } else { from }, batch_end);
                let rebuilt = rebuild(
                    &batch,
                    header,
                    span,
                    &map,
                    clean_until,
                    now,
                    config,
                    &mut tally,
                )?;
                match rebuilt {
                    Some(bytes) => {
                        if wide {
                            push_empty(&mut rewrite, &batch, (from, batch.base_offset))?;
                        }
                        emptied = None;
                        rewrite.push(&bytes).map_err(storage_error)?;
                    }
                    None => emptied = Some(batch),
                }
                Ok(ControlFlow::Continue(()))
            })?;
            if next != end {
                // Retention removed the start of the group meanwhile, or it ends elsewhere
                // than planned: leave it.
                report.interrupted = true;
                return Ok(report);
            }
            if let Some(gap) = emptied.take() {
                let from = rewrite.end().max(base);
                push_empty(&mut rewrite, &gap, (from, end))?;
            }
            next_horizon = next_horizon.min(tally.next_horizon);
            if tally.superseded + tally.tombstones + tally.keyless + tally.horizons == 0
                && files == 1
            {
                continue; // nothing to remove, nothing to merge: the file stays (dropped)
            }
            let after = rewrite.bytes();
            throttle.account(after as usize);
            let replaced = self
                .inner
                .store
                .replace_segments(rewrite)
                .map_err(storage_error)?;
            if !replaced {
                report.interrupted = true;
                return Ok(report);
            }
            report.groups += 1;
            report.bytes_before += before;
            report.bytes_after += after;
            report.superseded += tally.superseded;
            report.tombstones += tally.tombstones;
            report.keyless += tally.keyless;
        }
        part.cleaned_to.fetch_max(mapped_to, Ordering::AcqRel);
        if all_groups {
            part.next_horizon.store(next_horizon, Ordering::Release);
        } else {
            part.next_horizon.fetch_min(next_horizon, Ordering::AcqRel);
        }
        report.cleaned_to = mapped_to;
        Ok(report)
    }

    /// Maps keys to their latest offsets from `plan.map_from` on, until `plan.map_until` or
    /// the map is full; returns the offset every key below which was mapped.
    fn map_keys(
        &self,
        stream: &StreamHandle,
        part: &PartitionHandle,
        plan: &PassPlan,
        map: &mut KeyMap,
        throttle: &mut Throttle,
    ) -> Result<u64, BrokerError> {
        let from = plan.map_from;
        let mut full_at = None;
        let next = each_batch(
            part,
            (from, plan.map_until),
            throttle,
            &mut |batch, header| {
                if stream.deleted.load(Ordering::SeqCst) {
                    full_at = Some(from); // nothing mapped counts
                    return Ok(ControlFlow::Break(()));
                }
                // (A compressed batch's keys are not mapped: its records stay, and so do the
                // older records of their keys, until compaction decompresses.)
                if header.compression() == 0 {
                    for record in batch_records(&batch.kafka, header, batch.base_offset, from) {
                        let record = record.map_err(|e| corrupt(&batch, e))?;
                        if let Some(key) = record.record.key
                            && !map.insert(key, record.offset)
                        {
                            full_at = Some(record.offset); // full: the rest next pass
                            return Ok(ControlFlow::Break(()));
                        }
                    }
                }
                Ok(ControlFlow::Continue(()))
            },
        )?;
        Ok(full_at.unwrap_or(next.min(plan.map_until)))
    }
}

/// What `each_batch` does with one batch: on, or stop.
type EachBatch<'a> =
    dyn FnMut(StoredBatch, &KafkaBatchHeader) -> Result<ControlFlow<()>, BrokerError> + 'a;

/// Hands `each` the stored batches of a partition that start in `from..until`, with their
/// checked headers, read `READ_CHUNK` at a time, their bytes counted by `throttle`. Returns
/// the offset after the last batch handed (`from` when none was), or where `each` stopped.
fn each_batch(
    part: &PartitionHandle,
    (from, until): (u64, u64),
    throttle: &mut Throttle,
    each: &mut EachBatch<'_>,
) -> Result<u64, BrokerError> {
    let mut next = from;
    while next < until {
        let batches = part
            .reader
            .read_batches(next, READ_CHUNK)
            .map_err(storage_error)?;
        if batches.is_empty() {
            break;
        }
        for batch in batches {
            if batch.base_offset >= until {
                return Ok(next);
            }
            throttle.account(batch.kafka.len());
            let header = check_kafka_batch(&batch.kafka).map_err(|e| corrupt(&batch, e))?;
            let batch_end = batch.base_offset + u64::from(batch.span);
            if each(batch, &header)?.is_break() {
                return Ok(next);
            }
            next = next.max(batch_end);
        }
    }
    Ok(next)
}

/// The calling thread runs only when the CPU is otherwise idle (Linux's SCHED_IDLE; a
/// thread's policy is its own). On a machine whose CPU is always busy, passes wait.
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param` only; failure leaves the policy as it was.
    let failed = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0;
    if failed {
        tracing::debug!(error = %std::io::Error::last_os_error(), "compaction runs at normal priority");
    }
}

/// `batch` with the records that stay, spanning `span`; `None` when none stays.
#[allow(clippy::too_many_arguments)]
fn rebuild(
    batch: &StoredBatch,
    header: &KafkaBatchHeader,
    span: (u64, u64),
    map: &KeyMap,
    clean_until: u64,
    now: i64,
    config: &StreamConfig,
    tally: &mut Tally,
) -> Result<Option<Vec<u8>>, BrokerError> {
    let horizon_passed = header.delete_horizon().is_some_and(|h| now >= h);
    let (mut kept, mut tombstones_kept) = (0u32, false);
    let mut keep = |r: &tidewater_storage::format::kafka::BatchRecord<'_>| {
        let tombstone = r.record.value.is_none();
        match verdict(
            r.record.key,
            tombstone,
            r.offset,
            map,
            clean_until,
            horizon_passed,
        ) {
            Verdict::Keep => {
                kept += 1;
                tombstones_kept |= tombstone;
                true
            }
            Verdict::Superseded => {
                tally.superseded += 1;
                false
            }
            Verdict::TombstoneExpired => {
                tally.tombstones += 1;
                false
            }
            Verdict::Keyless => {
                tally.keyless += 1;
                false
            }
        }
    };
    // A first pass over the records decides; the horizon goes on batches that keep a
    // tombstone and have none yet (so it counts from the first compaction that saw it).
    let mut decisions = Vec::new();
    for record in batch_records(&batch.kafka, header, batch.base_offset, 0) {
        let record = record.map_err(|e| corrupt(batch, e))?;
        decisions.push(keep(&record));
    }
    if kept == 0 {
        return Ok(None);
    }
    let horizon = (tombstones_kept && header.delete_horizon().is_none())
        .then(|| now.saturating_add(config.delete_retention_ms));
    tally.horizons += u64::from(horizon.is_some());
    if tombstones_kept && let Some(at) = horizon.or(header.delete_horizon()) {
        tally.next_horizon = tally.next_horizon.min(at);
    }
    let mut at = 0;
    let bytes = rebuild_kafka_batch(
        &batch.kafka,
        header,
        batch.base_offset,
        span,
        horizon,
        &mut |_| {
            at += 1;
            decisions[at - 1]
        },
    )
    .map_err(|e| corrupt(batch, e))?;
    Ok(Some(bytes))
}

/// Empty batches spanning `from..to` (made from `model`'s header fields), as few as can
/// span it: one unless it is wider than `MAX_KAFKA_BATCH_SPAN`.
fn push_empty(
    rewrite: &mut SegmentRewrite,
    model: &StoredBatch,
    (from, to): (u64, u64),
) -> Result<(), BrokerError> {
    let header = check_kafka_batch(&model.kafka).map_err(|e| corrupt(model, e))?;
    let mut at = from;
    while at < to {
        let end = to.min(at + MAX_KAFKA_BATCH_SPAN);
        let empty = rebuild_kafka_batch(
            &model.kafka,
            &header,
            model.base_offset,
            (at, end),
            None,
            &mut |_| false,
        )
        .map_err(|e| corrupt(model, e))?;
        rewrite.push(&empty).map_err(storage_error)?;
        at = end;
    }
    Ok(())
}

fn corrupt(batch: &StoredBatch, err: impl std::fmt::Display) -> BrokerError {
    BrokerError::new(
        ErrorCode::Internal,
        format!(
            "compaction: the stored batch at offset {} is invalid: {err}",
            batch.base_offset
        ),
    )
}
