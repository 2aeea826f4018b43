//! JSON shapes of the HTTP API v1 (../shared/design/api.md is the core contract).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use tidewater_core::broker::record_id;
use tidewater_core::queue::Delivery;
use tidewater_core::stream::records::{NewStreamRecord, StreamRecord};
use tidewater_core::{AckLevel, BrokerError, Delay, ErrorCode, NewMessage};
use tidewater_storage::Record;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub ack: Option<String>,
    /// The producer (for quotas and fairness) of messages that do not name their own.
    #[serde(default)]
    pub tenant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InMessage {
    pub body: Option<String>,
    pub body_base64: Option<String>,
    pub key: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub delay_ms: Option<u64>,
    pub deliver_at: Option<i64>,
    pub id: Option<String>,
    /// Up to this many ms added at random to the delivery time (spreads bursts).
    pub jitter_ms: Option<u64>,
    /// This message's own time to live (the queue's ttl_ms still applies if shorter).
    pub ttl_ms: Option<u64>,
    /// The producer, for quotas and fairness (while auth is off).
    pub tenant: Option<String>,
    /// Priority level, 0 = lowest (queues with priority_levels > 1).
    pub priority: Option<u8>,
}

pub fn ack_level(ack: Option<&str>) -> Result<AckLevel, BrokerError> {
    match ack {
        None | Some("durable") => Ok(AckLevel::Durable),
        Some("written") => Ok(AckLevel::Written),
        Some(other) => Err(BrokerError::invalid(format!(
            "ack must be \"durable\" or \"written\", got \"{other}\""
        ))),
    }
}

impl InMessage {
    pub fn into_message(self, idx: usize) -> Result<NewMessage, BrokerError> {
        let bad = |what: &str| {
            BrokerError::new(ErrorCode::InvalidMessage, format!("message {idx}: {what}"))
        };
        let body = match (self.body, self.body_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => BASE64
                .decode(b64.as_bytes())
                .map_err(|e| bad(&format!("body_base64 is not valid base64 ({e})")))?,
            (Some(_), Some(_)) => return Err(bad("give either body or body_base64, not both")),
            (None, None) => return Err(bad("body or body_base64 is required")),
        };
        let delay = match (self.delay_ms, self.deliver_at) {
            (Some(_), Some(_)) => return Err(bad("give either delay_ms or deliver_at, not both")),
            (Some(ms), None) => Delay::AfterMs(ms),
            (None, Some(at)) => Delay::AtMs(at),
            (None, None) => Delay::None,
        };
        Ok(NewMessage {
            id: self.id,
            body,
            key: self.key,
            headers: self.headers.into_iter().collect(),
            delay,
            jitter_ms: self.jitter_ms,
            ttl_ms: self.ttl_ms,
            tenant: self.tenant,
            priority: self.priority,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct PublishReply {
    pub ids: Vec<String>,
    /// Indexes of messages whose id was accepted within the dedup window: acknowledged,
    /// not enqueued again.
    pub duplicates: Vec<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    pub max: Option<usize>,
    pub wait_ms: Option<u64>,
    pub lease_ms: Option<u64>,
    /// Who receives (1 to 200 characters), for the forecast's consumer count; without it
    /// each connection counts as a consumer.
    pub consumer: Option<String>,
    #[serde(default)]
    pub encoding: BodyEncoding,
}

/// How a message body appears in a receive or peek reply. Every message has exactly one
/// of `body` and `body_base64`:
/// - `auto` (the default): `body` (a JSON string) when the bytes are valid UTF-8 with no
///   control character (Unicode category Cc: U+0000..U+001F, U+007F..U+009F) other than
///   tab, line feed and carriage return; otherwise `body_base64` (standard alphabet,
///   padded). The empty body is `"body": ""`.
/// - `base64`: `body_base64` for every message, whatever its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyEncoding {
    #[default]
    Auto,
    Base64,
}

impl BodyEncoding {
    /// The text of `body` when it goes out as `body`, None when as `body_base64`.
    pub fn as_text(self, body: &[u8]) -> Option<&str> {
        if self == BodyEncoding::Base64 {
            return None;
        }
        let text = std::str::from_utf8(body).ok()?;
        let plain = |c: char| !c.is_control() || matches!(c, '\t' | '\n' | '\r');
        text.chars().all(plain).then_some(text)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptsRequest {
    pub receipts: Vec<String>,
    pub delay_ms: Option<u64>,
    pub error: Option<String>,
    /// Nack only: "overloaded" slows the queue's dispatch (adaptive throttling).
    pub reason: Option<String>,
    pub lease_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveBody {
    pub to: Option<String>,
    pub rate_per_s: Option<u64>,
    pub max: Option<u64>,
    #[serde(default)]
    pub filter: RedriveFilter,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveFilter {
    pub key: Option<String>,
    pub error_contains: Option<String>,
    /// Only these messages, by id.
    pub ids: Option<Vec<String>>,
}

/// A message in a receive or peek reply.
pub struct OutMessage<'a> {
    pub record: &'a Record,
    pub receipt: Option<&'a str>,
    pub delivery_count: u32,
    pub encoding: BodyEncoding,
    /// A subscription's delivery from a stream partition: which one (`offset` is in it).
    pub partition: Option<u32>,
}

impl<'a> OutMessage<'a> {
    /// A delivery from a queue, or from a subscription (`subscription`: its sources past
    /// the first are the stream's partitions).
    pub fn delivered(delivery: &'a Delivery, encoding: BodyEncoding, subscription: bool) -> Self {
        OutMessage {
            record: &delivery.record,
            receipt: Some(&delivery.receipt),
            delivery_count: delivery.delivery_count,
            encoding,
            partition: subscription
                .then(|| delivery.source.checked_sub(1))
                .flatten()
                .map(|p| p as u32),
        }
    }
}

impl Serialize for OutMessage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let record = self.record;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("id", &record_id(record))?;
        if let Some(receipt) = self.receipt {
            map.serialize_entry("receipt", receipt)?;
        }
        match self.encoding.as_text(&record.body) {
            Some(text) => map.serialize_entry("body", text)?,
            None => map.serialize_entry("body_base64", &BASE64.encode(&record.body))?,
        }
        if let Some(key) = &record.key {
            map.serialize_entry("key", &String::from_utf8_lossy(key))?;
        }
        map.serialize_entry("headers", &Headers(&record.headers))?;
        map.serialize_entry("delivery_count", &self.delivery_count)?;
        map.serialize_entry("published_at", &record.published_at_ms)?;
        map.serialize_entry("offset", &record.offset)?;
        if let Some(partition) = self.partition {
            map.serialize_entry("partition", &partition)?;
        }
        map.end()
    }
}

struct Headers<'a>(&'a [(axum::body::Bytes, axum::body::Bytes)]);

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(
                &String::from_utf8_lossy(name),
                &String::from_utf8_lossy(value),
            )?;
        }
        map.end()
    }
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub code: &'a str,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(json: &str) -> Result<NewMessage, BrokerError> {
        serde_json::from_str::<InMessage>(json)
            .unwrap()
            .into_message(3)
    }

    #[test]
    fn bodies_are_text_or_base64_never_both() {
        assert_eq!(message(r#"{"body": "hi"}"#).unwrap().body, b"hi");
        assert_eq!(
            message(r#"{"body_base64": "AAEC"}"#).unwrap().body,
            vec![0, 1, 2]
        );
        for bad in [
            r#"{"body_base64": "@@@"}"#,
            r#"{"body": "a", "body_base64": "AA=="}"#,
            r#"{}"#,
            r#"{"body": "a", "delay_ms": 1, "deliver_at": 5}"#,
        ] {
            let err = message(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidMessage, "{bad}");
            assert!(err.message.starts_with("message 3:"), "{}", err.message);
        }
        assert!(serde_json::from_str::<InMessage>(r#"{"body": "a", "bdy": 1}"#).is_err());
    }

    #[test]
    fn bodies_go_out_as_text_only_when_plain_utf8() {
        let auto = BodyEncoding::Auto;
        assert_eq!(auto.as_text(b"order 1"), Some("order 1"));
        assert_eq!(auto.as_text(b""), Some(""));
        assert_eq!(auto.as_text(b"a\tb\r\nc"), Some("a\tb\r\nc"));
        assert_eq!(auto.as_text("caf\u{e9}".as_bytes()), Some("caf\u{e9}"));
        for binary in [
            &b"a\0b"[..],
            b"\x1b[31m",
            b"\x7f",
            "\u{85}".as_bytes(),
            b"\xff\xfe",
            b"\xe9t\xe9",
        ] {
            assert_eq!(auto.as_text(binary), None, "{binary:?}");
        }
        assert_eq!(BodyEncoding::Base64.as_text(b"order 1"), None);
        assert_eq!(BodyEncoding::Base64.as_text(b""), None);
        let parse = |s: &str| serde_json::from_str::<ReceiveRequest>(s).map(|r| r.encoding);
        assert_eq!(parse("{}").unwrap(), BodyEncoding::Auto);
        assert_eq!(
            parse(r#"{"encoding": "base64"}"#).unwrap(),
            BodyEncoding::Base64
        );
        assert!(parse(r#"{"encoding": "hex"}"#).is_err());
    }

    #[test]
    fn ack_levels() {
        assert_eq!(ack_level(None).unwrap(), AckLevel::Durable);
        assert_eq!(ack_level(Some("written")).unwrap(), AckLevel::Written);
        assert!(ack_level(Some("fast")).is_err());
    }
}

/// A produce to a stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProduceRequest {
    pub records: Vec<InRecord>,
    #[serde(default)]
    pub ack: Option<String>,
}

/// A stream record in a produce: key and value as text or base64 (a record may have no
/// key, and no value: a tombstone for compaction), text headers, an optional partition and
/// timestamp (ms since the epoch; the broker's time when absent).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InRecord {
    pub key: Option<String>,
    pub key_base64: Option<String>,
    pub value: Option<String>,
    pub value_base64: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub partition: Option<u32>,
    pub timestamp: Option<i64>,
}

impl InRecord {
    pub fn into_record(self, idx: usize) -> Result<NewStreamRecord, BrokerError> {
        let bad = |what: String| {
            BrokerError::new(ErrorCode::InvalidMessage, format!("record {idx}: {what}"))
        };
        let bytes = |field: &str, text: Option<String>, b64: Option<String>| match (text, b64) {
            (Some(_), Some(_)) => Err(bad(format!(
                "give either {field} or {field}_base64, not both"
            ))),
            (Some(text), None) => Ok(Some(text.into_bytes())),
            (None, Some(b64)) => BASE64
                .decode(b64.as_bytes())
                .map(Some)
                .map_err(|e| bad(format!("{field}_base64 is not valid base64 ({e})"))),
            (None, None) => Ok(None),
        };
        Ok(NewStreamRecord {
            key: bytes("key", self.key, self.key_base64)?,
            value: bytes("value", self.value, self.value_base64)?,
            headers: self
                .headers
                .into_iter()
                .map(|(k, v)| (k, Some(v.into_bytes())))
                .collect(),
            timestamp: self.timestamp,
            partition: self.partition,
        })
    }
}

/// A stream record in a fetch reply: `key` / `value` as text when their bytes are plain
/// text (the rule of message bodies, `BodyEncoding`), else `key_base64` / `value_base64`;
/// a missing key or value is absent.
pub struct OutRecord<'a> {
    pub record: &'a StreamRecord,
    pub encoding: BodyEncoding,
}

impl Serialize for OutRecord<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let record = self.record;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("offset", &record.offset)?;
        map.serialize_entry("timestamp", &record.timestamp)?;
        for (field, bytes) in [("key", &record.key), ("value", &record.value)] {
            if let Some(bytes) = bytes {
                match self.encoding.as_text(bytes) {
                    Some(text) => map.serialize_entry(field, text)?,
                    None => {
                        map.serialize_entry(&format!("{field}_base64"), &BASE64.encode(bytes))?
                    }
                }
            }
        }
        let headers: BTreeMap<&str, String> = record
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    v.as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default()
                        .into_owned(),
                )
            })
            .collect();
        map.serialize_entry("headers", &headers)?;
        map.end()
    }
}

/// A consumer instance to create: the streams its group member reads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerRequest {
    pub streams: Vec<String>,
    /// A stable name (Kafka's group.instance.id): creating it again takes its place back.
    pub instance: Option<String>,
    pub session_timeout_ms: Option<u64>,
    /// Where to start in a partition the group has committed nothing for.
    pub start_at: Option<tidewater_core::broker::StartAt>,
}

/// Offsets to commit (all the member's positions when absent).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    pub offsets: Option<Vec<CommitOffset>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitOffset {
    pub stream: String,
    pub partition: u32,
    pub offset: u64,
}

/// A record fetched by a group member: its stream and partition, then the record.
pub struct OutMemberRecord<'a> {
    pub record: &'a tidewater_core::broker::MemberRecord,
    pub encoding: BodyEncoding,
}

impl Serialize for OutMemberRecord<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let inner = serde_json::to_value(OutRecord {
            record: &self.record.record,
            encoding: self.encoding,
        })
        .map_err(serde::ser::Error::custom)?;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("stream", &self.record.stream)?;
        map.serialize_entry("partition", &self.record.partition)?;
        if let serde_json::Value::Object(fields) = inner {
            for (k, v) in fields {
                map.serialize_entry(&k, &v)?;
            }
        }
        map.end()
    }
}

/// An offset reset of a group (`POST /v1/groups/{group}/offsets/reset`): the streams (all
/// the group committed offsets for when absent), exactly one target, and whether to only
/// show the plan.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetOffsetsRequest {
    pub streams: Option<Vec<String>>,
    /// "earliest" or "latest".
    pub to: Option<String>,
    /// RFC 3339 text, or milliseconds since the epoch (a number or digits).
    pub to_datetime: Option<serde_json::Value>,
    pub shift_by: Option<i64>,
    pub to_offset: Option<u64>,
    pub dry_run: Option<bool>,
}

impl ResetOffsetsRequest {
    /// The one target the request names.
    pub fn target(&self) -> Result<tidewater_core::broker::ResetTo, BrokerError> {
        use tidewater_core::broker::ResetTo;
        let mut targets = Vec::new();
        if let Some(to) = &self.to {
            targets.push(match to.as_str() {
                "earliest" => ResetTo::Earliest,
                "latest" => ResetTo::Latest,
                other => {
                    return Err(BrokerError::invalid(format!(
                        "to is \"earliest\" or \"latest\", not \"{}\" (a time goes in to_datetime, an offset in to_offset)",
                        other.chars().take(40).collect::<String>()
                    )));
                }
            });
        }
        if let Some(time) = &self.to_datetime {
            let ms = match time {
                serde_json::Value::String(text) => crate::time::parse_time(text)
                    .map_err(|e| BrokerError::invalid(format!("to_datetime: {e}")))?,
                serde_json::Value::Number(n) => n.as_i64().ok_or_else(|| {
                    BrokerError::invalid(
                        "to_datetime: a number is whole milliseconds since the epoch",
                    )
                })?,
                _ => {
                    return Err(BrokerError::invalid(
                        "to_datetime is RFC 3339 text (e.g. \"2026-11-30T10:00:00Z\") or milliseconds since the epoch",
                    ));
                }
            };
            targets.push(ResetTo::Datetime(ms));
        }
        if let Some(by) = self.shift_by {
            targets.push(ResetTo::ShiftBy(by));
        }
        if let Some(offset) = self.to_offset {
            targets.push(ResetTo::Offset(offset));
        }
        match targets.as_slice() {
            [one] => Ok(*one),
            [] => Err(BrokerError::invalid(
                "name where to reset: one of to (\"earliest\" or \"latest\"), to_datetime, shift_by or to_offset",
            )),
            _ => Err(BrokerError::invalid(
                "name only one of to, to_datetime, shift_by and to_offset",
            )),
        }
    }
}

/// An API key to make (`POST /v1/auth/keys`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub principal: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub tenant: Option<String>,
    #[serde(default)]
    pub description: String,
    /// When it stops working (ms since the epoch), or how long from now.
    pub expires_at_ms: Option<i64>,
    pub expires_in_ms: Option<u64>,
}

impl KeyRequest {
    pub fn into_spec(self, now_ms: i64) -> Result<tidewater_auth::KeySpec, BrokerError> {
        let expires_at_ms = match (self.expires_at_ms, self.expires_in_ms) {
            (Some(_), Some(_)) => {
                return Err(BrokerError::invalid(
                    "give expires_at_ms or expires_in_ms, not both",
                ));
            }
            (Some(at), None) => Some(at),
            (None, Some(ms)) => Some(now_ms.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))),
            (None, None) => None,
        };
        Ok(tidewater_auth::KeySpec {
            principal: self.principal,
            roles: self.roles,
            tenant: self.tenant,
            description: self.description,
            expires_at_ms,
        })
    }
}

/// A grant to make (`POST /v1/auth/acls`): a principal or a role, a kind of resource, a
/// name pattern and operations.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRequest {
    pub principal: Option<String>,
    pub role: Option<String>,
    pub resource: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "match")]
    pub matching: Option<String>,
    pub operations: Vec<String>,
}

impl AclRequest {
    pub fn into_spec(self) -> Result<tidewater_auth::AclSpec, BrokerError> {
        use tidewater_auth::{Match, Operation, ResourceKind, Subject};
        let subject = match (self.principal, self.role) {
            (Some(p), None) => Subject::Principal(p),
            (None, Some(r)) => Subject::Role(r),
            _ => {
                return Err(BrokerError::invalid(
                    "a grant names one principal or one role",
                ));
            }
        };
        let resource = ResourceKind::parse(&self.resource).ok_or_else(|| {
            BrokerError::invalid(format!(
                "resource '{}' is not one of {}",
                self.resource,
                ResourceKind::ALL.map(ResourceKind::as_str).join(", ")
            ))
        })?;
        let matching = match self.matching.as_deref() {
            None => Match::Exact,
            Some(m) => Match::parse(m).ok_or_else(|| {
                BrokerError::invalid(format!("match '{m}' is not one of exact, prefix, glob"))
            })?,
        };
        let operations = self
            .operations
            .iter()
            .map(|o| {
                Operation::parse(o).ok_or_else(|| {
                    BrokerError::invalid(format!(
                        "operation '{o}' is not one of {}",
                        Operation::ALL.map(Operation::as_str).join(", ")
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let spec = tidewater_auth::AclSpec {
            subject,
            resource,
            name: self.name,
            matching,
            operations,
        };
        spec.validate().map_err(BrokerError::invalid)?;
        Ok(spec)
    }
}
