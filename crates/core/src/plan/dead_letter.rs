//! What a dead-lettered or redriven message carries.

use tidewater_storage::Record;

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
    true
}
