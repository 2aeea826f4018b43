//! Streams: create, configure (partitions grow), delete, list; produce (one Kafka batch per
//! partition, every partition of a produce in one journal write); fetch stored batches from
//! an offset with a long poll; find an offset by time. Consumer groups come next.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tidewater_storage::format::wrap_kafka_batch;
use tidewater_storage::{AckLevel, LogReader, Op, OpResult, RecoveredLog, Store, StoredBatch};
use tokio::sync::Notify;

use super::subscriptions::ArrivalHooks;
use super::{Broker, storage_error};
use crate::error::{BrokerError, ErrorCode};
use crate::stream::config::{
    StreamConfig, StreamPatch, parse_partition_log_name, partition_log_name, validate_stream_name,
};
use crate::stream::partition::Sticky;
use crate::stream::records::{
    NewStreamRecord, StreamRecord, decode_batch, plan_batch_produce, plan_produce,
};

/// The base offset of each op's append (`None` for an op that appended nothing).
fn appended_bases(results: &[OpResult]) -> Vec<Option<u64>> {
    results
        .iter()
        .map(|r| match r {
            OpResult::Appended { base_offset, .. } => Some(*base_offset),
            _ => None,
        })
        .collect()
}

/// A stream and its partitions.
pub(crate) struct StreamHandle {
    pub(super) name: String,
    pub(super) config: Mutex<StreamConfig>,
    partitions: RwLock<Vec<Arc<PartitionHandle>>>,
    sticky: Sticky,
    pub(super) deleted: AtomicBool,
    pub(super) counters: Counters,
    /// Its work-queue subscriptions, by name.
    pub(super) subscriptions: RwLock<BTreeMap<String, Arc<super::QueueHandle>>>,
}

/// What a stream served since the broker started (metrics).
#[derive(Default)]
pub(super) struct Counters {
    produce_requests: AtomicU64,
    produced_records: AtomicU64,
    fetch_requests: AtomicU64,
    fetched_bytes: AtomicU64,
    deleted_records: AtomicU64,
    deleted_bytes: AtomicU64,
    pub(super) compaction: super::compaction::CompactionCounters,
}

/// A stream's counters since the broker started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCounters {
    /// Produce requests (and binary StreamProduce frames) that appended.
    pub produce_requests: u64,
    pub produced_records: u64,
    /// Fetches of one of its partitions (a multi-partition fetch counts each).
    pub fetch_requests: u64,
    /// Bytes of stored batches handed out.
    pub fetched_bytes: u64,
    /// Offsets and segment bytes retention deleted.
    pub deleted_records: u64,
    pub deleted_bytes: u64,
    /// What compaction did.
    pub compaction: super::compaction::CompactionStats,
}

/// One partition: its log, and the long-polls waiting for it to grow.
pub(crate) struct PartitionHandle {
    pub uid: u64,
    pub(super) partition: u32,
    pub(super) reader: LogReader,
    pub notify: Notify,
    /// The first offset a fetch can return: retention moves it (durably: a settle of the
    /// offsets below, so recovery finds it as the log's ack floor).
    start: AtomicU64,
    /// Compaction mapped every key below this (since the broker started): the part after
    /// it is dirty.
    pub(super) cleaned_to: AtomicU64,
    /// The earliest delete horizon of a tombstone compaction kept (`i64::MAX`: none known
    /// since the broker started): once it passes, a pass runs to remove it.
    pub(super) next_horizon: std::sync::atomic::AtomicI64,
    /// Subscriptions reading it (its durable end wakes them).
    pub(super) subscribers: RwLock<Vec<Arc<super::QueueHandle>>>,
    /// The last batches its subscriptions read (shared by them).
    pub(super) cache: Arc<crate::stream::source::BatchCache>,
}

/// A stream as shown.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamInfo {
    pub name: String,
    pub config: StreamConfig,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionInfo {
    pub partition: u32,
    /// The first offset a fetch can return (retention moves it; 0 until then).
    pub start_offset: u64,
    /// The offset the next record gets: records below it are durable and fetchable.
    pub end_offset: u64,
    /// Bytes of the partition's segment files, and how many there are (the one being
    /// written included).
    pub bytes: u64,
    pub segments: u64,
}

/// A batch appended: its first offset, its record count, and the time stamped on its
/// records when the stream keeps LogAppendTime.
pub type Appended = (u64, u32, Option<i64>);

/// Where each record of a produce went, in the order given: (partition, offset).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Produced {
    pub offsets: Vec<(u32, u64)>,
}

/// What a fetch found: whole batches as stored (the first may start before the offset
/// asked), and the partition's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub batches: Vec<StoredBatch>,
    pub start_offset: u64,
    pub end_offset: u64,
}

/// `list_offset`'s time for a partition's end (Kafka's).
pub const LATEST: i64 = -1;
/// `list_offset`'s time for a partition's start (Kafka's).
pub const EARLIEST: i64 = -2;

/// Partitions one fetch may name.
pub const MAX_FETCH_PARTITIONS: usize = 10_000;

/// One partition a multi-partition fetch asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchWant {
    pub stream: String,
    pub partition: u32,
    pub offset: u64,
    /// At most this many bytes of this partition (at least one batch when one exists).
    pub max_bytes: usize,
}

/// A partition's own segment roll, from its stream's configuration (0: the store's).
fn set_segment_roll(store: &Store, uid: u64, config: &StreamConfig) {
    store.set_segment_roll(uid, config.segment_bytes, config.segment_ms);
}

/// Streams recovered from their partition logs at open.
pub(crate) fn recover_streams(
    store: &Store,
    logs: Vec<RecoveredLog>,
    budget: &Arc<crate::stream::source::CacheBudget>,
) -> Result<HashMap<String, Arc<StreamHandle>>, String> {
    let mut by_stream: BTreeMap<String, Vec<(u32, RecoveredLog)>> = BTreeMap::new();
    for log in logs {
        let (stream, partition) =
            parse_partition_log_name(&log.name).ok_or_else(|| format!("log '{}'", log.name))?;
        by_stream
            .entry(stream.to_string())
            .or_default()
            .push((partition, log));
    }
    let mut streams = HashMap::new();
    for (name, mut logs) in by_stream {
        logs.sort_by_key(|(partition, _)| *partition);
        let config: StreamConfig = serde_json::from_str(&logs[0].1.config)
            .map_err(|e| format!("stream '{name}': its stored configuration is unreadable: {e}"))?;
        let numbered = logs.iter().enumerate().all(|(i, (p, _))| *p as usize == i);
        if !numbered || logs.len() != config.partitions as usize {
            return Err(format!(
                "stream '{name}': its configuration says {} partitions, its logs are partitions {:?}",
                config.partitions,
                logs.iter().map(|(p, _)| *p).collect::<Vec<_>>()
            ));
        }
        let partitions = logs
            .iter()
            .map(|(partition, log)| {
                set_segment_roll(store, log.uid, &config);
                Arc::new(PartitionHandle {
                    uid: log.uid,
                    partition: *partition,
                    reader: store.reader(log.uid).expect("a recovered log has a reader"),
                    notify: Notify::new(),
                    start: AtomicU64::new(log.ack_floor),
                    cleaned_to: AtomicU64::new(log.ack_floor),
                    next_horizon: std::sync::atomic::AtomicI64::new(i64::MAX),
                    subscribers: RwLock::new(Vec::new()),
                    cache: crate::stream::source::BatchCache::new(budget.clone()),
                })
            })
            .collect();
        streams.insert(
            name.clone(),
            Arc::new(StreamHandle {
                name,
                config: Mutex::new(config),
                partitions: RwLock::new(partitions),
                sticky: Sticky::default(),
                deleted: AtomicBool::new(false),
                counters: Counters::default(),
                subscriptions: RwLock::new(BTreeMap::new()),
            }),
        );
    }
    Ok(streams)
}

impl PartitionHandle {
    pub(crate) fn start(&self) -> u64 {
        self.start.load(Ordering::Acquire)
    }

    /// An offset below the partition's start: its records were deleted by retention.
    fn before_start(&self, stream: &str, offset: u64) -> Option<BrokerError> {
        let start = self.start();
        (offset < start).then(|| {
            BrokerError::new(
                ErrorCode::OffsetOutOfRange,
                format!(
                    "offset {offset} is before the start of partition {} of stream '{stream}': retention deleted the records below {start} (its records are at {start}..{}); read from {start}",
                    self.partition,
                    self.reader.durable_end()
                ),
            )
        })
    }

    pub(crate) fn reader(&self) -> &LogReader {
        &self.reader
    }
}

impl StreamHandle {
    fn count_produce(&self, records: u64) {
        self.counters
            .produce_requests
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .produced_records
            .fetch_add(records, Ordering::Relaxed);
    }

    fn count_fetch(&self, batches: &[StoredBatch]) {
        let bytes: usize = batches.iter().map(|b| b.kafka.len()).sum();
        self.counters.fetch_requests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .fetched_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Its partitions now.
    pub(crate) fn partition_handles_now(&self) -> Vec<Arc<PartitionHandle>> {
        self.partitions.read().clone()
    }
}

impl Broker {
    pub(super) fn stream(&self, name: &str) -> Result<Arc<StreamHandle>, BrokerError> {
        self.inner
            .streams
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::stream_not_found(name))
    }

    fn partition(
        &self,
        stream: &StreamHandle,
        partition: u32,
    ) -> Result<Arc<PartitionHandle>, BrokerError> {
        stream
            .partitions
            .read()
            .get(partition as usize)
            .cloned()
            .ok_or_else(|| {
                BrokerError::new(
                    ErrorCode::PartitionNotFound,
                    format!(
                        "stream '{}' has no partition {partition} (its partitions are 0..={})",
                        stream.name,
                        stream.partitions.read().len().saturating_sub(1)
                    ),
                )
            })
    }

    /// Creates a stream, or changes the configuration of one (its partitions may grow).
    /// Returns whether it was created. Every partition is created or changed in one
    /// journal write.
    pub async fn put_stream(
        &self,
        name: &str,
        patch: &StreamPatch,
    ) -> Result<(bool, StreamInfo), BrokerError> {
        validate_stream_name(name)?;
        let limits = &self.inner.limits;
        let _admin = self.inner.admin.lock().await;
        if let Ok(stream) = self.stream(name) {
            let current = stream.config.lock().clone();
            let next = current.apply(patch)?;
            next.validate(limits)?;
            if next != current {
                let json = serde_json::to_string(&next).expect("a configuration serializes");
                let mut ops: Vec<Op> = stream
                    .partitions
                    .read()
                    .iter()
                    .map(|p| Op::UpdateConfig {
                        uid: p.uid,
                        config: json.clone(),
                    })
                    .collect();
                ops.extend(
                    (current.partitions..next.partitions).map(|p| Op::CreateLog {
                        name: partition_log_name(name, p),
                        config: json.clone(),
                        id_window: None,
                    }),
                );
                let results = self.write(ops, AckLevel::Durable).await?;
                let created = self.partition_handles(&results, current.partitions)?;
                stream.partitions.write().extend(created.iter().cloned());
                {
                    let mut by_uid = self.inner.stream_parts.write();
                    for part in &created {
                        by_uid.insert(part.uid, part.clone());
                    }
                }
                if let Err(err) = self.grow_subscriptions(&stream, &created).await {
                    // The partitions exist; the next open makes the views that are missing.
                    tracing::warn!(stream = %name, error = %err, "could not add the new partitions to the stream's subscriptions");
                }
                let grew = next.partitions != current.partitions;
                for part in stream.partition_handles_now() {
                    set_segment_roll(&self.inner.store, part.uid, &next);
                }
                *stream.config.lock() = next;
                if grew {
                    // Groups reading it take the new partitions at once.
                    self.reassign_groups();
                }
            }
            return Ok((false, self.stream_info(&stream)));
        }
        if self.inner.streams.read().len() >= limits.max_streams {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the broker holds its maximum of {} streams (max_streams)",
                    limits.max_streams
                ),
            ));
        }
        let config = StreamConfig::new(patch, limits)?;
        let json = serde_json::to_string(&config).expect("a configuration serializes");
        let ops = (0..config.partitions)
            .map(|p| Op::CreateLog {
                name: partition_log_name(name, p),
                config: json.clone(),
                id_window: None,
            })
            .collect();
        let results = self.write(ops, AckLevel::Durable).await?;
        let partitions = self.partition_handles(&results, 0)?;
        for part in &partitions {
            set_segment_roll(&self.inner.store, part.uid, &config);
        }
        let stream = Arc::new(StreamHandle {
            name: name.to_string(),
            config: Mutex::new(config),
            partitions: RwLock::new(partitions.clone()),
            sticky: Sticky::default(),
            deleted: AtomicBool::new(false),
            counters: Counters::default(),
            subscriptions: RwLock::new(BTreeMap::new()),
        });
        {
            let mut by_uid = self.inner.stream_parts.write();
            for part in partitions {
                by_uid.insert(part.uid, part);
            }
        }
        self.inner
            .streams
            .write()
            .insert(name.to_string(), stream.clone());
        Ok((true, self.stream_info(&stream)))
    }

    /// Handles for the logs a write created (its `Created` results, in order), numbered
    /// from `first`.
    fn partition_handles(
        &self,
        results: &[OpResult],
        first: u32,
    ) -> Result<Vec<Arc<PartitionHandle>>, BrokerError> {
        let mut out = Vec::new();
        for result in results {
            if let OpResult::Created { uid } = *result {
                let reader = self.inner.store.reader(uid).ok_or_else(|| {
                    BrokerError::new(ErrorCode::Internal, "a new partition has no reader")
                })?;
                out.push(Arc::new(PartitionHandle {
                    uid,
                    partition: first + out.len() as u32,
                    reader,
                    notify: Notify::new(),
                    start: AtomicU64::new(0),
                    cleaned_to: AtomicU64::new(0),
                    next_horizon: std::sync::atomic::AtomicI64::new(i64::MAX),
                    subscribers: RwLock::new(Vec::new()),
                    cache: crate::stream::source::BatchCache::new(self.inner.cache_budget.clone()),
                }));
            }
        }
        Ok(out)
    }

    pub async fn delete_stream(&self, name: &str) -> Result<(), BrokerError> {
        let _admin = self.inner.admin.lock().await;
        let stream = self.stream(name)?;
        let uids: Vec<u64> = stream.partitions.read().iter().map(|p| p.uid).collect();
        // Its subscriptions go with it, in the same write (views before their partitions).
        let subs: Vec<Arc<super::QueueHandle>> =
            stream.subscriptions.read().values().cloned().collect();
        let mut ops: Vec<Op> = subs
            .iter()
            .flat_map(|h| super::subscriptions::subscription_delete_ops(h))
            .collect();
        ops.extend(uids.iter().map(|&uid| Op::DeleteLog { uid }));
        self.write(ops, AckLevel::Durable).await?;
        for handle in &subs {
            self.forget_subscription(&stream, handle);
        }
        // A stream made again under this name starts with no committed offsets.
        self.forget_offsets(name).await?;
        self.inner.streams.write().remove(name);
        {
            let mut by_uid = self.inner.stream_parts.write();
            for uid in &uids {
                by_uid.remove(uid);
            }
        }
        stream.deleted.store(true, Ordering::SeqCst);
        for part in stream.partitions.read().iter() {
            part.notify.notify_waiters();
        }
        self.reassign_groups();
        Ok(())
    }

    fn stream_info(&self, stream: &StreamHandle) -> StreamInfo {
        StreamInfo {
            name: stream.name.clone(),
            config: stream.config.lock().clone(),
            partitions: stream
                .partitions
                .read()
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.partition,
                    start_offset: p.start(),
                    end_offset: p.reader.durable_end(),
                    bytes: p.reader.disk_bytes(),
                    segments: p.reader.segment_count() as u64,
                })
                .collect(),
        }
    }

    /// Each stream's counters since the broker started, by name.
    pub fn stream_counters(&self) -> Vec<(String, StreamCounters)> {
        let mut out: Vec<(String, StreamCounters)> = self
            .inner
            .streams
            .read()
            .values()
            .map(|s| {
                let c = &s.counters;
                (
                    s.name.clone(),
                    StreamCounters {
                        produce_requests: c.produce_requests.load(Ordering::Relaxed),
                        produced_records: c.produced_records.load(Ordering::Relaxed),
                        fetch_requests: c.fetch_requests.load(Ordering::Relaxed),
                        fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
                        deleted_records: c.deleted_records.load(Ordering::Relaxed),
                        deleted_bytes: c.deleted_bytes.load(Ordering::Relaxed),
                        compaction: c.compaction.stats(),
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn get_stream(&self, name: &str) -> Result<StreamInfo, BrokerError> {
        let stream = self.stream(name)?;
        Ok(self.stream_info(&stream))
    }

    pub fn list_streams(&self) -> Vec<StreamInfo> {
        let streams: Vec<_> = self.inner.streams.read().values().cloned().collect();
        let mut out: Vec<StreamInfo> = streams.iter().map(|s| self.stream_info(s)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Appends records: each goes to the partition it names, else its key's (Kafka's
    /// partitioner), else one partition for all keyless records of this produce, the next
    /// one for the next produce. All or nothing: every partition's batch is in one journal
    /// write. Returns each record's (partition, offset), in the order given.
    pub async fn produce(
        &self,
        stream: &str,
        records: &[NewStreamRecord],
        level: AckLevel,
    ) -> Result<Produced, BrokerError> {
        let handle = self.stream(stream)?;
        self.check_disk()?;
        let config = handle.config.lock().clone();
        let sticky = handle.sticky.peek(config.partitions);
        let (batches, placement) =
            plan_produce(records, &config, sticky, &self.inner.limits, self.now_ms())?;
        let parts = handle.partitions.read().clone();
        let mut ops = Vec::with_capacity(batches.len());
        for batch in &batches {
            let part = &parts[batch.partition as usize];
            let wrapped = wrap_kafka_batch(part.uid, &batch.kafka)
                .map_err(|e| BrokerError::new(ErrorCode::Internal, e.to_string()))?;
            ops.push(Op::Append {
                uid: part.uid,
                batch: wrapped,
            });
        }
        let hooks = self.arrival_hooks(
            &batches
                .iter()
                .map(|b| (&*parts[b.partition as usize], &b.kafka[..]))
                .collect::<Vec<_>>(),
        );
        let touched = hooks.as_ref().map(ArrivalHooks::handles);
        let results = self
            .submit_then(ops, level, move |result| {
                if let (Ok(results), Some(hooks)) = (&result, &hooks) {
                    hooks.landed(&appended_bases(results));
                }
                result
            })
            .await??;
        if let Some(touched) = touched {
            self.settle_superseded(touched).await;
        }
        if records
            .iter()
            .any(|r| r.partition.is_none() && r.key.is_none())
        {
            handle.sticky.advance();
        }
        let mut bases: HashMap<u32, u64> = HashMap::new();
        for (batch, result) in batches.iter().zip(&results) {
            match *result {
                OpResult::Appended { base_offset, .. } => {
                    bases.insert(batch.partition, base_offset);
                }
                _ => {
                    return Err(BrokerError::new(
                        ErrorCode::Internal,
                        "storage did not answer an append with its offset",
                    ));
                }
            }
        }
        let offsets: Vec<(u32, u64)> = placement
            .into_iter()
            .map(|(partition, index)| (partition, bases[&partition] + u64::from(index)))
            .collect();
        handle.count_produce(offsets.len() as u64);
        Ok(Produced { offsets })
    }

    /// Appends one batch a client built (a Kafka v2 record batch, uncompressed; see
    /// `plan_batch_produce`) to a partition, as is but for its base offset. Checked and
    /// handed to storage now, so a connection's batches are appended in the order sent;
    /// the future answers the batch's first offset, record count and append time (the
    /// time stamped on its records when the stream keeps LogAppendTime, else `None`).
    pub fn start_produce_batch(
        &self,
        stream: &str,
        partition: u32,
        mut batch: Vec<u8>,
        level: AckLevel,
    ) -> Result<impl Future<Output = Result<Appended, BrokerError>> + Send + 'static, BrokerError>
    {
        let handle = self.stream(stream)?;
        let part = self.partition(&handle, partition)?;
        self.check_disk()?;
        let config = handle.config.lock().clone();
        let now = self.now_ms();
        let count = plan_batch_produce(&mut batch, &config, &self.inner.limits, now)?;
        let append_time = (config.timestamp_type
            == crate::stream::config::TimestampType::LogAppendTime)
            .then_some(now);
        let wrapped = wrap_kafka_batch(part.uid, &batch)
            .map_err(|e| BrokerError::new(ErrorCode::Internal, e.to_string()))?;
        let hooks = self.arrival_hooks(&[(&*part, &batch[..])]);
        let touched = hooks.as_ref().map(ArrivalHooks::handles);
        let written = self.submit_then(
            vec![Op::Append {
                uid: part.uid,
                batch: wrapped,
            }],
            level,
            move |result| {
                if let (Ok(results), Some(hooks)) = (&result, &hooks) {
                    hooks.landed(&appended_bases(results));
                }
                result
            },
        );
        let broker = self.clone();
        Ok(async move {
            let written = written.await?;
            if let Some(touched) = touched {
                broker.settle_superseded(touched).await;
            }
            match written?.first() {
                Some(&OpResult::Appended { base_offset, .. }) => {
                    handle.count_produce(u64::from(count));
                    Ok((base_offset, count, append_time))
                }
                _ => Err(BrokerError::new(
                    ErrorCode::Internal,
                    "storage did not answer an append with its offset",
                )),
            }
        })
    }

    /// Fetches several partitions at once (a group member's): whole batches from each
    /// wanted offset, about `max_bytes` in all (at least one batch when any exists; each
    /// partition at most its own `max_bytes`). Waits up to `wait_ms` until the partitions
    /// have `min_bytes` of batches in all (1: any record); a partition's error (it does not
    /// exist, the offset is past its end) is its answer and ends the wait.
    pub async fn fetch_many(
        &self,
        wants: &[FetchWant],
        max_bytes: usize,
        min_bytes: usize,
        wait_ms: u64,
    ) -> Result<Vec<Result<Fetched, BrokerError>>, BrokerError> {
        let limits = &self.inner.limits;
        if wait_ms > limits.max_wait_ms {
            return Err(BrokerError::invalid(format!(
                "wait_ms must be at most {} (max_wait_ms)",
                limits.max_wait_ms
            )));
        }
        if wants.len() > MAX_FETCH_PARTITIONS {
            return Err(BrokerError::invalid(format!(
                "a fetch names at most {MAX_FETCH_PARTITIONS} partitions"
            )));
        }
        let max_bytes = max_bytes.clamp(1, limits.max_fetch_bytes);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        type Found = Result<(Arc<StreamHandle>, Arc<PartitionHandle>), BrokerError>;
        let parts: Vec<Found> = wants
            .iter()
            .map(|want| {
                let handle = self.stream(&want.stream)?;
                let part = self.partition(&handle, want.partition)?;
                Ok((handle, part))
            })
            .collect();
        loop {
            // Registered before reading: a produce landing between the read and the wait
            // still wakes it.
            let mut woken: Vec<_> = parts
                .iter()
                .flatten()
                .map(|(_, part)| Box::pin(part.notify.notified()))
                .collect();
            for notified in &mut woken {
                notified.as_mut().enable();
            }
            let mut out = Vec::with_capacity(wants.len());
            let mut budget = max_bytes;
            let mut failed = false;
            let mut total = 0;
            for (want, part) in wants.iter().zip(&parts) {
                let answer = match part {
                    Err(err) => Err(err.clone()),
                    Ok((handle, part)) => {
                        let room = (budget > 0).then(|| budget.min(want.max_bytes.max(1)));
                        self.fetch_one(handle, part, want, room)
                    }
                };
                match &answer {
                    Ok(fetched) => {
                        let bytes: usize = fetched.batches.iter().map(|b| b.kafka.len()).sum();
                        budget = budget.saturating_sub(bytes);
                        total += bytes;
                    }
                    Err(_) => failed = true,
                }
                out.push(answer);
            }
            if failed
                || total >= min_bytes.max(1)
                || woken.is_empty()
                || tokio::time::Instant::now() >= deadline
                || self.inner.closing.load(Ordering::SeqCst)
            {
                return Ok(out);
            }
            let any = std::future::poll_fn(|cx| {
                for notified in &mut woken {
                    if notified.as_mut().poll(cx).is_ready() {
                        return std::task::Poll::Ready(());
                    }
                }
                std::task::Poll::Pending
            });
            let _ = tokio::time::timeout_at(deadline, any).await;
        }
    }

    /// One partition of a fetch, without waiting: about `max_bytes` of batches (at least
    /// one when one exists), or none but the partition's range when there is no room left.
    fn fetch_one(
        &self,
        handle: &StreamHandle,
        part: &PartitionHandle,
        want: &FetchWant,
        max_bytes: Option<usize>,
    ) -> Result<Fetched, BrokerError> {
        if handle.deleted.load(Ordering::SeqCst) {
            return Err(BrokerError::stream_not_found(&want.stream));
        }
        let end = part.reader.durable_end();
        if want.offset > end {
            return Err(BrokerError::new(
                ErrorCode::OffsetOutOfRange,
                format!(
                    "offset {} is past the end of partition {} of stream '{}' (its records are at {}..{end})",
                    want.offset,
                    want.partition,
                    want.stream,
                    part.start()
                ),
            ));
        }
        if let Some(err) = part.before_start(&want.stream, want.offset) {
            return Err(err);
        }
        let batches = match max_bytes {
            Some(max_bytes) => part
                .reader
                .read_batches(want.offset, max_bytes)
                .map_err(storage_error)?,
            None => Vec::new(),
        };
        handle.count_fetch(&batches);
        Ok(Fetched {
            batches,
            start_offset: part.start(),
            end_offset: end,
        })
    }

    /// Whole batches of a partition from the one holding `offset` on, about `max_bytes` of
    /// them (at least one when one exists; at most `max_fetch_bytes`). Waits up to `wait_ms`
    /// for records at `offset` when there are none yet.
    pub async fn fetch(
        &self,
        stream: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
        wait_ms: u64,
    ) -> Result<Fetched, BrokerError> {
        let limits = &self.inner.limits;
        if wait_ms > limits.max_wait_ms {
            return Err(BrokerError::invalid(format!(
                "wait_ms must be at most {} (max_wait_ms)",
                limits.max_wait_ms
            )));
        }
        let max_bytes = max_bytes.clamp(1, limits.max_fetch_bytes);
        let handle = self.stream(stream)?;
        let part = self.partition(&handle, partition)?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        loop {
            let notified = part.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let end = part.reader.durable_end();
            if offset > end {
                return Err(BrokerError::new(
                    ErrorCode::OffsetOutOfRange,
                    format!(
                        "offset {offset} is past the end of partition {partition} of stream '{stream}' (its records are at {}..{end})",
                        part.start()
                    ),
                ));
            }
            if let Some(err) = part.before_start(stream, offset) {
                return Err(err);
            }
            let batches = part
                .reader
                .read_batches(offset, max_bytes)
                .map_err(storage_error)?;
            if !batches.is_empty()
                || tokio::time::Instant::now() >= deadline
                || self.inner.closing.load(Ordering::SeqCst)
            {
                handle.count_fetch(&batches);
                return Ok(Fetched {
                    batches,
                    start_offset: part.start(),
                    end_offset: end,
                });
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
            if handle.deleted.load(Ordering::SeqCst) {
                return Err(BrokerError::stream_not_found(stream));
            }
        }
    }

    /// As `fetch`, decoded into records from `offset` on (for the JSON API), with the
    /// offset to fetch next.
    pub async fn fetch_records(
        &self,
        stream: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
        wait_ms: u64,
    ) -> Result<(Vec<StreamRecord>, u64, Fetched), BrokerError> {
        let fetched = self
            .fetch(stream, partition, offset, max_bytes, wait_ms)
            .await?;
        let mut records = Vec::new();
        let mut next = offset;
        for batch in &fetched.batches {
            records.extend(decode_batch(batch, offset)?);
            next = next.max(batch.base_offset + u64::from(batch.span));
        }
        Ok((records, next, fetched))
    }

    /// A partition's start offset (0 when it does not exist).
    pub(super) fn partition_start(&self, stream: &str, partition: u32) -> u64 {
        self.stream(stream)
            .ok()
            .and_then(|s| {
                s.partitions
                    .read()
                    .get(partition as usize)
                    .map(|p| p.start())
            })
            .unwrap_or(0)
    }

    /// Applies each stream's retention (maintenance): deletes the sealed segments that are
    /// too old or past the partition's byte limit, as a settle of their offsets (one
    /// journal write per partition, durable before the start moves); the files go at the
    /// checkpoint this asks for.
    pub(super) async fn apply_retention(&self) {
        let streams: Vec<Arc<StreamHandle>> = self.inner.streams.read().values().cloned().collect();
        let now = self.now_ms();
        let mut deleted = false;
        for stream in streams {
            let config = stream.config.lock().clone();
            if !config.cleanup.deletes() || (config.retention_ms < 0 && config.retention_bytes < 0)
            {
                continue;
            }
            for part in stream.partition_handles_now() {
                let start = part.start();
                // (With subscriptions: what they pin stays, within their caps.)
                let written = self.retain_partition(&part, &config, now).await;
                match written {
                    Ok(None) => {}
                    Ok(Some((new_start, bytes))) => {
                        deleted = true;
                        part.start.fetch_max(new_start, Ordering::AcqRel);
                        let c = &stream.counters;
                        c.deleted_records
                            .fetch_add(new_start - start, Ordering::Relaxed);
                        c.deleted_bytes.fetch_add(bytes, Ordering::Relaxed);
                        tracing::debug!(stream = %stream.name, partition = part.partition, start = new_start, "retention deleted segments");
                    }
                    // The stream went away meanwhile, or storage refused: next time.
                    Err(err) => {
                        tracing::debug!(stream = %stream.name, error = %err, "retention postponed")
                    }
                }
            }
        }
        if deleted {
            // The files go at a checkpoint: ask for one now rather than at the next one due
            // (30 s or a journal's worth later), so disk use follows retention.
            self.inner.store.request_checkpoint();
        }
    }

    /// Kafka's ListOffsets for one partition: `EARLIEST` (-2) gives its start offset,
    /// `LATEST` (-1) its end, any other time the first offset at or after it (`None` when
    /// every record is older).
    pub fn list_offset(
        &self,
        stream: &str,
        partition: u32,
        at: i64,
    ) -> Result<Option<u64>, BrokerError> {
        let handle = self.stream(stream)?;
        let part = self.partition(&handle, partition)?;
        match at {
            LATEST => Ok(Some(part.reader.durable_end())),
            EARLIEST => Ok(Some(part.start())),
            time if time < 0 => Err(BrokerError::invalid(format!(
                "time {time} is neither a timestamp (ms since the epoch) nor -1 (latest) or -2 (earliest)"
            ))),
            time => self.offset_for_time(stream, partition, time),
        }
    }

    /// The first offset of a partition whose record's timestamp is at least `timestamp`
    /// (Kafka's ListOffsets by time), or `None` when every record is older.
    pub fn offset_for_time(
        &self,
        stream: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<Option<u64>, BrokerError> {
        Ok(self
            .record_for_time(stream, partition, timestamp)?
            .map(|(offset, _)| offset))
    }

    /// As `offset_for_time`, with that record's timestamp (Kafka's ListOffsets answers
    /// both; -1 when it is not known: a batch that cannot be decoded here).
    pub fn record_for_time(
        &self,
        stream: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<Option<(u64, i64)>, BrokerError> {
        let handle = self.stream(stream)?;
        let part = self.partition(&handle, partition)?;
        let Some(base) = part.reader.find_time(timestamp).map_err(storage_error)? else {
            return Ok(None);
        };
        // Records below the start were deleted by retention (their segment may still be on
        // disk until the next checkpoint): the first one kept is the answer then.
        let from = base.max(part.start());
        // The batch found has a record that late; which one is in its records.
        for batch in part
            .reader
            .read_batches(from, 1)
            .map_err(storage_error)?
            .iter()
            .take(1)
        {
            if let Ok(records) = decode_batch(batch, from) {
                return Ok(records
                    .iter()
                    .find(|r| r.timestamp >= timestamp || from > base)
                    .map(|r| (r.offset, r.timestamp))
                    .or(Some((from, -1))));
            }
        }
        Ok(Some((from, -1)))
    }

    /// The first record with the largest timestamp of a partition (Kafka's ListOffsets
    /// `MAX_TIMESTAMP`), or `None` when it has none: the segment with the largest
    /// timestamp is found from the segments' own maxima, the record in it by time.
    pub fn max_timestamp_record(
        &self,
        stream: &str,
        partition: u32,
    ) -> Result<Option<(u64, i64)>, BrokerError> {
        let handle = self.stream(stream)?;
        let part = self.partition(&handle, partition)?;
        let start = part.start();
        let max = part
            .reader
            .segments()
            .iter()
            .filter(|s| s.end > start && s.end > s.base)
            .map(|s| s.max_timestamp)
            .max();
        match max {
            Some(max) if max != i64::MIN => self.record_for_time(stream, partition, max),
            _ => Ok(None),
        }
    }

    /// Whole stored batches of a partition from the one holding `from` (or the partition's
    /// start, if later) on, about `max_bytes` of them, without waiting (Kafka's share fetch
    /// answers the batches holding the records it hands out).
    pub fn read_partition_batches(
        &self,
        stream: &str,
        partition: u32,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>, BrokerError> {
        let handle = self.stream(stream)?;
        let part = self.partition(&handle, partition)?;
        part.reader
            .read_batches(
                from.max(part.start()),
                max_bytes.clamp(1, self.inner.limits.max_fetch_bytes),
            )
            .map_err(storage_error)
    }

    /// A stable id of a stream for as long as it lives (a stream deleted and made again
    /// gets another): its first partition's log uid (Kafka's topic ids are made of it).
    pub fn stream_uid(&self, name: &str) -> Result<u64, BrokerError> {
        let handle = self.stream(name)?;
        let part = self.partition(&handle, 0)?;
        Ok(part.uid)
    }
}
