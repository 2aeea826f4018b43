//! Push endpoints: their definitions, durable in the `#pushes` catalog (`catalog.rs`), and
//! what the server's push workers read of them (`PushHandle`): the configuration in force,
//! the circuit breaker and the counters. The workers take messages with `receive` and
//! settle them with `ack`, `nack`, `extend` and `reject`, as any consumer does, so every
//! flow-control setting of the source applies unchanged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;
use parking_lot::{Mutex, RwLock};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tidewater_storage::{RecoveredLog, Store};
use tokio::sync::Notify;

use super::Broker;
use super::catalog::Catalog;
use crate::error::{BrokerError, ErrorCode};
use crate::push::{
    Breaker, BreakerState, PushConfig, PushCounters, PushPatch, PushStats, validate_push_name,
};

/// The name of the log holding push endpoints (no queue or stream can have it).
pub(crate) const PUSHES_LOG: &str = "#pushes";

const PUSH_PREFIX: &str = "push:";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredPush {
    config: PushConfig,
    created_at_ms: i64,
}

/// A push endpoint in force. Its configuration is replaced whole by a change; the breaker
/// and counters stay (reset at restart).
pub struct PushHandle {
    pub name: String,
    stored: RwLock<StoredPush>,
    pub breaker: Mutex<Breaker>,
    pub counters: PushCounters,
    deleted: AtomicBool,
    /// Notified when the endpoint changes or is deleted (its worker looks again).
    pub changed: Notify,
}

impl PushHandle {
    pub fn config(&self) -> PushConfig {
        self.stored.read().config.clone()
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Relaxed)
    }

    fn info(&self, now: i64) -> PushInfo {
        let stored = self.stored.read();
        let breaker = self.breaker.lock();
        PushInfo {
            name: self.name.clone(),
            config: stored.config.shown(),
            created_at_ms: stored.created_at_ms,
            breaker: breaker.state(now),
            breaker_opens: breaker.opens,
            stats: self.counters.stats(),
        }
    }
}

/// A push endpoint as shown.
#[derive(Debug, Clone, Serialize)]
pub struct PushInfo {
    pub name: String,
    pub config: serde_json::Value,
    pub created_at_ms: i64,
    pub breaker: BreakerState,
    /// Times the breaker opened since the server started.
    pub breaker_opens: u64,
    pub stats: PushStats,
}

pub(crate) struct Pushes {
    log: tokio::sync::Mutex<Catalog>,
    map: RwLock<HashMap<String, Arc<PushHandle>>>,
    /// Notified when an endpoint is created or deleted.
    pub(crate) changed: Notify,
}

fn new_handle(name: &str, stored: StoredPush) -> PushHandle {
    PushHandle {
        name: name.to_string(),
        breaker: Mutex::new(Breaker::new(stored.config.breaker.clone())),
        stored: RwLock::new(stored),
        counters: PushCounters::default(),
        deleted: AtomicBool::new(false),
        changed: Notify::new(),
    }
}

impl Pushes {
    pub(crate) fn recover(store: &Store, log: Option<RecoveredLog>) -> Result<Pushes, String> {
        let (catalog, entries) = Catalog::recover(PUSHES_LOG, store, log)?;
        let map = catalog
            .decode::<StoredPush>(entries, PUSH_PREFIX)?
            .into_iter()
            .map(|(name, stored)| {
                let handle = Arc::new(new_handle(&name, stored));
                (name, handle)
            })
            .collect();
        Ok(Pushes {
            log: tokio::sync::Mutex::new(catalog),
            map: RwLock::new(map),
            changed: Notify::new(),
        })
    }
}

/// A new Standard Webhooks secret: `whsec_` and the base64 of 32 random bytes.
fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

fn push_not_found(name: &str) -> BrokerError {
    BrokerError::new(
        ErrorCode::PushNotFound,
        format!("push endpoint '{name}' does not exist"),
    )
}

impl Broker {
    /// Creates a push endpoint, or changes one. Its source must exist. Returns whether it
    /// was created, and when it was, the secret requests are signed with (shown once).
    pub async fn put_push(
        &self,
        name: &str,
        patch: &PushPatch,
    ) -> Result<(bool, PushInfo, Option<String>), BrokerError> {
        validate_push_name(name)?;
        let limits = &self.inner.limits;
        let mut log = self.inner.pushes.log.lock().await;
        let current = self.inner.pushes.map.read().get(name).cloned();
        let (config, created_at_ms) = match &current {
            Some(push) => {
                let stored = push.stored.read();
                let next = stored.config.apply(patch);
                next.validate(limits)?;
                (next, stored.created_at_ms)
            }
            None => {
                if self.inner.pushes.map.read().len() >= limits.max_pushes {
                    return Err(BrokerError::new(
                        ErrorCode::ConfigConflict,
                        format!(
                            "the server holds its maximum of {} push endpoints (max_pushes); delete unused ones first",
                            limits.max_pushes
                        ),
                    ));
                }
                (
                    PushConfig::create(patch, new_secret(), limits)?,
                    self.now_ms(),
                )
            }
        };
        self.resolve(config.source.name())?;
        let now = self.now_ms();
        if let Some(push) = &current
            && push.stored.read().config == config
        {
            return Ok((false, push.info(now), None));
        }
        let stored = StoredPush {
            config: config.clone(),
            created_at_ms,
        };
        let created = current.is_none();
        let body = serde_json::to_vec(&stored).expect("a push endpoint serializes");
        self.catalog_put(&mut log, &format!("{PUSH_PREFIX}{name}"), &body)
            .await?;
        let push = match current {
            Some(push) => {
                push.breaker.lock().reconfigure(config.breaker.clone());
                *push.stored.write() = stored;
                push.changed.notify_waiters();
                push
            }
            None => {
                let push = Arc::new(new_handle(name, stored));
                self.inner
                    .pushes
                    .map
                    .write()
                    .insert(name.to_string(), push.clone());
                self.inner.pushes.changed.notify_waiters();
                push
            }
        };
        Ok((created, push.info(now), created.then_some(config.secret)))
    }

    pub fn push(&self, name: &str) -> Result<PushInfo, BrokerError> {
        Ok(self.push_handle(name)?.info(self.now_ms()))
    }

    pub fn push_handle(&self, name: &str) -> Result<Arc<PushHandle>, BrokerError> {
        self.inner
            .pushes
            .map
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| push_not_found(name))
    }

    /// Every push endpoint in force, by name (the server runs a worker for each).
    pub fn push_handles(&self) -> Vec<Arc<PushHandle>> {
        let mut handles: Vec<_> = self.inner.pushes.map.read().values().cloned().collect();
        handles.sort_by(|a, b| a.name.cmp(&b.name));
        handles
    }

    pub fn pushes(&self) -> Vec<PushInfo> {
        let now = self.now_ms();
        self.push_handles().iter().map(|p| p.info(now)).collect()
    }

    /// Waits until a push endpoint is created or deleted.
    pub async fn pushes_changed(&self) {
        self.inner.pushes.changed.notified().await;
    }

    pub async fn delete_push(&self, name: &str) -> Result<(), BrokerError> {
        let mut log = self.inner.pushes.log.lock().await;
        let push = self.push_handle(name)?;
        self.catalog_remove(&mut log, &format!("{PUSH_PREFIX}{name}"))
            .await?;
        self.inner.pushes.map.write().remove(name);
        push.deleted.store(true, Ordering::Relaxed);
        push.changed.notify_waiters();
        self.inner.pushes.changed.notify_waiters();
        Ok(())
    }
}
