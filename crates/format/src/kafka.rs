//! Kafka's record batch, format v2 ("magic 2"): how a stream partition stores its records.
//!
//! A stream batch is stored as one Kafka `RecordBatch` inside a tidewater batch (the
//! tidewater header's `BATCH_FLAG_KAFKA`), so a fetch hands it out as stored, to a Kafka
//! client or to tidewater's own, with no per-record work. Offsets inside a batch are deltas
//! (`offsetDelta`), so a batch may skip offsets (compaction removes records without
//! renumbering); its offset span is `lastOffsetDelta + 1`.
//!
//! Layout (big-endian; Kafka's protocol guide, "Record Batch"):
//!
//! ```text
//!  0 baseOffset i64      8 batchLength i32 (bytes after this field)
//! 12 partitionLeaderEpoch i32   16 magic i8 = 2   17 crc u32 (CRC32C of bytes 21..)
//! 21 attributes i16: bits 0-2 compression, 3 timestamp type (1 = LogAppendTime),
//!    4 transactional, 5 control, 6 delete horizon
//! 23 lastOffsetDelta i32   27 baseTimestamp i64   35 maxTimestamp i64
//! 43 producerId i64   51 producerEpoch i16   53 baseSequence i32   57 recordsCount i32
//! 61 records: length varint, attributes i8, timestampDelta varlong, offsetDelta varint,
//!    keyLength varint (-1: null), key, valueLength varint (-1: null), value,
//!    headersCount varint, headers (keyLength varint, key, valueLength varint, value)
//! ```
//!
//! Written by hand rather than with the `kafka-protocol` crate's record codec: checking a
//! batch reads its 61-byte header and walks the records without allocating, and building
//! one writes straight into one buffer, on the produce and fetch paths of every stream
//! record. (Kafka's request and response schemas will come from `kafka-protocol`.)

use crate::FormatError;

/// Bytes before the first record.
pub const KAFKA_HEADER_LEN: usize = 61;
/// Where the CRC's coverage starts (the attributes).
const CRC_FROM: usize = 21;
pub const KAFKA_MAGIC: i8 = 2;

/// Attribute bits.
pub const COMPRESSION_MASK: i16 = 0b111;
pub const TIMESTAMP_LOG_APPEND_TIME: i16 = 1 << 3;
pub const TRANSACTIONAL: i16 = 1 << 4;
pub const CONTROL: i16 = 1 << 5;
/// The base timestamp is the batch's delete horizon (KIP-534): set by compaction on a batch
/// that kept tombstones; they go once it has passed. Record times stay true (their deltas
/// are taken from it).
pub const DELETE_HORIZON: i16 = 1 << 6;

/// The most offsets one batch can span: `lastOffsetDelta` is an i32.
pub const MAX_KAFKA_BATCH_SPAN: u64 = 1 << 31;

/// The fields of a batch's header that the broker reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaBatchHeader {
    pub base_offset: i64,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl KafkaBatchHeader {
    /// Offsets the batch spans (its records may skip some).
    pub fn offset_span(&self) -> u64 {
        u64::from(self.last_offset_delta.unsigned_abs()) + 1
    }

    pub fn compression(&self) -> u8 {
        (self.attributes & COMPRESSION_MASK) as u8
    }

    pub fn is_log_append_time(&self) -> bool {
        self.attributes & TIMESTAMP_LOG_APPEND_TIME != 0
    }

    /// When compaction may remove this batch's tombstones (`None`: not yet cleaned).
    pub fn delete_horizon(&self) -> Option<i64> {
        (self.attributes & DELETE_HORIZON != 0).then_some(self.base_timestamp)
    }
}

/// Checks one whole batch (`bytes` holds exactly one): its length, magic, CRC and offset
/// fields, and, when uncompressed, that its records fit it and their offsets rise within the
/// span. Allocates nothing.
pub fn check_kafka_batch(bytes: &[u8]) -> Result<KafkaBatchHeader, FormatError> {
    if bytes.len() < KAFKA_HEADER_LEN {
        return Err(FormatError::Truncated);
    }
    let batch_length = be_i32(bytes, 8);
    if batch_length < 0 || batch_length as usize + 12 != bytes.len() {
        return Err(FormatError::BadLength);
    }
    if bytes[16] as i8 != KAFKA_MAGIC {
        return Err(FormatError::UnknownVersion(bytes[16]));
    }
    if crc32c::crc32c(&bytes[CRC_FROM..]) != be_u32(bytes, 17) {
        return Err(FormatError::BadChecksum);
    }
    let header = KafkaBatchHeader {
        base_offset: be_i64(bytes, 0),
        attributes: be_i16(bytes, 21),
        last_offset_delta: be_i32(bytes, 23),
        base_timestamp: be_i64(bytes, 27),
        max_timestamp: be_i64(bytes, 35),
        producer_id: be_i64(bytes, 43),
        producer_epoch: be_i16(bytes, 51),
        base_sequence: be_i32(bytes, 53),
        records_count: be_i32(bytes, 57),
    };
    if header.last_offset_delta < 0
        || header.records_count < 0
        || header.records_count as i64 > header.last_offset_delta as i64 + 1
    {
        return Err(FormatError::BadLength);
    }
    if header.compression() == 0 {
        let mut n = 0;
        let mut last_delta = -1i64;
        for record in KafkaRecords::new(&bytes[KAFKA_HEADER_LEN..]) {
            let record = record?;
            if record.offset_delta <= last_delta
                || record.offset_delta > header.last_offset_delta as i64
            {
                return Err(FormatError::BadLength);
            }
            last_delta = record.offset_delta;
            n += 1;
        }
        if n != header.records_count {
            return Err(FormatError::BadLength);
        }
    }
    Ok(header)
}

/// The batches of a record set (Kafka's `records` field: batches back to back), each as
/// its bytes; an error for a batch cut short (its header says more than is there).
pub fn split_kafka_batches(set: &[u8]) -> impl Iterator<Item = Result<&[u8], FormatError>> {
    let mut rest = set;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < 12 {
            rest = &[];
            return Some(Err(FormatError::Truncated));
        }
        let len = usize::try_from(be_i32(rest, 8))
            .ok()
            .and_then(|n| n.checked_add(12))
            .filter(|&n| n <= rest.len());
        match len {
            Some(len) => {
                let (batch, after) = rest.split_at(len);
                rest = after;
                Some(Ok(batch))
            }
            None => {
                rest = &[];
                Some(Err(FormatError::Truncated))
            }
        }
    })
}

/// Sets a checked batch's base offset (and clears its leader epoch); with `append_time`,
/// marks its timestamps as the broker's (LogAppendTime) and sets its max timestamp to it,
/// recomputing the CRC.
pub fn stamp_kafka_batch(bytes: &mut [u8], base_offset: u64, append_time: Option<i64>) {
    bytes[0..8].copy_from_slice(&base_offset.to_be_bytes());
    bytes[12..16].copy_from_slice(&0i32.to_be_bytes());
    if let Some(now) = append_time {
        let attributes = be_i16(bytes, 21) | TIMESTAMP_LOG_APPEND_TIME;
        bytes[21..23].copy_from_slice(&attributes.to_be_bytes());
        bytes[35..43].copy_from_slice(&now.to_be_bytes());
        let crc = crc32c::crc32c(&bytes[CRC_FROM..]);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
    }
}

/// One record of an uncompressed batch, borrowed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord<'a> {
    pub timestamp_delta: i64,
    pub offset_delta: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// The headers' bytes (count first); `headers()` walks them.
    headers: &'a [u8],
}

impl<'a> KafkaRecord<'a> {
    pub fn headers(
        &self,
    ) -> impl Iterator<Item = Result<(&'a [u8], Option<&'a [u8]>), FormatError>> {
        let mut cur = Varints(self.headers);
        let count = cur.varint().unwrap_or(0);
        (0..count.max(0)).map(move |_| {
            let key = cur.bytes()?.ok_or(FormatError::BadLength)?;
            let value = cur.bytes()?;
            Ok((key, value))
        })
    }
}

/// The records of an uncompressed batch (the bytes after its header).
pub struct KafkaRecords<'a> {
    rest: &'a [u8],
}

impl<'a> KafkaRecords<'a> {
    pub fn new(records: &'a [u8]) -> KafkaRecords<'a> {
        KafkaRecords { rest: records }
    }

    /// Bytes not read yet (the position of the next record is the records' length minus
    /// this).
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }
}

impl<'a> Iterator for KafkaRecords<'a> {
    type Item = Result<KafkaRecord<'a>, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let mut cur = Varints(self.rest);
            let len = cur.varint()?;
            let len = usize::try_from(len).map_err(|_| FormatError::BadLength)?;
            if len > cur.0.len() {
                return Err(FormatError::BadLength);
            }
            let (body, rest) = cur.0.split_at(len);
            let mut r = Varints(body);
            let _attributes = r.u8()?;
            let timestamp_delta = r.varint()?;
            let offset_delta = r.varint()?;
            let key = r.bytes()?;
            let value = r.bytes()?;
            let headers = r.0;
            // The headers must parse to the record's end.
            let mut h = Varints(headers);
            let count = h.varint()?;
            if count < 0 {
                return Err(FormatError::BadLength);
            }
            for _ in 0..count {
                h.bytes()?.ok_or(FormatError::BadLength)?;
                h.bytes()?;
            }
            if !h.0.is_empty() {
                return Err(FormatError::BadLength);
            }
            Ok((
                KafkaRecord {
                    timestamp_delta,
                    offset_delta,
                    key,
                    value,
                    headers,
                },
                rest,
            ))
        })();
        match parsed {
            Ok((record, rest)) => {
                self.rest = rest;
                Some(Ok(record))
            }
            Err(err) => {
                self.rest = &[];
                Some(Err(err))
            }
        }
    }
}

/// A record of a batch with its place and time worked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord<'a> {
    pub offset: u64,
    /// The record's time, or the batch's for a LogAppendTime batch.
    pub timestamp: i64,
    pub record: KafkaRecord<'a>,
}

/// The records of an uncompressed batch (`bytes`, with `header` from `check_kafka_batch`)
/// at offset `from` or later, each with its offset (from `base_offset`, the batch's as
/// stored) and timestamp: what broker and client both hand out.
pub fn batch_records<'a>(
    bytes: &'a [u8],
    header: &KafkaBatchHeader,
    base_offset: u64,
    from: u64,
) -> impl Iterator<Item = Result<BatchRecord<'a>, FormatError>> + 'a {
    batch_records_at(bytes, header, base_offset, from, 0)
}

/// The first value of header `name` in an uncompressed batch's records that is not
/// `allowed` (a record naming a tenant other than its producer's), if any.
pub fn header_other_than<'a>(
    bytes: &'a [u8],
    name: &[u8],
    allowed: &[u8],
) -> Result<Option<&'a [u8]>, FormatError> {
    let header = check_kafka_batch(bytes)?;
    for record in batch_records(bytes, &header, 0, 0) {
        for pair in record?.record.headers() {
            let (key, value) = pair?;
            if key == name && value != Some(allowed) {
                return Ok(Some(value.unwrap_or_default()));
            }
        }
    }
    Ok(None)
}

/// `batch_records`, reading from byte `position` of the records (where a record starts, as
/// `record_positions` found it) instead of the first.
pub fn batch_records_at<'a>(
    bytes: &'a [u8],
    header: &KafkaBatchHeader,
    base_offset: u64,
    from: u64,
    position: usize,
) -> impl Iterator<Item = Result<BatchRecord<'a>, FormatError>> + 'a {
    let header = *header;
    let records = &bytes[KAFKA_HEADER_LEN.min(bytes.len())..];
    KafkaRecords::new(&records[position.min(records.len())..]).filter_map(move |record| {
        let record = match record {
            Ok(record) => record,
            Err(err) => return Some(Err(err)),
        };
        let offset = base_offset + record.offset_delta.unsigned_abs();
        if offset < from {
            return None;
        }
        let timestamp = if header.is_log_append_time() {
            header.max_timestamp
        } else {
            header.base_timestamp.wrapping_add(record.timestamp_delta)
        };
        Some(Ok(BatchRecord {
            offset,
            timestamp,
            record,
        }))
    })
}

/// A compressed batch (`bytes`, checked) made uncompressed: its header over `records` (its
/// records, decompressed), with the compression bits cleared and the length and CRC
/// computed again; every other field (offsets, timestamps, producer id, epoch and
/// sequence, record count) is kept. The caller checks the result with `check_kafka_batch`.
pub fn uncompressed_kafka_batch(bytes: &[u8], records: &[u8]) -> Result<Vec<u8>, FormatError> {
    if bytes.len() < KAFKA_HEADER_LEN {
        return Err(FormatError::Truncated);
    }
    let mut out = Vec::with_capacity(KAFKA_HEADER_LEN + records.len());
    out.extend_from_slice(&bytes[..KAFKA_HEADER_LEN]);
    out.extend_from_slice(records);
    let batch_length = i32::try_from(out.len() - 12).map_err(|_| FormatError::BadLength)?;
    out[8..12].copy_from_slice(&batch_length.to_be_bytes());
    let attributes = be_i16(&out, 21) & !COMPRESSION_MASK;
    out[21..23].copy_from_slice(&attributes.to_be_bytes());
    let crc = crc32c::crc32c(&out[CRC_FROM..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// (offset, byte position among the records) of every `every`-th record of an uncompressed
/// batch, from its first: where `batch_records_at` may start to reach an offset without
/// decoding the records before it.
pub fn record_positions(bytes: &[u8], base_offset: u64, every: usize) -> Vec<(u64, usize)> {
    let records = &bytes[KAFKA_HEADER_LEN.min(bytes.len())..];
    let mut iter = KafkaRecords::new(records);
    let mut out = Vec::new();
    let mut i = 0usize;
    loop {
        let position = records.len() - iter.remaining();
        let Some(Ok(record)) = iter.next() else {
            return out;
        };
        if i.is_multiple_of(every.max(1)) {
            out.push((base_offset + record.offset_delta.unsigned_abs(), position));
        }
        i += 1;
    }
}

/// The batch `bytes` (checked, `header`; its offsets from `stored_base`) rebuilt with the
/// records `keep` accepts, for compaction: their offsets, times, keys, values and headers
/// unchanged, in a batch spanning offsets `new_base..new_end`, which may start before and
/// end after the original's (to cover the offsets of emptied batches beside it, so that a
/// segment's batches still follow each other with no gap). Attributes, producer fields and
/// the max timestamp are kept; with `delete_horizon`, the base timestamp becomes it (with
/// `DELETE_HORIZON`). A batch may come out with no records: it still spans its offsets.
/// The span must hold the records kept and be at most `MAX_KAFKA_BATCH_SPAN` offsets
/// (else `FormatError::BadLength`). Compressed batches are refused
/// (`FormatError::Compressed`).
pub fn rebuild_kafka_batch(
    bytes: &[u8],
    header: &KafkaBatchHeader,
    stored_base: u64,
    (new_base, new_end): (u64, u64),
    delete_horizon: Option<i64>,
    keep: &mut dyn FnMut(&BatchRecord<'_>) -> bool,
) -> Result<Vec<u8>, FormatError> {
    if header.compression() != 0 {
        return Err(FormatError::Compressed);
    }
    let last_offset_delta = new_end
        .checked_sub(new_base)
        .and_then(|span| i32::try_from(span.checked_sub(1)?).ok())
        .ok_or(FormatError::BadLength)?;
    let mut attributes = header.attributes;
    let base_timestamp = match delete_horizon {
        Some(horizon) => {
            attributes |= DELETE_HORIZON;
            horizon
        }
        None => header.base_timestamp,
    };
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..KAFKA_HEADER_LEN]);
    let mut count = 0i32;
    let mut record = Vec::new();
    for item in batch_records(bytes, header, stored_base, 0) {
        let item = item?;
        if !keep(&item) {
            continue;
        }
        if item.offset < new_base || item.offset >= new_end {
            return Err(FormatError::BadLength);
        }
        // The record's own time: its delta from the original base (a LogAppendTime batch's
        // records all read the max timestamp whatever their delta says).
        let timestamp = header
            .base_timestamp
            .wrapping_add(item.record.timestamp_delta);
        let r = &mut record;
        r.clear();
        r.push(0); // attributes (unused by format v2)
        put_varint(r, timestamp.wrapping_sub(base_timestamp));
        put_varint(
            r,
            i64::try_from(item.offset - new_base).map_err(|_| FormatError::BadLength)?,
        );
        put_bytes(r, item.record.key);
        put_bytes(r, item.record.value);
        r.extend_from_slice(item.record.headers);
        put_varint(&mut out, r.len() as i64);
        out.extend_from_slice(r);
        count += 1;
    }
    let batch_length = i32::try_from(out.len() - 12).map_err(|_| FormatError::BadLength)?;
    let new_base_i64 = i64::try_from(new_base).map_err(|_| FormatError::BadLength)?;
    out[0..8].copy_from_slice(&new_base_i64.to_be_bytes());
    out[8..12].copy_from_slice(&batch_length.to_be_bytes());
    out[21..23].copy_from_slice(&attributes.to_be_bytes());
    out[23..27].copy_from_slice(&last_offset_delta.to_be_bytes());
    out[27..35].copy_from_slice(&base_timestamp.to_be_bytes());
    out[57..61].copy_from_slice(&count.to_be_bytes());
    let crc = crc32c::crc32c(&out[CRC_FROM..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// A record to add to a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct NewKafkaRecord<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a [u8], Option<&'a [u8]>)],
    pub timestamp: i64,
}

/// Builds one uncompressed batch, records in offset order with no gaps.
pub struct KafkaBatchBuilder {
    buf: Vec<u8>,
    base_timestamp: Option<i64>,
    max_timestamp: i64,
    count: i32,
    record: Vec<u8>,
}

impl Default for KafkaBatchBuilder {
    fn default() -> Self {
        KafkaBatchBuilder::new()
    }
}

impl KafkaBatchBuilder {
    pub fn new() -> KafkaBatchBuilder {
        KafkaBatchBuilder {
            buf: vec![0; KAFKA_HEADER_LEN],
            base_timestamp: None,
            max_timestamp: i64::MIN,
            count: 0,
            record: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the batch takes so far.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    pub fn push(&mut self, record: &NewKafkaRecord<'_>) {
        let base = *self.base_timestamp.get_or_insert(record.timestamp);
        self.max_timestamp = self.max_timestamp.max(record.timestamp);
        let r = &mut self.record;
        r.clear();
        r.push(0); // attributes
        put_varint(r, record.timestamp.wrapping_sub(base));
        put_varint(r, i64::from(self.count));
        put_bytes(r, record.key);
        put_bytes(r, record.value);
        put_varint(r, record.headers.len() as i64);
        for (key, value) in record.headers {
            put_bytes(r, Some(key));
            put_bytes(r, *value);
        }
        put_varint(&mut self.buf, self.record.len() as i64);
        self.buf.extend_from_slice(&self.record);
        self.count += 1;
    }

    /// The batch, with base offset 0 (the broker stamps it when appending).
    pub fn finish(mut self) -> Vec<u8> {
        let b = &mut self.buf;
        let base_timestamp = self.base_timestamp.unwrap_or(0);
        let max_timestamp = if self.count == 0 {
            base_timestamp
        } else {
            self.max_timestamp
        };
        let batch_length = crate::narrow::<i32>(b.len() - 12, "a Kafka batch's length");
        b[0..8].copy_from_slice(&0i64.to_be_bytes());
        b[8..12].copy_from_slice(&batch_length.to_be_bytes());
        b[12..16].copy_from_slice(&0i32.to_be_bytes());
        b[16] = KAFKA_MAGIC as u8;
        b[21..23].copy_from_slice(&0i16.to_be_bytes());
        b[23..27].copy_from_slice(&(self.count - 1).max(0).to_be_bytes());
        b[27..35].copy_from_slice(&base_timestamp.to_be_bytes());
        b[35..43].copy_from_slice(&max_timestamp.to_be_bytes());
        b[43..51].copy_from_slice(&(-1i64).to_be_bytes()); // no producer id
        b[51..53].copy_from_slice(&(-1i16).to_be_bytes());
        b[53..57].copy_from_slice(&(-1i32).to_be_bytes());
        b[57..61].copy_from_slice(&self.count.to_be_bytes());
        let crc = crc32c::crc32c(&b[CRC_FROM..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        self.buf
    }
}

fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z & 0x7f) as u8 | 0x80);
        z >>= 7;
    }
    out.push((z & 0x7f) as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, b.len() as i64);
            out.extend_from_slice(b);
        }
    }
}

/// A reader of zigzag varints and length-prefixed bytes.
struct Varints<'a>(&'a [u8]);

impl<'a> Varints<'a> {
    fn u8(&mut self) -> Result<u8, FormatError> {
        let (&b, rest) = self.0.split_first().ok_or(FormatError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<i64, FormatError> {
        let mut z: u64 = 0;
        for shift in (0..70).step_by(7) {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(FormatError::BadLength); // more than 64 bits
            }
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        Err(FormatError::BadLength)
    }

    fn bytes(&mut self) -> Result<Option<&'a [u8]>, FormatError> {
        let len = self.varint()?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| FormatError::BadLength)?;
        if len > self.0.len() {
            return Err(FormatError::Truncated);
        }
        let (b, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(Some(b))
    }
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

// Partitioning, as Kafka's Java client does it (the producers of tidewater and Kafka put
// one key in one partition).

/// Kafka's murmur2 (32-bit, seed 0x9747b28c), as a signed int as Java returns it.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    // Java hashes the length as an int (it wraps as Java's would; keys are far shorter).
    #[allow(clippy::cast_possible_truncation)]
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a keyed record: Kafka's `toPositive(murmur2(key)) % partitions`.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a stream has at least one partition");
    (murmur2(key) as u32 & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Vec<u8> {
        let mut builder = KafkaBatchBuilder::new();
        let headers: [(&[u8], Option<&[u8]>); 2] = [(b"h1", Some(b"v1")), (b"h2", None)];
        builder.push(&NewKafkaRecord {
            key: Some(b"k0"),
            value: Some(b"hello"),
            headers: &headers,
            timestamp: 1_000,
        });
        builder.push(&NewKafkaRecord {
            key: None,
            value: Some(b""),
            headers: &[],
            timestamp: 990,
        });
        builder.push(&NewKafkaRecord {
            key: Some(b"k2"),
            value: None,
            headers: &[],
            timestamp: 1_500,
        });
        builder.finish()
    }

    #[test]
    fn a_built_batch_checks_and_reads_back() {
        let bytes = batch();
        let header = check_kafka_batch(&bytes).unwrap();
        assert_eq!(header.records_count, 3);
        assert_eq!(header.last_offset_delta, 2);
        assert_eq!(
            (header.base_timestamp, header.max_timestamp),
            (1_000, 1_500)
        );
        assert_eq!(header.offset_span(), 3);
        let records: Vec<KafkaRecord<'_>> = KafkaRecords::new(&bytes[KAFKA_HEADER_LEN..])
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(records[0].key, Some(&b"k0"[..]));
        assert_eq!(records[0].value, Some(&b"hello"[..]));
        let headers: Vec<_> = records[0].headers().collect::<Result<_, _>>().unwrap();
        assert_eq!(
            headers,
            vec![(&b"h1"[..], Some(&b"v1"[..])), (&b"h2"[..], None)]
        );
        assert_eq!((records[1].key, records[1].timestamp_delta), (None, -10));
        assert_eq!((records[2].value, records[2].offset_delta), (None, 2));
    }

    #[test]
    fn stamping_sets_the_offset_and_append_time_and_keeps_the_crc_true() {
        let mut bytes = batch();
        stamp_kafka_batch(&mut bytes, 41, None);
        assert_eq!(check_kafka_batch(&bytes).unwrap().base_offset, 41);
        stamp_kafka_batch(&mut bytes, 42, Some(9_999));
        let header = check_kafka_batch(&bytes).unwrap();
        assert_eq!(header.base_offset, 42);
        assert!(header.is_log_append_time());
        assert_eq!(header.max_timestamp, 9_999);
    }

    #[test]
    fn damaged_batches_are_refused() {
        let good = batch();
        let mut bad_crc = good.clone();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        assert_eq!(check_kafka_batch(&bad_crc), Err(FormatError::BadChecksum));
        assert_eq!(
            check_kafka_batch(&good[..good.len() - 1]),
            Err(FormatError::BadLength)
        );
        let mut magic = good.clone();
        magic[16] = 1;
        assert_eq!(
            check_kafka_batch(&magic),
            Err(FormatError::UnknownVersion(1))
        );
        assert_eq!(check_kafka_batch(&good[..10]), Err(FormatError::Truncated));
        // A record count that does not match the records (CRC recomputed: a forged batch).
        let mut count = good.clone();
        count[57..61].copy_from_slice(&2i32.to_be_bytes());
        let crc = crc32c::crc32c(&count[CRC_FROM..]);
        count[17..21].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(check_kafka_batch(&count), Err(FormatError::BadLength));
    }

    #[test]
    fn a_rebuilt_batch_keeps_offsets_times_and_bytes_of_the_records_it_keeps() {
        let mut bytes = batch();
        stamp_kafka_batch(&mut bytes, 100, None);
        let header = check_kafka_batch(&bytes).unwrap();
        let before: Vec<(u64, i64, Option<Vec<u8>>)> = batch_records(&bytes, &header, 100, 0)
            .map(|r| {
                let r = r.unwrap();
                (r.offset, r.timestamp, r.record.key.map(<[u8]>::to_vec))
            })
            .collect();
        // Keep offsets 100 and 102; cover 90..110 (emptied batches on both sides).
        let rebuilt = rebuild_kafka_batch(&bytes, &header, 100, (90, 110), Some(5_000), &mut |r| {
            r.offset != 101
        })
        .unwrap();
        let new = check_kafka_batch(&rebuilt).unwrap();
        assert_eq!(
            (new.base_offset, new.offset_span(), new.records_count),
            (90, 20, 2)
        );
        assert_eq!(new.delete_horizon(), Some(5_000));
        assert_eq!(new.max_timestamp, header.max_timestamp);
        assert_eq!(
            (new.producer_id, new.producer_epoch, new.base_sequence),
            (
                header.producer_id,
                header.producer_epoch,
                header.base_sequence
            )
        );
        let after: Vec<(u64, i64, Option<Vec<u8>>)> = batch_records(&rebuilt, &new, 90, 0)
            .map(|r| {
                let r = r.unwrap();
                (r.offset, r.timestamp, r.record.key.map(<[u8]>::to_vec))
            })
            .collect();
        assert_eq!(after, vec![before[0].clone(), before[2].clone()]);
        let headers: Vec<_> = batch_records(&rebuilt, &new, 90, 0)
            .next()
            .unwrap()
            .unwrap()
            .record
            .headers()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            headers,
            vec![(&b"h1"[..], Some(&b"v1"[..])), (&b"h2"[..], None)]
        );
        // Nothing kept: an empty batch that still spans its offsets.
        let empty =
            rebuild_kafka_batch(&bytes, &header, 100, (100, 103), None, &mut |_| false).unwrap();
        let empty_header = check_kafka_batch(&empty).unwrap();
        assert_eq!(
            (empty_header.records_count, empty_header.offset_span()),
            (0, 3)
        );
        assert_eq!(empty_header.delete_horizon(), None);
        // A span that does not hold the records is refused.
        assert!(
            rebuild_kafka_batch(&bytes, &header, 100, (101, 103), None, &mut |_| true).is_err()
        );
        // A compressed batch is refused (its records are not readable in place).
        let mut compressed = bytes.clone();
        compressed[22] |= 1;
        let crc = crc32c::crc32c(&compressed[CRC_FROM..]);
        compressed[17..21].copy_from_slice(&crc.to_be_bytes());
        let compressed_header = KafkaBatchHeader {
            attributes: 1,
            ..header
        };
        assert_eq!(
            rebuild_kafka_batch(
                &compressed,
                &compressed_header,
                100,
                (100, 103),
                None,
                &mut |_| true
            ),
            Err(FormatError::Compressed)
        );
    }

    #[test]
    fn varints_round_trip_at_the_edges() {
        for v in [
            0i64,
            1,
            -1,
            63,
            -64,
            64,
            300,
            i32::MAX as i64,
            i64::MAX,
            i64::MIN,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(Varints(&buf).varint().unwrap(), v, "{v}");
        }
        assert!(Varints(&[0xff; 11]).varint().is_err());
    }

    #[test]
    fn a_wrapped_batch_checks_stamps_and_keeps_both_crcs_true() {
        let inner = batch();
        let mut wrapped = crate::wrap_kafka_batch(9, &inner).unwrap();
        let header = crate::check_batch(&wrapped).unwrap();
        assert!(header.is_kafka());
        assert_eq!(
            (header.log_uid, header.count, header.published_at_ms),
            (9, 3, 1_500)
        );
        crate::stamp_batch(&mut wrapped, 1_000);
        let header = crate::check_batch(&wrapped).unwrap();
        assert_eq!(header.base_offset, 1_000);
        let kafka = check_kafka_batch(&wrapped[crate::BATCH_HEADER_LEN..]).unwrap();
        assert_eq!(
            kafka.base_offset, 1_000,
            "the Kafka batch carries the offset too"
        );
        // Every byte but the stamped ones is covered by a CRC.
        for at in crate::BATCH_HEADER_LEN + 16..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[at] ^= 0x40;
            assert_eq!(
                crate::check_batch(&bad),
                Err(FormatError::BadChecksum),
                "byte {at}"
            );
        }
        // A damaged Kafka batch is refused when wrapped.
        let mut span = inner.clone();
        span[23..27].copy_from_slice(&7i32.to_be_bytes());
        assert!(crate::wrap_kafka_batch(9, &span).is_err());
    }
}
