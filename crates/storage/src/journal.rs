//! The shared journal: every change to a data directory is first an entry here.
//!
//! ```text
//! file:  magic "TWJRNL01" (8) | journal_id u64 | entries...
//! entry: len u32 (of kind + payload) | crc32c u32 (of kind + payload) | kind u8 | payload
//! group: an entry of kind 8 (count u32, len u64) followed by `count` entries, `len` bytes
//! ```
//! A zeroed or torn tail fails the length or CRC check; recovery truncates there.
//!
//! The unit of replay is a request: a single entry, or a group (a request of two or more
//! entries, framed by a group header). A group is replayed only if its header and every one
//! of its entries check out; otherwise replay stops at the group's start, as at a torn entry
//! (a power loss may keep any prefix of the one write that holds a request's entries).

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
const KIND_GROUP: u8 = 8;
const KIND_CREATE_VIEW: u8 = 9;
/// A group header's encoded length: prefix, kind, count u32, len u64.
pub const GROUP_HEADER_LEN: usize = ENTRY_PREFIX_LEN + 1 + 4 + 8;

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
    /// A view: a log with no files whose offsets are those of log `source`, everything
    /// below `floor`, and those the source has settled, settled from the start.
    CreateView {
        uid: u64,
        name: &'a str,
        source: u64,
        floor: u64,
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
    /// The header of a group: the next `count` entries, `len` bytes, are one request,
    /// replayed all or nothing. Written by `begin_group`/`finish_group`; `decode_unit`
    /// reads it with its entries.
    Group {
        count: u32,
        len: u64,
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
        Entry::CreateView {
            uid,
            name,
            source,
            floor,
        } => {
            out.push(KIND_CREATE_VIEW);
            out.extend_from_slice(&uid.to_le_bytes());
            put_string(out, name);
            out.extend_from_slice(&source.to_le_bytes());
            out.extend_from_slice(&floor.to_le_bytes());
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
            out.extend_from_slice(
                &crate::narrow::<u32>(ranges.len(), "a range count").to_le_bytes(),
            );
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
        Entry::Group { count, len } => {
            out.push(KIND_GROUP);
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
    }
    let len: u32 = crate::narrow(out.len() - start - ENTRY_PREFIX_LEN, "a journal entry");
    let crc = crc32c::crc32c(&out[start + ENTRY_PREFIX_LEN..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Starts a group (a request of two or more entries) at the end of `out`: reserves its
/// header, to be filled in by `finish_group` once the group's entries follow it.
pub fn begin_group(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.resize(at + GROUP_HEADER_LEN, 0);
    at
}

/// Fills in the header reserved at `at` for the `count` entries encoded after it.
pub fn finish_group(out: &mut [u8], at: usize, count: u32) {
    let len = (out.len() - at - GROUP_HEADER_LEN) as u64;
    // As `encode_entry(Entry::Group { count, len })` writes it, in place.
    let header = &mut out[at..at + GROUP_HEADER_LEN];
    header[0..4].copy_from_slice(
        &crate::narrow::<u32>(GROUP_HEADER_LEN - ENTRY_PREFIX_LEN, "a group header").to_le_bytes(),
    );
    header[8] = KIND_GROUP;
    header[9..13].copy_from_slice(&count.to_le_bytes());
    header[13..21].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&header[ENTRY_PREFIX_LEN..]);
    header[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// What replay applies at once: one entry, or the entries of a whole group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit<'a> {
    Entry(Entry<'a>),
    Group(Vec<Entry<'a>>),
}

/// Why replay stops at a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The bytes end early or do not check out (length, CRC), here or inside the group
    /// that starts here: what a torn write leaves, never acknowledged. The end of the last
    /// journal; corruption in an earlier one.
    #[error("{0}")]
    Torn(FormatError),
    /// Entries that check out (length and CRC) but cannot be replayed: a kind this version
    /// does not know (written by a newer one), or a malformed group. A torn write cannot
    /// produce these: the open refuses in any journal.
    #[error("{0} in an entry that checks out (written by a newer version?)")]
    Invalid(FormatError),
}

/// Decodes the unit of replay at the start of `buf` (an entry, or a group header with all
/// its entries); returns it and its encoded length.
pub fn decode_unit(buf: &[u8]) -> Result<(Unit<'_>, usize), UnitError> {
    let (body, total) = check_frame(buf).map_err(UnitError::Torn)?;
    let entry = parse_body(body).map_err(UnitError::Invalid)?;
    let Entry::Group { count, len } = entry else {
        return Ok((Unit::Entry(entry), total));
    };
    if count == 0 {
        return Err(UnitError::Invalid(FormatError::BadLength));
    }
    let len = usize::try_from(len).map_err(|_| UnitError::Torn(FormatError::Truncated))?;
    let members = buf
        .get(total..)
        .and_then(|rest| rest.get(..len))
        .ok_or(UnitError::Torn(FormatError::Truncated))?;
    let mut entries = Vec::with_capacity((count as usize).min(64));
    let mut pos = 0;
    for _ in 0..count {
        if pos == members.len() {
            // Every byte is there and checks out, but fewer entries than announced.
            return Err(UnitError::Invalid(FormatError::BadLength));
        }
        let (body, n) = check_frame(&members[pos..]).map_err(UnitError::Torn)?;
        match parse_body(body).map_err(UnitError::Invalid)? {
            Entry::Group { .. } => return Err(UnitError::Invalid(FormatError::NestedGroup)),
            entry => entries.push(entry),
        }
        pos += n;
    }
    if pos != members.len() {
        return Err(UnitError::Invalid(FormatError::BadLength));
    }
    Ok((Unit::Group(entries), total + len))
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

/// Decodes the entry at the start of `buf`; returns it and its encoded length. (A group
/// header comes back alone, as `Entry::Group`; replay reads groups with `decode_unit`.)
pub fn decode_entry(buf: &[u8]) -> Result<(Entry<'_>, usize), FormatError> {
    let (body, total) = check_frame(buf)?;
    Ok((parse_body(body)?, total))
}

/// Checks an entry's length and CRC; returns its body (kind + payload) and encoded length.
/// Every error here is what a torn or zeroed write leaves.
fn check_frame(buf: &[u8]) -> Result<(&[u8], usize), FormatError> {
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
    Ok((body, total))
}

/// Decodes an entry's body (kind + payload) that passed `check_frame`.
fn parse_body(body: &[u8]) -> Result<Entry<'_>, FormatError> {
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
        KIND_CREATE_VIEW => Entry::CreateView {
            uid: cur.u64()?,
            name: str_from(&mut cur)?,
            source: cur.u64()?,
            floor: cur.u64()?,
        },
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
        KIND_GROUP => Entry::Group {
            count: cur.u32()?,
            len: cur.u64()?,
        },
        other => return Err(FormatError::UnknownKind(other)),
    };
    if !cur.done() {
        return Err(FormatError::BadLength);
    }
    Ok(entry)
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
            Entry::CreateView {
                uid: 4,
                name: "#sub/orders/billing/0",
                source: 3,
                floor: 7,
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

    /// A move as the writer stages it: a group of an append and a settle.
    fn move_group(batch: &[u8]) -> (Vec<u8>, Vec<Entry<'_>>) {
        let entries = vec![
            Entry::Data { batch },
            Entry::Settle {
                uid: 2,
                ranges: vec![5..6],
            },
        ];
        let mut buf = Vec::new();
        let at = begin_group(&mut buf);
        for entry in &entries {
            encode_entry(&mut buf, entry);
        }
        finish_group(&mut buf, at, entries.len() as u32);
        (buf, entries)
    }

    /// Replays `buf` as recovery does: the units up to the first error.
    fn replay(buf: &[u8]) -> (Vec<Unit<'_>>, usize, Option<UnitError>) {
        let (mut units, mut pos) = (Vec::new(), 0);
        while pos < buf.len() {
            match decode_unit(&buf[pos..]) {
                Ok((unit, len)) => {
                    units.push(unit);
                    pos += len;
                }
                Err(err) => return (units, pos, Some(err)),
            }
        }
        (units, pos, None)
    }

    #[test]
    fn a_group_round_trips_and_a_torn_group_replays_as_nothing_of_it() {
        let mut builder = BatchBuilder::new(3, 9);
        builder.push(&NewRecord {
            id: b"x",
            body: &[7; 700],
            ..Default::default()
        });
        let batch = builder.finish();
        let (group, members) = move_group(&batch);
        // An entry before and after: single entries are not framed.
        let (before, after) = (Entry::DeleteLog { uid: 9 }, Entry::DeleteLog { uid: 10 });
        let mut buf = Vec::new();
        encode_entry(&mut buf, &before);
        let start = buf.len();
        assert_eq!(start, ENTRY_PREFIX_LEN + 9, "a single entry costs no frame");
        buf.extend_from_slice(&group);
        let end = buf.len();
        encode_entry(&mut buf, &after);
        let (units, pos, err) = replay(&buf);
        assert_eq!((pos, err), (buf.len(), None));
        assert_eq!(
            units,
            vec![
                Unit::Entry(before.clone()),
                Unit::Group(members.clone()),
                Unit::Entry(after)
            ]
        );
        // The header alone, as `decode_entry` (and an older reader) sees it, and as
        // `encode_entry` writes it.
        let (header, len) = decode_entry(&group).unwrap();
        let mut encoded = Vec::new();
        encode_entry(&mut encoded, &header);
        assert_eq!(encoded, group[..GROUP_HEADER_LEN]);
        assert_eq!(len, GROUP_HEADER_LEN);
        let members_len = (group.len() - GROUP_HEADER_LEN) as u64;
        assert_eq!(
            header,
            Entry::Group {
                count: 2,
                len: members_len
            }
        );
        // Torn at every byte: cut there, or the rest zeroed (the size kept), or only the
        // sectors (here: 16-byte pieces) from the cut on lost while later ones survive.
        // Replay keeps the entry before and nothing of the group, and stops at its start.
        for cut in start..end {
            let mut zeroed = buf[..end].to_vec();
            zeroed[cut..].fill(0);
            let mut holed = buf.clone();
            holed[cut..(cut + 16).min(end)].fill(0);
            for torn in [&buf[..cut], &zeroed[..], &holed[..]] {
                if torn.len() >= end && torn[start..end] == buf[start..end] {
                    continue; // zeros over zeros: not torn at all
                }
                let (units, pos, err) = replay(torn);
                assert_eq!(units, vec![Unit::Entry(before.clone())], "cut at {cut}");
                assert_eq!(pos, start, "cut at {cut}");
                // (Nothing to read at all when cut right at the group's start.)
                let ends_clean = torn.len() == start;
                assert!(
                    matches!(err, Some(UnitError::Torn(_))) || ends_clean && err.is_none(),
                    "cut at {cut}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn an_intact_but_malformed_group_or_unknown_kind_is_invalid_not_torn() {
        let mut builder = BatchBuilder::new(3, 9);
        builder.push(&NewRecord {
            id: b"x",
            body: b"y",
            ..Default::default()
        });
        let batch = builder.finish();
        let (group, _) = move_group(&batch);
        let header_with = |count: u32, len: u64| {
            let mut out = Vec::new();
            encode_entry(&mut out, &Entry::Group { count, len });
            out
        };
        let members = &group[GROUP_HEADER_LEN..];
        let n = members.len() as u64;
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("no entries", header_with(0, 0)),
            (
                "more entries announced",
                [header_with(3, n), members.to_vec()].concat(),
            ),
            (
                "fewer entries announced",
                [header_with(1, n), members.to_vec()].concat(),
            ),
            (
                "a group in a group",
                [header_with(1, GROUP_HEADER_LEN as u64 + n), group.clone()].concat(),
            ),
        ];
        // An entry of a kind this version does not know, alone or in a group.
        let mut unknown = vec![5, 0, 0, 0, 0, 0, 0, 0, 99, 1, 2, 3, 4];
        let crc = crc32c::crc32c(&unknown[8..]);
        unknown[4..8].copy_from_slice(&crc.to_le_bytes());
        cases.push(("an unknown kind", unknown.clone()));
        let mut data = Vec::new();
        encode_entry(&mut data, &Entry::Data { batch: &batch });
        let len = (data.len() + unknown.len()) as u64;
        cases.push((
            "an unknown kind in a group",
            [header_with(2, len), data, unknown].concat(),
        ));
        for (what, bytes) in cases {
            match decode_unit(&bytes) {
                Err(UnitError::Invalid(_)) => {}
                other => panic!("{what}: {other:?}"),
            }
        }
        // Announced bytes beyond the end: torn (the group's write cut short).
        let short = [header_with(2, n + 1), members.to_vec()].concat();
        assert!(matches!(decode_unit(&short), Err(UnitError::Torn(_))));
    }

    #[test]
    fn long_error_texts_are_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_ERROR_LEN);
        let cut = truncate_utf8(&text, MAX_ERROR_LEN);
        assert!(cut.len() <= MAX_ERROR_LEN && cut.is_char_boundary(cut.len()));
    }
}
