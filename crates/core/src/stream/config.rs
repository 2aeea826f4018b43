//! A stream's configuration and how its partitions are named in storage.
//!
//! Each partition is a storage log named `#stream/<name>/<partition>` (a name no queue can
//! have: queue names have no `#` or `/`), whose configuration string is the stream's
//! configuration as JSON: every partition carries it, so recovery rebuilds a stream from
//! its logs alone, and a change rewrites it in every partition in one journal write.

use serde::{Deserialize, Serialize};

use crate::config::Limits;
use crate::error::{BrokerError, ErrorCode};

const LOG_PREFIX: &str = "#stream/";

/// Whose time a record carries (Kafka's `message.timestamp.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampType {
    /// The producer's (a record without one gets the broker's time at append).
    #[default]
    CreateTime,
    /// The broker's, at append, for every record (the producer's is kept in the batch but
    /// ignored).
    LogAppendTime,
}

/// What happens to a stream's old records (Kafka's `cleanup.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Cleanup {
    /// Deleted by retention (age, size).
    #[default]
    #[serde(rename = "delete")]
    Delete,
    /// Compacted: the latest record per key is kept, older ones go; retention deletes
    /// nothing. Every record needs a key.
    #[serde(rename = "compact")]
    Compact,
    /// Both: compacted, and retention deletes by age and size.
    #[serde(
        rename = "compact+delete",
        alias = "compact,delete",
        alias = "delete,compact"
    )]
    CompactDelete,
}

impl Cleanup {
    pub fn compacts(self) -> bool {
        matches!(self, Cleanup::Compact | Cleanup::CompactDelete)
    }

    pub fn deletes(self) -> bool {
        matches!(self, Cleanup::Delete | Cleanup::CompactDelete)
    }
}

/// Kafka's default `delete.retention.ms`: a day.
pub const DEFAULT_DELETE_RETENTION_MS: i64 = 86_400_000;
/// Kafka's default `min.cleanable.dirty.ratio`.
pub const DEFAULT_MIN_DIRTY_RATIO: f64 = 0.5;

/// A stream's configuration, as stored and as shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Partitions, numbered from 0. Can grow, never shrink (a key's partition would move).
    pub partitions: u32,
    #[serde(default)]
    pub timestamp_type: TimestampType,
    /// Records are deleted once their batch's largest timestamp is this old (ms), whole
    /// sealed segments at a time (Kafka's retention.ms); -1 keeps them forever.
    #[serde(default = "default_retention_ms")]
    pub retention_ms: i64,
    /// Bytes a partition keeps at most: its oldest sealed segments are deleted past it
    /// (Kafka's retention.bytes); -1: no limit.
    #[serde(default = "unlimited")]
    pub retention_bytes: i64,
    /// Delete (retention), compact, or both.
    #[serde(default)]
    pub cleanup: Cleanup,
    /// On a compacted stream: how long a tombstone (a record with a null value) stays
    /// after compaction first passed over it, for readers to see the delete (Kafka's
    /// delete.retention.ms).
    #[serde(default = "default_delete_retention_ms")]
    pub delete_retention_ms: i64,
    /// On a compacted stream: a partition is compacted once the share of its sealed bytes
    /// written since its last compaction reaches this (Kafka's min.cleanable.dirty.ratio).
    #[serde(default = "default_min_dirty_ratio")]
    pub min_dirty_ratio: f64,
    /// Bytes at which a partition's segment rolls (Kafka's segment.bytes); 0: the server's
    /// `segment_roll_bytes`.
    #[serde(default)]
    pub segment_bytes: u64,
    /// Age at which a partition's segment rolls, at the next append (Kafka's segment.ms);
    /// 0: the server's `segment_roll_ms`.
    #[serde(default)]
    pub segment_ms: u64,
    /// The largest record batch a produce may append, uncompressed (Kafka's
    /// max.message.bytes); 0: no limit but the server's.
    #[serde(default)]
    pub max_message_bytes: u64,
}

/// The smallest `segment_bytes` (Kafka 4's smallest segment.bytes).
pub const MIN_SEGMENT_BYTES: u64 = 1 << 20;

fn default_delete_retention_ms() -> i64 {
    DEFAULT_DELETE_RETENTION_MS
}

fn default_min_dirty_ratio() -> f64 {
    DEFAULT_MIN_DIRTY_RATIO
}

/// Kafka's default: 7 days.
pub const DEFAULT_RETENTION_MS: i64 = 7 * 86_400_000;

fn default_retention_ms() -> i64 {
    DEFAULT_RETENTION_MS
}

fn unlimited() -> i64 {
    -1
}

/// A change of configuration (or the configuration of a new stream): fields left out keep
/// their value (or default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamPatch {
    pub partitions: Option<u32>,
    pub timestamp_type: Option<TimestampType>,
    pub retention_ms: Option<i64>,
    pub retention_bytes: Option<i64>,
    pub cleanup: Option<Cleanup>,
    pub delete_retention_ms: Option<i64>,
    pub min_dirty_ratio: Option<f64>,
    pub segment_bytes: Option<u64>,
    pub segment_ms: Option<u64>,
    pub max_message_bytes: Option<u64>,
}

impl StreamConfig {
    /// A new stream's configuration: one partition unless the patch says otherwise.
    pub fn new(patch: &StreamPatch, limits: &Limits) -> Result<StreamConfig, BrokerError> {
        let config = StreamConfig {
            partitions: patch.partitions.unwrap_or(1),
            timestamp_type: patch.timestamp_type.unwrap_or_default(),
            retention_ms: patch.retention_ms.unwrap_or(DEFAULT_RETENTION_MS),
            retention_bytes: patch.retention_bytes.unwrap_or(-1),
            cleanup: patch.cleanup.unwrap_or_default(),
            delete_retention_ms: patch
                .delete_retention_ms
                .unwrap_or(DEFAULT_DELETE_RETENTION_MS),
            min_dirty_ratio: patch.min_dirty_ratio.unwrap_or(DEFAULT_MIN_DIRTY_RATIO),
            segment_bytes: patch.segment_bytes.unwrap_or(0),
            segment_ms: patch.segment_ms.unwrap_or(0),
            max_message_bytes: patch.max_message_bytes.unwrap_or(0),
        };
        config.validate(limits)?;
        Ok(config)
    }

    /// This configuration with `patch` applied; partitions may only grow.
    pub fn apply(&self, patch: &StreamPatch) -> Result<StreamConfig, BrokerError> {
        let mut out = self.clone();
        if let Some(partitions) = patch.partitions {
            if partitions == 0 {
                return Err(BrokerError::new(
                    ErrorCode::InvalidConfig,
                    "partitions must be at least 1",
                ));
            }
            if partitions < self.partitions {
                return Err(BrokerError::new(
                    ErrorCode::ConfigConflict,
                    format!(
                        "a stream's partitions can grow but never shrink (it has {}, asked {partitions}): keys would move to other partitions and offsets would be lost",
                        self.partitions
                    ),
                ));
            }
            out.partitions = partitions;
        }
        if let Some(timestamp_type) = patch.timestamp_type {
            out.timestamp_type = timestamp_type;
        }
        if let Some(ms) = patch.retention_ms {
            out.retention_ms = ms;
        }
        if let Some(bytes) = patch.retention_bytes {
            out.retention_bytes = bytes;
        }
        if let Some(cleanup) = patch.cleanup {
            out.cleanup = cleanup;
        }
        if let Some(ms) = patch.delete_retention_ms {
            out.delete_retention_ms = ms;
        }
        if let Some(ratio) = patch.min_dirty_ratio {
            out.min_dirty_ratio = ratio;
        }
        if let Some(bytes) = patch.segment_bytes {
            out.segment_bytes = bytes;
        }
        if let Some(ms) = patch.segment_ms {
            out.segment_ms = ms;
        }
        if let Some(bytes) = patch.max_message_bytes {
            out.max_message_bytes = bytes;
        }
        Ok(out)
    }

    pub fn validate(&self, limits: &Limits) -> Result<(), BrokerError> {
        for (name, value) in [
            ("retention_ms", self.retention_ms),
            ("retention_bytes", self.retention_bytes),
        ] {
            if value < -1 || value == 0 {
                return Err(BrokerError::new(
                    ErrorCode::InvalidConfig,
                    format!("{name} must be -1 (no limit) or at least 1, got {value}"),
                ));
            }
        }
        if self.delete_retention_ms < 0 {
            return Err(BrokerError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "delete_retention_ms must be 0 or more, got {}",
                    self.delete_retention_ms
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_dirty_ratio) {
            return Err(BrokerError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "min_dirty_ratio must be 0..=1 (the share of a partition's sealed bytes written since its last compaction), got {}",
                    self.min_dirty_ratio
                ),
            ));
        }
        if self.segment_bytes != 0 && !(MIN_SEGMENT_BYTES..=1 << 30).contains(&self.segment_bytes) {
            return Err(BrokerError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "segment_bytes must be 0 (the server's segment_roll_bytes) or 1048576..=1073741824 (1 MiB to 1 GiB), got {}",
                    self.segment_bytes
                ),
            ));
        }
        if self.max_message_bytes > tidewater_storage::format::MAX_BATCH_BODY as u64 {
            return Err(BrokerError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "max_message_bytes must be 0 (no limit but the server's) or at most {} (256 MiB), got {}",
                    tidewater_storage::format::MAX_BATCH_BODY,
                    self.max_message_bytes
                ),
            ));
        }
        if !(1..=limits.max_partitions).contains(&self.partitions) {
            return Err(BrokerError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "partitions must be 1..={} (max_partitions), got {}",
                    limits.max_partitions, self.partitions
                ),
            ));
        }
        Ok(())
    }
}

/// Stream names follow the rules of queue names.
pub fn validate_stream_name(name: &str) -> Result<(), BrokerError> {
    crate::config::validate_name(name, "stream", ErrorCode::InvalidStreamName)
}

/// The storage log name of a stream's partition.
pub fn partition_log_name(stream: &str, partition: u32) -> String {
    format!("{LOG_PREFIX}{stream}/{partition}")
}

/// (stream, partition) of a partition's log name; `None` for any other log.
pub fn parse_partition_log_name(log: &str) -> Option<(&str, u32)> {
    let rest = log.strip_prefix(LOG_PREFIX)?;
    let (stream, partition) = rest.rsplit_once('/')?;
    Some((stream, partition.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_grow_but_never_shrink_and_stay_in_bounds() {
        let limits = Limits::default();
        let config = StreamConfig::new(&StreamPatch::default(), &limits).unwrap();
        assert_eq!(config.partitions, 1);
        let grown = config
            .apply(&StreamPatch {
                partitions: Some(8),
                ..StreamPatch::default()
            })
            .unwrap();
        assert_eq!(grown.partitions, 8);
        let shrink = grown.apply(&StreamPatch {
            partitions: Some(4),
            ..StreamPatch::default()
        });
        assert_eq!(shrink.unwrap_err().code, ErrorCode::ConfigConflict);
        for partitions in [0, limits.max_partitions + 1] {
            let patch = StreamPatch {
                partitions: Some(partitions),
                ..StreamPatch::default()
            };
            let err = StreamConfig::new(&patch, &limits).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidConfig, "{partitions}");
        }
    }

    #[test]
    fn partition_logs_are_named_apart_from_queues() {
        let name = partition_log_name("sensor.readings", 12);
        assert_eq!(name, "#stream/sensor.readings/12");
        assert_eq!(
            parse_partition_log_name(&name),
            Some(("sensor.readings", 12))
        );
        assert_eq!(parse_partition_log_name("orders"), None);
        assert_eq!(parse_partition_log_name("#delay/3"), None);
        assert_eq!(parse_partition_log_name("#stream/x/notanumber"), None);
        assert!(validate_stream_name(&name).is_err());
        assert!(validate_stream_name("sensor.readings").is_ok());
    }
}
