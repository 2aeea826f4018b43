//! The shared journal: every change to a data directory is first an entry here.
//!
//! ```text
//! file:  magic "TWJRNL01" (8) | journal_id u64 | entries...
//! entry: len u32 (of kind + payload) | crc32c u32 (of kind + payload) | kind u8 | payload
//! ```
//! A zeroed or torn tail fails the length or CRC check; recovery truncates there.

use std::ops::Range;

use crate::error::FormatError;
use crate::format::{Cursor, check_batch, put_string};

pub const JOURNAL_MAGIC: &[u8; 8] = b"TWJRNL01";
pub const JOURNAL_HEADER_LEN: usize = 16;
const ENTRY_PREFIX_LEN: usize = 8;
/// Largest entry accepted on replay; protects recovery from a corrupt length field.
const MAX_ENTRY_LEN: usize = 512 << 20;
/// At most this many bytes of an error text are kept per retry.
pub const MAX_ERROR_LEN: usize = 1024;

const KIND_CREATE_LOG: u8 = 1;
const KIND_UPDATE_CONFIG: u8 = 2;
const KIND_DELETE_LOG: u8 = 3;
const KIND_DATA: u8 = 4;
const KIND_SETTLE: u8 = 5;
const KIND_RETRY: u8 = 6;
const KIND_ID_WINDOW: u8 = 7;

/// One journal entry, borrowed from the buffer it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<'a> {
    CreateLog {
        uid: u64,
        name: &'a str,
        config: &'a str,
    },
    UpdateConfig {
        uid: u64,
        config: &'a str,
    },
    DeleteLog {
        uid: u64,
    },
    /// A whole record batch (its header names the log and base offset).
    Data {
        batch: &'a [u8],
    },
    /// Offsets that are settled for good (acked, dead-lettered, purged, moved).
    Settle {
        uid: u64,
        ranges: Vec<Range<u64>>,
    },
    /// Remember client-chosen message ids of this log for `window_ms`, at most `max`.
    IdWindow {
        uid: u64,
        window_ms: u64,
        max: u32,
    },
    /// A delivery attempt ended without an ack: the count so far, when to deliver next, why.
    Retry {
        uid: u64,
        offset: u64,
        deliver_at_ms: i64,
        delivery_count: u32,
        at_ms: i64,
        error: &'a str,
    },
}

pub fn journal_header(journal_id: u64) -> [u8; JOURNAL_HEADER_LEN] {
    let mut out = [0u8; JOURNAL_HEADER_LEN];
    out[..8].copy_from_slice(JOURNAL_MAGIC);
    out[8..].copy_from_slice(&journal_id.to_le_bytes());
    out
}

/// Appends an encoded entry to `out`.
pub fn encode_entry(out: &mut Vec<u8>, entry: &Entry<'_>) {
    let start = out.len();
    out.extend_from_slice(&[0; ENTRY_PREFIX_LEN]);
    match entry {
        Entry::CreateLog { uid, name, config } => {
            out.push(KIND_CREATE_LOG);
            out.extend_from_slice(&uid.to_le_bytes());
            put_string(out, name);
            put_string(out, config);
        }
        Entry::UpdateConfig { uid, config } => {
            out.push(KIND_UPDATE_CONFIG);
            out.extend_from_slice(&uid.to_le_bytes());
            put_string(out, config);
        }
        Entry::DeleteLog { uid } => {
            out.push(KIND_DELETE_LOG);
            out.extend_from_slice(&uid.to_le_bytes());
        }
        Entry::IdWindow {
            uid,
            window_ms,
            max,
        } => {
            out.push(KIND_ID_WINDOW);
            out.extend_from_slice(&uid.to_le_bytes());
            out.extend_from_slice(&window_ms.to_le_bytes());
            out.extend_from_slice(&max.to_le_bytes());
        }
        Entry::Data { batch } => {
            out.push(KIND_DATA);
            out.extend_from_slice(batch);
        }
        Entry::Settle { uid, ranges } => {
            out.push(KIND_SETTLE);
            out.extend_from_slice(&uid.to_le_bytes());
            out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
            for range in ranges {
                out.extend_from_slice(&range.start.to_le_bytes());
                out.extend_from_slice(&range.end.to_le_bytes());
            }
        }
        Entry::Retry {
            uid,
            offset,
            deliver_at_ms,
            delivery_count,
            at_ms,
            error,
        } => {
            out.push(KIND_RETRY);
            out.extend_from_slice(&uid.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&deliver_at_ms.to_le_bytes());
            out.extend_from_slice(&delivery_count.to_le_bytes());
            out.extend_from_slice(&at_ms.to_le_bytes());
            put_string(out, truncate_utf8(error, MAX_ERROR_LEN));
        }
    }
    let len = (out.len() - start - ENTRY_PREFIX_LEN) as u32;
    let crc = crc32c::crc32c(&out[start + ENTRY_PREFIX_LEN..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Cuts a string to at most `max` bytes on a character boundary.
pub fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Decodes the entry at the start of `buf`; returns it and its encoded length.
pub fn decode_entry(buf: &[u8]) -> Result<(Entry<'_>, usize), FormatError> {
    if buf.len() < ENTRY_PREFIX_LEN {
        return Err(FormatError::Truncated);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    if len == 0 || len > MAX_ENTRY_LEN {
        return Err(FormatError::BadLength);
    }
    let total = ENTRY_PREFIX_LEN + len;
    if buf.len() < total {
        return Err(FormatError::Truncated);
    }
    let body = &buf[ENTRY_PREFIX_LEN..total];
    if crc32c::crc32c(body) != crc {
        return Err(FormatError::BadChecksum);
    }
    let mut cur = Cursor {
        buf: &body[1..],
        pos: 0,
    };
    let entry = match body[0] {
        KIND_CREATE_LOG => {
            let uid = cur.u64()?;
            let name = str_from(&mut cur)?;
            let config = str_from(&mut cur)?;
            Entry::CreateLog { uid, name, config }
        }
        KIND_UPDATE_CONFIG => {
            let uid = cur.u64()?;
            Entry::UpdateConfig {
                uid,
                config: str_from(&mut cur)?,
            }
        }
        KIND_DELETE_LOG => Entry::DeleteLog { uid: cur.u64()? },
        KIND_ID_WINDOW => Entry::IdWindow {
            uid: cur.u64()?,
            window_ms: cur.u64()?,
            max: cur.u32()?,
        },
        KIND_DATA => {
            let batch = &body[1..];
            let header = check_batch(batch)?;
            if header.total_len() != batch.len() {
                return Err(FormatError::BadLength);
            }
            cur.pos = batch.len();
            Entry::Data { batch }
        }
        KIND_SETTLE => {
            let uid = cur.u64()?;
            let n = cur.u32()? as usize;
            let mut ranges = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                let start = cur.u64()?;
                let end = cur.u64()?;
                if end < start {
                    return Err(FormatError::BadLength);
                }
                ranges.push(start..end);
            }
            Entry::Settle { uid, ranges }
        }
        KIND_RETRY => Entry::Retry {
            uid: cur.u64()?,
            offset: cur.u64()?,
            deliver_at_ms: cur.i64()?,
            delivery_count: cur.u32()?,
            at_ms: cur.i64()?,
            error: str_from(&mut cur)?,
        },
        other => return Err(FormatError::UnknownKind(other)),
    };
    if !cur.done() {
        return Err(FormatError::BadLength);
    }
    Ok((entry, total))
}

fn str_from<'a>(cur: &mut Cursor<'a>) -> Result<&'a str, FormatError> {
    let len = cur.u32()? as usize;
    std::str::from_utf8(cur.bytes(len)?).map_err(|_| FormatError::BadUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BatchBuilder, NewRecord};

    #[test]
    fn entries_round_trip_and_detect_damage() {
        let mut builder = BatchBuilder::new(3, 9);
        builder.push(&NewRecord {
            id: b"x",
            body: b"payload",
            ..Default::default()
        });
        let batch = builder.finish();
        let entries = vec![
            Entry::CreateLog {
                uid: 3,
                name: "orders",
                config: "{}",
            },
            Entry::UpdateConfig {
                uid: 3,
                config: "{\"lease_ms\":5}",
            },
            Entry::Data { batch: &batch },
            Entry::Settle {
                uid: 3,
                ranges: vec![0..4, 9..10],
            },
            Entry::Retry {
                uid: 3,
                offset: 2,
                deliver_at_ms: 77,
                delivery_count: 2,
                at_ms: 70,
                error: "boom",
            },
            Entry::DeleteLog { uid: 3 },
        ];
        let mut buf = Vec::new();
        for entry in &entries {
            encode_entry(&mut buf, entry);
        }
        let mut pos = 0;
        let mut decoded = Vec::new();
        while pos < buf.len() {
            let (entry, len) = decode_entry(&buf[pos..]).unwrap();
            decoded.push(entry);
            pos += len;
        }
        assert_eq!(decoded, entries);
        // Every truncation point and a zeroed tail are detected.
        for cut in 1..buf.len() {
            let mut pos = 0;
            while let Ok((_, len)) = decode_entry(&buf[pos..cut]) {
                pos += len;
            }
            assert!(pos <= cut);
        }
        assert!(decode_entry(&[0u8; 64]).is_err());
    }

    #[test]
    fn long_error_texts_are_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_ERROR_LEN);
        let cut = truncate_utf8(&text, MAX_ERROR_LEN);
        assert!(cut.len() <= MAX_ERROR_LEN && cut.is_char_boundary(cut.len()));
    }
}
