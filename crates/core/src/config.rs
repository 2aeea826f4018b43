//! Queue configuration (persisted with the queue) and broker-wide limits.

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{BrokerError, ErrorCode};

pub const MAX_QUEUE_NAME_LEN: usize = 200;
const DLQ_SUFFIX: &str = "-dlq";
/// Longest lease: 12 hours (as SQS's visibility timeout).
pub const MAX_LEASE_MS: u64 = 12 * 3600 * 1000;
/// Bounds of dispatch rates (messages per second).
pub const MIN_RATE: f64 = 0.001;
pub const MAX_RATE: f64 = 10_000_000.0;
/// Longest time to live: 30 days.
pub const MAX_TTL_MS: u64 = 30 * 86_400_000;

/// Checks a queue name: 1 to 200 characters of `[A-Za-z0-9._-]`, not `.` or `..` (HTTP
/// clients remove those path segments, so such a queue could not be addressed).
pub fn validate_queue_name(name: &str) -> Result<(), BrokerError> {
    validate_name(name, "queue", ErrorCode::InvalidQueueName)
}

/// The rule of queue and stream names (see `validate_queue_name`), refused with `code`.
pub(crate) fn validate_name(name: &str, kind: &str, code: ErrorCode) -> Result<(), BrokerError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let dots = name == "." || name == "..";
    if name.is_empty() || name.len() > MAX_QUEUE_NAME_LEN || !ok_chars || dots {
        let shown: String = name.chars().take(40).collect();
        return Err(BrokerError::new(
            code,
            format!(
                "invalid {kind} name '{shown}': use 1 to {MAX_QUEUE_NAME_LEN} characters of A-Z a-z 0-9 . _ - (not . or ..)"
            ),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the second delivery (before jitter).
    pub base_ms: u64,
    /// Growth per further delivery.
    pub multiplier: f64,
    /// Cap on the delay.
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_ms: 1_000,
            multiplier: 2.0,
            max_ms: 300_000,
        }
    }
}

impl Backoff {
    /// Full jitter: a uniform delay in [0, min(max, base * multiplier^(deliveries-1))].
    pub fn delay_ms(&self, delivery_count: u32, unit: f64) -> u64 {
        let exp = self
            .multiplier
            .powi(delivery_count.saturating_sub(1).min(64) as i32);
        let cap = (self.base_ms as f64 * exp).min(self.max_ms as f64);
        (cap * unit.clamp(0.0, 1.0)).round() as u64
    }
}

/// Deliveries per second from a queue (GCRA): `burst` may go at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchRate {
    pub per_s: f64,
    #[serde(default = "one")]
    pub burst: u64,
}

fn one() -> u64 {
    1
}

fn one_level() -> u8 {
    1
}

fn default_min_share() -> f64 {
    0.1
}

/// Five minutes, as SQS FIFO's deduplication interval.
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 300_000;
/// Longest dedup window: one day.
pub const MAX_DEDUP_WINDOW_MS: u64 = 86_400_000;

fn default_dedup_window_ms() -> u64 {
    DEFAULT_DEDUP_WINDOW_MS
}

/// Adaptive throttling: the dispatch rate moves between these bounds (AIMD).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adaptive {
    pub min_per_s: f64,
    pub max_per_s: f64,
}

/// Producer token buckets of one tenant; an absent field means no limit on that axis.
/// A missing burst is one second's worth of the rate.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msgs_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_msgs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_bytes: Option<u64>,
}

/// Producer quotas per tenant: the top level is the default for any tenant, `tenants`
/// overrides it field by field for named ones.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msgs_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_msgs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_bytes: Option<u64>,
    #[serde(default)]
    pub tenants: std::collections::BTreeMap<String, QuotaLimits>,
}

/// Named tenants in one quota, and the length of a tenant name.
pub const MAX_QUOTA_TENANTS: usize = 1_000;
/// Values named in one fairness configuration's weights.
pub const MAX_FAIRNESS_WEIGHTS: usize = 10_000;
pub const MAX_TENANT_LEN: usize = 128;

impl Quota {
    /// The limits that apply to `tenant`.
    pub fn limits_for(&self, tenant: &str) -> QuotaLimits {
        let own = self.tenants.get(tenant).copied().unwrap_or_default();
        QuotaLimits {
            msgs_per_s: own.msgs_per_s.or(self.msgs_per_s),
            bytes_per_s: own.bytes_per_s.or(self.bytes_per_s),
            burst_msgs: own.burst_msgs.or(self.burst_msgs),
            burst_bytes: own.burst_bytes.or(self.burst_bytes),
        }
    }

    fn validate(&self) -> Result<(), String> {
        let check = |who: &str, l: &QuotaLimits| -> Result<(), String> {
            for (name, rate) in [("msgs_per_s", l.msgs_per_s), ("bytes_per_s", l.bytes_per_s)] {
                if let Some(r) = rate
                    && !(r.is_finite() && (MIN_RATE..=1e12).contains(&r))
                {
                    return Err(format!(
                        "quota{who}.{name} must be {MIN_RATE}..=1e12, got {r}"
                    ));
                }
            }
            for (name, burst) in [("burst_msgs", l.burst_msgs), ("burst_bytes", l.burst_bytes)] {
                if burst == Some(0) {
                    return Err(format!("quota{who}.{name} must be at least 1"));
                }
            }
            Ok(())
        };
        let top = QuotaLimits {
            msgs_per_s: self.msgs_per_s,
            bytes_per_s: self.bytes_per_s,
            burst_msgs: self.burst_msgs,
            burst_bytes: self.burst_bytes,
        };
        check("", &top)?;
        if self.tenants.len() > MAX_QUOTA_TENANTS {
            return Err(format!(
                "quota.tenants names at most {MAX_QUOTA_TENANTS} tenants, got {}",
                self.tenants.len()
            ));
        }
        for (tenant, limits) in &self.tenants {
            if tenant.is_empty() || tenant.len() > MAX_TENANT_LEN {
                return Err(format!(
                    "quota.tenants: names are 1..={MAX_TENANT_LEN} bytes"
                ));
            }
            check(&format!(".tenants.{tenant}"), limits)?;
        }
        Ok(())
    }
}

/// Weighted fair scheduling: deficit round robin across the values of `by`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fairness {
    /// "tenant", "key", or "header:<name>".
    #[serde(default = "default_fairness_by")]
    pub by: String,
    /// Weight per value (default 1): a value with weight 3 gets three deliveries for
    /// every one of a value with weight 1 while both wait.
    #[serde(default)]
    pub weights: std::collections::BTreeMap<String, f64>,
}

fn default_fairness_by() -> String {
    "tenant".into()
}

/// How a coalescing window's messages become one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoalesceMode {
    /// The newest message; the others are dropped.
    #[default]
    Latest,
    /// One new message whose body is a JSON array of every distinct body of the window.
    Merge,
}

/// Debounce by key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coalesce {
    /// Quiet time after a key's newest message before its window closes.
    pub window_ms: u64,
    #[serde(default)]
    pub mode: CoalesceMode,
    /// Longest a window stays open however steady the stream (default 10 x window_ms).
    #[serde(default)]
    pub max_wait_ms: Option<u64>,
}

impl Coalesce {
    pub fn max_wait(&self) -> u64 {
        self.max_wait_ms
            .unwrap_or(self.window_ms.saturating_mul(10))
    }
}

/// Most priority levels a queue may have.
pub const MAX_PRIORITY_LEVELS: u8 = 10;

/// What happens to a message older than its time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExpire {
    #[default]
    Drop,
    DeadLetter,
}

/// A queue's configuration, as stored and as shown in the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// Default lease (visibility timeout) of a receive.
    pub lease_ms: u64,
    /// Deliveries before a message moves to the dead-letter queue; 0 = unlimited.
    pub max_deliveries: u32,
    pub backoff: Backoff,
    /// Where messages go after `max_deliveries`; null = nowhere (they are retried forever).
    pub dead_letter_queue: Option<String>,
    /// Capacity: publishes beyond are refused with 429.
    pub max_messages: u64,
    pub max_bytes: u64,
    /// Messages leased at once; receives beyond get fewer messages.
    pub max_in_flight: u64,
    /// Producer token buckets per tenant; null = none.
    #[serde(default)]
    pub quota: Option<Quota>,
    /// A message whose client-chosen id was accepted this recently is not enqueued again;
    /// 0 = no deduplication.
    #[serde(default = "default_dedup_window_ms")]
    pub dedup_window_ms: u64,
    /// A newer message with a key cancels pending older ones with that key.
    #[serde(default)]
    pub supersede: bool,
    /// Priority levels (1 = none); messages carry `priority` 0 (lowest) ..levels-1.
    #[serde(default = "one_level")]
    pub priority_levels: u8,
    /// Share of deliveries kept for lower levels while higher ones wait.
    #[serde(default = "default_min_share")]
    pub priority_min_share: f64,
    /// Weighted fair scheduling across tenants, keys or a header's values.
    #[serde(default)]
    pub fairness: Option<Fairness>,
    /// Debounce by key: a window's messages become one delivery.
    #[serde(default)]
    pub coalesce: Option<Coalesce>,
    /// Messages with one key leased (or awaiting a retry) at once; 1 = strict per-key
    /// order. null = no limit.
    #[serde(default)]
    pub key_concurrency: Option<u32>,
    /// Deliveries per second; null = unlimited.
    #[serde(default)]
    pub dispatch_rate: Option<DispatchRate>,
    /// AIMD on the dispatch rate, driven by overloaded nacks and expired leases.
    #[serde(default)]
    pub adaptive: Option<Adaptive>,
    /// Maximum age of a message (from its publish); null = forever.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    #[serde(default)]
    pub on_expire: OnExpire,
}

/// A configuration change: every field optional. `dead_letter_queue: null` disables it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    pub lease_ms: Option<u64>,
    pub max_deliveries: Option<u32>,
    pub backoff: Option<BackoffPatch>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub dead_letter_queue: Option<Option<String>>,
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
    pub max_in_flight: Option<u64>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub quota: Option<Option<Quota>>,
    pub dedup_window_ms: Option<u64>,
    pub supersede: Option<bool>,
    pub priority_levels: Option<u8>,
    pub priority_min_share: Option<f64>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub fairness: Option<Option<Fairness>>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub coalesce: Option<Option<Coalesce>>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub key_concurrency: Option<Option<u32>>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub dispatch_rate: Option<Option<DispatchRate>>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub adaptive: Option<Option<Adaptive>>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub ttl_ms: Option<Option<u64>>,
    pub on_expire: Option<OnExpire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffPatch {
    pub base_ms: Option<u64>,
    pub multiplier: Option<f64>,
    pub max_ms: Option<u64>,
}

/// Tells "absent" (None) from "null" (Some(None)) in a patch.
pub(crate) fn explicit_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

impl QueueConfig {
    /// Defaults for a new queue named `name`.
    pub fn defaults_for(name: &str, limits: &Limits) -> QueueConfig {
        QueueConfig {
            lease_ms: 30_000,
            max_deliveries: 10,
            backoff: Backoff::default(),
            dead_letter_queue: Some(format!("{name}{DLQ_SUFFIX}")),
            max_messages: limits.default_max_messages,
            max_bytes: limits.default_max_bytes,
            max_in_flight: limits.default_max_in_flight,
            quota: None,
            dedup_window_ms: DEFAULT_DEDUP_WINDOW_MS,
            supersede: false,
            priority_levels: 1,
            priority_min_share: default_min_share(),
            fairness: None,
            coalesce: None,
            key_concurrency: None,
            dispatch_rate: None,
            adaptive: None,
            ttl_ms: None,
            on_expire: OnExpire::Drop,
        }
    }

    /// Configuration of a dead-letter queue created on demand: keeps messages until
    /// redriven or purged, never dead-letters further.
    pub fn for_dead_letter_queue(name: &str, limits: &Limits) -> QueueConfig {
        QueueConfig {
            max_deliveries: 0,
            dead_letter_queue: None,
            ..QueueConfig::defaults_for(name, limits)
        }
    }

    /// This configuration with `patch` applied: each field the patch names replaces this
    /// one's (`null` clears an optional one), except `backoff`, whose fields are patched one
    /// by one. (Every field of `ConfigPatch` is listed below; a test fails if one is not.)
    pub fn apply(&self, patch: &ConfigPatch) -> QueueConfig {
        let mut out = self.clone();
        macro_rules! replace {
            ($($field:ident),* $(,)?) => {
                $(if let Some(value) = &patch.$field {
                    out.$field = value.clone();
                })*
            };
        }
        replace!(
            lease_ms,
            max_deliveries,
            dead_letter_queue,
            max_messages,
            max_bytes,
            max_in_flight,
            quota,
            dedup_window_ms,
            supersede,
            priority_levels,
            priority_min_share,
            fairness,
            coalesce,
            key_concurrency,
            dispatch_rate,
            adaptive,
            ttl_ms,
            on_expire,
        );
        if let Some(b) = &patch.backoff {
            out.backoff.base_ms = b.base_ms.unwrap_or(out.backoff.base_ms);
            out.backoff.multiplier = b.multiplier.unwrap_or(out.backoff.multiplier);
            out.backoff.max_ms = b.max_ms.unwrap_or(out.backoff.max_ms);
        }
        out
    }

    pub fn validate(&self, queue: &str, limits: &Limits) -> Result<(), BrokerError> {
        let bad = |msg: String| Err(BrokerError::new(ErrorCode::InvalidConfig, msg));
        if !(1..=MAX_LEASE_MS).contains(&self.lease_ms) {
            return bad(format!(
                "lease_ms must be 1..={MAX_LEASE_MS} (12 h), got {}",
                self.lease_ms
            ));
        }
        if self.max_deliveries > 1_000 {
            return bad(format!(
                "max_deliveries must be 0 (unlimited) ..=1000, got {}",
                self.max_deliveries
            ));
        }
        let b = &self.backoff;
        if !(b.multiplier.is_finite() && (1.0..=10.0).contains(&b.multiplier)) {
            return bad(format!(
                "backoff.multiplier must be 1.0..=10.0, got {}",
                b.multiplier
            ));
        }
        if b.max_ms > 7 * 86_400_000 || b.base_ms > b.max_ms {
            return bad(format!(
                "backoff needs base_ms <= max_ms <= 604800000 (7 days), got base_ms {} max_ms {}",
                b.base_ms, b.max_ms
            ));
        }
        if let Some(dlq) = &self.dead_letter_queue {
            validate_queue_name(dlq).map_err(|e| {
                BrokerError::new(ErrorCode::InvalidConfig, format!("dead_letter_queue: {}; long queue names need an explicit dead_letter_queue", e.message))
            })?;
            if dlq == queue {
                return Err(BrokerError::new(
                    ErrorCode::ConfigConflict,
                    "a queue cannot be its own dead_letter_queue",
                ));
            }
        }
        if self.max_messages == 0 || self.max_messages > limits.max_queue_messages {
            return bad(format!(
                "max_messages must be 1..={}, got {}",
                limits.max_queue_messages, self.max_messages
            ));
        }
        if self.max_bytes == 0 || self.max_bytes > limits.max_queue_bytes {
            return bad(format!(
                "max_bytes must be 1..={}, got {}",
                limits.max_queue_bytes, self.max_bytes
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > limits.max_in_flight {
            return bad(format!(
                "max_in_flight must be 1..={}, got {}",
                limits.max_in_flight, self.max_in_flight
            ));
        }
        if let Some(quota) = &self.quota {
            quota.validate().or_else(bad)?;
        }
        if !(1..=MAX_PRIORITY_LEVELS).contains(&self.priority_levels) {
            return bad(format!(
                "priority_levels must be 1..={MAX_PRIORITY_LEVELS}, got {}",
                self.priority_levels
            ));
        }
        if !(0.0..=0.5).contains(&self.priority_min_share) {
            return bad(format!(
                "priority_min_share must be 0.0..=0.5, got {}",
                self.priority_min_share
            ));
        }
        if let Some(f) = &self.fairness {
            let by_ok = matches!(f.by.as_str(), "tenant" | "key")
                || f.by.strip_prefix("header:").is_some_and(|h| !h.is_empty());
            if !by_ok {
                return bad(format!(
                    "fairness.by must be \"tenant\", \"key\" or \"header:<name>\", got \"{}\"",
                    f.by
                ));
            }
            if f.weights.len() > MAX_FAIRNESS_WEIGHTS {
                return bad(format!(
                    "fairness.weights names at most {MAX_FAIRNESS_WEIGHTS} values"
                ));
            }
            if let Some((value, w)) = f
                .weights
                .iter()
                .find(|(_, w)| !(w.is_finite() && (0.01..=1000.0).contains(*w)))
            {
                return bad(format!(
                    "fairness.weights.{value} must be 0.01..=1000, got {w}"
                ));
            }
        }
        if let Some(c) = &self.coalesce
            && !((1..=3_600_000).contains(&c.window_ms)
                && (c.window_ms..=86_400_000).contains(&c.max_wait()))
        {
            return bad(format!(
                "coalesce needs 1 <= window_ms <= 3600000 (1 h) and window_ms <= max_wait_ms <= 86400000 (1 day), got window_ms {} max_wait_ms {}",
                c.window_ms,
                c.max_wait()
            ));
        }
        if let Some(k) = self.key_concurrency
            && !(1..=10_000).contains(&k)
        {
            return bad(format!(
                "key_concurrency must be 1..=10000 or null, got {k}"
            ));
        }
        if self.dedup_window_ms > MAX_DEDUP_WINDOW_MS {
            return bad(format!(
                "dedup_window_ms must be 0 (off) ..={MAX_DEDUP_WINDOW_MS} (1 day), got {}",
                self.dedup_window_ms
            ));
        }
        let rate_ok = |r: f64| r.is_finite() && (MIN_RATE..=MAX_RATE).contains(&r);
        if let Some(rate) = &self.dispatch_rate {
            if !rate_ok(rate.per_s) {
                return bad(format!(
                    "dispatch_rate.per_s must be {MIN_RATE}..={MAX_RATE}, got {}",
                    rate.per_s
                ));
            }
            if !(1..=limits.max_receive_messages as u64).contains(&rate.burst) {
                return bad(format!(
                    "dispatch_rate.burst must be 1..={} (max_receive_messages), got {}",
                    limits.max_receive_messages, rate.burst
                ));
            }
        }
        if let Some(a) = &self.adaptive
            && !(rate_ok(a.min_per_s) && rate_ok(a.max_per_s) && a.min_per_s <= a.max_per_s)
        {
            return bad(format!(
                "adaptive needs {MIN_RATE} <= min_per_s <= max_per_s <= {MAX_RATE}, got min_per_s {} max_per_s {}",
                a.min_per_s, a.max_per_s
            ));
        }
        if let Some(ttl) = self.ttl_ms
            && !(1..=MAX_TTL_MS).contains(&ttl)
        {
            return bad(format!(
                "ttl_ms must be 1..={MAX_TTL_MS} (30 days) or null, got {ttl}"
            ));
        }
        if self.on_expire == OnExpire::DeadLetter && self.dead_letter_queue.is_none() {
            return Err(BrokerError::new(
                ErrorCode::ConfigConflict,
                "on_expire dead_letter needs a dead_letter_queue",
            ));
        }
        Ok(())
    }
}

/// Broker-wide limits. Every one is configurable (docs/configuration.md lists them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Messages per publish request.
    pub max_batch_messages: usize,
    /// Bytes of one message body.
    pub max_message_bytes: usize,
    /// Receipts per ack/nack/extend request and messages per receive.
    pub max_receive_messages: usize,
    /// Longest long-poll.
    pub max_wait_ms: u64,
    /// Longest delay of a message.
    pub max_delay_ms: u64,
    /// Bytes of a key.
    pub max_key_bytes: usize,
    /// Headers per message, and bytes of one header name and value.
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// Bytes of a client-chosen message id.
    pub max_id_bytes: usize,
    /// Number of queues.
    pub max_queues: usize,
    /// Ceilings and defaults of per-queue capacity.
    pub max_queue_messages: u64,
    pub max_queue_bytes: u64,
    pub default_max_messages: u64,
    pub default_max_bytes: u64,
    pub max_in_flight: u64,
    pub default_max_in_flight: u64,
    /// Publishes are refused while the data directory's disk has less free space.
    pub min_free_disk_bytes: u64,
    /// Message ids remembered per queue for deduplication (the oldest are forgotten first).
    pub max_dedup_ids: u32,
    /// Messages delayed at least this long wait in the queue's delay log, apart from the
    /// main log, so they do not hold its segments on disk.
    pub park_delay_ms: u64,
    /// Number of streams, partitions per stream, and bytes one fetch returns at most (a
    /// fetch returns whole batches: at least one, even when larger).
    pub max_streams: usize,
    pub max_partitions: u32,
    pub max_fetch_bytes: usize,
    /// Work-queue subscriptions on streams: in all, and on one stream.
    pub max_subscriptions: usize,
    pub max_stream_subscriptions: usize,
    /// Bytes of stream batches the partitions' caches keep for their subscriptions, in all
    /// (each partition at most 8 batches and 8 MiB); 0 = no cache.
    pub subscription_cache_bytes: u64,
    /// Consumer groups (with members), members per group, and the longest session a
    /// member may ask for (a member silent that long is removed).
    pub max_groups: usize,
    pub max_group_members: usize,
    pub max_session_timeout_ms: u64,
    /// Committed offsets of a group without members are removed once its newest commit,
    /// and the last time it had a member, are this old (Kafka's offsets.retention.minutes);
    /// 0 keeps them forever.
    pub group_offsets_retention_ms: u64,
    /// Metric series labelled by partition (end offset per partition), at most this many
    /// across all streams (by stream name, then partition); 0 emits none.
    pub max_partition_metrics: usize,
    /// Memory for compaction's map of keys to their latest offset (32 bytes a key): a
    /// partition with more distinct keys in its dirty part takes several passes.
    pub compaction_key_map_bytes: usize,
    /// Bytes compaction reads and writes a second at most (0: no limit), so a pass does
    /// not take the disk from producers and readers.
    pub compaction_bytes_per_s: u64,
    /// API keys and grants the server holds at most.
    pub max_api_keys: usize,
    pub max_acls: usize,
    /// Webhook hooks the server holds at most.
    pub max_hooks: usize,
    /// Push endpoints the server holds at most.
    pub max_pushes: usize,
}

impl Limits {
    /// Checks the limits against what the record format can hold (a key length is a u16
    /// field, so is a header count and a header name's length): a limit past that would be
    /// accepted and then fail mid-publish.
    pub fn validate(&self) -> Result<(), String> {
        use tidewater_storage::format::{MAX_HEADER_NAME_LEN, MAX_HEADERS, MAX_KEY_LEN};
        let checks = [
            ("max_key_bytes", self.max_key_bytes, MAX_KEY_LEN),
            ("max_headers", self.max_headers, MAX_HEADERS),
            (
                "max_header_bytes",
                self.max_header_bytes,
                MAX_HEADER_NAME_LEN,
            ),
        ];
        for (name, value, max) in checks {
            if value > max {
                return Err(format!(
                    "limits.{name} = {value} is more than the storage format holds ({max})"
                ));
            }
        }
        if self.compaction_key_map_bytes < 1024 {
            return Err(format!(
                "limits.compaction_key_map_bytes = {} is too small for compaction to map keys: give at least 1024 bytes (the default is 33554432, 32 MiB; 0 does not mean unlimited here)",
                self.compaction_key_map_bytes
            ));
        }
        if self.max_partitions == 0 || self.max_fetch_bytes == 0 {
            return Err(
                "limits.max_partitions and limits.max_fetch_bytes must be at least 1".into(),
            );
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_messages: 10_000,
            max_message_bytes: 1 << 20,
            max_receive_messages: 10_000,
            max_wait_ms: 60_000,
            max_delay_ms: 7 * 86_400_000,
            max_key_bytes: 1024,
            max_headers: 64,
            max_header_bytes: 4096,
            max_id_bytes: 128,
            max_queues: 10_000,
            max_queue_messages: 1_000_000_000,
            max_queue_bytes: 1 << 40,
            default_max_messages: 10_000_000,
            default_max_bytes: 10 << 30,
            max_in_flight: 1_000_000,
            default_max_in_flight: 100_000,
            min_free_disk_bytes: 256 << 20,
            max_dedup_ids: 1_000_000,
            park_delay_ms: 15 * 60_000,
            max_streams: 1_000,
            max_partitions: 1_024,
            max_fetch_bytes: 64 << 20,
            max_subscriptions: 1_000,
            max_stream_subscriptions: 100,
            subscription_cache_bytes: 64 << 20,
            max_groups: 1_000,
            max_group_members: 1_000,
            max_session_timeout_ms: 300_000,
            group_offsets_retention_ms: 7 * 86_400_000,
            max_partition_metrics: 1_024,
            compaction_key_map_bytes: 32 << 20,
            compaction_bytes_per_s: 64 << 20,
            max_api_keys: 10_000,
            max_acls: 10_000,
            max_hooks: 1_000,
            max_pushes: 1_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `apply` lists the fields it replaces: a field added to `ConfigPatch` and not to that
    /// list would be accepted and silently ignored. A patch naming every field of a queue's
    /// configuration (the keys come from the configuration itself, so a new field makes this
    /// test name it) must change every one of them.
    #[test]
    fn a_patch_naming_every_field_changes_every_field() {
        let limits = Limits::default();
        let before = QueueConfig::defaults_for("q", &limits);
        let patch = serde_json::json!({
            "lease_ms": 1234,
            "max_deliveries": 7,
            "backoff": {"base_ms": 10, "multiplier": 3.0, "max_ms": 99},
            "dead_letter_queue": "elsewhere",
            "max_messages": 42,
            "max_bytes": 4242,
            "max_in_flight": 5,
            "quota": {"msgs_per_s": 9.0, "tenants": {}},
            "dedup_window_ms": 1000,
            "supersede": true,
            "priority_levels": 3,
            "priority_min_share": 0.25,
            "fairness": {"by": "key", "weights": {"a": 2.0}},
            "coalesce": {"window_ms": 50, "mode": "merge", "max_wait_ms": 500},
            "key_concurrency": 2,
            "dispatch_rate": {"per_s": 10.0, "burst": 3},
            "adaptive": {"min_per_s": 1.0, "max_per_s": 10.0},
            "ttl_ms": 60000,
            "on_expire": "dead_letter",
        });
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        let config_json = serde_json::to_value(&before).unwrap();
        assert_eq!(keys(&patch), keys(&config_json), "name every field here");
        let parsed: ConfigPatch = serde_json::from_value(patch.clone()).unwrap();
        let after = serde_json::to_value(before.apply(&parsed)).unwrap();
        for key in keys(&patch) {
            assert_ne!(
                config_json[&key], patch[&key],
                "{key}: pick a value that differs"
            );
            assert_eq!(after[&key], patch[&key], "{key} was not applied");
        }
        // And null clears what may be cleared.
        let cleared: ConfigPatch = serde_json::from_value(serde_json::json!({
            "dead_letter_queue": null, "quota": null, "fairness": null, "coalesce": null,
            "key_concurrency": null, "dispatch_rate": null, "adaptive": null, "ttl_ms": null,
        }))
        .unwrap();
        let cleared = before.apply(&parsed).apply(&cleared);
        assert_eq!(cleared.dead_letter_queue, None);
        assert_eq!(
            (cleared.quota, cleared.key_concurrency, cleared.ttl_ms),
            (None, None, None)
        );
        assert!(cleared.fairness.is_none() && cleared.coalesce.is_none());
        assert!(cleared.dispatch_rate.is_none() && cleared.adaptive.is_none());
    }

    /// Limits past the format's fields were accepted, then tripped an assert mid-publish
    /// (a key or header count over 65,535) or were cut into an unreadable record (a header
    /// name over 65,535 bytes).
    #[test]
    fn limits_past_the_format_are_refused_with_the_field_named() {
        assert!(Limits::default().validate().is_ok());
        for (limits, field) in [
            (
                Limits {
                    max_key_bytes: 65_536,
                    ..Limits::default()
                },
                "max_key_bytes",
            ),
            (
                Limits {
                    max_headers: 70_000,
                    ..Limits::default()
                },
                "max_headers",
            ),
            (
                Limits {
                    max_header_bytes: 65_536,
                    ..Limits::default()
                },
                "max_header_bytes",
            ),
        ] {
            let err = limits.validate().unwrap_err();
            assert!(err.contains(field), "{err}");
        }
        let edge = Limits {
            max_key_bytes: 65_535,
            max_headers: 65_535,
            max_header_bytes: 65_535,
            ..Limits::default()
        };
        assert!(edge.validate().is_ok());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff {
            base_ms: 100,
            multiplier: 2.0,
            max_ms: 1_000,
        };
        assert_eq!(
            [1, 2, 3, 4, 5, 30].map(|n| b.delay_ms(n, 1.0)),
            [100, 200, 400, 800, 1_000, 1_000]
        );
        assert_eq!(b.delay_ms(3, 0.5), 200);
        assert_eq!(b.delay_ms(3, 0.0), 0);
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "orders.v2", "A_b-c", &"x".repeat(200)] {
            assert!(validate_queue_name(good).is_ok(), "{good}");
        }
        // "." and ".." cannot be addressed: HTTP clients remove dot segments from paths.
        for bad in ["", "a b", "é", "a/b", &"x".repeat(201), ".", ".."] {
            assert!(
                matches!(validate_queue_name(bad), Err(e) if e.code == ErrorCode::InvalidQueueName),
                "{bad}"
            );
        }
    }

    #[test]
    fn patches_apply_and_null_disables_the_dlq() {
        let limits = Limits::default();
        let config = QueueConfig::defaults_for("q", &limits);
        assert_eq!(config.dead_letter_queue.as_deref(), Some("q-dlq"));
        let patch: ConfigPatch = serde_json::from_str(
            r#"{"lease_ms": 5, "dead_letter_queue": null, "backoff": {"base_ms": 7}}"#,
        )
        .unwrap();
        let next = config.apply(&patch);
        assert_eq!(
            (
                next.lease_ms,
                next.dead_letter_queue.clone(),
                next.backoff.base_ms,
                next.backoff.max_ms
            ),
            (5, None, 7, 300_000)
        );
        let untouched: ConfigPatch = serde_json::from_str(r#"{"lease_ms": 5}"#).unwrap();
        assert_eq!(
            config.apply(&untouched).dead_letter_queue.as_deref(),
            Some("q-dlq")
        );
        assert!(serde_json::from_str::<ConfigPatch>(r#"{"lease": 5}"#).is_err());
    }

    #[test]
    fn absurd_values_are_refused_with_the_field_named() {
        let limits = Limits::default();
        let base = QueueConfig::defaults_for("q", &limits);
        let cases = [
            QueueConfig {
                lease_ms: 0,
                ..base.clone()
            },
            QueueConfig {
                lease_ms: MAX_LEASE_MS + 1,
                ..base.clone()
            },
            QueueConfig {
                backoff: Backoff {
                    multiplier: f64::NAN,
                    ..base.backoff
                },
                ..base.clone()
            },
            QueueConfig {
                max_messages: 0,
                ..base.clone()
            },
            QueueConfig {
                dead_letter_queue: Some("q".into()),
                ..base.clone()
            },
        ];
        for case in cases {
            assert!(case.validate("q", &limits).is_err(), "{case:?}");
        }
        assert!(base.validate("q", &limits).is_ok());
    }
}
