//! Helpers shared by the fuzz targets.
//!
//! Every on-disk unit carries CRC32Cs, so random bytes almost never get past the checksum
//! check. A target whose first input byte is odd "repairs" the checksums of its input
//! first (as a writer would have computed them), so the fuzzer explores what lies behind
//! the check; even first bytes leave the input as it is (what a torn or corrupt file is).

use tidewater_storage::format::BATCH_HEADER_LEN;

/// Splits off the mode byte: (repair checksums?, rest).
pub fn mode(data: &[u8]) -> Option<(bool, &[u8])> {
    let (&first, rest) = data.split_first()?;
    Some((first & 1 == 1, rest))
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().unwrap())
}

/// Recomputes the body and header CRCs of the batch at the start of `buf` (the body is
/// what its length field claims, cut at the end of `buf`). Returns the batch's length.
pub fn repair_batch(buf: &mut [u8]) -> Option<usize> {
    if buf.len() < BATCH_HEADER_LEN {
        return None;
    }
    let body_len = u32_at(buf, 28) as usize;
    let end = BATCH_HEADER_LEN.saturating_add(body_len).min(buf.len());
    let body_crc = crc32c::crc32c(&buf[BATCH_HEADER_LEN..end]);
    put_u32(buf, 40, body_crc);
    let header_crc = crc32c::crc32c_append(crc32c::crc32c(&buf[0..4]), &buf[8..BATCH_HEADER_LEN]);
    put_u32(buf, 4, header_crc);
    Some(end)
}

/// Repairs every batch of a run of batches laid back to back (a segment file).
pub fn repair_batches(buf: &mut [u8]) {
    let mut at = 0;
    while let Some(len) = repair_batch(&mut buf[at..]) {
        at += len;
    }
}

/// Repairs the CRC of each journal entry (and of the batch inside a Data entry).
pub fn repair_journal(buf: &mut [u8]) {
    let mut at = 0;
    while at + 8 < buf.len() {
        let len = u32_at(buf, at) as usize;
        let Some(end) = (at + 8)
            .checked_add(len)
            .filter(|&e| e <= buf.len() && len > 0)
        else {
            return;
        };
        if buf[at + 8] == 4 {
            repair_batch(&mut buf[at + 9..end]);
        }
        let crc = crc32c::crc32c(&buf[at + 8..end]);
        put_u32(buf, at + 4, crc);
        at = end;
    }
}

/// Repairs a checkpoint (magic, payload_len u64, crc u32, payload): the magic, the length
/// (all the rest) and the payload CRC.
pub fn repair_checkpoint(buf: &mut [u8]) {
    if buf.len() < 20 {
        return;
    }
    buf[..8].copy_from_slice(b"TWCKPT02");
    let len = (buf.len() - 20) as u64;
    buf[8..16].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&buf[20..]);
    put_u32(buf, 16, crc);
}
