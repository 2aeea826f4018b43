//! Queues: create, configure, delete, list.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tidewater_storage::{AckLevel, Op, OpResult};
use tokio::sync::Notify;

use super::{Broker, QueueHandle};
use crate::config::{ConfigPatch, Limits, QueueConfig, validate_queue_name};
use crate::error::{BrokerError, ErrorCode};
use crate::queue::{QueueState, QueueStats};

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

/// Tells storage how long to remember a queue's client-chosen ids (deduplication).
pub(crate) fn id_window_op(uid: u64, config: &QueueConfig, limits: &Limits) -> Op {
    Op::IdWindow {
        uid,
        window_ms: config.dedup_window_ms,
        max: limits.max_dedup_ids,
    }
}

impl Broker {
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

    pub(super) async fn create_locked(
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
            reader: super::Records::Log(reader),
            deleted: AtomicBool::new(false),
            consumers: Mutex::new(crate::forecast::Seen::default()),
            delay: Mutex::new(None),
            subscription: None,
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

    /// The dead-letter queue for `name`, created with DLQ defaults when missing.
    pub(super) async fn dead_letter_target(
        &self,
        dlq: &str,
    ) -> Result<Arc<QueueHandle>, BrokerError> {
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

    pub(super) fn info(&self, handle: &QueueHandle) -> QueueInfo {
        let forecast = self.forecast_of(handle);
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
            stats: QueueStats {
                forecast: Some(forecast),
                ..state.stats(self.now_ms())
            },
            refused,
            quota_refused: state.quota_refusals(),
            disk_bytes: handle.reader.log().disk_bytes(),
            read_bytes: handle.reader.log().bytes_read(),
        }
    }

    /// A queue's log uid: stable for as long as it lives (one made again gets another).
    pub fn queue_uid(&self, name: &str) -> Result<u64, BrokerError> {
        Ok(self.queue(name)?.uid)
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
}
