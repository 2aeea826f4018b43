//! Broker errors as Kafka error codes. A refusal a client should retry (storage busy, the
//! disk watermark, a shutdown) maps to a code Kafka's clients retry on their own, never to
//! a closed connection; the broker's message goes in the response's error message field
//! where the version has one.

use kafka_protocol::ResponseError;
use tidewater_core::{BrokerError, ErrorCode};

/// The Kafka error code of a broker error.
pub(crate) fn code(err: &BrokerError) -> i16 {
    kafka_error(err.code).code()
}

pub(crate) fn kafka_error(code: ErrorCode) -> ResponseError {
    use ErrorCode as E;
    match code {
        E::StreamNotFound | E::PartitionNotFound | E::QueueNotFound => {
            ResponseError::UnknownTopicOrPartition
        }
        E::InvalidStreamName | E::InvalidQueueName => ResponseError::InvalidTopicException,
        E::OffsetOutOfRange => ResponseError::OffsetOutOfRange,
        E::InvalidMessage => ResponseError::InvalidRecord,
        E::MessageTooLarge => ResponseError::MessageTooLarge,
        E::BatchTooLarge | E::RequestTooLarge => ResponseError::RecordListTooLarge,
        E::InvalidConfig | E::ConfigConflict => ResponseError::InvalidConfig,
        // Retriable: the client backs off and sends again (an idempotent producer's retry
        // is safe: nothing was written).
        E::Overloaded | E::QueueFull | E::ExceedsCapacity | E::QuotaExceeded => {
            ResponseError::RequestTimedOut
        }
        E::DiskFull | E::StorageFailed => ResponseError::KafkaStorageError,
        // Clients refresh their metadata and retry: the restarted broker answers.
        E::ShuttingDown => ResponseError::NotLeaderOrFollower,
        E::GroupNotFound => ResponseError::GroupIdNotFound,
        E::UnknownMember => ResponseError::UnknownMemberId,
        E::GroupNotEmpty => ResponseError::NonEmptyGroup,
        E::InvalidRequest
        | E::InvalidReceipt
        | E::StaleReceipt
        | E::RedriveNotFound
        | E::Superseded
        | E::InvalidSubscriptionName
        | E::SubscriptionNotFound => ResponseError::InvalidRequest,
        E::Internal => ResponseError::UnknownServerError,
        E::Unauthenticated => ResponseError::SaslAuthenticationFailed,
        // The listener answers a denied topic or group with its own code (TOPIC_ or
        // GROUP_AUTHORIZATION_FAILED); the broker's refusals are about receipts.
        E::Forbidden => ResponseError::TopicAuthorizationFailed,
        // Hooks and push endpoints are HTTP's: no Kafka request reaches them.
        E::KeyNotFound
        | E::AclNotFound
        | E::InvalidHookName
        | E::HookNotFound
        | E::InvalidSignature
        | E::TargetUnavailable
        | E::InvalidPushName
        | E::PushNotFound => ResponseError::InvalidRequest,
    }
}
