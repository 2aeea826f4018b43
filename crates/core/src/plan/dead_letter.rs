//! What a dead-lettered or redriven message carries.

use tidewater_storage::format::RECORD_FLAG_GENERATED_ID;
use tidewater_storage::{BatchBuilder, NewRecord, Record};

use super::message::header;
use crate::broker::RedriveRequest;

/// Headers added to a dead-lettered message.
pub const HEADER_SOURCE_QUEUE: &str = "tidewater-source-queue";
pub const HEADER_DELIVERY_COUNT: &str = "tidewater-delivery-count";
pub const HEADER_LAST_ERROR: &str = "tidewater-last-error";
pub const HEADER_ERRORS: &str = "tidewater-errors";
pub const HEADER_PUBLISHED_AT: &str = "tidewater-published-at";
pub const HEADER_DEAD_LETTERED_AT: &str = "tidewater-dead-lettered-at";

pub(crate) fn redrive_matches(record: &Record, req: &RedriveRequest) -> bool {
    if let Some(key) = &req.key
        && record.key.as_deref() != Some(key.as_bytes())
    {
        return false;
    }
    if let Some(text) = &req.error_contains
        && !header(record, HEADER_LAST_ERROR).is_some_and(|e| e.contains(text.as_str()))
    {
        return false;
    }
    if let Some(ids) = &req.ids {
        let id = crate::plan::message::record_id(record);
        return ids.contains(&id);
    }
    true
}

/// The headers of `record` as it enters the dead-letter queue: its own (without earlier
/// `tidewater-` ones) and its history: the queue it came from, its deliveries, its errors
/// (`(at, text)`, oldest first) and when it was published and dead-lettered.
pub fn dead_letter_headers(
    record: &Record,
    source_queue: &str,
    delivery_count: u32,
    errors: &[(i64, String)],
    now_ms: i64,
) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = record
        .headers
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .filter(|(k, _)| !k.starts_with("tidewater-"))
        .collect();
    let all: Vec<serde_json::Value> = errors
        .iter()
        .map(|(at, text)| serde_json::json!({"at": at, "error": text}))
        .collect();
    headers.push((HEADER_SOURCE_QUEUE.into(), source_queue.to_string()));
    headers.push((HEADER_DELIVERY_COUNT.into(), delivery_count.to_string()));
    headers.push((
        HEADER_LAST_ERROR.into(),
        errors.last().map(|(_, e)| e.clone()).unwrap_or_default(),
    ));
    headers.push((
        HEADER_ERRORS.into(),
        serde_json::Value::Array(all).to_string(),
    ));
    headers.push((
        HEADER_PUBLISHED_AT.into(),
        record.published_at_ms.to_string(),
    ));
    headers.push((HEADER_DEAD_LETTERED_AT.into(), now_ms.to_string()));
    headers
}

/// A record's headers as text, unchanged (a redrive moves a message as it is).
pub fn headers_as_text(record: &Record) -> Vec<(String, String)> {
    record
        .headers
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

/// Records moved to another queue, as one batch for its log.
pub struct MoveBatch {
    pub batch: Vec<u8>,
    /// The moved messages' bytes, as capacity counts them.
    pub bytes: u64,
    /// Their offsets in the source queue.
    pub offsets: Vec<u64>,
}

/// The batch that moves `records` (each with the headers it gets) into log `uid`.
pub fn move_batch(uid: u64, records: &[(Record, Vec<(String, String)>)], now_ms: i64) -> MoveBatch {
    let mut builder = BatchBuilder::new(uid, now_ms);
    let mut bytes = 0;
    let mut offsets = Vec::with_capacity(records.len());
    for (record, headers) in records {
        let header_refs: Vec<(&[u8], &[u8])> = headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        builder.push(&NewRecord {
            id: &record.id,
            generated_id: record.flags & RECORD_FLAG_GENERATED_ID != 0,
            key: record.key.as_deref(),
            headers: header_refs,
            deliver_at_ms: 0,
            body: &record.body,
        });
        bytes += (record.body.len()
            + record.key.as_ref().map_or(0, |k| k.len())
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()) as u64;
        offsets.push(record.offset);
    }
    MoveBatch {
        batch: builder.finish(),
        bytes,
        offsets,
    }
}
