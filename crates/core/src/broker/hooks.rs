//! Webhook hooks: their definitions, durable in the `#hooks` catalog (`catalog.rs`), and
//! the ingress (`Broker::ingest`): a request checked by `crate::hook::plan_event`, then
//! published to the hook's queue (or produced to its stream) at `AckLevel::Durable`, so a
//! caller that answers 2xx after it never answers for an event a crash could lose.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tidewater_auth::webhook;
use tidewater_storage::{AckLevel, RecoveredLog, Store};

use super::Broker;
use super::catalog::Catalog;
use crate::error::{BrokerError, ErrorCode};
use crate::hook::{
    HookConfig, HookCounters, HookPatch, HookRequest, HookStats, HookTarget, Planned, plan_event,
    validate_hook_name,
};
use crate::plan::message::NewMessage;
use crate::queue::HEADER_TENANT;
use crate::stream::records::NewStreamRecord;

/// The name of the log holding hook definitions (no queue or stream can have it).
pub(crate) const HOOKS_LOG: &str = "#hooks";

const HOOK_PREFIX: &str = "hook:";

/// How long a sender is asked to wait when the hook's target is missing.
const TARGET_MISSING_RETRY_MS: u64 = 30_000;

/// A hook's definition as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredHook {
    config: HookConfig,
    created_at_ms: i64,
}

/// A hook in force: its configuration, its secrets as HMAC keys, and its counters (kept
/// across configuration changes; reset at restart).
pub(crate) struct HookHandle {
    stored: StoredHook,
    keys: Vec<Vec<u8>>,
    counters: Arc<HookCounters>,
}

pub(crate) struct Hooks {
    /// Held across a change's write: one change at a time.
    log: tokio::sync::Mutex<Catalog>,
    map: RwLock<HashMap<String, Arc<HookHandle>>>,
}

/// A hook as shown: its configuration without secrets, and its counters.
#[derive(Debug, Clone, Serialize)]
pub struct HookInfo {
    pub name: String,
    pub config: serde_json::Value,
    pub created_at_ms: i64,
    pub stats: HookStats,
}

/// What an ingested request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Stored, durably: the message id (queue) or `partition:offset` (stream).
    Accepted { id: String },
    /// The sender's delivery id was already accepted within the queue's dedup window:
    /// nothing stored again; the sender should stop retrying.
    Duplicate { id: String },
    /// Slack's URL verification: answer this challenge.
    Challenge(String),
}

fn handle(stored: StoredHook, counters: Arc<HookCounters>) -> Result<HookHandle, String> {
    let keys = webhook::keys(
        &stored.config.signature.scheme,
        &stored.config.signature.secrets,
    )?;
    Ok(HookHandle {
        stored,
        keys,
        counters,
    })
}

impl Hooks {
    pub(crate) fn recover(store: &Store, log: Option<RecoveredLog>) -> Result<Hooks, String> {
        let (catalog, entries) = Catalog::recover(HOOKS_LOG, store, log)?;
        let mut map = HashMap::new();
        for (name, stored) in catalog.decode::<StoredHook>(entries, HOOK_PREFIX)? {
            let hook = handle(stored, Arc::default())
                .map_err(|e| format!("the {HOOKS_LOG} log: hook {name}: {e}"))?;
            map.insert(name, Arc::new(hook));
        }
        Ok(Hooks {
            log: tokio::sync::Mutex::new(catalog),
            map: RwLock::new(map),
        })
    }
}

impl HookHandle {
    fn info(&self, name: &str) -> HookInfo {
        HookInfo {
            name: name.to_string(),
            config: self.stored.config.shown(),
            created_at_ms: self.stored.created_at_ms,
            stats: self.counters.stats(),
        }
    }
}

fn hook_not_found(name: &str) -> BrokerError {
    BrokerError::new(
        ErrorCode::HookNotFound,
        format!("hook '{name}' does not exist"),
    )
}

impl Broker {
    fn hook_handle(&self, name: &str) -> Result<Arc<HookHandle>, BrokerError> {
        self.inner
            .hooks
            .map
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| hook_not_found(name))
    }

    /// Creates a hook, or changes one (`patch` on its configuration). Its target must
    /// exist. Returns whether it was created.
    pub async fn put_hook(
        &self,
        name: &str,
        patch: &HookPatch,
    ) -> Result<(bool, HookInfo), BrokerError> {
        validate_hook_name(name)?;
        let limits = &self.inner.limits;
        let mut log = self.inner.hooks.log.lock().await;
        let current = self.inner.hooks.map.read().get(name).cloned();
        let (config, created_at_ms, counters) = match &current {
            Some(hook) => (
                hook.stored.config.apply(patch)?,
                hook.stored.created_at_ms,
                hook.counters.clone(),
            ),
            None => {
                let count = self.inner.hooks.map.read().len();
                if count >= limits.max_hooks {
                    return Err(BrokerError::new(
                        ErrorCode::ConfigConflict,
                        format!(
                            "the server holds its maximum of {} hooks (max_hooks); delete unused ones first",
                            limits.max_hooks
                        ),
                    ));
                }
                (
                    HookConfig::create(patch, limits)?,
                    self.now_ms(),
                    Arc::default(),
                )
            }
        };
        config.validate(limits)?;
        match &config.target {
            HookTarget::Queue(queue) => {
                self.queue(queue)?;
            }
            HookTarget::Stream(stream) => {
                self.stream(stream)?;
            }
        }
        let created = current.is_none();
        if let Some(hook) = &current
            && hook.stored.config == config
        {
            return Ok((false, hook.info(name)));
        }
        let stored = StoredHook {
            config,
            created_at_ms,
        };
        let body = serde_json::to_vec(&stored).expect("a hook serializes");
        let hook = Arc::new(
            handle(stored, counters).map_err(|e| BrokerError::new(ErrorCode::InvalidConfig, e))?,
        );
        self.catalog_put(&mut log, &format!("{HOOK_PREFIX}{name}"), &body)
            .await?;
        self.inner
            .hooks
            .map
            .write()
            .insert(name.to_string(), hook.clone());
        Ok((created, hook.info(name)))
    }

    pub fn hook(&self, name: &str) -> Result<HookInfo, BrokerError> {
        Ok(self.hook_handle(name)?.info(name))
    }

    /// A hook's configuration, secrets included (for the server's own checks: never shown).
    pub fn hook_config(&self, name: &str) -> Result<HookConfig, BrokerError> {
        Ok(self.hook_handle(name)?.stored.config.clone())
    }

    /// Whether a hook takes unsigned webhooks (preset none); None when there is no such
    /// hook. Asked per webhook by the listeners, so it copies nothing.
    pub fn hook_unsigned(&self, name: &str) -> Option<bool> {
        let hooks = self.inner.hooks.map.read();
        let hook = hooks.get(name)?;
        Some(hook.stored.config.signature.scheme == tidewater_auth::webhook::Scheme::Unsigned)
    }

    /// Every hook, by name.
    pub fn hooks(&self) -> Vec<HookInfo> {
        let map = self.inner.hooks.map.read();
        let mut hooks: Vec<HookInfo> = map.iter().map(|(name, h)| h.info(name)).collect();
        hooks.sort_by(|a, b| a.name.cmp(&b.name));
        hooks
    }

    pub async fn delete_hook(&self, name: &str) -> Result<(), BrokerError> {
        let mut log = self.inner.hooks.log.lock().await;
        self.hook_handle(name)?;
        self.catalog_remove(&mut log, &format!("{HOOK_PREFIX}{name}"))
            .await?;
        self.inner.hooks.map.write().remove(name);
        self.inner.observer.hook_deleted(name);
        Ok(())
    }

    /// Takes a request to a hook: checks it, and stores the event durably in the hook's
    /// target. An `Ok` means the event is durable (or was already, for a duplicate); an
    /// error means nothing was stored, and says when to retry where retrying can help.
    pub async fn ingest(
        &self,
        name: &str,
        request: &HookRequest<'_>,
    ) -> Result<Ingested, BrokerError> {
        let started = std::time::Instant::now();
        let hook = self.hook_handle(name)?;
        let counters = &hook.counters;
        let config = &hook.stored.config;
        let now_s = self.now_ms().div_euclid(1000);
        let planned = plan_event(config, &hook.keys, request, now_s, &self.inner.limits).map_err(
            |refused| {
                let err = refused.error(name);
                counters.refuse(err.code);
                err
            },
        )?;
        let event = match planned {
            Planned::Challenge(challenge) => return Ok(Ingested::Challenge(challenge)),
            Planned::Event(event) => event,
        };
        let target_missing = |what: &str, target: &str| {
            BrokerError::new(
                ErrorCode::TargetUnavailable,
                format!(
                    "hook '{name}': its {what} '{target}' does not exist; nothing was stored, retry later"
                ),
            )
            .retry_after(TARGET_MISSING_RETRY_MS)
        };
        let outcome = match &config.target {
            HookTarget::Queue(queue) => {
                let message = NewMessage {
                    id: event.message_id,
                    body: request.body.to_vec(),
                    key: event.key,
                    headers: event.headers,
                    tenant: config.tenant.clone(),
                    ..NewMessage::default()
                };
                match self.publish(queue, &[message], AckLevel::Durable).await {
                    Ok(published) => {
                        let id = published.ids.into_iter().next().unwrap_or_default();
                        if published.duplicates.is_empty() {
                            Ok(Ingested::Accepted { id })
                        } else {
                            Ok(Ingested::Duplicate { id })
                        }
                    }
                    Err(e) if e.code == ErrorCode::QueueNotFound => {
                        Err(target_missing("queue", queue))
                    }
                    Err(e) => Err(e),
                }
            }
            HookTarget::Stream(stream) => {
                let mut headers: Vec<(String, Option<Vec<u8>>)> = event
                    .headers
                    .into_iter()
                    .map(|(n, v)| (n, Some(v.into_bytes())))
                    .collect();
                if let Some(tenant) = &config.tenant {
                    headers.push((HEADER_TENANT.to_string(), Some(tenant.clone().into_bytes())));
                }
                let record = NewStreamRecord {
                    key: event.key.map(String::into_bytes),
                    value: Some(request.body.to_vec()),
                    headers,
                    timestamp: None,
                    partition: None,
                };
                match self.produce(stream, &[record], AckLevel::Durable).await {
                    Ok(produced) => Ok(Ingested::Accepted {
                        id: produced
                            .offsets
                            .first()
                            .map(|(p, o)| format!("{p}:{o}"))
                            .unwrap_or_default(),
                    }),
                    Err(e) if e.code == ErrorCode::StreamNotFound => {
                        Err(target_missing("stream", stream))
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match &outcome {
            Ok(Ingested::Accepted { .. }) => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .observer
                    .hook_latency(name, started.elapsed().as_secs_f64());
            }
            Ok(Ingested::Duplicate { .. }) => {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ingested::Challenge(_)) => {}
            Err(e) => counters.refuse(e.code),
        }
        outcome
    }
}
