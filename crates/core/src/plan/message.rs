//! A message to publish and the checks every message passes.

use tidewater_storage::Record;
use tidewater_storage::format::RECORD_FLAG_GENERATED_ID;

use crate::clock::Jitter;
use crate::config::{Limits, MAX_LEASE_MS, MAX_TENANT_LEN, MAX_TTL_MS};
use crate::error::{BrokerError, ErrorCode};
use crate::queue::{HEADER_TENANT, HEADER_TTL_MS};

/// When a published message becomes deliverable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delay {
    #[default]
    None,
    AfterMs(u64),
    AtMs(i64),
}

/// A message to publish, as parsed by the API layer.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    pub id: Option<String>,
    pub body: Vec<u8>,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub delay: Delay,
    /// A random extra delay of up to this many ms (spreads cron bursts).
    pub jitter_ms: Option<u64>,
    /// This message's time to live from its publish.
    pub ttl_ms: Option<u64>,
    /// The producer, for quotas and fairness.
    pub tenant: Option<String>,
    /// Priority level (0 = lowest) on queues with `priority_levels` > 1.
    pub priority: Option<u8>,
}

/// A message's tenant (JSON field, or the reserved header in a record batch).
pub(crate) fn check_tenant(idx: usize, value: &[u8]) -> Result<(), BrokerError> {
    if value.is_empty() || value.len() > MAX_TENANT_LEN || std::str::from_utf8(value).is_err() {
        return Err(BrokerError::new(
            ErrorCode::InvalidMessage,
            format!(
                "message {idx}: tenant ({HEADER_TENANT}) must be 1..={MAX_TENANT_LEN} bytes of UTF-8"
            ),
        ));
    }
    Ok(())
}

/// A message's own ttl_ms (JSON field, or the reserved header in a record batch).
pub(crate) fn check_ttl(idx: usize, value: &[u8]) -> Result<(), BrokerError> {
    match std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(ttl) if (1..=MAX_TTL_MS).contains(&ttl) => Ok(()),
        _ => Err(BrokerError::new(
            ErrorCode::InvalidMessage,
            format!(
                "message {idx}: ttl_ms ({HEADER_TTL_MS}) must be 1..={MAX_TTL_MS} (30 days), got '{}'",
                String::from_utf8_lossy(value)
            ),
        )),
    }
}

pub fn header(record: &Record, name: &str) -> Option<String> {
    record
        .headers
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

pub(crate) fn new_message_id(now_ms: i64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..6].copy_from_slice(&(now_ms as u64).to_be_bytes()[2..]);
    id[6..14].copy_from_slice(&fastrand::u64(..).to_le_bytes());
    id[14..].copy_from_slice(&fastrand::u16(..).to_le_bytes());
    id
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// The id of a record as shown to clients.
pub fn record_id(record: &Record) -> String {
    if record.flags & RECORD_FLAG_GENERATED_ID != 0 {
        hex(&record.id)
    } else {
        String::from_utf8_lossy(&record.id).into_owned()
    }
}

/// A requested lease, if any, is 1..=MAX_LEASE_MS.
pub(crate) fn check_lease_ms(lease_ms: Option<u64>) -> Result<(), BrokerError> {
    match lease_ms {
        Some(lease) if !(1..=MAX_LEASE_MS).contains(&lease) => Err(BrokerError::invalid(format!(
            "lease_ms must be 1..={MAX_LEASE_MS} (12 h)"
        ))),
        _ => Ok(()),
    }
}

/// Checks a message of a JSON publish: the per-message limits, its ttl, tenant and jitter.
/// Returns its delivery time when delayed.
pub fn validate_message(
    limits: &Limits,
    random: &dyn Jitter,
    idx: usize,
    msg: &NewMessage,
    now: i64,
) -> Result<Option<i64>, BrokerError> {
    let headers = msg.headers.iter().map(|(k, v)| (k.len(), v.len()));
    let at = check_message(
        limits,
        idx,
        msg.body.len(),
        msg.id.as_ref().map(String::len),
        msg.key.as_ref().map(String::len),
        headers,
        msg.delay,
        now,
    )?;
    if let Some(ttl) = msg.ttl_ms {
        check_ttl(idx, ttl.to_string().as_bytes())?;
    }
    if let Some(tenant) = &msg.tenant {
        check_tenant(idx, tenant.as_bytes())?;
    }
    match msg.jitter_ms {
        None | Some(0) => Ok(at),
        Some(jitter) if jitter > limits.max_delay_ms => Err(BrokerError::new(
            ErrorCode::InvalidMessage,
            format!(
                "message {idx}: jitter_ms {jitter} exceeds max_delay_ms {}",
                limits.max_delay_ms
            ),
        )),
        Some(jitter) => {
            let extra = (jitter as f64 * random.unit()).round() as i64;
            Ok(Some(at.unwrap_or(now) + extra).filter(|&at| at > now))
        }
    }
}

/// The per-message limits, shared by JSON publishes and binary record batches. Returns
/// the delivery time of a delayed message.
#[allow(clippy::too_many_arguments)]
pub fn check_message(
    limits: &Limits,
    idx: usize,
    body_len: usize,
    id_len: Option<usize>,
    key_len: Option<usize>,
    headers: impl ExactSizeIterator<Item = (usize, usize)>,
    delay: Delay,
    now: i64,
) -> Result<Option<i64>, BrokerError> {
    let bad = |what: String| {
        Err(BrokerError::new(
            ErrorCode::InvalidMessage,
            format!("message {idx}: {what}"),
        ))
    };
    if body_len > limits.max_message_bytes {
        return Err(BrokerError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "message {idx}: body of {body_len} bytes exceeds max_message_bytes {}",
                limits.max_message_bytes
            ),
        ));
    }
    let max_id = limits.max_id_bytes.min(255);
    if let Some(len) = id_len
        && (len == 0 || len > max_id)
    {
        return bad(format!("id must be 1..={max_id} bytes"));
    }
    if let Some(len) = key_len
        && len > limits.max_key_bytes
    {
        return bad(format!(
            "key of {len} bytes exceeds max_key_bytes {}",
            limits.max_key_bytes
        ));
    }
    if headers.len() > limits.max_headers {
        return bad(format!(
            "{} headers exceed max_headers {}",
            headers.len(),
            limits.max_headers
        ));
    }
    for (name, value) in headers {
        if name == 0 || name > limits.max_header_bytes || value > limits.max_header_bytes {
            return bad(format!(
                "header names must be 1..={0} bytes and values at most {0} bytes",
                limits.max_header_bytes
            ));
        }
    }
    match delay {
        Delay::None => Ok(None),
        Delay::AfterMs(ms) if ms > limits.max_delay_ms => bad(format!(
            "delay_ms {ms} exceeds max_delay_ms {}",
            limits.max_delay_ms
        )),
        Delay::AfterMs(0) => Ok(None),
        Delay::AfterMs(ms) => Ok(Some(now + ms as i64)),
        // Saturating: a deliver_at far in the past (i64::MIN) is "now", not an overflow.
        Delay::AtMs(at) if at.saturating_sub(now) > limits.max_delay_ms as i64 => bad(format!(
            "deliver_at is more than max_delay_ms {} ahead",
            limits.max_delay_ms
        )),
        Delay::AtMs(at) if at <= now => Ok(None),
        Delay::AtMs(at) => Ok(Some(at)),
    }
}
