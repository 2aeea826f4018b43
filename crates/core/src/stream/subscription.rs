//! Work-queue subscriptions on streams: names, storage log names, where a subscription
//! starts, and which queue settings a subscription takes.
//!
//! A subscription `S` on stream `T` delivers `T`'s records as a work queue: one delivery
//! state (`QueueState`) over its own small log `#sub/T/S` (source 0: merged and redriven
//! messages; its config is the subscription's) and one storage *view* per partition,
//! `#sub/T/S/<p>` (source `p + 1`). Consumers name it `T/S` wherever they name a queue
//! (queue names cannot hold `/`).

use crate::config::{ConfigPatch, Limits, QueueConfig, validate_name};
use crate::error::{BrokerError, ErrorCode};

/// Prefix of the storage logs of subscriptions.
pub const SUBSCRIPTION_LOG_PREFIX: &str = "#sub/";

/// Longest `stream/subscription` name (a binary frame's name is at most 255 bytes).
pub const MAX_SUBSCRIPTION_PATH_LEN: usize = 255;

/// The name consumers use: `stream/subscription`.
pub fn subscription_path(stream: &str, sub: &str) -> String {
    format!("{stream}/{sub}")
}

/// (stream, subscription) of a `stream/subscription` name; `None` for a queue's name.
pub fn split_subscription_path(name: &str) -> Option<(&str, &str)> {
    name.split_once('/')
}

/// The storage log of a subscription's own messages (and its configuration).
pub fn local_log_name(stream: &str, sub: &str) -> String {
    format!("{SUBSCRIPTION_LOG_PREFIX}{stream}/{sub}")
}

/// The storage view of a subscription's state over one partition.
pub fn view_log_name(stream: &str, sub: &str, partition: u32) -> String {
    format!("{SUBSCRIPTION_LOG_PREFIX}{stream}/{sub}/{partition}")
}

/// A subscription's storage log, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionLog<'a> {
    Local {
        stream: &'a str,
        sub: &'a str,
    },
    View {
        stream: &'a str,
        sub: &'a str,
        partition: u32,
    },
}

/// What a storage log name says, if it is a subscription's.
pub fn parse_subscription_log_name(name: &str) -> Option<SubscriptionLog<'_>> {
    let rest = name.strip_prefix(SUBSCRIPTION_LOG_PREFIX)?;
    let mut parts = rest.split('/');
    let (stream, sub) = (parts.next()?, parts.next()?);
    match (parts.next(), parts.next()) {
        (None, _) => Some(SubscriptionLog::Local { stream, sub }),
        (Some(p), None) => Some(SubscriptionLog::View {
            stream,
            sub,
            partition: p.parse().ok()?,
        }),
        _ => None,
    }
}

/// Subscription names follow the queue and stream rule, and `stream/subscription` must fit
/// a binary frame's name.
pub fn validate_subscription_name(stream: &str, sub: &str) -> Result<(), BrokerError> {
    validate_name(sub, "subscription", ErrorCode::InvalidSubscriptionName)?;
    let len = stream.len() + 1 + sub.len();
    if len > MAX_SUBSCRIPTION_PATH_LEN {
        return Err(BrokerError::new(
            ErrorCode::InvalidSubscriptionName,
            format!(
                "'{stream}/{sub}' is {len} bytes: stream and subscription names together must be at most {} bytes",
                MAX_SUBSCRIPTION_PATH_LEN - 1
            ),
        ));
    }
    Ok(())
}

/// Where a new subscription starts, on every partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStart {
    /// Every record the stream holds.
    #[default]
    Earliest,
    /// Only records produced after the subscription is made.
    Latest,
    /// The first record of each partition at or after this time (ms since the epoch).
    #[serde(untagged)]
    Time { time: i64 },
}

impl SubscriptionStart {
    /// `"earliest"`, `"latest"` or `{"time": <ms>}` (nothing else in the object).
    pub fn from_value(value: &serde_json::Value) -> Option<SubscriptionStart> {
        match value {
            serde_json::Value::String(s) if s == "earliest" => Some(SubscriptionStart::Earliest),
            serde_json::Value::String(s) if s == "latest" => Some(SubscriptionStart::Latest),
            serde_json::Value::Object(map) if map.len() == 1 => Some(SubscriptionStart::Time {
                time: map.get("time")?.as_i64()?,
            }),
            _ => None,
        }
    }
}

/// What happens to records a subscription has not settled when retention deletes them
/// past its caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRetention {
    /// Dropped (counted as `retention_expired`): retention exists to free the disk.
    #[default]
    Drop,
    /// Moved to the subscription's dead-letter queue first (counted too); retention
    /// waits for the moves.
    DeadLetter,
}

/// How a subscription holds back the stream's retention (see `stream::retention`): it
/// pins what it has not settled, up to these caps past what retention keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionRetention {
    /// How much older than the stream's retention_ms a held record may be; null = the
    /// stream's retention_ms (so at most twice as old); 0 = retention wins; -1 = no cap.
    #[serde(default)]
    pub pin_max_ms: Option<i64>,
    /// Bytes of segments retention would delete it may hold per partition; null = the
    /// stream's retention_bytes; 0 = retention wins; -1 = no cap.
    #[serde(default)]
    pub pin_max_bytes: Option<i64>,
    #[serde(default)]
    pub on_retention: OnRetention,
}

impl SubscriptionRetention {
    /// The caps in force on a stream with this retention: (max bytes, max age ms), `None`
    /// for no cap.
    pub fn caps(&self, retention_ms: i64, retention_bytes: i64) -> (Option<u64>, Option<u64>) {
        let cap = |own: Option<i64>, stream: i64| match own.unwrap_or(stream) {
            n if n < 0 => None,
            n => Some(n as u64),
        };
        (
            cap(self.pin_max_bytes, retention_bytes),
            cap(self.pin_max_ms, retention_ms),
        )
    }

    /// Checks the settings, with the queue settings they go with.
    pub fn validate(&self, queue: &QueueConfig) -> Result<(), BrokerError> {
        if self.on_retention == OnRetention::DeadLetter && queue.dead_letter_queue.is_none() {
            return Err(BrokerError::new(
                ErrorCode::InvalidConfig,
                "on_retention \"dead_letter\" needs a dead_letter_queue: name one, or use on_retention \"drop\"",
            ));
        }
        for (name, value) in [
            ("pin_max_ms", self.pin_max_ms),
            ("pin_max_bytes", self.pin_max_bytes),
        ] {
            if value.is_some_and(|v| v < -1) {
                return Err(BrokerError::new(
                    ErrorCode::InvalidConfig,
                    format!(
                        "{name} must be -1 (no cap), 0 (retention wins), a positive number, or null (the stream's retention)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A subscription's configuration as stored: a queue's settings and how it holds back
/// retention (shown without the queue settings a subscription does not take: `shown`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionConfig {
    #[serde(flatten)]
    pub queue: QueueConfig,
    #[serde(flatten)]
    pub retention: SubscriptionRetention,
}

/// Queue settings that act at publish: stored, never shown nor taken for a subscription.
pub const NOT_FOR_SUBSCRIPTIONS: [&str; 4] =
    ["quota", "dedup_window_ms", "max_messages", "max_bytes"];

impl SubscriptionConfig {
    /// As the API shows it (and takes it back in a PUT): without `NOT_FOR_SUBSCRIPTIONS`.
    pub fn shown(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("a configuration serializes");
        if let Some(map) = value.as_object_mut() {
            for field in NOT_FOR_SUBSCRIPTIONS {
                map.remove(field);
            }
        }
        value
    }
}

/// A change of a subscription's retention settings (absent: unchanged; null: the default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetentionPatch {
    pub pin_max_ms: Option<Option<i64>>,
    pub pin_max_bytes: Option<Option<i64>>,
    pub on_retention: Option<OnRetention>,
}

impl RetentionPatch {
    pub fn apply(&self, to: &SubscriptionRetention) -> SubscriptionRetention {
        SubscriptionRetention {
            pin_max_ms: self.pin_max_ms.unwrap_or(to.pin_max_ms),
            pin_max_bytes: self.pin_max_bytes.unwrap_or(to.pin_max_bytes),
            on_retention: self.on_retention.unwrap_or(to.on_retention),
        }
    }
}

/// A subscription create or change: the queue settings a subscription takes, how it holds
/// back retention, and (at create) where it starts.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionPatch {
    pub config: ConfigPatch,
    pub retention: RetentionPatch,
    pub start: Option<SubscriptionStart>,
}

impl SubscriptionPatch {
    /// Parses a JSON body: the fields of a queue configuration patch, and `start`.
    pub fn from_json(body: &[u8]) -> Result<Self, BrokerError> {
        let value: serde_json::Value = if body.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(body)
                .map_err(|e| BrokerError::new(ErrorCode::InvalidConfig, e.to_string()))?
        };
        Self::from_value(value)
    }

    /// As `from_json`, from a parsed JSON value.
    pub fn from_value(mut value: serde_json::Value) -> Result<Self, BrokerError> {
        let invalid = |e: serde_json::Error| {
            BrokerError::new(
                ErrorCode::InvalidConfig,
                format!("subscription configuration: {e}"),
            )
        };
        let Some(object) = value.as_object_mut() else {
            return Err(BrokerError::new(
                ErrorCode::InvalidConfig,
                "a subscription's configuration is a JSON object",
            ));
        };
        let start = match object.remove("start") {
            None | Some(serde_json::Value::Null) => None,
            Some(start) => Some(SubscriptionStart::from_value(&start).ok_or_else(|| {
                BrokerError::new(
                    ErrorCode::InvalidConfig,
                    format!(
                        "start must be \"earliest\", \"latest\" or {{\"time\": <ms since the epoch>}}, got {start}"
                    ),
                )
            })?),
        };
        let object = value.as_object_mut().expect("an object");
        let cap = |name: &str, v: serde_json::Value| -> Result<Option<i64>, BrokerError> {
            match v {
                serde_json::Value::Null => Ok(None),
                // (An integer written as a float is the integer, below 2^53: the API's rule.)
                v => v
                    .as_i64()
                    .or_else(|| {
                        v.as_f64()
                            .filter(|f| f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0)
                            .map(|f| f as i64)
                    })
                    .map(Some)
                    .ok_or_else(|| {
                        BrokerError::new(
                            ErrorCode::InvalidConfig,
                            format!("{name} must be an integer or null, got {v}"),
                        )
                    }),
            }
        };
        let retention = RetentionPatch {
            pin_max_ms: object
                .remove("pin_max_ms")
                .map(|v| cap("pin_max_ms", v))
                .transpose()?,
            pin_max_bytes: object
                .remove("pin_max_bytes")
                .map(|v| cap("pin_max_bytes", v))
                .transpose()?,
            on_retention: object
                .remove("on_retention")
                .map(|v| {
                    serde_json::from_value(v.clone()).map_err(|_| {
                        BrokerError::new(
                            ErrorCode::InvalidConfig,
                            format!("on_retention must be \"drop\" or \"dead_letter\", got {v}"),
                        )
                    })
                })
                .transpose()?,
        };
        let config = serde_json::from_value(value).map_err(|e| {
            let mut err = invalid(e);
            if err.message.contains("unknown field") {
                // (serde lists a queue's fields: a subscription takes these too.)
                err.message
                    .push_str(", start, pin_max_ms, pin_max_bytes, on_retention");
            }
            err
        })?;
        Ok(SubscriptionPatch {
            config,
            retention,
            start,
        })
    }
}

/// The configuration of a new subscription: a queue's defaults, with a dead-letter queue
/// named `<stream>.<subscription>-dlq` and no deduplication (nothing is published to it).
pub fn subscription_defaults(stream: &str, sub: &str, limits: &Limits) -> QueueConfig {
    let mut config = QueueConfig::defaults_for(&subscription_path(stream, sub), limits);
    // (A name past the limit is refused by validation, naming the fix: an explicit one.)
    config.dead_letter_queue = Some(format!("{stream}.{sub}-dlq"));
    config.dedup_window_ms = 0;
    config
}

/// Refuses the queue settings a subscription does not take: those that act when a message
/// is published (records are produced to the stream, not to a subscription).
pub fn check_subscription_patch(patch: &ConfigPatch) -> Result<(), BrokerError> {
    let refuse = |field: &str, instead: &str| {
        Err(BrokerError::new(
            ErrorCode::InvalidConfig,
            format!("{field} does not apply to a subscription: {instead}"),
        ))
    };
    if patch.quota.as_ref().is_some_and(Option::is_some) {
        return refuse(
            "quota",
            "producers write to the stream; limit them there (a subscription never refuses the stream's producers)",
        );
    }
    if patch.dedup_window_ms.is_some_and(|ms| ms > 0) {
        return refuse(
            "dedup_window_ms",
            "deduplicate when producing to the stream (Kafka idempotent producers), not per subscription",
        );
    }
    if patch.max_messages.is_some() || patch.max_bytes.is_some() {
        return refuse(
            "max_messages/max_bytes",
            "a subscription holds what the stream holds; the stream's retention bounds it",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_stay_apart_from_other_logs() {
        assert_eq!(
            parse_subscription_log_name(&local_log_name("orders", "billing")),
            Some(SubscriptionLog::Local {
                stream: "orders",
                sub: "billing"
            })
        );
        assert_eq!(
            parse_subscription_log_name(&view_log_name("orders", "billing", 7)),
            Some(SubscriptionLog::View {
                stream: "orders",
                sub: "billing",
                partition: 7
            })
        );
        for other in [
            "orders",
            "#stream/orders/0",
            "#sub/x",
            "#sub/a/b/c/d",
            "#sub/a/b/x",
        ] {
            assert_eq!(parse_subscription_log_name(other), None, "{other}");
        }
        assert_eq!(
            split_subscription_path("orders/billing"),
            Some(("orders", "billing"))
        );
        assert_eq!(split_subscription_path("orders"), None);
    }

    #[test]
    fn names_follow_the_rule_and_fit_a_frame() {
        assert!(validate_subscription_name("orders", "billing-2.v1").is_ok());
        for bad in ["", "a/b", "..", "é"] {
            let err = validate_subscription_name("orders", bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidSubscriptionName, "{bad}");
        }
        let long = "s".repeat(200);
        let err = validate_subscription_name(&"t".repeat(60), &long).unwrap_err();
        assert!(err.message.contains("at most 254"), "{}", err.message);
    }

    #[test]
    fn patches_parse_start_and_refuse_what_acts_at_publish() {
        let p = SubscriptionPatch::from_json(br#"{"start":"latest","lease_ms":5}"#).unwrap();
        assert_eq!(
            (p.start, p.config.lease_ms),
            (Some(SubscriptionStart::Latest), Some(5))
        );
        let p =
            SubscriptionPatch::from_json(br#"{"pin_max_ms":219.0,"pin_max_bytes":null}"#).unwrap();
        assert_eq!(
            (p.retention.pin_max_ms, p.retention.pin_max_bytes),
            (Some(Some(219)), Some(None))
        );
        assert!(SubscriptionPatch::from_json(br#"{"pin_max_ms":1.5}"#).is_err());
        let p = SubscriptionPatch::from_json(br#"{"start":{"time":1700000000000}}"#).unwrap();
        assert_eq!(
            p.start,
            Some(SubscriptionStart::Time {
                time: 1_700_000_000_000
            })
        );
        assert!(SubscriptionPatch::from_json(b"").unwrap().start.is_none());
        for bad in [
            &br#"{"start":"middle"}"#[..],
            br#"{"nope":1}"#,
            b"[1]",
            b"{",
        ] {
            let err = SubscriptionPatch::from_json(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidConfig);
        }
        for refused in [
            r#"{"quota":{"messages_per_s":1}}"#,
            r#"{"dedup_window_ms":1000}"#,
            r#"{"max_messages":5}"#,
        ] {
            let p = SubscriptionPatch::from_json(refused.as_bytes());
            let err = p.and_then(|p| check_subscription_patch(&p.config));
            assert!(err.is_err(), "{refused}");
        }
        let defaults = subscription_defaults("orders", "billing", &Limits::default());
        assert_eq!(
            defaults.dead_letter_queue.as_deref(),
            Some("orders.billing-dlq")
        );
        assert_eq!(defaults.dedup_window_ms, 0);
    }
}
