//! The broker: named queues over one store. Async (tokio) but free of HTTP: the server and
//! tests drive it through these methods.

use base64::Engine;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tidewater_storage::FormatError;
use tidewater_storage::format::{MAX_BATCH_BODY, RECORD_FLAG_GENERATED_ID};
use tidewater_storage::{
    AckLevel, BatchBuilder, LogReader, NewRecord, Op, OpResult, Record, Store, StoreOptions,
};
use tokio::sync::Notify;

use crate::clock::{Clock, Jitter, NonceSource, OsNonces, RandomJitter, SystemClock};
use crate::config::{
    ConfigPatch, Limits, MAX_LEASE_MS, MAX_TENANT_LEN, MAX_TTL_MS, OnExpire, QueueConfig,
    validate_queue_name,
};
use crate::error::{BrokerError, ErrorCode};
use crate::queue::{
    ANONYMOUS_TENANT, Delivery, HEADER_MERGED, HEADER_PRIORITY, HEADER_TENANT, HEADER_TTL_MS,
    QueueState, QueueStats, SCAN_BYTES, Unacked,
};

/// Headers added to a dead-lettered message.
pub const HEADER_SOURCE_QUEUE: &str = "tidewater-source-queue";
pub const HEADER_DELIVERY_COUNT: &str = "tidewater-delivery-count";
pub const HEADER_LAST_ERROR: &str = "tidewater-last-error";
pub const HEADER_ERRORS: &str = "tidewater-errors";
pub const HEADER_PUBLISHED_AT: &str = "tidewater-published-at";
pub const HEADER_DEAD_LETTERED_AT: &str = "tidewater-dead-lettered-at";
const LEASE_EXPIRED_ERROR: &str = "lease expired";
const TTL_EXPIRED_ERROR: &str = "expired: older than its ttl_ms";
/// Redrives remembered for progress queries.
const MAX_REDRIVES_KEPT: usize = 100;

/// Receives latency observations (the server turns them into histograms).
pub trait Observer: Send + Sync {
    fn publish_latency(&self, _queue: &str, _seconds: f64) {}
    fn publish_to_ack(&self, _queue: &str, _seconds: &[f64]) {}
    /// The queue is gone: forget what is kept per queue (its metric series).
    fn queue_deleted(&self, _queue: &str) {}
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
        }
    }
}

/// When a published message becomes deliverable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delay {
    #[default]
    None,
    AfterMs(u64),
    AtMs(i64),
}

/// Why a consumer gave a message back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NackReason {
    /// The handler failed (the default).
    #[default]
    Failed,
    /// The consumer or what is behind it is overloaded: adaptive throttling slows down.
    Overloaded,
}

impl NackReason {
    pub fn parse(reason: Option<&str>) -> Result<Self, BrokerError> {
        match reason {
            None | Some("failed") => Ok(NackReason::Failed),
            Some("overloaded") => Ok(NackReason::Overloaded),
            Some(other) => Err(BrokerError::invalid(format!(
                "unknown nack reason '{other}': use \"failed\" or \"overloaded\""
            ))),
        }
    }
}

/// A message to publish, as parsed by the API layer.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    pub id: Option<String>,
    pub body: Vec<u8>,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub delay: Delay,
    /// A random extra delay of up to this many ms (spreads cron bursts).
    pub jitter_ms: Option<u64>,
    /// This message's time to live from its publish.
    pub ttl_ms: Option<u64>,
    /// The producer, for quotas and fairness.
    pub tenant: Option<String>,
    /// Priority level (0 = lowest) on queues with `priority_levels` > 1.
    pub priority: Option<u8>,
}

/// The ids of a publish, in order, and the indexes of duplicates (acknowledged, not
/// enqueued again: their id was accepted within the queue's dedup window).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Published {
    pub ids: Vec<String>,
    pub duplicates: Vec<usize>,
}

/// Tells storage how long to remember a queue's client-chosen ids (deduplication).
fn id_window_op(uid: u64, config: &QueueConfig, limits: &Limits) -> Op {
    Op::IdWindow {
        uid,
        window_ms: config.dedup_window_ms,
        max: limits.max_dedup_ids,
    }
}

/// What scanning a client-built batch found.
#[derive(Default)]
struct BatchScan {
    bytes: u64,
    delays: Vec<(u32, i64)>,
    demand: Demand,
    /// (index, id) of the records with a client-chosen id.
    client_ids: Vec<(usize, Vec<u8>)>,
    /// (index, key, bytes) of keyed records, on supersede queues.
    keyed: Vec<(u32, Vec<u8>, u64)>,
}

/// `n` flags, set at `indexes`.
fn marks(n: usize, indexes: &[usize]) -> Vec<bool> {
    let mut out = vec![false; n];
    for &idx in indexes {
        out[idx] = true;
    }
    out
}

/// The records of `batch` marked in `take`, as a batch for the delay log `uid`.
fn parked_part(
    header: &tidewater_storage::format::BatchHeader,
    batch: &[u8],
    take: &[bool],
    uid: u64,
    now: i64,
) -> ParkedPart {
    let mut part = ParkedPart {
        uid,
        batch: select(header, batch, take, uid, now),
        entries: Vec::new(),
        n: 0,
        bytes: 0,
    };
    let body = &batch[tidewater_storage::format::BATCH_HEADER_LEN..];
    let mut idx = 0;
    let _ = tidewater_storage::format::visit_records::<FormatError>(header, body, |record| {
        if take[idx] {
            let size = record.size();
            part.entries
                .push((part.n as u32, record.deliver_at_ms, size));
            part.n += 1;
            part.bytes += size;
        }
        idx += 1;
        Ok(())
    });
    part
}

/// A copy of `batch` without the records marked in `skip` (already checked).
fn without(
    header: &tidewater_storage::format::BatchHeader,
    batch: &[u8],
    skip: &[bool],
    now: i64,
) -> Vec<u8> {
    let keep: Vec<bool> = skip.iter().map(|s| !s).collect();
    select(header, batch, &keep, header.log_uid, now)
}

/// The records of `batch` marked in `keep` (already checked), as a batch for log `uid`.
fn select(
    header: &tidewater_storage::format::BatchHeader,
    batch: &[u8],
    keep: &[bool],
    uid: u64,
    now: i64,
) -> Vec<u8> {
    let mut builder = BatchBuilder::new(uid, now);
    let body = &batch[tidewater_storage::format::BATCH_HEADER_LEN..];
    let mut idx = 0;
    let _ = tidewater_storage::format::visit_records::<FormatError>(header, body, |record| {
        if keep[idx] {
            builder.push(&NewRecord {
                id: record.id,
                generated_id: record.flags & RECORD_FLAG_GENERATED_ID != 0,
                key: record.key,
                headers: record.headers().collect(),
                deliver_at_ms: record.deliver_at_ms,
                body: record.body,
            });
        }
        idx += 1;
        Ok(())
    });
    builder.finish()
}

/// What a publish asks of admission: its size, its quota demand, and the ids it claimed
/// for deduplication (released if it is not stored).
struct Admission {
    n: u64,
    bytes: u64,
    demand: Demand,
    claimed: Vec<Vec<u8>>,
    /// (index in batch, key, bytes) of keyed messages, on supersede queues.
    keyed: Vec<(u32, Vec<u8>, u64)>,
    /// Long delays bound for the delay log.
    parked: Option<ParkedPart>,
}

/// The part of a publish that goes to the queue's delay log.
struct ParkedPart {
    uid: u64,
    batch: Vec<u8>,
    /// (index in that batch, due time, bytes)
    entries: Vec<(u32, i64, u64)>,
    n: u64,
    bytes: u64,
}

/// Messages and bytes per tenant of one publish, for quotas (empty when the queue has none).
#[derive(Default)]
struct Demand(HashMap<String, (u64, u64)>);

impl Demand {
    fn add(&mut self, tenant: Option<&[u8]>, bytes: u64) {
        let tenant = tenant.map_or(Cow::Borrowed(ANONYMOUS_TENANT), String::from_utf8_lossy);
        let entry = match self.0.get_mut(tenant.as_ref()) {
            Some(entry) => entry,
            None => self.0.entry(tenant.into_owned()).or_default(),
        };
        entry.0 += 1;
        entry.1 += bytes;
    }

    fn as_slice(&self) -> Vec<(&str, u64, u64)> {
        self.0
            .iter()
            .map(|(t, &(m, b))| (t.as_str(), m, b))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct SettleReply {
    pub ok: u64,
    pub failed: Vec<ReceiptFailure>,
    /// Acked receipts whose message a newer one with its key had superseded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReceiptFailure {
    pub receipt: String,
    pub code: &'static str,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueInfo {
    pub name: String,
    pub config: QueueConfig,
    pub stats: QueueStats,
    #[serde(skip)]
    pub refused: Vec<(&'static str, u64)>,
    /// Publishes refused by quota per tenant (top tenants, then "other").
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub quota_refused: std::collections::BTreeMap<String, u64>,
    #[serde(skip)]
    pub disk_bytes: u64,
    /// Bytes read back from the queue's segments (metrics: read amplification).
    #[serde(skip)]
    pub read_bytes: u64,
}

/// A message seen without leasing it.
#[derive(Debug, Clone)]
pub struct Peeked {
    pub record: Record,
    pub delivery_count: u32,
}

#[derive(Debug, Clone, Default)]
pub struct RedriveRequest {
    /// Target queue; None = each message's source queue.
    pub to: Option<String>,
    pub rate_per_s: u64,
    /// 0 = all.
    pub max: u64,
    /// Only messages with this key.
    pub key: Option<String>,
    /// Only messages whose last error contains this text.
    pub error_contains: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RedriveProgress {
    pub id: String,
    pub queue: String,
    pub moved: u64,
    pub remaining: u64,
    pub skipped: u64,
    pub state: &'static str,
    pub error: Option<String>,
}

/// A redrive kept for progress queries and cancellation.
struct RedriveTask {
    progress: Mutex<RedriveProgress>,
    /// The fixed target, if any (None: each message's source queue).
    to: Option<String>,
    cancel: AtomicBool,
    wake: Notify,
}

impl RedriveTask {
    fn running(&self) -> bool {
        self.progress.lock().state == "running"
    }
}

/// Leases ended by a request (offset, lease) and the receipts it refused.
type Released = (Vec<(u64, crate::queue::Lease)>, Vec<ReceiptFailure>);

pub struct QueueHandle {
    pub uid: u64,
    pub name: String,
    state: Mutex<QueueState>,
    notify: Notify,
    reader: LogReader,
    deleted: AtomicBool,
    /// The queue's delay log, where long delays wait apart from the main log.
    delay: Mutex<Option<DelayLog>>,
}

/// A hidden log holding a queue's long-delayed messages until they are due, so that a
/// message due in a week does not hold the main log's ack floor (and every segment after
/// it) for a week.
#[derive(Clone)]
struct DelayLog {
    uid: u64,
    reader: LogReader,
}

/// The delay log of queue `uid` is named so that no queue can have its name.
const DELAY_LOG_PREFIX: &str = "#delay/";

fn delay_log_name(queue_uid: u64) -> String {
    format!("{DELAY_LOG_PREFIX}{queue_uid}")
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
        let (store, recovered) = Store::open(dir, options.store.clone())?;
        let now = options.clock.now_ms();
        let mut queues = HashMap::new();
        let mut by_uid = HashMap::new();
        let (delay_logs, recovered): (Vec<_>, Vec<_>) = recovered
            .into_iter()
            .partition(|log| log.name.starts_with(DELAY_LOG_PREFIX));
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
                reader,
                deleted: AtomicBool::new(false),
                delay: Mutex::new(None),
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
        });
        // Durable data becomes visible to consumers; wake their long-polls.
        let weak = Arc::downgrade(&inner);
        inner.store.set_durable_listener(Arc::new(move |ends| {
            let Some(inner) = weak.upgrade() else { return };
            let by_uid = inner.by_uid.read();
            for &(uid, end) in ends {
                if let Some(handle) = by_uid.get(&uid) {
                    handle.state.lock().set_visible_end(end);
                    handle.notify.notify_waiters();
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

    fn check_disk(&self) -> Result<(), BrokerError> {
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

    fn queue(&self, name: &str) -> Result<Arc<QueueHandle>, BrokerError> {
        self.inner
            .queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::queue_not_found(name))
    }

    async fn write(&self, ops: Vec<Op>, level: AckLevel) -> Result<Vec<OpResult>, BrokerError> {
        self.submit(ops, level).await
    }

    /// Hands ops to the store now (so submissions keep their order) and returns a future
    /// for the outcome.
    fn submit(
        &self,
        ops: Vec<Op>,
        level: AckLevel,
    ) -> impl Future<Output = Result<Vec<OpResult>, BrokerError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner
            .store
            .submit(ops, level, Box::new(move |result| drop(tx.send(result))));
        async move {
            match rx.await {
                Ok(result) => result.map_err(BrokerError::from),
                Err(_) => Err(BrokerError::new(
                    ErrorCode::ShuttingDown,
                    "the store stopped before answering",
                )),
            }
        }
    }

    // ---- queues ----

    /// Creates a queue, or updates the configuration of an existing one. Returns whether
    /// it was created.
    pub async fn put_queue(
        &self,
        name: &str,
        patch: &ConfigPatch,
    ) -> Result<(bool, QueueInfo), BrokerError> {
        validate_queue_name(name)?;
        let _admin = self.inner.admin.lock().await;
        if let Ok(handle) = self.queue(name) {
            let current = handle.state.lock().config.clone();
            let next = current.apply(patch);
            next.validate(name, &self.inner.limits)?;
            if next != current {
                let config = serde_json::to_string(&next).expect("config serializes");
                let mut ops = vec![Op::UpdateConfig {
                    uid: handle.uid,
                    config,
                }];
                if next.dedup_window_ms != current.dedup_window_ms {
                    ops.push(id_window_op(handle.uid, &next, &self.inner.limits));
                }
                self.write(ops, AckLevel::Durable).await?;
                handle.state.lock().set_config(next);
                handle.notify.notify_waiters();
            }
            return Ok((false, self.info(&handle)));
        }
        let config = QueueConfig::defaults_for(name, &self.inner.limits).apply(patch);
        config.validate(name, &self.inner.limits)?;
        let handle = self.create_locked(name, config).await?;
        Ok((true, self.info(&handle)))
    }

    async fn create_locked(
        &self,
        name: &str,
        config: QueueConfig,
    ) -> Result<Arc<QueueHandle>, BrokerError> {
        if self.inner.queues.read().len() >= self.inner.limits.max_queues {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the broker holds its maximum of {} queues (max_queues)",
                    self.inner.limits.max_queues
                ),
            ));
        }
        let json = serde_json::to_string(&config).expect("config serializes");
        // One write: a create that fails leaves nothing behind its error reply.
        let id_window = (config.dedup_window_ms > 0)
            .then_some((config.dedup_window_ms, self.inner.limits.max_dedup_ids));
        let results = self
            .write(
                vec![Op::CreateLog {
                    name: name.to_string(),
                    config: json,
                    id_window,
                }],
                AckLevel::Durable,
            )
            .await?;
        let Some(OpResult::Created { uid }) = results.first() else {
            return Err(BrokerError::new(
                ErrorCode::Internal,
                "storage did not return the new log",
            ));
        };
        let reader = self
            .inner
            .store
            .reader(*uid)
            .ok_or_else(|| BrokerError::new(ErrorCode::Internal, "new log has no reader"))?;
        let handle = Arc::new(QueueHandle {
            uid: *uid,
            name: name.to_string(),
            state: Mutex::new({
                let mut state = QueueState::new(*uid, name.to_string(), config);
                state.set_nonce_source(self.inner.nonces.clone());
                state
            }),
            notify: Notify::new(),
            reader,
            deleted: AtomicBool::new(false),
            delay: Mutex::new(None),
        });
        // The queue exists from here on (its log is durable): a delay log that cannot be
        // made now is made at a later maintenance, and long delays wait in the main log
        // meanwhile. Failing the create here would answer an error for a queue that exists.
        if let Err(err) = self.create_delay_log(&handle).await {
            tracing::warn!(queue = %name, error = %err, "could not create the delay log; retried at maintenance");
        }
        self.inner
            .queues
            .write()
            .insert(name.to_string(), handle.clone());
        self.inner.by_uid.write().insert(*uid, handle.clone());
        Ok(handle)
    }

    /// Creates the queue's delay log (new queues, and at first maintenance for queues made
    /// before delay logs existed). Caller holds the admin lock or owns a new handle.
    async fn create_delay_log(&self, handle: &Arc<QueueHandle>) -> Result<(), BrokerError> {
        if handle.delay.lock().is_some() {
            return Ok(());
        }
        let results = self
            .write(
                vec![Op::CreateLog {
                    name: delay_log_name(handle.uid),
                    config: "{}".into(),
                    id_window: None,
                }],
                AckLevel::Durable,
            )
            .await?;
        let Some(&OpResult::Created { uid }) = results.first() else {
            return Err(BrokerError::new(
                ErrorCode::Internal,
                "storage did not return the delay log",
            ));
        };
        let reader = self
            .inner
            .store
            .reader(uid)
            .ok_or_else(|| BrokerError::new(ErrorCode::Internal, "delay log has no reader"))?;
        *handle.delay.lock() = Some(DelayLog { uid, reader });
        Ok(())
    }

    /// Moves parked messages that are due from the delay log to the main log, in one
    /// journal write (append there, settle here).
    async fn unpark_due(&self, handle: &Arc<QueueHandle>, now: i64) {
        let Some(delay) = handle.delay.lock().clone() else {
            return;
        };
        let due = handle.state.lock().take_due_parked(now, 5_000);
        if due.is_empty() {
            return;
        }
        let (first, last) = (due[0], due[due.len() - 1]);
        let wanted: std::collections::HashSet<u64> = due.iter().copied().collect();
        let records = match delay
            .reader
            .read_where(first.min(last), first.max(last) + 1, &|o| {
                wanted.contains(&o)
            }) {
            Ok(records) => records,
            Err(err) => {
                tracing::warn!(queue = %handle.name, error = %err, "could not read due delayed messages; retrying");
                handle.state.lock().unparked(&due, false);
                return;
            }
        };
        let mut builder = BatchBuilder::new(handle.uid, now);
        let mut bytes = 0;
        for record in &records {
            builder.push(&NewRecord {
                id: &record.id,
                generated_id: record.flags & RECORD_FLAG_GENERATED_ID != 0,
                key: record.key.as_deref(),
                headers: record
                    .headers
                    .iter()
                    .map(|(k, v)| (&k[..], &v[..]))
                    .collect(),
                deliver_at_ms: 0,
                body: &record.body,
            });
            bytes += record.size();
        }
        let n = records.len() as u64;
        let mut ops = Vec::new();
        if n > 0 {
            handle.state.lock().reserve_unchecked(n, bytes);
            ops.push(Op::Append {
                uid: handle.uid,
                batch: builder.finish(),
            });
        }
        ops.push(Op::Settle {
            uid: delay.uid,
            ranges: to_ranges(&due),
        });
        let result = self.write(ops, AckLevel::Durable).await;
        let mut state = handle.state.lock();
        match result {
            Ok(results) => {
                if let Some(&OpResult::Appended { base_offset, .. }) =
                    results.first().filter(|_| n > 0)
                {
                    state.published(n, bytes, Some((base_offset, &[])));
                }
                state.unparked(&due, true);
                drop(state);
                handle.notify.notify_waiters();
            }
            Err(err) => {
                tracing::warn!(queue = %handle.name, error = %err, "could not move due delayed messages; retrying");
                if n > 0 {
                    state.published(n, bytes, None);
                }
                state.unparked(&due, false);
            }
        }
    }

    /// The dead-letter queue for `name`, created with DLQ defaults when missing.
    async fn dead_letter_target(&self, dlq: &str) -> Result<Arc<QueueHandle>, BrokerError> {
        if let Ok(handle) = self.queue(dlq) {
            return Ok(handle);
        }
        let _admin = self.inner.admin.lock().await;
        if let Ok(handle) = self.queue(dlq) {
            return Ok(handle);
        }
        tracing::info!(queue = dlq, "creating dead-letter queue");
        self.create_locked(
            dlq,
            QueueConfig::for_dead_letter_queue(dlq, &self.inner.limits),
        )
        .await
    }

    pub async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        let _admin = self.inner.admin.lock().await;
        let handle = self.queue(name)?;
        let mut ops = vec![Op::DeleteLog { uid: handle.uid }];
        if let Some(delay) = handle.delay.lock().as_ref() {
            ops.push(Op::DeleteLog { uid: delay.uid });
        }
        self.write(ops, AckLevel::Durable).await?;
        self.inner.queues.write().remove(name);
        self.inner.by_uid.write().remove(&handle.uid);
        handle.deleted.store(true, Ordering::SeqCst);
        handle.notify.notify_waiters();
        self.inner.observer.queue_deleted(name);
        Ok(())
    }

    fn info(&self, handle: &QueueHandle) -> QueueInfo {
        let mut state = handle.state.lock();
        state.refresh_oldest(&handle.reader);
        let mut refused: Vec<_> = state
            .counters
            .refused
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        refused.sort();
        QueueInfo {
            name: handle.name.clone(),
            config: state.config.clone(),
            stats: state.stats(self.now_ms()),
            refused,
            quota_refused: state.quota_refusals(),
            disk_bytes: handle.reader.disk_bytes(),
            read_bytes: handle.reader.bytes_read(),
        }
    }

    pub fn get_queue(&self, name: &str) -> Result<QueueInfo, BrokerError> {
        let handle = self.queue(name)?;
        Ok(self.info(&handle))
    }

    pub fn list_queues(&self) -> Vec<QueueInfo> {
        let handles: Vec<_> = self.inner.queues.read().values().cloned().collect();
        let mut out: Vec<_> = handles.iter().map(|h| self.info(h)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    // ---- messages ----

    fn validate_message(
        &self,
        idx: usize,
        msg: &NewMessage,
        now: i64,
    ) -> Result<Option<i64>, BrokerError> {
        let headers = msg.headers.iter().map(|(k, v)| (k.len(), v.len()));
        let limits = &self.inner.limits;
        let at = self.check_message(
            idx,
            msg.body.len(),
            msg.id.as_ref().map(String::len),
            msg.key.as_ref().map(String::len),
            headers,
            msg.delay,
            now,
        )?;
        if let Some(ttl) = msg.ttl_ms {
            check_ttl(idx, ttl.to_string().as_bytes())?;
        }
        if let Some(tenant) = &msg.tenant {
            check_tenant(idx, tenant.as_bytes())?;
        }
        match msg.jitter_ms {
            None | Some(0) => Ok(at),
            Some(jitter) if jitter > limits.max_delay_ms => Err(BrokerError::new(
                ErrorCode::InvalidMessage,
                format!(
                    "message {idx}: jitter_ms {jitter} exceeds max_delay_ms {}",
                    limits.max_delay_ms
                ),
            )),
            Some(jitter) => {
                let extra = (jitter as f64 * self.inner.jitter.unit()).round() as i64;
                Ok(Some(at.unwrap_or(now) + extra).filter(|&at| at > now))
            }
        }
    }

    /// The per-message limits, shared by JSON publishes and binary record batches. Returns
    /// the delivery time of a delayed message.
    #[allow(clippy::too_many_arguments)]
    fn check_message(
        &self,
        idx: usize,
        body_len: usize,
        id_len: Option<usize>,
        key_len: Option<usize>,
        headers: impl ExactSizeIterator<Item = (usize, usize)>,
        delay: Delay,
        now: i64,
    ) -> Result<Option<i64>, BrokerError> {
        let limits = &self.inner.limits;
        let bad = |what: String| {
            Err(BrokerError::new(
                ErrorCode::InvalidMessage,
                format!("message {idx}: {what}"),
            ))
        };
        if body_len > limits.max_message_bytes {
            return Err(BrokerError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "message {idx}: body of {body_len} bytes exceeds max_message_bytes {}",
                    limits.max_message_bytes
                ),
            ));
        }
        let max_id = limits.max_id_bytes.min(255);
        if let Some(len) = id_len
            && (len == 0 || len > max_id)
        {
            return bad(format!("id must be 1..={max_id} bytes"));
        }
        if let Some(len) = key_len
            && len > limits.max_key_bytes
        {
            return bad(format!(
                "key of {len} bytes exceeds max_key_bytes {}",
                limits.max_key_bytes
            ));
        }
        if headers.len() > limits.max_headers {
            return bad(format!(
                "{} headers exceed max_headers {}",
                headers.len(),
                limits.max_headers
            ));
        }
        for (name, value) in headers {
            if name == 0 || name > limits.max_header_bytes || value > limits.max_header_bytes {
                return bad(format!(
                    "header names must be 1..={0} bytes and values at most {0} bytes",
                    limits.max_header_bytes
                ));
            }
        }
        match delay {
            Delay::None => Ok(None),
            Delay::AfterMs(ms) if ms > limits.max_delay_ms => bad(format!(
                "delay_ms {ms} exceeds max_delay_ms {}",
                limits.max_delay_ms
            )),
            Delay::AfterMs(0) => Ok(None),
            Delay::AfterMs(ms) => Ok(Some(now + ms as i64)),
            // Saturating: a deliver_at far in the past (i64::MIN) is "now", not an overflow.
            Delay::AtMs(at) if at.saturating_sub(now) > limits.max_delay_ms as i64 => bad(format!(
                "deliver_at is more than max_delay_ms {} ahead",
                limits.max_delay_ms
            )),
            Delay::AtMs(at) if at <= now => Ok(None),
            Delay::AtMs(at) => Ok(Some(at)),
        }
    }

    /// Publishes a batch, whole or not at all; returns the ids in order and which messages
    /// were duplicates (acknowledged, not enqueued again).
    pub async fn publish(
        &self,
        queue: &str,
        messages: &[NewMessage],
        level: AckLevel,
    ) -> Result<Published, BrokerError> {
        let started = std::time::Instant::now();
        let limits = &self.inner.limits;
        if messages.is_empty() {
            return Err(BrokerError::invalid("a publish needs at least one message"));
        }
        if messages.len() > limits.max_batch_messages {
            return Err(BrokerError::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "{} messages exceed max_batch_messages {}",
                    messages.len(),
                    limits.max_batch_messages
                ),
            ));
        }
        let handle = self.queue(queue)?;
        if let Err(err) = self.check_disk() {
            handle.state.lock().count_refusal("disk_full");
            return Err(err);
        }
        let now = self.now_ms();
        let mut deliver_ats = Vec::with_capacity(messages.len());
        for (idx, msg) in messages.iter().enumerate() {
            deliver_ats.push(self.validate_message(idx, msg, now)?);
        }
        let client_ids: Vec<(usize, &[u8])> = messages
            .iter()
            .enumerate()
            .filter_map(|(idx, m)| Some((idx, m.id.as_deref()?.as_bytes())))
            .collect();
        let (with_quota, with_supersede, dups) = {
            let mut state = handle.state.lock();
            let dups = state.claim_ids(&client_ids, self.inner.limits.max_dedup_ids, now);
            (
                state.config.quota.is_some(),
                state.config.supersede || state.config.coalesce.is_some(),
                marks(messages.len(), &dups),
            )
        };
        let mut keyed = Vec::new();
        let claimed: Vec<Vec<u8>> = client_ids
            .iter()
            .filter(|(idx, _)| !dups[*idx])
            .map(|(_, id)| id.to_vec())
            .collect();
        let mut demand = Demand::default();
        let mut builder = BatchBuilder::new(handle.uid, now);
        let delay_uid = handle.delay.lock().as_ref().map(|d| d.uid);
        let park_from = now.saturating_add(self.inner.limits.park_delay_ms as i64);
        let mut parked = delay_uid.map(|uid| ParkedPart {
            uid,
            batch: Vec::new(),
            entries: Vec::new(),
            n: 0,
            bytes: 0,
        });
        let mut parked_builder = delay_uid.map(|uid| BatchBuilder::new(uid, now));
        let mut ids = Vec::with_capacity(messages.len());
        let mut duplicates = Vec::new();
        let mut delays = Vec::new();
        let mut bytes = 0u64;
        let mut n = 0u64;
        for (idx, msg) in messages.iter().enumerate() {
            if dups[idx] {
                ids.push(msg.id.clone().expect("only client ids are duplicates"));
                duplicates.push(idx);
                continue;
            }
            let deliver_at = deliver_ats[idx];
            // A long delay waits in the delay log, not in the main log.
            let park = parked.is_some() && deliver_at.is_some_and(|at| at >= park_from);
            if !park {
                if let Some(at) = deliver_at {
                    delays.push((n as u32, at));
                }
                n += 1;
            }
            let ttl = msg.ttl_ms.map(|ttl| ttl.to_string());
            let priority = msg.priority.map(|p| p.to_string());
            let headers: Vec<(&[u8], &[u8])> = msg
                .headers
                .iter()
                .filter(|(k, _)| k != HEADER_TENANT && k != HEADER_TTL_MS && k != HEADER_PRIORITY)
                .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                .chain(
                    ttl.as_ref()
                        .map(|v| (HEADER_TTL_MS.as_bytes(), v.as_bytes())),
                )
                .chain(
                    msg.tenant
                        .as_ref()
                        .map(|t| (HEADER_TENANT.as_bytes(), t.as_bytes())),
                )
                .chain(
                    priority
                        .as_ref()
                        .map(|p| (HEADER_PRIORITY.as_bytes(), p.as_bytes())),
                )
                .collect();
            let generated;
            let (id, is_generated): (&[u8], bool) = match &msg.id {
                Some(id) => {
                    ids.push(id.clone());
                    (id.as_bytes(), false)
                }
                None => {
                    generated = new_message_id(now);
                    ids.push(hex(&generated));
                    (&generated, true)
                }
            };
            let record = NewRecord {
                id,
                generated_id: is_generated,
                key: msg.key.as_deref().map(str::as_bytes),
                headers,
                deliver_at_ms: deliver_at.unwrap_or(0),
                body: &msg.body,
            };
            let size = (msg.body.len()
                + msg.key.as_ref().map_or(0, |k| k.len())
                + record
                    .headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()) as u64;
            if with_quota {
                demand.add(msg.tenant.as_deref().map(str::as_bytes), size);
            }
            if let (true, Some(part), Some(parked_builder)) =
                (park, parked.as_mut(), parked_builder.as_mut())
            {
                part.entries
                    .push((part.n as u32, deliver_at.unwrap_or(now), size));
                part.n += 1;
                part.bytes += size;
                parked_builder.push(&record);
                continue;
            }
            bytes += size;
            if with_supersede && let Some(key) = &msg.key {
                keyed.push((n as u32 - 1, key.as_bytes().to_vec(), size));
            }
            builder.push(&record);
            if builder.encoded_len() > MAX_BATCH_BODY {
                handle.state.lock().release_ids(&claimed);
                return Err(BrokerError::new(
                    ErrorCode::RequestTooLarge,
                    "the batch exceeds 256 MiB once encoded",
                ));
            }
        }
        let parked = match (parked, parked_builder) {
            (Some(mut part), Some(parked_builder)) if part.n > 0 => {
                part.batch = parked_builder.finish();
                Some(part)
            }
            _ => None,
        };
        if n > 0 || parked.is_some() {
            let batch = (n > 0).then(|| builder.finish());
            let admission = Admission {
                n,
                bytes,
                demand,
                claimed,
                keyed,
                parked,
            };
            self.start_append(handle, batch, admission, delays, level, started)?
                .await?;
        }
        Ok(Published { ids, duplicates })
    }

    /// Publishes a batch built by a client in the storage format (binary protocol). Every
    /// record is checked against the same limits as a JSON publish; only the header is
    /// rewritten (log and publish time). Returns (base offset, count).
    /// Validates and submits a client-built batch now, in call order (a connection's
    /// batches are appended in the order they arrived even with many in flight), and
    /// returns a future for its (base offset, count).
    pub fn start_publish_batch(
        &self,
        queue: &str,
        batch: Vec<u8>,
        level: AckLevel,
    ) -> Result<impl Future<Output = Result<(u64, u32), BrokerError>> + Send + 'static, BrokerError>
    {
        let started = self.admit_batch(queue, batch, level)?;
        Ok(async move {
            match started {
                Ok(appended) => appended.await,
                // Every record was a duplicate: nothing to append, (log end, 0).
                Err(end) => Ok((end, 0)),
            }
        })
    }

    /// The work of `start_publish_batch`: Ok(Err(log end)) when nothing is appended.
    #[allow(clippy::type_complexity)]
    fn admit_batch(
        &self,
        queue: &str,
        mut batch: Vec<u8>,
        level: AckLevel,
    ) -> Result<
        Result<impl Future<Output = Result<(u64, u32), BrokerError>> + Send + 'static, u64>,
        BrokerError,
    > {
        let started = std::time::Instant::now();
        let handle = self.queue(queue)?;
        if let Err(err) = self.check_disk() {
            handle.state.lock().count_refusal("disk_full");
            return Err(err);
        }
        let now = self.now_ms();
        let header = tidewater_storage::format::restamp_batch(&mut batch, handle.uid, now)
            .map_err(|e| {
                BrokerError::new(
                    ErrorCode::InvalidMessage,
                    format!("the record batch is invalid: {e}"),
                )
            })?;
        let limits = &self.inner.limits;
        if header.count as usize > limits.max_batch_messages {
            return Err(BrokerError::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "{} messages exceed max_batch_messages {}",
                    header.count, limits.max_batch_messages
                ),
            ));
        }
        let (with_quota, with_supersede) = {
            let state = handle.state.lock();
            (
                state.config.quota.is_some(),
                state.config.supersede || state.config.coalesce.is_some(),
            )
        };
        let mut scan = self.scan_batch(&header, &batch, with_quota, with_supersede, now)?;
        // Tell storage whether to look for ids to remember (clients need not set it).
        tidewater_storage::format::set_client_ids_flag(&mut batch, !scan.client_ids.is_empty());
        let dups = {
            let ids: Vec<(usize, &[u8])> = scan
                .client_ids
                .iter()
                .map(|(idx, id)| (*idx, id.as_slice()))
                .collect();
            handle
                .state
                .lock()
                .claim_ids(&ids, limits.max_dedup_ids, now)
        };
        let mut claimed = std::mem::take(&mut scan.client_ids);
        let count = header.count - dups.len() as u32;
        let mut header = header;
        if !dups.is_empty() {
            // Rare: rebuild the batch without its duplicates (acknowledged, not enqueued).
            let skip = marks(header.count as usize, &dups);
            claimed.retain(|(idx, _)| !skip[*idx]);
            if count == 0 {
                let end = handle.state.lock().visible_end();
                return Ok(Err(end));
            }
            batch = without(&header, &batch, &skip, now);
            header = tidewater_storage::format::restamp_batch(&mut batch, handle.uid, now)
                .map_err(|e| BrokerError::new(ErrorCode::Internal, e.to_string()))?;
            scan = self.scan_batch(&header, &batch, with_quota, with_supersede, now)?;
        }
        let claimed: Vec<Vec<u8>> = claimed.into_iter().map(|(_, id)| id).collect();
        // Long delays go to the delay log (rare on this path: the batch is rebuilt).
        let park_from = now.saturating_add(limits.park_delay_ms as i64);
        let delay_uid = handle.delay.lock().as_ref().map(|d| d.uid);
        let mut parked = None;
        let mut main = Some(batch);
        if let Some(delay_uid) = delay_uid
            && scan.delays.iter().any(|&(_, at)| at >= park_from)
        {
            let mut skip = vec![false; header.count as usize];
            for &(idx, at) in &scan.delays {
                skip[idx as usize] = at >= park_from;
            }
            let batch = main.take().expect("set above");
            let part = parked_part(&header, &batch, &skip, delay_uid, now);
            if part.n < header.count as u64 {
                let mut rest = without(&header, &batch, &skip, now);
                let rest_header =
                    tidewater_storage::format::restamp_batch(&mut rest, handle.uid, now)
                        .map_err(|e| BrokerError::new(ErrorCode::Internal, e.to_string()))?;
                let demand = std::mem::take(&mut scan.demand);
                scan = self.scan_batch(&rest_header, &rest, false, with_supersede, now)?;
                scan.demand = demand; // quotas count the parked messages too
                main = Some(rest);
            } else {
                scan.bytes = 0;
                scan.delays.clear();
                scan.keyed.clear();
            }
            parked = Some(part);
        }
        let main_n = count as u64 - parked.as_ref().map_or(0, |p| p.n);
        let admission = Admission {
            n: main_n,
            bytes: scan.bytes,
            demand: scan.demand,
            claimed,
            keyed: scan.keyed,
            parked,
        };
        let appended = self.start_append(handle, main, admission, scan.delays, level, started)?;
        Ok(Ok(async move { appended.await.map(|base| (base, count)) }))
    }

    /// Checks every record of a client-built batch against the limits, and gathers what
    /// admission needs (sizes, delays, quota demand, client-chosen ids when deduplicating).
    fn scan_batch(
        &self,
        header: &tidewater_storage::format::BatchHeader,
        batch: &[u8],
        with_quota: bool,
        with_supersede: bool,
        now: i64,
    ) -> Result<BatchScan, BrokerError> {
        let mut scan = BatchScan::default();
        let BatchScan {
            bytes,
            delays,
            demand,
            client_ids,
            keyed,
        } = &mut scan;
        let body = &batch[tidewater_storage::format::BATCH_HEADER_LEN..];
        let mut idx = 0;
        tidewater_storage::format::visit_records(header, body, |record| {
            let delay = if record.deliver_at_ms > 0 {
                Delay::AtMs(record.deliver_at_ms)
            } else {
                Delay::None
            };
            let mut headers = Vec::new();
            let mut tenant = None;
            for (name, value) in record.headers() {
                if name == HEADER_TTL_MS.as_bytes() {
                    check_ttl(idx, value)?;
                } else if name == HEADER_TENANT.as_bytes() {
                    check_tenant(idx, value)?;
                    tenant = Some(value);
                } else if name == HEADER_PRIORITY.as_bytes()
                    && std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u8>().ok())
                        .is_none()
                {
                    return Err(BrokerError::new(
                        ErrorCode::InvalidMessage,
                        format!("message {idx}: {HEADER_PRIORITY} must be a number 0..=255"),
                    ));
                }
                headers.push((name.len(), value.len()));
            }
            if with_quota {
                demand.add(tenant, record.size());
            }
            let at = self.check_message(
                idx,
                record.body.len(),
                Some(record.id.len()),
                record.key.map(<[u8]>::len),
                headers.into_iter(),
                delay,
                now,
            )?;
            if let Some(at) = at {
                delays.push((idx as u32, at));
            }
            if record.flags & RECORD_FLAG_GENERATED_ID == 0 {
                client_ids.push((idx, record.id.to_vec()));
            }
            if with_supersede && let Some(key) = record.key {
                keyed.push((idx as u32, key.to_vec(), record.size()));
            }
            *bytes += record.size();
            idx += 1;
            Ok::<(), BrokerError>(())
        })?;
        Ok(scan)
    }

    /// Admits and submits a batch now (its main-log part, and its long delays for the delay
    /// log, in one write); the future accounts for the outcome and gives the main part's
    /// base offset (the log's end when everything was parked).
    fn start_append(
        &self,
        handle: Arc<QueueHandle>,
        batch: Option<Vec<u8>>,
        admission: Admission,
        delays: Vec<(u32, i64)>,
        level: AckLevel,
        started: std::time::Instant,
    ) -> Result<impl Future<Output = Result<u64, BrokerError>> + Send + 'static, BrokerError> {
        let Admission {
            n,
            bytes,
            demand,
            claimed,
            keyed,
            parked,
        } = admission;
        let (parked_n, parked_bytes) = parked.as_ref().map_or((0, 0), |p| (p.n, p.bytes));
        let (all_n, all_bytes) = (n + parked_n, bytes + parked_bytes);
        let broker = self.clone();
        let lanes = {
            let now = self.now_ms();
            let mut state = handle.state.lock();
            let admitted = state.admit(all_n, all_bytes, now).and_then(|()| {
                state.admit_quota(&demand.as_slice(), now).inspect_err(|_| {
                    state.published(all_n, all_bytes, None);
                })
            });
            if let Err(err) = admitted {
                state.release_ids(&claimed);
                return Err(err);
            }
            // Priority/fairness lanes, resolved while the records are at hand.
            batch.as_deref().and_then(|b| state.lanes_of_batch(b))
        };
        let mut ops = Vec::new();
        if let Some(batch) = batch {
            ops.push(Op::Append {
                uid: handle.uid,
                batch,
            });
        }
        let parked_entries = parked.map(|p| {
            ops.push(Op::Append {
                uid: p.uid,
                batch: p.batch,
            });
            p.entries
        });
        let written = self.submit(ops, level);
        let observer = self.inner.observer.clone();
        Ok(async move {
            let result = written.await;
            let outcome = {
                let mut state = handle.state.lock();
                match result {
                    Ok(results) => {
                        let mut bases = results.iter().filter_map(|r| match r {
                            OpResult::Appended { base_offset, .. } => Some(*base_offset),
                            _ => None,
                        });
                        let main_base = if n > 0 { bases.next() } else { None };
                        let parked_base = parked_entries.as_ref().and_then(|_| bases.next());
                        state.published(n, bytes, main_base.map(|b| (b, &delays[..])));
                        if let (Some(base), Some(lanes)) = (main_base, lanes) {
                            state.stage(base, lanes);
                        }
                        state.published(parked_n, parked_bytes, None);
                        if let (Some(base), Some(entries)) = (parked_base, &parked_entries) {
                            state.park(base, entries);
                            state.counters.published += parked_n;
                        }
                        if let Some(base) = main_base
                            && !keyed.is_empty()
                        {
                            state.supersede(base, &keyed);
                            state.coalesce(base, &keyed, broker.now_ms());
                        }
                        Ok((
                            main_base.unwrap_or(state.visible_end()),
                            state.take_cancelled(),
                        ))
                    }
                    Err(err) => {
                        state.published(all_n, all_bytes, None);
                        state.release_ids(&claimed);
                        state.count_refusal(match err.code {
                            ErrorCode::DiskFull => "disk_full",
                            ErrorCode::Overloaded => "overloaded",
                            _ => "storage",
                        });
                        Err(err)
                    }
                }
            };
            let (base_offset, replaced) = outcome?;
            observer.publish_latency(&handle.name, started.elapsed().as_secs_f64());
            // The messages it replaced are settled before the publish is answered (one
            // unsynced write; if a crash loses it, recovery cancels them again).
            broker.drop_superseded(&handle, replaced).await;
            Ok(base_offset)
        })
    }

    /// Expires leases and fires timers of one queue; dead-letters what ran out of deliveries.
    async fn maintain(&self, handle: &Arc<QueueHandle>) {
        let now = self.now_ms();
        let (retries, to_dlq, woke, too_old) = {
            let mut state = handle.state.lock();
            let expired = state.expire_leases(now);
            if !expired.is_empty() {
                state.overloaded(now);
            }
            if let Err(err) = state.expire_head(&handle.reader, now) {
                tracing::warn!(queue = %handle.name, error = %err, "could not read the queue head for ttl_ms");
            }
            let too_old = state.take_expired();
            let replaced = state.take_cancelled();
            let (coalesced, merges) = state.close_windows(now);
            // An expired lease is deliverable again at once (as with SQS's visibility
            // timeout): the lease was the wait. Backoff is for nacks.
            let (retries, to_dlq) =
                self.plan_retries(&mut state, expired, Some(0), Some(LEASE_EXPIRED_ERROR), now);
            let before = state.stats(now).depth;
            state.fire_timers(now);
            let woke = !retries.is_empty() || state.stats(now).depth > before;
            let woke = woke || !coalesced.is_empty() || !merges.is_empty();
            (
                retries,
                to_dlq,
                woke,
                (too_old, replaced, coalesced, merges),
            )
        };
        let (too_old, replaced, coalesced, merges) = too_old;
        if handle.delay.lock().is_none()
            && let Ok(_admin) = self.inner.admin.try_lock()
            && !handle.deleted.load(Ordering::SeqCst)
            && let Err(err) = self.create_delay_log(handle).await
        {
            tracing::warn!(queue = %handle.name, error = %err, "could not create the delay log; long delays stay in the main log");
        }
        self.unpark_due(handle, now).await;
        self.settle_expired(handle, too_old).await;
        self.drop_superseded(handle, replaced).await;
        self.drop_settling(handle, coalesced, "coalesced").await;
        for window in merges {
            self.merge_window(handle, window).await;
        }
        if !retries.is_empty() {
            // Best effort: a lost retry record only under-counts deliveries after a crash.
            self.inner
                .store
                .submit(retries, AckLevel::Written, Box::new(|_| {}));
        }
        if !to_dlq.is_empty() {
            self.dead_letter(handle, to_dlq).await;
        }
        if woke {
            handle.notify.notify_waiters();
        }
    }

    /// Drops or dead-letters messages past their time to live (already settling).
    async fn settle_expired(&self, handle: &Arc<QueueHandle>, items: Vec<Unacked>) {
        if items.is_empty() {
            return;
        }
        let n = items.len() as u64;
        let now = self.now_ms();
        let on_expire = {
            let mut state = handle.state.lock();
            state.counters.ttl_expired += n;
            for item in &items {
                state.record_attempt(
                    item.offset,
                    item.delivery_count,
                    Some((now, TTL_EXPIRED_ERROR.to_string())),
                );
            }
            state.config.on_expire
        };
        if on_expire == OnExpire::DeadLetter {
            return self.dead_letter(handle, items).await;
        }
        self.drop_settling(handle, items, "expired").await;
    }

    /// Settles messages already marked settling (expired, superseded), without moving them.
    async fn drop_settling(&self, handle: &Arc<QueueHandle>, items: Vec<Unacked>, why: &str) {
        if items.is_empty() {
            return;
        }
        let offsets: Vec<u64> = items.iter().map(|m| m.offset).collect();
        let result = self
            .write(
                vec![Op::Settle {
                    uid: handle.uid,
                    ranges: to_ranges(&offsets),
                }],
                AckLevel::Written,
            )
            .await;
        if let Err(err) = &result {
            tracing::warn!(queue = %handle.name, error = %err, "could not drop {why} messages; they stay queued");
        }
        let settle: Vec<(u64, u64)> = items.iter().map(|m| (m.offset, m.size)).collect();
        handle
            .state
            .lock()
            .finish_settle(&settle, result.is_ok(), self.now_ms());
    }

    /// Replaces a closed `merge` window's messages by one message whose body is a JSON
    /// array of their distinct bodies (strings when UTF-8, else `{"base64": ...}`), in one
    /// journal write: append the merged message, settle the members. If the write fails
    /// the members are delivered one by one instead.
    async fn merge_window(&self, handle: &Arc<QueueHandle>, window: crate::coalesce::Closed) {
        let members = window.members;
        let mut bodies: Vec<serde_json::Value> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut tenant = None;
        for &(offset, _) in &members {
            let Ok(mut records) = handle.reader.read(offset, 1, 1) else {
                continue;
            };
            let Some(record) = records.pop().filter(|r| r.offset == offset) else {
                continue;
            };
            tenant = header(&record, HEADER_TENANT).or(tenant);
            if seen.insert(record.body.clone()) {
                bodies.push(match std::str::from_utf8(&record.body) {
                    Ok(text) => serde_json::Value::String(text.to_string()),
                    Err(_) => serde_json::json!({"base64": base64::engine::general_purpose::STANDARD.encode(&record.body)}),
                });
            }
        }
        let body = serde_json::Value::Array(bodies).to_string().into_bytes();
        let count = members.len().to_string();
        let now = self.now_ms();
        let id = new_message_id(now);
        let mut headers: Vec<(&[u8], &[u8])> = vec![(HEADER_MERGED.as_bytes(), count.as_bytes())];
        if let Some(tenant) = &tenant {
            headers.push((HEADER_TENANT.as_bytes(), tenant.as_bytes()));
        }
        let bytes = (body.len()
            + window.key.len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()) as u64;
        let mut builder = BatchBuilder::new(handle.uid, now);
        builder.push(&NewRecord {
            id: &id,
            generated_id: true,
            key: Some(&window.key),
            headers,
            deliver_at_ms: 0,
            body: &body,
        });
        let offsets: Vec<u64> = members.iter().map(|m| m.0).collect();
        // A merge replaces accepted messages: it bypasses capacity, like a DLQ move.
        handle.state.lock().reserve_unchecked(1, bytes);
        let result = self
            .write(
                vec![
                    Op::Append {
                        uid: handle.uid,
                        batch: builder.finish(),
                    },
                    Op::Settle {
                        uid: handle.uid,
                        ranges: to_ranges(&offsets),
                    },
                ],
                AckLevel::Durable,
            )
            .await;
        let now = self.now_ms();
        let mut state = handle.state.lock();
        match result {
            Ok(results) => {
                if let Some(&OpResult::Appended { base_offset, .. }) = results.first() {
                    state.published(1, bytes, Some((base_offset, &[])));
                    state.make_ready(base_offset);
                } else {
                    state.published(1, bytes, None);
                }
                state.finish_settle(&members, true, now);
            }
            Err(err) => {
                tracing::warn!(queue = %handle.name, error = %err, "could not merge a coalescing window; its messages go out one by one");
                state.published(1, bytes, None);
                state.finish_settle(&members, false, now);
            }
        }
    }

    /// Drops messages superseded by a newer one with their key, and counts them.
    async fn drop_superseded(&self, handle: &Arc<QueueHandle>, items: Vec<Unacked>) {
        if items.is_empty() {
            return;
        }
        handle.state.lock().counters.superseded += items.len() as u64;
        self.drop_settling(handle, items, "superseded").await;
    }

    /// Decides, for each released message, another delivery later or the DLQ.
    fn plan_retries(
        &self,
        state: &mut QueueState,
        released: Vec<Unacked>,
        delay_ms: Option<u64>,
        error: Option<&str>,
        now: i64,
    ) -> (Vec<Op>, Vec<Unacked>) {
        let mut ops = Vec::new();
        let mut to_dlq = Vec::new();
        let max = state.config.max_deliveries;
        for msg in released {
            let error_text = error.unwrap_or("").to_string();
            let error_entry = (!error_text.is_empty()).then(|| (now, error_text.clone()));
            if max > 0 && msg.delivery_count >= max && state.config.dead_letter_queue.is_some() {
                state.record_attempt(msg.offset, msg.delivery_count, error_entry);
                to_dlq.push(msg);
                continue;
            }
            let wait = delay_ms.unwrap_or_else(|| {
                state
                    .config
                    .backoff
                    .delay_ms(msg.delivery_count, self.inner.jitter.unit())
            });
            let deliver_at = now + wait as i64;
            state.schedule_retry(msg.offset, msg.delivery_count, deliver_at, error_entry, now);
            ops.push(Op::Retry {
                uid: state.uid,
                offset: msg.offset,
                deliver_at_ms: deliver_at,
                delivery_count: msg.delivery_count,
                at_ms: now,
                error: error_text,
            });
        }
        let dlq_offsets: Vec<u64> = to_dlq.iter().map(|m| m.offset).collect();
        state.begin_settle(&dlq_offsets);
        (ops, to_dlq)
    }

    /// Moves messages to their queue's dead-letter queue with their history.
    async fn dead_letter(&self, handle: &Arc<QueueHandle>, items: Vec<Unacked>) {
        let settle: Vec<(u64, u64)> = items.iter().map(|m| (m.offset, m.size)).collect();
        let result = self.try_dead_letter(handle, &items).await;
        let now = self.now_ms();
        let mut state = handle.state.lock();
        match result {
            Ok(()) => {
                state.counters.dead_lettered += items.len() as u64;
                state.finish_settle(&settle, true, now);
            }
            Err(err) => {
                tracing::warn!(queue = %handle.name, error = %err, "dead-lettering failed; the messages stay in the queue");
                state.finish_settle(&settle, false, now);
            }
        }
    }

    async fn try_dead_letter(
        &self,
        handle: &Arc<QueueHandle>,
        items: &[Unacked],
    ) -> Result<(), BrokerError> {
        let dlq_name = handle
            .state
            .lock()
            .config
            .dead_letter_queue
            .clone()
            .ok_or_else(|| BrokerError::invalid("no dead-letter queue"))?;
        let dlq = self.dead_letter_target(&dlq_name).await?;
        let now = self.now_ms();
        let mut records = Vec::with_capacity(items.len());
        for item in items {
            let Some(record) = handle
                .reader
                .read(item.offset, 1, 1)
                .map_err(storage_error)?
                .pop()
            else {
                continue;
            };
            let history = handle
                .state
                .lock()
                .history(item.offset)
                .cloned()
                .unwrap_or_default();
            let mut headers: Vec<(String, String)> = record
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .filter(|(k, _)| !k.starts_with("tidewater-"))
                .collect();
            let errors: Vec<serde_json::Value> = history
                .errors
                .iter()
                .map(|(at, text)| serde_json::json!({"at": at, "error": text}))
                .collect();
            headers.push((HEADER_SOURCE_QUEUE.into(), handle.name.clone()));
            headers.push((
                HEADER_DELIVERY_COUNT.into(),
                item.delivery_count.to_string(),
            ));
            headers.push((
                HEADER_LAST_ERROR.into(),
                history
                    .errors
                    .back()
                    .map(|(_, e)| e.clone())
                    .unwrap_or_default(),
            ));
            headers.push((
                HEADER_ERRORS.into(),
                serde_json::Value::Array(errors).to_string(),
            ));
            headers.push((
                HEADER_PUBLISHED_AT.into(),
                record.published_at_ms.to_string(),
            ));
            headers.push((HEADER_DEAD_LETTERED_AT.into(), now.to_string()));
            records.push((record, headers));
        }
        self.move_records(&dlq, handle, records).await
    }

    /// Appends records to `target` and settles them in `source`, in one journal write.
    async fn move_records(
        &self,
        target: &Arc<QueueHandle>,
        source: &Arc<QueueHandle>,
        records: Vec<(Record, Vec<(String, String)>)>,
    ) -> Result<(), BrokerError> {
        if records.is_empty() {
            return Ok(());
        }
        let now = self.now_ms();
        let mut builder = BatchBuilder::new(target.uid, now);
        let mut bytes = 0;
        let mut offsets = Vec::with_capacity(records.len());
        for (record, headers) in &records {
            let header_refs: Vec<(&[u8], &[u8])> = headers
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                .collect();
            builder.push(&NewRecord {
                id: &record.id,
                generated_id: record.flags & RECORD_FLAG_GENERATED_ID != 0,
                key: record.key.as_deref(),
                headers: header_refs,
                deliver_at_ms: 0,
                body: &record.body,
            });
            bytes += (record.body.len()
                + record.key.as_ref().map_or(0, |k| k.len())
                + headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()) as u64;
            offsets.push(record.offset);
        }
        let n = records.len() as u64;
        // Moves bypass capacity: a message already accepted is never dropped to make room.
        target.state.lock().reserve_unchecked(n, bytes);
        let ops = vec![
            Op::Append {
                uid: target.uid,
                batch: builder.finish(),
            },
            Op::Settle {
                uid: source.uid,
                ranges: to_ranges(&offsets),
            },
        ];
        let result = self.write(ops, AckLevel::Durable).await;
        let mut state = target.state.lock();
        match result {
            Ok(results) => {
                if let Some(&OpResult::Appended { base_offset, .. }) = results.first() {
                    state.published(n, bytes, Some((base_offset, &[])));
                }
                Ok(())
            }
            Err(err) => {
                state.published(n, bytes, None);
                Err(err)
            }
        }
    }

    /// Long-polls for up to `max` messages, leased for `lease_ms` (or the queue's default).
    pub async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait_ms: u64,
        lease_ms: Option<u64>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let limits = &self.inner.limits;
        if max == 0 || max > limits.max_receive_messages {
            return Err(BrokerError::invalid(format!(
                "max must be 1..={} (max_receive_messages)",
                limits.max_receive_messages
            )));
        }
        if wait_ms > limits.max_wait_ms {
            return Err(BrokerError::invalid(format!(
                "wait_ms must be at most {} (max_wait_ms)",
                limits.max_wait_ms
            )));
        }
        check_lease_ms(lease_ms)?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        loop {
            let handle = self.queue(queue)?;
            let notified = handle.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.maintain(&handle).await;
            let (deliveries, wakeup, too_old) = {
                let mut state = handle.state.lock();
                let now = self.now_ms();
                let lease = lease_ms.unwrap_or(state.config.lease_ms);
                let deliveries = state
                    .deliver(&handle.reader, now, max, lease)
                    .map_err(storage_error)?;
                (
                    deliveries,
                    state.next_wakeup().map(|at| (at - now).max(1) as u64),
                    state.take_expired(),
                )
            };
            if !too_old.is_empty() {
                self.settle_expired(&handle, too_old).await;
                if deliveries.is_empty() {
                    continue; // look again at once: what followed them may be deliverable
                }
            }
            if !deliveries.is_empty()
                || tokio::time::Instant::now() >= deadline
                || self.inner.closing.load(Ordering::SeqCst)
            {
                return Ok(deliveries);
            }
            let mut sleep_until = deadline;
            if let Some(ms) = wakeup {
                sleep_until =
                    sleep_until.min(tokio::time::Instant::now() + Duration::from_millis(ms));
            }
            let _ = tokio::time::timeout_at(sleep_until, notified).await;
            if handle.deleted.load(Ordering::SeqCst) {
                return Err(BrokerError::queue_not_found(queue));
            }
        }
    }

    fn check_receipt_count<S>(&self, receipts: &[S]) -> Result<(), BrokerError> {
        let max = self.inner.limits.max_receive_messages;
        if receipts.len() > max {
            return Err(BrokerError::new(
                ErrorCode::BatchTooLarge,
                format!(
                    "{} receipts exceed the limit of {max} per request (max_receive_messages)",
                    receipts.len()
                ),
            ));
        }
        Ok(())
    }

    /// Validates receipts and ends their leases; returns (released, failures).
    fn release_receipts<S: AsRef<str>>(
        &self,
        handle: &QueueHandle,
        receipts: &[S],
        now: i64,
    ) -> Result<Released, BrokerError> {
        self.check_receipt_count(receipts)?;
        let mut state = handle.state.lock();
        let mut released = Vec::with_capacity(receipts.len());
        let mut failed = Vec::new();
        for receipt in receipts.iter().map(AsRef::as_ref) {
            match state.check_receipt(receipt, now) {
                Ok(parsed) => {
                    if let Some(lease) = state.release(parsed.offset) {
                        released.push((parsed.offset, lease));
                    }
                }
                Err(code) => failed.push(ReceiptFailure {
                    receipt: receipt.to_string(),
                    code: code.as_str(),
                }),
            }
        }
        Ok((released, failed))
    }

    /// Settles leased messages for good. Replies after the settle record is durable.
    /// (Receipts as `String`s or borrowed `&str`s.)
    pub async fn ack<S: AsRef<str> + Sync>(
        &self,
        queue: &str,
        receipts: &[S],
    ) -> Result<SettleReply, BrokerError> {
        let handle = self.queue(queue)?;
        let now = self.now_ms();
        let superseded: Vec<String> = {
            let state = handle.state.lock();
            if state.config.supersede {
                receipts
                    .iter()
                    .map(AsRef::as_ref)
                    .filter(|r| {
                        state
                            .check_receipt(r, now)
                            .is_ok_and(|p| state.is_superseded(p.offset))
                    })
                    .map(str::to_string)
                    .collect()
            } else {
                Vec::new()
            }
        };
        let (released, failed) = self.release_receipts(&handle, receipts, now)?;
        if released.is_empty() {
            return Ok(SettleReply {
                ok: 0,
                failed,
                superseded,
            });
        }
        let offsets: Vec<u64> = released.iter().map(|(o, _)| *o).collect();
        handle.state.lock().begin_settle(&offsets);
        let result = self
            .write(
                vec![Op::Settle {
                    uid: handle.uid,
                    ranges: to_ranges(&offsets),
                }],
                AckLevel::Durable,
            )
            .await;
        let sizes: Vec<(u64, u64)> = released.iter().map(|(o, l)| (*o, l.size)).collect();
        let now = self.now_ms();
        let mut state = handle.state.lock();
        state.finish_settle(&sizes, result.is_ok(), now);
        result?;
        state.counters.acked += released.len() as u64;
        state.succeeded(now);
        // Settling can make messages deliverable: a key's next message, or room under
        // max_in_flight. Wake long-polls so they do not sleep until their timeout.
        let unblocked = state.may_deliver_after_settle();
        drop(state);
        if unblocked {
            handle.notify.notify_waiters();
        }
        let latencies: Vec<f64> = released
            .iter()
            .map(|(_, l)| (now - l.published_at_ms).max(0) as f64 / 1000.0)
            .collect();
        self.inner.observer.publish_to_ack(&handle.name, &latencies);
        Ok(SettleReply {
            ok: released.len() as u64,
            failed,
            superseded,
        })
    }

    /// Ends leases without success: another delivery after `delay_ms` (or the queue's
    /// backoff), or the dead-letter queue once `max_deliveries` is reached.
    pub async fn nack<S: AsRef<str> + Sync>(
        &self,
        queue: &str,
        receipts: &[S],
        delay_ms: Option<u64>,
        error: Option<&str>,
        reason: NackReason,
    ) -> Result<SettleReply, BrokerError> {
        if let Some(delay) = delay_ms
            && delay > self.inner.limits.max_delay_ms
        {
            return Err(BrokerError::invalid(format!(
                "delay_ms must be at most {} (max_delay_ms)",
                self.inner.limits.max_delay_ms
            )));
        }
        let handle = self.queue(queue)?;
        let now = self.now_ms();
        let (released, failed) = self.release_receipts(&handle, receipts, now)?;
        let n = released.len() as u64;
        let (ops, to_dlq) = {
            let mut state = handle.state.lock();
            state.counters.nacked += n;
            if reason == NackReason::Overloaded && n > 0 {
                state.overloaded(now);
            }
            let unacked = released
                .into_iter()
                .map(|(offset, l)| Unacked {
                    offset,
                    delivery_count: l.delivery_count,
                    size: l.size,
                })
                .collect();
            self.plan_retries(&mut state, unacked, delay_ms, error, now)
        };
        if !ops.is_empty() {
            // The retry is already scheduled in memory; a failed write only loses history.
            if let Err(err) = self.write(ops, AckLevel::Durable).await {
                tracing::warn!(queue, error = %err, "could not journal nack");
            }
        }
        if !to_dlq.is_empty() {
            self.dead_letter(&handle, to_dlq).await;
        }
        handle.notify.notify_waiters();
        Ok(SettleReply {
            ok: n,
            failed,
            ..SettleReply::default()
        })
    }

    /// Extends leases to `lease_ms` from now (or the queue's default).
    pub fn extend<S: AsRef<str>>(
        &self,
        queue: &str,
        receipts: &[S],
        lease_ms: Option<u64>,
    ) -> Result<SettleReply, BrokerError> {
        check_lease_ms(lease_ms)?;
        let handle = self.queue(queue)?;
        self.check_receipt_count(receipts)?;
        let now = self.now_ms();
        let mut state = handle.state.lock();
        let lease = lease_ms.unwrap_or(state.config.lease_ms);
        let mut reply = SettleReply::default();
        for receipt in receipts.iter().map(AsRef::as_ref) {
            match state.check_receipt(receipt, now) {
                // A newer message replaced it: tell the consumer to stop (CI "cancel in progress").
                Ok(parsed) if state.is_superseded(parsed.offset) => {
                    reply.failed.push(ReceiptFailure {
                        receipt: receipt.to_string(),
                        code: ErrorCode::Superseded.as_str(),
                    })
                }
                Ok(parsed) => {
                    state.extend(parsed.offset, now, lease);
                    reply.ok += 1;
                }
                Err(code) => reply.failed.push(ReceiptFailure {
                    receipt: receipt.to_string(),
                    code: code.as_str(),
                }),
            }
        }
        Ok(reply)
    }

    /// Settles every message accepted so far (leased ones included; their receipts go stale).
    pub async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let handle = self.queue(queue)?;
        let ((range, bytes), parked) = {
            let state = handle.state.lock();
            (state.purge_range(), state.parked_offsets())
        };
        let mut ops = Vec::new();
        if !range.is_empty() {
            ops.push(Op::Settle {
                uid: handle.uid,
                ranges: vec![range.clone()],
            });
        }
        let delay_uid = handle.delay.lock().as_ref().map(|d| d.uid);
        if let Some(uid) = delay_uid
            && !parked.is_empty()
        {
            ops.push(Op::Settle {
                uid,
                ranges: to_ranges(&parked),
            });
        }
        if !ops.is_empty() {
            self.write(ops, AckLevel::Durable).await?;
        }
        let removed = {
            let mut state = handle.state.lock();
            let mut removed = state.apply_purge(range, bytes);
            if !parked.is_empty() {
                removed += state.forget_parked();
                state.counters.purged += parked.len() as u64;
            }
            removed
        };
        handle.notify.notify_waiters();
        Ok(removed)
    }

    /// Up to `max` unleased messages from offset `from` on, without leasing them.
    pub fn peek(&self, queue: &str, from: u64, max: usize) -> Result<Vec<Peeked>, BrokerError> {
        let handle = self.queue(queue)?;
        if max == 0 || max > self.inner.limits.max_receive_messages {
            return Err(BrokerError::invalid(format!(
                "max must be 1..={}",
                self.inner.limits.max_receive_messages
            )));
        }
        let (offsets, counts): (Vec<u64>, Vec<u32>) = {
            let state = handle.state.lock();
            let offsets = state.pending_offsets(from, max);
            let counts = offsets
                .iter()
                .map(|o| state.history(*o).map_or(0, |h| h.delivery_count))
                .collect();
            (offsets, counts)
        };
        // One sequential read over the span, keeping the pending offsets.
        let mut out = Vec::with_capacity(offsets.len());
        let (Some(&first), Some(&last)) = (offsets.first(), offsets.last()) else {
            return Ok(out);
        };
        let wanted: HashMap<u64, u32> = offsets.into_iter().zip(counts).collect();
        let mut from = first;
        while from <= last {
            let records = handle
                .reader
                .read(from, (last - from + 1) as usize, 16 << 20)
                .map_err(storage_error)?;
            let Some(end) = records.last().map(|r| r.offset + 1) else {
                break;
            };
            from = end;
            for record in records {
                if let Some(&delivery_count) = wanted.get(&record.offset) {
                    out.push(Peeked {
                        record,
                        delivery_count,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Runs lease expiry, timers and the disk probe for every queue; the server calls
    /// this periodically (tests call it after moving their clock).
    pub async fn run_maintenance(&self) {
        let handles: Vec<_> = self.inner.queues.read().values().cloned().collect();
        for handle in handles {
            self.maintain(&handle).await;
        }
    }

    /// Starts the periodic maintenance task on the current tokio runtime.
    pub fn spawn_maintenance(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let broker = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                broker.run_maintenance().await;
                n += 1;
                if n.is_multiple_of(10) {
                    broker.refresh_disk();
                }
            }
        })
    }

    // ---- redrive ----

    /// Starts moving messages out of a dead-letter queue at a bounded rate. A redrive moves
    /// only what the queue held when it started (never what arrives later, so it ends), never
    /// into the queue it reads from, and never against a running redrive the other way.
    pub fn start_redrive(
        &self,
        dlq: &str,
        req: RedriveRequest,
    ) -> Result<RedriveProgress, BrokerError> {
        let handle = self.queue(dlq)?;
        if req.rate_per_s == 0 || req.rate_per_s > 100_000 {
            return Err(BrokerError::invalid("rate_per_s must be 1..=100000"));
        }
        if let Some(to) = &req.to {
            self.queue(to)?;
            if to == dlq {
                return Err(BrokerError::new(
                    ErrorCode::ConfigConflict,
                    format!("a redrive cannot move messages from '{dlq}' into '{dlq}' itself"),
                ));
            }
        }
        let mut redrives = self.inner.redrives.lock();
        if let Some(to) = &req.to
            && let Some(other) = redrives.iter().find(|r| {
                r.running() && r.to.as_deref() == Some(dlq) && r.progress.lock().queue == *to
            })
        {
            return Err(BrokerError::new(
                ErrorCode::ConfigConflict,
                format!(
                    "redrive {} is moving messages from '{to}' into '{dlq}': this one would move them back (a cycle); cancel it first",
                    other.progress.lock().id
                ),
            ));
        }
        if redrives.len() >= MAX_REDRIVES_KEPT {
            // Forget the oldest finished one; if all are running, refuse.
            let Some(at) = redrives.iter().position(|r| !r.running()) else {
                return Err(BrokerError::new(
                    ErrorCode::Overloaded,
                    format!("{MAX_REDRIVES_KEPT} redrives are running; wait for one to finish or cancel one"),
                )
                .retry_after(1_000));
            };
            redrives.remove(at);
        }
        let id = format!(
            "rd-{}",
            self.inner.next_redrive.fetch_add(1, Ordering::Relaxed)
        );
        let (total, end) = {
            let state = handle.state.lock();
            (state.unsettled(), state.visible_end())
        };
        let task = Arc::new(RedriveTask {
            progress: Mutex::new(RedriveProgress {
                id: id.clone(),
                queue: dlq.to_string(),
                moved: 0,
                remaining: if req.max > 0 {
                    total.min(req.max)
                } else {
                    total
                },
                skipped: 0,
                state: "running",
                error: None,
            }),
            to: req.to.clone(),
            cancel: AtomicBool::new(false),
            wake: Notify::new(),
        });
        redrives.push(task.clone());
        drop(redrives);
        let broker = self.clone();
        let snapshot = task.progress.lock().clone();
        tokio::spawn(async move {
            let result = broker.run_redrive(&handle, &req, end, &task).await;
            let mut p = task.progress.lock();
            match result {
                Ok(()) if task.cancel.load(Ordering::SeqCst) => p.state = "cancelled",
                Ok(()) => {
                    p.state = "done";
                    p.remaining = 0;
                }
                Err(err) => {
                    p.state = "failed";
                    p.error = Some(err.to_string());
                }
            }
        });
        Ok(snapshot)
    }

    pub fn redrive_progress(&self, id: &str) -> Result<RedriveProgress, BrokerError> {
        self.find_redrive(id).map(|r| r.progress.lock().clone())
    }

    fn find_redrive(&self, id: &str) -> Result<Arc<RedriveTask>, BrokerError> {
        let redrives = self.inner.redrives.lock();
        redrives
            .iter()
            .find(|r| r.progress.lock().id == id)
            .cloned()
            .ok_or_else(|| {
                BrokerError::new(ErrorCode::RedriveNotFound, format!("no redrive '{id}'"))
            })
    }

    /// Redrives kept (the last 100), oldest first.
    pub fn list_redrives(&self) -> Vec<RedriveProgress> {
        let redrives = self.inner.redrives.lock();
        redrives.iter().map(|r| r.progress.lock().clone()).collect()
    }

    /// Stops a running redrive after the step in progress (what it moved stays moved).
    /// Cancelling a finished one changes nothing.
    pub async fn cancel_redrive(&self, id: &str) -> Result<RedriveProgress, BrokerError> {
        let task = self.find_redrive(id)?;
        task.cancel.store(true, Ordering::SeqCst);
        task.wake.notify_one();
        // The task notices within one step; wait (bounded) so the reply shows the end.
        for _ in 0..100 {
            if !task.running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(task.progress.lock().clone())
    }

    async fn run_redrive(
        &self,
        dlq: &Arc<QueueHandle>,
        req: &RedriveRequest,
        end: u64,
        task: &RedriveTask,
    ) -> Result<(), BrokerError> {
        let progress = &task.progress;
        let steps_per_s = req.rate_per_s.clamp(1, 10);
        let per_step = (req.rate_per_s / steps_per_s).clamp(1, 1_000) as usize;
        let mut tick = tokio::time::interval(Duration::from_millis(1_000 / steps_per_s));
        let mut scan_from = 0u64;
        let mut moved_total = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = task.wake.notified() => {}
            }
            if task.cancel.load(Ordering::SeqCst) || dlq.deleted.load(Ordering::SeqCst) {
                return Ok(());
            }
            let budget = if req.max > 0 {
                (req.max - moved_total).min(per_step as u64) as usize
            } else {
                per_step
            };
            if budget == 0 {
                return Ok(());
            }
            // Only what the queue held at the start: a redrive always ends.
            let mut offsets = dlq.state.lock().pending_offsets(scan_from, budget * 4);
            offsets.retain(|&offset| offset < end);
            let Some(&last) = offsets.last() else {
                return Ok(());
            };
            scan_from = last + 1;
            // Read, filter, group by target.
            let mut by_target: HashMap<String, Vec<Record>> = HashMap::new();
            let mut skipped = 0;
            for offset in offsets {
                if by_target.values().map(Vec::len).sum::<usize>() >= budget {
                    scan_from = offset;
                    break;
                }
                let Some(record) = dlq.reader.read(offset, 1, 1).map_err(storage_error)?.pop()
                else {
                    continue;
                };
                if record.offset != offset || !redrive_matches(&record, req) {
                    skipped += 1;
                    continue;
                }
                let target = req
                    .to
                    .clone()
                    .or_else(|| header(&record, HEADER_SOURCE_QUEUE));
                match target {
                    // Never into the queue it reads from.
                    Some(target) if target != dlq.name => {
                        by_target.entry(target).or_default().push(record);
                    }
                    _ => skipped += 1,
                }
            }
            let mut moved = 0;
            for (target_name, records) in by_target {
                let Ok(target) = self.queue(&target_name) else {
                    skipped += records.len() as u64;
                    continue;
                };
                let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
                let claimed = dlq.state.lock().claim(&offsets);
                let records: Vec<(Record, Vec<(String, String)>)> = records
                    .into_iter()
                    .filter(|r| claimed.contains(&r.offset))
                    .map(|r| {
                        let headers = r
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    String::from_utf8_lossy(k).into_owned(),
                                    String::from_utf8_lossy(v).into_owned(),
                                )
                            })
                            .collect();
                        (r, headers)
                    })
                    .collect();
                let sizes: Vec<(u64, u64)> =
                    records.iter().map(|(r, _)| (r.offset, r.size())).collect();
                let result = self.move_records(&target, dlq, records).await;
                let now = self.now_ms();
                dlq.state.lock().finish_settle(&sizes, result.is_ok(), now);
                result?;
                moved += sizes.len() as u64;
                target.notify.notify_waiters();
            }
            moved_total += moved;
            let remaining = dlq.state.lock().unsettled();
            let mut p = progress.lock();
            p.moved = moved_total;
            p.skipped += skipped;
            p.remaining = remaining.saturating_sub(p.skipped);
            if req.max > 0 {
                p.remaining = p.remaining.min(req.max - moved_total);
            }
            dlq.state.lock().counters.redriven += moved;
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
    }
}

/// A message's tenant (JSON field, or the reserved header in a record batch).
fn check_tenant(idx: usize, value: &[u8]) -> Result<(), BrokerError> {
    if value.is_empty() || value.len() > MAX_TENANT_LEN || std::str::from_utf8(value).is_err() {
        return Err(BrokerError::new(
            ErrorCode::InvalidMessage,
            format!(
                "message {idx}: tenant ({HEADER_TENANT}) must be 1..={MAX_TENANT_LEN} bytes of UTF-8"
            ),
        ));
    }
    Ok(())
}

/// A message's own ttl_ms (JSON field, or the reserved header in a record batch).
fn check_ttl(idx: usize, value: &[u8]) -> Result<(), BrokerError> {
    match std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(ttl) if (1..=MAX_TTL_MS).contains(&ttl) => Ok(()),
        _ => Err(BrokerError::new(
            ErrorCode::InvalidMessage,
            format!(
                "message {idx}: ttl_ms ({HEADER_TTL_MS}) must be 1..={MAX_TTL_MS} (30 days), got '{}'",
                String::from_utf8_lossy(value)
            ),
        )),
    }
}

fn redrive_matches(record: &Record, req: &RedriveRequest) -> bool {
    if let Some(key) = &req.key
        && record.key.as_deref() != Some(key.as_bytes())
    {
        return false;
    }
    if let Some(text) = &req.error_contains
        && !header(record, HEADER_LAST_ERROR).is_some_and(|e| e.contains(text.as_str()))
    {
        return false;
    }
    true
}

pub fn header(record: &Record, name: &str) -> Option<String> {
    record
        .headers
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// Sorted offsets as coalesced ranges.
fn to_ranges(offsets: &[u64]) -> Vec<Range<u64>> {
    let mut sorted = offsets.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<Range<u64>> = Vec::new();
    for offset in sorted {
        match out.last_mut() {
            Some(last) if last.end == offset => last.end += 1,
            Some(last) if last.end > offset => {}
            _ => out.push(offset..offset + 1),
        }
    }
    out
}

/// 16 bytes: 6 of milliseconds (sortable by time) and 10 random.
fn new_message_id(now_ms: i64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..6].copy_from_slice(&(now_ms as u64).to_be_bytes()[2..]);
    id[6..14].copy_from_slice(&fastrand::u64(..).to_le_bytes());
    id[14..].copy_from_slice(&fastrand::u16(..).to_le_bytes());
    id
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// The id of a record as shown to clients.
pub fn record_id(record: &Record) -> String {
    if record.flags & RECORD_FLAG_GENERATED_ID != 0 {
        hex(&record.id)
    } else {
        String::from_utf8_lossy(&record.id).into_owned()
    }
}

/// A requested lease, if any, is 1..=MAX_LEASE_MS.
fn check_lease_ms(lease_ms: Option<u64>) -> Result<(), BrokerError> {
    match lease_ms {
        Some(lease) if !(1..=MAX_LEASE_MS).contains(&lease) => Err(BrokerError::invalid(format!(
            "lease_ms must be 1..={MAX_LEASE_MS} (12 h)"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (fuzz target `publish`): a JSON publish whose `deliver_at` was far
    /// in the past (i64::MIN) overflowed `at - now`: a panic where overflow is checked, and
    /// a refusal as "too far ahead" where it wraps. It is due at once.
    #[tokio::test]
    async fn a_deliver_at_far_in_the_past_is_due_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(dir.path(), BrokerOptions::default()).unwrap();
        broker
            .put_queue("q", &ConfigPatch::default())
            .await
            .unwrap();
        let message = NewMessage {
            body: b"x".to_vec(),
            delay: Delay::AtMs(i64::MIN),
            ..Default::default()
        };
        broker
            .publish("q", &[message], AckLevel::Durable)
            .await
            .unwrap();
        broker.shutdown();
    }

    #[test]
    fn ranges_coalesce() {
        assert_eq!(to_ranges(&[5, 1, 2, 3, 9, 2]), vec![1..4, 5..6, 9..10]);
        assert!(to_ranges(&[]).is_empty());
    }
}
