//! Helpers shared by the fuzz targets.
//!
//! Every on-disk unit carries CRC32Cs, so random bytes almost never get past the checksum
//! check. A target whose first input byte is odd "repairs" the checksums of its input
//! first (as a writer would have computed them), so the fuzzer explores what lies behind
//! the check; even first bytes leave the input as it is (what a torn or corrupt file is).

use tidewater_format::BATCH_HEADER_LEN;

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
    // Odd length: version 04 (each log has a source: views); even: 02 (as 03).
    let magic = if buf.len() % 2 == 1 {
        b"TWCKPT04"
    } else {
        b"TWCKPT02"
    };
    buf[..8].copy_from_slice(magic);
    let len = (buf.len() - 20) as u64;
    buf[8..16].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&buf[20..]);
    put_u32(buf, 16, crc);
}

/// The largest `next_offset - ack_floor` of the logs of a checkpoint, walked as the decoder
/// walks it, up to where it stops being well formed. The settled offsets of a log cost
/// memory and time in proportion to that span (a 4,096-offset chunk at a time): a checkpoint
/// of a log with 2^40 offsets above its floor is valid and takes minutes to load, so the
/// checkpoint target skips spans no test could wait for.
pub fn checkpoint_max_span(buf: &[u8]) -> u64 {
    struct Walk<'a>(&'a [u8]);
    impl Walk<'_> {
        fn take(&mut self, n: u64) -> Option<&[u8]> {
            let n = usize::try_from(n).ok().filter(|&n| n <= self.0.len())?;
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(head)
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
        }
        fn u32(&mut self) -> Option<u64> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().unwrap()) as u64)
        }
        fn u8(&mut self) -> Option<u64> {
            Some(self.take(1)?[0] as u64)
        }
    }
    fn walk(w: &mut Walk<'_>, max: &mut u64, with_source: bool) -> Option<()> {
        w.u64()?; // next uid
        for _ in 0..w.u64()? {
            w.u64()?; // uid
            let name = w.u32()?;
            w.take(name)?;
            let config = w.u32()?;
            w.take(config)?;
            if with_source {
                w.u64()?;
            }
            let next_offset = w.u64()?;
            let floor = w.u64()?;
            *max = (*max).max(next_offset.saturating_sub(floor));
            for _ in 0..w.u64()? {
                w.take(16)?;
            }
            for _ in 0..w.u64()? {
                w.take(20)?;
                for _ in 0..w.u8()? {
                    w.take(8)?;
                    let text = w.u32()?;
                    w.take(text)?;
                }
            }
            w.take(12)?;
            for _ in 0..w.u64()? {
                w.take(8)?;
                let id = w.u8()?;
                w.take(id)?;
            }
        }
        Some(())
    }
    let mut max = 0;
    if let Some(payload) = buf.get(20..) {
        walk(&mut Walk(payload), &mut max, buf.starts_with(b"TWCKPT04"));
    }
    max
}

/// Sets each Kafka batch's length to what is there (the last one takes the rest) and its
/// CRC, for a record set of Kafka batches back to back.
pub fn repair_kafka_batches(buf: &mut [u8]) {
    use tidewater_format::kafka::KAFKA_HEADER_LEN;
    let mut at = 0;
    while buf.len() - at >= KAFKA_HEADER_LEN {
        let declared = i32::from_be_bytes(buf[at + 8..at + 12].try_into().unwrap());
        let rest = buf.len() - at;
        let len = usize::try_from(declared)
            .ok()
            .map(|n| n + 12)
            .filter(|&n| n >= KAFKA_HEADER_LEN && n <= rest)
            .unwrap_or(rest);
        let body_len = i32::try_from(len - 12).unwrap();
        buf[at + 8..at + 12].copy_from_slice(&body_len.to_be_bytes());
        let crc = crc32c::crc32c(&buf[at + 21..at + len]);
        buf[at + 17..at + 21].copy_from_slice(&crc.to_be_bytes());
        at += len;
    }
}
