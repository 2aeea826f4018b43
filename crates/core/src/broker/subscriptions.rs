//! Work-queue subscriptions on streams: create, configure, list, delete; recovery at open;
//! the stream's growth and deletion; retention over what subscriptions have not settled.
//!
//! A subscription is a `QueueHandle` named `stream/subscription` whose state has one source
//! per partition (a storage view of the partition) besides its own log (source 0), and
//! whose records come from `Records::Subscription`. Every queue entry point that takes a
//! name (receive, ack, nack, extend, purge) resolves it (`Broker::resolve`); maintenance
//! runs over subscriptions as over queues.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};
use tidewater_storage::format::RecordView;
use tidewater_storage::{AckLevel, LogReader, LogState, Op, OpResult, ReadError, Record, Store};
use tokio::sync::Notify;

use super::streams::{PartitionHandle, StreamHandle};
use super::{Broker, QueueHandle};
use crate::config::QueueConfig;
use crate::error::{BrokerError, ErrorCode};
use crate::queue::{Positioned, QueueState, QueueStats, RecordSource, position};
use crate::stream::config::StreamConfig;
use crate::stream::retention::{Pin, PinnedPlan, plan_pinned};
use crate::stream::source::KafkaSource;
use crate::stream::subscription::{
    OnRetention, SubscriptionConfig, SubscriptionLog, SubscriptionPatch, SubscriptionRetention,
    SubscriptionStart, check_subscription_patch, local_log_name, parse_subscription_log_name,
    split_subscription_path, subscription_defaults, subscription_path, validate_subscription_name,
    view_log_name,
};

/// The error a record dead-lettered by retention carries in its history.
const RETENTION_ERROR: &str =
    "retention: the stream deleted it past the subscription's pin_max_ms/pin_max_bytes";

/// Where a queue handle's records come from.
pub(crate) enum Records {
    /// A queue: its log.
    Log(LogReader),
    /// A subscription: its own log (source 0) and the stream's partitions (source p + 1).
    Subscription {
        local: LogReader,
        parts: RwLock<Arc<Vec<KafkaSource>>>,
    },
}

impl Records {
    /// The handle's own log (a queue's; a subscription's local log).
    pub(crate) fn log(&self) -> &LogReader {
        match self {
            Records::Log(reader) => reader,
            Records::Subscription { local, .. } => local,
        }
    }

    fn positioned<T>(&self, f: impl FnOnce(&dyn RecordSource) -> T) -> T {
        match self {
            Records::Log(reader) => f(reader),
            Records::Subscription { local, parts } => {
                let parts = parts.read().clone();
                let mut sources: Vec<&dyn RecordSource> = Vec::with_capacity(parts.len() + 1);
                sources.push(local);
                sources.extend(parts.iter().map(|p| p as &dyn RecordSource));
                f(&Positioned { sources })
            }
        }
    }
}

impl RecordSource for Records {
    fn read(
        &self,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, ReadError> {
        self.positioned(|s| s.read(from, max_count, max_bytes))
    }

    fn read_where(
        &self,
        from: u64,
        end: u64,
        want: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Record>, ReadError> {
        self.positioned(|s| s.read_where(from, end, want))
    }

    fn scan(
        &self,
        from: u64,
        max_count: usize,
        visit: &mut dyn FnMut(&RecordView<'_>) -> bool,
    ) -> Result<(), ReadError> {
        self.positioned(|s| s.scan(from, max_count, visit))
    }
}

/// A subscription as shown.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SubscriptionInfo {
    pub stream: String,
    pub name: String,
    /// Its configuration (`SubscriptionConfig::shown`).
    pub config: serde_json::Value,
    pub stats: QueueStats,
    /// Messages dropped unsettled because retention deleted their records.
    pub retention_expired: u64,
    pub partitions: Vec<SubscriptionPartition>,
}

/// A subscription's place in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SubscriptionPartition {
    pub partition: u32,
    /// Every offset below is settled (delivered and acked, dead-lettered, expired).
    pub floor: u64,
    /// The partition's durable end.
    pub end: u64,
    /// Offsets from the floor to the end not settled yet (a compacted partition's holes
    /// count until the subscription passes them).
    pub pending: u64,
}

/// The subscription's link to its stream.
pub(crate) struct SubscriptionOf {
    pub(crate) stream: String,
    pub(crate) sub: String,
    /// How it holds back the stream's retention.
    pub(crate) retention: Mutex<SubscriptionRetention>,
    /// Its configuration acts when a record arrives (supersede, coalesce): read on every
    /// produce, so without taking its state's lock.
    pub(crate) on_arrival: AtomicBool,
}

/// Whether a configuration acts when a record arrives.
fn acts_on_arrival(config: &QueueConfig) -> bool {
    config.supersede || config.coalesce.is_some()
}

fn kafka_sources(parts: &[Arc<PartitionHandle>]) -> Vec<KafkaSource> {
    parts
        .iter()
        .map(|p| KafkaSource::new(p.reader.clone(), p.partition).with_cache(p.cache.clone()))
        .collect()
}

/// A subscription's handle over its recovered or new logs: `local` (source 0) and one view
/// per partition, in partition order.
fn subscription_handle(
    stream: &StreamHandle,
    sub: &str,
    local: &LogState,
    views: &[LogState],
    config: SubscriptionConfig,
    store: &Store,
    now_ms: i64,
) -> Result<Arc<QueueHandle>, String> {
    let SubscriptionConfig {
        queue: config,
        retention,
    } = config;
    let on_arrival = acts_on_arrival(&config);
    let parts = stream.partition_handles_now();
    let local_reader = store
        .reader(local.uid)
        .ok_or_else(|| format!("subscription log {} has no reader", local.uid))?;
    let records = Records::Subscription {
        local: local_reader,
        parts: RwLock::new(Arc::new(kafka_sources(&parts))),
    };
    let name = subscription_path(&stream.name, sub);
    let mut logs: Vec<&LogState> = vec![local];
    logs.extend(views.iter());
    let state = QueueState::recover_sources(&name, &logs, views.len(), config, &records, now_ms)
        .map_err(|e| format!("subscription '{name}': {e}"))?;
    Ok(Arc::new(QueueHandle {
        uid: local.uid,
        name,
        state: Mutex::new(state),
        notify: Notify::new(),
        reader: records,
        deleted: AtomicBool::new(false),
        consumers: Mutex::new(crate::forecast::Seen::default()),
        delay: Mutex::new(None),
        subscription: Some(SubscriptionOf {
            stream: stream.name.clone(),
            sub: sub.to_string(),
            retention: Mutex::new(retention),
            on_arrival: AtomicBool::new(on_arrival),
        }),
    }))
}

/// Subscriptions recovered at open, with the views a crash kept from being made (a stream
/// grew and the broker stopped before its subscriptions' views were written): made here,
/// at the partition's start.
pub(crate) fn recover_subscriptions(
    store: &Store,
    streams: &std::collections::HashMap<String, Arc<StreamHandle>>,
    logs: Vec<LogState>,
    now_ms: i64,
) -> Result<Vec<Arc<QueueHandle>>, String> {
    // (stream, sub) -> (local log, views by partition)
    type Logs = (Option<LogState>, BTreeMap<u32, LogState>);
    let mut by_sub: BTreeMap<(String, String), Logs> = BTreeMap::new();
    let mut orphans = Vec::new();
    for log in logs {
        match parse_subscription_log_name(&log.name) {
            Some(SubscriptionLog::Local { stream, sub }) => {
                let key = (stream.to_string(), sub.to_string());
                by_sub.entry(key).or_default().0 = Some(log);
            }
            Some(SubscriptionLog::View {
                stream,
                sub,
                partition,
            }) => {
                let key = (stream.to_string(), sub.to_string());
                by_sub.entry(key).or_default().1.insert(partition, log);
            }
            None => orphans.push(log.uid),
        }
    }
    let mut out = Vec::new();
    for ((stream_name, sub), (local, mut views)) in by_sub {
        let (Some(local), Some(stream)) = (local, streams.get(&stream_name)) else {
            // Its stream (or its own log) is gone: a delete that a crash cut short cannot
            // happen (one write), so this is a leftover of corruption; drop the views.
            tracing::warn!(stream = %stream_name, subscription = %sub, "removing the logs of a subscription whose stream or own log is missing");
            orphans.extend(views.values().map(|v| v.uid));
            continue;
        };
        let parts = stream.partition_handles_now();
        let missing: Vec<&Arc<PartitionHandle>> = parts
            .iter()
            .filter(|p| !views.contains_key(&p.partition))
            .collect();
        if !missing.is_empty() {
            let ops = missing
                .iter()
                .map(|p| Op::CreateView {
                    name: view_log_name(&stream_name, &sub, p.partition),
                    source: p.uid,
                    floor: p.start(),
                })
                .collect();
            let results = store
                .submit_wait(ops, AckLevel::Durable)
                .map_err(|e| format!("creating the missing views of '{stream_name}/{sub}': {e}"))?;
            for (p, result) in missing.iter().zip(results) {
                let OpResult::Created { uid } = result else {
                    return Err("storage did not return a new view".into());
                };
                let mut view = LogState::new(
                    uid,
                    view_log_name(&stream_name, &sub, p.partition),
                    String::new(),
                );
                view.source = Some(p.uid);
                view.ack_floor = p.start();
                view.next_offset = p.reader.durable_end().max(p.start());
                views.insert(p.partition, view);
            }
        }
        let views: Vec<LogState> = parts
            .iter()
            .map(|p| {
                views
                    .remove(&p.partition)
                    .expect("every partition has its view now")
            })
            .collect();
        let config: SubscriptionConfig = serde_json::from_str(&local.config).map_err(|e| {
            format!(
                "subscription '{stream_name}/{sub}': its stored configuration is unreadable: {e}"
            )
        })?;
        let handle = subscription_handle(stream, &sub, &local, &views, config, store, now_ms)?;
        for (part, _) in parts.iter().zip(&views) {
            part.subscribers.write().push(handle.clone());
        }
        stream
            .subscriptions
            .write()
            .insert(sub.clone(), handle.clone());
        out.push(handle);
    }
    if !orphans.is_empty() {
        let ops = orphans
            .into_iter()
            .map(|uid| Op::DeleteLog { uid })
            .collect();
        store.submit(ops, AckLevel::Written, Box::new(|_| {}));
    }
    Ok(out)
}

impl Broker {
    /// The handle of a queue (`name`) or of a subscription (`stream/subscription`): what
    /// receive, ack, nack, extend and purge act on.
    pub(super) fn resolve(&self, name: &str) -> Result<Arc<QueueHandle>, BrokerError> {
        let Some((stream, sub)) = split_subscription_path(name) else {
            return self.queue(name);
        };
        let stream = self.stream(stream)?;
        stream
            .subscriptions
            .read()
            .get(sub)
            .cloned()
            .ok_or_else(|| BrokerError::subscription_not_found(&stream.name, sub))
    }

    /// Whether `name` names a queue or a subscription that can be received from (the
    /// binary protocol's Subscribe checks this before it confirms).
    pub fn check_receivable(&self, name: &str) -> Result<(), BrokerError> {
        self.resolve(name).map(|_| ())
    }

    fn subscription(&self, stream: &str, sub: &str) -> Result<Arc<QueueHandle>, BrokerError> {
        let stream = self.stream(stream)?;
        stream
            .subscriptions
            .read()
            .get(sub)
            .cloned()
            .ok_or_else(|| BrokerError::subscription_not_found(&stream.name, sub))
    }

    /// Every subscription's handle (maintenance, metrics).
    pub(super) fn subscription_handles(&self) -> Vec<Arc<QueueHandle>> {
        let streams: Vec<_> = self.inner.streams.read().values().cloned().collect();
        streams
            .iter()
            .flat_map(|s| s.subscriptions.read().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Creates a subscription on a stream, or changes its configuration. Returns whether
    /// it was created. A create writes its own log and a view of every partition in one
    /// journal write; `start` applies to a create only (a different one on an existing
    /// subscription is a conflict: delete and make it again to start elsewhere).
    pub async fn put_subscription(
        &self,
        stream_name: &str,
        sub: &str,
        patch: &SubscriptionPatch,
    ) -> Result<(bool, SubscriptionInfo), BrokerError> {
        validate_subscription_name(stream_name, sub)?;
        check_subscription_patch(&patch.config)?;
        let limits = &self.inner.limits;
        let _admin = self.inner.admin.lock().await;
        let stream = self.stream(stream_name)?;
        let path = subscription_path(stream_name, sub);
        if let Ok(handle) = self.subscription(stream_name, sub) {
            if patch
                .start
                .is_some_and(|s| s != SubscriptionStart::Earliest)
            {
                return Err(BrokerError::new(
                    ErrorCode::ConfigConflict,
                    format!(
                        "subscription '{path}' exists and keeps its place: start applies when it is created (delete it and create it again to start elsewhere)"
                    ),
                ));
            }
            let of = handle.subscription.as_ref().expect("a subscription");
            let current = SubscriptionConfig {
                queue: handle.state.lock().config.clone(),
                retention: *of.retention.lock(),
            };
            let next = SubscriptionConfig {
                queue: current.queue.apply(&patch.config),
                retention: patch.retention.apply(&current.retention),
            };
            next.queue.validate(&path, limits)?;
            next.retention.validate(&next.queue)?;
            if next != current {
                let config = serde_json::to_string(&next).expect("config serializes");
                self.write(
                    vec![Op::UpdateConfig {
                        uid: handle.uid,
                        config,
                    }],
                    AckLevel::Durable,
                )
                .await?;
                *of.retention.lock() = next.retention;
                of.on_arrival
                    .store(acts_on_arrival(&next.queue), Ordering::Relaxed);
                handle.state.lock().set_config(next.queue);
                handle.notify.notify_waiters();
            }
            return Ok((false, self.subscription_info(&handle)));
        }
        let count: usize = self
            .inner
            .streams
            .read()
            .values()
            .map(|s| s.subscriptions.read().len())
            .sum();
        if count >= limits.max_subscriptions {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the broker holds its maximum of {} subscriptions (max_subscriptions)",
                    limits.max_subscriptions
                ),
            ));
        }
        if stream.subscriptions.read().len() >= limits.max_stream_subscriptions {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "stream '{stream_name}' has its maximum of {} subscriptions (max_stream_subscriptions)",
                    limits.max_stream_subscriptions
                ),
            ));
        }
        let config = SubscriptionConfig {
            queue: subscription_defaults(stream_name, sub, limits).apply(&patch.config),
            retention: patch.retention.apply(&SubscriptionRetention::default()),
        };
        config.queue.validate(&path, limits)?;
        config.retention.validate(&config.queue)?;
        let parts = stream.partition_handles_now();
        let start = patch.start.unwrap_or_default();
        let mut floors = Vec::with_capacity(parts.len());
        for part in &parts {
            let end = part.reader.durable_end();
            floors.push(match start {
                SubscriptionStart::Earliest => part.start(),
                SubscriptionStart::Latest => end,
                SubscriptionStart::Time { time } => self
                    .offset_for_time(stream_name, part.partition, time)?
                    .unwrap_or(end),
            });
        }
        let json = serde_json::to_string(&config).expect("config serializes");
        let mut ops = vec![Op::CreateLog {
            name: local_log_name(stream_name, sub),
            config: json,
            id_window: None,
        }];
        for (part, &floor) in parts.iter().zip(&floors) {
            ops.push(Op::CreateView {
                name: view_log_name(stream_name, sub, part.partition),
                source: part.uid,
                floor,
            });
        }
        let results = self.write(ops, AckLevel::Durable).await?;
        let uids: Vec<u64> = results
            .iter()
            .filter_map(|r| match r {
                OpResult::Created { uid } => Some(*uid),
                _ => None,
            })
            .collect();
        if uids.len() != parts.len() + 1 {
            return Err(BrokerError::new(
                ErrorCode::Internal,
                "storage did not return the subscription's logs",
            ));
        }
        let local = LogState::new(uids[0], local_log_name(stream_name, sub), String::new());
        let views: Vec<LogState> = parts
            .iter()
            .zip(&floors)
            .zip(&uids[1..])
            .map(|((part, &floor), &uid)| {
                let mut view = LogState::new(
                    uid,
                    view_log_name(stream_name, sub, part.partition),
                    String::new(),
                );
                view.source = Some(part.uid);
                // As storage made it: within the partition's start and end.
                let end = part.reader.durable_end();
                view.ack_floor = floor.clamp(part.start().min(end), end);
                view.next_offset = end;
                view
            })
            .collect();
        let handle = subscription_handle(
            &stream,
            sub,
            &local,
            &views,
            config,
            &self.inner.store,
            self.now_ms(),
        )
        .map_err(|e| BrokerError::new(ErrorCode::Internal, e))?;
        handle
            .state
            .lock()
            .set_nonce_source(self.inner.nonces.clone());
        for part in &parts {
            part.subscribers.write().push(handle.clone());
        }
        stream
            .subscriptions
            .write()
            .insert(sub.to_string(), handle.clone());
        self.inner.by_uid.write().insert(handle.uid, handle.clone());
        Ok((true, self.subscription_info(&handle)))
    }

    pub fn get_subscription(
        &self,
        stream: &str,
        sub: &str,
    ) -> Result<SubscriptionInfo, BrokerError> {
        let handle = self.subscription(stream, sub)?;
        Ok(self.subscription_info(&handle))
    }

    /// Subscriptions of one stream (or of all), by stream then name.
    pub fn list_subscriptions(
        &self,
        stream: Option<&str>,
    ) -> Result<Vec<SubscriptionInfo>, BrokerError> {
        let handles: Vec<Arc<QueueHandle>> = match stream {
            Some(name) => self
                .stream(name)?
                .subscriptions
                .read()
                .values()
                .cloned()
                .collect(),
            None => self.subscription_handles(),
        };
        let mut out: Vec<SubscriptionInfo> =
            handles.iter().map(|h| self.subscription_info(h)).collect();
        out.sort_by(|a, b| (&a.stream, &a.name).cmp(&(&b.stream, &b.name)));
        Ok(out)
    }

    /// Deletes a subscription: its own log and views, in one journal write (the stream and
    /// every other reader of it are untouched). Leased messages' receipts go invalid.
    pub async fn delete_subscription(
        &self,
        stream_name: &str,
        sub: &str,
    ) -> Result<(), BrokerError> {
        let _admin = self.inner.admin.lock().await;
        let stream = self.stream(stream_name)?;
        let handle = self.subscription(stream_name, sub)?;
        let ops = subscription_delete_ops(&handle);
        self.write(ops, AckLevel::Durable).await?;
        self.forget_subscription(&stream, &handle);
        Ok(())
    }

    /// Takes a deleted subscription out of every map and wakes its long-polls.
    pub(super) fn forget_subscription(&self, stream: &StreamHandle, handle: &Arc<QueueHandle>) {
        if let Some(of) = &handle.subscription {
            stream.subscriptions.write().remove(&of.sub);
        }
        for part in stream.partition_handles_now() {
            part.subscribers.write().retain(|h| !Arc::ptr_eq(h, handle));
        }
        self.inner.by_uid.write().remove(&handle.uid);
        handle.deleted.store(true, Ordering::SeqCst);
        handle.notify.notify_waiters();
        self.inner.observer.queue_deleted(&handle.name);
    }

    /// A stream grew: each subscription gets a view of each new partition (at its start:
    /// everything produced to it), in one journal write; then reads them.
    pub(super) async fn grow_subscriptions(
        &self,
        stream: &StreamHandle,
        new: &[Arc<PartitionHandle>],
    ) -> Result<(), BrokerError> {
        let subs: Vec<Arc<QueueHandle>> = stream.subscriptions.read().values().cloned().collect();
        if subs.is_empty() || new.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::new();
        for handle in &subs {
            let sub = &handle.subscription.as_ref().expect("a subscription").sub;
            for part in new {
                ops.push(Op::CreateView {
                    name: view_log_name(&stream.name, sub, part.partition),
                    source: part.uid,
                    floor: 0,
                });
            }
        }
        // (Should this fail, the next open makes the missing views.)
        let results = self.write(ops, AckLevel::Durable).await?;
        let mut uids = results.iter().filter_map(|r| match r {
            OpResult::Created { uid } => Some(*uid),
            _ => None,
        });
        let sources = kafka_sources(&stream.partition_handles_now());
        for handle in &subs {
            let mut state = handle.state.lock();
            for part in new {
                let Some(uid) = uids.next() else { break };
                let index = state.add_source(uid);
                state.set_source_holes(index);
                state.set_source_end(index, part.reader.durable_end());
                part.subscribers.write().push(handle.clone());
            }
            if let super::Records::Subscription { parts, .. } = &handle.reader {
                *parts.write() = Arc::new(sources.clone());
            }
            drop(state);
            handle.notify.notify_waiters();
        }
        Ok(())
    }

    pub(super) fn subscription_info(&self, handle: &QueueHandle) -> SubscriptionInfo {
        let of = handle.subscription.as_ref().expect("a subscription");
        let forecast = self.forecast_of(handle);
        let mut state = handle.state.lock();
        state.refresh_oldest(&handle.reader);
        let partitions: Vec<SubscriptionPartition> = (1..state.source_count())
            .map(|index| {
                let (floor, end) = state.source_range(index);
                SubscriptionPartition {
                    partition: (index - 1) as u32,
                    floor,
                    end,
                    pending: state.source_unsettled(index),
                }
            })
            .collect();
        let mut stats = state.stats(self.now_ms());
        stats.forecast = Some(forecast);
        drop(state);
        // Bytes: its own log's backlog, and the partitions' segments from its floor on
        // (whole segments: at most one segment per partition more than it holds).
        if let Ok(stream) = self.stream(&of.stream) {
            for (part, p) in stream.partition_handles_now().iter().zip(&partitions) {
                let floor = p.floor;
                stats.bytes += part
                    .reader
                    .segments()
                    .iter()
                    .filter(|s| s.end > floor)
                    .map(|s| s.bytes)
                    .sum::<u64>();
            }
        }
        let state = handle.state.lock();
        SubscriptionInfo {
            stream: of.stream.clone(),
            name: of.sub.clone(),
            config: SubscriptionConfig {
                queue: state.config.clone(),
                retention: *of.retention.lock(),
            }
            .shown(),
            stats,
            retention_expired: state.counters.retention_expired,
            partitions,
        }
    }

    /// The partition's subscriptions, their pins, and retention's plan with them.
    #[allow(clippy::type_complexity)]
    fn pinned_plan(
        part: &PartitionHandle,
        config: &StreamConfig,
        now: i64,
    ) -> Option<(Vec<Arc<QueueHandle>>, Vec<(Pin, OnRetention)>, PinnedPlan)> {
        let start = part.start();
        let segments = part.reader.segments();
        let subs: Vec<Arc<QueueHandle>> = part.subscribers.read().clone();
        let index = part.partition as usize + 1;
        let pins: Vec<(Pin, OnRetention)> = subs
            .iter()
            .map(|h| {
                let retention = *h
                    .subscription
                    .as_ref()
                    .expect("a subscription")
                    .retention
                    .lock();
                let (max_bytes, max_age_ms) =
                    retention.caps(config.retention_ms, config.retention_bytes);
                let floor = h.state.lock().source_range(index).0;
                (
                    Pin {
                        floor,
                        max_bytes,
                        max_age_ms,
                    },
                    retention.on_retention,
                )
            })
            .collect();
        let plain: Vec<Pin> = pins.iter().map(|(p, _)| *p).collect();
        let plan = plan_pinned(&segments, start, config, now, &plain)?;
        Some((subs, pins, plan))
    }

    /// Retention on a partition with subscriptions (maintenance): what it would delete
    /// (`plan_retention`) goes, but not past a subscription's floor while it is within its
    /// caps (`plan_pinned`). A subscription over its caps lets go of its oldest records:
    /// `drop` settles them in the same write as the partition's (counted as
    /// `retention_expired`); `dead_letter` moves them to its dead-letter queue first, a
    /// bounded step per tick, and retention waits for its floor. Every view of the deleted
    /// range is settled with the partition, so a view never keeps offsets its partition let
    /// go (recovery refuses that as missing data). Returns (new start, bytes deleted) when
    /// the partition's start moved.
    pub(super) async fn retain_partition(
        &self,
        part: &PartitionHandle,
        config: &StreamConfig,
        now: i64,
    ) -> Result<Option<(u64, u64)>, BrokerError> {
        // Dead-letter moves first, outside the admin lock (a move may create the
        // dead-letter queue, which takes it).
        if let Some((subs, pins, plan)) = Self::pinned_plan(part, config, now) {
            for &(i, to) in &plan.releases {
                let (pin, on_retention) = pins[i];
                if on_retention == OnRetention::DeadLetter {
                    let index = part.partition as usize + 1;
                    self.dead_letter_released(&subs[i], index, pin.floor..to)
                        .await;
                }
            }
        }
        // Then the plan again, under the admin lock: the partition's subscriptions cannot
        // change until the write lands (a subscription made meanwhile would have a view
        // this write does not settle, which recovery refuses).
        let _admin = self.inner.admin.lock().await;
        let start = part.start();
        let segments = part.reader.segments();
        let index = part.partition as usize + 1;
        let Some((subs, pins, plan)) = Self::pinned_plan(part, config, now) else {
            return Ok(None);
        };
        let mut new_start = plan.new_start;
        // (sub index, released to) of those that drop now.
        let mut drops: Vec<(usize, u64)> = Vec::new();
        for &(i, to) in &plan.releases {
            let (pin, on_retention) = pins[i];
            match on_retention {
                OnRetention::Drop => drops.push((i, to)),
                OnRetention::DeadLetter => {
                    // Retention waits at its floor while its records move (above).
                    new_start = new_start.min(segment_end_at_or_below(&segments, start, pin.floor));
                }
            }
        }
        if new_start < plan.new_start {
            // A dead-letter move holds retention back: the others drop only as far as it
            // goes now (records still stored free no disk).
            for drop in &mut drops {
                drop.1 = drop.1.min(new_start);
            }
            drops.retain(|&(i, to)| to > pins[i].0.floor);
        }
        if new_start <= start && drops.is_empty() {
            return Ok(None);
        }
        let mut ops: Vec<Op> = Vec::new();
        // (sub index, settled to)
        let mut settled: Vec<(usize, u64)> = Vec::new();
        for (i, handle) in subs.iter().enumerate() {
            let dropped_to = drops.iter().find(|d| d.0 == i).map(|d| d.1);
            let to = dropped_to.unwrap_or(0).max(new_start);
            if to > start {
                let uid = handle.state.lock().source_uid(index);
                ops.push(Op::Settle {
                    uid,
                    ranges: vec![start..to],
                });
                settled.push((i, to));
            }
        }
        if new_start > start {
            ops.push(Op::Settle {
                uid: part.uid,
                ranges: vec![start..new_start],
            });
        }
        self.write(ops, AckLevel::Durable).await?;
        for (i, to) in settled {
            let mut state = subs[i].state.lock();
            let removed = state.expire_range(position(index, start)..position(index, to));
            state.counters.retention_expired += removed;
            drop(state);
            if removed > 0 {
                tracing::info!(subscription = %subs[i].name, partition = part.partition, messages = removed, "retention deleted records the subscription had not settled (past its pin_max_ms/pin_max_bytes, or they were never pinned)");
            }
        }
        if new_start <= start {
            return Ok(None);
        }
        let bytes = segments
            .iter()
            .filter(|s| s.end > start && s.end <= new_start)
            .map(|s| s.bytes)
            .sum();
        Ok(Some((new_start, bytes)))
    }

    /// A subscription with `on_retention: dead_letter` over its caps: its unsettled, unleased
    /// records of `range` (offsets) go to its dead-letter queue, at most 1,000 a tick, counted
    /// as `retention_expired` too. Leased ones wait for their ack or their lease's end.
    async fn dead_letter_released(
        &self,
        handle: &Arc<QueueHandle>,
        index: usize,
        range: std::ops::Range<u64>,
    ) {
        let items = {
            let mut state = handle.state.lock();
            let from = position(index, range.start);
            let end = position(index, range.end);
            let mut wanted = state.pending_offsets(from, 1_000);
            wanted.retain(|&p| p < end);
            let claimed = state.claim(&wanted);
            let now = self.now_ms();
            claimed
                .into_iter()
                .map(|offset| {
                    // Why it is in the dead-letter queue, in its history.
                    state.record_attempt(offset, 0, Some((now, RETENTION_ERROR.to_string())));
                    crate::queue::Unacked {
                        offset,
                        delivery_count: state.history(offset).map_or(0, |h| h.delivery_count),
                        size: 0,
                    }
                })
                .collect::<Vec<_>>()
        };
        if items.is_empty() {
            return;
        }
        let n = items.len() as u64;
        tracing::info!(subscription = %handle.name, messages = n, "retention: moving records the subscription held past its caps to its dead-letter queue");
        let settling = super::guard::Settling::marked(handle, items, &self.inner.clock);
        match self.try_dead_letter(handle, settling).await {
            // Counted once moved (a failed move is tried again at the next tick).
            Ok(()) => handle.state.lock().counters.retention_expired += n,
            Err(err) => {
                tracing::warn!(subscription = %handle.name, error = %err, "retention: moving records to the dead-letter queue failed; retention waits and tries again")
            }
        }
    }
}

/// The end of the last segment of `segments` (from `start` on) ending at or below `limit`,
/// else `start`.
fn segment_end_at_or_below(
    segments: &[tidewater_storage::SegmentInfo],
    start: u64,
    limit: u64,
) -> u64 {
    segments
        .iter()
        .map(|s| s.end)
        .filter(|&end| end > start && end <= limit)
        .max()
        .unwrap_or(start)
}

/// The keyed records of a Kafka batch as produced (base offset 0): (offset in the batch,
/// key, bytes), as supersede and coalesce take them.
fn keyed_records(kafka: &[u8]) -> Vec<(u32, Vec<u8>, u64)> {
    use tidewater_storage::format::kafka::{batch_records, check_kafka_batch};
    let Ok(header) = check_kafka_batch(kafka) else {
        return Vec::new();
    };
    batch_records(kafka, &header, 0, 0)
        .filter_map(Result::ok)
        .filter_map(|r| {
            let key = r.record.key?;
            let headers: usize = r
                .record
                .headers()
                .filter_map(Result::ok)
                .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len))
                .sum();
            let size = key.len() + r.record.value.map_or(0, <[u8]>::len) + headers;
            Some((u32::try_from(r.offset).ok()?, key.to_vec(), size as u64))
        })
        .collect()
}

/// One batch of an append for arrival hooks: its op index, the subscriptions, the
/// partition's source index in them, its keyed records (offset in batch, key, bytes).
type ArrivingBatch = (
    usize,
    Vec<Arc<QueueHandle>>,
    usize,
    Vec<(u32, Vec<u8>, u64)>,
);

/// What arriving records do to the subscriptions that act when a record arrives (supersede
/// cancels a key's older pending records, coalesce holds records in their key's window):
/// prepared before an append (keys read from the batches, only when such a subscription
/// exists), applied when it lands, on the storage thread, whether or not the producer
/// still waits (as a queue's publish).
pub(super) struct ArrivalHooks {
    /// Per batch of the append (by its index among the ops): the subscriptions, the
    /// partition's source index in them, the batch's keyed records.
    batches: Vec<ArrivingBatch>,
    clock: Arc<dyn crate::clock::Clock>,
}

impl ArrivalHooks {
    /// The append landed: `bases[i]` is the base offset of op `i`.
    pub(super) fn landed(&self, bases: &[Option<u64>]) {
        let now = self.clock.now_ms();
        for (op, handles, index, keyed) in &self.batches {
            let Some(Some(base)) = bases.get(*op) else {
                continue;
            };
            let at = position(*index, *base);
            for handle in handles {
                let mut state = handle.state.lock();
                state.supersede(at, keyed);
                state.coalesce(at, keyed, now);
            }
        }
    }

    /// The subscriptions it touched (their superseded records are settled next).
    pub(super) fn handles(&self) -> Vec<Arc<QueueHandle>> {
        let mut out: Vec<Arc<QueueHandle>> = Vec::new();
        for (_, handles, _, _) in &self.batches {
            for h in handles {
                if !out.iter().any(|o| Arc::ptr_eq(o, h)) {
                    out.push(h.clone());
                }
            }
        }
        out
    }
}

impl Broker {
    /// Hooks for an append of `batches` (each a partition and its Kafka batch, in op
    /// order); `None` when no subscription of those partitions acts on arrival.
    pub(super) fn arrival_hooks(
        &self,
        batches: &[(&PartitionHandle, &[u8])],
    ) -> Option<ArrivalHooks> {
        let mut out = Vec::new();
        for (op, (part, kafka)) in batches.iter().enumerate() {
            let handles: Vec<Arc<QueueHandle>> = part
                .subscribers
                .read()
                .iter()
                .filter(|h| {
                    h.subscription
                        .as_ref()
                        .is_some_and(|of| of.on_arrival.load(Ordering::Relaxed))
                })
                .cloned()
                .collect();
            if handles.is_empty() {
                continue;
            }
            let keyed = keyed_records(kafka);
            if !keyed.is_empty() {
                out.push((op, handles, part.partition as usize + 1, keyed));
            }
        }
        (!out.is_empty()).then(|| ArrivalHooks {
            batches: out,
            clock: self.inner.clock.clone(),
        })
    }

    /// After arrival hooks ran: settle what supersede cancelled (maintenance would too).
    pub(super) async fn settle_superseded(&self, handles: Vec<Arc<QueueHandle>>) {
        for handle in handles {
            let replaced = handle.state.lock().take_cancelled();
            let replaced = super::guard::Settling::marked(&handle, replaced, &self.inner.clock);
            self.drop_superseded(&handle, replaced).await;
        }
    }
}

/// The ops that delete a subscription's logs: its views, then its own log.
pub(super) fn subscription_delete_ops(handle: &QueueHandle) -> Vec<Op> {
    let state = handle.state.lock();
    let mut ops: Vec<Op> = (1..state.source_count())
        .map(|index| Op::DeleteLog {
            uid: state.source_uid(index),
        })
        .collect();
    ops.push(Op::DeleteLog { uid: handle.uid });
    ops
}
