//! A stream partition read as a source of queue records: what a subscription delivers.
//!
//! Stored batches are read whole (`LogReader::read_batches`) and their records mapped to
//! `Record`s without copying keys, values or headers (slices of the stored batch):
//! - `offset`: the record's offset in the partition; `published_at_ms`: its timestamp
//!   (the producer's create time, or the broker's with log-append time);
//! - `id`: `"<partition>-<offset>"` (so a dead-lettered copy names its origin);
//! - a null header value becomes empty; a null value (a tombstone) an empty body with the
//!   header `tidewater-tombstone: 1`;
//! - no `deliver_at` (stream records are deliverable at once).
//!
//! Offsets inside a batch's span may hold no record (compaction removed it): reads skip
//! them, and the delivery state settles them when its scan passes (`QueueState` holes).

use bytes::Bytes;
use tidewater_storage::format::RecordView;
use tidewater_storage::format::kafka::{
    BatchRecord, batch_records_at, check_kafka_batch, record_positions,
};
use tidewater_storage::format::{FormatError, NewRecord, encode_record, view_record};
use tidewater_storage::{LogReader, ReadError, Record, StoredBatch};

use crate::queue::RecordSource;

/// Header marking a delivered tombstone (a record whose value is null).
pub const HEADER_TOMBSTONE: &str = "tidewater-tombstone";

/// Bytes of stored batches read at first in one read (doubling while it reads on, up to
/// `MAX_READ_BYTES`): a delivery that wants a few records reads little.
const FIRST_READ_BYTES: usize = 64 << 10;
const MAX_READ_BYTES: usize = 4 << 20;

/// A checked batch keeps where every this many records start, once it is read from the
/// middle (so a read from the middle of a large batch does not decode the records before
/// it).
const MARK_EVERY: usize = 32;

/// Batches a partition's cache keeps at most (and `CACHE_BYTES_PER_PARTITION` bytes).
const CACHE_BATCHES: usize = 8;
const CACHE_BYTES_PER_PARTITION: u64 = 8 << 20;

/// A stored batch with its Kafka header checked (its CRC once, not at every read) and,
/// found when first needed, where some of its records start.
#[derive(Debug)]
pub struct CheckedBatch {
    batch: StoredBatch,
    header: tidewater_storage::format::kafka::KafkaBatchHeader,
    marks: std::sync::OnceLock<Vec<(u64, usize)>>,
}

impl CheckedBatch {
    fn check(batch: StoredBatch) -> Result<CheckedBatch, FormatError> {
        let header = check_kafka_batch(&batch.kafka)?;
        Ok(CheckedBatch {
            batch,
            header,
            marks: std::sync::OnceLock::new(),
        })
    }

    fn holds(&self, offset: u64) -> bool {
        self.batch.base_offset <= offset
            && offset < self.batch.base_offset + u64::from(self.batch.span)
    }

    /// Where to start decoding to reach `offset`: a record at or before it.
    fn position_for(&self, offset: u64) -> usize {
        if offset <= self.batch.base_offset {
            return 0;
        }
        let marks = self.marks.get_or_init(|| {
            record_positions(&self.batch.kafka, self.batch.base_offset, MARK_EVERY)
        });
        let i = marks.partition_point(|(o, _)| *o <= offset);
        if i == 0 { 0 } else { marks[i - 1].1 }
    }
}

/// The bytes all partitions' batch caches may hold together (`[limits]
/// subscription_cache_bytes`): past it, batches are read and not kept.
#[derive(Debug)]
pub struct CacheBudget {
    used: std::sync::atomic::AtomicU64,
    max: u64,
}

impl CacheBudget {
    pub fn new(max: u64) -> std::sync::Arc<CacheBudget> {
        std::sync::Arc::new(CacheBudget {
            used: std::sync::atomic::AtomicU64::new(0),
            max,
        })
    }

    /// Bytes held by caches now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(&self, bytes: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= self.max).then_some(used + bytes)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: u64) {
        self.used
            .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The last stored batches read from one partition, shared by every subscription of it:
/// subscriptions near the head read (and check) each batch from the file once whatever
/// their number, and a delivery that takes part of a large batch does not read it again
/// for the rest. Bounded per partition and by a broker-wide budget.
#[derive(Debug)]
pub struct BatchCache {
    batches: parking_lot::Mutex<std::collections::VecDeque<std::sync::Arc<CheckedBatch>>>,
    budget: std::sync::Arc<CacheBudget>,
}

impl BatchCache {
    pub fn new(budget: std::sync::Arc<CacheBudget>) -> std::sync::Arc<BatchCache> {
        std::sync::Arc::new(BatchCache {
            batches: parking_lot::Mutex::new(std::collections::VecDeque::new()),
            budget,
        })
    }

    /// The cached batch holding `offset`, if any.
    fn holding(&self, offset: u64) -> Option<std::sync::Arc<CheckedBatch>> {
        self.batches
            .lock()
            .iter()
            .find(|b| b.holds(offset))
            .cloned()
    }

    /// Keeps a batch just read, evicting the oldest, when the budget allows.
    fn keep(&self, batch: &std::sync::Arc<CheckedBatch>) {
        let size = batch.batch.kafka.len() as u64;
        let mut batches = self.batches.lock();
        if batches
            .iter()
            .any(|b| b.batch.base_offset == batch.batch.base_offset)
        {
            return;
        }
        while !batches.is_empty()
            && (batches.len() >= CACHE_BATCHES
                || batches
                    .iter()
                    .map(|b| b.batch.kafka.len() as u64)
                    .sum::<u64>()
                    + size
                    > CACHE_BYTES_PER_PARTITION)
        {
            if let Some(old) = batches.pop_front() {
                self.budget.give_back(old.batch.kafka.len() as u64);
            }
        }
        if size <= CACHE_BYTES_PER_PARTITION && self.budget.take(size) {
            batches.push_back(batch.clone());
        }
    }
}

impl Drop for BatchCache {
    fn drop(&mut self) {
        let held: u64 = self
            .batches
            .get_mut()
            .iter()
            .map(|b| b.batch.kafka.len() as u64)
            .sum();
        self.budget.give_back(held);
    }
}

/// Where a partition's stored batches come from (its log reader; a list in tests).
pub trait BatchRead {
    /// Durable batches from the one holding `from` on, about `max_bytes` of them (at least
    /// one when one exists).
    fn read_batches(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredBatch>, ReadError>;
}

impl BatchRead for LogReader {
    fn read_batches(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredBatch>, ReadError> {
        LogReader::read_batches(self, from, max_bytes)
    }
}

/// One partition of a stream as a `RecordSource`.
#[derive(Clone)]
pub struct KafkaSource<R = LogReader> {
    reader: R,
    partition: u32,
    cache: Option<std::sync::Arc<BatchCache>>,
}

impl<R: BatchRead> KafkaSource<R> {
    pub fn new(reader: R, partition: u32) -> Self {
        KafkaSource {
            reader,
            partition,
            cache: None,
        }
    }

    /// Reads through `cache` (the partition's, shared by its subscriptions).
    pub fn with_cache(mut self, cache: std::sync::Arc<BatchCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    pub fn reader(&self) -> &R {
        &self.reader
    }

    /// Shows `visit` the records at offsets `from` and later, in order, until it returns
    /// false or the durable records end.
    fn each(&self, from: u64, visit: &mut dyn FnMut(Record) -> bool) -> Result<(), ReadError> {
        let mut at = from;
        let mut chunk = FIRST_READ_BYTES;
        loop {
            let batches = match self.cache.as_ref().and_then(|c| c.holding(at)) {
                Some(batch) => vec![batch],
                None => {
                    let read = self.reader.read_batches(at, chunk)?;
                    chunk = (chunk * 2).min(MAX_READ_BYTES);
                    let mut checked = Vec::with_capacity(read.len());
                    for batch in read {
                        let base = batch.base_offset;
                        let batch = std::sync::Arc::new(
                            CheckedBatch::check(batch).map_err(|e| self.corrupt(base, e))?,
                        );
                        if let Some(cache) = &self.cache {
                            cache.keep(&batch);
                        }
                        checked.push(batch);
                    }
                    checked
                }
            };
            if batches.is_empty() {
                return Ok(());
            }
            let mut moved = false;
            for checked in batches {
                let batch = &checked.batch;
                let end = batch.base_offset + batch.span as u64;
                if end <= at {
                    continue;
                }
                if checked.header.compression() != 0 {
                    // Produce refuses compressed batches today; a subscription cannot
                    // deliver records it cannot read (the Kafka protocol will bring a
                    // decompressor here).
                    return Err(self.corrupt(batch.base_offset, FormatError::Compressed));
                }
                let position = checked.position_for(at);
                let records = batch_records_at(
                    &batch.kafka,
                    &checked.header,
                    batch.base_offset,
                    at,
                    position,
                );
                for record in records {
                    let record = record.map_err(|e| self.corrupt(batch.base_offset, e))?;
                    if !visit(self.to_record(&batch.kafka, record)) {
                        return Ok(());
                    }
                }
                at = end;
                moved = true;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn corrupt(&self, position: u64, reason: FormatError) -> ReadError {
        ReadError::Corrupt {
            path: format!("partition {} of a stream", self.partition).into(),
            position,
            reason,
        }
    }

    fn to_record(&self, kafka: &Bytes, record: BatchRecord<'_>) -> Record {
        let slice = |part: &[u8]| kafka.slice_ref(part);
        let mut headers: Vec<(Bytes, Bytes)> = record
            .record
            .headers()
            .filter_map(Result::ok)
            .map(|(name, value)| (slice(name), value.map(slice).unwrap_or_default()))
            .collect();
        let body = match record.record.value {
            Some(value) => slice(value),
            None => {
                headers.push((
                    Bytes::from_static(HEADER_TOMBSTONE.as_bytes()),
                    Bytes::from_static(b"1"),
                ));
                Bytes::new()
            }
        };
        Record {
            offset: record.offset,
            published_at_ms: record.timestamp,
            flags: 0,
            deliver_at_ms: 0,
            id: Bytes::from(format!("{}-{}", self.partition, record.offset)),
            key: record.record.key.map(slice),
            headers,
            body,
        }
    }
}

impl<R: BatchRead> RecordSource for KafkaSource<R> {
    fn read(
        &self,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, ReadError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        if max_count == 0 {
            return Ok(out);
        }
        self.each(from, &mut |record| {
            bytes += record.body.len();
            out.push(record);
            out.len() < max_count && bytes < max_bytes
        })?;
        Ok(out)
    }

    fn read_where(
        &self,
        from: u64,
        end: u64,
        want: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<Record>, ReadError> {
        let mut out = Vec::new();
        self.each(from, &mut |record| {
            if record.offset >= end {
                return false;
            }
            if want(record.offset) {
                out.push(record);
            }
            true
        })?;
        Ok(out)
    }

    fn scan(
        &self,
        from: u64,
        max_count: usize,
        visit: &mut dyn FnMut(&RecordView<'_>) -> bool,
    ) -> Result<(), ReadError> {
        // Views of stream records: each encoded in the queue format (only where lanes are
        // sorted: priorities and fairness read headers and keys from views).
        let mut seen = 0;
        let mut buf = Vec::new();
        let mut result = Ok(());
        self.each(from, &mut |record| {
            if seen == max_count {
                return false;
            }
            seen += 1;
            buf.clear();
            encode_record(
                &mut buf,
                &NewRecord {
                    id: &record.id,
                    generated_id: false,
                    key: record.key.as_deref(),
                    headers: record
                        .headers
                        .iter()
                        .map(|(k, v)| (&k[..], &v[..]))
                        .collect(),
                    deliver_at_ms: 0,
                    body: &record.body,
                },
            );
            match view_record(&buf, record.offset) {
                Ok(view) => visit(&view),
                Err(err) => {
                    result = Err(ReadError::Corrupt {
                        path: format!("partition {} of a stream", self.partition).into(),
                        position: record.offset,
                        reason: err,
                    });
                    false
                }
            }
        })?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidewater_storage::format::kafka::{
        KafkaBatchBuilder, NewKafkaRecord, rebuild_kafka_batch, stamp_kafka_batch,
    };

    /// Stored batches in memory, read as a log reader reads them.
    struct Batches(Vec<StoredBatch>);

    impl BatchRead for Batches {
        fn read_batches(&self, from: u64, _: usize) -> Result<Vec<StoredBatch>, ReadError> {
            Ok(self
                .0
                .iter()
                .filter(|b| b.base_offset + b.span as u64 > from)
                .cloned()
                .collect())
        }
    }

    /// A stored batch at `base` spanning `span` offsets, holding (offset delta, key, value)
    /// records; other offsets of the span are holes (as compaction leaves them).
    fn batch(base: u64, span: u32, records: &[(u64, &str, Option<&str>)]) -> StoredBatch {
        let headers: &[(&[u8], Option<&[u8]>)] = &[(b"h", Some(b"v")), (b"n", None)];
        let mut builder = KafkaBatchBuilder::new();
        for delta in 0..span as u64 {
            let record = records.iter().find(|r| r.0 == delta);
            builder.push(&NewKafkaRecord {
                key: Some(record.map_or("gone", |r| r.1).as_bytes()),
                value: record.map_or(Some("gone"), |r| r.2).map(str::as_bytes),
                headers,
                timestamp: 1_000 + delta as i64,
            });
        }
        let mut dense = builder.finish();
        stamp_kafka_batch(&mut dense, base, None);
        let header = check_kafka_batch(&dense).unwrap();
        let kept = rebuild_kafka_batch(
            &dense,
            &header,
            base,
            (base, base + span as u64),
            None,
            &mut |r| records.iter().any(|k| k.0 == r.offset - base),
        )
        .unwrap();
        let header = check_kafka_batch(&kept).unwrap();
        StoredBatch {
            base_offset: base,
            span,
            max_timestamp: header.max_timestamp,
            kafka: kept.into(),
        }
    }

    fn offsets(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn stream_records_read_as_queue_records_across_holes() {
        // Offsets 0..3, then 3..6 of which 4 is gone, then 6..8 with no record at all.
        let source = KafkaSource::new(
            Batches(vec![
                batch(
                    0,
                    3,
                    &[(0, "a", Some("x")), (1, "b", Some("y")), (2, "c", None)],
                ),
                batch(3, 3, &[(0, "d", Some("z")), (2, "f", Some("w"))]),
                batch(6, 2, &[]),
                batch(8, 1, &[(0, "g", Some("last"))]),
            ]),
            7,
        );
        let all = source.read(0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(offsets(&all), [0, 1, 2, 3, 5, 8]);
        let first = &all[0];
        assert_eq!(
            (&first.id[..], first.key.as_deref(), &first.body[..]),
            (b"7-0".as_slice(), Some(b"a".as_slice()), b"x".as_slice())
        );
        assert_eq!(first.published_at_ms, 1_000);
        assert_eq!(all[4].published_at_ms, 1_002, "times kept across holes");
        assert_eq!(
            first.headers,
            [
                (Bytes::from_static(b"h"), Bytes::from_static(b"v")),
                (Bytes::from_static(b"n"), Bytes::new())
            ]
        );
        // A tombstone: empty body, marked.
        let tombstone = &all[2];
        assert!(tombstone.body.is_empty());
        assert!(
            tombstone
                .headers
                .iter()
                .any(|(k, v)| &k[..] == HEADER_TOMBSTONE.as_bytes() && &v[..] == b"1")
        );
        // From inside a batch and inside a hole; counts; a window with a filter.
        assert_eq!(offsets(&source.read(4, 1, usize::MAX).unwrap()), [5]);
        assert_eq!(offsets(&source.read(6, 10, usize::MAX).unwrap()), [8]);
        assert!(source.read(9, 10, usize::MAX).unwrap().is_empty());
        let picked = source.read_where(1, 8, &|o| o % 2 == 1).unwrap();
        assert_eq!(offsets(&picked), [1, 3, 5]);
        // Views carry the same key and headers.
        let mut seen = Vec::new();
        source
            .scan(1, 3, &mut |view| {
                seen.push((
                    view.offset,
                    view.key.map(<[u8]>::to_vec),
                    view.headers().count(),
                ));
                true
            })
            .unwrap();
        assert_eq!(
            seen,
            [
                (1, Some(b"b".to_vec()), 2),
                (2, Some(b"c".to_vec()), 3),
                (3, Some(b"d".to_vec()), 2)
            ]
        );
    }

    #[test]
    fn a_cache_serves_reads_from_inside_large_batches_as_the_file_does() {
        let records: Vec<(u64, &str, Option<&str>)> =
            (0..500).map(|i| (i, "k", Some("value"))).collect();
        let big = || {
            Batches(vec![
                batch(0, 500, &records),
                batch(500, 1, &[(0, "z", Some("end"))]),
            ])
        };
        let plain = KafkaSource::new(big(), 0);
        let budget = CacheBudget::new(1 << 20);
        let cached = KafkaSource::new(big(), 0).with_cache(BatchCache::new(budget.clone()));
        for from in [0, 1, 31, 32, 33, 250, 499, 500, 501] {
            for count in [1, 7, 100, 1_000] {
                let want = offsets(&plain.read(from, count, usize::MAX).unwrap());
                // Twice: the first read fills the cache, the second is served from it.
                for _ in 0..2 {
                    assert_eq!(
                        offsets(&cached.read(from, count, usize::MAX).unwrap()),
                        want,
                        "{from} {count}"
                    );
                }
            }
        }
        assert!(budget.used() > 0);
        // The budget bounds what is kept (and a dropped cache gives its bytes back).
        let small = CacheBudget::new(100);
        let tiny = KafkaSource::new(big(), 0).with_cache(BatchCache::new(small.clone()));
        assert_eq!(tiny.read(10, 5, usize::MAX).unwrap().len(), 5);
        assert!(
            small.used() <= 100,
            "the large batch was not kept: {}",
            small.used()
        );
        drop(cached);
        assert_eq!(budget.used(), 0);
    }
}
