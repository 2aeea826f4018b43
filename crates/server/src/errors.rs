//! Error codes as the server sends them: the broker's domain codes
//! (`tidewater_core::ErrorCode`), the binary protocol's own (`tidewater_proto::FrameCode`)
//! and those of the server's listeners, with the HTTP status each travels with. Every code
//! is stable (it keeps its meaning forever; a retired code is never reused), and
//! docs/errors.md is generated from here (a test keeps it in sync).

use std::fmt;

use tidewater_core::ErrorCode;
use tidewater_proto::FrameCode;

/// A code on the wire: the `code` of an HTTP error body, of an `Error` or `Throttle` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// Decided by the broker, the same over HTTP and the binary protocol.
    Broker(ErrorCode),
    /// The binary protocol's framing and handshake; the connection closes after it.
    Frame(FrameCode),
    /// HTTP: the body is not JSON.
    InvalidJson,
    /// HTTP: no route has this path.
    NotFound,
    /// HTTP: the route does not take this method.
    MethodNotAllowed,
    /// Both listeners: the broker is still recovering its data.
    NotReady,
    /// Both listeners: a deadline of the connection passed (handshake, idle, HTTP head or
    /// body).
    ConnectionTimeout,
}

impl Code {
    /// Every code, in the order of docs/errors.md.
    pub const ALL: &'static [Code] = &[
        Code::InvalidJson,
        Code::Broker(ErrorCode::InvalidRequest),
        Code::Broker(ErrorCode::InvalidQueueName),
        Code::Broker(ErrorCode::InvalidConfig),
        Code::Broker(ErrorCode::InvalidMessage),
        Code::Broker(ErrorCode::InvalidReceipt),
        Code::Broker(ErrorCode::StaleReceipt),
        Code::Broker(ErrorCode::MessageTooLarge),
        Code::Broker(ErrorCode::BatchTooLarge),
        Code::Broker(ErrorCode::RequestTooLarge),
        Code::Broker(ErrorCode::QueueNotFound),
        Code::Broker(ErrorCode::RedriveNotFound),
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::Broker(ErrorCode::ConfigConflict),
        Code::Broker(ErrorCode::QueueFull),
        Code::Broker(ErrorCode::ExceedsCapacity),
        Code::Broker(ErrorCode::Overloaded),
        Code::Broker(ErrorCode::DiskFull),
        Code::Broker(ErrorCode::StorageFailed),
        Code::NotReady,
        Code::Broker(ErrorCode::ShuttingDown),
        Code::Broker(ErrorCode::Internal),
        Code::Frame(FrameCode::InvalidFrame),
        Code::Frame(FrameCode::FrameTooLarge),
        Code::Broker(ErrorCode::QuotaExceeded),
        Code::Broker(ErrorCode::Superseded),
        Code::Frame(FrameCode::UnsupportedVersion),
        Code::ConnectionTimeout,
        Code::Broker(ErrorCode::InvalidStreamName),
        Code::Broker(ErrorCode::StreamNotFound),
        Code::Broker(ErrorCode::PartitionNotFound),
        Code::Broker(ErrorCode::OffsetOutOfRange),
        Code::Broker(ErrorCode::GroupNotFound),
        Code::Broker(ErrorCode::UnknownMember),
        Code::Broker(ErrorCode::GroupNotEmpty),
        Code::Broker(ErrorCode::InvalidSubscriptionName),
        Code::Broker(ErrorCode::SubscriptionNotFound),
        Code::Broker(ErrorCode::Unauthenticated),
        Code::Broker(ErrorCode::Forbidden),
        Code::Broker(ErrorCode::KeyNotFound),
        Code::Broker(ErrorCode::AclNotFound),
        Code::Broker(ErrorCode::InvalidHookName),
        Code::Broker(ErrorCode::HookNotFound),
        Code::Broker(ErrorCode::InvalidSignature),
        Code::Broker(ErrorCode::TargetUnavailable),
        Code::Broker(ErrorCode::InvalidPushName),
        Code::Broker(ErrorCode::PushNotFound),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Broker(code) => code.as_str(),
            Code::Frame(code) => code.as_str(),
            Code::InvalidJson => "invalid_json",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::NotReady => "not_ready",
            Code::ConnectionTimeout => "connection_timeout",
        }
    }

    /// The HTTP status this code travels with. The binary protocol's codes have one too:
    /// the CLI labels a binary-protocol error with it and exits by it.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Broker(code) => broker_status(code),
            Code::Frame(FrameCode::InvalidFrame | FrameCode::UnsupportedVersion) => 400,
            Code::Frame(FrameCode::FrameTooLarge) => 413,
            Code::InvalidJson => 400,
            Code::NotFound => 404,
            Code::MethodNotAllowed => 405,
            Code::NotReady => 503,
            Code::ConnectionTimeout => 408,
        }
    }

    /// What a person should do about it (for docs/errors.md, which a test generates: only
    /// tests need it).
    #[cfg(test)]
    pub fn meaning(self) -> &'static str {
        match self {
            Code::Broker(code) => code.meaning(),
            Code::Frame(code) => code.meaning(),
            Code::InvalidJson => "The body is not valid JSON. Fix the request body.",
            Code::NotFound => "No such endpoint. See /v1/openapi.json.",
            Code::MethodNotAllowed => "This endpoint does not take this method.",
            Code::NotReady => "The server is still recovering. Retry shortly.",
            Code::ConnectionTimeout => {
                "The connection sent nothing in time: no Hello within handshake_timeout_ms, or no frame within idle_timeout_ms (send Ping to keep an idle connection open), or over HTTP the request head or body arrived too slowly. The server closes the connection after this error."
            }
        }
    }
}

/// The HTTP status of each of the broker's codes.
fn broker_status(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::InvalidRequest
        | ErrorCode::InvalidQueueName
        | ErrorCode::InvalidConfig
        | ErrorCode::InvalidMessage
        | ErrorCode::InvalidReceipt
        | ErrorCode::StaleReceipt
        | ErrorCode::InvalidStreamName
        | ErrorCode::InvalidSubscriptionName
        | ErrorCode::InvalidHookName
        | ErrorCode::InvalidPushName
        | ErrorCode::OffsetOutOfRange => 400,
        ErrorCode::QueueNotFound
        | ErrorCode::RedriveNotFound
        | ErrorCode::StreamNotFound
        | ErrorCode::PartitionNotFound
        | ErrorCode::GroupNotFound
        | ErrorCode::SubscriptionNotFound
        | ErrorCode::KeyNotFound
        | ErrorCode::AclNotFound
        | ErrorCode::HookNotFound
        | ErrorCode::PushNotFound
        | ErrorCode::UnknownMember => 404,
        ErrorCode::Unauthenticated | ErrorCode::InvalidSignature => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::ConfigConflict | ErrorCode::Superseded | ErrorCode::GroupNotEmpty => 409,
        ErrorCode::MessageTooLarge
        | ErrorCode::BatchTooLarge
        | ErrorCode::RequestTooLarge
        | ErrorCode::ExceedsCapacity => 413,
        ErrorCode::QueueFull | ErrorCode::Overloaded | ErrorCode::QuotaExceeded => 429,
        ErrorCode::DiskFull => 507,
        ErrorCode::StorageFailed | ErrorCode::Internal => 500,
        ErrorCode::ShuttingDown | ErrorCode::TargetUnavailable => 503,
    }
}

impl From<ErrorCode> for Code {
    fn from(code: ErrorCode) -> Code {
        Code::Broker(code)
    }
}

impl From<FrameCode> for Code {
    fn from(code: FrameCode) -> Code {
        Code::Frame(code)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text of docs/errors.md (kept in sync by a test).
#[cfg(test)]
pub fn errors_markdown() -> String {
    let mut out = String::from(
        "# Error codes\n\n\
         Every non-2xx reply of the HTTP API has the body `{\"code\": \"...\", \"message\": \"...\"}`; refusals\n\
         that should be retried (429, 507, and 503 `not_ready`, `shutting_down` and `target_unavailable`) also carry `retry_after_ms`\n\
         and a `Retry-After` header (seconds).\n\
         Codes are stable: a code keeps its meaning forever and a retired code is never reused.\n\
         Per-receipt failures of ack, nack and extend use `invalid_receipt` and `stale_receipt` inside a 200 reply.\n\n\
         This file is generated from `crates/server/src/errors.rs` by `UPDATE_DOCS=1 cargo test -p tidewater docs`.\n\n\
         | code | HTTP status | meaning and what to do |\n|---|---|---|\n",
    );
    for code in Code::ALL {
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            code.as_str(),
            code.http_status(),
            code.meaning()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
        }
    }

    /// A code added to core or proto must be listed (and so documented) here.
    #[test]
    fn every_broker_and_frame_code_is_listed_once() {
        for code in ErrorCode::ALL {
            let n = Code::ALL
                .iter()
                .filter(|c| **c == Code::Broker(*code))
                .count();
            assert_eq!(n, 1, "{code}");
        }
        for code in FrameCode::ALL {
            let n = Code::ALL
                .iter()
                .filter(|c| **c == Code::Frame(*code))
                .count();
            assert_eq!(n, 1, "{code}");
        }
    }

    #[test]
    fn docs_errors_md_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md");
        let expected = errors_markdown();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(path, &expected).unwrap();
        }
        let actual = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            actual == expected,
            "docs/errors.md is stale: run `UPDATE_DOCS=1 cargo test -p tidewater docs`"
        );
    }
}
