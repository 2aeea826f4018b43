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
use tidewater_storage::format::kafka::{BatchRecord, batch_records, check_kafka_batch};
use tidewater_storage::format::{FormatError, NewRecord, encode_record, view_record};
use tidewater_storage::{LogReader, ReadError, Record, StoredBatch};

use crate::queue::RecordSource;

/// Header marking a delivered tombstone (a record whose value is null).
pub const HEADER_TOMBSTONE: &str = "tidewater-tombstone";

/// Bytes of stored batches read at a time.
const READ_BYTES: usize = 1 << 20;

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
}

impl<R: BatchRead> KafkaSource<R> {
    pub fn new(reader: R, partition: u32) -> Self {
        KafkaSource { reader, partition }
    }

    pub fn reader(&self) -> &R {
        &self.reader
    }

    /// Shows `visit` the records at offsets `from` and later, in order, until it returns
    /// false or the durable records end.
    fn each(&self, from: u64, visit: &mut dyn FnMut(Record) -> bool) -> Result<(), ReadError> {
        let mut at = from;
        loop {
            let batches = self.reader.read_batches(at, READ_BYTES)?;
            if batches.is_empty() {
                return Ok(());
            }
            let mut moved = false;
            for batch in batches {
                let end = batch.base_offset + batch.span as u64;
                if end <= at {
                    continue;
                }
                let corrupt = |reason: FormatError| ReadError::Corrupt {
                    path: format!("partition {} of a stream", self.partition).into(),
                    position: batch.base_offset,
                    reason,
                };
                let header = check_kafka_batch(&batch.kafka).map_err(corrupt)?;
                if header.compression() != 0 {
                    // Produce refuses compressed batches today; a subscription cannot
                    // deliver records it cannot read (the Kafka protocol will bring a
                    // decompressor here).
                    return Err(corrupt(FormatError::Compressed));
                }
                for record in batch_records(&batch.kafka, &header, batch.base_offset, at) {
                    let record = record.map_err(corrupt)?;
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
}
