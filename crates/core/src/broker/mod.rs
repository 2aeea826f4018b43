//! The broker: named queues over one store. Async (tokio) but free of HTTP: the server and
//! tests drive it through these methods. It performs what the sans-IO code decides
//! (`crate::plan`, `crate::queue`): the writes to make, then the accounting when they land.
//!
//! `registry` (create, configure, delete, list), `publish` (admission and appends),
//! `delivery` (receive, ack, nack, extend, purge, peek), `dead_letter` (retries and moves to
//! the dead-letter queue), `redrive`, `delay_log` (long delays apart from the main log),
//! `maintenance` (lease expiry, timers, time to live, coalescing windows).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use tidewater_storage::{AckLevel, Op, OpResult, Store, StoreOptions};
use tokio::sync::Notify;

use crate::clock::{Clock, Jitter, NonceSource, OsNonces, RandomJitter, SystemClock};
use crate::config::{Limits, QueueConfig};
use crate::error::{BrokerError, ErrorCode};
use crate::plan::message::check_lease_ms;
use crate::queue::{QueueState, SCAN_BYTES};
use delay_log::{DELAY_LOG_PREFIX, DelayLog};
use redrive::RedriveTask;
use registry::id_window_op;

mod auth;
mod catalog;
mod classic;
mod compaction;
mod consumers;
mod dead_letter;
mod delay_log;
mod delivery;
mod forecasts;
mod groups;
mod guard;
mod hooks;
mod maintenance;
mod publish;
mod pushes;
mod redrive;
mod registry;
mod streams;
mod subscriptions;

pub use crate::plan::dead_letter::{
    HEADER_DEAD_LETTERED_AT, HEADER_DELIVERY_COUNT, HEADER_ERRORS, HEADER_LAST_ERROR,
    HEADER_PUBLISHED_AT, HEADER_SOURCE_QUEUE,
};
pub use crate::plan::message::{Delay, NewMessage, header, hex, record_id};
pub use auth::NewKey;
pub use classic::{ClassicInfo, ClassicMemberInfo, ClassicRefusal};
pub use consumers::{MemberRecord, StartAt};
pub use delivery::{
    ANONYMOUS_CONSUMER, Busiest, KeyBusy, MAX_BUSIEST, NackReason, Peeked, ReceiptFailure,
    SettleReply,
};
pub use forecasts::{ForecastOptions, Subject};
pub use groups::{
    Committed, GroupInfo, GroupKind, GroupLag, MAX_MEMBER_STREAMS, MemberInfo, OffsetReset,
    PartitionLag, ResetTo, TopicPartitionInfo,
};
pub use hooks::{HookInfo, Ingested};
pub use publish::Published;
pub use pushes::{PushHandle, PushInfo};
pub use redrive::{RedriveProgress, RedriveRequest};
pub use registry::QueueInfo;
pub use streams::{
    Appended, EARLIEST, FetchWant, Fetched, LATEST, PartitionInfo, Produced, StreamCounters,
    StreamInfo,
};
pub(crate) use subscriptions::Records;
pub use subscriptions::{SubscriptionInfo, SubscriptionPartition};

/// Receives latency observations (the server turns them into histograms).
pub trait Observer: Send + Sync {
    fn publish_latency(&self, _queue: &str, _seconds: f64) {}
    fn publish_to_ack(&self, _queue: &str, _seconds: &[f64]) {}
    /// The queue is gone: forget what is kept per queue (its metric series).
    fn queue_deleted(&self, _queue: &str) {}
    /// Time from a webhook's arrival to its event being durable.
    fn hook_latency(&self, _hook: &str, _seconds: f64) {}
    /// The hook is gone: forget its series.
    fn hook_deleted(&self, _hook: &str) {}
}

pub struct NoopObserver;
impl Observer for NoopObserver {}

pub struct BrokerOptions {
    pub limits: Limits,
    pub store: StoreOptions,
    pub clock: Arc<dyn Clock>,
    pub jitter: Arc<dyn Jitter>,
    pub observer: Arc<dyn Observer>,
    /// Lease nonces: receipts are capabilities, so a CSPRNG by default (`OsNonces`).
    pub nonces: Arc<dyn NonceSource>,
    /// Sampling for the backlog forecasts.
    pub forecast: ForecastOptions,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            limits: Limits::default(),
            store: StoreOptions::default(),
            clock: Arc::new(SystemClock),
            jitter: Arc::new(RandomJitter),
            observer: Arc::new(NoopObserver),
            nonces: Arc::new(OsNonces),
            forecast: ForecastOptions::default(),
        }
    }
}

/// A queue, or a subscription on a stream (`subscription` set): a delivery state, its
/// records and the long-polls waiting on it.
pub struct QueueHandle {
    /// Its own log (a queue's; a subscription's local log).
    pub uid: u64,
    /// The queue's name, or `stream/subscription`.
    pub name: String,
    state: Mutex<QueueState>,
    notify: Notify,
    reader: Records,
    deleted: AtomicBool,
    /// The queue's delay log, where long delays wait apart from the main log.
    delay: Mutex<Option<DelayLog>>,
    /// Set for a subscription.
    subscription: Option<subscriptions::SubscriptionOf>,
    /// Its consumers seen lately (the forecast's consumer count).
    consumers: Mutex<crate::forecast::Seen>,
}

struct Inner {
    store: Store,
    queues: RwLock<HashMap<String, Arc<QueueHandle>>>,
    by_uid: RwLock<HashMap<u64, Arc<QueueHandle>>>,
    limits: Limits,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn Jitter>,
    observer: Arc<dyn Observer>,
    nonces: Arc<dyn NonceSource>,
    /// Serializes queue creation, configuration and deletion.
    admin: tokio::sync::Mutex<()>,
    disk_free: AtomicU64,
    disk_probe: Mutex<Box<dyn Fn() -> std::io::Result<u64> + Send + Sync>>,
    redrives: Mutex<Vec<Arc<RedriveTask>>>,
    next_redrive: AtomicU64,
    /// Set on shutdown: long-polls answer at once.
    closing: AtomicBool,
    streams: RwLock<HashMap<String, Arc<streams::StreamHandle>>>,
    /// Stream partitions by log uid (durable ends wake their fetches).
    stream_parts: RwLock<HashMap<u64, Arc<streams::PartitionHandle>>>,
    groups: groups::Groups,
    /// API keys and grants.
    auth: auth::Auth,
    /// Webhook hooks.
    hooks: hooks::Hooks,
    /// Push endpoints.
    pushes: pushes::Pushes,
    /// Kafka's classic consumer groups (JoinGroup/SyncGroup).
    classic: classic::ClassicGroups,
    /// Consumer instances the broker runs for HTTP members, by (group, member).
    consumers: Mutex<HashMap<(String, String), consumers::Instance>>,
    /// Notified when any stream partition grows (wakes consumer-instance fetches).
    streams_grew: Notify,
    /// Notified when a group's assignment changes (wakes consumer-instance fetches, which
    /// give up or take partitions at once).
    groups_changed: Notify,
    /// A compaction pass is running (one at a time).
    compacting: AtomicBool,
    /// What the partitions' batch caches (for subscriptions) may hold together.
    cache_budget: Arc<crate::stream::source::CacheBudget>,
    forecast: ForecastOptions,
    /// Each subject's samples (`forecasts.rs`).
    forecasts: Mutex<forecasts::Forecasts>,
}

#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

fn storage_error(err: impl std::fmt::Display) -> BrokerError {
    BrokerError::new(ErrorCode::StorageFailed, err.to_string())
}

impl Broker {
    /// Opens (recovers) the data directory and rebuilds every queue.
    pub fn open(
        dir: &Path,
        options: BrokerOptions,
    ) -> Result<Broker, tidewater_storage::OpenError> {
        options
            .limits
            .validate()
            .map_err(tidewater_storage::OpenError::Config)?;
        options
            .forecast
            .validate()
            .map_err(|e| tidewater_storage::OpenError::Config(format!("forecast: {e}")))?;
        let (store, recovered) = Store::open(dir, options.store.clone())?;
        let now = options.clock.now_ms();
        let mut queues = HashMap::new();
        let mut by_uid = HashMap::new();
        let (offsets_log, recovered): (Vec<_>, Vec<_>) = recovered
            .into_iter()
            .partition(|log| log.name == groups::OFFSETS_LOG);
        let groups = groups::Groups::recover(
            &store,
            offsets_log.into_iter().next(),
            options.clock.now_ms(),
        )
        .map_err(|reason| tidewater_storage::OpenError::Corrupt {
            path: dir.to_path_buf(),
            position: 0,
            reason,
        })?;
        let (auth_log, recovered): (Vec<_>, Vec<_>) = recovered
            .into_iter()
            .partition(|log| log.name == auth::AUTH_LOG);
        let auth = auth::Auth::recover(&store, auth_log.into_iter().next()).map_err(|reason| {
            tidewater_storage::OpenError::Corrupt {
                path: dir.to_path_buf(),
                position: 0,
                reason,
            }
        })?;
        let (hooks_log, recovered): (Vec<_>, Vec<_>) = recovered
            .into_iter()
            .partition(|log| log.name == hooks::HOOKS_LOG);
        let hooks =
            hooks::Hooks::recover(&store, hooks_log.into_iter().next()).map_err(|reason| {
                tidewater_storage::OpenError::Corrupt {
                    path: dir.to_path_buf(),
                    position: 0,
                    reason,
                }
            })?;
        let (pushes_log, recovered): (Vec<_>, Vec<_>) = recovered
            .into_iter()
            .partition(|log| log.name == pushes::PUSHES_LOG);
        let pushes =
            pushes::Pushes::recover(&store, pushes_log.into_iter().next()).map_err(|reason| {
                tidewater_storage::OpenError::Corrupt {
                    path: dir.to_path_buf(),
                    position: 0,
                    reason,
                }
            })?;
        let (stream_logs, recovered): (Vec<_>, Vec<_>) = recovered
            .into_iter()
            .partition(|log| crate::stream::config::parse_partition_log_name(&log.name).is_some());
        let cache_budget =
            crate::stream::source::CacheBudget::new(options.limits.subscription_cache_bytes);
        let streams =
            streams::recover_streams(&store, stream_logs, &cache_budget).map_err(|reason| {
                tidewater_storage::OpenError::Corrupt {
                    path: dir.to_path_buf(),
                    position: 0,
                    reason,
                }
            })?;
        let stream_parts = streams
            .values()
            .flat_map(|s| s.partition_handles_now())
            .map(|p| (p.uid, p))
            .collect();
        let (delay_logs, recovered): (Vec<_>, Vec<_>) = recovered
            .into_iter()
            .partition(|log| log.name.starts_with(DELAY_LOG_PREFIX));
        let (subscription_logs, recovered): (Vec<_>, Vec<_>) =
            recovered.into_iter().partition(|log| {
                log.name
                    .starts_with(crate::stream::subscription::SUBSCRIPTION_LOG_PREFIX)
            });
        let subscriptions =
            subscriptions::recover_subscriptions(&store, &streams, subscription_logs, now)
                .map_err(|reason| tidewater_storage::OpenError::Corrupt {
                    path: dir.to_path_buf(),
                    position: 0,
                    reason,
                })?;
        for handle in subscriptions {
            handle.state.lock().set_nonce_source(options.nonces.clone());
            by_uid.insert(handle.uid, handle);
        }
        for log in recovered {
            let config: QueueConfig = match serde_json::from_str(&log.config) {
                Ok(config) => config,
                Err(err) => {
                    tracing::error!(queue = %log.name, error = %err, "stored configuration unreadable; using defaults");
                    QueueConfig::defaults_for(&log.name, &options.limits)
                }
            };
            let reader = store.reader(log.uid).expect("recovered log has a reader");
            let window = (config.dedup_window_ms, options.limits.max_dedup_ids);
            if (log.recent_ids.window_ms, log.recent_ids.max) != window {
                // Created before this window was set (or the limit changed): tell storage.
                store.submit(
                    vec![id_window_op(log.uid, &config, &options.limits)],
                    AckLevel::Written,
                    Box::new(|_| {}),
                );
            }
            let mut state = QueueState::recover(&log, config, &reader, now).map_err(|e| {
                tidewater_storage::OpenError::Corrupt {
                    path: dir.to_path_buf(),
                    position: 0,
                    reason: e.to_string(),
                }
            })?;
            state.set_nonce_source(options.nonces.clone());
            let handle = Arc::new(QueueHandle {
                uid: log.uid,
                name: log.name.clone(),
                state: Mutex::new(state),
                notify: Notify::new(),
                reader: Records::Log(reader),
                deleted: AtomicBool::new(false),
                consumers: Mutex::new(crate::forecast::Seen::default()),
                delay: Mutex::new(None),
                subscription: None,
            });
            queues.insert(log.name.clone(), handle.clone());
            by_uid.insert(log.uid, handle);
        }
        for log in delay_logs {
            let owner = log.name[DELAY_LOG_PREFIX.len()..]
                .parse::<u64>()
                .ok()
                .and_then(|uid| by_uid.get(&uid).cloned());
            let Some(owner) = owner else {
                // Its queue was deleted and a crash came between the two deletes.
                store.submit(
                    vec![Op::DeleteLog { uid: log.uid }],
                    AckLevel::Written,
                    Box::new(|_| {}),
                );
                continue;
            };
            let reader = store.reader(log.uid).expect("recovered log has a reader");
            let mut from = log.ack_floor;
            while from < log.next_offset {
                let records = reader.read(from, 10_000, SCAN_BYTES).map_err(|e| {
                    tidewater_storage::OpenError::Corrupt {
                        path: dir.to_path_buf(),
                        position: 0,
                        reason: e.to_string(),
                    }
                })?;
                let Some(last) = records.last().map(|r| r.offset) else {
                    break;
                };
                let mut state = owner.state.lock();
                for record in records {
                    if !log.settled.contains(record.offset) {
                        state.park_at(record.offset, record.deliver_at_ms, record.size());
                    }
                }
                from = last + 1;
            }
            *owner.delay.lock() = Some(DelayLog {
                uid: log.uid,
                reader,
            });
        }
        let probe_dir = dir.to_path_buf();
        let inner = Arc::new(Inner {
            store,
            queues: RwLock::new(queues),
            by_uid: RwLock::new(by_uid),
            limits: options.limits,
            clock: options.clock,
            jitter: options.jitter,
            observer: options.observer,
            nonces: options.nonces,
            admin: tokio::sync::Mutex::new(()),
            disk_free: AtomicU64::new(u64::MAX),
            disk_probe: Mutex::new(Box::new(move || {
                tidewater_storage::disk_free_bytes(&probe_dir)
            })),
            redrives: Mutex::new(Vec::new()),
            next_redrive: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            streams: RwLock::new(streams),
            stream_parts: RwLock::new(stream_parts),
            groups,
            auth,
            hooks,
            pushes,
            classic: classic::ClassicGroups::default(),
            consumers: Mutex::new(HashMap::new()),
            streams_grew: Notify::new(),
            groups_changed: Notify::new(),
            compacting: AtomicBool::new(false),
            cache_budget,
            forecast: options.forecast,
            forecasts: Mutex::new(forecasts::Forecasts::default()),
        });
        // Durable data becomes visible to consumers; wake their long-polls.
        let weak = Arc::downgrade(&inner);
        inner.store.set_durable_listener(Arc::new(move |ends| {
            let Some(inner) = weak.upgrade() else { return };
            let by_uid = inner.by_uid.read();
            let stream_parts = inner.stream_parts.read();
            for &(uid, end) in ends {
                if let Some(handle) = by_uid.get(&uid) {
                    handle.state.lock().set_visible_end(end);
                    handle.notify.notify_waiters();
                } else if let Some(part) = stream_parts.get(&uid) {
                    part.notify.notify_waiters();
                    inner.streams_grew.notify_waiters();
                    // Its subscriptions may deliver what became durable.
                    for handle in part.subscribers.read().iter() {
                        handle
                            .state
                            .lock()
                            .set_source_end(part.partition as usize + 1, end);
                        handle.notify.notify_waiters();
                    }
                }
            }
        }));
        let broker = Broker { inner };
        broker.refresh_disk();
        Ok(broker)
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Replaces the free-space probe (tests inject a full disk this way).
    pub fn set_disk_probe(&self, probe: Box<dyn Fn() -> std::io::Result<u64> + Send + Sync>) {
        *self.inner.disk_probe.lock() = probe;
        self.refresh_disk();
    }

    pub fn refresh_disk(&self) {
        let free = (self.inner.disk_probe.lock())();
        match free {
            Ok(free) => self.inner.disk_free.store(free, Ordering::Relaxed),
            Err(err) => tracing::warn!(error = %err, "cannot read free disk space"),
        }
    }

    pub fn disk_free_bytes(&self) -> u64 {
        self.inner.disk_free.load(Ordering::Relaxed)
    }

    pub(super) fn check_disk(&self) -> Result<(), BrokerError> {
        // statvfs is a cheap syscall: read it per publish so a burst cannot overshoot.
        self.refresh_disk();
        let free = self.disk_free_bytes();
        let min = self.inner.limits.min_free_disk_bytes;
        if free < min {
            return Err(BrokerError::new(
                ErrorCode::DiskFull,
                format!(
                    "free disk space {} MiB is below the watermark {} MiB: publishing is paused, receive/ack/purge still work",
                    free >> 20,
                    min >> 20
                ),
            )
            .retry_after(5_000));
        }
        Ok(())
    }

    pub(super) fn queue(&self, name: &str) -> Result<Arc<QueueHandle>, BrokerError> {
        if let Some((stream, _)) = name.split_once('/') {
            // A subscription's name where only a queue goes (publish, peek, redrive from).
            return Err(BrokerError::invalid(format!(
                "'{name}' names a subscription (stream/subscription), not a queue: records are produced to the stream '{stream}', and a subscription is received from, acked and purged"
            )));
        }
        self.inner
            .queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::queue_not_found(name))
    }

    /// Makes one of the broker's own logs (`#offsets`, `#auth`, a queue's delay log: names
    /// no queue or stream can have), durably; its uid and reader.
    pub(super) async fn create_internal_log(
        &self,
        name: &str,
    ) -> Result<(u64, tidewater_storage::LogReader), BrokerError> {
        let results = self
            .write(
                vec![Op::CreateLog {
                    name: name.into(),
                    config: "{}".into(),
                    id_window: None,
                }],
                AckLevel::Durable,
            )
            .await?;
        let Some(&OpResult::Created { uid }) = results.first() else {
            return Err(BrokerError::new(
                ErrorCode::Internal,
                format!("storage did not create the log {name}"),
            ));
        };
        let reader = self.inner.store.reader(uid).ok_or_else(|| {
            BrokerError::new(ErrorCode::Internal, format!("the log {name} has no reader"))
        })?;
        Ok((uid, reader))
    }

    pub(super) async fn write(
        &self,
        ops: Vec<Op>,
        level: AckLevel,
    ) -> Result<Vec<OpResult>, BrokerError> {
        self.submit(ops, level).await
    }

    /// Hands ops to the store now (so submissions keep their order) and returns a future
    /// for the outcome.
    pub(super) fn submit(
        &self,
        ops: Vec<Op>,
        level: AckLevel,
    ) -> impl Future<Output = Result<Vec<OpResult>, BrokerError>> + Send + 'static {
        let answer = self.submit_then(ops, level, |result| result);
        async move { answer.await? }
    }

    /// Hands `ops` to the store now (so submissions keep their order) and runs `finish`
    /// with the outcome when storage answers, on a storage thread, whether or not the
    /// returned future is still awaited: the accounting of a write never depends on its
    /// caller waiting (`guard.rs`). The future gives what `finish` returned.
    ///
    /// `finish` must be quick and must not write; it may lock queue state, so this is
    /// never called with a queue's state locked (the store may answer at once, on this
    /// thread). If the store drops the request unanswered, `finish` is dropped (the guards
    /// it owns undo their marks) and the future answers `shutting_down`. A panic in
    /// `finish` is caught (the storage thread must not die of a queue's bug) and answered
    /// `internal`.
    pub(super) fn submit_then<T: Send + 'static>(
        &self,
        ops: Vec<Op>,
        level: AckLevel,
        finish: impl FnOnce(Result<Vec<OpResult>, BrokerError>) -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, BrokerError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner.store.submit(
            ops,
            level,
            Box::new(move |result| {
                let result = result.map_err(BrokerError::from);
                let answer =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| finish(result)))
                        .map_err(|_| {
                            tracing::error!(
                                "a write's accounting panicked (a bug): answered internal"
                            );
                            BrokerError::new(ErrorCode::Internal, "the write's accounting failed")
                        });
                drop(tx.send(answer));
            }),
        );
        async move {
            match rx.await {
                Ok(answer) => answer,
                Err(_) => Err(BrokerError::new(
                    ErrorCode::ShuttingDown,
                    "the store stopped before answering",
                )
                .retry_after(1_000)),
            }
        }
    }

    /// Checks a subscription's lease before it is confirmed (the same rule as receive).
    pub fn check_lease_ms(&self, lease_ms: Option<u64>) -> Result<(), BrokerError> {
        check_lease_ms(lease_ms)
    }

    pub fn is_closing(&self) -> bool {
        self.inner.closing.load(Ordering::SeqCst)
    }

    /// Ends every long-poll now (empty replies) and makes new ones answer at once.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        for handle in self.inner.queues.read().values() {
            handle.notify.notify_waiters();
        }
        for handle in self.subscription_handles() {
            handle.notify.notify_waiters();
        }
        for part in self.inner.stream_parts.read().values() {
            part.notify.notify_waiters();
        }
        self.inner.streams_grew.notify_waiters();
    }

    /// Stops the store: finishes queued writes, syncs and checkpoints.
    pub fn shutdown(&self) {
        self.inner.store.shutdown();
    }

    /// Checks every queue's internal invariants (tests).
    pub fn debug_check_consistency(&self) {
        for handle in self.inner.queues.read().values() {
            handle.state.lock().debug_check_consistency();
        }
        for handle in self.subscription_handles() {
            handle.state.lock().debug_check_consistency();
        }
    }
}
