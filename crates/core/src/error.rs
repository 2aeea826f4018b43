//! Stable error codes of the broker's domain: what the broker itself refuses or fails with,
//! the same whichever front end asked. A code keeps its meaning forever; a retired code is
//! never reused.
//!
//! Core knows no transport. The server maps each code to an HTTP status and adds the codes
//! of its listeners (not_found, connection_timeout, ...), proto has the codes of its framing
//! (invalid_frame, ...); crates/server/src/errors.rs puts them together and generates the
//! full list, docs/errors.md.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidQueueName,
    InvalidConfig,
    InvalidMessage,
    InvalidReceipt,
    StaleReceipt,
    MessageTooLarge,
    BatchTooLarge,
    RequestTooLarge,
    QueueNotFound,
    RedriveNotFound,
    ConfigConflict,
    QueueFull,
    ExceedsCapacity,
    Overloaded,
    DiskFull,
    StorageFailed,
    ShuttingDown,
    Internal,
    QuotaExceeded,
    Superseded,
    InvalidStreamName,
    StreamNotFound,
    PartitionNotFound,
    OffsetOutOfRange,
    GroupNotFound,
    UnknownMember,
    GroupNotEmpty,
    InvalidSubscriptionName,
    SubscriptionNotFound,
    Unauthenticated,
    Forbidden,
    KeyNotFound,
    AclNotFound,
    InvalidHookName,
    HookNotFound,
    InvalidSignature,
    TargetUnavailable,
    InvalidPushName,
    PushNotFound,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidQueueName,
        ErrorCode::InvalidConfig,
        ErrorCode::InvalidMessage,
        ErrorCode::InvalidReceipt,
        ErrorCode::StaleReceipt,
        ErrorCode::MessageTooLarge,
        ErrorCode::BatchTooLarge,
        ErrorCode::RequestTooLarge,
        ErrorCode::QueueNotFound,
        ErrorCode::RedriveNotFound,
        ErrorCode::ConfigConflict,
        ErrorCode::QueueFull,
        ErrorCode::ExceedsCapacity,
        ErrorCode::Overloaded,
        ErrorCode::DiskFull,
        ErrorCode::StorageFailed,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::QuotaExceeded,
        ErrorCode::Superseded,
        ErrorCode::InvalidStreamName,
        ErrorCode::StreamNotFound,
        ErrorCode::PartitionNotFound,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::GroupNotFound,
        ErrorCode::UnknownMember,
        ErrorCode::GroupNotEmpty,
        ErrorCode::InvalidSubscriptionName,
        ErrorCode::SubscriptionNotFound,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::KeyNotFound,
        ErrorCode::AclNotFound,
        ErrorCode::InvalidHookName,
        ErrorCode::HookNotFound,
        ErrorCode::InvalidSignature,
        ErrorCode::TargetUnavailable,
        ErrorCode::InvalidPushName,
        ErrorCode::PushNotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidQueueName => "invalid_queue_name",
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::InvalidReceipt => "invalid_receipt",
            ErrorCode::StaleReceipt => "stale_receipt",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::BatchTooLarge => "batch_too_large",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::QueueNotFound => "queue_not_found",
            ErrorCode::RedriveNotFound => "redrive_not_found",
            ErrorCode::ConfigConflict => "config_conflict",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::ExceedsCapacity => "exceeds_capacity",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Superseded => "superseded",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::DiskFull => "disk_full",
            ErrorCode::StorageFailed => "storage_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::InvalidStreamName => "invalid_stream_name",
            ErrorCode::StreamNotFound => "stream_not_found",
            ErrorCode::PartitionNotFound => "partition_not_found",
            ErrorCode::OffsetOutOfRange => "offset_out_of_range",
            ErrorCode::GroupNotFound => "group_not_found",
            ErrorCode::UnknownMember => "unknown_member",
            ErrorCode::GroupNotEmpty => "group_not_empty",
            ErrorCode::InvalidSubscriptionName => "invalid_subscription_name",
            ErrorCode::SubscriptionNotFound => "subscription_not_found",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::KeyNotFound => "key_not_found",
            ErrorCode::AclNotFound => "acl_not_found",
            ErrorCode::InvalidHookName => "invalid_hook_name",
            ErrorCode::HookNotFound => "hook_not_found",
            ErrorCode::InvalidSignature => "invalid_signature",
            ErrorCode::TargetUnavailable => "target_unavailable",
            ErrorCode::InvalidPushName => "invalid_push_name",
            ErrorCode::PushNotFound => "push_not_found",
        }
    }

    /// What a person should do about it (for docs/errors.md).
    pub fn meaning(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated => {
                "Authentication is on and the request carried no valid credentials: none, a malformed token, an unknown or revoked key, a wrong secret, or an expired key (the message says which only when the secret was right). HTTP: `Authorization: Bearer <key id>.<secret>`; see docs/security.md. Too many failures from one address are refused for a while (Retry-After)."
            }
            ErrorCode::Forbidden => {
                "The principal has no grant for this operation on this resource (everything is denied unless granted), or settles a receipt delivered to another principal, or sets a tenant without the set_tenant grant. The message names the operation and resource; an admin grants it with `tidewater auth acl grant`."
            }
            ErrorCode::KeyNotFound => "No API key has this id (it was never made, or was revoked).",
            ErrorCode::AclNotFound => "No grant has this id (it was never made, or was revoked).",
            ErrorCode::InvalidHookName => {
                "Hook names are 1 to 200 characters of A-Z a-z 0-9 . _ -, and not . or .."
            }
            ErrorCode::HookNotFound => {
                "No hook has this name. Create it with PUT /v1/hooks/{hook} (docs/edges.md)."
            }
            ErrorCode::InvalidSignature => {
                "A webhook's signature is missing, malformed, made with a secret the hook does not hold, or its timestamp is outside the hook's tolerance (a replay or a clock off by minutes). The message says which. Nothing was stored; the sender should check the secret it signs with."
            }
            ErrorCode::InvalidPushName => {
                "Push endpoint names are 1 to 200 characters of A-Z a-z 0-9 . _ -, and not . or .."
            }
            ErrorCode::PushNotFound => {
                "No push endpoint has this name. Create it with PUT /v1/pushes/{push} (docs/edges.md)."
            }
            ErrorCode::TargetUnavailable => {
                "The queue or stream a hook delivers to does not exist (deleted after the hook was made). Nothing was stored; Retry-After asks the sender to retry, so no event is lost while an operator recreates it or points the hook elsewhere."
            }
            ErrorCode::GroupNotFound => {
                "No consumer group has this name (a group exists while it has members or committed offsets)."
            }
            ErrorCode::UnknownMember => {
                "The member is not in the group: its session expired (no heartbeat within session_timeout_ms) or it left. Join again; its partitions may have gone to others."
            }
            ErrorCode::GroupNotEmpty => {
                "The group has members: its offsets can be reset, and the group deleted, only while it has none (as Kafka's kafka-consumer-groups). Stop its consumers (a consumer that stops cleanly leaves at once; one that does not is removed when its session times out), then retry."
            }
            ErrorCode::InvalidSubscriptionName => {
                "Subscription names are 1 to 200 characters of A-Z a-z 0-9 . _ -, not . or .., and with their stream's name at most 254 bytes (consumers name a subscription stream/subscription)."
            }
            ErrorCode::SubscriptionNotFound => {
                "The stream has no subscription of this name. Create it with PUT /v1/streams/{stream}/subscriptions/{subscription}."
            }
            ErrorCode::InvalidStreamName => {
                "Stream names are 1 to 200 characters of A-Z a-z 0-9 . _ -, and not . or .."
            }
            ErrorCode::StreamNotFound => {
                "No stream has this name. Create it with PUT /v1/streams/{stream}."
            }
            ErrorCode::PartitionNotFound => {
                "The stream has no such partition: partitions are numbered from 0 to its partition count - 1."
            }
            ErrorCode::OffsetOutOfRange => {
                "The offset is past the partition's end (or before its start). Fetch from an offset the partition holds: the reply of a fetch or GET of the stream says its range."
            }
            ErrorCode::InvalidRequest => {
                "A field is missing, unknown or out of range. The message names it."
            }
            ErrorCode::InvalidQueueName => {
                "Queue names are 1 to 200 characters of A-Z a-z 0-9 . _ -, and not . or .."
            }
            ErrorCode::InvalidConfig => {
                "A queue configuration value is invalid. The message names the field and its range."
            }
            ErrorCode::InvalidMessage => {
                "A message is malformed (bad base64, both or neither of body/body_base64, bad delay). The whole batch was refused."
            }
            ErrorCode::InvalidReceipt => {
                "The receipt cannot be parsed or belongs to another queue. Use the receipt exactly as delivered."
            }
            ErrorCode::StaleReceipt => {
                "The lease of this receipt expired or was settled; the message may be leased to someone else now."
            }
            ErrorCode::MessageTooLarge => {
                "A message is larger than the configured limit (max_message_bytes)."
            }
            ErrorCode::BatchTooLarge => {
                "The batch has more messages or receipts than the configured limit."
            }
            ErrorCode::RequestTooLarge => {
                "The request body exceeds the configured limit (max_request_bytes)."
            }
            ErrorCode::QueueNotFound => {
                "No queue has this name. Create it with PUT /v1/queues/{queue}."
            }
            ErrorCode::RedriveNotFound => {
                "No redrive has this id (ids are kept in memory until restart)."
            }
            ErrorCode::ConfigConflict => {
                "The configuration conflicts with the queue's state (for example, a queue cannot be its own dead-letter queue)."
            }
            ErrorCode::QueueFull => {
                "The queue is at its capacity (max_messages or max_bytes). Retry after Retry-After; nothing was stored."
            }
            ErrorCode::ExceedsCapacity => {
                "The publish alone is larger than the queue's whole capacity (more messages than max_messages, or more bytes than max_bytes): it can never be accepted, so do not retry it. Split the batch or raise the queue's limits; nothing was stored."
            }
            ErrorCode::Overloaded => {
                "The broker's write queue is full. Retry after Retry-After; nothing was stored."
            }
            ErrorCode::DiskFull => {
                "Free disk space is below the watermark; publishes are refused while receive, ack, delete and purge work. Free space or consume."
            }
            ErrorCode::StorageFailed => {
                "The storage engine failed. The message says what happened: \"nothing was stored\" when the operation was refused before it was written; \"may or may not be there after a restart\" when it was written and the fsync that would make it durable failed (check after the restart; the server exits with status 74 right after answering). The server log has the cause."
            }
            ErrorCode::ShuttingDown => {
                "The server is shutting down. Retry against the restarted server."
            }
            ErrorCode::Internal => "A bug. The server log has details.",
            ErrorCode::QuotaExceeded => {
                "The tenant published faster than the queue's quota allows. Retry after Retry-After (the exact time until enough tokens exist); nothing was stored."
            }
            ErrorCode::Superseded => {
                "A newer message with the same key was published to this supersede queue: stop working on this one and ack it (extend is refused)."
            }
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error for a client: a stable code, a message for a person, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl BrokerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        BrokerError {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    pub fn stream_not_found(name: &str) -> Self {
        BrokerError::new(
            ErrorCode::StreamNotFound,
            format!("stream '{name}' does not exist"),
        )
    }

    pub fn queue_not_found(name: &str) -> Self {
        BrokerError::new(
            ErrorCode::QueueNotFound,
            format!("queue '{name}' does not exist"),
        )
    }

    pub fn subscription_not_found(stream: &str, sub: &str) -> Self {
        BrokerError::new(
            ErrorCode::SubscriptionNotFound,
            format!("stream '{stream}' has no subscription '{sub}'"),
        )
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        BrokerError::new(ErrorCode::InvalidRequest, message)
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for BrokerError {}

impl From<tidewater_storage::FormatError> for BrokerError {
    /// Bytes from a client that do not parse as records.
    fn from(err: tidewater_storage::FormatError) -> Self {
        BrokerError::new(
            ErrorCode::InvalidMessage,
            format!("a record in the batch is malformed: {err}"),
        )
    }
}

impl From<tidewater_storage::WriteError> for BrokerError {
    fn from(err: tidewater_storage::WriteError) -> Self {
        use tidewater_storage::WriteError as W;
        match err {
            W::NoSpace => {
                BrokerError::new(ErrorCode::DiskFull, "the disk is full; nothing was stored")
                    .retry_after(5_000)
            }
            W::Overloaded => BrokerError::new(
                ErrorCode::Overloaded,
                "the write queue is full; nothing was stored",
            )
            .retry_after(100),
            W::UnknownLog(_) => BrokerError::new(ErrorCode::QueueNotFound, "the queue was deleted"),
            W::ShuttingDown => {
                BrokerError::new(ErrorCode::ShuttingDown, "the server is shutting down")
            }
            other => BrokerError::new(ErrorCode::StorageFailed, other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
        }
    }
}
